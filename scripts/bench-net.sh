#!/usr/bin/env bash
# Network benchmarks, each beside its native peer measured in the same run,
# interleaved, on 127.0.0.1:
#   * wrk against examples/httpd (through `-p`, the user-mode network)
#     versus nginx from Debian serving the same page natively;
#   * redis-benchmark against examples/kv (in memory, through `-p`) versus
#     redis-server from Debian natively (persistence off on both),
#     unpipelined and with -P 16;
#   * the monitor's own counters: VM exits per request under load;
#   * time from `wisp run -p` (process start) to the first HTTP 200, median
#     of STARTS starts, beside nginx's start to its first 200;
#   * an idle guest's host CPU use.
# Both peers run one worker / one thread, as the unikernel has one vCPU.
# The clients run on CPU 0 and every server on CPU 1 (nginx's worker,
# redis-server, and both threads of a Wisp monitor share that core), so
# each server gets the same one core; PIN=0 lets the scheduler place them.
# Usage: bash scripts/bench-net.sh [ROUNDS] [SECONDS] [STARTS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
secs="${2:-5}"
starts="${3:-10}"

bash scripts/install-deps.sh bench wrk nginx redis-server
cargo build --release -q
mkdir -p target/bench
target/release/wisp build examples/httpd -o target/bench/httpd.wisp
target/release/wisp build examples/kv -o target/bench/kv.wisp

srv=(); cli=()
if [ "${PIN:-1}" = 1 ] && [ "$(nproc)" -ge 2 ]; then
  srv=(taskset -c 1); cli=(taskset -c 0)
  echo "== servers on CPU 1, clients on CPU 0 (PIN=0 to let the scheduler place them)"
fi

work="$(mktemp -d)"
# nginx's worker runs as nobody: it must be able to read the page.
chmod 755 "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

# The same page as httpd's built-in one.
python3 - "$work/www" <<'PY'
import re, sys, os, pathlib
src = pathlib.Path("examples/httpd/src/site.rs").read_text()
page = re.search(r'const BUILT_IN_INDEX: &str = "(.*?)";', src, re.S).group(1)
page = page.encode().decode("unicode_escape")
os.makedirs(sys.argv[1], exist_ok=True)
pathlib.Path(sys.argv[1], "index.html").write_text(page)
PY

np=$(free_port); wp=$(free_port); rp=$(free_port); kp=$(free_port)
nginx_conf() { # PORT DIR
cat > "$2/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $2/nginx.pid;
error_log $2/nginx.err;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$1; root $work/www; index index.html; }
}
NGINX
}
nginx_conf "$np" "$work"
${srv[@]+"${srv[@]}"} nginx -c "$work/nginx.conf" & pids+=($!)
${srv[@]+"${srv[@]}"} target/release/wisp run -q --stats -p "127.0.0.1:$wp:80" target/bench/httpd.wisp >/dev/null 2>"$work/httpd.stats" & wisp_httpd=$!; pids+=($wisp_httpd)
${srv[@]+"${srv[@]}"} redis-server --port "$rp" --bind 127.0.0.1 --save "" --appendonly no --daemonize no >/dev/null & pids+=($!)
${srv[@]+"${srv[@]}"} target/release/wisp run -q --stats -p "127.0.0.1:$kp:6379" target/bench/kv.wisp >/dev/null 2>"$work/kv.stats" & wisp_kv=$!; pids+=($wisp_kv)
wait_port "$np"; wait_port "$wp"; wait_port "$rp"; wait_port "$kp"
sleep 0.5

echo "== HTTP: wrk -t1 -c32 -d${secs}s, same page ($(wc -c < "$work/www/index.html") bytes), $rounds interleaved rounds"
for r in $(seq "$rounds"); do
  for who in nginx wisp; do
    port=$np; [ "$who" = wisp ] && port=$wp
    ${cli[@]+"${cli[@]}"} wrk -t1 -c32 -d"${secs}s" --latency "http://127.0.0.1:$port/" > "$work/wrk-$who-$r.txt"
  done
done

echo "== Redis: redis-benchmark -t set,get -n 100000 -c 32 (and -P 16), $rounds interleaved rounds"
for r in $(seq "$rounds"); do
  for who in redis wisp; do
    port=$rp; [ "$who" = wisp ] && port=$kp
    ${cli[@]+"${cli[@]}"} redis-benchmark -p "$port" -t set,get -n 100000 -c 32 -q > "$work/rb-$who-$r.txt" 2>/dev/null
    ${cli[@]+"${cli[@]}"} redis-benchmark -p "$port" -t set,get -n 200000 -c 32 -P 16 -q > "$work/rbp-$who-$r.txt" 2>/dev/null
  done
done

# An idle guest: the httpd monitor's CPU time over 2 idle seconds.
idle_cpu() { python3 - "$1" <<'PY'
import os, sys, time
pid = sys.argv[1]
hz = os.sysconf("SC_CLK_TCK")
def cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / hz
a = cpu(); time.sleep(2); b = cpu()
print(f"{(b - a) * 1000:.0f}")
PY
}
sleep 1
idle_ms=$(idle_cpu "$wisp_httpd")

# CPU time of the httpd monitor's threads (all of it went to the benchmark:
# it was idle otherwise, apart from the 2 s just measured).
python3 - "$wisp_httpd" > "$work/httpd.cpu" <<'PY'
import os, sys
pid, hz = sys.argv[1], os.sysconf("SC_CLK_TCK")
def cpu(path):
    f = open(path).read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / hz
by = {}
for t in os.listdir(f"/proc/{pid}/task"):
    name = open(f"/proc/{pid}/task/{t}/comm").read().strip()
    by[name] = by.get(name, 0) + cpu(f"/proc/{pid}/task/{t}/stat")
print(cpu(f"/proc/{pid}/stat"), by.get("wisp-vcpu", 0), by.get("wisp-io", 0))
PY
# Stop both monitors so that they print their counters.
kill -TERM "$wisp_httpd" "$wisp_kv"; wait "$wisp_httpd" "$wisp_kv" 2>/dev/null || true

python3 - "$work" "$rounds" "$idle_ms" <<'PY'
import re, sys, statistics
work, rounds, idle_ms = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def unit(v):
    m = re.match(r"([\d.]+)(us|ms|s|m)", v)
    if not m:
        raise SystemExit(f"cannot parse latency {v!r}")
    x = float(m.group(1))
    return {"us": x / 1000, "ms": x, "s": x * 1000, "m": x * 60000}[m.group(2)]
def stats(name):
    t = open(f"{work}/{name}.stats").read()
    m = re.search(r"stats: (.*)", t)
    if not m:
        raise SystemExit(f"no counters from the {name} monitor:\n{t}")
    w = m.group(1).split()
    return {k: int(v) for k, v in zip(w[::2], w[1::2])}
res, total = {}, 0
print("== HTTP results (median of rounds)")
for who in ("nginx", "wisp"):
    rps, p50, p99 = [], [], []
    for r in range(1, rounds + 1):
        t = open(f"{work}/wrk-{who}-{r}.txt").read()
        if "Requests/sec" not in t or "Non-2xx" in t:
            raise SystemExit(f"wrk against {who} failed or got errors:\n{t}")
        rps.append(float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1)))
        p50.append(unit(re.search(r"^\s+50%\s+(\S+)", t, re.M).group(1)))
        p99.append(unit(re.search(r"^\s+99%\s+(\S+)", t, re.M).group(1)))
        if who == "wisp":
            total += int(re.search(r"(\d+) requests in", t).group(1))
    res[who] = (statistics.median(rps), statistics.median(p50), statistics.median(p99))
    print(f"  {who:<28} {res[who][0]:>10.0f} req/s   p50 {res[who][1]:7.3f} ms   p99 {res[who][2]:7.3f} ms")
print(f"  wisp / nginx (native)        {res['wisp'][0] / res['nginx'][0]:.2f}x requests/s")
ex = stats("httpd")
n = max(total, 1)
print(f"  wisp httpd monitor, per request (>= {total} requests): {ex['exits'] / n:.3f} exits to the monitor, "
      f"{ex['kicks'] / n:.3f} ioeventfd kicks (in-kernel exits), {(ex['exits'] + ex['kicks']) / n:.3f} VM exits in all; "
      f"{ex['blocked-waits']} blocking waits, {ex['io-sleeps']} I/O-thread sleeps, {ex['tx-frames']} / {ex['rx-frames']} frames tx / rx")
cpu = open(f"{work}/httpd.cpu").read().split()
print(f"  wisp httpd monitor CPU: {float(cpu[0]) * 1e6 / n:.1f} µs per request (vCPU {cpu[1]} s, I/O thread {cpu[2]} s)")
print("== Redis results (median of rounds)")
rres = {}
for kind, pre in (("unpipelined", "rb"), ("-P 16", "rbp")):
    for who in ("redis", "wisp"):
        for op in ("SET", "GET"):
            v = []
            for r in range(1, rounds + 1):
                t = open(f"{work}/{pre}-{who}-{r}.txt").read().replace("\r", "\n")
                m = re.findall(rf"{op}: ([\d.]+) requests per second(?:, p50=([\d.]+) msec)?", t)
                if not m:
                    raise SystemExit(f"redis-benchmark {kind} against {who} failed:\n{t}")
                v.append((float(m[-1][0]), float(m[-1][1] or 0)))
            rres[(kind, who, op)] = (statistics.median(x for x, _ in v), statistics.median(y for _, y in v))
            print(f"  {kind:<12} {who:<6} {op}  {rres[(kind, who, op)][0]:>10.0f} req/s   p50 {rres[(kind, who, op)][1]:.3f} ms")
    for op in ("SET", "GET"):
        print(f"  {kind:<12} wisp kv / redis-server (native) {op}: {rres[(kind, 'wisp', op)][0] / rres[(kind, 'redis', op)][0]:.2f}x")
ex = stats("kv")
print(f"  wisp kv monitor: {ex['exits']} exits and {ex['kicks']} kicks in total ({ex['blocked-waits']} blocking waits, {ex['tx-frames']} / {ex['rx-frames']} frames tx / rx)")
print(f"== Idle: the httpd monitor used {idle_ms} ms of host CPU in 2 s with no traffic")
PY

echo "== Start to first HTTP 200 (Rust harness: spawn, then connect and GET in a loop)"
target/release/bench-first200 "$starts"

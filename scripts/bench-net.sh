#!/usr/bin/env bash
# Network benchmarks, each beside its native peer measured in the same run,
# interleaved, on 127.0.0.1:
#   * wrk against examples/httpd (through `-p`, the user-mode network)
#     versus nginx from Debian serving the same page natively;
#   * redis-benchmark against examples/kv (in memory, through `-p`) versus
#     redis-server from Debian natively (persistence off on both).
# Both peers run one worker / one thread, as the unikernel has one vCPU.
# Usage: bash scripts/bench-net.sh [ROUNDS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
secs="${2:-5}"

bash scripts/install-deps.sh bench wrk nginx redis-server
cargo build --release -q
mkdir -p target/bench
target/release/wisp build examples/httpd -o target/bench/httpd.wisp
target/release/wisp build examples/kv -o target/bench/kv.wisp

work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

# The same page as httpd's built-in one.
python3 - "$work/www" <<'PY'
import re, sys, os, pathlib
src = pathlib.Path("examples/httpd/src/main.rs").read_text()
page = re.search(r'const INDEX: &str = "(.*?)";', src, re.S).group(1)
page = page.encode().decode("unicode_escape")
os.makedirs(sys.argv[1], exist_ok=True)
pathlib.Path(sys.argv[1], "index.html").write_text(page)
PY

np=$(free_port); wp=$(free_port); rp=$(free_port); kp=$(free_port)
cat > "$work/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx.err;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$np; root $work/www; index index.html; }
}
NGINX
nginx -c "$work/nginx.conf" & pids+=($!)
target/release/wisp run -p "127.0.0.1:$wp:80" target/bench/httpd.wisp >/dev/null & pids+=($!)
redis-server --port "$rp" --bind 127.0.0.1 --save "" --appendonly no --daemonize no >/dev/null & pids+=($!)
target/release/wisp run -p "127.0.0.1:$kp:6379" target/bench/kv.wisp >/dev/null & pids+=($!)
wait_port "$np"; wait_port "$wp"; wait_port "$rp"; wait_port "$kp"
sleep 0.5

echo "== HTTP: wrk -t1 -c32 -d${secs}s, same page ($(wc -c < "$work/www/index.html") bytes), $rounds interleaved rounds"
for r in $(seq "$rounds"); do
  for who in nginx wisp; do
    port=$np; [ "$who" = wisp ] && port=$wp
    wrk -t1 -c32 -d"${secs}s" --latency "http://127.0.0.1:$port/" > "$work/wrk-$who-$r.txt"
  done
done
python3 - "$work" "$rounds" <<'PY'
import re, sys, statistics
work, rounds = sys.argv[1], int(sys.argv[2])
def unit(v):
    m = re.match(r"([\d.]+)(us|ms|s|m)", v)
    if not m:
        raise SystemExit(f"cannot parse latency {v!r}")
    x = float(m.group(1))
    return {"us": x / 1000, "ms": x, "s": x * 1000, "m": x * 60000}[m.group(2)]
res = {}
for who in ("nginx", "wisp"):
    rps, p50, p99 = [], [], []
    for r in range(1, rounds + 1):
        t = open(f"{work}/wrk-{who}-{r}.txt").read()
        if "Requests/sec" not in t:
            raise SystemExit(f"wrk against {who} failed:\n{t}")
        rps.append(float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1)))
        p50.append(unit(re.search(r"50%\s+(\S+)", t).group(1)))
        p99.append(unit(re.search(r"99%\s+(\S+)", t).group(1)))
    res[who] = (statistics.median(rps), statistics.median(p50), statistics.median(p99))
    print(f"  {who:<28} {res[who][0]:>10.0f} req/s   p50 {res[who][1]:7.3f} ms   p99 {res[who][2]:7.3f} ms")
print(f"  wisp / nginx (native)        {res['wisp'][0] / res['nginx'][0]:.2f}x requests/s")
PY

echo "== Redis: redis-benchmark -t set,get -n 50000 -c 32, $rounds interleaved rounds"
for r in $(seq "$rounds"); do
  for who in redis wisp; do
    port=$rp; [ "$who" = wisp ] && port=$kp
    redis-benchmark -p "$port" -t set,get -n 50000 -c 32 -q > "$work/rb-$who-$r.txt" 2>/dev/null
  done
done
python3 - "$work" "$rounds" <<'PY'
import re, sys, statistics
work, rounds = sys.argv[1], int(sys.argv[2])
res = {}
for who in ("redis", "wisp"):
    for op in ("SET", "GET"):
        v = []
        for r in range(1, rounds + 1):
            t = open(f"{work}/rb-{who}-{r}.txt").read().replace("\r", "\n")
            m = re.findall(rf"{op}: ([\d.]+) requests per second(?:, p50=([\d.]+) msec)?", t)
            v.append((float(m[-1][0]), float(m[-1][1] or 0)))
        res[(who, op)] = (statistics.median(x for x, _ in v), statistics.median(y for _, y in v))
        print(f"  {who:<6} {op}  {res[(who, op)][0]:>10.0f} req/s   p50 {res[(who, op)][1]:.3f} ms")
for op in ("SET", "GET"):
    print(f"  wisp kv / redis-server (native) {op}: {res[('wisp', op)][0] / res[('redis', op)][0]:.2f}x")
PY

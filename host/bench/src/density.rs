//! Density benchmark of the toolstack: N idle unikernels (`examples/idle`,
//! 2 MiB each) started through a `wisp daemon` in batches, printing per
//! batch the start latency (request -> guest `main`, the daemon's
//! `start_us`), the host memory each VM costs (MemAvailable before and
//! after the batch, and the monitors' RSS and PSS from /proc), then the
//! teardown time of all; a cold `wisp run hello` is timed beside it, with
//! none and with all of the guests running.
//!
//! Each start waits for a ready shell in the pool, so the figures are warm
//! starts; MemAvailable is read with the pool full, so the pool's shells
//! cancel out. Every VM is removed and the daemon stopped on the way out,
//! on error too. Usage: `bench-density [N] [BATCH]` (default 1000 and 100),
//! after `cargo build --release`; `scripts/bench-density.sh` does both.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use wisp_toolstack::client::Client;

/// Shells the daemon keeps ready.
const POOL: usize = 4;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// A field of /proc/meminfo or /proc/PID/status, in KiB.
fn kib(file: &str, field: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in {file}"))
}

fn build(wisp: &Path, app: &str, out: &Path) -> anyhow::Result<()> {
    let ok = Command::new(wisp)
        .arg("build")
        .arg(repo().join(app))
        .arg("-o")
        .arg(out)
        .stdout(Stdio::null())
        .status()?
        .success();
    if !ok {
        bail!("wisp build {app} failed");
    }
    Ok(())
}

/// Median milliseconds of `rounds` cold `wisp run -q hello`.
fn cold_run(wisp: &Path, image: &Path, rounds: usize) -> anyhow::Result<f64> {
    let mut v = vec![];
    for _ in 0..rounds {
        let t = Instant::now();
        let st = Command::new(wisp)
            .args(["run", "-q", "-m", "2M"])
            .arg(image)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
        if !st.success() {
            bail!("cold wisp run hello failed: {st}");
        }
    }
    v.sort_by(f64::total_cmp);
    Ok(pct(&v, 0.5))
}

/// Waits until the pool holds at least `want` ready shells.
fn pool_ready(c: &Client, want: u64) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let v = c
            .request("GET", "/v1/pool", None)?
            .json()
            .unwrap_or_default();
        if v["shells"][0]["ready"].as_u64().unwrap_or(0) >= want {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("the pool never refilled: {v}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The daemon and the VMs it started; all removed on drop.
struct Run {
    daemon: Child,
    client: Client,
    dir: PathBuf,
    ids: Vec<String>,
}

impl Drop for Run {
    fn drop(&mut self) {
        for id in &self.ids {
            let _ = self
                .client
                .request("DELETE", &format!("/v1/vms/{id}?force=1"), None);
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        // Guests outlive a daemon by design: end any the API did not remove.
        if let Ok(dirs) = std::fs::read_dir(self.dir.join("state/vms")) {
            for d in dirs.flatten() {
                let rec = std::fs::read(d.path().join("vm.json")).unwrap_or_default();
                let pid = serde_json::from_slice::<serde_json::Value>(&rec)
                    .ok()
                    .and_then(|v| v["pid"].as_i64());
                if let Some(pid) = pid {
                    // SAFETY: a plain syscall on a monitor this run's daemon started.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).map(|s| s.parse::<usize>());
    let n = args.next().transpose()?.unwrap_or(1000);
    let batch = args.next().transpose()?.unwrap_or(100).max(1);
    let repo = repo().canonicalize()?;
    let wisp = repo.join("target/release/wisp");
    let dir = PathBuf::from(format!("/tmp/wisp-bench-density-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let idle = dir.join("idle.wisp");
    let hello = dir.join("hello.wisp");
    build(&wisp, "examples/idle", &idle)?;
    build(&wisp, "examples/hello", &hello)?;
    let socket = dir.join("api.sock");
    let daemon = Command::new(&wisp)
        .arg("daemon")
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--pool", &format!("2M:{POOL}")])
        .stderr(Stdio::null())
        .spawn()
        .context("wisp daemon")?;
    let mut run = Run {
        daemon,
        client: Client::new(&socket),
        dir,
        ids: vec![],
    };
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if start.elapsed() > Duration::from_secs(10) {
            bail!("the daemon did not start");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let c = Client::new(&socket);
    let cold_before = cold_run(&wisp, &hello, 5)?;
    println!(
        "{n} idle 2 MiB guests through the daemon, batches of {batch} (pool of {POOL} shells)"
    );
    println!(
        "{:>6} {:>9} {:>9} {:>9} {:>5} {:>12} {:>9} {:>9}",
        "VMs", "p50 ms", "p99 ms", "max ms", "warm", "MemAvail/VM", "RSS/VM", "PSS/VM"
    );
    let body = json!({ "image": idle.to_string_lossy(), "memory": 2 << 20 });
    let (mut first_p99, mut last_p99, mut all_p50) = (None, 0.0, vec![]);
    let mut per_vm_total = 0.0;
    while run.ids.len() < n {
        let count = batch.min(n - run.ids.len());
        pool_ready(&c, POOL as u64)?;
        std::thread::sleep(Duration::from_millis(200));
        let avail_before = kib("/proc/meminfo", "MemAvailable")?;
        let (mut lat, mut warm, mut pids) = (vec![], 0, vec![]);
        for _ in 0..count {
            pool_ready(&c, 1)?;
            let r = c.request("POST", "/v1/vms", Some(&body))?;
            let v = r.json().unwrap_or_default();
            if r.status != 201 {
                bail!(
                    "run {} failed: {} {}",
                    run.ids.len(),
                    r.status,
                    r.error_text()
                );
            }
            run.ids.push(v["id"].as_str().context("no id")?.to_string());
            lat.push(v["start_us"].as_f64().context("no start_us")? / 1e3);
            warm += usize::from(v["from_pool"] == true);
            pids.push(v["pid"].as_u64());
        }
        pool_ready(&c, POOL as u64)?;
        // Let the guests reach their sleep and the kernel settle.
        std::thread::sleep(Duration::from_millis(500));
        let avail_after = kib("/proc/meminfo", "MemAvailable")?;
        let (mut rss, mut pss) = (0u64, 0u64);
        for id in &run.ids[run.ids.len() - count..] {
            let v = c
                .request("GET", &format!("/v1/vms/{id}"), None)?
                .json()
                .unwrap_or_default();
            let pid = v["pid"].as_u64().context("a VM without a pid")?;
            if v["state"] != "running" {
                bail!("{id} is not running: {v}");
            }
            rss += kib(&format!("/proc/{pid}/status"), "VmRSS")?;
            pss += kib(&format!("/proc/{pid}/smaps_rollup"), "Pss")?;
        }
        lat.sort_by(f64::total_cmp);
        let p99 = pct(&lat, 0.99);
        first_p99.get_or_insert(p99);
        last_p99 = p99;
        all_p50.push(pct(&lat, 0.5));
        let per_vm = avail_before.saturating_sub(avail_after) as f64 / count as f64 / 1024.0;
        per_vm_total += per_vm * count as f64;
        println!(
            "{:>6} {:>9.3} {:>9.3} {:>9.3} {:>5} {:>8.2} MiB {:>5.2} MiB {:>5.2} MiB",
            run.ids.len(),
            pct(&lat, 0.5),
            p99,
            lat[lat.len() - 1],
            warm,
            per_vm,
            rss as f64 / count as f64 / 1024.0,
            pss as f64 / count as f64 / 1024.0,
        );
    }
    // What listing and scraping cost with all of them running.
    for path in ["/v1/vms", "/v1/stats", "/metrics"] {
        let t = Instant::now();
        let r = c.request("GET", path, None)?;
        if r.status != 200 {
            bail!("GET {path}: {} {}", r.status, r.error_text());
        }
        println!(
            "GET {path} with {} guests: {:.1} ms",
            run.ids.len(),
            t.elapsed().as_secs_f64() * 1e3
        );
    }
    let cold_after = cold_run(&wisp, &hello, 5)?;
    let t = Instant::now();
    for id in std::mem::take(&mut run.ids) {
        let r = c.request("DELETE", &format!("/v1/vms/{id}?force=1"), None)?;
        if r.status >= 300 {
            bail!("rm -f {id}: {} {}", r.status, r.error_text());
        }
    }
    let teardown = t.elapsed();
    println!(
        "teardown of {n} (DELETE ?force=1 each): {:.3} s, {:.3} ms per VM",
        teardown.as_secs_f64(),
        teardown.as_secs_f64() * 1e3 / n.max(1) as f64
    );
    println!(
        "cold `wisp run -q -m 2M hello` (process start to exit), median of 5: {cold_before:.3} ms with no guest, {cold_after:.3} ms beside {n}"
    );
    println!(
        "goals: warm median <= 0.5 ms (batch medians {:.3}..{:.3} ms); last p99 <= 2x first ({last_p99:.3} vs {:.3} ms); <= 1 MiB per VM (MemAvailable: {:.2} MiB)",
        all_p50.iter().copied().fold(f64::INFINITY, f64::min),
        all_p50.iter().copied().fold(0.0, f64::max),
        first_p99.unwrap_or(0.0),
        per_vm_total / n.max(1) as f64,
    );
    Ok(())
}

//! Warm-start benchmark of the toolstack: `run` requests to a `wisp daemon`
//! served from its pool of pre-started shells, timed from the request
//! reaching the daemon to the guest's `main` (the daemon's `start_us`,
//! dated from the TSC the guest passes with its mark; `main_exit_us`, when
//! the monitor handled that mark after its exit, is printed beside it),
//! beside a static C process spawn and a cold `wisp run hello` (process
//! start to exit), interleaved so that machine noise hits all alike.
//!
//! Each warm start waits until the pool is full again, so every one is
//! served by a ready shell. Usage: `bench-toolstack [ROUNDS]` (default 30),
//! after `cargo build --release`; `scripts/bench-toolstack.sh` does both.
//! `WISP_BIN=/path/to/wisp` measures another build (e.g. a baseline).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use wisp_toolstack::client::Client;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn time(cmd: &mut Command) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let st = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("spawn")?;
    let took = start.elapsed();
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(took)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn row(name: &str, mut v: Vec<f64>, base: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let med = pct(&v, 0.5);
    println!(
        "{name:<58} {:>8.3} {:>8.3} {:>8.3} {:>8.2}x",
        med,
        pct(&v, 0.1),
        pct(&v, 0.9),
        med / base
    );
    med
}

/// Waits until every pooled size is full.
fn pool_full(c: &Client) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let v = c
            .request("GET", "/v1/pool", None)?
            .json()
            .unwrap_or_default();
        let full = v["shells"]
            .as_array()
            .is_some_and(|a| a.iter().all(|s| s["ready"] == s["target"]));
        if full {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("the pool never refilled: {v}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Shells of 16 MiB the daemon keeps for restores and clones.
const CLONE_POOL: usize = 8;
/// Clones started by the one clone request.
const CLONES: usize = 100;

/// Saves an idle 16 MiB guest, restores it `rounds` times (each on a full
/// pool: request -> guest running, the daemon's `start_us`), then starts
/// [`CLONES`] clones in one request and prints the time per clone.
fn restores_and_clones(c: &Client, wisp: &Path, dir: &Path, rounds: usize) -> anyhow::Result<()> {
    let idle = dir.join("idle.wisp");
    if !Command::new(wisp)
        .arg("build")
        .arg(repo().join("examples/idle"))
        .arg("-o")
        .arg(&idle)
        .stdout(Stdio::null())
        .status()?
        .success()
    {
        bail!("wisp build examples/idle failed");
    }
    let body = json!({ "image": idle.to_string_lossy(), "memory": 16 << 20, "name": "src" });
    let r = c.request("POST", "/v1/vms", Some(&body))?;
    if r.status != 201 {
        bail!("run idle: {} {}", r.status, r.error_text());
    }
    std::thread::sleep(Duration::from_millis(200));
    let snap = dir.join("idle.snap");
    let r = c.request(
        "POST",
        "/v1/vms/src/save",
        Some(&json!({ "path": snap.to_string_lossy() })),
    )?;
    if r.status != 200 {
        bail!("save: {} {}", r.status, r.error_text());
    }
    let saved = r.json().unwrap_or_default();
    let mut ids = vec![];
    let mut restore = vec![];
    let body = json!({ "snapshot": snap.to_string_lossy() });
    for _ in 0..rounds {
        pool_full(c)?;
        let r = c.request("POST", "/v1/restore", Some(&body))?;
        let v = r.json().unwrap_or_default();
        if r.status != 201 || v["from_pool"] != true {
            bail!("restore failed or was cold: {} {v}", r.status);
        }
        restore.push(v["start_us"].as_f64().unwrap_or(0.0) / 1e3);
        ids.push(v["id"].as_str().unwrap_or_default().to_string());
    }
    pool_full(c)?;
    let t = Instant::now();
    let r = c.request(
        "POST",
        "/v1/clone",
        Some(&json!({ "snapshot": snap.to_string_lossy(), "count": CLONES })),
    )?;
    let wall = t.elapsed().as_secs_f64() * 1e3;
    let v = r.json().unwrap_or_default();
    if r.status != 201 || !v["error"].is_null() {
        bail!("clone: {} {v}", r.status);
    }
    let vms = v["vms"].as_array().cloned().unwrap_or_default();
    let warm = vms.iter().filter(|v| v["from_pool"] == true).count();
    ids.extend(
        vms.iter()
            .filter_map(|v| v["id"].as_str().map(str::to_string)),
    );
    let mut per: Vec<f64> = v["per_clone_us"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_f64())
                .map(|x| x / 1e3)
                .collect()
        })
        .unwrap_or_default();
    per.sort_by(f64::total_cmp);
    restore.sort_by(f64::total_cmp);
    println!(
        "16 MiB idle guest saved: {} pages, {} bytes; restore ({rounds} rounds, pooled shell): request -> running median {:.3} ms (p10 {:.3}, p90 {:.3})",
        saved["pages_written"], saved["bytes_written"], pct(&restore, 0.5), pct(&restore, 0.1), pct(&restore, 0.9)
    );
    println!(
        "clone of {CLONES} in one request (pool of {CLONE_POOL}, {warm} warm): {wall:.1} ms, {:.2} ms per clone; per clone median {:.3} ms (p10 {:.3}, p90 {:.3}); snapshot opened and checked once in {:.3} ms",
        wall / CLONES as f64,
        pct(&per, 0.5),
        pct(&per, 0.1),
        pct(&per, 0.9),
        v["open_us"].as_f64().unwrap_or(0.0) / 1e3,
    );
    for id in ids {
        let _ = c.request("DELETE", &format!("/v1/vms/{id}?force=1"), None)?;
    }
    let _ = c.request("DELETE", "/v1/vms/src?force=1", None)?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(30);
    let repo = repo().canonicalize()?;
    // WISP_BIN: another build of `wisp` to measure (e.g. a baseline).
    let wisp = std::env::var_os("WISP_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("target/release/wisp"));
    let dir = PathBuf::from(format!("/tmp/wisp-bench-ts-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let image = dir.join("hello.wisp");
    if !Command::new(&wisp)
        .arg("build")
        .arg(repo.join("examples/hello"))
        .arg("-o")
        .arg(&image)
        .stdout(Stdio::null())
        .status()?
        .success()
    {
        bail!("wisp build examples/hello failed");
    }
    let c_src = dir.join("true.c");
    let c_bin = dir.join("true-static");
    std::fs::write(&c_src, "int main(void) { return 0; }\n")?;
    if !Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&c_bin)
        .arg(&c_src)
        .status()
        .context("gcc")?
        .success()
    {
        bail!("gcc -static failed (is libc6-dev installed?)");
    }
    let socket = dir.join("api.sock");
    let mut daemon = Command::new(&wisp)
        .arg("daemon")
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--pool", "2M:2", "--pool", &format!("16M:{CLONE_POOL}")])
        .stderr(Stdio::null())
        .spawn()
        .context("wisp daemon")?;
    let result = (|| -> anyhow::Result<()> {
        let c = Client::new(&socket);
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("the daemon did not start");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let (mut warm_main, mut warm_launch, mut warm_reply) = (vec![], vec![], vec![]);
        let mut warm_exit = vec![];
        let (mut spawn, mut cold) = (vec![], vec![]);
        let body = json!({ "image": image.to_string_lossy(), "memory": 2 << 20 });
        for i in 0..rounds + 2 {
            pool_full(&c)?;
            let t = Instant::now();
            let r = c.request("POST", "/v1/vms", Some(&body))?;
            let reply_ms = t.elapsed().as_secs_f64() * 1e3;
            let v = r.json().unwrap_or_default();
            if r.status != 201 || v["from_pool"] != true {
                bail!("run failed or was cold: {} {v}", r.status);
            }
            let id = v["id"].as_str().unwrap_or_default().to_string();
            let s = time(&mut Command::new(&c_bin))?;
            let w = time(Command::new(&wisp).arg("run").arg("-q").arg(&image))?;
            // Two rounds of warm-up.
            if i >= 2 {
                let main_us = v["start_us"].as_f64().context("no start_us")?;
                warm_main.push(main_us / 1e3);
                warm_launch.push(v["launch_us"].as_f64().unwrap_or(0.0) / 1e3);
                // A daemon from before `main_exit_us`: its `start_us` is it.
                let exit_us = v["main_exit_us"].as_f64().unwrap_or(main_us);
                warm_exit.push(exit_us / 1e3);
                warm_reply.push(reply_ms);
                spawn.push(s.as_secs_f64() * 1e3);
                cold.push(w.as_secs_f64() * 1e3);
            }
            let _ = c.request("DELETE", &format!("/v1/vms/{id}?force=1"), None)?;
        }
        println!("{rounds} rounds (ms)                                                median      p10      p90  vs static");
        let base = {
            let mut s = spawn.clone();
            s.sort_by(f64::total_cmp);
            pct(&s, 0.5)
        };
        row(
            "static C process spawn (int main(){return 0;})",
            spawn,
            base,
        );
        row(
            "cold `wisp run -q hello` (process start to exit)",
            cold,
            base,
        );
        let m = row(
            "warm start from the pool: request -> guest main()",
            warm_main,
            base,
        );
        row(
            "  request -> monitor saw main's mark (after its exit)",
            warm_exit,
            base,
        );
        row(
            "  of which request -> guest threads started",
            warm_launch,
            base,
        );
        row(
            "  client round trip (POST /v1/vms -> 201)",
            warm_reply,
            base,
        );
        println!("goal (docs/design.md): warm start median <= 0.5 ms; measured {m:.3} ms");
        restores_and_clones(&c, &wisp, &dir, rounds)
    })();
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

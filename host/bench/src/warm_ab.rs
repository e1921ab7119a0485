//! A/B benchmark of warm starts between two builds of `wisp`: this tree's
//! and another (e.g. the build of an earlier commit). Both daemons run at
//! once, each with a pool of two 2 MiB shells, and their starts alternate
//! one by one, each after a pause with its pool full, so that machine noise
//! hits both alike; the medians of `start_us` (request -> guest `main`) and
//! `launch_us` (request -> guest threads started) are printed for each.
//!
//! Usage: `bench-warm-ab OTHER_WISP [ROUNDS]` (default 40), after `cargo
//! build --release`. Both daemons and every guest are ended on the way out.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use wisp_toolstack::client::Client;

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// One side: a daemon of one build, killed on drop.
struct Side {
    name: String,
    daemon: Child,
    client: Client,
    start_ms: Vec<f64>,
    launch_ms: Vec<f64>,
}

impl Side {
    fn start(name: &str, wisp: &Path, dir: &Path) -> anyhow::Result<Side> {
        let socket = dir.join(format!("{name}.sock"));
        let daemon = Command::new(wisp)
            .arg("daemon")
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join(format!("{name}-state")))
            .args(["--pool", "2M:2"])
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("{} daemon", wisp.display()))?;
        let side = Side {
            name: name.into(),
            daemon,
            client: Client::new(&socket),
            start_ms: vec![],
            launch_ms: vec![],
        };
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if t.elapsed() > Duration::from_secs(10) {
                bail!("the {name} daemon did not start");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(side)
    }

    fn pool_full(&self) -> anyhow::Result<()> {
        let t = Instant::now();
        loop {
            let v = self
                .client
                .request("GET", "/v1/pool", None)?
                .json()
                .unwrap_or_default();
            if v["shells"][0]["ready"] == v["shells"][0]["target"] {
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("the {} pool never refilled: {v}", self.name);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// One warm start (recorded if `keep`), then its removal.
    fn one(&mut self, body: &serde_json::Value, keep: bool) -> anyhow::Result<()> {
        self.pool_full()?;
        std::thread::sleep(Duration::from_millis(100));
        let r = self.client.request("POST", "/v1/vms", Some(body))?;
        let v = r.json().unwrap_or_default();
        if r.status != 201 || v["from_pool"] != true {
            bail!("{}: run failed or was cold: {} {v}", self.name, r.status);
        }
        if keep {
            self.start_ms
                .push(v["start_us"].as_f64().context("no start_us")? / 1e3);
            self.launch_ms
                .push(v["launch_us"].as_f64().unwrap_or(0.0) / 1e3);
        }
        let id = v["id"].as_str().unwrap_or_default();
        self.client
            .request("DELETE", &format!("/v1/vms/{id}?force=1"), None)?;
        Ok(())
    }

    fn report(&mut self) -> f64 {
        self.start_ms.sort_by(f64::total_cmp);
        self.launch_ms.sort_by(f64::total_cmp);
        let (s, l) = (&self.start_ms, &self.launch_ms);
        println!(
            "{:<6} start_us median {:.3} ms (p10 {:.3}, p90 {:.3}); launch_us median {:.3} ms",
            self.name,
            pct(s, 0.5),
            pct(s, 0.1),
            pct(s, 0.9),
            pct(l, 0.5)
        );
        pct(s, 0.5)
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        if let Ok(r) = self.client.request("GET", "/v1/vms?all=1", None) {
            for v in r
                .json()
                .unwrap_or_default()
                .as_array()
                .into_iter()
                .flatten()
            {
                if let Some(id) = v["id"].as_str() {
                    let _ = self
                        .client
                        .request("DELETE", &format!("/v1/vms/{id}?force=1"), None);
                }
            }
        }
        // SIGTERM ends the daemon and its pooled shells.
        // SAFETY: a plain syscall on our child.
        unsafe { libc::kill(self.daemon.id() as i32, libc::SIGTERM) };
        let _ = self.daemon.wait();
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let other = PathBuf::from(
        args.next()
            .context("usage: bench-warm-ab OTHER_WISP [ROUNDS]")?,
    );
    let rounds: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(40);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()?;
    let this = repo.join("target/release/wisp");
    let dir = PathBuf::from(format!("/tmp/wisp-bench-ab-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let image = dir.join("idle.wisp");
    if !Command::new(&this)
        .arg("build")
        .arg(repo.join("examples/idle"))
        .arg("-o")
        .arg(&image)
        .stdout(Stdio::null())
        .status()?
        .success()
    {
        bail!("wisp build examples/idle failed");
    }
    let body = json!({ "image": image.to_string_lossy(), "memory": 2 << 20 });
    let result = (|| -> anyhow::Result<()> {
        let mut a = Side::start("this", &this, &dir)?;
        let mut b = Side::start("other", &other, &dir)?;
        for i in 0..rounds + 3 {
            // The first three of each are warm-up; the order alternates.
            let keep = i >= 3;
            if i % 2 == 0 {
                a.one(&body, keep)?;
                b.one(&body, keep)?;
            } else {
                b.one(&body, keep)?;
                a.one(&body, keep)?;
            }
        }
        println!(
            "{rounds} interleaved warm starts each (idle guest, 2 MiB): this tree vs {}",
            other.display()
        );
        let ma = a.report();
        let mb = b.report();
        println!("this / other (start_us medians): {:.2}", ma / mb);
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

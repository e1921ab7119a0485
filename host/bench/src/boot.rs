//! Cold-boot benchmark: `wisp run hello` (process start to exit) against a
//! static C `int main(){return 0;}` process spawn and QEMU microvm booting
//! the same image, interleaved in one run so machine noise hits all three
//! alike. Prints medians, spread and ratios, then the median `--trace-boot`
//! breakdown of Wisp's boot and its exit count.
//!
//! Usage: `bench-boot [ROUNDS] [QEMU_ROUNDS]` (defaults 40 and 10), run from
//! anywhere after `cargo build --release`; `scripts/bench-boot.sh` does both.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Wall time of one run of `cmd`, spawn to exit, output discarded.
fn time(cmd: &mut Command) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let status = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("spawn")?;
    let took = start.elapsed();
    if !status.success() && status.code() != Some(1) {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(took)
}

/// Peak resident set of one run of `cmd` (the monitor process itself), KiB.
fn peak_rss_kib(cmd: &mut Command) -> anyhow::Result<i64> {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn")?;
    let mut status = 0;
    // SAFETY: `rusage` is plain data; wait4 fills it for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for the child just spawned, valid out-pointers.
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut ru) };
    if pid < 0 {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    Ok(ru.ru_maxrss)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

struct Series {
    name: &'static str,
    samples: Vec<Duration>,
}

impl Series {
    fn sorted(&self) -> Vec<Duration> {
        let mut s = self.samples.clone();
        s.sort();
        s
    }
    fn median(&self) -> Duration {
        percentile(&self.sorted(), 0.5)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> anyhow::Result<()> {
    let mut argv = std::env::args().skip(1);
    let rounds: usize = argv.next().map(|a| a.parse()).transpose()?.unwrap_or(40);
    let qemu_rounds: usize = argv.next().map(|a| a.parse()).transpose()?.unwrap_or(10);

    let repo = repo();
    let wisp = repo.join("target/release/wisp");
    if !wisp.exists() {
        bail!(
            "{} not found: run `cargo build --release` first",
            wisp.display()
        );
    }
    let dir = repo.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let image = dir.join("hello.wisp");
    let st = Command::new(&wisp)
        .arg("build")
        .arg(repo.join("examples/hello"))
        .arg("-o")
        .arg(&image)
        .status()?;
    if !st.success() {
        bail!("wisp build examples/hello failed");
    }
    let c_src = dir.join("true.c");
    let c_bin = dir.join("true-static");
    std::fs::write(&c_src, "int main(void) { return 0; }\n")?;
    let st = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&c_bin)
        .arg(&c_src)
        .status()
        .context("gcc")?;
    if !st.success() {
        bail!("gcc -static failed (is libc6-dev installed?)");
    }
    let have_qemu = Command::new(wisp_qemu::QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok();

    let mut wisp_s = Series {
        name: "wisp run --memory 2M hello (cold)",
        samples: vec![],
    };
    let mut wisp64_s = Series {
        name: "wisp run hello (cold, default --memory 64M)",
        samples: vec![],
    };
    let mut static_s = Series {
        name: "static C process spawn (int main(){return 0;})",
        samples: vec![],
    };
    let mut qemu_s = Series {
        name: "QEMU microvm (acpi=off) booting the same image",
        samples: vec![],
    };
    // Warm the page cache and the binaries once.
    time(Command::new(&wisp).arg("run").arg(&image))?;
    time(&mut Command::new(&c_bin))?;
    for i in 0..rounds {
        wisp_s.samples.push(time(
            Command::new(&wisp)
                .args(["run", "--memory", "2M"])
                .arg(&image),
        )?);
        wisp64_s
            .samples
            .push(time(Command::new(&wisp).arg("run").arg(&image))?);
        static_s.samples.push(time(&mut Command::new(&c_bin))?);
        if have_qemu && i < qemu_rounds {
            let mut q = wisp_qemu::command(&image, wisp_qemu::Acpi::Off, &[]);
            qemu_s.samples.push(time(&mut q)?);
        }
    }

    let base = static_s.median();
    println!("cold boot, {rounds} interleaved rounds ({qemu_rounds} for QEMU); wall time of the whole process");
    println!(
        "{:<50} {:>9} {:>9} {:>9} {:>10}",
        "", "median", "p10", "p90", "vs static"
    );
    for s in [&static_s, &wisp_s, &wisp64_s, &qemu_s] {
        if s.samples.is_empty() {
            println!("{:<50} (not measured: qemu-system-x86_64 missing)", s.name);
            continue;
        }
        let sorted = s.sorted();
        println!(
            "{:<50} {:>7.3}ms {:>7.3}ms {:>7.3}ms {:>9.2}x",
            s.name,
            ms(s.median()),
            ms(percentile(&sorted, 0.1)),
            ms(percentile(&sorted, 0.9)),
            ms(s.median()) / ms(base)
        );
    }
    println!("goal (docs/design.md): wisp run within 3x of the static spawn");

    let mut rss = Vec::new();
    for _ in 0..5 {
        rss.push(peak_rss_kib(
            Command::new(&wisp)
                .args(["run", "--memory", "2M"])
                .arg(&image),
        )?);
    }
    rss.sort();
    let static_rss = peak_rss_kib(&mut Command::new(&c_bin))?;
    println!(
        "peak RSS of the monitor process for hello (--memory 2M, median of 5): {} KiB \
         (guest memory touched included; static C process: {static_rss} KiB; Solo5 hvt: ~1.5 MB)",
        rss[rss.len() / 2]
    );

    // Median --trace-boot breakdown.
    let mut stages: Vec<(String, Vec<f64>)> = Vec::new();
    let mut exits = Vec::new();
    for _ in 0..rounds.min(20) {
        let out = Command::new(&wisp)
            .args(["run", "--memory", "2M", "--trace-boot"])
            .arg(&image)
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        for (i, line) in err.lines().filter(|l| l.contains('|')).skip(1).enumerate() {
            let (times, name) = line.split_at(line.find("  ").map_or(0, |_| 22).min(line.len()));
            let step: f64 = times
                .split('|')
                .nth(1)
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0.0);
            if stages.len() <= i {
                stages.push((name.trim().to_string(), vec![]));
            }
            stages[i].1.push(step);
        }
        if let Some(n) = err
            .lines()
            .find_map(|l| l.trim().strip_prefix("guest exits to the monitor: "))
        {
            exits.push(n.to_string());
        }
    }
    println!("\nwisp run --memory 2M --trace-boot, median time of each stage (ms, from the previous stage):");
    let mut total = 0.0;
    for (name, mut v) in stages {
        v.sort_by(f64::total_cmp);
        let m = v[v.len() / 2];
        total += m;
        println!("  {m:>7.3}  {name}");
    }
    println!(
        "  {total:>7.3}  sum (monitor main() to guest exit; process exec and teardown are outside)"
    );
    println!(
        "guest exits to the monitor per boot: {}",
        exits.first().map_or("?", String::as_str)
    );
    Ok(())
}

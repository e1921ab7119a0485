//! Time from starting a server process to its first HTTP 200, measured
//! from Rust (spawn, then connect and request in a tight loop), so that
//! the harness adds microseconds rather than the milliseconds a scripting
//! language's process start and polling cost: `wisp run -p` serving
//! examples/httpd beside nginx (native, one worker) serving the same page.
//!
//! Usage: `bench-first200 [STARTS]` (default 20), after `cargo build
//! --release`; `scripts/bench-net.sh` builds the images it needs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One GET; `true` on a 200.
fn get(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 16];
    let mut got = 0;
    while got < 12 {
        match s.read(&mut buf[got..]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got += n,
        }
    }
    buf.starts_with(b"HTTP/1.1 200")
}

/// Milliseconds from spawning `cmd` to the first 200 on `port`.
fn first_200(mut cmd: Command, port: u16) -> anyhow::Result<f64> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let start = Instant::now();
    let mut child: Child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn")?;
    let took = loop {
        if get(addr) {
            break start.elapsed();
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("{cmd:?} exited before serving: {status}");
        }
        if start.elapsed() > Duration::from_secs(10) {
            stop(&mut child);
            bail!("no HTTP 200 within 10 s from {cmd:?}");
        }
        std::thread::sleep(Duration::from_micros(50));
    };
    stop(&mut child);
    Ok(took.as_secs_f64() * 1e3)
}

/// Ends a server the way its users do: SIGTERM (nginx's master then ends
/// its worker; SIGKILL would leave the worker running), then reaps it.
fn stop(child: &mut Child) {
    // SAFETY: a signal to our own child process.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let _ = child.wait();
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let starts: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(20);
    let repo = repo();
    let wisp = repo.join("target/release/wisp");
    let image = repo.join("target/bench/httpd.wisp");
    if !wisp.exists() || !image.exists() {
        bail!("run scripts/bench-net.sh (or cargo build --release and wisp build examples/httpd -o target/bench/httpd.wisp) first");
    }
    let dir = std::env::temp_dir().join(format!("wisp-first200-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("www"))?;
    std::fs::write(dir.join("www/index.html"), "<h1>hello</h1>\n")?;
    // nginx's worker runs as nobody and must read the page.
    Command::new("chmod")
        .arg("-R")
        .arg("a+rX")
        .arg(&dir)
        .status()?;
    let (mut w, mut n) = (Vec::new(), Vec::new());
    for i in 0..starts {
        let port = free_port()?;
        let mut cmd = Command::new(&wisp);
        cmd.args(["run", "-q", "-p", &format!("127.0.0.1:{port}:80")])
            .arg(&image);
        w.push(first_200(cmd, port)?);
        let port = free_port()?;
        let conf = dir.join(format!("nginx-{i}.conf"));
        std::fs::write(
            &conf,
            format!(
                "worker_processes 1; daemon off; pid {d}/nginx-{i}.pid; error_log {d}/err-{i};\n\
                 events {{}} http {{ access_log off; server {{ listen 127.0.0.1:{port}; root {d}/www; }} }}\n",
                d = dir.display()
            ),
        )?;
        let mut cmd = Command::new("nginx");
        cmd.arg("-c").arg(&conf);
        n.push(first_200(cmd, port)?);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (mw, mn) = (median(&mut w), median(&mut n));
    println!("start to first HTTP 200, median of {starts} interleaved starts");
    println!(
        "  wisp run -p httpd.wisp      {mw:7.2} ms   (min {:.2}, max {:.2})",
        w[0],
        w[w.len() - 1]
    );
    println!(
        "  nginx (native, 1 worker)    {mn:7.2} ms   (min {:.2}, max {:.2})",
        n[0],
        n[n.len() - 1]
    );
    println!(
        "  wisp / nginx                {:.2}x   goal: <= 5 ms",
        mw / mn
    );
    Ok(())
}

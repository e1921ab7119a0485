//! A `wisp daemon` on a temporary socket and state directory, for the
//! toolstack tests (shared by every test file that drives the daemon).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;

/// A daemon on its own socket and state directory; on drop it is killed
/// and so are the monitor processes its records name.
pub struct Daemon {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pool: String,
    /// More `wisp daemon` arguments (e.g. `--migration-listen`).
    extra: Vec<String>,
}

impl Daemon {
    pub fn start(tag: &str, pool: &str) -> Daemon {
        Daemon::start_with(tag, pool, &[])
    }

    /// As [`Daemon::start`], with more `wisp daemon` arguments.
    pub fn start_with(tag: &str, pool: &str, extra: &[&str]) -> Daemon {
        require_kvm();
        // Short: control sockets live under it (sun_path is 108 bytes).
        let dir = PathBuf::from(format!("/tmp/wisp-ts-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut d = Daemon {
            child: None,
            dir,
            pool: pool.into(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        d.restart();
        d
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// (Re)starts the daemon process and waits for its socket to answer.
    pub fn restart(&mut self) {
        let child = wisp()
            .arg("daemon")
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.state())
            .args(["--pool", &self.pool])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn wisp daemon");
        self.child = Some(child);
        until("the daemon answers", || {
            UnixStream::connect(self.socket()).is_ok()
        });
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `wisp --socket S ARGS`, bounded.
    pub fn wisp(&self, args: &[&str]) -> Output {
        let mut cmd = wisp();
        cmd.arg("--socket").arg(self.socket()).args(args);
        output_within(cmd, Duration::from_secs(60))
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.wisp(args);
        assert!(
            o.status.success(),
            "wisp {args:?} failed: {}{}",
            stdout(&o),
            stderr(&o)
        );
        stdout(&o)
    }

    /// One raw HTTP request on the API socket: (status, body).
    pub fn http(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let mut s = UnixStream::connect(self.socket()).expect("connect");
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        let status = raw[9..12].parse().expect("status");
        let body = raw.split_once("\r\n\r\n").map_or("", |x| x.1).to_string();
        (status, body)
    }

    pub fn json(&self, path: &str) -> Value {
        let (st, body) = self.http("GET", path, "");
        assert_eq!(st, 200, "{path}: {body}");
        serde_json::from_str(&body).expect("json")
    }

    /// The record of VM `name` (exited ones included).
    pub fn vm(&self, name: &str) -> Value {
        self.json(&format!("/v1/vms/{name}"))
    }

    pub fn wait_state(&self, name: &str, state: &str) -> Value {
        let mut last = Value::Null;
        until(&format!("{name} is {state} (last: {last})"), || {
            last = self.vm(name);
            last["state"] == state
        });
        last
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        // The guests outlive a daemon by design: end the ones this test made.
        if let Ok(dirs) = std::fs::read_dir(self.state().join("vms")) {
            for d in dirs.flatten() {
                let rec = std::fs::read(d.path().join("vm.json")).unwrap_or_default();
                let pid = serde_json::from_slice::<Value>(&rec)
                    .ok()
                    .and_then(|v| v["pid"].as_i64());
                if let Some(pid) = pid {
                    // SAFETY: a plain syscall on a pid this test's daemon started.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(30), "never: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

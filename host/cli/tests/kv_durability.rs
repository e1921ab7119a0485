//! When kv's writes reach stable storage, for each `appendfsync` policy,
//! seen from outside: `wisp run` under `strace -f`, which records the
//! monitor's writes to the disk file, its `fdatasync`s of it, and its
//! sends to the client's socket, in order. (Killing the monitor cannot
//! show a missing flush: the host's page cache keeps the written data.)
//!
//! * `always`: between the disk write of a command's record and its reply
//!   reaching the client's socket, the disk file is `fdatasync`ed.
//! * `everysec`: a burst of writes is flushed about once a second, not
//!   once per write, and the last write is flushed by the timer without
//!   any later command.
//! * `no`: every record is written to the disk file before its reply, and
//!   the file is never flushed.

mod common;
mod resp;

use common::*;
use resp::{Conn, Reply};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One system call as strace printed it.
#[derive(Debug)]
struct Call {
    name: String,
    /// The call's line up to its result (arguments included).
    text: String,
    /// Line numbers where it started and completed.
    start: usize,
    end: usize,
}

/// Parses `strace -f` output, joining `<unfinished ...>` calls with their
/// `<... resumed>` completions (by thread).
fn parse_trace(trace: &str) -> Vec<Call> {
    let mut calls: Vec<Call> = Vec::new();
    let mut pending: std::collections::HashMap<String, usize> = Default::default();
    for (i, line) in trace.lines().enumerate() {
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        if rest.starts_with("---") || rest.starts_with("+++") {
            continue;
        }
        if let Some(r) = rest.strip_prefix("<... ") {
            if let Some(&c) = pending.get(pid) {
                if r.starts_with(&calls[c].name) {
                    calls[c].end = i;
                    pending.remove(pid);
                }
            }
            continue;
        }
        let Some(open) = rest.find('(') else {
            continue;
        };
        let name = rest[..open].to_string();
        if rest.ends_with("<unfinished ...>") {
            pending.insert(pid.to_string(), calls.len());
            calls.push(Call {
                name,
                text: rest.to_string(),
                start: i,
                end: usize::MAX,
            });
        } else {
            calls.push(Call {
                name,
                text: rest.to_string(),
                start: i,
                end: i,
            });
        }
    }
    calls
}

/// What identifies kv's disk file and published port in a trace.
#[derive(Clone)]
struct View {
    port: u16,
    disk: String,
}

impl View {
    fn is_disk_write(&self, c: &Call) -> bool {
        c.name.starts_with("pwrite") && c.text.contains(&self.disk)
    }

    fn is_disk_flush(&self, c: &Call) -> bool {
        (c.name == "fdatasync" || c.name == "fsync" || c.name == "sync_file_range")
            && c.text.contains(&self.disk)
    }
}

/// kv under `strace -f`, killed (the monitor with SIGKILL) when dropped.
struct Traced {
    strace: Child,
    trace: PathBuf,
    view: View,
}

/// The processes whose parent is `pid` (strace's tracee: `wisp run`).
fn children_of(pid: u32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let child: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).ok()?;
        // pid (comm) state ppid ...: comm may hold spaces, so look after ')'.
        let ppid: u32 = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        (ppid == pid).then_some(child)
    })
    .collect()
}

impl Traced {
    fn start(disk: &Path, policy: &str) -> Traced {
        Traced::start_with(policy, disk, policy, &[], Stdio::inherit(), "")
    }

    /// As [`Traced::start`], with the trace in `kv-TAG.strace` (tests run
    /// side by side), more `wisp run` flags, its stderr sent to `stderr`,
    /// and more system calls traced (`,NAME...`).
    fn start_with(
        tag: &str,
        disk: &Path,
        policy: &str,
        flags: &[&str],
        stderr: Stdio,
        more_calls: &str,
    ) -> Traced {
        require_kvm();
        let port = free_port();
        let trace = scratch().join(format!("kv-{tag}.strace"));
        let _ = std::fs::remove_file(&trace);
        let strace = Command::new("strace")
            .args(["-f", "--seccomp-bpf", "-qq", "-yy", "-s", "4096", "-o"])
            .arg(&trace)
            .arg("-e")
            .arg(format!(
                "trace=pwrite64,pwritev,pwritev2,write,writev,sendto,sendmsg,fdatasync,fsync,\
                 sync_file_range{more_calls}"
            ))
            .arg(wisp().get_program())
            .arg("run")
            .args(flags)
            .arg("--disk")
            .arg(disk)
            .args(["-p", &format!("{port}:6379")])
            .arg(example("kv"))
            .args(["--", "--appendfsync", policy])
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("strace (installed by scripts/install-deps.sh)");
        let mut t = Traced {
            strace,
            trace,
            view: View {
                port,
                disk: disk.file_name().unwrap().to_string_lossy().into_owned(),
            },
        };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if ping(port) {
                return t;
            }
            if let Some(st) = t.strace.try_wait().unwrap() {
                panic!("strace wisp run exited early: {st}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("kv under strace never became ready");
    }

    fn calls(&self) -> Vec<Call> {
        parse_trace(&std::fs::read_to_string(&self.trace).unwrap_or_default())
    }

    /// Kills the monitor and returns the whole trace.
    fn finish(mut self) -> Vec<Call> {
        self.kill();
        self.calls()
    }

    /// Kills `wisp run` (strace then exits), or strace itself if it
    /// lingers.
    fn kill(&mut self) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.strace.try_wait() {
                return;
            }
            for pid in children_of(self.strace.id()) {
                // SAFETY: signalling the process this test started (under
                // strace); a stale pid is at worst an ESRCH.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.strace.kill();
        let _ = self.strace.wait();
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        self.kill();
    }
}

fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

fn fresh_disk(name: &str) -> PathBuf {
    let p = scratch().join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(8 << 20).unwrap();
    p
}

/// A value that appears nowhere else in the trace.
fn value(i: usize) -> String {
    format!("val-{i}-0c5f9e")
}

/// Sends `n` SETs one after another on one connection (each waits for its
/// reply); returns the client's port.
fn set_sequentially(port: u16, n: usize) -> u16 {
    let mut c = Conn::connect(port);
    for i in 0..n {
        let v = value(i);
        assert_eq!(
            c.call(&["SET", &format!("key{i}"), &v]),
            Reply::Simple(b"OK".to_vec())
        );
    }
    c.local_port()
}

/// For each SET: the disk write holding its value, and the send of its
/// reply to the client.
fn writes_and_replies<'a>(
    t: &View,
    calls: &'a [Call],
    n: usize,
    client_port: u16,
) -> Vec<(&'a Call, &'a Call)> {
    let socket = format!(":{}->127.0.0.1:{client_port}]", t.port);
    let replies: Vec<&Call> = calls
        .iter()
        .filter(|c| {
            ["write", "writev", "sendto", "sendmsg"].contains(&c.name.as_str())
                && c.text.contains(&socket)
                && c.text.contains("+OK\\r\\n")
        })
        .collect();
    assert_eq!(
        replies.len(),
        n,
        "one reply per SET reached the client's socket"
    );
    (0..n)
        .map(|i| {
            let v = value(i);
            let w = calls
                .iter()
                .find(|c| t.is_disk_write(c) && c.text.contains(&v))
                .unwrap_or_else(|| panic!("no disk write holds {v}"));
            (w, replies[i])
        })
        .collect()
}

#[test]
fn always_flushes_the_disk_file_between_the_write_and_the_reply() {
    let disk = fresh_disk("kv-always.img");
    let t = Traced::start(&disk, "always");
    let n = 20;
    let client = set_sequentially(t.view.port, n);
    let calls = t.calls();
    let v = &t.view;
    for (i, (w, r)) in writes_and_replies(v, &calls, n, client)
        .into_iter()
        .enumerate()
    {
        assert!(
            w.end < r.start,
            "SET {i}: the record is written before the reply"
        );
        let flushed = calls
            .iter()
            .any(|f| v.is_disk_flush(f) && f.start > w.end && f.end < r.start);
        assert!(
            flushed,
            "SET {i}: no fdatasync of the disk between its write (line {}) and its reply (line {})",
            w.end + 1,
            r.start + 1
        );
    }
    t.finish();
}

#[test]
fn everysec_flushes_on_a_timer_about_once_a_second() {
    let disk = fresh_disk("kv-everysec.img");
    let t = Traced::start(&disk, "everysec");
    let v = t.view.clone();
    let n = 80;
    let began = Instant::now();
    let client = set_sequentially(v.port, n);
    let burst = began.elapsed();
    // No more commands: the timer alone must flush the last write.
    let last = value(n - 1);
    let flushed_after_last = |calls: &[Call]| {
        calls
            .iter()
            .find(|c| v.is_disk_write(c) && c.text.contains(&last))
            .is_some_and(|w| calls.iter().any(|f| v.is_disk_flush(f) && f.start > w.end))
    };
    let waited = Instant::now();
    while !flushed_after_last(&t.calls()) && waited.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let calls = t.finish();
    assert!(
        flushed_after_last(&calls),
        "the last write was never flushed without a later command"
    );
    let pairs = writes_and_replies(&v, &calls, n, client);
    let (first_write, last_reply) = (pairs[0].0.start, pairs[n - 1].1.start);
    let during = calls
        .iter()
        .filter(|f| v.is_disk_flush(f) && f.start > first_write && f.start < last_reply)
        .count();
    let bound = burst.as_secs() as usize + 2;
    assert!(
        n > 2 * bound,
        "the burst took {burst:?}: too slow to tell a timer from a flush per write"
    );
    assert!(
        during <= bound,
        "{during} flushes during a {burst:?} burst of {n} writes: not once a second"
    );
}

#[test]
fn no_writes_before_replying_and_never_flushes() {
    let disk = fresh_disk("kv-no.img");
    let t = Traced::start(&disk, "no");
    let v = t.view.clone();
    let n = 20;
    let client = set_sequentially(v.port, n);
    // Longer than everysec's period: still no flush.
    std::thread::sleep(Duration::from_millis(2500));
    let calls = t.calls();
    let pairs = writes_and_replies(&v, &calls, n, client);
    for (i, (w, r)) in pairs.iter().enumerate() {
        assert!(
            w.end < r.start,
            "SET {i}: its record reached the disk file before its reply"
        );
    }
    let first = pairs[0].0.start;
    let flushes: Vec<&Call> = calls
        .iter()
        .filter(|f| v.is_disk_flush(f) && f.start > first)
        .collect();
    assert!(
        flushes.is_empty(),
        "kv flushed {} times with appendfsync no, first: {:?}",
        flushes.len(),
        flushes.first()
    );
    t.finish();
}

/// Bytes the monitor moved with `call` (`pread64`, `pwrite64`) on the file
/// named `disk`, from the raw trace: each call's result, joining
/// `<unfinished ...>` calls with their completions (by thread).
fn disk_call_bytes(trace: &str, disk: &str, call: &str) -> u64 {
    let mut pending: std::collections::HashMap<&str, bool> = Default::default();
    let result = |rest: &str| -> u64 {
        rest.rsplit_once(" = ")
            .and_then(|(_, r)| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no result in {rest}"))
    };
    let mut total = 0;
    for line in trace.lines() {
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        if rest.starts_with(&format!("{call}(")) {
            let on_disk = rest.contains(disk);
            if rest.ends_with("<unfinished ...>") {
                pending.insert(pid, on_disk);
            } else if on_disk {
                total += result(rest);
            }
        } else if rest.starts_with(&format!("<... {call} resumed>"))
            && pending.remove(pid) == Some(true)
        {
            total += result(rest);
        }
    }
    total
}

/// A field of `wisp run --stats`' line.
fn stat(stderr: &str, name: &str) -> u64 {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("wisp: stats:"))
        .unwrap_or_else(|| panic!("no stats line in {stderr}"));
    let mut words = line.split_whitespace();
    words
        .by_ref()
        .find(|w| *w == name)
        .and_then(|_| words.next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {line}"))
}

#[test]
fn sigterm_makes_kv_flush_its_log_whatever_the_policy() {
    // appendfsync no: nothing ever flushes the log but the stop request.
    let disk = fresh_disk("kv-term.img");
    let err = scratch().join("kv-term.stderr");
    let t = Traced::start_with(
        "sigterm",
        &disk,
        "no",
        &["--stats"],
        Stdio::from(std::fs::File::create(&err).unwrap()),
        ",pread64,preadv,preadv2",
    );
    let v = t.view.clone();
    let n = 10;
    set_sequentially(v.port, n);
    // SIGTERM to `wisp run` (strace's child), just after the last reply.
    for pid in children_of(t.strace.id()) {
        // SAFETY: signalling the process this test started (under strace).
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let mut t = t;
    let start = Instant::now();
    let status = loop {
        if let Some(st) = t.strace.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "kv did not stop when asked"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(&err).unwrap();
    // kv stopped by itself with its own status (strace exits with it).
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("guest stopped when asked (exit status 0)"),
        "{stderr}"
    );
    // The last SET's record was written, then the file was flushed.
    let calls = t.calls();
    let last = value(n - 1);
    let write = calls
        .iter()
        .rposition(|c| v.is_disk_write(c) && c.text.contains(&last))
        .expect("the last record was written");
    let flush = calls[write..]
        .iter()
        .find(|c| v.is_disk_flush(c))
        .unwrap_or_else(|| panic!("no flush of {} after its last write", v.disk));
    assert!(flush.end != usize::MAX, "the flush completed");
    // `--stats`' disk bytes are exactly what the monitor read and wrote.
    let trace = std::fs::read_to_string(&t.trace).unwrap();
    let read = disk_call_bytes(&trace, &v.disk, "pread64");
    let written = disk_call_bytes(&trace, &v.disk, "pwrite64");
    assert!(read > 0 && written > 0, "read {read}, written {written}");
    assert_eq!(stat(&stderr, "disk-read-bytes"), read, "{stderr}");
    assert_eq!(stat(&stderr, "disk-write-bytes"), written, "{stderr}");
    // And the log holds every key for the next boot.
    let log = std::fs::read(&disk).unwrap();
    let log = String::from_utf8_lossy(&log);
    for i in 0..n {
        assert!(log.contains(&value(i)), "key{i} is in the log");
    }
}

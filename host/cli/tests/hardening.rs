//! The monitor against hostile guests and its own limits: seccomp,
//! hypercalls with bad pointers and lengths, malicious virtio rings, console
//! floods, spinning guests, rate limits.

mod common;

use common::*;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

#[test]
fn a_forbidden_syscall_after_the_filter_kills_the_monitor() {
    require_kvm();
    let o = output_within(
        {
            let mut c = wisp();
            c.args(["run", "--seccomp-selftest"]).arg(hello());
            c
        },
        Duration::from_secs(60),
    );
    assert_eq!(
        o.status.signal(),
        Some(libc::SIGSYS),
        "status {:?} stderr {}",
        o.status,
        stderr(&o)
    );
}

/// The seccomp mode of every thread of process `pid`, as the kernel
/// reports it (`Seccomp:` in `/proc/PID/task/TID/status`; 2 = filter).
fn seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let mut modes = Vec::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the monitor's threads");
    for task in tasks {
        let task = task.expect("a thread");
        let tid = task.file_name().to_string_lossy().into_owned();
        // A thread that ended since the listing has no status to check.
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .map(|m| m.trim().to_string())
            .unwrap_or_else(|| format!("no Seccomp line in {status}"));
        modes.push((tid, mode));
    }
    modes
}

/// A tar archive of a one-page site, made with `tar` as a user would.
fn small_site_tar(name: &str) -> std::path::PathBuf {
    let site = scratch().join(format!("{name}-site"));
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("index.html"), "<p>filtered site</p>\n").unwrap();
    let tar = scratch().join(format!("{name}.tar"));
    let st = std::process::Command::new("tar")
        .arg("cf")
        .arg(&tar)
        .arg("-C")
        .arg(&site)
        .arg("index.html")
        .status()
        .unwrap();
    assert!(st.success());
    tar
}

/// `curl -s http://127.0.0.1:PORT/PATH` (10 s at most): the body.
fn get(port: u16, path: &str) -> String {
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-s",
        "--max-time",
        "10",
        &format!("http://127.0.0.1:{port}{path}"),
    ]);
    stdout(&output_within(cmd, Duration::from_secs(20)))
}

#[test]
fn every_test_guest_runs_under_the_filter() {
    // The filter is on by default: a normal run (console, exit) works.
    let o = run(hello(), &[], &["filtered"]);
    assert_eq!(stdout(&o), "Hello from Wisp! args: [\"filtered\"]\n");
    // And the kernel agrees: while a guest with a NIC and a disk serves,
    // every thread of its monitor process runs under a seccomp filter
    // (each thread has its own; one without would be an open door).
    let disk = format!("{},ro", small_site_tar("filtered").display());
    let g = start_guest(&example("httpd"), 80, &["--disk", &disk], &[], |port| {
        get(port, "/").contains("filtered site")
    });
    let modes = seccomp_modes(g.child.id());
    assert!(!modes.is_empty(), "no threads listed");
    for (tid, mode) in &modes {
        assert_eq!(
            mode, "2",
            "thread {tid} of the monitor is not under a seccomp filter (all: {modes:?})"
        );
    }
    assert!(get(g.port, "/").contains("filtered site"), "still serving");
}

#[test]
fn hypercalls_with_bad_pointers_or_lengths_stop_the_guest_cleanly() {
    for (action, needle) in [
        (
            "bad-console-ptr",
            "argument address 0xfffff000 outside guest memory",
        ),
        (
            "bad-wait-ptr",
            "argument address 0xfffffff8 outside guest memory",
        ),
        ("huge-console", "console write of 1099511627776 bytes"),
    ] {
        let o = run(probe(), &[], &[action]);
        assert_eq!(status(&o), 139, "{action}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("broke the hypercall protocol") && stderr(&o).contains(needle),
            "{}",
            stderr(&o)
        );
        assert!(!stderr(&o).contains("panicked"));
    }
}

#[test]
fn ports_outside_the_io_bitmap_fault_in_the_guest() {
    let o = run(probe(), &[], &["unknown-port-read"]);
    assert_eq!(status(&o), 139);
    assert!(
        stderr(&o).contains("general protection (#GP)"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn malicious_virtio_rings_stop_the_device_not_the_monitor() {
    for (action, needle) in [
        ("ring-outside", "outside guest memory"),
        ("ring-loop", "loops or is longer than the queue"),
        ("ring-huge", "transmit chain longer than"),
        ("ring-avail-idx", "invalid available ring index"),
    ] {
        let o = run(probe(), &["--net", "user"], &[action]);
        assert_eq!(
            stdout(&o),
            "survived\n",
            "{action}: the guest keeps running"
        );
        assert_eq!(status(&o), 0, "{action}");
        assert!(
            stderr(&o).contains("wisp: virtio-net stopped:") && stderr(&o).contains(needle),
            "{action}: {}",
            stderr(&o)
        );
    }
}

#[test]
fn a_console_flood_is_cut_to_the_rate_limit() {
    let o = run(probe(), &[], &["console-flood"]);
    assert_eq!(status(&o), 0);
    // 64 MiB written; at most the 4 MiB burst plus a second's worth passes.
    let passed = o.stdout.len();
    assert!(passed < 6 << 20, "{passed} bytes passed");
    assert!(passed >= 4 << 20, "the burst passes: {passed}");
    assert!(
        stderr(&o).contains("bytes of guest console output dropped"),
        "{}",
        stderr(&o)
    );
}

/// Bytes waiting in the pipe whose read end is `fd`.
fn pipe_bytes(fd: &impl std::os::fd::AsRawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer given.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(r, 0, "FIONREAD: {}", std::io::Error::last_os_error());
    n as usize
}

/// Waits for `child` for at most `limit` (a bound that only catches a
/// hang); kills it and fails if it is still running.
fn ends_within(child: &mut std::process::Child, limit: Duration, what: &str) {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not end");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_console_nobody_reads_does_not_hold_the_guest_or_its_stop() {
    use std::io::Read;
    use std::process::Stdio;
    require_kvm();
    let spawn = |args: &[&str]| {
        let mut child = wisp()
            .args(["run", "--stop-timeout", "0"])
            .arg(probe())
            .arg("--")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = child.stderr.take().unwrap();
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let out = child.stdout.take().unwrap();
        (child, out, err)
    };

    // A finite flood (64 MiB, more than the rate limit's burst and the
    // pipe's 64 KiB) to a stdout nobody ever reads: the guest is not held
    // by the write, runs to its end and exits by itself; what the pipe
    // did not take is dropped and counted.
    let (mut child, out, err) = spawn(&["console-flood"]);
    ends_within(
        &mut child,
        Duration::from_secs(60),
        "a flood to a full stdout",
    );
    let status = child.wait().unwrap();
    let err = err.join().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}: {err}");
    assert!(err.contains("its reader did not read"), "{err}");
    drop(out);

    // A flood without end, stdout read only until it starts, then left
    // full: a stop request reaches the guest and the run ends.
    let (mut child, mut out, err) = spawn(&["console-flood", "forever"]);
    let mut first = [0u8; 1];
    out.read_exact(&mut first).unwrap();
    let start = Instant::now();
    while pipe_bytes(&out) < 60 << 10 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the pipe never filled"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on the child's pid, which it still is (not waited).
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    ends_within(
        &mut child,
        Duration::from_secs(60),
        "wisp run with a full stdout",
    );
    let status = child.wait().unwrap();
    let err = err.join().unwrap();
    assert_eq!(status.code(), Some(143), "{status:?}: {err}");
    drop(out);
}

/// Whether process `pid`'s vCPU thread is blocked in a sleep or a poll
/// (`/proc/PID/task/TID/syscall`: the system call it is in).
fn vcpu_thread_blocked(pid: u32) -> bool {
    const WAITS: [i64; 4] = [
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_poll,
        libc::SYS_ppoll,
    ];
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        let p = t.path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        let call = std::fs::read_to_string(p.join("syscall")).unwrap_or_default();
        let nr = call.split_whitespace().next().and_then(|n| n.parse().ok());
        comm.trim() == "wisp-vcpu" && nr.is_some_and(|n: i64| WAITS.contains(&n))
    })
}

/// A stop reaches a guest the disk's rate limit holds: the limit's wait
/// (on the vCPU thread) ends for it.
#[test]
fn a_stop_ends_a_guest_held_by_the_disk_rate_limit() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    require_kvm();
    // 1 MiB, each 8-byte word holding its own offset (what `disk-hold`
    // checks), read 64 KiB a time.
    let disk = scratch().join("disk-rate-stop.disk");
    let words: Vec<u8> = (0..(1u64 << 20) / 8)
        .flat_map(|i| (i * 8).to_le_bytes())
        .collect();
    std::fs::write(&disk, words).unwrap();
    // 1 KiB/s: the first read comes out of the 64 KiB burst, the second
    // waits for a minute.
    let mut child = wisp()
        .args(["run", "--stop-timeout", "0", "--disk-rate", "1k", "--disk"])
        .arg(&disk)
        .arg(probe())
        .args(["--", "disk-hold", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().map(Result::unwrap).unwrap_or_default();
    assert!(first.starts_with("pass 1 "), "{first}");
    // The second read is held: the vCPU thread blocks in a sleep or a poll
    // (this guest makes no other waits).
    let start = Instant::now();
    while !vcpu_thread_blocked(child.id()) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the vCPU never waited"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on the child's pid, which it still is (not waited).
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    ends_within(
        &mut child,
        Duration::from_secs(30),
        "a guest held by its disk limit",
    );
    assert_eq!(child.wait().unwrap().code(), Some(143));
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(rest.iter().all(|l| !l.contains("CORRUPT")), "{rest:?}");
}

#[test]
fn net_rate_limit_caps_throughput() {
    require_kvm();
    let site = scratch().join("ratelimit-site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("big.bin"), vec![7u8; 1 << 20]).unwrap();
    let tar = scratch().join("ratelimit.tar");
    let st = std::process::Command::new("tar")
        .arg("cf")
        .arg(&tar)
        .arg("-C")
        .arg(&site)
        .arg("big.bin")
        .status()
        .unwrap();
    assert!(st.success());
    let disk = format!("{},ro", tar.display());
    let g = start_guest(
        &example("httpd"),
        80,
        &["--net-rate", "256K", "--disk", &disk],
        &[],
        |port| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
    let start = Instant::now();
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-s",
        "--max-time",
        "60",
        &format!("http://127.0.0.1:{}/big.bin", g.port),
    ]);
    let o = output_within(cmd, Duration::from_secs(90));
    let took = start.elapsed();
    assert_eq!(o.stdout.len(), 1 << 20);
    // 1 MiB at 256 KiB/s cannot arrive in much under 3.5 s (the limiter's
    // burst is 64 KiB); this checks the limiter acts, not how fast it is.
    assert!(
        took > Duration::from_millis(3000),
        "1 MiB took only {took:?} at 256 KiB/s"
    );
}

/// Runs `wisp run IMAGE` as user `nobody` (uid 65534) from `jail`, where
/// the binary and the image were copied (the checkout may sit below a
/// directory `nobody` cannot enter), with `env` added.
fn run_as_nobody(jail: &std::path::Path, env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(jail.join("wisp"))
        .args(["run"])
        .arg(jail.join("hello.wisp"))
        .args(["--", "unprivileged"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    output_within(cmd, Duration::from_secs(60))
}

#[test]
fn runs_unprivileged_with_only_its_own_kvm_device() {
    require_kvm();
    // A jailer-style set-up: a private device node the unprivileged user
    // owns, and nothing else (no root, no groups).
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("wisp-jail-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_wisp"), dir.join("wisp")).unwrap();
    std::fs::copy(hello(), dir.join("hello.wisp")).unwrap();
    std::fs::set_permissions(
        dir.join("hello.wisp"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let node = dir.join("kvm");
    let _ = std::fs::remove_file(&node);
    let c = std::ffi::CString::new(node.to_str().unwrap()).unwrap();
    // SAFETY: creates a character device node (10, 232 = KVM) at a path we
    // own; plain syscall with valid arguments.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(10, 232)) };
    assert_eq!(
        rc,
        0,
        "mknod needs root (CAP_MKNOD): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: chown of the node we just made to nobody:nogroup.
    assert_eq!(unsafe { libc::chown(c.as_ptr(), 65534, 65534) }, 0);
    let o = run_as_nobody(&dir, &[("WISP_KVM", node.to_str().unwrap())]);
    assert_eq!(
        stdout(&o),
        "Hello from Wisp! args: [\"unprivileged\"]\n",
        "stderr: {}",
        stderr(&o)
    );
    assert_eq!(status(&o), 0);
    // Without access to a KVM device, a clear error.
    let o = run_as_nobody(&dir, &[]);
    assert_clean_error(&o, "no permission to open /dev/kvm");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cpu_quota_holds_a_spinning_guest() {
    require_kvm();
    let child = wisp()
        .args(["run", "--cpus", "0.2", "--timeout", "2s"])
        .arg(probe())
        .args(["--", "spin"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: zeroed rusage is valid; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for the child we spawned (std does not reap it first:
    // we never call wait on `child`).
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(rc, pid);
    std::mem::forget(child);
    assert_eq!(libc::WEXITSTATUS(status), 124, "stopped by --timeout");
    let cpu = usage.ru_utime.tv_sec as f64
        + usage.ru_utime.tv_usec as f64 / 1e6
        + usage.ru_stime.tv_sec as f64
        + usage.ru_stime.tv_usec as f64 / 1e6;
    // 2 s of wall time at 20% of a CPU: well under one second of CPU
    // (unlimited, the spinning guest uses most of the 2 s).
    assert!(cpu < 0.8, "used {cpu:.2} s of CPU in 2 s at --cpus 0.2");
}

/// CPU time (user + system, every thread) process `pid` has used so far,
/// from `/proc/PID/stat`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the command name (which may hold spaces) in parentheses:
    // state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

#[test]
fn a_crashing_or_spinning_guest_leaves_other_guests_untouched() {
    require_kvm();
    let g = start_guest(&example("httpd"), 80, &[], &[], |port| {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let serving = |why: &str| {
        assert!(
            get(g.port, "/").contains("Hello from a Wisp unikernel!"),
            "the neighbour stopped serving {why}"
        );
    };
    serving("at start");
    // Neighbours crash, break their rings, flood and spin; each must have
    // done what it was started to do (or the test proves nothing), and the
    // server keeps serving after each.
    let o = run(probe(), &["--net", "user"], &["ud"]);
    assert_eq!(status(&o), 139, "ud: {}", stderr(&o));
    assert!(
        stderr(&o).contains("invalid opcode (#UD)"),
        "{}",
        stderr(&o)
    );
    serving("after a crash");

    let o = run(probe(), &["--net", "user"], &["ring-outside"]);
    assert_eq!(status(&o), 0, "ring-outside: {}", stderr(&o));
    assert_eq!(stdout(&o), "survived\n");
    assert!(
        stderr(&o).contains("wisp: virtio-net stopped:"),
        "{}",
        stderr(&o)
    );
    serving("after a hostile ring");

    let o = run(probe(), &["--net", "user"], &["console-flood"]);
    assert_eq!(status(&o), 0, "console-flood: {}", stderr(&o));
    assert!(o.stdout.len() >= 4 << 20, "the flood was written");
    assert!(
        stderr(&o).contains("bytes of guest console output dropped"),
        "{}",
        stderr(&o)
    );
    serving("after a console flood");

    let o = run(probe(), &["--net", "user"], &["bad-console-ptr"]);
    assert_eq!(status(&o), 139, "bad-console-ptr: {}", stderr(&o));
    assert!(
        stderr(&o).contains("broke the hypercall protocol"),
        "{}",
        stderr(&o)
    );
    serving("after a broken hypercall");

    let mut spinner = wisp()
        .args(["run", "--stop-timeout", "0"])
        .arg(probe())
        .args(["--", "spin"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spinner");
    let pid = spinner.id();
    // It spins: its CPU time grows (however busy the machine, a spinning
    // guest gets there; a guest that waited would never use 300 ms).
    let start = Instant::now();
    while cpu_time(pid) < Duration::from_millis(300) {
        assert!(
            spinner.try_wait().unwrap().is_none(),
            "the spinner exited on its own"
        );
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the spinning guest never used 300 ms of CPU"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    serving("next to a spinning guest");
    assert!(
        spinner.try_wait().unwrap().is_none(),
        "still spinning while the neighbour served"
    );
    // ...and stopping a guest (SIGTERM to its monitor, no time to stop by
    // itself) stops it at once, even while it spins at CPL3.
    // SAFETY: sends SIGTERM to our own child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let start = Instant::now();
    let st = loop {
        if let Some(st) = spinner.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "a spinning guest did not stop"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        st.signal() == Some(libc::SIGTERM) || st.code() == Some(128 + libc::SIGTERM),
        "stopped by SIGTERM: {st:?}"
    );
    serving("after its neighbour was stopped");
}

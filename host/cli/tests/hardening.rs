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

#[test]
fn every_test_guest_runs_under_the_filter() {
    // The filter is on by default: a normal run (console, exit) works.
    let o = run(hello(), &[], &["filtered"]);
    assert_eq!(stdout(&o), "Hello from Wisp! args: [\"filtered\"]\n");
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

#[test]
fn a_crashing_or_spinning_guest_leaves_other_guests_untouched() {
    require_kvm();
    let g = start_guest(&example("httpd"), 80, &[], &[], |port| {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let get = |port: u16| {
        let mut cmd = std::process::Command::new("curl");
        cmd.args([
            "-s",
            "--max-time",
            "10",
            &format!("http://127.0.0.1:{port}/"),
        ]);
        stdout(&output_within(cmd, Duration::from_secs(20)))
    };
    assert!(get(g.port).contains("Hello from a Wisp unikernel!"));
    // Neighbours crash, break their rings, flood and spin...
    for action in ["ud", "ring-outside", "console-flood", "bad-console-ptr"] {
        let _ = run(probe(), &["--net", "user"], &[action]);
    }
    let mut spinner = wisp()
        .args(["run"])
        .arg(probe())
        .args(["--", "spin"])
        .spawn()
        .expect("spinner");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        get(g.port).contains("Hello from a Wisp unikernel!"),
        "still serving next to a spinning guest"
    );
    // ...and stopping a guest (SIGTERM to its monitor) stops it at once,
    // even while it spins at CPL3.
    // SAFETY: sends SIGTERM to our own child.
    unsafe { libc::kill(spinner.id() as libc::pid_t, libc::SIGTERM) };
    let start = Instant::now();
    while spinner.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "a spinning guest did not stop"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(get(g.port).contains("Hello from a Wisp unikernel!"));
}

//! The monitor as a library (the engine): guests driven step by step from
//! one process, controlled while they run, and each thread under its own
//! seccomp filter.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use wisp_monitor::net::user::PortForward;
use wisp_monitor::{Image, Outcome, RunningVm, Shell, StartOptions, StopReason, VmConfig, VmState};

fn config(args: &[&str], publish: &[&str]) -> VmConfig {
    let publish: Vec<PortForward> = publish.iter().map(|p| p.parse().unwrap()).collect();
    VmConfig {
        memory: 64 << 20,
        args: args.iter().map(|s| s.to_string()).collect(),
        trace_boot: false,
        nics: if publish.is_empty() {
            vec![]
        } else {
            vec!["user".parse().unwrap()]
        },
        publish,
        net_limits: (0, 0),
        disk_limits: (0, 0),
        disk: None,
    }
}

/// Builds and starts a guest in this process; returns it, its console and
/// the host addresses it published.
fn start(image: &Path, args: &[&str], publish: &[&str]) -> (RunningVm, Console, Vec<u16>) {
    require_kvm();
    let image = Image::from_file(image).expect("image");
    let cfg = config(args, publish);
    let vm = Shell::create(cfg.memory)
        .expect("shell")
        .build(&image, &cfg, None)
        .expect("build");
    let ports = vm.published().iter().map(|p| p.0.port()).collect();
    let console = Console::default();
    let running = vm
        .start(Box::new(console.clone()), StartOptions::default())
        .expect("start");
    (running, console, ports)
}

fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(20), "never: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether the guest ended within `limit` (its done descriptor became
/// readable): a stop that is not delivered fails here instead of hanging.
fn ended_within(vm: &RunningVm, limit: Duration) -> bool {
    let mut fd = libc::pollfd {
        fd: vm.done_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd that outlives the call.
    unsafe { libc::poll(&mut fd, 1, limit.as_millis() as i32) == 1 }
}

fn get(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send request");
    let mut buf = vec![0u8; 65536];
    let mut got = Vec::new();
    // Headers then the body of Content-Length.
    loop {
        let n = stream.read(&mut buf).expect("read response");
        assert!(n > 0, "connection closed");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return text;
            }
        }
    }
}

#[test]
fn pause_and_resume_keep_tcp_connections_alive() {
    let (vm, _console, ports) = start(&example("httpd"), &[], &["0:80"]);
    let ctl = vm.controller();
    let mut conn = None;
    until("httpd answers", || {
        TcpStream::connect(("127.0.0.1", ports[0]))
            .map(|s| conn = Some(s))
            .is_ok()
    });
    let mut conn = conn.unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(get(&mut conn).starts_with("HTTP/1.1 200"));

    ctl.pause().expect("pause");
    assert_eq!(ctl.state(), VmState::Paused);
    let before = ctl.counters();
    // A request sent to a paused guest is not answered while it is paused:
    // no frame moves and the vCPU does not run.
    conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut byte = [0u8; 1];
    let r = conn.read(&mut byte);
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
        "a paused guest answered: {r:?}"
    );
    assert_eq!(ctl.counters(), before, "a paused guest ran or moved frames");

    ctl.resume().expect("resume");
    assert_eq!(ctl.state(), VmState::Running);
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The answer to the request sent while paused arrives on the same
    // connection, and the connection keeps serving.
    let mut rest = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&rest).contains("</html>") {
        let n = conn.read(&mut buf).expect("answer after resume");
        assert!(n > 0, "connection closed after resume");
        rest.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 200"));
    assert!(get(&mut conn).starts_with("HTTP/1.1 200"));

    ctl.stop(StopReason::Requested);
    let report = vm.wait(None).expect("wait");
    assert!(
        matches!(report.outcome, Outcome::Stopped { .. }),
        "{:?}",
        report.outcome
    );
}

#[test]
fn a_guest_blocked_in_its_wait_stops_at_once() {
    let (vm, _console, _) = start(probe(), &["sleep", "600000"], &[]);
    let ctl = vm.controller();
    until("the guest waits in the monitor", || {
        ctl.counters().waits > 0
    });
    ctl.stop(StopReason::Requested);
    // Were the stop not delivered to the blocked wait, the guest would sleep
    // for ten minutes.
    assert!(
        ended_within(&vm, Duration::from_secs(20)),
        "a stop did not end a guest blocked in its wait"
    );
    let report = vm.wait(None).expect("wait");
    assert!(
        matches!(report.outcome, Outcome::Stopped { .. }),
        "{:?}",
        report.outcome
    );
}

#[test]
fn a_spinning_guest_stops_at_once() {
    let (vm, _console, _) = start(probe(), &["spin"], &[]);
    let ctl = vm.controller();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(ctl.state(), VmState::Running);
    ctl.stop(StopReason::Requested);
    assert!(
        ended_within(&vm, Duration::from_secs(20)),
        "a stop did not end a spinning guest"
    );
    let report = vm.wait(None).expect("wait");
    assert!(
        matches!(report.outcome, Outcome::Stopped { .. }),
        "{:?}",
        report.outcome
    );
}

#[test]
fn a_spinning_guest_pauses_and_resumes() {
    let (vm, _console, _) = start(probe(), &["spin"], &[]);
    let ctl = vm.controller();
    ctl.pause().expect("pause a spinning guest");
    assert_eq!(ctl.state(), VmState::Paused);
    ctl.resume().expect("resume");
    assert_eq!(ctl.state(), VmState::Running);
    let report = vm.wait(Some(Duration::from_millis(200))).expect("wait");
    assert!(matches!(report.outcome, Outcome::TimedOut { .. }));
}

#[test]
fn controlling_one_guest_leaves_its_neighbour_alone() {
    // Two spinning guests in one process: stopping one must not touch the
    // other. Kicks are signals aimed at one vCPU thread; one sent to the
    // whole process (or a process-wide timer) would interrupt both.
    let (a, _, _) = start(probe(), &["spin"], &[]);
    let (b, _, _) = start(probe(), &["spin"], &[]);
    let (ca, cb) = (a.controller(), b.controller());
    std::thread::sleep(Duration::from_millis(50));
    ca.pause().expect("pause a");
    assert_eq!(ca.state(), VmState::Paused);
    assert_eq!(cb.state(), VmState::Running);
    ca.stop(StopReason::Requested);
    assert!(ended_within(&a, Duration::from_secs(20)), "a did not stop");
    let ra = a.wait(None).expect("wait a");
    assert!(
        matches!(ra.outcome, Outcome::Stopped { .. }),
        "{:?}",
        ra.outcome
    );
    assert!(ra.counters.interruptions > 0, "a was never kicked");
    assert_eq!(cb.state(), VmState::Running, "stopping a stopped b");
    assert_eq!(
        cb.counters().interruptions,
        0,
        "b's vCPU was interrupted by a's controls"
    );
    cb.stop(StopReason::Requested);
    assert!(ended_within(&b, Duration::from_secs(20)), "b did not stop");
    let rb = b.wait(None).expect("wait b");
    assert!(
        matches!(rb.outcome, Outcome::Stopped { .. }),
        "{:?}",
        rb.outcome
    );
}

#[test]
fn two_guests_run_side_by_side_in_one_process() {
    // Two guests, started together, each sleeping in the monitor and then
    // printing its own arguments: neither one's timers, kicks or console
    // leak into the other.
    let (a, ca, _) = start(probe(), &["sleep", "300"], &[]);
    let (b, cb, _) = start(probe(), &["args", "second", "guest"], &[]);
    let rb = b.wait(Some(Duration::from_secs(30))).expect("wait b");
    let ra = a.wait(Some(Duration::from_secs(30))).expect("wait a");
    assert!(matches!(ra.outcome, Outcome::Exited(0)), "{:?}", ra.outcome);
    assert!(matches!(rb.outcome, Outcome::Exited(0)), "{:?}", rb.outcome);
    assert!(
        ca.text().contains("slept"),
        "guest a printed {:?}",
        ca.text()
    );
    assert!(
        !ca.text().contains("second"),
        "guest a printed {:?}",
        ca.text()
    );
    assert!(
        cb.text().contains(r#"argc=2 ["second", "guest"]"#),
        "guest b printed {:?}",
        cb.text()
    );
    assert!(
        !cb.text().contains("slept"),
        "guest b printed {:?}",
        cb.text()
    );
}

/// `wisp run --seccomp-selftest=THREAD`: after the filters are on, THREAD
/// makes a forbidden system call. Its own filter must kill the process
/// (SIGSYS); without filters the hook reports and exits 125.
fn selftest(thread: &str, flags: &[&str]) -> std::process::Output {
    require_kvm();
    let mut cmd = wisp();
    cmd.arg("run")
        .arg(format!("--seccomp-selftest={thread}"))
        .args(flags)
        .args(["-p", &format!("{}:80", free_port())])
        .arg(example("httpd"));
    output_within(cmd, Duration::from_secs(30))
}

#[test]
fn a_forbidden_call_on_each_thread_is_killed_by_its_filter() {
    use std::os::unix::process::ExitStatusExt;
    for thread in ["vcpu", "io", "control"] {
        let o = selftest(thread, &[]);
        assert_eq!(
            o.status.signal(),
            Some(libc::SIGSYS),
            "{thread} thread was not killed by its filter: {:?}\n{}",
            o.status,
            stderr(&o)
        );
    }
    // Without filters the same call goes through (the hook then says so):
    // the kill above is the filter's doing.
    let o = selftest("io", &["--no-seccomp"]);
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    assert!(stderr(&o).contains("socket() was allowed"));
}

// ---- stop requests -------------------------------------------------------

/// Waits until the guest's console shows `line`.
fn console_shows(console: &Console, line: &str) {
    until(&format!("the console shows {line:?}"), || {
        console.text().contains(line)
    });
}

#[test]
fn a_guest_asked_to_stop_exits_with_its_own_status() {
    let (vm, console, _) = start(probe(), &["stop-status", "7"], &[]);
    let ctl = vm.controller();
    console_shows(&console, "waiting for a stop request");
    // The guest is blocked in its wait (nothing else to do): the request
    // must wake it, or it would wait for an hour.
    until("the guest waits in the monitor", || {
        ctl.counters().blocked_waits > 0
    });
    assert!(!ctl.shutdown_requested());
    assert!(ctl.request_shutdown().expect("request"));
    assert!(ctl.shutdown_requested());
    assert!(
        ended_within(&vm, Duration::from_secs(20)),
        "a stop request did not reach a guest blocked in its wait"
    );
    let report = vm.wait(None).expect("wait");
    assert!(
        matches!(report.outcome, Outcome::Exited(7)),
        "{:?}",
        report.outcome
    );
    assert!(console.text().contains("stop requested: exiting with 7"));
}

#[test]
fn a_guest_without_a_hook_exits_with_0_when_asked() {
    // probe sleep: a blocking sleep, no executor, no hook.
    let (vm, _console, _) = start(probe(), &["sleep", "600000"], &[]);
    let ctl = vm.controller();
    until("the guest waits in the monitor", || {
        ctl.counters().waits > 0
    });
    assert!(ctl.request_shutdown().expect("request"));
    assert!(
        ended_within(&vm, Duration::from_secs(20)),
        "the request did not end a guest without a hook"
    );
    let report = vm.wait(None).expect("wait");
    assert!(
        matches!(report.outcome, Outcome::Exited(0)),
        "{:?}",
        report.outcome
    );
}

#[test]
fn a_guest_that_ignores_the_request_runs_until_stopped() {
    let (vm, console, _) = start(probe(), &["stop-ignore"], &[]);
    let ctl = vm.controller();
    console_shows(&console, "waiting for a stop request");
    assert!(ctl.request_shutdown().expect("request"));
    // It saw the request (it says so) and carries on: still running.
    console_shows(&console, "stop requested: ignored");
    assert_eq!(ctl.state(), VmState::Running);
    ctl.stop(StopReason::Requested);
    assert!(ended_within(&vm, Duration::from_secs(20)));
    let report = vm.wait(None).expect("wait");
    assert!(
        matches!(report.outcome, Outcome::Stopped { .. }),
        "{:?}",
        report.outcome
    );
    // An ended guest cannot be asked.
    assert!(ctl.request_shutdown().is_err());
}

/// `wisp run` in the foreground, its stdout read line by line.
struct Foreground {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Foreground {
    fn start(flags: &[&str], args: &[&str]) -> Foreground {
        require_kvm();
        let mut child = wisp()
            .arg("run")
            .args(flags)
            .arg(probe())
            .arg("--")
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("wisp run");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Foreground { child, lines }
    }

    fn expect_line(&self, want: &str) {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(30)) {
                Ok(l) if l.contains(want) => return,
                Ok(_) => {}
                Err(e) => panic!("no line {want:?} from the guest: {e}"),
            }
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: a plain syscall on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }

    /// Waits for the end; returns the status and stderr.
    fn finish(mut self) -> (i32, String) {
        let mut err = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let st = self.child.wait().unwrap();
        (st.code().unwrap_or(-1), err)
    }
}

impl Drop for Foreground {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn wisp_run_on_sigterm_lets_the_guest_exit_with_its_own_status() {
    let g = Foreground::start(&["-m", "2M"], &["stop-status", "7"]);
    g.expect_line("waiting for a stop request");
    g.signal(libc::SIGTERM);
    g.expect_line("stop requested: exiting with 7");
    let (status, err) = g.finish();
    assert_eq!(status, 7, "{err}");
    assert!(
        err.contains("guest stopped when asked (exit status 7)"),
        "{err}"
    );
}

#[test]
fn wisp_run_forces_a_guest_that_does_not_stop() {
    // After the stop timeout...
    let g = Foreground::start(&["-m", "2M", "--stop-timeout", "1s"], &["stop-ignore"]);
    g.expect_line("waiting for a stop request");
    g.signal(libc::SIGTERM);
    g.expect_line("stop requested: ignored");
    let (status, err) = g.finish();
    assert_eq!(status, 143, "{err}");
    assert!(
        err.contains("stopped by force: stop timeout expired"),
        "{err}"
    );

    // ...or at a second signal (the default timeout is far longer than
    // this test waits for anything).
    let g = Foreground::start(&["-m", "2M"], &["stop-ignore"]);
    g.expect_line("waiting for a stop request");
    g.signal(libc::SIGINT);
    g.expect_line("stop requested: ignored");
    g.signal(libc::SIGTERM);
    let (status, err) = g.finish();
    assert_eq!(status, 143, "{err}");
    assert!(err.contains("stopped by force: second signal"), "{err}");
}

// ---- byte counters -------------------------------------------------------

/// The counters with the guest paused: both threads are quiet, so every
/// frame and disk request before this point is counted, none after.
fn quiet_counters(vm: &RunningVm) -> wisp_monitor::control::CounterValues {
    let ctl = vm.controller();
    ctl.pause().expect("pause");
    let c = ctl.counters();
    ctl.resume().expect("resume");
    c
}

/// Every frame on the user-mode network is an ARP frame (42 bytes) or an
/// IPv4 one: Ethernet 14 + IPv4 20 (the gateway and the guest send no IP
/// options) + TCP 20..60 or UDP 8, then the payload. So `frames` frames
/// carrying `payload` bytes of TCP payload in all hold between
/// `payload + 42 * frames` and `payload + 94 * frames` bytes (more only if
/// a segment were retransmitted, which a loss-free loopback path does not
/// do).
fn assert_frame_bytes(what: &str, bytes: u64, frames: u64, payload: u64) {
    assert!(frames > 0, "{what}: no frames counted");
    let (lo, hi) = (payload + 42 * frames, payload + 94 * frames);
    assert!(
        (lo..=hi).contains(&bytes),
        "{what}: {bytes} bytes in {frames} frames for {payload} bytes of payload \
         (expected {lo}..={hi})"
    );
}

#[test]
fn network_byte_counters_match_the_bytes_exchanged() {
    let (vm, _console, ports) = start(&example("httpd"), &[], &["0:80"]);
    let mut s = TcpStream::connect(("127.0.0.1", ports[0])).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    get(&mut s); // connected, the guest's ARP and TCP state warm
    let before = quiet_counters(&vm);
    // A request with a large header, so payload dominates the frames.
    let pad = "a".repeat(12_000);
    let request = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Pad: {pad}\r\n\r\n");
    s.write_all(request.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    let response_len = loop {
        let n = s.read(&mut buf).expect("read response");
        assert!(n > 0, "connection closed");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.trim().parse().ok())
                .expect("Content-Length");
            if got.len() >= end + 4 + len {
                break got.len();
            }
        }
    };
    let after = quiet_counters(&vm);
    assert_frame_bytes(
        "received",
        after.rx_bytes - before.rx_bytes,
        after.rx_frames - before.rx_frames,
        request.len() as u64,
    );
    assert_frame_bytes(
        "sent",
        after.tx_bytes - before.tx_bytes,
        after.tx_frames - before.tx_frames,
        response_len as u64,
    );
    vm.controller().stop(StopReason::Requested);
    vm.wait(None).expect("wait");
}

#[test]
fn disk_byte_counters_match_the_sectors_moved() {
    require_kvm();
    let disk = scratch().join("engine-disk-bytes.img");
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(8 << 20).unwrap();
    drop(f);
    let image = Image::from_file(&example("kv")).expect("image");
    let mut cfg = config(&["6379", "--appendfsync", "no"], &["0:6379"]);
    cfg.disk = Some(wisp_monitor::DiskConfig {
        path: disk.clone(),
        read_only: false,
    });
    let vm = Shell::create(cfg.memory)
        .expect("shell")
        .build(&image, &cfg, None)
        .expect("build");
    let port = vm.published()[0].0.port();
    let console = Console::default();
    let vm = vm
        .start(Box::new(console.clone()), StartOptions::default())
        .expect("start");
    console_shows(&console, "listening on port 6379");
    let boot = quiet_counters(&vm);
    // Opening the log on a fresh disk read its header sector at least, and
    // wrote the header.
    assert!(
        boot.disk_read_bytes >= 512 && boot.disk_read_bytes.is_multiple_of(512),
        "{boot:?}"
    );
    assert_eq!(boot.disk_write_bytes, 512, "the header sector: {boot:?}");

    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut set = |key: &str, len: usize| -> u64 {
        let value = "v".repeat(len);
        let cmd = format!(
            "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${len}\r\n{value}\r\n",
            key.len()
        );
        s.write_all(cmd.as_bytes()).unwrap();
        let mut reply = [0u8; 5];
        s.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"+OK\r\n");
        // kv logs the command as it came (a RESP array of its arguments).
        cmd.len() as u64
    };
    // kv appends each record by rewriting the log's last partial sector
    // with the new bytes, padded to whole sectors (kv_core::aof), and reads
    // nothing: so each SET writes ceil((tail + record) / 512) sectors.
    let mut log = 0u64;
    let mut last = boot;
    for (key, len) in [("k", 1000usize), ("key2", 100), ("k3", 3000)] {
        let record = set(key, len);
        let now = quiet_counters(&vm);
        let tail = log % 512;
        let expect = (tail + record).div_ceil(512) * 512;
        assert_eq!(
            now.disk_write_bytes - last.disk_write_bytes,
            expect,
            "SET {key} ({record} bytes of log after {log}): {now:?}"
        );
        assert_eq!(
            now.disk_read_bytes, last.disk_read_bytes,
            "a SET reads nothing"
        );
        log += record;
        last = now;
    }
    vm.controller().stop(StopReason::Requested);
    let report = vm.wait(None).expect("wait");
    assert_eq!(report.counters.disk_write_bytes, last.disk_write_bytes);
    let _ = std::fs::remove_file(&disk);
}

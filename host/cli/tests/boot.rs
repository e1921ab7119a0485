//! Boots real images on the Wisp monitor under KVM: output, arguments,
//! exit statuses, panics, every CPU exception and memory protection, the
//! crash report, `--timeout`, `--memory` and `--trace-boot`.

mod common;

use common::*;

#[test]
fn hello_prints_its_arguments_and_exits_zero() {
    let o = run(hello(), &[], &["alpha", "beta"]);
    assert_eq!(stdout(&o), "Hello from Wisp! args: [\"alpha\", \"beta\"]\n");
    assert_eq!(status(&o), 0, "stderr: {}", stderr(&o));
}

#[test]
fn hello_without_arguments() {
    let o = run(hello(), &[], &[]);
    assert_eq!(stdout(&o), "Hello from Wisp! args: []\n");
    assert_eq!(status(&o), 0);
}

#[test]
fn arguments_with_spaces_and_unicode_survive() {
    let o = run(probe(), &[], &["args", "two words", "ünï", ""]);
    assert_eq!(stdout(&o), "argc=3 [\"two words\", \"ünï\", \"\"]\n");
}

#[test]
fn exit_status_is_the_guests() {
    for code in ["0", "3", "42", "255"] {
        let o = run(probe(), &[], &["exit", code]);
        assert_eq!(status(&o).to_string(), code);
    }
}

#[test]
fn unbuffered_tail_is_flushed_at_exit() {
    let o = run(probe(), &[], &["no-newline"]);
    assert_eq!(stdout(&o), "partial line without newline");
}

#[test]
fn many_lines_arrive_in_order() {
    let o = run(probe(), &[], &["print-lines", "500"]);
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 500);
    assert_eq!(lines[0], "line 0");
    assert_eq!(lines[499], "line 499");
}

#[test]
fn panic_prints_message_and_location_and_exits_101() {
    let o = run(probe(), &[], &["panic"]);
    let out = stdout(&o);
    assert!(
        out.contains("panicked at testapps/probe/src/main.rs:"),
        "{out}"
    );
    assert!(out.contains("probe panicked on purpose"), "{out}");
    assert_eq!(status(&o), 101);
}

/// Runs a probe action that must crash, returning the crash report.
fn crash(action: &str) -> String {
    let o = run(probe(), &["--timeout", "30s"], &[action]);
    let err = stderr(&o);
    assert_eq!(
        status(&o),
        139,
        "{action}: status {:?}, stderr {err}",
        o.status
    );
    assert!(err.contains("wisp: guest crashed:"), "{action}: {err}");
    assert!(
        err.contains("rip 0x")
            && err.contains("rsp 0x")
            && err.contains("rax 0x")
            && err.contains("r15 0x"),
        "{err}"
    );
    err
}

#[test]
fn cpu_exceptions_are_reported() {
    assert!(crash("ud").contains("invalid opcode (#UD) (vector 6)"));
    assert!(crash("de").contains("divide error (#DE) (vector 0)"));
    assert!(crash("gp").contains("general protection (#GP) (vector 13)"));
    assert!(crash("bp").contains("breakpoint (#BP) (vector 3)"));
}

#[test]
fn page_faults_report_the_address_and_cause() {
    let r = crash("null");
    assert!(r.contains("page fault (#PF) (vector 14)"), "{r}");
    assert!(
        r.contains("fault address (cr2) 0x0000000000000000: read, page not mapped"),
        "{r}"
    );
    let r = crash("unmapped");
    assert!(r.contains("cr2) 0x00007fff00000000"), "{r}");
}

#[test]
fn code_rodata_and_boot_page_are_read_only() {
    for action in ["write-text", "write-rodata", "write-boot-page"] {
        let r = crash(action);
        assert!(r.contains("write, protection violation"), "{action}: {r}");
    }
}

#[test]
fn page_tables_are_not_readable_from_the_guest() {
    let r = crash("read-page-tables");
    assert!(
        r.contains("cr2) 0x0000000000001000: read, protection violation"),
        "{r}"
    );
}

#[test]
fn stack_is_not_executable() {
    assert!(crash("exec-stack").contains("instruction fetch, protection violation"));
}

#[test]
fn guard_page_below_the_stack() {
    assert!(crash("guard").contains("read, page not mapped"));
    // A runaway recursion hits the guard page and is reported, not a hang
    // or a silent triple fault (the handler runs on its own stack).
    assert!(crash("stack-overflow").contains("write, page not mapped"));
}

#[test]
fn timeout_stops_a_spinning_guest() {
    let o = run(probe(), &["--timeout", "300ms"], &["spin"]);
    assert_eq!(status(&o), 124);
    assert!(
        stderr(&o).contains("--timeout of 300ms expired"),
        "{}",
        stderr(&o)
    );
}

/// Runs `wisp run IMAGE FLAGS -- ARGS` to its end (at most 60 s) and
/// returns its output with the CPU time (user + system) the monitor
/// process used, every thread counted, from `wait4`'s resource usage.
fn run_with_cpu_time(
    image: &std::path::Path,
    flags: &[&str],
    args: &[&str],
) -> (std::process::Output, std::time::Duration) {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    use std::time::{Duration, Instant};
    require_kvm();
    // Reaped by the wait4 below (std's wait would not report the usage).
    #[allow(clippy::zombie_processes)]
    let mut child = wisp()
        .arg("run")
        .arg(image)
        .args(flags)
        .arg("--")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn wisp run");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let pid = child.id() as libc::pid_t;
    let start = Instant::now();
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: polls our own child (std never waits for it: `child` is
        // not waited on), with valid pointers to locals.
        let rc = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        assert!(rc >= 0, "wait4: {}", std::io::Error::last_os_error());
        if rc == pid {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("wisp run {args:?} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    let cpu = tv(usage.ru_utime) + tv(usage.ru_stime);
    let o = std::process::Output {
        status: std::process::ExitStatus::from_raw(status),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    };
    (o, cpu)
}

#[test]
fn sleep_waits_in_the_monitor() {
    // The guest sleeps for a second. Blocked in the monitor, it costs the
    // host almost no CPU: boot and the wait's exits take milliseconds. A
    // guest that spun through its sleep would burn about the whole second
    // of CPU time (CPU time, not wall time: a busy machine stretches the
    // wall clock, not the CPU a sleeping process uses).
    let (o, cpu) = run_with_cpu_time(probe(), &[], &["sleep", "1000"]);
    assert_eq!(status(&o), 0, "{}", stderr(&o));
    let ms: u64 = stdout(&o)
        .trim()
        .trim_start_matches("slept ")
        .trim_end_matches(" ms")
        .parse()
        .expect("ms");
    assert!(ms >= 1000, "slept at least the requested time: {ms}");
    assert!(
        cpu < std::time::Duration::from_millis(250),
        "the monitor used {cpu:?} of CPU while its guest slept 1 s: the guest spins"
    );
}

#[test]
fn executor_runs_tasks_and_timers() {
    let o = run(probe(), &[], &["async-sleep", "40"]);
    assert_eq!(stdout(&o), "tasks done: 3\n");
}

#[test]
fn heap_uses_the_memory_given() {
    let o = run(probe(), &["--memory", "128M"], &["alloc", "100"]);
    assert!(
        stdout(&o).starts_with("allocated 100 MiB"),
        "{}",
        stdout(&o)
    );
    // Exhausting the heap is a clean panic (allocation failure), not a crash.
    let o = run(probe(), &["--memory", "16M"], &["alloc", "100"]);
    assert_eq!(status(&o), 101, "{}", stdout(&o));
    assert!(stdout(&o).contains("memory allocation"), "{}", stdout(&o));
}

#[test]
fn hello_boots_in_two_mib() {
    let o = run(hello(), &["--memory", "2M"], &["tiny"]);
    assert_eq!(stdout(&o), "Hello from Wisp! args: [\"tiny\"]\n");
}

#[test]
fn memory_too_small_is_a_clear_error() {
    let o = run(hello(), &["--memory", "1M"], &[]);
    assert_clean_error(&o, "--memory 1M is too small");
}

#[test]
fn wall_clock_comes_from_the_host() {
    let o = run(probe(), &[], &["clock"]);
    let guest: u64 = stdout(&o)
        .trim()
        .trim_start_matches("unix ")
        .parse()
        .expect("seconds");
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(guest.abs_diff(host) < 60, "guest {guest} host {host}");
}

#[test]
fn trace_boot_prints_every_stage() {
    let o = run(hello(), &["--trace-boot"], &[]);
    let err = stderr(&o);
    for stage in [
        "KVM VM, vCPU and memory created",
        "image loaded",
        "guest entered",
        "guest main() reached",
        "guest exited",
    ] {
        assert!(err.contains(stage), "missing '{stage}' in {err}");
    }
    assert_eq!(stdout(&o), "Hello from Wisp! args: []\n");
}

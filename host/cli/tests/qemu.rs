//! The same images boot under QEMU microvm through their PVH entry: one
//! image, two monitors. QEMU's exit status is `guest status * 2 + 1`
//! (isa-debug-exit), modulo 256.

mod common;

use common::*;

fn guest_status(o: &std::process::Output) -> i32 {
    let s = status(o);
    wisp_qemu::guest_status(s).unwrap_or_else(|| {
        panic!(
            "QEMU exits through isa-debug-exit with an odd status, got {s}: {}",
            stderr(o)
        )
    })
}

#[test]
fn hello_boots_on_qemu_with_the_same_output() {
    let o = qemu(hello(), "alpha beta");
    assert_eq!(stdout(&o), "Hello from Wisp! args: [\"alpha\", \"beta\"]\n");
    assert_eq!(guest_status(&o), 0);
}

#[test]
fn loader_options_before_a_double_dash_are_not_arguments() {
    let o = qemu(probe(), "console=ttyS0 -- args x y");
    assert_eq!(stdout(&o), "argc=2 [\"x\", \"y\"]\n");
}

#[test]
fn exit_status_maps_through_isa_debug_exit() {
    let o = qemu(probe(), "exit 7");
    assert_eq!(guest_status(&o), 7);
}

#[test]
fn panic_on_qemu() {
    let o = qemu(probe(), "panic");
    assert!(
        stdout(&o).contains("probe panicked on purpose"),
        "{}",
        stdout(&o)
    );
    assert_eq!(guest_status(&o), 101);
}

#[test]
fn exceptions_on_qemu_print_a_crash_report() {
    for (action, name) in [
        ("ud", "invalid opcode"),
        ("null", "page fault"),
        ("guard", "page fault"),
        ("write-text", "page fault"),
    ] {
        let o = qemu(probe(), action);
        let out = stdout(&o);
        assert!(
            out.contains(&format!("wisp: guest crashed: {name}")),
            "{action}: {out}"
        );
        // 139 * 2 + 1 = 279, which the OS truncates to 23.
        assert_eq!(status(&o), 23, "{action}");
    }
}

#[test]
fn timers_and_heap_work_on_qemu() {
    let o = qemu(probe(), "async-sleep 20");
    assert_eq!(stdout(&o), "tasks done: 3\n");
    let o = qemu(probe(), "alloc 16");
    assert!(stdout(&o).starts_with("allocated 16 MiB"), "{}", stdout(&o));
}

#[test]
fn boots_with_acpi_on_too() {
    require_kvm();
    // The same command line with ACPI left on (the README's form).
    let mut cmd = wisp_qemu::command(hello(), wisp_qemu::Acpi::On, &[]);
    cmd.args(["-append", "acpi"]);
    let o = output_within(cmd, std::time::Duration::from_secs(60));
    assert_eq!(stdout(&o), "Hello from Wisp! args: [\"acpi\"]\n");
}

/// What each protection probe must hit, on every monitor: the access and
/// why it failed, and whether the faulting address is the same on both
/// (it is unless it depends on where the monitor put the boot page or the
/// stack pointer at the fault).
const PROTECTIONS: &[(&str, &str, bool)] = &[
    ("null", "read, page not mapped", true),
    ("unmapped", "read, page not mapped", true),
    ("write-text", "write, protection violation", true),
    ("write-rodata", "write, protection violation", true),
    ("write-boot-page", "write, protection violation", false),
    (
        "exec-stack",
        "instruction fetch, protection violation",
        false,
    ),
    ("guard", "read, page not mapped", true),
    ("stack-overflow", "write, page not mapped", false),
    // Below the image: page tables on the Wisp monitor, the loader's data
    // under PVH; read-only either way.
    ("write-below-image", "write, protection violation", true),
    // Only the guest's RAM is mapped (64 MiB on both).
    ("read-beyond-ram", "read, page not mapped", true),
];

/// The crash report's fault line (`fault address (cr2) ...`).
fn fault_line(report: &str) -> &str {
    report
        .lines()
        .find(|l| l.contains("fault address (cr2)"))
        .unwrap_or("")
        .trim()
}

#[test]
fn the_same_memory_protections_as_on_the_wisp_monitor() {
    for &(action, cause, same_address) in PROTECTIONS {
        let w = run(probe(), &["--memory", "64M"], &[action]);
        assert_eq!(status(&w), 139, "{action} on wisp: {}", stderr(&w));
        let wisp_line = fault_line(&stderr(&w)).to_string();
        assert!(wisp_line.ends_with(cause), "{action} on wisp: {wisp_line}");

        let q = qemu(probe(), action);
        assert_eq!(status(&q), 23, "{action} on QEMU: {}", stdout(&q));
        let out = stdout(&q);
        let qemu_line = fault_line(&out);
        assert!(qemu_line.ends_with(cause), "{action} on QEMU: {out}");
        if same_address {
            assert_eq!(qemu_line, wisp_line, "{action}");
        }
    }
}

/// The PVH path's own GDT, TSS, IDT, page tables and lockdown list live in
/// the image (the Wisp monitor keeps its own below the image): none is
/// readable or writable from CPL3 once the map is locked.
#[test]
fn pvh_system_structures_are_out_of_reach() {
    for index in 0..5 {
        for action in ["read-system", "write-system"] {
            let o = qemu(probe(), &format!("{action} {index}"));
            let out = stdout(&o);
            let access = if action == "read-system" {
                "read"
            } else {
                "write"
            };
            assert!(
                fault_line(&out).ends_with(&format!("{access}, protection violation")),
                "{action} {index}: {out}"
            );
            assert_eq!(status(&o), 23, "{action} {index}: {out}");
        }
    }
}

/// microvm's IOAPIC is mapped (for the CPL0 interrupt set-up) only when a
/// device needs it, and then supervisor-only; the LAPIC is reached through
/// MSRs and never mapped.
#[test]
fn interrupt_controllers_are_out_of_reach() {
    let nic = [
        "-netdev",
        "user,id=n0",
        "-device",
        "virtio-net-device,netdev=n0",
    ];
    for action in ["read-system 5", "write-system 5"] {
        let mut cmd = qemu_command(probe(), &nic);
        cmd.args(["-append", action]);
        let o = output_within(cmd, std::time::Duration::from_secs(60));
        let out = stdout(&o);
        assert!(
            fault_line(&out).contains("(cr2) 0x00000000fec00000")
                && fault_line(&out).ends_with("protection violation"),
            "{action}: {out}"
        );
    }
    let o = qemu(probe(), "write-system 5");
    assert!(
        fault_line(&stdout(&o)).ends_with("write, page not mapped"),
        "{}",
        stdout(&o)
    );
    let o = qemu(probe(), "write-addr 0xfee00000");
    assert!(
        fault_line(&stdout(&o)).contains("(cr2) 0x00000000fee00000"),
        "{}",
        stdout(&o)
    );
}

/// With no RTC (microvm's default) the guest still knows the time, and
/// its TSC rate, from kvmclock: no PIT calibration, no CMOS access.
#[test]
fn clock_comes_from_kvmclock() {
    let mut cmd = qemu_command(probe(), &["-M", "rtc=off"]);
    cmd.args(["-append", "clock-source"]);
    let o = output_within(cmd, std::time::Duration::from_secs(60));
    assert!(
        stdout(&o).starts_with("Some(KvmClock) tsc "),
        "{}",
        stdout(&o)
    );
    let mut cmd = qemu_command(probe(), &["-M", "rtc=off"]);
    cmd.args(["-append", "clock"]);
    let o = output_within(cmd, std::time::Duration::from_secs(60));
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

/// QEMU's arguments for `image` without `isa-debug-exit`, plus `extra`:
/// a machine that, like Firecracker, has no way to pass on an exit status.
fn qemu_without_debug_exit(image: &std::path::Path, extra: &[&str]) -> std::process::Command {
    let args = wisp_qemu::args(image, wisp_qemu::Acpi::Off, extra);
    let mut kept = Vec::new();
    let mut i = 0;
    while i < args.len() {
        if args[i] == "-device" && args[i + 1].to_string_lossy().starts_with("isa-debug-exit") {
            i += 2;
            continue;
        }
        kept.push(args[i].clone());
        i += 1;
    }
    let mut cmd = std::process::Command::new(wisp_qemu::QEMU);
    cmd.args(kept);
    cmd
}

/// Firecracker's way out: no isa-debug-exit, an i8042 whose reset ends the
/// VM (status 0), so the guest prints its status first.
#[test]
fn without_isa_debug_exit_the_guest_prints_its_status_and_resets() {
    require_kvm();
    let mut cmd = qemu_without_debug_exit(probe(), &["-device", "i8042"]);
    cmd.args(["-append", "exit 7"]);
    let o = output_within(cmd, std::time::Duration::from_secs(60));
    assert_eq!(stdout(&o), "wisp: exit status 7\n");
    assert_eq!(status(&o), 0, "the reset ends QEMU (-no-reboot)");
}

/// Lines of a child's stdout, as they come.
fn lines_of(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let out = child.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_for_line(rx: &std::sync::mpsc::Receiver<String>, prefix: &str) {
    loop {
        match rx.recv_timeout(std::time::Duration::from_secs(30)) {
            Ok(l) if l.starts_with(prefix) => return,
            Ok(_) => {}
            Err(e) => panic!("no line starting with {prefix:?}: {e}"),
        }
    }
}

/// User plus system CPU time of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..]
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// The CPU the process `pid` uses over `secs` seconds, as a share of one CPU.
fn cpu_share(pid: u32, secs: u64) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let before = cpu_ticks(pid);
    std::thread::sleep(std::time::Duration::from_secs(secs));
    (cpu_ticks(pid) - before) as f64 / hz / secs as f64
}

/// A running QEMU, killed when dropped.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An idle guest halts at CPL0 until its timer: QEMU's CPU time over a few
/// idle seconds stays near zero (it was a whole CPU while the guest spun).
#[test]
fn an_idle_guest_uses_no_host_cpu() {
    require_kvm();
    let mut cmd = qemu_command(probe(), &[]);
    cmd.args(["-append", "idle 4000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut q = Running(cmd.spawn().expect("qemu"));
    let rx = lines_of(&mut q.0);
    wait_for_line(&rx, "idle");
    let share = cpu_share(q.0.id(), 2);
    assert!(share < 0.1, "QEMU used {:.0}% of a CPU", share * 100.0);
    let st = q.0.wait().expect("wait");
    assert_eq!(wisp_qemu::guest_status(st.code().unwrap_or(-1)), Some(0));
}

/// An idle server halts too, and the NIC's interrupt wakes it for each
/// request.
#[test]
fn an_idle_server_uses_no_host_cpu_and_still_answers() {
    require_kvm();
    let port = free_port();
    let fwd = format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:7");
    let mut cmd = qemu_command(
        &example("echo"),
        &["-netdev", &fwd, "-device", "virtio-net-device,netdev=n0"],
    );
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut q = Running(cmd.spawn().expect("qemu"));
    let rx = lines_of(&mut q.0);
    wait_for_line(&rx, "echo:");
    let echo = |msg: &[u8]| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        s.write_all(msg).unwrap();
        let mut back = vec![0; msg.len()];
        s.read_exact(&mut back).expect("echo");
        back
    };
    assert_eq!(echo(b"before"), b"before");
    let share = cpu_share(q.0.id(), 3);
    assert!(share < 0.1, "QEMU used {:.0}% of a CPU", share * 100.0);
    for i in 0..20 {
        let msg = format!("after idle {i}");
        assert_eq!(echo(msg.as_bytes()), msg.as_bytes());
    }
}

/// Firecracker appends ` pci=off` to every command line, after the
/// application's arguments: it is not one of them.
#[test]
fn a_trailing_pci_off_is_not_an_argument() {
    let o = qemu(probe(), "args x pci=off");
    assert_eq!(stdout(&o), "argc=1 [\"x\"]\n");
}

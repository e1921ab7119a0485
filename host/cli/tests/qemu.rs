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

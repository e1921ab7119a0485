//! The PVH entry trusts nothing the PVH ABI does not promise: booted on
//! KVM by a loader that keeps only those promises (`rsp` = 0 as on
//! Firecracker, garbage in every other register, the GDT and IDT registers
//! and the undefined flags), the images still run, print on COM1 and exit.

mod common;

use common::*;
use std::time::Duration;

fn boot(image: &std::path::Path, cmdline: &str, seed: u64) -> wisp_monitor::pvh_entry::PvhRun {
    require_kvm();
    let image = wisp_monitor::Image::from_file(image).expect("image");
    wisp_monitor::pvh_entry::boot(
        &image,
        64 << 20,
        cmdline.as_bytes(),
        seed,
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("seed {seed}: {e}"))
}

#[test]
fn hello_boots_from_a_hostile_pvh_start_state() {
    for seed in [1, 0xdead_beef, 0x1234_5678_9abc_def0] {
        let run = boot(hello(), "hostile", seed);
        assert_eq!(
            String::from_utf8_lossy(&run.console),
            "Hello from Wisp! args: [\"hostile\"]\n"
        );
        assert_eq!(run.status, Some(0), "seed {seed}");
    }
}

#[test]
fn exit_status_and_crash_reports_from_a_hostile_start() {
    let run = boot(probe(), "exit 7", 7);
    assert_eq!(run.status, Some(7));
    let run = boot(probe(), "write-text", 9);
    let out = String::from_utf8_lossy(&run.console).into_owned();
    assert!(
        out.contains("fault address (cr2)") && out.contains("write, protection violation"),
        "{out}"
    );
    assert_eq!(run.status, Some(139));
}

//! Hypercalls to the Wisp monitor. Each is one `out` (one exit, 80–110 µs on
//! KVM PVM); argument blocks are passed by guest-physical address, which is
//! the virtual address since the guest is identity-mapped.

use crate::arch::x86_64::io::out32;
use wisp_abi::hypercall::{self, ConsoleWrite, CrashReport, Wait};

/// Guest-physical address of a value (identity mapping, below 4 GiB).
fn gpa<T>(value: &T) -> u32 {
    value as *const T as usize as u32
}

pub fn console_write(bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    let args = ConsoleWrite {
        addr: bytes.as_ptr() as u64,
        len: bytes.len() as u64,
    };
    out32(hypercall::PORT_CONSOLE, gpa(&args));
}

pub fn wait(timeout_ns: u64) {
    let args = Wait { timeout_ns };
    out32(hypercall::PORT_WAIT, gpa(&args));
}

pub fn exit(status: u8) -> ! {
    loop {
        out32(hypercall::PORT_EXIT, status as u32);
    }
}

pub fn crash(report: &CrashReport) -> ! {
    loop {
        out32(hypercall::PORT_CRASH, gpa(report));
    }
}

pub fn mark(mark: u32) {
    let tsc = crate::arch::x86_64::io::rdtsc();
    // SAFETY: as `out32`; `rsi` carries the TSC the mark was reached at
    // (see `hypercall::PORT_MARK`).
    unsafe {
        core::arch::asm!(
            "out dx, eax",
            in("dx") hypercall::PORT_MARK,
            in("eax") mark,
            in("rsi") tsc,
            options(nostack, preserves_flags)
        )
    }
}

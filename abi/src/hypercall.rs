//! Hypercalls: how a guest on the Wisp monitor calls into it.
//!
//! A hypercall is one `out dx, eax` from CPL3 to a port in
//! `PORT_BASE..PORT_BASE + PORT_COUNT`, which the TSS I/O bitmap allows.
//! `eax` carries either an immediate (exit status, mark number) or the
//! guest-physical address of an argument block defined here. Each costs one
//! exit to the monitor (80–110 µs on KVM PVM), so the guest batches: the
//! console flushes per line, never per byte.
//!
//! The monitor treats every argument as hostile: addresses and lengths are
//! checked against guest memory before use.

use crate::pod::Pod;

/// First hypercall port.
pub const PORT_BASE: u16 = 0x500;
/// `eax` = address of a [`ConsoleWrite`]: write bytes to the console.
pub const PORT_CONSOLE: u16 = PORT_BASE;
/// `eax` = address of a [`Wait`]: block until the deadline or an event.
pub const PORT_WAIT: u16 = PORT_BASE + 1;
/// `eax` = exit status (low 8 bits): the guest is done.
pub const PORT_EXIT: u16 = PORT_BASE + 2;
/// `eax` = address of a [`CrashReport`]: the guest took a CPU exception.
pub const PORT_CRASH: u16 = PORT_BASE + 3;
/// `eax` = one of the `MARK_*` values: a boot-trace timestamp, only sent when
/// the boot page has [`crate::boot::FLAG_TRACE_BOOT`]; `rsi` = the guest's
/// TSC when it reached the mark (0: not given), so that the monitor dates
/// the mark before the exit that reports it.
pub const PORT_MARK: u16 = PORT_BASE + 4;
/// Number of hypercall ports.
pub const PORT_COUNT: u16 = 5;

/// Mark: the runtime is initialised and is about to call the application.
pub const MARK_MAIN: u32 = 1;

/// Most bytes one console hypercall may carry; the monitor rejects more.
pub const CONSOLE_MAX: u64 = 64 * 1024;

/// Argument of [`PORT_CONSOLE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConsoleWrite {
    /// Guest-physical address of the bytes.
    pub addr: u64,
    pub len: u64,
}

/// Argument of [`PORT_WAIT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Wait {
    /// Longest time to block, in nanoseconds.
    pub timeout_ns: u64,
}

/// Argument of [`PORT_CRASH`]: the CPU state at the exception, as the guest's
/// handler saw it. A CPL3 handler cannot read CR2, so the monitor adds it
/// from the vCPU's registers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CrashReport {
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
    /// rax, rbx, rcx, rdx, rsi, rdi, rbp, r8..r15, in that order.
    pub gprs: [u64; 15],
}

/// Names of [`CrashReport::gprs`], in order.
pub const GPR_NAMES: [&str; 15] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
    "r15",
];

// SAFETY: repr(C), u64 fields only.
unsafe impl Pod for ConsoleWrite {}
// SAFETY: repr(C), one u64.
unsafe impl Pod for Wait {}
// SAFETY: repr(C), u64 fields and a u64 array.
unsafe impl Pod for CrashReport {}

/// Name of an x86 exception vector, for crash reports.
pub fn vector_name(vector: u64) -> &'static str {
    match vector {
        0 => "divide error (#DE)",
        1 => "debug (#DB)",
        2 => "non-maskable interrupt",
        3 => "breakpoint (#BP)",
        4 => "overflow (#OF)",
        5 => "bound range exceeded (#BR)",
        6 => "invalid opcode (#UD)",
        7 => "device not available (#NM)",
        8 => "double fault (#DF)",
        10 => "invalid TSS (#TS)",
        11 => "segment not present (#NP)",
        12 => "stack-segment fault (#SS)",
        13 => "general protection (#GP)",
        14 => "page fault (#PF)",
        16 => "x87 floating-point (#MF)",
        17 => "alignment check (#AC)",
        18 => "machine check (#MC)",
        19 => "SIMD floating-point (#XM)",
        20 => "virtualization (#VE)",
        21 => "control protection (#CP)",
        _ => "reserved exception",
    }
}

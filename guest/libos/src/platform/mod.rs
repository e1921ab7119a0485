//! The platform the image was booted on, and the few services each
//! provides: console output, blocking wait, exit, crash report.
//!
//! * [`wisp`]: the Wisp monitor, through port-I/O hypercalls (one exit each).
//! * [`pvh`]: QEMU microvm, Firecracker or any PVH loader: COM1 for the
//!   console, isa-debug-exit then an i8042 reset for the exit, a halt at
//!   CPL0 with a timer and device interrupts for waiting.

pub mod pvh;
pub mod wisp;

use core::sync::atomic::{AtomicU32, Ordering};
use wisp_abi::boot::{PLATFORM_PVH, PLATFORM_WISP};
use wisp_abi::hypercall::CrashReport;

/// The platform; the PVH stub writes [`PLATFORM_PVH`] here with its first
/// store, so even a fault in the earliest start code is reported on the
/// right console.
#[no_mangle]
static WISP_PLATFORM: AtomicU32 = AtomicU32::new(PLATFORM_WISP);

pub(crate) fn set(platform: u32) {
    WISP_PLATFORM.store(platform, Ordering::Relaxed);
}

/// Whether the image was booted through PVH (QEMU) rather than by the
/// Wisp monitor.
pub fn is_pvh() -> bool {
    WISP_PLATFORM.load(Ordering::Relaxed) == PLATFORM_PVH
}

/// Writes bytes to the console, unbuffered (see [`crate::console`] for the
/// line-buffered writer applications use).
pub fn console_write(bytes: &[u8]) {
    if is_pvh() {
        pvh::console_write(bytes)
    } else {
        wisp::console_write(bytes)
    }
}

/// Whether a device's activity ends a [`wait`] early, so an executor with
/// I/O may block until its next timer (else it must come back to poll).
pub fn wakes_on_io() -> bool {
    !is_pvh() || pvh::wakes_on_io()
}

/// Blocks the vCPU for at most `timeout_ns` (returns early on an event).
pub fn wait(timeout_ns: u64) {
    if is_pvh() {
        pvh::wait(timeout_ns)
    } else {
        wisp::wait(timeout_ns)
    }
}

/// Ends the guest with `status`, after flushing the console.
pub fn exit(status: u8) -> ! {
    crate::console::flush();
    if is_pvh() {
        pvh::exit(status)
    } else {
        wisp::exit(status)
    }
}

/// Reports a CPU exception and ends the guest with the crash status.
pub fn crash(report: &CrashReport) -> ! {
    crate::console::flush();
    if is_pvh() {
        pvh::crash(report)
    } else {
        wisp::crash(report)
    }
}

/// Boot-trace mark (only when the monitor asked for a trace).
pub fn mark(mark: u32) {
    if !is_pvh() {
        wisp::mark(mark)
    }
}

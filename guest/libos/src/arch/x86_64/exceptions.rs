//! CPU exceptions: every vector goes to a CPL3 handler on the IST stack
//! (DPL3 trap gates, built by the monitor or the PVH stub), which turns the
//! CPU state into a [`CrashReport`] and ends the guest with
//! [`wisp_abi::exit::CRASH`]. It never returns into the faulting code, so a
//! guest never spins on a fault and never triple-faults silently.

use core::sync::atomic::{AtomicBool, Ordering};
use wisp_abi::hypercall::CrashReport;

/// The stack as `wisp_exc_common` leaves it: general registers (last pushed
/// first), the vector and error code pushed by the stub, then the frame the
/// CPU pushed.
#[repr(C)]
pub struct ExceptionFrame {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rbp: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rbx: u64,
    rax: u64,
    vector: u64,
    error_code: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

impl ExceptionFrame {
    fn report(&self) -> CrashReport {
        CrashReport {
            vector: self.vector,
            error_code: self.error_code,
            rip: self.rip,
            cs: self.cs,
            rflags: self.rflags,
            rsp: self.rsp,
            ss: self.ss,
            gprs: [
                self.rax, self.rbx, self.rcx, self.rdx, self.rsi, self.rdi, self.rbp, self.r8,
                self.r9, self.r10, self.r11, self.r12, self.r13, self.r14, self.r15,
            ],
        }
    }
}

/// Set once the first exception is being handled: a fault inside the
/// handler then exits at once instead of recursing.
static IN_HANDLER: AtomicBool = AtomicBool::new(false);

/// Called by `wisp_exc_common` with the saved state.
#[no_mangle]
extern "C" fn wisp_exception(frame: &ExceptionFrame) -> ! {
    if IN_HANDLER.swap(true, Ordering::SeqCst) {
        crate::platform::exit(wisp_abi::exit::CRASH);
    }
    crate::platform::crash(&frame.report())
}

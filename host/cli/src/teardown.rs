//! Exiting without waiting for the VM's teardown.
//!
//! Destroying a KVM VM and unmapping its memory costs 0.4–0.9 ms on KVM PVM
//! (pvm-costs.md), and the kernel does it inside `exit()`, before whoever
//! waits for `wisp run` learns that the guest is done. Once the guest's
//! result is final and every byte of output is flushed, `wisp run` hands
//! its address space and file table to a child created with
//! `CLONE_VM | CLONE_FILES`, and exits at once. The child closes stdin,
//! stdout and stderr (so readers see end-of-file immediately) and exits,
//! dropping the last reference to the VM and its memory: the teardown
//! happens off the caller's critical path, and the resources are still
//! released within about a millisecond.

use std::process::ExitCode;

const CHILD_STACK: usize = 16 * 1024;

extern "C" fn release(_: *mut libc::c_void) -> libc::c_int {
    // SAFETY: closing the standard descriptors in the shared table; the
    // parent has flushed and is exiting, nothing else uses them.
    unsafe {
        libc::close(0);
        libc::close(1);
        libc::close(2);
    }
    0
}

/// Exits with `status`, leaving the VM's teardown to a short-lived child.
/// Falls back to a normal exit if the child cannot be created.
pub fn exit_now(status: u8) -> ExitCode {
    // SAFETY: a private anonymous mapping for the child's stack; checked
    // for failure below. It is intentionally never unmapped: it belongs to
    // the address space the child tears down.
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            CHILD_STACK,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        return ExitCode::from(status);
    }
    // SAFETY: the stack is CHILD_STACK bytes we own; the child function only
    // makes async-signal-safe syscalls and returns, ending the child with
    // `_exit`. No signal is requested on its exit: nobody waits for it.
    let pid = unsafe {
        libc::clone(
            release,
            stack.cast::<u8>().add(CHILD_STACK).cast(),
            libc::CLONE_VM | libc::CLONE_FILES,
            std::ptr::null_mut(),
        )
    };
    if pid <= 0 {
        return ExitCode::from(status);
    }
    // SAFETY: ends this process now; every output stream was flushed by the
    // caller and nothing else needs to run.
    unsafe { libc::_exit(status as libc::c_int) }
}

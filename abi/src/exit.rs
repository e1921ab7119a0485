//! Exit statuses with a fixed meaning, shared by the guest runtime, the
//! monitor and the CLI. Any other status is the application's own.

/// The application panicked (as a Rust process does).
pub const PANIC: u8 = 101;
/// The monitor stopped the guest because `--timeout` expired (as `timeout(1)`).
pub const TIMEOUT: u8 = 124;
/// The monitor could not run the guest: bad image, bad flags, KVM error
/// (as `docker run`).
pub const MONITOR_ERROR: u8 = 125;
/// The guest took a CPU exception, triple-faulted or broke the hypercall
/// protocol (128 + SIGSEGV, as a shell reports a crashed process).
pub const CRASH: u8 = 139;

//! # Wisp library OS
//!
//! Links with one application into a bootable unikernel image whose Rust
//! code runs at CPL3 in one identity-mapped address space (see docs/design.md).
//! The same image boots on the Wisp monitor (64-bit entry, boot page,
//! hypercalls) and on QEMU microvm through its PVH entry.
//!
//! Components, each a module with one job:
//! * [`boot`]: the boot page and the application's arguments;
//! * [`mem`]: the heap (talc) over the boot page's free memory, and the
//!   `mem*` symbols the precompiled `core` needs;
//! * [`time`]: monotonic clock from the TSC, wall clock, blocking sleep;
//! * [`console`]: line-buffered output, [`print!`] and [`println!`];
//! * [`exec`]: a single-threaded async executor with timers;
//! * [`shutdown`]: the monitor's request to stop, and what the guest does;
//! * panic and CPU-exception reports (`panic`, `arch::x86_64::exceptions`).
//!
//! An application is a `#![no_std] #![no_main]` binary crate that calls
//! [`main!`] and is built with `wisp build`.
#![no_std]

extern crate alloc;

pub mod arch;
pub mod boot;
pub mod cmdline;
pub mod console;
pub mod exec;
mod manifest;
pub mod mem;
mod panic;
pub mod platform;
pub mod shutdown;
pub mod time;

pub use boot::Args;

/// Records a component's name in the image's `.wisp.libs` section, for
/// `wisp inspect`. The name is kept only if the component's code is:
/// [`library_linked`] must be called from the component's entry points, so
/// an application that never uses a component carries neither its code nor
/// its name (micro-libraries, as in Unikraft).
#[macro_export]
#[doc(hidden)]
macro_rules! library {
    ($name:literal) => {
        #[link_section = ".wisp.libs"]
        pub(crate) static LIB_NAME: [u8; $name.len() + 1] = {
            let mut b = [0u8; $name.len() + 1];
            let s = $name.as_bytes();
            let mut i = 0;
            while i < s.len() {
                b[i] = s[i];
                i += 1;
            }
            b
        };
    };
}

/// Keeps a component's [`library!`] name alive (see there).
#[inline(always)]
pub fn library_linked(name: &'static [u8]) {
    core::hint::black_box(name);
}

use wisp_abi::boot::{BootPage, FLAG_TRACE_BOOT};

/// What an application's `main` may return: its exit status.
pub trait Termination {
    fn report(self) -> i32;
}

impl Termination for () {
    fn report(self) -> i32 {
        0
    }
}

impl Termination for i32 {
    fn report(self) -> i32 {
        self
    }
}

impl Termination for u8 {
    fn report(self) -> i32 {
        self as i32
    }
}

impl<E: core::fmt::Debug> Termination for Result<(), E> {
    fn report(self) -> i32 {
        match self {
            Ok(()) => 0,
            Err(e) => {
                println!("Error: {e:?}");
                1
            }
        }
    }
}

/// Declares the application's entry point: `fn main(args: wisp::Args) -> T`
/// where `T` is `()`, `i32`, `u8` or `Result<(), E>`.
///
/// ```ignore
/// #![no_std]
/// #![no_main]
/// wisp::main!(main);
/// fn main(args: wisp::Args) -> i32 { wisp::println!("hi"); 0 }
/// ```
#[macro_export]
macro_rules! main {
    ($main:path) => {
        #[no_mangle]
        fn __wisp_main(args: $crate::Args) -> i32 {
            $crate::Termination::report($main(args))
        }
    };
}

extern "Rust" {
    /// Defined by the application through [`main!`].
    fn __wisp_main(args: Args) -> i32;
}

/// Common start once a platform has a boot page: initialise the components
/// and run the application.
pub(crate) fn start(boot: &'static BootPage) -> ! {
    library_linked(&manifest::LIB_NAME);
    boot::init(boot);
    mem::init(boot);
    time::init(boot);
    if boot.flags & FLAG_TRACE_BOOT != 0 {
        platform::mark(wisp_abi::hypercall::MARK_MAIN);
    }
    // SAFETY: `__wisp_main` is defined by `main!` with exactly this signature.
    let status = unsafe { __wisp_main(Args::from_boot(boot)) };
    platform::exit(status as u8)
}

/// 64-bit entry from the Wisp monitor (via `wisp_entry64`).
#[no_mangle]
extern "C" fn wisp_start_wisp(boot: *const BootPage) -> ! {
    platform::set(wisp_abi::boot::PLATFORM_WISP);
    let addr = boot as usize;
    if addr < 4096 || !addr.is_multiple_of(core::mem::align_of::<BootPage>()) {
        platform::console_write(b"wisp: no boot page\n");
        platform::exit(wisp_abi::exit::CRASH);
    }
    // SAFETY: the monitor maps the boot page read-only for the guest's whole
    // life; the address was checked for null and alignment.
    let boot: &'static BootPage = unsafe { &*boot };
    if boot.magic != wisp_abi::boot::MAGIC || boot.abi_version != wisp_abi::ABI_VERSION {
        platform::console_write(b"wisp: boot page magic or ABI version mismatch\n");
        platform::exit(wisp_abi::exit::CRASH);
    }
    start(boot)
}

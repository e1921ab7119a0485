//! The boot page, and the application's arguments taken from it.

use core::sync::atomic::{AtomicPtr, Ordering};
use wisp_abi::boot::BootPage;

static BOOT: AtomicPtr<BootPage> = AtomicPtr::new(core::ptr::null_mut());

pub(crate) fn init(boot: &'static BootPage) {
    BOOT.store(boot as *const BootPage as *mut BootPage, Ordering::Release);
}

/// The boot page the guest was started with.
pub fn boot_page() -> &'static BootPage {
    let p = BOOT.load(Ordering::Acquire);
    assert!(!p.is_null(), "boot page used before boot");
    // SAFETY: set once from a `&'static BootPage` in `init`.
    unsafe { &*p }
}

/// The arguments given after `--` on the `wisp run` command line (or on the
/// kernel command line under QEMU), as an iterator of `&'static str`.
/// Arguments that are not UTF-8 are yielded as `"\u{FFFD}"`.
#[derive(Clone, Debug)]
pub struct Args {
    rest: &'static [u8],
    remaining: u32,
}

impl Args {
    pub(crate) fn from_boot(boot: &'static BootPage) -> Args {
        if boot.args_addr == 0 || boot.args_len == 0 {
            return Args {
                rest: &[],
                remaining: 0,
            };
        }
        // SAFETY: the monitor (or the PVH start code) placed `args_len` bytes
        // of arguments at `args_addr` in memory that stays mapped and
        // unchanged for the guest's life.
        let rest = unsafe {
            core::slice::from_raw_parts(
                boot.args_addr as usize as *const u8,
                boot.args_len as usize,
            )
        };
        Args {
            rest,
            remaining: boot.argc,
        }
    }
}

impl Iterator for Args {
    type Item = &'static str;

    fn next(&mut self) -> Option<&'static str> {
        if self.remaining == 0 || self.rest.is_empty() {
            return None;
        }
        self.remaining -= 1;
        let end = self
            .rest
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.rest.len());
        let (arg, rest) = self.rest.split_at(end);
        self.rest = rest.get(1..).unwrap_or(&[]);
        Some(core::str::from_utf8(arg).unwrap_or("\u{FFFD}"))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.remaining as usize))
    }
}

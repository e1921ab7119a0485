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

/// The boot page, or `None` before [`init`] (no panic: callers on every
/// executor turn must not assert).
pub(crate) fn boot_page_ptr() -> Option<*const BootPage> {
    let p = BOOT.load(Ordering::Acquire);
    (!p.is_null()).then_some(p as *const BootPage)
}

/// What the monitor says about this guest's history, re-read at every call
/// (it changes when the guest is restored from a snapshot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Times this guest was restored (0 after a cold boot).
    pub restore_count: u32,
    /// Which clone of its snapshot this is (0: not a clone).
    pub clone_id: u32,
    /// Fresh random bits from the monitor at boot and at each restore: a
    /// guest that sees `restore_count` change should reseed from them.
    pub seed: u64,
}

/// This guest's [`Identity`] now.
pub fn identity() -> Identity {
    let p = boot_page() as *const BootPage;
    // SAFETY: the boot page stays mapped for the guest's life; the monitor
    // rewrites these fields only while the guest is not running, and
    // volatile loads are never cached across a restore.
    unsafe {
        Identity {
            restore_count: core::ptr::read_volatile(core::ptr::addr_of!((*p).restore_count)),
            clone_id: core::ptr::read_volatile(core::ptr::addr_of!((*p).clone_id)),
            seed: core::ptr::read_volatile(core::ptr::addr_of!((*p).seed)),
        }
    }
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

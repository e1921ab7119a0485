//! Memory: the global heap over the boot page's free regions, and the
//! memory primitives the precompiled `core` links against.
//!
//! The heap is talc (a well-kept `no_std` allocator). The guest is
//! single-threaded with no asynchronous interrupts, so the lock is never
//! contended; it only guards against re-entry.

use talc::source::Manual;
use talc::TalcLock;
use wisp_abi::boot::BootPage;

#[global_allocator]
static HEAP: TalcLock<spinning_top::RawSpinlock, Manual> = TalcLock::new(Manual);

/// Bytes handed to the heap at boot.
static HEAP_BYTES: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

crate::library!("mem");

pub(crate) fn init(boot: &BootPage) {
    crate::library_linked(&LIB_NAME);
    let mut heap = HEAP.lock();
    for r in boot.regions() {
        // SAFETY: the boot page lists only free RAM that is mapped RW for the
        // guest and used by nothing else (not the image, stacks or boot
        // structures); each region is handed to the heap once.
        if unsafe { heap.claim(r.start as usize as *mut u8, r.len as usize) }.is_some() {
            HEAP_BYTES.fetch_add(r.len as usize, core::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Total bytes of memory the heap was given at boot.
pub fn heap_size() -> usize {
    HEAP_BYTES.load(core::sync::atomic::Ordering::Relaxed)
}

/// The `mem*` functions `core` calls. Written with string instructions in
/// inline assembly so LLVM cannot recognise them as idioms and turn them back
/// into calls to themselves.
mod builtins {
    use core::arch::asm;

    /// # Safety
    /// As C `memcpy`: `src` and `dst` valid for `n` bytes, not overlapping.
    #[no_mangle]
    pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
        // SAFETY: the caller guarantees both ranges; `rep movsb` copies
        // exactly `n` bytes forward (DF is clear per the ABI).
        unsafe {
            asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack, preserves_flags));
        }
        dst
    }

    /// # Safety
    /// As C `memmove`: both ranges valid for `n` bytes; they may overlap.
    #[no_mangle]
    pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
        if (dst as usize).wrapping_sub(src as usize) >= n {
            // SAFETY: forward copy is correct when dst is not inside
            // (src, src + n); the caller guarantees validity.
            unsafe { memcpy(dst, src, n) }
        } else {
            // SAFETY: copy backwards from the last byte with DF set, then
            // restore DF; the ranges are valid per the caller.
            unsafe {
                asm!(
                    "std",
                    "rep movsb",
                    "cld",
                    inout("rcx") n => _,
                    inout("rdi") dst.add(n - 1) => _,
                    inout("rsi") src.add(n - 1) => _,
                    options(nostack)
                );
            }
            dst
        }
    }

    /// # Safety
    /// As C `memset`: `dst` valid for `n` bytes.
    #[no_mangle]
    pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
        // SAFETY: the caller guarantees the range; `rep stosb` writes `n`
        // bytes of `al` forward.
        unsafe {
            asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8, options(nostack, preserves_flags));
        }
        dst
    }

    /// # Safety
    /// As C `memcmp`: both ranges valid for `n` bytes.
    #[no_mangle]
    pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
        let mut i = 0;
        while i < n {
            // SAFETY: `i < n` and the caller guarantees `n` readable bytes.
            let (x, y) = unsafe {
                (
                    core::ptr::read_volatile(a.add(i)),
                    core::ptr::read_volatile(b.add(i)),
                )
            };
            if x != y {
                return x as i32 - y as i32;
            }
            i += 1;
        }
        0
    }

    /// # Safety
    /// As C `bcmp`: both ranges valid for `n` bytes.
    #[no_mangle]
    pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
        // SAFETY: same contract as memcmp.
        unsafe { memcmp(a, b, n) }
    }

    /// The precompiled `core` references the unwinder; with `panic = "abort"`
    /// nothing ever unwinds, so these are never called.
    #[no_mangle]
    pub extern "C" fn rust_eh_personality() {}

    #[no_mangle]
    pub extern "C" fn _Unwind_Resume() -> ! {
        crate::platform::exit(wisp_abi::exit::CRASH)
    }
}

//! Memory a started monitor gives back before it settles down to wait.
//!
//! An idle guest's monitor lives for a long time doing almost nothing, and
//! a host runs thousands of them: what its start-up touched and no longer
//! needs is memory the host pays for each of them. Two parts are freed,
//! both safe to touch again (the kernel maps zero pages back on demand):
//! the malloc heap's free pages (the image's bytes, parse and set-up
//! buffers), and the main thread's stack below where it now runs (start-up
//! frames that went deeper than the wait loop ever will).

/// What a thread's stack may still use below the caller's frame: the
/// `madvise` call's own frames and a signal handler's.
const STACK_MARGIN: usize = 16 << 10;

/// Frees what start-up left behind on this (main) thread; call before the
/// seccomp filter (glibc's `pthread_getattr_np` reads `/proc/self/maps`
/// for the main thread).
pub fn after_start() {
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe { libc::malloc_trim(0) };
    let here = 0u8;
    let sp = std::ptr::addr_of!(here) as usize;
    if let Some((lo, _)) = stack_of_this_thread() {
        let page = 4096;
        let hi = sp.saturating_sub(STACK_MARGIN) & !(page - 1);
        let lo = (lo + page - 1) & !(page - 1);
        if hi > lo {
            // SAFETY: the range lies in this thread's stack, below every
            // live frame (the current one, minus a margin for the calls made
            // from here): nothing there is in use, and a later touch gets a
            // zero page. Parts of the range not mapped yet are skipped
            // (madvise then reports ENOMEM, which is harmless here).
            unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_DONTNEED) };
        }
    }
}

/// (lowest address, size) of the calling thread's stack.
fn stack_of_this_thread() -> Option<(usize, usize)> {
    // SAFETY: `attr` is initialised by pthread_getattr_np before it is read
    // and destroyed after; the out-pointers are valid locals.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
            return None;
        }
        let mut addr: *mut libc::c_void = std::ptr::null_mut();
        let mut size: libc::size_t = 0;
        let rc = libc::pthread_attr_getstack(&attr, &mut addr, &mut size);
        libc::pthread_attr_destroy(&mut attr);
        (rc == 0).then_some((addr as usize, size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident pages in [lo, hi).
    fn resident(lo: usize, hi: usize) -> usize {
        let n = (hi - lo) / 4096;
        let mut v = vec![0u8; n];
        // SAFETY: `v` has one byte per page of the range, which is mapped
        // (this thread's stack).
        let rc = unsafe { libc::mincore(lo as *mut libc::c_void, hi - lo, v.as_mut_ptr()) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        v.iter().filter(|&&b| b & 1 != 0).count()
    }

    #[inline(never)]
    fn deep(n: usize) -> u8 {
        let buf = [n as u8; 8192];
        if n == 0 {
            buf[100]
        } else {
            deep(n - 1).wrapping_add(std::hint::black_box(&buf)[7])
        }
    }

    #[test]
    fn the_stack_below_and_the_heap_are_given_back_and_still_usable() {
        std::thread::Builder::new()
            .stack_size(1 << 20)
            .spawn(|| {
                let v = deep(40);
                let (lo, _) = stack_of_this_thread().unwrap();
                let here = 0u8;
                let top = (std::ptr::addr_of!(here) as usize - 2 * STACK_MARGIN) & !4095;
                let lo = (lo + 4095) & !4095;
                assert!(resident(lo, top) > 40, "the deep calls touched the stack");
                after_start();
                assert_eq!(resident(lo, top), 0, "the stack below was given back");
                // The freed stack is used again: zero pages come back.
                assert_eq!(deep(40), v);
                let x = vec![7u8; 1 << 20];
                drop(x);
                after_start();
                assert_eq!(vec![1u8; 4096].iter().map(|&b| b as u32).sum::<u32>(), 4096);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}

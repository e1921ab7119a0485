//! Shutdown requests: how a guest learns that it is asked to stop
//! (`wisp stop`, SIGTERM or Ctrl-C to `wisp run`), and what happens then.
//!
//! The monitor posts the request in the boot page's `shutdown` word (see
//! [`wisp_abi::boot::BootPage::shutdown`] for why a word and not a
//! hypercall): the executor reads it once per turn and after each wait,
//! [`crate::time::sleep`] after each wait, and a guest blocked in its wait
//! is woken by the monitor to look. No exit is spent on it.
//!
//! * An application that has something to finish (a log to flush,
//!   connections to close) awaits [`requested`] and then ends as it likes
//!   (returning from `main` gives its status). From its first call to
//!   [`requested`] on, the library OS leaves the stop to it.
//! * An application that never calls [`requested`] is ended by the library
//!   OS as soon as the request is seen, with exit status **0**: it was asked
//!   to stop and it did, as a service manager counts a clean exit on SIGTERM.
//!   (Such an application keeps nothing the library OS could flush for it.)
//! * A guest that does not look (a loop that never waits nor returns to the
//!   executor), or that looks and carries on, is stopped by force when the
//!   stop's timeout expires; the toolstack records that it was forced.
//!
//! Under PVH (QEMU, Firecracker) there is no request: [`is_requested`] stays
//! `false` and a stop is the hypervisor's.

use alloc::vec::Vec;
use core::cell::RefCell;
use core::future::Future;
use core::pin::Pin;
use core::sync::atomic::{AtomicBool, Ordering};
use core::task::{Context, Poll, Waker};

use wisp_abi::boot::{BootPage, FLAG_SHUTDOWN_NOTICE, SHUTDOWN_NONE};

/// Set by the first [`requested`]: the application handles the stop.
static HANDLED: AtomicBool = AtomicBool::new(false);

/// Tasks waiting in [`Requested`].
struct Waiters(RefCell<Vec<Waker>>);
// SAFETY: the guest is single-threaded and exception handlers never touch
// this, so there is never concurrent access.
unsafe impl Sync for Waiters {}
static WAITERS: Waiters = Waiters(RefCell::new(Vec::new()));

/// The boot page, if this platform can post a request in it.
fn notice_page() -> Option<*const BootPage> {
    if crate::platform::is_pvh() {
        return None;
    }
    let page = crate::boot::boot_page_ptr()?;
    // SAFETY: the boot page stays mapped read-only for the guest's life;
    // `flags` is written before the guest starts.
    let flags = unsafe { (*page).flags };
    (flags & FLAG_SHUTDOWN_NOTICE != 0).then_some(page)
}

/// Whether the monitor has asked this guest to stop.
pub fn is_requested() -> bool {
    let Some(page) = notice_page() else {
        return false;
    };
    // SAFETY: an aligned u32 field of the mapped boot page; the monitor
    // stores it while the guest runs, so it is read with a volatile load
    // (never cached across the executor's turns).
    let word = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*page).shutdown)) };
    word != SHUTDOWN_NONE
}

/// Completes when the guest is asked to stop. Calling it says that the
/// application handles the stop itself (see the module documentation).
///
/// ```ignore
/// wisp::exec::spawn(async move {
///     wisp::shutdown::requested().await;
///     flush_everything();
///     wisp::platform::exit(0);
/// });
/// ```
pub fn requested() -> Requested {
    HANDLED.store(true, Ordering::Relaxed);
    Requested { _private: () }
}

/// The future of [`requested`].
pub struct Requested {
    _private: (),
}

impl Future for Requested {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if is_requested() {
            return Poll::Ready(());
        }
        let mut w = WAITERS.0.borrow_mut();
        if !w.iter().any(|x| x.will_wake(cx.waker())) {
            w.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// Whether a task waits for a request: the executor may then block with
/// nothing else pending (the monitor wakes it to deliver the request).
pub(crate) fn has_waiters() -> bool {
    notice_page().is_some() && !WAITERS.0.borrow().is_empty()
}

/// Acts on a request, if there is one: wakes the tasks that wait for it,
/// or, if the application never asked, ends the guest with status 0.
/// Called by the executor every turn and by blocking sleeps after each
/// wait.
pub(crate) fn check() {
    if !is_requested() {
        return;
    }
    if !HANDLED.load(Ordering::Relaxed) {
        crate::platform::exit(0);
    }
    let waiters = core::mem::take(&mut *WAITERS.0.borrow_mut());
    for w in waiters {
        w.wake();
    }
}

//! Waking the housekeeping task: a one-slot notification, a wait that
//! ends on it or on a deadline, and a yield.

use core::cell::{Cell, RefCell};
use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll, Waker};

use wisp::exec::Sleep;

/// Set by serving tasks when the data changed; taken by the waiter.
#[derive(Default)]
pub struct Notify {
    set: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Notify {
    pub fn notify(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Completes when notified (since the last wait) or when `sleep`, if
    /// any, completes.
    pub fn wait(&self, sleep: Option<Sleep>) -> Wait<'_> {
        Wait {
            notify: self,
            sleep,
        }
    }
}

pub struct Wait<'a> {
    notify: &'a Notify,
    sleep: Option<Sleep>,
}

impl Future for Wait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.notify.set.replace(false) {
            return Poll::Ready(());
        }
        *self.notify.waker.borrow_mut() = Some(cx.waker().clone());
        match self.sleep.as_mut() {
            Some(s) => Pin::new(s).poll(cx),
            None => Poll::Pending,
        }
    }
}

/// Lets every other ready task, and the network, run first.
pub async fn yield_now() {
    let mut yielded = false;
    core::future::poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

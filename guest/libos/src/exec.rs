//! A single-threaded async executor with timers.
//!
//! [`block_on`] runs a future (and everything [`spawn`]ed) to completion.
//! When no task is ready it blocks the vCPU until the nearest timer deadline
//! (one wait exit on the Wisp monitor), so an idle guest costs no CPU.
//! Device drivers will add their event sources to the same wait.
//!
//! The guest has one vCPU and no asynchronous interrupts, so the executor's
//! state lives in a cell that only this thread ever touches.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::rc::Rc;
use alloc::sync::Arc;
use alloc::task::Wake;
use core::cell::{Cell, RefCell};
use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll, Waker};
use core::time::Duration;

use crate::time::Instant;

crate::library!("exec");

type TaskId = u64;
type BoxFuture = Pin<Box<dyn Future<Output = ()>>>;

/// Executor state. Only reachable through [`with`].
struct Executor {
    next_id: TaskId,
    tasks: BTreeMap<TaskId, BoxFuture>,
    /// Timers ordered by (deadline, sequence).
    timers: BTreeMap<(u64, u64), Waker>,
    next_timer: u64,
}

/// Tasks woken and not yet polled (the main future is [`MAIN_TASK`]).
struct ReadyQueue(RefCell<VecDeque<TaskId>>);

/// The executor and the ready queue, in a cell for the one guest thread.
struct Global<T>(RefCell<Option<T>>);
// SAFETY: the guest is single-threaded and exception handlers never touch
// the executor, so there is never concurrent access.
unsafe impl<T> Sync for Global<T> {}
// SAFETY: as above.
unsafe impl Sync for ReadyQueue {}

static EXEC: Global<Executor> = Global(RefCell::new(None));
static READY: ReadyQueue = ReadyQueue(RefCell::new(VecDeque::new()));

const MAIN_TASK: TaskId = 0;

/// An I/O source the executor polls on every turn (a network stack): it
/// moves packets, wakes the tasks they concern, and returns when it next
/// needs polling (monotonic ns), if ever.
pub type IoPoller = fn() -> Option<u64>;

struct PollerSlot(Cell<Option<IoPoller>>);
// SAFETY: single-threaded guest (see `Global`).
unsafe impl Sync for PollerSlot {}
static POLLER: PollerSlot = PollerSlot(Cell::new(None));

/// Registers the I/O poller (one per image: the network stack).
pub fn set_io_poller(poller: IoPoller) {
    POLLER.0.set(Some(poller));
}

/// Longest wait of an executor whose only pending event is a stop request
/// (the monitor ends the wait early when it posts one).
const STOP_WAIT_NS: u64 = 3_600_000_000_000;

/// Longest a guest blocks with an I/O poller but nothing to wake it (a PVH
/// platform without device interrupts): the executor must come back to poll.
const PVH_IO_POLL_NS: u64 = 50_000;

fn with<R>(f: impl FnOnce(&mut Executor) -> R) -> R {
    let mut guard = EXEC.0.borrow_mut();
    let exec = guard.get_or_insert_with(|| Executor {
        next_id: MAIN_TASK + 1,
        tasks: BTreeMap::new(),
        timers: BTreeMap::new(),
        next_timer: 0,
    });
    f(exec)
}

struct TaskWaker {
    id: TaskId,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let mut q = READY.0.borrow_mut();
        if !q.contains(&self.id) {
            q.push_back(self.id);
        }
    }
}

/// Spawns a task onto the executor; it runs while [`block_on`] runs.
pub fn spawn<F>(future: F) -> JoinHandle<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    let slot = Rc::new(JoinSlot {
        value: RefCell::new(None),
        waiter: Cell::new(None),
    });
    let producer = slot.clone();
    let task = async move {
        let v = future.await;
        *producer.value.borrow_mut() = Some(v);
        if let Some(w) = producer.waiter.take() {
            w.wake();
        }
    };
    let id = with(|e| {
        let id = e.next_id;
        e.next_id += 1;
        e.tasks.insert(id, Box::pin(task));
        id
    });
    READY.0.borrow_mut().push_back(id);
    JoinHandle { slot }
}

struct JoinSlot<T> {
    value: RefCell<Option<T>>,
    waiter: Cell<Option<Waker>>,
}

/// Awaits the output of a spawned task. Dropping it detaches the task.
pub struct JoinHandle<T> {
    slot: Rc<JoinSlot<T>>,
}

impl<T> Future for JoinHandle<T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match self.slot.value.borrow_mut().take() {
            Some(v) => Poll::Ready(v),
            None => {
                self.slot.waiter.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        }
    }
}

/// Completes at `deadline`.
pub struct Sleep {
    deadline: Instant,
    key: Option<(u64, u64)>,
}

/// Sleeps for `d` without blocking other tasks.
pub fn sleep(d: Duration) -> Sleep {
    sleep_until(Instant::now().saturating_add(d))
}

/// Sleeps until `deadline`.
pub fn sleep_until(deadline: Instant) -> Sleep {
    Sleep {
        deadline,
        key: None,
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline {
            if let Some(k) = self.key.take() {
                with(|e| e.timers.remove(&k));
            }
            return Poll::Ready(());
        }
        let deadline = self.deadline.as_nanos();
        let old = self.key;
        let key = with(|e| {
            if let Some(k) = old {
                e.timers.remove(&k);
            }
            let k = (deadline, e.next_timer);
            e.next_timer += 1;
            e.timers.insert(k, cx.waker().clone());
            k
        });
        self.key = Some(key);
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            with(|e| e.timers.remove(&k));
        }
    }
}

/// Wakes every timer whose deadline has passed; returns the next deadline.
fn fire_timers() -> Option<u64> {
    let now = Instant::now().as_nanos();
    let mut due = alloc::vec::Vec::new();
    let next = with(|e| {
        while let Some(entry) = e.timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            due.push(entry.remove());
        }
        e.timers.keys().next().map(|k| k.0)
    });
    for w in due {
        w.wake();
    }
    next
}

/// How long an idle executor keeps polling its I/O before it waits in the
/// monitor. Short, because on a host with few cores the vCPU may share
/// one with the monitor's I/O thread, which cannot fill the rings while
/// the guest spins on that core.
const IDLE_SPIN_NS: u64 = 30_000;

/// Polls the I/O source until a task is woken (`true`) or `ns` pass.
fn spin_for_io(poll: IoPoller, ns: u64) -> bool {
    let until = Instant::now().as_nanos().saturating_add(ns);
    loop {
        poll();
        if !READY.0.borrow().is_empty() {
            return true;
        }
        if Instant::now().as_nanos() >= until {
            return false;
        }
        core::hint::spin_loop();
    }
}

/// Runs `future` to completion on this vCPU, together with spawned tasks.
pub fn block_on<F: Future>(future: F) -> F::Output {
    crate::library_linked(&LIB_NAME);
    let mut future = core::pin::pin!(future);
    let main_waker = Waker::from(Arc::new(TaskWaker { id: MAIN_TASK }));
    let wakers: RefCell<BTreeMap<TaskId, Waker>> = RefCell::new(BTreeMap::new());
    READY.0.borrow_mut().push_back(MAIN_TASK);
    loop {
        let batch: VecDeque<TaskId> = core::mem::take(&mut *READY.0.borrow_mut());
        for id in batch {
            if id == MAIN_TASK {
                if let Poll::Ready(v) = future.as_mut().poll(&mut Context::from_waker(&main_waker))
                {
                    return v;
                }
                continue;
            }
            let Some(mut task) = with(|e| e.tasks.remove(&id)) else {
                continue;
            };
            let waker = wakers
                .borrow_mut()
                .entry(id)
                .or_insert_with(|| Waker::from(Arc::new(TaskWaker { id })))
                .clone();
            if task
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
            {
                with(|e| e.tasks.insert(id, task));
            } else {
                wakers.borrow_mut().remove(&id);
            }
        }
        let poller = POLLER.0.get();
        let io_next = poller.and_then(|p| p());
        let next = fire_timers();
        // A stop request wakes the tasks awaiting it (or ends the guest).
        crate::shutdown::check();
        if !READY.0.borrow().is_empty() {
            continue;
        }
        let next = match (next, io_next) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let now = Instant::now().as_nanos();
        let mut timeout = match (next, poller) {
            (Some(deadline), _) => deadline.saturating_sub(now),
            // Waiting for I/O only: block until something arrives.
            (None, Some(_)) => 1_000_000_000,
            // Waiting only for a stop request: the monitor wakes the guest
            // when it posts one.
            (None, None) if crate::shutdown::has_waiters() => STOP_WAIT_NS,
            // Nothing can ever wake a task: a deadlock in the application.
            (None, None) => panic!("block_on: no task is ready and no timer is pending"),
        };
        if poller.is_some() && !crate::platform::wakes_on_io() {
            timeout = timeout.min(PVH_IO_POLL_NS);
        }
        if let Some(poll) = poller.filter(|_| !crate::platform::is_pvh()) {
            // The monitor's I/O thread fills the rings while the guest runs:
            // look again for a short while before paying for an exit (a
            // wait costs ~100 µs on KVM PVM, a look at the rings ~0.1 µs).
            if spin_for_io(poll, timeout.min(IDLE_SPIN_NS)) {
                continue;
            }
            timeout = timeout.saturating_sub(IDLE_SPIN_NS);
        }
        if timeout > 0 {
            crate::platform::wait(timeout);
        }
    }
}

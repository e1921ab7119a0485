//! The control channel of a running guest: pause, resume, stop, state and
//! counters, from any thread, for any number of guests in one process.
//!
//! A request is written into [`Shared`] first and then delivered: the vCPU
//! thread is kicked out of `KVM_RUN` by a thread-directed signal whose
//! handler sets the vCPU's `immediate_exit` (so a kick that lands just
//! before `KVM_RUN` is not lost), and both threads are woken from any
//! blocking wait through their eventfds. The vCPU thread re-enters
//! `KVM_RUN` once with `immediate_exit` set before it reports itself
//! paused, so a pending port-I/O exit is completed and the vCPU's state is
//! consistent (what a snapshot needs).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, Once};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

/// What the controller asks of the guest's threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Run,
    Pause,
    Stop(StopReason),
}

/// Why a guest was stopped from outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// `stop()` (a user or the toolstack).
    Requested,
    /// The run's `--timeout` expired.
    Timeout,
}

/// The state of a guest as the controller sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    Running,
    Paused,
    /// The guest has ended (exited, crashed or was stopped).
    Ended,
}

/// Where each of a guest's threads is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ThreadState {
    Running,
    Paused,
    Ended,
}

/// Work for a paused vCPU thread (the only thread that uses its `VcpuFd`
/// while the guest lives): reading the vCPU's and the devices' state for a
/// snapshot.
pub(crate) type VcpuJob =
    Box<dyn FnOnce(&mut crate::vm::Machine, &crate::device_manager::MmioBus) + Send>;

pub(crate) struct ControlState {
    pub request: Request,
    /// A job for the paused vCPU thread ([`Controller::on_paused_vcpu`]).
    pub job: Option<VcpuJob>,
    pub vcpu: ThreadState,
    /// `None` when the guest has no I/O thread (no NIC).
    pub io: Option<ThreadState>,
}

/// Counters of one guest, readable while it runs.
#[derive(Debug, Default)]
pub struct Counters {
    /// Exits from `KVM_RUN` to this process (each 80-110 µs on KVM PVM).
    pub exits: AtomicU64,
    /// Of those, wait hypercalls (the guest had nothing to do)...
    pub waits: AtomicU64,
    /// ...and of those, the ones that blocked (nothing was delivered since
    /// the guest last looked).
    pub blocked_waits: AtomicU64,
    /// Times the I/O thread signalled a waiting guest.
    pub wakeups: AtomicU64,
    /// The guest's queue notifications (ioeventfd writes: each is a VM exit
    /// handled in the host kernel, ~28 µs on KVM PVM, not counted in
    /// `exits`).
    pub kicks: AtomicU64,
    /// Times `KVM_RUN` was interrupted by a signal aimed at this guest's
    /// vCPU thread (control requests, the CPU quota).
    pub interruptions: AtomicU64,
    /// Times the I/O thread went to sleep in epoll.
    pub io_sleeps: AtomicU64,
    /// Frames moved from / to the guest by the I/O thread.
    pub tx_frames: AtomicU64,
    pub rx_frames: AtomicU64,
    /// Bytes of those frames (Ethernet frames as the guest sent or received
    /// them: the virtio-net header is not counted).
    pub tx_bytes: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Data bytes the disk read into / wrote from guest memory (completed
    /// read and write requests; headers, status and flushes not counted).
    pub disk_read_bytes: AtomicU64,
    pub disk_write_bytes: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValues {
    pub exits: u64,
    pub waits: u64,
    pub blocked_waits: u64,
    pub wakeups: u64,
    pub kicks: u64,
    pub interruptions: u64,
    pub io_sleeps: u64,
    pub tx_frames: u64,
    pub rx_frames: u64,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
}

/// State shared by a guest's vCPU thread, its I/O thread and its handle.
pub(crate) struct Shared {
    pub control: Mutex<ControlState>,
    pub changed: Condvar,
    /// The I/O thread completed guest buffers since the guest last waited.
    pub events: AtomicBool,
    /// The vCPU thread is blocked in the guest's wait hypercall.
    pub guest_waiting: AtomicBool,
    /// Wakes the vCPU thread from a wait: deliveries and control requests.
    pub vcpu_wake: EventFd,
    /// Wakes the I/O thread from epoll for a control request.
    pub io_wake: EventFd,
    /// Kernel thread id of the vCPU thread, once it runs (0 before).
    pub vcpu_tid: AtomicI32,
    pub counters: Counters,
    /// [`monotonic_ns`] when the guest reported reaching `main` (its MARK
    /// hypercall, sent when the boot page asks for a boot trace); 0 before.
    pub main_reached_ns: AtomicU64,
    /// [`monotonic_ns`] when the monitor handled that MARK (after its
    /// exit): `main_reached_ns` when the guest gave no usable TSC.
    pub main_exit_ns: AtomicU64,
    /// Where the guest's shutdown word is (`None`: it cannot be told).
    pub notice: Option<ShutdownNotice>,
    /// [`Controller::request_shutdown`] was called.
    pub shutdown_requested: AtomicBool,
}

/// The guest's shutdown word (`wisp_abi::boot::BootPage::shutdown`): the
/// controller stores a request there directly, from whichever thread asks,
/// while the guest runs.
pub(crate) struct ShutdownNotice {
    pub mem: vm_memory::GuestMemoryMmap,
    /// Guest-physical address of the boot page.
    pub boot_page: u64,
}

impl Shared {
    pub fn new(has_io_thread: bool, notice: Option<ShutdownNotice>) -> std::io::Result<Shared> {
        Ok(Shared {
            control: Mutex::new(ControlState {
                request: Request::Run,
                job: None,
                vcpu: ThreadState::Running,
                io: has_io_thread.then_some(ThreadState::Running),
            }),
            changed: Condvar::new(),
            events: AtomicBool::new(false),
            guest_waiting: AtomicBool::new(false),
            vcpu_wake: EventFd::new(libc::EFD_NONBLOCK)?,
            io_wake: EventFd::new(libc::EFD_NONBLOCK)?,
            vcpu_tid: AtomicI32::new(0),
            counters: Counters::default(),
            main_reached_ns: AtomicU64::new(0),
            main_exit_ns: AtomicU64::new(0),
            notice,
            shutdown_requested: AtomicBool::new(false),
        })
    }

    /// The control state; a thread that panicked while holding the lock
    /// leaves it usable (it only holds plain values).
    pub fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn request(&self) -> Request {
        self.lock().request
    }

    /// Records where a thread is and tells whoever waits for it.
    pub fn set_vcpu(&self, s: ThreadState) {
        self.lock().vcpu = s;
        self.changed.notify_all();
    }

    pub fn set_io(&self, s: ThreadState) {
        if let Some(io) = self.lock().io.as_mut() {
            *io = s;
        }
        self.changed.notify_all();
    }

    /// Blocks a paused thread until the request is no longer `Pause`.
    pub fn wait_while_paused(&self) -> Request {
        let mut g = self.lock();
        while g.request == Request::Pause {
            g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.request
    }

    /// As [`Shared::wait_while_paused`], for the vCPU thread: runs the jobs
    /// handed to it while it waits ([`Controller::on_paused_vcpu`]).
    pub fn wait_while_paused_serving(
        &self,
        machine: &mut crate::vm::Machine,
        bus: &crate::device_manager::MmioBus,
    ) -> Request {
        loop {
            let job = {
                let mut g = self.lock();
                loop {
                    if g.request != Request::Pause {
                        return g.request;
                    }
                    if let Some(j) = g.job.take() {
                        break j;
                    }
                    g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
                }
            };
            job(machine, bus);
        }
    }

    /// Tells the guest, from the I/O thread, that its rings have news; wakes
    /// it only if it is blocked in its wait (one eventfd write), never while
    /// it runs: a running guest polls its rings itself.
    pub fn signal_guest(&self) {
        self.events.store(true, Ordering::SeqCst);
        if self.guest_waiting.load(Ordering::SeqCst) {
            let _ = self.vcpu_wake.write(1);
            self.counters.wakeups.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Delivers the current request to both threads.
    fn deliver(&self) {
        let _ = self.vcpu_wake.write(1);
        let _ = self.io_wake.write(1);
        kick(self.vcpu_tid.load(Ordering::SeqCst));
    }

    pub fn values(&self) -> CounterValues {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CounterValues {
            exits: l(&c.exits),
            waits: l(&c.waits),
            blocked_waits: l(&c.blocked_waits),
            wakeups: l(&c.wakeups),
            kicks: l(&c.kicks),
            interruptions: l(&c.interruptions),
            io_sleeps: l(&c.io_sleeps),
            tx_frames: l(&c.tx_frames),
            rx_frames: l(&c.rx_frames),
            tx_bytes: l(&c.tx_bytes),
            rx_bytes: l(&c.rx_bytes),
            disk_read_bytes: l(&c.disk_read_bytes),
            disk_write_bytes: l(&c.disk_write_bytes),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the guest has already ended")]
    Ended,
    #[error("the guest did not reach the paused state within {0:?}")]
    PauseTimeout(Duration),
    #[error("the guest is not paused")]
    NotPaused,
    #[error("the guest's boot page could not take the shutdown request")]
    Notice,
}

/// Controls a running guest; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Controller {
    pub(crate) shared: std::sync::Arc<Shared>,
}

/// Longest a pause waits for the threads to acknowledge it. A vCPU thread
/// always answers a kick within microseconds; this only bounds a bug.
const PAUSE_LIMIT: Duration = Duration::from_secs(5);

impl Controller {
    /// Pauses the guest: returns once the vCPU is out of `KVM_RUN` with any
    /// pending port-I/O completed, and the I/O thread no longer touches
    /// guest memory. Host connections stay open (their bytes wait in the
    /// host kernel's buffers).
    pub fn pause(&self) -> Result<(), ControlError> {
        let s = &self.shared;
        {
            let mut g = s.lock();
            if g.vcpu == ThreadState::Ended {
                return Err(ControlError::Ended);
            }
            if matches!(g.request, Request::Stop(_)) {
                return Err(ControlError::Ended);
            }
            g.request = Request::Pause;
        }
        s.deliver();
        let g = s.lock();
        let (g, t) = s
            .changed
            .wait_timeout_while(g, PAUSE_LIMIT, |g| {
                let io_done = g.io.is_none_or(|io| io != ThreadState::Running);
                g.vcpu == ThreadState::Running || !io_done
            })
            .unwrap_or_else(|p| p.into_inner());
        if g.vcpu == ThreadState::Ended {
            return Err(ControlError::Ended);
        }
        if t.timed_out() {
            // Leave no pause behind that the threads would act on later.
            let mut g = g;
            if g.request == Request::Pause {
                g.request = Request::Run;
            }
            drop(g);
            s.changed.notify_all();
            return Err(ControlError::PauseTimeout(PAUSE_LIMIT));
        }
        Ok(())
    }

    /// Resumes a paused guest (a running guest is left as it is).
    pub fn resume(&self) -> Result<(), ControlError> {
        let s = &self.shared;
        let mut g = s.lock();
        if g.vcpu == ThreadState::Ended {
            return Err(ControlError::Ended);
        }
        if g.request != Request::Pause {
            return Ok(());
        }
        g.request = Request::Run;
        s.changed.notify_all();
        // Returns once both threads run again, so that `state()` agrees.
        let (g, _) = s
            .changed
            .wait_timeout_while(g, PAUSE_LIMIT, |g| {
                g.request == Request::Run
                    && (g.vcpu == ThreadState::Paused || g.io == Some(ThreadState::Paused))
            })
            .unwrap_or_else(|p| p.into_inner());
        if g.vcpu == ThreadState::Ended {
            return Err(ControlError::Ended);
        }
        Ok(())
    }

    /// Stops the guest at once, wherever it is (running, spinning, blocked in
    /// its wait or paused). The run's outcome then says it was stopped.
    pub fn stop(&self, reason: StopReason) {
        let s = &self.shared;
        {
            let mut g = s.lock();
            if matches!(g.request, Request::Stop(_)) {
                return;
            }
            g.request = Request::Stop(reason);
        }
        s.changed.notify_all();
        s.deliver();
    }

    /// Asks the guest to stop by itself (as SIGTERM asks a process): stores
    /// the request in its boot page's shutdown word and wakes it if it is
    /// blocked in its wait, so that it sees the request at once. Costs the
    /// guest no exit: a running guest reads the word on its executor's next
    /// turn. Returns whether the guest could be told (`false`: its boot page
    /// offers no shutdown word, e.g. an image from before it; only a
    /// [`Controller::stop`] ends such a guest). The caller decides how long
    /// to wait before forcing it with [`Controller::stop`]; a paused guest
    /// sees the request when resumed.
    pub fn request_shutdown(&self) -> Result<bool, ControlError> {
        use vm_memory::{Bytes, GuestAddress};
        let s = &self.shared;
        {
            let g = s.lock();
            if g.vcpu == ThreadState::Ended || matches!(g.request, Request::Stop(_)) {
                return Err(ControlError::Ended);
            }
        }
        let Some(n) = &s.notice else {
            return Ok(false);
        };
        // A guest whose page lacks the flag (restored from a snapshot of a
        // monitor from before the word) never looks at it.
        let flags_at = n.boot_page + core::mem::offset_of!(wisp_abi::boot::BootPage, flags) as u64;
        let flags: u32 = n
            .mem
            .load(GuestAddress(flags_at), Ordering::SeqCst)
            .map_err(|_| ControlError::Notice)?;
        if flags & wisp_abi::boot::FLAG_SHUTDOWN_NOTICE == 0 {
            return Ok(false);
        }
        s.shutdown_requested.store(true, Ordering::SeqCst);
        let at = n.boot_page + core::mem::offset_of!(wisp_abi::boot::BootPage, shutdown) as u64;
        // One aligned 4-byte store (the ABI asserts the alignment), which
        // the guest's volatile load sees whole.
        n.mem
            .store(
                wisp_abi::boot::SHUTDOWN_STOP,
                GuestAddress(at),
                Ordering::SeqCst,
            )
            .map_err(|_| ControlError::Notice)?;
        // As a delivery: a guest about to wait does not block, one blocked
        // returns (the eventfd stays readable until its next wait reads it).
        s.events.store(true, Ordering::SeqCst);
        let _ = s.vcpu_wake.write(1);
        Ok(true)
    }

    /// Whether [`Controller::request_shutdown`] was called: a guest that
    /// then exits stopped by request, one then stopped was forced.
    pub fn shutdown_requested(&self) -> bool {
        self.shared.shutdown_requested.load(Ordering::SeqCst)
    }

    /// Runs `f` on the paused vCPU thread with the guest's KVM objects and
    /// devices, and returns its result. The guest must be paused (by
    /// [`Controller::pause`]); it stays paused.
    pub(crate) fn on_paused_vcpu<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut crate::vm::Machine, &crate::device_manager::MmioBus) -> R + Send + 'static,
    ) -> Result<R, ControlError> {
        let s = &self.shared;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        {
            let mut g = s.lock();
            if g.vcpu == ThreadState::Ended {
                return Err(ControlError::Ended);
            }
            if g.request != Request::Pause || g.vcpu != ThreadState::Paused {
                return Err(ControlError::NotPaused);
            }
            g.job = Some(Box::new(move |m, b| {
                let _ = tx.send(f(m, b));
            }));
        }
        s.changed.notify_all();
        let start = std::time::Instant::now();
        loop {
            match rx.recv_timeout(Duration::from_millis(10)) {
                Ok(r) => return Ok(r),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(ControlError::Ended)
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            }
            let mut g = s.lock();
            let ended = g.vcpu == ThreadState::Ended || g.request != Request::Pause;
            if ended || start.elapsed() > PAUSE_LIMIT {
                // Not started: withdrawn. Started: its answer is the result.
                if g.job.take().is_some() {
                    return Err(if ended {
                        ControlError::Ended
                    } else {
                        ControlError::PauseTimeout(PAUSE_LIMIT)
                    });
                }
                drop(g);
                return rx.recv().map_err(|_| ControlError::Ended);
            }
        }
    }

    /// Where the guest is, as its threads report it (not what was asked):
    /// paused only once the vCPU is out of `KVM_RUN` with its pending exit
    /// completed and the I/O thread has let go of guest memory.
    pub fn state(&self) -> VmState {
        let g = self.shared.lock();
        let io_quiet = g.io.is_none_or(|io| io != ThreadState::Running);
        match g.vcpu {
            ThreadState::Ended => VmState::Ended,
            ThreadState::Paused if io_quiet => VmState::Paused,
            _ => VmState::Running,
        }
    }

    pub fn counters(&self) -> CounterValues {
        self.shared.values()
    }

    /// When the guest reached its `main`, as [`monotonic_ns`] (comparable
    /// across processes): `None` before, or if the guest was not started
    /// with a boot trace (it only reports `main` then).
    pub fn main_reached_ns(&self) -> Option<u64> {
        match self.shared.main_reached_ns.load(Ordering::SeqCst) {
            0 => None,
            t => Some(t),
        }
    }

    /// When the monitor handled the guest's `main` mark, after its exit
    /// (what [`Controller::main_reached_ns`] was before the guest dated the
    /// mark with its TSC).
    pub fn main_exit_ns(&self) -> Option<u64> {
        match self.shared.main_exit_ns.load(Ordering::SeqCst) {
            0 => None,
            t => Some(t),
        }
    }

    /// Blocks until the guest reaches `main` (returns when, as
    /// [`Controller::main_reached_ns`]), its vCPU thread ends, or `timeout`
    /// passes. Woken by the vCPU thread, not by polling: a poller would
    /// take the CPU from the booting guest on a busy host.
    pub fn wait_for_main(&self, timeout: std::time::Duration) -> Option<u64> {
        let until = std::time::Instant::now() + timeout;
        let mut g = self.shared.lock();
        loop {
            if let Some(t) = self.main_reached_ns() {
                return Some(t);
            }
            let now = std::time::Instant::now();
            if g.vcpu == ThreadState::Ended || now >= until {
                return None;
            }
            g = self
                .shared
                .changed
                .wait_timeout(g, until - now)
                .map_or_else(|p| p.into_inner().0, |r| r.0);
        }
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the same clock in every process of the
/// host, so a toolstack can subtract a time taken in another process.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

// ---- kicks -------------------------------------------------------------

thread_local! {
    /// The running vCPU's `kvm_run.immediate_exit`, for the signal handlers
    /// of this thread (null on threads that run no vCPU).
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
    /// The CPU-quota timer fired on this thread.
    static SLICE_DONE: Cell<bool> = const { Cell::new(false) };
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub(crate) fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

/// The signal of the per-thread CPU-quota timer.
pub(crate) fn quota_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int) {
    let p = IMMEDIATE_EXIT.with(Cell::get);
    if !p.is_null() {
        // SAFETY: `p` points into this thread's vCPU `kvm_run` mapping, set
        // by `register_vcpu_thread` and cleared before the mapping goes.
        // A byte store is async-signal-safe.
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

extern "C" fn on_quota(sig: libc::c_int) {
    SLICE_DONE.with(|f| f.set(true));
    on_kick(sig);
}

/// Installs the (process-wide, but thread-agnostic) handlers once. No
/// `SA_RESTART`: `KVM_RUN` and waits must return `EINTR`.
pub(crate) fn install_handlers() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    static RESULT: AtomicI32 = AtomicI32::new(0);
    ONCE.call_once(|| {
        for (sig, h) in [
            (kick_signal(), on_kick as extern "C" fn(libc::c_int)),
            (quota_signal(), on_quota),
        ] {
            // SAFETY: installs a handler that only stores to thread-local
            // cells and a mapped byte (async-signal-safe); `sa` is fully
            // initialised.
            let rc = unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = h as *const () as usize;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut())
            };
            if rc != 0 {
                let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(1);
                RESULT.store(e, Ordering::SeqCst);
            }
        }
    });
    match RESULT.load(Ordering::SeqCst) {
        0 => Ok(()),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}

/// Makes the calling thread's kick signals set `immediate_exit` at `p`.
pub(crate) fn register_vcpu_thread(p: *mut u8) {
    IMMEDIATE_EXIT.with(|c| c.set(p));
}

/// Whether the quota timer fired on this thread since the last call.
pub(crate) fn take_slice_done() -> bool {
    SLICE_DONE.with(|f| f.replace(false))
}

fn kick(tid: i32) {
    if tid > 0 {
        // SAFETY: a plain syscall; a thread that has exited makes it fail
        // with ESRCH, which is harmless.
        unsafe {
            libc::syscall(
                libc::SYS_tgkill,
                libc::getpid(),
                tid,
                kick_signal() as libc::c_long,
            )
        };
    }
}

/// The calling thread's kernel id.
pub(crate) fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

//! The I/O thread: owns a guest's NICs and their backends, and moves frames
//! between the guest's rings and the host while the guest runs.
//!
//! While frames flow it polls the rings (shared memory: ~0.1 µs, no exit on
//! either side) and the backends' descriptors; after [`SPIN`] without work
//! it asks the guest to notify its next frame (EVENT_IDX `avail_event`,
//! through an ioeventfd: no exit to this process), looks once more, and
//! sleeps in `poll` until a backend, a notification, a timer or a control
//! request wakes it. Completed buffers wake the guest only if it is blocked
//! in its wait ([`Shared::signal_guest`]); a running guest polls its used
//! rings itself.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::control::{Request, Shared, ThreadState};
use crate::device_manager::{lock, NicSlot};
use crate::quota::CpuQuota;

/// How long the thread keeps polling after the last frame before it sleeps.
/// Short: on two cores it may share a core with the vCPU thread, and a
/// spinning thread holds the core until the scheduler's tick.
pub const SPIN: Duration = Duration::from_micros(40);
/// Longest sleep without any event (bounds a missed wake-up).
const MAX_SLEEP: Duration = Duration::from_secs(1);

pub struct IoThread {
    pub(crate) nics: Vec<NicSlot>,
    pub(crate) shared: Arc<Shared>,
    /// `--cpus`: work a guest causes here counts against its share too.
    pub(crate) quota: Option<CpuQuota>,
}

impl IoThread {
    /// Serves the NICs until the guest is stopped.
    pub fn run(self) {
        let mut last_work = Instant::now();
        let mut fds: Vec<libc::pollfd> = Vec::new();
        let mut owners: Vec<usize> = Vec::new();
        let mut backend_ready = vec![true; self.nics.len()];
        loop {
            match self.shared.request() {
                Request::Run => {}
                Request::Pause => {
                    self.shared.set_io(ThreadState::Paused);
                    if matches!(self.shared.wait_while_paused(), Request::Stop(_)) {
                        break;
                    }
                    self.shared.set_io(ThreadState::Running);
                }
                Request::Stop(_) => break,
            }
            if let Some(owed) = self.quota.as_ref().and_then(CpuQuota::owed) {
                self.sleep(owed);
                continue;
            }
            let mut delivered = 0usize;
            let mut work = 0usize;
            let mut next_timer: Option<Duration> = None;
            for (i, nic) in self.nics.iter().enumerate() {
                let mut d = lock(&nic.device);
                let net = &mut d.device;
                if !net.is_active() {
                    // No link yet (or a broken one): host connections wait
                    // in the host kernel rather than reach a guest that
                    // would lose them when its driver resets the device.
                    backend_ready[i] = true;
                    continue;
                }
                let (tx_bytes, rx_bytes) = (net.stats.tx_bytes, net.stats.rx_bytes);
                let tx = net.process_tx();
                let due = net.backend().next_timeout().is_some_and(|t| t.is_zero());
                if tx > 0 || backend_ready[i] || due {
                    net.backend().poll();
                }
                let rx = net.process_rx();
                // The guest took frames: a backend that stopped reading its
                // host side for lack of room may read again (its descriptors
                // are edge-triggered and would not say so).
                backend_ready[i] = rx > 0;
                let c = &self.shared.counters;
                c.tx_frames.fetch_add(tx as u64, Ordering::Relaxed);
                c.rx_frames.fetch_add(rx as u64, Ordering::Relaxed);
                c.tx_bytes
                    .fetch_add(net.stats.tx_bytes - tx_bytes, Ordering::Relaxed);
                c.rx_bytes
                    .fetch_add(net.stats.rx_bytes - rx_bytes, Ordering::Relaxed);
                work += tx + rx;
                delivered += rx;
                for t in [net.backend().next_timeout(), net.rx_delay(), net.tx_delay()]
                    .into_iter()
                    .flatten()
                {
                    next_timer = Some(next_timer.map_or(t, |n| n.min(t)));
                }
            }
            let now = Instant::now();
            if delivered > 0 {
                // Only received frames are news for a waiting guest: it
                // reclaims its transmit buffers when it next runs anyway.
                self.shared.signal_guest();
            }
            if work > 0 {
                last_work = now;
            }
            let sleeping = now.duration_since(last_work) >= SPIN;
            let timeout = if sleeping {
                // Ask for notifications, then look once more: a frame queued
                // between the last pass and the arming must not be missed.
                let mut late = false;
                for nic in &self.nics {
                    late |= lock(&nic.device).device.arm_notifications();
                }
                if late {
                    Duration::ZERO
                } else {
                    next_timer.unwrap_or(MAX_SLEEP).min(MAX_SLEEP)
                }
            } else {
                if work == 0 {
                    // Spinning: give the core away if anything else wants
                    // it (the vCPU thread, when both share one core),
                    // otherwise this returns at once.
                    // SAFETY: a plain syscall without arguments.
                    unsafe { libc::sched_yield() };
                }
                Duration::ZERO
            };
            if sleeping && !timeout.is_zero() {
                self.shared
                    .counters
                    .io_sleeps
                    .fetch_add(1, Ordering::Relaxed);
            }
            // Wait (or, while spinning, just look) for host-side readiness.
            fds.clear();
            owners.clear();
            fds.push(pollin(self.shared.io_wake.as_raw_fd()));
            owners.push(usize::MAX);
            for (i, nic) in self.nics.iter().enumerate() {
                fds.push(pollin(nic.notify.as_raw_fd()));
                owners.push(usize::MAX);
                let mut d = lock(&nic.device);
                if d.device.is_active() {
                    for fd in d.device.backend().fds() {
                        fds.push(pollin(fd));
                        owners.push(i);
                    }
                }
            }
            let ms = if timeout.is_zero() {
                0
            } else {
                timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
            };
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs
            // that outlives the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
            for (r, nic) in backend_ready.iter_mut().zip(&self.nics) {
                // Until the link is up, keep the backend marked for the
                // first pass after it is.
                *r |= !lock(&nic.device).device.is_active();
            }
            if n > 0 {
                let _ = self.shared.io_wake.read();
                for nic in &self.nics {
                    if let Ok(k) = nic.notify.read() {
                        self.shared.counters.kicks.fetch_add(k, Ordering::Relaxed);
                    }
                }
                for (pfd, &owner) in fds.iter().zip(&owners) {
                    if pfd.revents != 0 && owner != usize::MAX {
                        backend_ready[owner] = true;
                    }
                }
            }
            if sleeping && !timeout.is_zero() {
                for nic in &self.nics {
                    lock(&nic.device).device.suppress_notifications();
                }
                if n == 0 {
                    // A timer is due: let the backends run it.
                    backend_ready.iter_mut().for_each(|r| *r = true);
                }
            }
        }
        // Frames the guest queued just before it ended still go out.
        for nic in &self.nics {
            let mut d = lock(&nic.device);
            if d.device.is_active() {
                let before = d.device.stats.tx_bytes;
                let n = d.device.process_tx();
                d.device.backend().poll();
                let c = &self.shared.counters;
                c.tx_frames.fetch_add(n as u64, Ordering::Relaxed);
                c.tx_bytes
                    .fetch_add(d.device.stats.tx_bytes - before, Ordering::Relaxed);
            }
        }
        self.shared.set_io(ThreadState::Ended);
    }

    /// Stays off the CPU for `d` (a control request ends it early).
    fn sleep(&self, d: Duration) {
        let mut fd = pollin(self.shared.io_wake.as_raw_fd());
        let ms = d.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd that outlives the call.
        unsafe { libc::poll(&mut fd, 1, ms) };
        let _ = self.shared.io_wake.read();
    }
}

fn pollin(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

//! `--timeout`: stops a guest that runs too long, even one spinning at CPL3
//! that never exits to the monitor.
//!
//! A `SIGALRM` interval timer (first at the deadline, then every 10 ms)
//! interrupts `KVM_RUN`, which returns `EINTR`; the run loop then sees the
//! deadline has passed. Repeating the signal closes the race where it
//! lands just before the vCPU re-enters the guest.

use std::time::{Duration, Instant};

extern "C" fn on_alarm(_: libc::c_int) {}

/// A deadline for the current process's vCPU thread.
#[derive(Debug)]
pub struct Deadline {
    at: Option<Instant>,
}

impl Deadline {
    /// No deadline.
    pub fn none() -> Deadline {
        Deadline { at: None }
    }

    /// Arms a deadline `after` from now. The vCPU must run on this thread
    /// (the monitor runs one vCPU on the main thread).
    pub fn arm(after: Duration) -> std::io::Result<Deadline> {
        // SAFETY: installs a handler that does nothing (async-signal-safe);
        // `sa` is fully initialised; no SA_RESTART so KVM_RUN returns EINTR.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_alarm as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGALRM, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let tv = |d: Duration| libc::timeval {
            tv_sec: d.as_secs() as libc::time_t,
            tv_usec: d.subsec_micros() as libc::suseconds_t,
        };
        let first = if after.is_zero() {
            Duration::from_micros(1)
        } else {
            after
        };
        let timer = libc::itimerval {
            it_interval: tv(Duration::from_millis(10)),
            it_value: tv(first),
        };
        // SAFETY: `timer` is a valid itimerval; the old value is not wanted.
        if unsafe { libc::setitimer(libc::ITIMER_REAL, &timer, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Deadline {
            at: Some(Instant::now() + after),
        })
    }

    pub fn expired(&self) -> bool {
        self.at.is_some_and(|at| Instant::now() >= at)
    }

    /// Time left, if there is a deadline.
    pub fn remaining(&self) -> Option<Duration> {
        self.at
            .map(|at| at.saturating_duration_since(Instant::now()))
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        if self.at.is_some() {
            let zero = libc::itimerval {
                it_interval: libc::timeval {
                    tv_sec: 0,
                    tv_usec: 0,
                },
                it_value: libc::timeval {
                    tv_sec: 0,
                    tv_usec: 0,
                },
            };
            // SAFETY: disarms the timer; valid struct, old value not wanted.
            unsafe { libc::setitimer(libc::ITIMER_REAL, &zero, std::ptr::null_mut()) };
        }
    }
}

static CPU_SLICE_DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_prof(_: libc::c_int) {
    CPU_SLICE_DONE.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// `--cpus FRACTION`: the guest may use at most this share of one CPU.
///
/// A profiling timer (`ITIMER_PROF`, which counts the process's CPU time,
/// guest time included) fires after every slice of CPU the process used;
/// its signal interrupts `KVM_RUN`, and the run loop then sleeps long
/// enough that CPU time over wall time stays at the fraction. A guest
/// spinning at CPL3 is held to it without any cooperation.
#[derive(Debug)]
pub struct CpuQuota {
    slice: Duration,
    fraction: f64,
}

impl CpuQuota {
    /// CPU accounted between checks.
    const SLICE: Duration = Duration::from_millis(10);

    /// Arms the quota for this process (`fraction` in (0, 1)).
    pub fn arm(fraction: f64) -> std::io::Result<CpuQuota> {
        // SAFETY: installs a handler that only stores to an atomic
        // (async-signal-safe); no SA_RESTART so KVM_RUN returns EINTR.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_prof as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGPROF, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: Self::SLICE.as_micros() as libc::suseconds_t,
        };
        let timer = libc::itimerval {
            it_interval: tv,
            it_value: tv,
        };
        // SAFETY: valid itimerval; the old value is not wanted.
        if unsafe { libc::setitimer(libc::ITIMER_PROF, &timer, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(CpuQuota {
            slice: Self::SLICE,
            fraction,
        })
    }

    /// Called when `KVM_RUN` was interrupted: if a CPU slice was used up,
    /// sleeps off the rest of its share.
    pub fn throttle(&self) {
        if CPU_SLICE_DONE.swap(false, std::sync::atomic::Ordering::SeqCst) {
            let off = self.slice.as_secs_f64() * (1.0 / self.fraction - 1.0);
            std::thread::sleep(Duration::from_secs_f64(off));
        }
    }
}

//! `--cpus FRACTION`: a guest may use at most this share of one CPU, even
//! while spinning at CPL3 without ever exiting.
//!
//! A POSIX timer on the vCPU thread's own CPU clock
//! (`CLOCK_THREAD_CPUTIME_ID`, which counts guest time too) fires after each
//! slice of CPU the thread used and signals that thread alone
//! (`SIGEV_THREAD_ID`); the handler kicks the vCPU out of `KVM_RUN`, and the
//! run loop sleeps off the rest of the slice's share. Per thread, not per
//! process, so several guests in one process each keep their own quota.

use std::time::Duration;

use crate::control;

/// CPU accounted between checks.
const SLICE: Duration = Duration::from_millis(10);

/// An armed quota; dropping it deletes the timer.
#[derive(Debug)]
pub struct CpuQuota {
    timer: libc::timer_t,
    fraction: f64,
}

// SAFETY: `timer_t` is an opaque id the kernel hands out; deleting it from
// another thread is allowed.
unsafe impl Send for CpuQuota {}

impl CpuQuota {
    /// Arms the quota for the calling thread (`fraction` in (0, 1)).
    pub fn arm_for_this_thread(fraction: f64) -> std::io::Result<CpuQuota> {
        control::install_handlers()?;
        // SAFETY: `sigevent` is plain data; zeroed is a valid start.
        let mut ev: libc::sigevent = unsafe { std::mem::zeroed() };
        ev.sigev_notify = libc::SIGEV_THREAD_ID;
        ev.sigev_signo = control::quota_signal();
        ev.sigev_notify_thread_id = control::gettid();
        let mut timer: libc::timer_t = std::ptr::null_mut();
        // SAFETY: valid pointers to a sigevent and a timer id out-parameter.
        if unsafe { libc::timer_create(libc::CLOCK_THREAD_CPUTIME_ID, &mut ev, &mut timer) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: SLICE.as_nanos() as libc::c_long,
        };
        let spec = libc::itimerspec {
            it_interval: ts,
            it_value: ts,
        };
        // SAFETY: `timer` was created above; `spec` is valid; no old value.
        if unsafe { libc::timer_settime(timer, 0, &spec, std::ptr::null_mut()) } != 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: deleting the timer created above.
            unsafe { libc::timer_delete(timer) };
            return Err(e);
        }
        Ok(CpuQuota { timer, fraction })
    }

    /// If a slice was used up since the last call, how long to stay off the
    /// CPU to keep CPU time over wall time at the fraction.
    pub fn owed(&self) -> Option<Duration> {
        control::take_slice_done()
            .then(|| Duration::from_secs_f64(SLICE.as_secs_f64() * (1.0 / self.fraction - 1.0)))
    }
}

impl Drop for CpuQuota {
    fn drop(&mut self) {
        // SAFETY: deletes the timer this value owns.
        unsafe { libc::timer_delete(self.timer) };
    }
}

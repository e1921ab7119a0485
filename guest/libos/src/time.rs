//! Time: a monotonic clock from the TSC scaled by the boot page's
//! frequency, a wall clock from the boot page's reference, and a sleep that
//! blocks the vCPU in the monitor instead of spinning.
//!
//! Reading the clock is one `rdtsc` (native at CPL3) and a 128-bit multiply;
//! no exit. Both clocks' references are re-read from the boot page's clock
//! record at every read (two volatile loads): the monitor re-bases them when
//! it restores the guest from a snapshot, the monotonic clock to continue
//! from its value at the save (it never goes back, whatever the new host's
//! TSC), the wall clock to the right time.

use crate::arch::x86_64::io::rdtsc;
use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use core::time::Duration;
use wisp_abi::boot::BootPage;

static TSC_KHZ: AtomicU64 = AtomicU64::new(1_000_000);
static BOOT_TSC: AtomicU64 = AtomicU64::new(0);
static BOOT_UNIX_NS: AtomicU64 = AtomicU64::new(0);
/// The boot page, for its clock record (null: no record, e.g. under PVH).
static CLOCK_RECORD: AtomicPtr<BootPage> = AtomicPtr::new(core::ptr::null_mut());
/// Nanoseconds per tick as 32.32 fixed point.
static NS_PER_TICK_FP: AtomicU64 = AtomicU64::new(1 << 32);

crate::library!("time");

pub(crate) fn init(boot: &BootPage) {
    crate::library_linked(&LIB_NAME);
    let khz = if boot.tsc_khz == 0 {
        1_000_000
    } else {
        boot.tsc_khz
    };
    TSC_KHZ.store(khz, Ordering::Relaxed);
    BOOT_TSC.store(boot.boot_tsc, Ordering::Relaxed);
    BOOT_UNIX_NS.store(boot.boot_unix_ns, Ordering::Relaxed);
    if boot.clock_generation != 0 {
        CLOCK_RECORD.store(boot as *const BootPage as *mut BootPage, Ordering::Relaxed);
    }
    NS_PER_TICK_FP.store(
        ((1_000_000u128 << 32) / khz as u128) as u64,
        Ordering::Relaxed,
    );
}

/// TSC frequency in kHz.
pub fn tsc_khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

fn ticks_to_ns(ticks: u64) -> u64 {
    ((ticks as u128 * NS_PER_TICK_FP.load(Ordering::Relaxed) as u128) >> 32) as u64
}

/// Reads two fields of the clock record, or `None` without one.
fn clock_record(a: usize, b: usize) -> Option<(u64, u64)> {
    let p = CLOCK_RECORD.load(Ordering::Relaxed);
    if p.is_null() {
        return None;
    }
    let a = p.cast::<u8>().wrapping_add(a).cast::<u64>();
    let b = p.cast::<u8>().wrapping_add(b).cast::<u64>();
    // SAFETY: `a` and `b` are two u64 fields of the boot page (offsets of
    // its fields, so aligned), mapped read-only for the
    // guest's whole life; the monitor rewrites the record only while the
    // guest is not running, so volatile loads (which the compiler may not
    // cache) see the current record.
    unsafe { Some((core::ptr::read_volatile(a), core::ptr::read_volatile(b))) }
}

/// Nanoseconds since boot (not counting time spent saved in a snapshot).
pub fn monotonic_ns() -> u64 {
    let rec = clock_record(
        core::mem::offset_of!(BootPage, mono_tsc),
        core::mem::offset_of!(BootPage, mono_base_ns),
    );
    let (tsc, base) = rec.unwrap_or((BOOT_TSC.load(Ordering::Relaxed), 0));
    base.saturating_add(ticks_to_ns(rdtsc().saturating_sub(tsc)))
}

/// A point on the monotonic clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(u64);

impl Instant {
    pub fn now() -> Instant {
        Instant(monotonic_ns())
    }

    /// Nanoseconds since boot.
    pub fn as_nanos(self) -> u64 {
        self.0
    }

    pub fn duration_since(self, earlier: Instant) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    pub fn elapsed(self) -> Duration {
        Instant::now().duration_since(self)
    }

    pub fn checked_add(self, d: Duration) -> Option<Instant> {
        u64::try_from(d.as_nanos())
            .ok()
            .and_then(|n| self.0.checked_add(n))
            .map(Instant)
    }

    /// `self + d`, saturating at the end of time.
    pub fn saturating_add(self, d: Duration) -> Instant {
        self.checked_add(d).unwrap_or(Instant(u64::MAX))
    }
}

/// The wall clock's reference: (guest TSC, Unix ns at that TSC).
fn wall_reference() -> (u64, u64) {
    let rec = clock_record(
        core::mem::offset_of!(BootPage, wall_tsc),
        core::mem::offset_of!(BootPage, wall_unix_ns),
    );
    rec.unwrap_or((
        BOOT_TSC.load(Ordering::Relaxed),
        BOOT_UNIX_NS.load(Ordering::Relaxed),
    ))
}

/// Wall-clock time since the Unix epoch (zero-based if the monitor gave no
/// reference).
pub fn unix_time() -> Duration {
    let (tsc, unix_ns) = wall_reference();
    Duration::from_nanos(unix_ns.saturating_add(ticks_to_ns(rdtsc().saturating_sub(tsc))))
}

/// Blocks for `d`. On the Wisp monitor the vCPU waits in the monitor (one
/// exit) rather than spinning. A stop request ends the guest here unless
/// the application handles it (see [`crate::shutdown`]); then the sleep
/// goes on.
pub fn sleep(d: Duration) {
    let deadline = Instant::now().saturating_add(d);
    loop {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        crate::platform::wait(deadline.0 - now.0);
        // A stop request ends a waiting guest that does not handle it.
        crate::shutdown::check();
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

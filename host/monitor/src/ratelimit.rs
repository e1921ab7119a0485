//! Token buckets: the rate limits the monitor puts on what a guest can
//! push at the host (console output, network frames and bytes, disk
//! requests and bytes).
//!
//! Buckets read time through a [`Clock`], so their arithmetic is tested
//! against a clock the test moves by hand rather than against real sleeps
//! (which a busy machine stretches at random).

use std::time::{Duration, Instant};

/// Where a bucket reads the time and how it waits.
pub trait Clock {
    /// The current time (monotonic).
    fn now(&self) -> Instant;
    /// Blocks the calling thread for `d`.
    fn sleep(&self, d: Duration);
}

/// The real monotonic clock and a real sleep.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// What ends a limit's wait early: the disk's limit stalls the vCPU
/// thread, which a pause or stop of the guest must not wait for.
pub trait Wake: Send + Sync {
    /// Blocks for at most `d`; true if the thread is needed elsewhere now
    /// (the wait is then abandoned).
    fn sleep(&self, d: Duration) -> bool;
}

/// A token bucket: `rate` tokens a second, holding at most `capacity`.
#[derive(Clone, Debug)]
pub struct TokenBucket<C: Clock = SystemClock> {
    capacity: f64,
    tokens: f64,
    rate: f64,
    last: Instant,
    clock: C,
}

impl TokenBucket {
    /// A bucket refilled at `rate` per second, starting full with `burst`.
    pub fn new(rate: u64, burst: u64) -> TokenBucket {
        TokenBucket::with_clock(rate, burst, SystemClock)
    }
}

impl<C: Clock> TokenBucket<C> {
    /// [`TokenBucket::new`] reading time from `clock`.
    pub fn with_clock(rate: u64, burst: u64, clock: C) -> TokenBucket<C> {
        let capacity = burst.max(1) as f64;
        TokenBucket {
            capacity,
            tokens: capacity,
            rate: rate.max(1) as f64,
            last: clock.now(),
            clock,
        }
    }

    fn refill(&mut self) {
        let now = self.clock.now();
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.capacity);
    }

    /// Takes `n` tokens if all are there.
    pub fn take(&mut self, n: u64) -> bool {
        self.refill();
        if self.tokens >= n as f64 {
            self.tokens -= n as f64;
            true
        } else {
            false
        }
    }

    /// Takes as many of `n` tokens as there are; returns how many.
    pub fn take_up_to(&mut self, n: u64) -> u64 {
        self.refill();
        let got = (self.tokens.max(0.0) as u64).min(n);
        self.tokens -= got as f64;
        got
    }

    /// How long until `n` tokens are there (n is capped at the capacity).
    pub fn time_until(&mut self, n: u64) -> Duration {
        self.refill();
        let need = (n as f64).min(self.capacity) - self.tokens;
        if need <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(need / self.rate)
        }
    }

    /// Waits (blocking this thread) until `n` tokens are there, then takes
    /// them. Used where the guest is stopped in an exit anyway, so stalling
    /// it is the limit.
    pub fn take_blocking(&mut self, n: u64) {
        self.take_blocking_or(n, None);
    }

    /// [`TokenBucket::take_blocking`], sleeping through `wake` if given:
    /// when it says the thread is needed, the wait ends at once and the
    /// tokens are taken all the same (the bucket owes them, so the next
    /// take waits for them: the limit holds over time).
    pub fn take_blocking_or(&mut self, n: u64, wake: Option<&dyn Wake>) {
        let n = n.min(self.capacity as u64);
        loop {
            let wait = self.time_until(n);
            if wait.is_zero() {
                self.tokens -= n as f64;
                return;
            }
            match wake {
                Some(w) if w.sleep(wait) => {
                    self.tokens -= n as f64;
                    return;
                }
                Some(_) => {}
                None => self.clock.sleep(wait),
            }
        }
    }
}

/// Optional limits on bytes and operations per second.
#[derive(Clone)]
pub struct Limits<C: Clock = SystemClock> {
    pub bytes: Option<TokenBucket<C>>,
    pub ops: Option<TokenBucket<C>>,
    /// Ends [`Limits::wait_for`]'s waits early (none: they sleep through).
    pub wake: Option<std::sync::Arc<dyn Wake>>,
}

impl<C: Clock + std::fmt::Debug> std::fmt::Debug for Limits<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("bytes", &self.bytes)
            .field("ops", &self.ops)
            .field("wake", &self.wake.is_some())
            .finish()
    }
}

/// No limits.
impl<C: Clock> Default for Limits<C> {
    fn default() -> Self {
        Limits {
            bytes: None,
            ops: None,
            wake: None,
        }
    }
}

/// Smallest byte burst: one large frame or request always fits.
const MIN_BYTE_BURST: u64 = 65_536;

impl Limits {
    /// Limits of `bytes_per_sec` and `ops_per_sec` (0 = unlimited), each
    /// with a burst of a tenth of a second's worth (at least one frame).
    pub fn new(bytes_per_sec: u64, ops_per_sec: u64) -> Limits {
        Limits::with_clock(bytes_per_sec, ops_per_sec, SystemClock)
    }
}

impl<C: Clock + Clone> Limits<C> {
    /// [`Limits::new`] reading time from `clock`.
    pub fn with_clock(bytes_per_sec: u64, ops_per_sec: u64, clock: C) -> Limits<C> {
        Limits {
            bytes: (bytes_per_sec > 0).then(|| {
                TokenBucket::with_clock(
                    bytes_per_sec,
                    (bytes_per_sec / 10).max(MIN_BYTE_BURST),
                    clock.clone(),
                )
            }),
            ops: (ops_per_sec > 0)
                .then(|| TokenBucket::with_clock(ops_per_sec, (ops_per_sec / 10).max(1), clock)),
            wake: None,
        }
    }
}

impl<C: Clock> Limits<C> {
    /// Stalls until one operation of `len` bytes is allowed, or until
    /// [`Limits::wake`] ends the wait (the operation is then let through,
    /// and counted against the limit).
    pub fn wait_for(&mut self, len: u64) {
        let wake = self.wake.as_deref();
        if let Some(b) = self.ops.as_mut() {
            b.take_blocking_or(1, wake);
        }
        if let Some(b) = self.bytes.as_mut() {
            b.take_blocking_or(len, wake);
        }
    }

    /// Takes one operation of `len` bytes if allowed now.
    pub fn try_take(&mut self, len: u64) -> bool {
        let ops_ok = self.ops.as_mut().is_none_or(|b| b.time_until(1).is_zero());
        let bytes_ok = self
            .bytes
            .as_mut()
            .is_none_or(|b| b.time_until(len).is_zero());
        if ops_ok && bytes_ok {
            if let Some(b) = self.ops.as_mut() {
                b.take(1);
            }
            if let Some(b) = self.bytes.as_mut() {
                b.take(len.min(b.capacity as u64));
            }
            true
        } else {
            false
        }
    }

    /// How long until an operation of `len` bytes is allowed.
    pub fn time_until(&mut self, len: u64) -> Duration {
        let a = self
            .ops
            .as_mut()
            .map_or(Duration::ZERO, |b| b.time_until(1));
        let b = self
            .bytes
            .as_mut()
            .map_or(Duration::ZERO, |b| b.time_until(len));
        a.max(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A clock that moves only when told to (or when a bucket sleeps on
    /// it), and records every sleep.
    #[derive(Clone, Debug)]
    struct FakeClock {
        start: Instant,
        state: Arc<Mutex<(Duration, Vec<Duration>)>>,
    }

    impl FakeClock {
        fn new() -> FakeClock {
            FakeClock {
                start: Instant::now(),
                state: Arc::new(Mutex::new((Duration::ZERO, Vec::new()))),
            }
        }

        fn advance(&self, d: Duration) {
            self.state.lock().unwrap().0 += d;
        }

        /// The sleeps taken so far, forgotten afterwards.
        fn sleeps(&self) -> Vec<Duration> {
            std::mem::take(&mut self.state.lock().unwrap().1)
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Instant {
            self.start + self.state.lock().unwrap().0
        }

        fn sleep(&self, d: Duration) {
            let mut s = self.state.lock().unwrap();
            s.0 += d;
            s.1.push(d);
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Equal to within a microsecond (the bucket counts in f64).
    fn close(a: Duration, b: Duration) -> bool {
        a.abs_diff(b) <= Duration::from_micros(1)
    }

    #[test]
    fn bucket_starts_full_and_refills_at_its_rate() {
        let clock = FakeClock::new();
        let mut b = TokenBucket::with_clock(1000, 100, clock.clone());
        assert!(b.take(100), "starts with the whole burst");
        assert!(!b.take(50));
        let w = b.time_until(50);
        assert!(close(w, ms(50)), "50 tokens at 1000/s: {w:?}");
        clock.advance(ms(49));
        assert!(!b.take(50), "one token short");
        clock.advance(ms(1));
        assert!(b.take(50));
        assert_eq!(b.take_up_to(1000), 0, "nothing left after the refill");
        clock.advance(ms(7));
        assert_eq!(b.take_up_to(1000), 7);
    }

    #[test]
    fn bucket_never_holds_more_than_its_burst() {
        let clock = FakeClock::new();
        let mut b = TokenBucket::with_clock(1000, 100, clock.clone());
        clock.advance(Duration::from_secs(3600));
        assert_eq!(b.take_up_to(u64::MAX), 100);
        assert_eq!(b.take_up_to(u64::MAX), 0);
        // Asking for more than the capacity waits only for a full bucket.
        assert!(close(b.time_until(1_000_000), ms(100)));
    }

    #[test]
    fn take_blocking_sleeps_exactly_the_deficit() {
        let clock = FakeClock::new();
        let mut b = TokenBucket::with_clock(1000, 100, clock.clone());
        b.take_blocking(60);
        assert!(clock.sleeps().is_empty(), "the burst covers it");
        b.take_blocking(60);
        let slept: Duration = clock.sleeps().iter().sum();
        assert!(close(slept, ms(20)), "20 tokens short: {slept:?}");
        // More than the capacity is capped to it rather than waiting forever.
        b.take_blocking(10_000);
        let slept: Duration = clock.sleeps().iter().sum();
        assert!(close(slept, ms(100)), "{slept:?}");
    }

    #[test]
    fn zero_rate_or_burst_still_lets_one_through() {
        let clock = FakeClock::new();
        let mut b = TokenBucket::with_clock(0, 0, clock.clone());
        assert!(b.take(1));
        assert!(!b.take(1));
        clock.advance(Duration::from_secs(1));
        assert!(b.take(1));
    }

    #[test]
    fn limits_gate_operations_and_bytes() {
        let clock = FakeClock::new();
        // 10 ops/s: a burst of one op.
        let mut l = Limits::with_clock(0, 10, clock.clone());
        assert!(l.bytes.is_none());
        assert!(l.try_take(1500));
        assert!(!l.try_take(1500));
        assert!(close(l.time_until(1500), ms(100)));
        clock.advance(ms(100));
        assert!(l.try_take(1500));

        // 1 MB/s: a burst of 100 kB (a tenth of a second).
        let mut l = Limits::with_clock(1_000_000, 0, clock.clone());
        assert!(l.try_take(100_000));
        assert!(!l.try_take(1));
        assert!(close(l.time_until(50_000), ms(50)));

        // A low byte rate still passes a 64 KiB frame at once.
        let mut l = Limits::with_clock(1000, 0, clock.clone());
        assert!(l.try_take(65_536));
        assert!(!l.try_take(1));

        let mut none: Limits<FakeClock> = Limits::default();
        assert!(none.try_take(u64::MAX));
        assert_eq!(none.time_until(u64::MAX), Duration::ZERO);
    }

    #[test]
    fn a_refused_operation_takes_nothing() {
        let clock = FakeClock::new();
        let mut l = Limits::with_clock(1_000_000, 10, clock.clone());
        // Bytes are there, the op is not: the bytes stay in the bucket.
        assert!(l.try_take(1));
        assert!(!l.try_take(99_999));
        clock.advance(ms(100));
        assert!(l.try_take(99_999), "the refused bytes were not spent");
        // The op is there, the bytes are not: the op stays.
        clock.advance(ms(100));
        l.bytes.as_mut().unwrap().take_up_to(u64::MAX);
        assert!(!l.try_take(1000));
        clock.advance(ms(1));
        assert!(l.try_take(1000), "the refused op was not spent");
    }

    #[test]
    fn wait_for_stalls_for_the_slower_of_the_two_limits() {
        let clock = FakeClock::new();
        let mut l = Limits::with_clock(1_000_000, 10, clock.clone());
        l.wait_for(1000);
        assert!(clock.sleeps().is_empty(), "within both bursts");
        // The next op waits 100 ms for the op bucket; by then the bytes
        // are there.
        l.wait_for(1000);
        let slept: Duration = clock.sleeps().iter().sum();
        assert!(close(slept, ms(100)), "{slept:?}");
        // A large request then waits for the bytes too.
        l.wait_for(100_000);
        let slept: Duration = clock.sleeps().iter().sum();
        assert!(slept >= ms(100), "{slept:?}");
        assert!(l.time_until(1) > Duration::ZERO);
    }

    /// A wake that sleeps on the fake clock for up to `until_needed`
    /// (in all), then says the thread is needed.
    struct FakeWake {
        clock: FakeClock,
        until_needed: Mutex<Duration>,
    }

    impl Wake for FakeWake {
        fn sleep(&self, d: Duration) -> bool {
            let mut left = self.until_needed.lock().unwrap();
            let slept = d.min(*left);
            *left -= slept;
            self.clock.sleep(slept);
            slept < d
        }
    }

    #[test]
    fn a_wake_ends_the_wait_and_the_limit_still_holds() {
        let clock = FakeClock::new();
        // 10 ops/s: a burst of one op; each next op waits 100 ms.
        let mut l = Limits::with_clock(0, 10, clock.clone());
        l.wake = Some(Arc::new(FakeWake {
            clock: clock.clone(),
            until_needed: Mutex::new(ms(30)),
        }));
        l.wait_for(512);
        // Needed after 30 ms of the 100: the op goes through then...
        l.wait_for(512);
        let slept: Duration = clock.sleeps().iter().sum();
        assert!(close(slept, ms(30)), "{slept:?}");
        // ...and is owed: the next one waits for it and its own (170 ms).
        assert!(close(l.time_until(1), ms(170)), "{:?}", l.time_until(1));
        // A wake that is not needed sleeps the whole wait.
        l.wake = Some(Arc::new(FakeWake {
            clock: clock.clone(),
            until_needed: Mutex::new(Duration::from_secs(10)),
        }));
        l.wait_for(512);
        let slept: Duration = clock.sleeps().iter().sum();
        assert!(close(slept, ms(170)), "{slept:?}");
    }

    #[test]
    fn the_system_clock_is_the_default() {
        let mut l = Limits::new(0, 0);
        assert!(l.try_take(u64::MAX));
        let mut b = TokenBucket::new(10, 5);
        assert_eq!(b.take_up_to(100), 5);
    }
}

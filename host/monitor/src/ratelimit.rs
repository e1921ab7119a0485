//! Token buckets: the rate limits the monitor puts on what a guest can
//! push at the host (console output, network frames and bytes, disk
//! requests and bytes).

use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens a second, holding at most `capacity`.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    capacity: f64,
    tokens: f64,
    rate: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket refilled at `rate` per second, starting full with `burst`.
    pub fn new(rate: u64, burst: u64) -> TokenBucket {
        let capacity = burst.max(1) as f64;
        TokenBucket {
            capacity,
            tokens: capacity,
            rate: rate.max(1) as f64,
            last: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
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
        let n = n.min(self.capacity as u64);
        loop {
            let wait = self.time_until(n);
            if wait.is_zero() {
                self.tokens -= n as f64;
                return;
            }
            std::thread::sleep(wait);
        }
    }
}

/// Optional limits on bytes and operations per second.
#[derive(Clone, Debug, Default)]
pub struct Limits {
    pub bytes: Option<TokenBucket>,
    pub ops: Option<TokenBucket>,
}

impl Limits {
    /// Limits of `bytes_per_sec` and `ops_per_sec` (0 = unlimited), each
    /// with a burst of a tenth of a second's worth (at least one frame).
    pub fn new(bytes_per_sec: u64, ops_per_sec: u64) -> Limits {
        Limits {
            bytes: (bytes_per_sec > 0)
                .then(|| TokenBucket::new(bytes_per_sec, (bytes_per_sec / 10).max(65_536))),
            ops: (ops_per_sec > 0)
                .then(|| TokenBucket::new(ops_per_sec, (ops_per_sec / 10).max(1))),
        }
    }

    /// Stalls until one operation of `len` bytes is allowed.
    pub fn wait_for(&mut self, len: u64) {
        if let Some(b) = self.ops.as_mut() {
            b.take_blocking(1);
        }
        if let Some(b) = self.bytes.as_mut() {
            b.take_blocking(len);
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

    #[test]
    fn bucket_refills_at_its_rate() {
        let mut b = TokenBucket::new(1000, 100);
        assert!(b.take(100));
        assert!(!b.take(50));
        let w = b.time_until(50);
        assert!(
            w > Duration::from_millis(40) && w <= Duration::from_millis(51),
            "{w:?}"
        );
        std::thread::sleep(Duration::from_millis(60));
        assert!(b.take(50));
        assert!(
            b.take_up_to(1000) < 20,
            "only the refill since the last take is left"
        );
    }

    #[test]
    fn limits_gate_operations() {
        let mut l = Limits::new(0, 10);
        assert!(l.try_take(1500)); // one op of the burst (10/10 = 1)
        assert!(!l.try_take(1500));
        assert!(l.time_until(1500) > Duration::ZERO);
        let mut none = Limits::default();
        assert!(none.try_take(u64::MAX));
    }
}

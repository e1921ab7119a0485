//! The key space: byte-string keys and values with optional expiry
//! (absolute, in Unix milliseconds, so the append-only log replays to the
//! same deadlines after a restart).

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

pub struct Entry {
    pub value: Vec<u8>,
    pub expires_at: Option<u64>,
}

#[derive(Default)]
pub struct Store {
    map: BTreeMap<Vec<u8>, Entry>,
}

impl Store {
    fn live(e: &Entry, now: u64) -> bool {
        e.expires_at.is_none_or(|t| t > now)
    }

    pub fn get(&mut self, key: &[u8], now: u64) -> Option<&Entry> {
        if self.map.get(key).is_some_and(|e| !Self::live(e, now)) {
            self.map.remove(key);
        }
        self.map.get(key)
    }

    pub fn set(&mut self, key: Vec<u8>, value: Vec<u8>, expires_at: Option<u64>) {
        self.map.insert(key, Entry { value, expires_at });
    }

    pub fn remove(&mut self, key: &[u8], now: u64) -> bool {
        match self.map.remove(key) {
            Some(e) => Self::live(&e, now),
            None => false,
        }
    }

    pub fn set_expiry(&mut self, key: &[u8], at: Option<u64>, now: u64) -> bool {
        match self.map.get_mut(key) {
            Some(e) if Self::live(e, now) => {
                e.expires_at = at;
                true
            }
            _ => false,
        }
    }

    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// Drops expired keys; returns the live count.
    pub fn sweep(&mut self, now: u64) -> usize {
        self.map.retain(|_, e| Self::live(e, now));
        self.map.len()
    }

    pub fn keys(&mut self, pattern: &[u8], now: u64) -> Vec<Vec<u8>> {
        self.sweep(now);
        self.map
            .keys()
            .filter(|k| glob(pattern, k))
            .cloned()
            .collect()
    }
}

/// Redis-style glob: `*`, `?`, `[abc]`, `[a-z]`, `[^a]`, `\x`.
pub fn glob(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (None, Some(_)) => false,
        (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && glob(p, &s[1..])),
        (Some(_), None) => false,
        (Some(b'?'), Some(_)) => glob(&p[1..], &s[1..]),
        (Some(b'['), Some(&c)) => {
            let Some(close) = p.iter().skip(1).position(|&b| b == b']').map(|i| i + 1) else {
                return c == b'[' && glob(&p[1..], &s[1..]);
            };
            let set = &p[1..close];
            let (neg, set) = match set.first() {
                Some(b'^') => (true, &set[1..]),
                _ => (false, set),
            };
            let mut hit = false;
            let mut i = 0;
            while i < set.len() {
                if i + 2 < set.len() && set[i + 1] == b'-' {
                    hit |= set[i] <= c && c <= set[i + 2];
                    i += 3;
                } else {
                    hit |= set[i] == c;
                    i += 1;
                }
            }
            hit != neg && glob(&p[close + 1..], &s[1..])
        }
        (Some(b'\\'), Some(&c)) if p.len() > 1 => p[1] == c && glob(&p[2..], &s[1..]),
        (Some(&a), Some(&c)) => a == c && glob(&p[1..], &s[1..]),
    }
}

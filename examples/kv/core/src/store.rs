//! The key space: byte-string keys and values with optional expiry
//! (absolute, in Unix milliseconds, so the append-only log replays to the
//! same deadlines after a restart).
//!
//! Keys are kept in the order of a 64-bit hash of the key (then the key),
//! which gives `SCAN` a stable integer cursor with Redis's guarantee: a
//! key present for the whole iteration is returned at least once, however
//! many keys come and go in between (the cursor is the hash to resume
//! from, and keys with equal hashes are never split across two calls). A
//! second index orders keys by deadline, so expired keys are removed as
//! soon as they are due, and in bulk, in O(log n) each.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

pub struct Entry {
    pub value: Vec<u8>,
    pub expires_at: Option<u64>,
}

/// A hash function for key order (replaceable in tests, to force
/// collisions).
pub type Hasher = fn(&[u8]) -> u64;

/// FNV-1a with a final mix, never 0 (0 is the cursor that starts a scan).
pub fn default_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // splitmix64's finaliser, so similar keys spread over the cursor space.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    h.max(1)
}

pub struct Store {
    /// Slot (8-byte big-endian hash, then the key) to entry.
    map: BTreeMap<Vec<u8>, Entry>,
    /// (deadline, slot) of every key that has one.
    expiries: BTreeSet<(u64, Vec<u8>)>,
    hash: Hasher,
}

impl Default for Store {
    fn default() -> Self {
        Store::with_hasher(default_hash)
    }
}

fn key_of(slot: &[u8]) -> &[u8] {
    &slot[8..]
}

fn hash_of(slot: &[u8]) -> u64 {
    let mut h = [0u8; 8];
    h.copy_from_slice(&slot[..8]);
    u64::from_be_bytes(h)
}

impl Store {
    pub fn with_hasher(hash: Hasher) -> Store {
        Store {
            map: BTreeMap::new(),
            expiries: BTreeSet::new(),
            hash,
        }
    }

    fn slot(&self, key: &[u8]) -> Vec<u8> {
        let mut s = Vec::with_capacity(8 + key.len());
        s.extend_from_slice(&(self.hash)(key).to_be_bytes());
        s.extend_from_slice(key);
        s
    }

    pub fn get(&self, key: &[u8]) -> Option<&Entry> {
        self.map.get(&self.slot(key))
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        self.get(key).is_some()
    }

    /// The value of `key`, to change in place (its expiry stays).
    pub fn value_mut(&mut self, key: &[u8]) -> Option<&mut Vec<u8>> {
        let slot = self.slot(key);
        self.map.get_mut(&slot).map(|e| &mut e.value)
    }

    /// Sets `key` to `value` with the given deadline, replacing any entry.
    pub fn insert(&mut self, key: &[u8], value: Vec<u8>, expires_at: Option<u64>) {
        let slot = self.slot(key);
        if let Some(t) = expires_at {
            self.expiries.insert((t, slot.clone()));
        }
        if let Some(old) = self.map.insert(slot.clone(), Entry { value, expires_at }) {
            if let Some(t) = old.expires_at {
                if Some(t) != expires_at {
                    self.expiries.remove(&(t, slot));
                }
            }
        }
    }

    /// Sets `key` to `value`, keeping its deadline if it exists.
    pub fn insert_keep_ttl(&mut self, key: &[u8], value: Vec<u8>) {
        match self.value_mut(key) {
            Some(v) => *v = value,
            None => self.insert(key, value, None),
        }
    }

    pub fn remove(&mut self, key: &[u8]) -> Option<Entry> {
        let slot = self.slot(key);
        let e = self.map.remove(&slot)?;
        if let Some(t) = e.expires_at {
            self.expiries.remove(&(t, slot));
        }
        Some(e)
    }

    /// Sets or clears the deadline of `key`; false if there is no such key.
    pub fn set_expiry(&mut self, key: &[u8], at: Option<u64>) -> bool {
        let slot = self.slot(key);
        let Some(e) = self.map.get_mut(&slot) else {
            return false;
        };
        if let Some(t) = e.expires_at {
            self.expiries.remove(&(t, slot.clone()));
        }
        e.expires_at = at;
        if let Some(t) = at {
            self.expiries.insert((t, slot));
        }
        true
    }

    /// Removes every key whose deadline is at or before `now`; returns
    /// them (the caller logs their deletion).
    pub fn expire_due(&mut self, now: u64) -> Vec<Vec<u8>> {
        let mut gone = Vec::new();
        while let Some((t, _)) = self.expiries.first() {
            if *t > now {
                break;
            }
            let Some((_, slot)) = self.expiries.pop_first() else {
                break;
            };
            self.map.remove(&slot);
            gone.push(key_of(&slot).to_vec());
        }
        gone
    }

    /// The earliest deadline of any key.
    pub fn next_expiry(&self) -> Option<u64> {
        self.expiries.first().map(|(t, _)| *t)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.expiries.clear();
    }

    /// Every key, in hash order (Redis's order is its hash table's).
    pub fn keys(&self) -> impl Iterator<Item = &[u8]> {
        self.map.keys().map(|s| key_of(s))
    }

    /// One step of a scan: up to `count` keys from `cursor` on (plus any
    /// that share the last one's hash), and the cursor to continue from
    /// (0 when the iteration is complete).
    pub fn scan(&self, cursor: u64, count: usize) -> (u64, Vec<&[u8]>) {
        let mut out = Vec::new();
        let mut last_hash = None;
        for slot in self
            .map
            .range(cursor.to_be_bytes().to_vec()..)
            .map(|(s, _)| s)
        {
            let h = hash_of(slot);
            if out.len() >= count.max(1) && last_hash != Some(h) {
                return (h, out);
            }
            out.push(key_of(slot));
            last_hash = Some(h);
        }
        (0, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeSet;
    use alloc::format;

    fn keys(s: &Store) -> BTreeSet<Vec<u8>> {
        s.keys().map(<[u8]>::to_vec).collect()
    }

    #[test]
    fn insert_get_remove_and_expiry_index_stay_consistent() {
        let mut s = Store::default();
        s.insert(b"a", b"1".to_vec(), Some(100));
        s.insert(b"b", b"2".to_vec(), None);
        s.insert(b"c", b"3".to_vec(), Some(50));
        assert_eq!(s.next_expiry(), Some(50));
        s.insert(b"c", b"4".to_vec(), None); // a plain SET clears the deadline
        assert_eq!(s.next_expiry(), Some(100));
        assert!(s.set_expiry(b"b", Some(70)));
        assert!(!s.set_expiry(b"zz", Some(70)));
        s.insert_keep_ttl(b"b", b"5".to_vec());
        assert_eq!(s.get(b"b").unwrap().expires_at, Some(70));
        assert_eq!(s.expire_due(69), Vec::<Vec<u8>>::new());
        assert_eq!(s.expire_due(70), [b"b".to_vec()]);
        assert!(s.remove(b"a").is_some());
        assert_eq!(s.next_expiry(), None, "removing a key drops its deadline");
        assert_eq!(keys(&s), [b"c".to_vec()].into_iter().collect());
    }

    #[test]
    fn expire_due_removes_everything_due_at_once() {
        let mut s = Store::default();
        for i in 0..100u64 {
            s.insert(format!("k{i}").as_bytes(), Vec::new(), Some(1000 + i));
        }
        assert_eq!(s.expire_due(1049).len(), 50);
        assert_eq!(s.len(), 50);
        assert_eq!(s.next_expiry(), Some(1050));
    }

    fn full_scan(s: &Store, count: usize) -> (Vec<Vec<u8>>, usize) {
        let (mut cursor, mut seen, mut calls) = (0, Vec::new(), 0);
        loop {
            let (next, batch) = s.scan(cursor, count);
            calls += 1;
            seen.extend(batch.iter().map(|k| k.to_vec()));
            if next == 0 {
                return (seen, calls);
            }
            assert!(next > cursor, "the cursor advances");
            cursor = next;
        }
    }

    #[test]
    fn a_full_scan_returns_every_key_once_when_nothing_changes() {
        let mut s = Store::default();
        for i in 0..1000 {
            s.insert(format!("key:{i}").as_bytes(), Vec::new(), None);
        }
        let (seen, calls) = full_scan(&s, 10);
        assert_eq!(seen.len(), 1000);
        assert_eq!(seen.iter().cloned().collect::<BTreeSet<_>>(), keys(&s));
        assert!(calls >= 100);
    }

    #[test]
    fn keys_present_throughout_a_scan_are_returned_despite_churn() {
        let mut s = Store::default();
        for i in 0..500 {
            s.insert(format!("stay{i}").as_bytes(), Vec::new(), None);
        }
        let (mut cursor, mut seen, mut n) = (0, BTreeSet::new(), 0);
        loop {
            let (next, batch) = s.scan(cursor, 7);
            seen.extend(batch.iter().map(|k| k.to_vec()));
            // Churn between calls: add and remove other keys.
            for j in 0..20 {
                s.insert(format!("tmp{n}-{j}").as_bytes(), Vec::new(), None);
                s.remove(format!("tmp{}-{j}", n.max(1) - 1).as_bytes());
            }
            n += 1;
            if next == 0 {
                break;
            }
            cursor = next;
        }
        for i in 0..500 {
            assert!(
                seen.contains(format!("stay{i}").as_bytes()),
                "stay{i} missed"
            );
        }
    }

    #[test]
    fn keys_sharing_a_hash_are_never_split_so_the_scan_ends() {
        // Every key collides: a batch must take the whole group.
        let mut s = Store::with_hasher(|_| 42);
        for i in 0..50 {
            s.insert(format!("{i}").as_bytes(), Vec::new(), None);
        }
        let (seen, calls) = full_scan(&s, 3);
        assert_eq!((seen.len(), calls), (50, 1));
        // Two groups: the cursor moves from one to the other.
        let mut s = Store::with_hasher(|k| if k[0] == b'a' { 1 } else { 2 });
        for k in ["a1", "a2", "b1", "b2"] {
            s.insert(k.as_bytes(), Vec::new(), None);
        }
        assert_eq!(s.scan(0, 1), (2, alloc::vec![&b"a1"[..], &b"a2"[..]]));
        assert_eq!(s.scan(2, 1), (0, alloc::vec![&b"b1"[..], &b"b2"[..]]));
    }
}

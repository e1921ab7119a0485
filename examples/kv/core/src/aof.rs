//! The append-only log on a block device, and when it is flushed.
//!
//! Layout: sector 0 holds a header (`WISPKV-AOF v1`); from byte 512 on, the
//! log is the sequence of mutating commands as RESP arrays, exactly as
//! replayed. The log's end is where the bytes stop parsing as a command:
//! zeros on a fresh disk, or the torn remains of a write interrupted by a
//! crash. Such remains are zeroed at open, so a later, shorter record can
//! never be followed by stale bytes that parse.
//!
//! Every append is written to the device before the replies of the
//! commands it records are sent, whatever the policy (as Redis `write`s its
//! log before replying). On the Wisp monitor a completed write is in the
//! host file (the host's page cache), so it survives the guest or the
//! monitor being killed; a flush makes the monitor `fdatasync` the file,
//! so it also survives the host losing power. The policy (`appendfsync`,
//! as in Redis) says when kv flushes:
//!
//! * `always`: before the replies of every batch (one client read), so a
//!   reply means the write is on stable storage.
//! * `everysec`: at most once a second, after the replies, by a timer (see
//!   [`Aof::flush_due`]): a host crash loses at most about the last second
//!   of acknowledged writes.
//! * `no`: never; the host kernel writes the file back when it chooses
//!   (Linux: within about 30 s, `vm.dirty_expire_centisecs`), so a host
//!   crash can lose writes acknowledged within that time.

use alloc::vec;
use alloc::vec::Vec;

use crate::engine::Fsync;
use crate::resp;

/// Bytes per sector.
pub const SECTOR: usize = 512;
const HEADER: &[u8] = b"WISPKV-AOF v1\n";
const LOG_START: u64 = SECTOR as u64;
/// Bytes read at a time while replaying.
const CHUNK: usize = 64 * 1024;
/// Longest record: more unparsed bytes than this is a torn record.
const MAX_RECORD: u64 = resp::MAX_BULK as u64 + 64 * 1024;
/// How long `everysec` lets written data wait for a flush.
pub const EVERYSEC_MS: u64 = 1000;

/// Sector storage: the virtio-blk disk in the guest, memory in tests.
pub trait Device {
    type Error: core::fmt::Display;
    /// Size in bytes.
    fn capacity(&self) -> u64;
    /// Reads whole sectors from `sector` into `buf`.
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), Self::Error>;
    /// Writes whole sectors at `sector`; durable only after `flush`.
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), Self::Error>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> Result<(), Self::Error>;
}

#[derive(Debug, PartialEq, Eq)]
pub enum AofError<E> {
    /// The disk holds something else: it is not overwritten.
    Foreign,
    Full,
    Disk(E),
}

impl<E: core::fmt::Display> core::fmt::Display for AofError<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AofError::Foreign => f.write_str("the disk is not a kv log (refusing to overwrite it)"),
            AofError::Full => f.write_str("the disk is full"),
            AofError::Disk(e) => write!(f, "{e}"),
        }
    }
}

pub struct Aof<D: Device> {
    disk: D,
    /// Bytes of log.
    len: u64,
    /// The log's last partial sector (its first `len % SECTOR` bytes).
    tail: Vec<u8>,
    policy: Fsync,
    /// Monotonic ms of the last flush.
    last_flush_ms: u64,
    /// Written since the last flush.
    dirty: bool,
}

impl<D: Device> Aof<D> {
    /// Opens (or formats) the log, passing each record to `replay` in
    /// order. `now_ms` is a monotonic clock.
    pub fn open(
        mut disk: D,
        policy: Fsync,
        now_ms: u64,
        mut replay: impl FnMut(Vec<Vec<u8>>),
    ) -> Result<Aof<D>, AofError<D::Error>> {
        let mut first = vec![0u8; SECTOR];
        disk.read(0, &mut first).map_err(AofError::Disk)?;
        if first.iter().all(|&b| b == 0) {
            first[..HEADER.len()].copy_from_slice(HEADER);
            disk.write(0, &first).map_err(AofError::Disk)?;
            disk.flush().map_err(AofError::Disk)?;
        } else if !first.starts_with(HEADER) {
            return Err(AofError::Foreign);
        }

        let capacity = disk.capacity();
        let mut buf: Vec<u8> = Vec::new();
        let mut consumed = 0; // bytes of buf already replayed
        let mut buf_start = LOG_START; // disk offset of buf[0]
        let mut read_to = LOG_START; // disk offset up to which buf is filled
        loop {
            let rest = &buf[consumed..];
            match resp::parse_record(rest) {
                Ok((args, used)) if !args.is_empty() => {
                    consumed += used;
                    replay(args);
                }
                Err(resp::Error::Incomplete)
                    if rest.first() != Some(&0)
                        && read_to < capacity
                        && read_to - buf_start - (consumed as u64) < MAX_RECORD =>
                {
                    buf.drain(..consumed);
                    buf_start += consumed as u64;
                    consumed = 0;
                    let n = CHUNK.min((capacity - read_to) as usize);
                    let mut chunk = vec![0u8; n];
                    disk.read(read_to / SECTOR as u64, &mut chunk)
                        .map_err(AofError::Disk)?;
                    buf.extend_from_slice(&chunk);
                    read_to += n as u64;
                }
                // Zeros, or the torn remains of a write: the end.
                _ => break,
            }
        }
        let len = buf_start + consumed as u64 - LOG_START;
        let torn = buf[consumed..].iter().any(|&b| b != 0);
        let mut aof = Aof {
            disk,
            len,
            tail: Vec::new(),
            policy,
            last_flush_ms: now_ms,
            dirty: false,
        };
        if torn {
            aof.zero_torn_remains()?;
        }
        let end = LOG_START + aof.len;
        let tail_start = end / SECTOR as u64;
        let mut sector = vec![0u8; SECTOR];
        if tail_start * (SECTOR as u64) < capacity {
            aof.disk
                .read(tail_start, &mut sector)
                .map_err(AofError::Disk)?;
        }
        aof.tail = sector[..(end % SECTOR as u64) as usize].to_vec();
        Ok(aof)
    }

    /// Zeroes the non-zero bytes that follow the log's end, up to the
    /// first all-zero sector (bounded: a torn record is at most one record).
    fn zero_torn_remains(&mut self) -> Result<(), AofError<D::Error>> {
        let end = LOG_START + self.len;
        let first_sector = end / SECTOR as u64;
        let last =
            ((end + MAX_RECORD) / SECTOR as u64 + 1).min(self.disk.capacity() / SECTOR as u64);
        let mut s = vec![0u8; SECTOR];
        for sector in first_sector..last {
            self.disk.read(sector, &mut s).map_err(AofError::Disk)?;
            let from = if sector == first_sector {
                (end % SECTOR as u64) as usize
            } else {
                0
            };
            if s[from..].iter().all(|&b| b == 0) {
                break;
            }
            s[from..].fill(0);
            self.disk.write(sector, &s).map_err(AofError::Disk)?;
        }
        self.disk.flush().map_err(AofError::Disk)?;
        Ok(())
    }

    pub fn policy(&self) -> Fsync {
        self.policy
    }

    pub fn set_policy(&mut self, policy: Fsync) {
        self.policy = policy;
    }

    /// Appends records (whole RESP commands) and writes them to the
    /// device; with `always`, flushes too. `now_ms` is monotonic.
    pub fn append(&mut self, records: &[u8], now_ms: u64) -> Result<(), AofError<D::Error>> {
        if records.is_empty() {
            return Ok(());
        }
        if LOG_START + self.len + records.len() as u64 > self.disk.capacity() {
            return Err(AofError::Full);
        }
        let start_sector = (LOG_START + self.len) / SECTOR as u64;
        let mut data = core::mem::take(&mut self.tail);
        let tail_len = data.len();
        data.extend_from_slice(records);
        let keep = data.len() % SECTOR;
        let mut padded = data.clone();
        padded.resize(data.len().div_ceil(SECTOR) * SECTOR, 0);
        if let Err(e) = self.disk.write(start_sector, &padded) {
            data.truncate(tail_len);
            self.tail = data;
            return Err(AofError::Disk(e));
        }
        self.len += records.len() as u64;
        self.tail = data[data.len() - keep..].to_vec();
        self.dirty = true;
        if self.policy == Fsync::Always {
            self.flush(now_ms)?;
        }
        Ok(())
    }

    /// When (monotonic ms) written data must next be flushed: with
    /// `everysec`, a second after the last flush (at once if that is
    /// past); `None` when nothing waits or the policy flushes otherwise.
    pub fn flush_due(&self) -> Option<u64> {
        (self.dirty && self.policy == Fsync::EverySec)
            .then(|| self.last_flush_ms.saturating_add(EVERYSEC_MS))
    }

    /// Flushes if anything was written since the last flush.
    pub fn flush(&mut self, now_ms: u64) -> Result<(), AofError<D::Error>> {
        if self.dirty {
            self.disk.flush().map_err(AofError::Disk)?;
            self.dirty = false;
            self.last_flush_ms = now_ms;
        }
        Ok(())
    }

    /// Bytes of log.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device (tests look at what reached it).
    pub fn device(&self) -> &D {
        &self.disk
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;

    /// A disk in memory that records what is durable: `durable` is what
    /// a power loss would leave.
    #[derive(Clone)]
    struct MemDisk {
        data: Vec<u8>,
        durable: Vec<u8>,
        flushes: usize,
        fail_writes: bool,
    }

    impl MemDisk {
        fn new(bytes: usize) -> MemDisk {
            MemDisk {
                data: vec![0; bytes],
                durable: vec![0; bytes],
                flushes: 0,
                fail_writes: false,
            }
        }

        /// The disk as it would be found after a power loss.
        fn after_power_loss(&self) -> MemDisk {
            let mut d = MemDisk::new(self.data.len());
            d.data = self.durable.clone();
            d.durable = self.durable.clone();
            d
        }
    }

    impl Device for MemDisk {
        type Error = String;

        fn capacity(&self) -> u64 {
            self.data.len() as u64
        }

        fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), String> {
            let at = sector as usize * SECTOR;
            buf.copy_from_slice(&self.data[at..at + buf.len()]);
            Ok(())
        }

        fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), String> {
            if self.fail_writes {
                return Err("injected I/O error".into());
            }
            assert_eq!(buf.len() % SECTOR, 0);
            let at = sector as usize * SECTOR;
            self.data[at..at + buf.len()].copy_from_slice(buf);
            Ok(())
        }

        fn flush(&mut self) -> Result<(), String> {
            self.durable = self.data.clone();
            self.flushes += 1;
            Ok(())
        }
    }

    fn rec(args: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        let a: Vec<&[u8]> = args.iter().map(|s| s.as_bytes()).collect();
        resp::encode_command(&mut out, &a);
        out
    }

    fn open(disk: MemDisk, policy: Fsync) -> (Aof<MemDisk>, Vec<Vec<Vec<u8>>>) {
        let mut seen = Vec::new();
        let aof = Aof::open(disk, policy, 0, |c| seen.push(c)).expect("open");
        (aof, seen)
    }

    fn args(words: &[&str]) -> Vec<Vec<u8>> {
        words.iter().map(|w| w.as_bytes().to_vec()).collect()
    }

    #[test]
    fn a_fresh_disk_is_formatted_and_records_replay_in_order() {
        let (mut aof, seen) = open(MemDisk::new(64 * 1024), Fsync::Always);
        assert!(seen.is_empty());
        assert!(aof.device().data.starts_with(HEADER));
        let mut batch = rec(&["SET", "a", "1"]);
        batch.extend(rec(&["SET", "b", "2"]));
        aof.append(&batch, 1).unwrap();
        aof.append(&rec(&["DEL", "a"]), 2).unwrap();
        let (aof2, seen) = open(aof.device().clone(), Fsync::Always);
        assert_eq!(
            seen,
            [
                args(&["SET", "a", "1"]),
                args(&["SET", "b", "2"]),
                args(&["DEL", "a"])
            ]
        );
        assert_eq!(aof2.len(), aof.len());
    }

    #[test]
    fn records_spanning_sectors_and_chunks_replay() {
        let (mut aof, _) = open(MemDisk::new(1 << 20), Fsync::No);
        let big = "x".repeat(CHUNK + 700);
        for i in 0..5 {
            aof.append(&rec(&["SET", &format!("k{i}"), &big]), 0)
                .unwrap();
            aof.append(&rec(&["INCR", "n"]), 0).unwrap();
        }
        let (_, seen) = open(aof.device().clone(), Fsync::No);
        assert_eq!(seen.len(), 10);
        assert_eq!(seen[8][2].len(), big.len());
    }

    #[test]
    fn a_foreign_disk_is_refused_and_left_alone() {
        let mut d = MemDisk::new(4096);
        d.data.fill(0x55);
        let before = d.data.clone();
        match Aof::open(d, Fsync::Always, 0, |_| {}) {
            Err(AofError::Foreign) => {}
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a foreign disk was opened"),
        }
        assert!(before.iter().all(|&b| b == 0x55));
    }

    #[test]
    fn a_torn_last_record_is_dropped_at_every_cut_and_zeroed() {
        let (mut aof, _) = open(MemDisk::new(64 * 1024), Fsync::Always);
        aof.append(&rec(&["SET", "kept", "1"]), 0).unwrap();
        let kept_len = aof.len() as usize;
        let last = rec(&["SET", "torn", &"v".repeat(1200)]);
        aof.append(&last, 0).unwrap();
        let full = aof.device().clone();
        let start = SECTOR + kept_len;
        for cut in 1..last.len() {
            // The crash left only the first `cut` bytes of the last record.
            let mut d = full.clone();
            d.data[start + cut..start + last.len()].fill(0);
            let (mut aof, seen) = open(d, Fsync::Always);
            assert_eq!(seen, [args(&["SET", "kept", "1"])], "cut at {cut}");
            assert_eq!(aof.len() as usize, kept_len);
            assert!(
                aof.device().data[start..].iter().all(|&b| b == 0),
                "torn bytes zeroed (cut at {cut})"
            );
            // A later, shorter record is not followed by stale bytes.
            aof.append(&rec(&["DEL", "kept"]), 0).unwrap();
            let (_, seen) = open(aof.device().clone(), Fsync::Always);
            assert_eq!(seen, [args(&["SET", "kept", "1"]), args(&["DEL", "kept"])]);
        }
    }

    #[test]
    fn garbage_after_the_log_ends_it() {
        let (mut aof, _) = open(MemDisk::new(64 * 1024), Fsync::Always);
        aof.append(&rec(&["SET", "a", "1"]), 0).unwrap();
        let mut d = aof.device().clone();
        let end = SECTOR + aof.len() as usize;
        d.data[end..end + 5].copy_from_slice(b"\xff\xfe$$*");
        let (aof, seen) = open(d, Fsync::Always);
        assert_eq!(seen.len(), 1);
        assert!(aof.device().data[end..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_full_disk_refuses_the_append_and_keeps_the_log() {
        let (mut aof, _) = open(MemDisk::new(2 * SECTOR), Fsync::Always);
        let r = rec(&["SET", "k", &"v".repeat(400)]);
        aof.append(&r, 0).unwrap();
        assert_eq!(aof.append(&r, 0), Err(AofError::Full));
        let (_, seen) = open(aof.device().clone(), Fsync::Always);
        assert_eq!(seen.len(), 1);
    }

    #[test]
    fn a_failed_write_leaves_the_log_as_it_was() {
        let (mut aof, _) = open(MemDisk::new(64 * 1024), Fsync::Always);
        aof.append(&rec(&["SET", "a", "1"]), 0).unwrap();
        aof.disk.fail_writes = true;
        assert!(matches!(
            aof.append(&rec(&["SET", "b", "2"]), 0),
            Err(AofError::Disk(_))
        ));
        aof.disk.fail_writes = false;
        aof.append(&rec(&["SET", "c", "3"]), 0).unwrap();
        let (_, seen) = open(aof.device().clone(), Fsync::Always);
        assert_eq!(seen, [args(&["SET", "a", "1"]), args(&["SET", "c", "3"])]);
    }

    #[test]
    fn always_makes_every_append_durable_before_it_returns() {
        let (mut aof, _) = open(MemDisk::new(64 * 1024), Fsync::Always);
        for i in 0..10 {
            aof.append(&rec(&["SET", "k", &format!("{i}")]), i).unwrap();
            let (_, seen) = open(aof.device().after_power_loss(), Fsync::Always);
            assert_eq!(seen.len() as u64, i + 1);
        }
        assert_eq!(aof.flush_due(), None);
    }

    #[test]
    fn everysec_flushes_on_a_one_second_timer_not_on_append() {
        let (mut aof, _) = open(MemDisk::new(64 * 1024), Fsync::EverySec);
        let flushes = aof.device().flushes;
        assert_eq!(aof.flush_due(), None, "nothing written, nothing due");
        // Opened at t=0: a write at t=100 is due at t=1000.
        aof.append(&rec(&["SET", "a", "1"]), 100).unwrap();
        assert_eq!(aof.device().flushes, flushes, "append does not flush");
        assert_eq!(aof.flush_due(), Some(1000));
        let (_, seen) = open(aof.device().after_power_loss(), Fsync::EverySec);
        assert!(seen.is_empty(), "not durable before the timer");
        aof.append(&rec(&["SET", "b", "2"]), 900).unwrap();
        assert_eq!(aof.flush_due(), Some(1000), "later writes do not delay it");
        aof.flush(1000).unwrap();
        let (_, seen) = open(aof.device().after_power_loss(), Fsync::EverySec);
        assert_eq!(seen.len(), 2);
        assert_eq!(aof.flush_due(), None);
        // After a quiet spell the next write is due at once.
        aof.append(&rec(&["SET", "c", "3"]), 5000).unwrap();
        assert_eq!(aof.flush_due(), Some(2000));
    }

    #[test]
    fn no_never_flushes_but_writes_reach_the_device() {
        let (mut aof, _) = open(MemDisk::new(64 * 1024), Fsync::No);
        let flushes = aof.device().flushes;
        for i in 0..5 {
            aof.append(&rec(&["SET", "k", "v"]), i * 10_000).unwrap();
            assert_eq!(aof.flush_due(), None);
        }
        assert_eq!(aof.device().flushes, flushes);
        // A killed guest or monitor loses nothing (the host file has it)...
        let (_, seen) = open(aof.device().clone(), Fsync::No);
        assert_eq!(seen.len(), 5);
        // ...a power loss loses what the host had not written back.
        let (_, seen) = open(aof.device().after_power_loss(), Fsync::No);
        assert!(seen.is_empty());
    }

    #[test]
    fn switching_policy_takes_effect_on_the_next_append() {
        let (mut aof, _) = open(MemDisk::new(64 * 1024), Fsync::No);
        aof.append(&rec(&["SET", "a", "1"]), 0).unwrap();
        aof.set_policy(Fsync::Always);
        aof.append(&rec(&["SET", "b", "2"]), 0).unwrap();
        let (_, seen) = open(aof.device().after_power_loss(), Fsync::No);
        assert_eq!(seen.len(), 2, "the flush covers earlier writes too");
    }
}

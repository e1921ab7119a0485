//! Append-only persistence on the block device.
//!
//! Layout: sector 0 holds a header (`WISPKV-AOF v1`); from byte 512 on, the
//! log is the sequence of mutating commands as RESP arrays, exactly as
//! replayed. The log's end is where the bytes stop parsing as a command:
//! zeros on a fresh disk, or the torn remains of a write interrupted by a
//! crash. Such remains are zeroed at open, so a later, shorter record can
//! never be followed by stale bytes that parse.
//!
//! fsync policy (`--appendfsync`, default `always`): with `always` every
//! batch of writes from one client read is written and flushed (the
//! monitor `fdatasync`s the file) before the replies are sent, so a reply
//! means the data survives a killed monitor; with `everysec` the flush
//! happens at most once a second; with `no` only when the log is closed.

use alloc::vec;
use alloc::vec::Vec;

use wisp_blk::{BlkError, Disk, SECTOR};

use crate::resp;

const HEADER: &[u8] = b"WISPKV-AOF v1\n";
const LOG_START: u64 = SECTOR as u64;
/// Bytes read at a time while replaying.
const CHUNK: usize = 64 * 1024;
/// Longest record: more unparsed bytes than this is a torn record.
const MAX_RECORD: u64 = resp::MAX_BULK as u64 + 64 * 1024;

/// A command: its arguments.
pub type Command = Vec<Vec<u8>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    Always,
    EverySec,
    No,
}

#[derive(Debug)]
pub enum AofError {
    /// The disk holds something else: it is not overwritten.
    Foreign,
    Full,
    Disk(BlkError),
}

impl core::fmt::Display for AofError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AofError::Foreign => f.write_str("the disk is not a kv log (refusing to overwrite it)"),
            AofError::Full => f.write_str("the disk is full"),
            AofError::Disk(e) => write!(f, "{e}"),
        }
    }
}

impl From<BlkError> for AofError {
    fn from(e: BlkError) -> Self {
        AofError::Disk(e)
    }
}

pub struct Aof {
    disk: Disk,
    /// Bytes of log.
    len: u64,
    /// The log's last partial sector (its first `len % SECTOR` bytes).
    tail: Vec<u8>,
    policy: Fsync,
    last_flush_ms: u64,
    dirty: bool,
}

impl Aof {
    /// Opens (or formats) the log and returns the commands to replay.
    pub fn open(mut disk: Disk, policy: Fsync) -> Result<(Aof, Vec<Command>), AofError> {
        let mut first = vec![0u8; SECTOR];
        disk.read_now(0, &mut first)?;
        if first.iter().all(|&b| b == 0) {
            first[..HEADER.len()].copy_from_slice(HEADER);
            disk.write_now(0, &first)?;
            disk.flush_now()?;
        } else if !first.starts_with(HEADER) {
            return Err(AofError::Foreign);
        }

        let capacity = disk.capacity();
        let mut commands = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        let mut buf_start = LOG_START; // disk offset of buf[0]
        let mut read_to = LOG_START; // disk offset up to which buf is filled
        let len;
        loop {
            match resp::parse(&buf) {
                Ok((args, used)) if buf.first() == Some(&b'*') => {
                    commands.push(args);
                    buf.drain(..used);
                    buf_start += used as u64;
                }
                Err(resp::Error::Incomplete)
                    if buf.first() != Some(&0)
                        && read_to < capacity
                        && read_to - buf_start < MAX_RECORD =>
                {
                    let n = CHUNK.min((capacity - read_to) as usize);
                    let mut chunk = vec![0u8; n];
                    disk.read_now(read_to / SECTOR as u64, &mut chunk)?;
                    buf.extend_from_slice(&chunk);
                    read_to += n as u64;
                }
                _ => {
                    // End of the log: zeros, or torn remains of a write.
                    len = buf_start - LOG_START;
                    break;
                }
            }
        }
        let mut aof = Aof {
            disk,
            len,
            tail: Vec::new(),
            policy,
            last_flush_ms: 0,
            dirty: false,
        };
        if buf.iter().any(|&b| b != 0) {
            aof.zero_torn_remains()?;
        }
        let tail_start = (LOG_START + aof.len) / SECTOR as u64 * SECTOR as u64;
        let mut sector = vec![0u8; SECTOR];
        if tail_start < capacity {
            aof.disk.read_now(tail_start / SECTOR as u64, &mut sector)?;
        }
        aof.tail = sector[..((LOG_START + aof.len) % SECTOR as u64) as usize].to_vec();
        Ok((aof, commands))
    }

    /// Zeroes the non-zero bytes that follow the log's end, up to the
    /// first all-zero sector (bounded: a torn record is at most one record).
    fn zero_torn_remains(&mut self) -> Result<(), AofError> {
        let end = LOG_START + self.len;
        let first_sector = end / SECTOR as u64;
        let last =
            ((end + MAX_RECORD) / SECTOR as u64 + 1).min(self.disk.capacity() / SECTOR as u64);
        let mut s = vec![0u8; SECTOR];
        for sector in first_sector..last {
            self.disk.read_now(sector, &mut s)?;
            let from = if sector == first_sector {
                (end % SECTOR as u64) as usize
            } else {
                0
            };
            if s[from..].iter().all(|&b| b == 0) {
                break;
            }
            s[from..].fill(0);
            self.disk.write_now(sector, &s)?;
        }
        self.disk.flush_now()?;
        Ok(())
    }

    /// Appends records (whole RESP commands); flushes per the policy.
    pub fn append(&mut self, records: &[u8], now_ms: u64) -> Result<(), AofError> {
        if records.is_empty() {
            return Ok(());
        }
        if LOG_START + self.len + records.len() as u64 > self.disk.capacity() {
            return Err(AofError::Full);
        }
        let start_sector = (LOG_START + self.len) / SECTOR as u64;
        let mut data = core::mem::take(&mut self.tail);
        data.extend_from_slice(records);
        let whole = data.len().div_ceil(SECTOR) * SECTOR;
        let keep = data.len() % SECTOR;
        let mut padded = data.clone();
        padded.resize(whole, 0);
        let r = self.disk.write_now(start_sector, &padded);
        if let Err(e) = r {
            data.truncate(data.len() - records.len());
            self.tail = data;
            return Err(e.into());
        }
        self.len += records.len() as u64;
        self.tail = if keep == 0 {
            Vec::new()
        } else {
            data[data.len() - keep..].to_vec()
        };
        self.dirty = true;
        let flush = match self.policy {
            Fsync::Always => true,
            Fsync::EverySec => now_ms.saturating_sub(self.last_flush_ms) >= 1000,
            Fsync::No => false,
        };
        if flush {
            self.flush(now_ms)?;
        }
        Ok(())
    }

    /// Flushes if anything was written since the last flush.
    pub fn flush(&mut self, now_ms: u64) -> Result<(), AofError> {
        if self.dirty {
            self.disk.flush_now()?;
            self.dirty = false;
            self.last_flush_ms = now_ms;
        }
        Ok(())
    }

    /// Bytes of log.
    pub fn len(&self) -> u64 {
        self.len
    }
}

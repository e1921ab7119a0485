//! virtio-blk (device ID 2) backed by a host file.
//!
//! One request queue; each request is processed synchronously when the
//! guest notifies the queue. A flush (`VIRTIO_BLK_T_FLUSH`) is completed
//! only after `fdatasync` of the file returns, so data the guest flushed
//! survives a killed monitor. Every request is checked: header and status
//! descriptors in the right direction, sector range inside the disk
//! (checked arithmetic), data a whole number of sectors; a request that
//! breaks the rules gets `VIRTIO_BLK_S_IOERR`, and a chain that breaks the
//! queue's rules stops the device. Rings and every buffer (header, data,
//! status) must be memory the guest itself may read, or write where the
//! device writes ([`GuestAccess`]); anything else stops the device before
//! the request runs.

use std::fs::File;
use std::os::unix::fs::FileExt;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::mmio::VirtioDevice;
use super::{F_RING_EVENT_IDX, F_VERSION_1};
use crate::devices::guest_access::GuestAccess;
use crate::ratelimit::Limits;

pub const SECTOR: u64 = 512;
pub const QUEUE_SIZE: u16 = 128;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// Largest data transfer of one request.
const MAX_REQUEST: u64 = 4 << 20;

#[derive(Clone, Copy, Debug, Default)]
pub struct BlockStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub errors: u64,
    /// Data bytes moved by completed reads (disk to guest) and writes
    /// (guest to disk).
    pub read_bytes: u64,
    pub write_bytes: u64,
}

pub struct Block {
    file: File,
    capacity_sectors: u64,
    read_only: bool,
    mem: GuestMemoryMmap,
    /// What the device may read and write in `mem`.
    access: GuestAccess,
    queue: Option<Queue>,
    pub broken: Option<String>,
    pub stats: BlockStats,
    /// Limits on requests and bytes (the guest is stalled to meet them).
    pub limits: Limits,
}

/// One parsed request: where its data lives in guest memory.
struct Request {
    kind: u32,
    sector: u64,
    /// (address, length, device-writable)
    data: Vec<(GuestAddress, u32, bool)>,
    status: GuestAddress,
}

impl Block {
    /// Opens the backing file (read-write unless `read_only`).
    pub fn open(
        path: &std::path::Path,
        read_only: bool,
        mem: GuestMemoryMmap,
        access: GuestAccess,
    ) -> std::io::Result<Block> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)?;
        Block::from_file(file, read_only, mem, access)
    }

    /// A disk backed by a file already open (e.g. handed over by another
    /// process); it must be writable unless `read_only`.
    pub fn from_file(
        file: std::fs::File,
        read_only: bool,
        mem: GuestMemoryMmap,
        access: GuestAccess,
    ) -> std::io::Result<Block> {
        let len = file.metadata()?.len();
        Ok(Block {
            file,
            capacity_sectors: len / SECTOR,
            read_only,
            mem,
            access,
            queue: None,
            broken: None,
            stats: BlockStats::default(),
            limits: Limits::default(),
        })
    }

    /// Size of the disk in bytes (whole sectors; a partial last sector of
    /// the file is not exposed).
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_sectors * SECTOR
    }

    fn fail(&mut self, why: String) {
        if self.broken.is_none() {
            crate::report(format_args!("wisp: virtio-blk stopped: {why}"));
            self.broken = Some(why);
        }
    }

    /// Executes a request; returns the status byte and bytes written to the
    /// guest.
    fn execute(&mut self, r: &Request) -> (u8, u32) {
        let total: u64 = r.data.iter().map(|d| d.1 as u64).sum();
        self.limits.wait_for(total.min(MAX_REQUEST));
        let in_range = |len: u64| {
            len.is_multiple_of(SECTOR)
                && len <= MAX_REQUEST
                && r.sector
                    .checked_add(len / SECTOR)
                    .is_some_and(|end| end <= self.capacity_sectors)
        };
        match r.kind {
            T_IN => {
                if !in_range(total) || r.data.iter().any(|d| !d.2) {
                    return (S_IOERR, 0);
                }
                let mut off = r.sector * SECTOR;
                let mut buf = Vec::new();
                for &(addr, len, _) in &r.data {
                    buf.resize(len as usize, 0);
                    if self.file.read_exact_at(&mut buf, off).is_err()
                        || self.mem.write_slice(&buf, addr).is_err()
                    {
                        return (S_IOERR, 0);
                    }
                    off += len as u64;
                }
                self.stats.reads += 1;
                self.stats.read_bytes += total;
                (S_OK, total as u32)
            }
            T_OUT => {
                if self.read_only {
                    return (S_IOERR, 0);
                }
                if !in_range(total) || r.data.iter().any(|d| d.2) {
                    return (S_IOERR, 0);
                }
                let mut off = r.sector * SECTOR;
                let mut buf = Vec::new();
                for &(addr, len, _) in &r.data {
                    buf.resize(len as usize, 0);
                    if self.mem.read_slice(&mut buf, addr).is_err()
                        || self.file.write_all_at(&buf, off).is_err()
                    {
                        return (S_IOERR, 0);
                    }
                    off += len as u64;
                }
                self.stats.writes += 1;
                self.stats.write_bytes += total;
                (S_OK, 0)
            }
            T_FLUSH => {
                self.stats.flushes += 1;
                if self.read_only || self.file.sync_data().is_ok() {
                    (S_OK, 0)
                } else {
                    (S_IOERR, 0)
                }
            }
            T_GET_ID => {
                let id = b"wisp-disk\0\0\0\0\0\0\0\0\0\0\0";
                match r.data.first() {
                    Some(&(addr, len, true))
                        if self
                            .mem
                            .write_slice(&id[..(len as usize).min(20)], addr)
                            .is_ok() =>
                    {
                        (S_OK, (len as usize).min(20) as u32)
                    }
                    _ => (S_IOERR, 0),
                }
            }
            _ => (S_UNSUPP, 0),
        }
    }

    /// Processes every pending request.
    pub fn process_queue(&mut self) {
        if self.broken.is_some() {
            return;
        }
        let Some(mut q) = self.queue.take() else {
            return;
        };
        let mut requests = Vec::new();
        let parsed = (|| -> Result<(), String> {
            let iter = q
                .iter(&self.mem)
                .map_err(|e| format!("request queue: {e}"))?;
            for chain in iter {
                let head = chain.head_index();
                let descs: Vec<_> = chain.collect();
                // virtio-queue ends a chain after queue-size descriptors; one
                // that still points on loops (or is longer than the ring).
                if descs.last().is_some_and(|d| d.has_next()) {
                    return Err("request descriptor chain loops or is longer than the queue".into());
                }
                if descs.len() < 2 {
                    return Err("request chain shorter than header + status".into());
                }
                let hdr = descs[0];
                let status = descs[descs.len() - 1];
                if hdr.is_write_only()
                    || hdr.len() < 16
                    || !status.is_write_only()
                    || status.len() < 1
                {
                    return Err("request header or status descriptor malformed".into());
                }
                // Every buffer in the direction the device uses it: header
                // and data it reads, data and status it writes.
                for d in &descs {
                    self.access
                        .check(d.addr().0, d.len().into(), d.is_write_only())
                        .map_err(|e| format!("request buffer refused: {e}"))?;
                }
                let mut h = [0u8; 16];
                self.mem
                    .read_slice(&mut h, hdr.addr())
                    .map_err(|_| "request header outside guest memory".to_string())?;
                let kind = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
                let sector = u64::from_le_bytes(h[8..16].try_into().unwrap_or([0; 8]));
                let data = descs[1..descs.len() - 1]
                    .iter()
                    .map(|d| (d.addr(), d.len(), d.is_write_only()))
                    .collect();
                requests.push((
                    head,
                    Request {
                        kind,
                        sector,
                        data,
                        status: status.addr(),
                    },
                ));
            }
            Ok(())
        })();
        for (head, r) in requests {
            let (status, written) = self.execute(&r);
            if status != S_OK {
                self.stats.errors += 1;
            }
            if self.mem.write_obj(status, r.status).is_err() {
                self.fail("status byte outside guest memory".into());
                break;
            }
            if let Err(e) = q.add_used(&self.mem, head, written + 1) {
                self.fail(format!("used ring: {e}"));
                break;
            }
        }
        if let Err(e) = parsed {
            self.fail(e);
        }
        let _ = q.enable_notification(&self.mem);
        self.queue = Some(q);
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        2
    }

    fn avail_features(&self) -> u64 {
        let mut f = F_VERSION_1 | F_RING_EVENT_IDX | F_FLUSH;
        if self.read_only {
            f |= F_RO;
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // capacity (u64, in 512-byte sectors) is the only field offered.
        let cfg = self.capacity_sectors.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, mut queues: Vec<Queue>, _acked: u64) {
        match queues.pop() {
            Some(q) if q.is_valid(&self.mem) => match self.access.check_queue(&q) {
                Ok(()) => self.queue = Some(q),
                Err(e) => self.fail(format!("request queue refused: {e}")),
            },
            _ => self.fail("request queue is not valid (addresses or size)".into()),
        }
    }

    fn queue_notify(&mut self, _index: u16) {
        self.process_queue();
    }

    fn broken(&self) -> bool {
        self.broken.is_some()
    }

    fn active_queues(&self) -> Vec<virtio_queue::QueueState> {
        self.queue.iter().map(|q| q.state()).collect()
    }

    fn reset(&mut self) {
        self.queue = None;
        self.broken = None;
    }
}

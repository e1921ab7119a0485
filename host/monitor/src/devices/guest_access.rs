//! What a device may touch in guest memory: the map the guest's CPU runs
//! with, and no more.
//!
//! Devices reach guest memory through the monitor's mapping of it, not
//! through the guest's page tables, so `vm-memory`'s range check alone
//! would let a driver aim a block read, a receive buffer or a ring at its
//! own page tables, GDT, IDT, TSS, boot page or code, and so reach CPL0 or
//! rewrite what the CPU runs (there is no IOMMU between them). Every device
//! access is checked here first: a device writes only pages CPL3 may write
//! (data, bss, heap, stacks) and reads only pages CPL3 may read.
//!
//! The map is read off the page tables the monitor wrote into guest memory
//! before entry, which are what the CPU walks and which neither the guest
//! (supervisor-only) nor a device (not guest-writable) can change, so the
//! two cannot disagree whatever builds the tables. Only identity-mapped
//! user pages inside guest RAM are granted.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};
use wisp_abi::x86::pte;

use crate::layout::Layout;

/// Entries per page-table page.
const ENTRIES: usize = 512;
/// Bytes of one descriptor, and of the fixed parts of the rings (flags,
/// index and the event field), virtio 1.2 2.7.
const DESC_SIZE: u64 = 16;
const RING_META: u64 = 6;
const AVAIL_ELEM: u64 = 2;
const USED_ELEM: u64 = 8;

/// Why a device access was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error("{addr:#x}+{len:#x} runs past the end of the address space")]
    Wraps { addr: u64, len: u64 },
    #[error("{addr:#x}+{len:#x} is outside guest memory")]
    Outside { addr: u64, len: u64 },
    #[error("{addr:#x}+{len:#x} is not {} by the guest (at {at:#x})", if *.write { "writable" } else { "readable" })]
    Denied {
        addr: u64,
        len: u64,
        /// First byte of the range the guest may not access so.
        at: u64,
        write: bool,
    },
}

/// A virtqueue whose rings are not all in guest-writable memory.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{ring}: {source}")]
pub struct RingError {
    /// "descriptor table", "available ring" or "used ring".
    pub ring: &'static str,
    pub source: AccessError,
}

/// One run of pages with the same permission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Range {
    start: u64,
    end: u64,
    writable: bool,
}

/// The guest-physical ranges a device may read, and those it may write.
///
/// Cheap to clone (shared), `Send` and `Sync`: each device keeps a copy.
#[derive(Clone, Debug)]
pub struct GuestAccess {
    /// Sorted, non-overlapping, adjacent runs of equal permission merged.
    ranges: Arc<[Range]>,
    /// End of guest memory (nothing at or above it is memory).
    limit: u64,
    /// Where granted writes are recorded while a live migration tracks
    /// the pages devices write ([`GuestAccess::tracking`]).
    dirty: Option<Arc<crate::memory::DirtyPages>>,
}

impl GuestAccess {
    /// The map of the guest laid out as `layout`, read from the page tables
    /// already written into `mem` (call it after the boot structures are
    /// written, before the guest runs).
    pub fn for_guest<M: GuestMemory>(mem: &M, layout: &Layout) -> GuestAccess {
        Self::from_page_tables(mem, layout.pml4, layout.mem_size)
    }

    /// Walks the 4-level page tables rooted at `pml4` in `mem` and grants
    /// what CPL3 may do on each identity-mapped page below `limit`: read a
    /// present user page, write one that is also writable at every level.
    /// A table that cannot be read grants nothing.
    pub fn from_page_tables<M: GuestMemory>(mem: &M, pml4: u64, limit: u64) -> GuestAccess {
        let mut ranges = Vec::new();
        walk(mem, pml4, 4, 0, true, &mut |virt, size, entry, writable| {
            let frame = entry & pte::ADDR_MASK & !(size - 1);
            // A device uses physical addresses; grant a frame only where
            // the CPU sees it at the same address.
            if frame != virt || virt >= limit {
                return;
            }
            let end = virt.saturating_add(size).min(limit);
            ranges.push((virt, end, writable));
        });
        GuestAccess {
            limit,
            ..Self::from_ranges(ranges)
        }
    }

    /// A map from explicit `(start, end, writable)` ranges (for tests and
    /// fuzzing), guest memory ending with the last. Where ranges overlap,
    /// the earlier one (by start) wins.
    pub fn from_ranges(ranges: impl IntoIterator<Item = (u64, u64, bool)>) -> GuestAccess {
        let mut input: Vec<Range> = ranges
            .into_iter()
            .filter(|&(start, end, _)| start < end)
            .map(|(start, end, writable)| Range {
                start,
                end,
                writable,
            })
            .collect();
        input.sort_by_key(|r| r.start);
        let mut out: Vec<Range> = Vec::with_capacity(input.len());
        for mut r in input {
            if let Some(last) = out.last_mut() {
                r.start = r.start.max(last.end);
                if r.start >= r.end {
                    continue;
                }
                if last.end == r.start && last.writable == r.writable {
                    last.end = r.end;
                    continue;
                }
            }
            out.push(r);
        }
        GuestAccess {
            limit: out.last().map_or(0, |r| r.end),
            ranges: out.into(),
            dirty: None,
        }
    }

    /// This map, recording every write it grants in `dirty`: each device
    /// checks a write here just before it makes it, which is how a live
    /// migration learns of the pages the monitor wrote.
    pub fn tracking(mut self, dirty: Arc<crate::memory::DirtyPages>) -> GuestAccess {
        self.dirty = Some(dirty);
        self
    }

    /// May a device read `len` bytes at `addr`?
    pub fn check_read(&self, addr: u64, len: u64) -> Result<(), AccessError> {
        self.check(addr, len, false)
    }

    /// May a device write `len` bytes at `addr`?
    pub fn check_write(&self, addr: u64, len: u64) -> Result<(), AccessError> {
        self.check(addr, len, true)
    }

    /// [`Self::check_write`] if `write`, else [`Self::check_read`]. An
    /// empty access touches nothing and is allowed.
    pub fn check(&self, addr: u64, len: u64, write: bool) -> Result<(), AccessError> {
        self.check_only(addr, len, write)?;
        if let (true, Some(d)) = (write, &self.dirty) {
            d.mark(addr, len);
        }
        Ok(())
    }

    fn check_only(&self, addr: u64, len: u64, write: bool) -> Result<(), AccessError> {
        let end = addr
            .checked_add(len)
            .ok_or(AccessError::Wraps { addr, len })?;
        if len == 0 {
            return Ok(());
        }
        if end > self.limit {
            return Err(AccessError::Outside { addr, len });
        }
        let denied = |at| AccessError::Denied {
            addr,
            len,
            at,
            write,
        };
        // First range that ends after `addr`; then consecutive ranges must
        // cover [addr, end) without a gap, each with the permission.
        let first = self.ranges.partition_point(|r| r.end <= addr);
        let mut at = addr;
        for r in &self.ranges[first..] {
            if r.start > at || (write && !r.writable) {
                return Err(denied(at));
            }
            at = r.end;
            if at >= end {
                return Ok(());
            }
        }
        Err(denied(at))
    }

    /// Checks that every ring of `queue` (descriptor table, available and
    /// used ring, with their event fields) lies in guest-writable memory:
    /// the driver writes the first two and the device the third, so a ring
    /// anywhere else is a driver aiming the device at memory it may not
    /// write.
    pub fn check_queue(&self, queue: &Queue) -> Result<(), RingError> {
        let size = u64::from(queue.size());
        let rings = [
            ("descriptor table", queue.desc_table(), DESC_SIZE * size),
            (
                "available ring",
                queue.avail_ring(),
                RING_META + AVAIL_ELEM * size,
            ),
            ("used ring", queue.used_ring(), RING_META + USED_ELEM * size),
        ];
        for (ring, addr, len) in rings {
            self.check_write(addr, len)
                .map_err(|source| RingError { ring, source })?;
        }
        Ok(())
    }
}

/// Calls `leaf(virtual address, page size, entry, writable)` for every
/// present leaf entry that CPL3 may reach (USER set at every level) under
/// the table at `table` of `level` (4 = PML4) mapping from `base`.
fn walk<M: GuestMemory>(
    mem: &M,
    table: u64,
    level: u32,
    base: u64,
    writable: bool,
    leaf: &mut dyn FnMut(u64, u64, u64, bool),
) {
    let mut raw = [0u8; ENTRIES * 8];
    if mem.read_slice(&mut raw, GuestAddress(table)).is_err() {
        return;
    }
    let shift = 12 + 9 * (level - 1);
    // Only the lower canonical half can be identity-mapped RAM.
    let count = if level == 4 { ENTRIES / 2 } else { ENTRIES };
    for (i, bytes) in raw.chunks_exact(8).take(count).enumerate() {
        let entry = u64::from_le_bytes(bytes.try_into().unwrap_or([0; 8]));
        if entry & pte::PRESENT == 0 || entry & pte::USER == 0 {
            continue;
        }
        let virt = base | ((i as u64) << shift);
        let writable = writable && entry & pte::WRITABLE != 0;
        let size = 1u64 << shift;
        if level == 1 || (level <= 3 && entry & pte::HUGE != 0) {
            leaf(virt, size, entry, writable);
        } else if entry & pte::HUGE == 0 {
            // (PS in a PML4 entry is reserved: such an entry maps nothing.)
            walk(mem, entry & pte::ADDR_MASK, level - 1, virt, writable, leaf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot;
    use crate::image::Image;
    use crate::paging::page_flags;
    use crate::testing::{valid_elf, DATA, TEXT};
    use vm_memory::GuestMemoryMmap;

    const MEM: u64 = 6 << 20; // a partial last 2 MiB region: 4 KiB tables there too

    /// A guest as the monitor builds it: image loaded, tables written.
    fn guest(devices: bool) -> (GuestMemoryMmap, Layout, Image, GuestAccess) {
        let img = Image::parse(valid_elf()).expect("valid");
        let l = Layout::with_devices(&img, MEM + (1 << 20), 10, devices).expect("fits");
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), l.mem_size as usize)])
            .expect("memory");
        boot::load_image(&mem, &img).expect("load");
        boot::write_system(&mem, &l, &img, b"arguments\0").expect("system");
        let access = GuestAccess::for_guest(&mem, &l);
        (mem, l, img, access)
    }

    #[test]
    fn follows_the_cpu_map_page_by_page() {
        for devices in [false, true] {
            let (_, l, img, a) = guest(devices);
            let (mut readable, mut writable) = (0, 0);
            for page in (0..l.mem_size + (2 << 20)).step_by(4096) {
                let f = page_flags(&l, &img, page);
                let user = f & pte::PRESENT != 0 && f & pte::USER != 0;
                let write = user && f & pte::WRITABLE != 0;
                assert_eq!(a.check_read(page, 4096).is_ok(), user, "read {page:#x}");
                assert_eq!(a.check_write(page, 4096).is_ok(), write, "write {page:#x}");
                readable += u64::from(user);
                writable += u64::from(write);
            }
            assert!(
                writable > 1000 && readable > writable,
                "{readable} {writable}"
            );
        }
    }

    #[test]
    fn system_structures_boot_page_and_code_are_refused() {
        let (_, l, _, a) = guest(true);
        for (what, addr) in [
            ("null page", 0),
            ("PML4", l.pml4),
            ("page directory", l.pd_base),
            ("page table", l.pt_base),
            ("GDT", l.gdt),
            ("IDT", l.idt),
            ("TSS", l.tss),
        ] {
            assert!(a.check_read(addr, 1).is_err(), "{what} read");
            assert!(a.check_write(addr, 1).is_err(), "{what} write");
        }
        for (what, addr) in [("boot page", l.boot_page), ("args", l.args), ("text", TEXT)] {
            assert!(a.check_read(addr, 16).is_ok(), "{what} readable");
            assert_eq!(
                a.check_write(addr, 16),
                Err(AccessError::Denied {
                    addr,
                    len: 16,
                    at: addr,
                    write: true
                }),
                "{what}"
            );
        }
        assert!(a.check_write(DATA, 0x1000).is_ok());
        assert!(a.check_write(l.image_end, 1 << 20).is_ok());
        assert!(
            a.check_write(l.boot_area_end, 4096).is_ok(),
            "free memory below the image"
        );
    }

    #[test]
    fn ranges_straddling_a_boundary_or_leaving_memory_are_refused() {
        let (_, l, _, a) = guest(true);
        // Free memory running into the image's text: refused at TEXT.
        let start = TEXT - 64;
        match a.check_write(start, 128) {
            Err(AccessError::Denied { at, .. }) => assert_eq!(at, TEXT),
            other => panic!("{other:?}"),
        }
        assert!(a.check_read(start, 128).is_ok(), "both sides are readable");
        // The last byte of RAM is writable; one more is not.
        assert!(a.check_write(l.mem_size - 1, 1).is_ok());
        assert_eq!(
            a.check_write(l.mem_size - 1, 2),
            Err(AccessError::Outside {
                addr: l.mem_size - 1,
                len: 2
            })
        );
        // The device window is mapped for the CPU but is not memory.
        assert!(matches!(
            a.check_read(crate::devices::MMIO_BASE, 4),
            Err(AccessError::Outside { .. })
        ));
        assert!(a.check_write(u64::MAX, 1).is_err());
        assert_eq!(
            a.check_read(u64::MAX - 1, 4),
            Err(AccessError::Wraps {
                addr: u64::MAX - 1,
                len: 4
            })
        );
        assert!(
            a.check_write(l.pml4, 0).is_ok(),
            "an empty access touches nothing"
        );
    }

    #[test]
    fn queues_need_every_ring_in_writable_memory() {
        let (mem, l, _, a) = guest(true);
        let ring = |desc: u64, avail: u64, used: u64| {
            let mut q = Queue::new(8).expect("queue");
            q.set_size(8);
            q.set_desc_table_address(Some(desc as u32), Some(0));
            q.set_avail_ring_address(Some(avail as u32), Some(0));
            q.set_used_ring_address(Some(used as u32), Some(0));
            q.set_ready(true);
            assert!(q.is_valid(&mem), "inside RAM: only the map can refuse it");
            a.check_queue(&q)
        };
        let ok = l.image_end;
        assert_eq!(ring(ok, ok + 4096, ok + 8192), Ok(()));
        for target in [l.pml4, l.gdt, l.idt, l.tss, l.boot_page, TEXT] {
            assert_eq!(
                ring(target, ok + 4096, ok + 8192).unwrap_err().ring,
                "descriptor table"
            );
            assert_eq!(
                ring(ok, target, ok + 8192).unwrap_err().ring,
                "available ring"
            );
            assert_eq!(ring(ok, ok + 4096, target).unwrap_err().ring, "used ring");
        }
        // A used ring whose last element (or avail_event) runs into text.
        let used = TEXT - (RING_META + USED_ELEM * 8) + 2;
        assert_eq!(ring(ok, ok + 4096, used).unwrap_err().ring, "used ring");
    }

    #[test]
    fn granted_writes_are_recorded_while_tracking() {
        let dirty = Arc::new(crate::memory::DirtyPages::new(16 * 4096));
        let a = GuestAccess::from_ranges([(0, 8 * 4096, false), (8 * 4096, 16 * 4096, true)])
            .tracking(dirty.clone());
        dirty.start();
        a.check_write(9 * 4096 + 100, 4096).unwrap();
        a.check_read(1000, 10).unwrap();
        assert!(a.check_write(100, 1).is_err());
        let mut b = [0u64; 1];
        dirty.take_into(&mut b);
        assert_eq!(b[0], 0b11 << 9, "only the granted write's pages");
    }

    #[test]
    fn devices_holding_the_map_stay_send() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<GuestAccess>();
        send::<crate::devices::virtio::block::Block>();
        send::<crate::net::frames::FrameQueue>();
    }

    #[test]
    fn explicit_ranges_merge_and_overlaps_keep_the_first() {
        let a = GuestAccess::from_ranges([
            (0x3000, 0x4000, true),
            (0x1000, 0x2000, true),
            (0x2000, 0x3000, true),
            (0x3800, 0x5000, false),
        ]);
        assert!(a.check_write(0x1000, 0x3000).is_ok());
        assert!(a.check_read(0x1000, 0x4000).is_ok());
        assert!(a.check_write(0x1000, 0x3001).is_err());
        assert!(a.check_read(0x800, 0x1000).is_err(), "gap below");
        assert!(a.check_read(0x4fff, 2).is_err(), "gap above");
    }
}

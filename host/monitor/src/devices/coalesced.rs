//! KVM coalesced MMIO: register writes that need no answer, buffered by the
//! host kernel instead of each costing an exit to this process.
//!
//! A virtio driver sets a device up with ~30 plain register writes (feature
//! and queue selectors, queue sizes, ring addresses). Each one is an exit
//! to the monitor on KVM (80-110 µs on KVM PVM); in a coalesced zone KVM
//! appends it to a ring shared with the monitor (~28 µs, the cost of the
//! trap alone) and the guest goes on. The monitor applies the buffered
//! writes, in the order the guest made them, before it serves any other
//! exit of the vCPU and before anyone looks at a device from outside
//! ([`crate::device_manager::MmioBus`] drains the ring first in every
//! method). A read of a register, a status write (activation) and a queue
//! notification are never coalesced, so the guest and the I/O thread
//! always see a device that has taken every write made before.
//!
//! Hand-written rather than `kvm-ioctls`' `coalesced_mmio_read`: that one
//! needs `&mut VcpuFd`, which the exit being served still borrows, and
//! reads the ring without the acquire ordering the kernel's producer side
//! (`smp_wmb` before publishing `last`) pairs with.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{kvm_coalesced_mmio, kvm_coalesced_mmio_ring, KVM_COALESCED_MMIO_PAGE_OFFSET};
use kvm_ioctls::{IoEventAddress, VcpuFd, VmFd};

/// Register ranges of a virtio-mmio window whose writes are coalesced, as
/// (offset, length). They hold only registers whose write has no effect
/// outside the transport's own state and no answer: `DeviceFeaturesSel`
/// (0x14), `DriverFeatures`/`DriverFeaturesSel` (0x20, 0x24), `QueueSel`
/// (0x30), `QueueNum` (0x38), `QueueReady` (0x44), the read-only or
/// reserved words between them (a write there is ignored either way) and
/// the queue's ring addresses (0x80-0xa4). `QueueNotify` (0x50, an
/// ioeventfd or a disk request), `InterruptACK` (0x64), `Status` (0x70,
/// which activates or resets the device) and the configuration space
/// still exit.
///
/// The first zone ends at 0x48, not 0x50: KVM keeps its MMIO bus sorted
/// with a comparison under which a range ending at 0x50 "equals" an
/// any-length ioeventfd at 0x50, and an insertion in that tie leaves the
/// bus unsorted, so its binary search then misses the notification's
/// ioeventfd (measured: the notification became an exit).
pub const VIRTIO_MMIO_ZONES: [(u64, u32); 2] = [(0x14, 0x48 - 0x14), (0x80, 0xa8 - 0x80)];

/// The coalesced-MMIO ring page, mapped from the vCPU's file descriptor.
pub struct CoalescedRing {
    page: NonNull<kvm_coalesced_mmio_ring>,
    page_size: usize,
    /// Entries the ring holds (the page after its header).
    max: u32,
}

// SAFETY: the page is plain shared memory; only the vCPU thread consumes
// it (the bus that owns it lives there), and the kernel is the producer.
unsafe impl Send for CoalescedRing {}

/// One buffered write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Write {
    pub addr: u64,
    pub len: usize,
    pub data: [u8; 8],
}

impl CoalescedRing {
    /// Maps the ring (the VM's, reached through its vCPU).
    pub fn map(vcpu: &VcpuFd) -> std::io::Result<CoalescedRing> {
        use std::os::fd::AsRawFd;
        // SAFETY: sysconf with a valid name has no preconditions.
        let page_size = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            n if n > 0 => n as usize,
            _ => return Err(std::io::Error::last_os_error()),
        };
        let offset = KVM_COALESCED_MMIO_PAGE_OFFSET as libc::off_t * page_size as libc::off_t;
        // SAFETY: a new shared mapping of one page of the vCPU fd at the
        // offset KVM documents for the coalesced-MMIO ring; nothing else
        // is mapped or overwritten, and the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let page = NonNull::new(p.cast()).ok_or_else(std::io::Error::last_os_error)?;
        let max = ((page_size - std::mem::size_of::<kvm_coalesced_mmio_ring>())
            / std::mem::size_of::<kvm_coalesced_mmio>()) as u32;
        Ok(CoalescedRing {
            page,
            page_size,
            max,
        })
    }

    fn index(&self, field: usize) -> &AtomicU32 {
        // SAFETY: `first` (offset 0) and `last` (offset 4) are aligned u32s
        // of the mapped page, shared with the kernel: accessed atomically.
        unsafe { &*(self.page.as_ptr().cast::<u8>().add(field * 4) as *const AtomicU32) }
    }

    /// Takes the oldest buffered write, if any.
    pub fn pop(&self) -> Option<Write> {
        let first = self.index(0).load(Ordering::Relaxed);
        // Pairs with the kernel's write barrier before it publishes `last`.
        let last = self.index(1).load(Ordering::Acquire);
        if first == last || first >= self.max {
            return None;
        }
        // SAFETY: `first < max`, so the entry lies inside the mapped page;
        // the kernel wrote it before publishing `last` past it (acquire
        // above) and does not touch it until `first` moves on.
        let e = unsafe {
            std::ptr::read_volatile(
                (self.page.as_ptr() as *const u8)
                    .add(std::mem::size_of::<kvm_coalesced_mmio_ring>())
                    .cast::<kvm_coalesced_mmio>()
                    .add(first as usize),
            )
        };
        // The entry is copied out before the kernel may reuse its slot.
        self.index(0)
            .store((first + 1) % self.max, Ordering::Release);
        Some(Write {
            addr: e.phys_addr,
            len: (e.len as usize).min(8),
            data: e.data,
        })
    }
}

impl Drop for CoalescedRing {
    fn drop(&mut self) {
        // SAFETY: the page was mapped by `map` with this size and nothing
        // refers to it once the ring is dropped.
        unsafe { libc::munmap(self.page.as_ptr().cast(), self.page_size) };
    }
}

/// Asks KVM to coalesce the writes to the buffered registers of the
/// virtio-mmio window at `base`.
pub fn register_virtio_zones(vm: &VmFd, base: u64) -> Result<(), kvm_ioctls::Error> {
    for (off, len) in VIRTIO_MMIO_ZONES {
        vm.register_coalesced_mmio(IoEventAddress::Mmio(base + off), len)?;
    }
    Ok(())
}

/// Undoes [`register_virtio_zones`] (those of the zones that were
/// registered; the others are refused by KVM, which is fine).
pub fn unregister_virtio_zones(vm: &VmFd, base: u64) {
    for (off, len) in VIRTIO_MMIO_ZONES {
        let _ = vm.unregister_coalesced_mmio(IoEventAddress::Mmio(base + off), len);
    }
}

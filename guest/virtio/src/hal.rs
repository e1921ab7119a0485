//! `virtio_drivers::Hal` for Wisp: DMA memory comes from the heap, and the
//! identity mapping makes every physical address equal to its virtual one.

use alloc::alloc::{alloc_zeroed, dealloc, Layout};
use core::ptr::NonNull;
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

pub struct WispHal;

fn layout(pages: usize) -> Layout {
    // PAGE_SIZE is a power of two and `pages` comes from the driver: small.
    Layout::from_size_align(pages.max(1) * PAGE_SIZE, PAGE_SIZE).unwrap_or(Layout::new::<u8>())
}

// SAFETY: allocations are page-aligned, zeroed and exclusively owned until
// `dma_dealloc`; identity mapping makes the returned physical addresses
// valid for the device.
unsafe impl Hal for WispHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        // SAFETY: the layout has non-zero size.
        let ptr = unsafe { alloc_zeroed(layout(pages)) };
        let Some(nn) = NonNull::new(ptr) else {
            panic!("out of memory for {pages} pages of virtio DMA memory");
        };
        (ptr as usize as PhysAddr, nn)
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        // SAFETY: per the trait contract, `vaddr` came from `dma_alloc`
        // with the same `pages`.
        unsafe { dealloc(vaddr.as_ptr(), layout(pages)) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as usize as *mut u8).unwrap_or(NonNull::dangling())
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as usize as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

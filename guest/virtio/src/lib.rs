//! The glue every Wisp virtio driver shares: the DMA/address HAL that
//! `virtio-drivers` needs ([`hal::WispHal`]), device discovery from the
//! boot page ([`find`]) and the transport, initialised in the
//! specification's order ([`transport::SpecOrder`]).
//!
//! On the Wisp monitor the boot page names each device's kind; under QEMU
//! microvm the PVH start code lists the command line's
//! `virtio_mmio.device=` transports as "probe" entries, and [`find`] reads
//! their virtio device ID.
#![no_std]

extern crate alloc;

pub mod hal;
pub mod transport;

use core::ptr::NonNull;

use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use wisp_abi::boot::Device;
use wisp_abi::manifest::DEVICE_VIRTIO_PROBE;

/// virtio device IDs.
pub const VIRTIO_NET: u32 = 1;
pub const VIRTIO_BLOCK: u32 = 2;

/// Offset of the DeviceID register in a virtio-mmio window.
const DEVICE_ID: u64 = 8;

/// The `n`th device that is of boot-page `kind`, or a probe entry whose
/// virtio device ID is `virtio_id`.
pub fn find(kind: u32, virtio_id: u32, n: usize) -> Option<&'static Device> {
    let boot = wisp::boot::boot_page();
    boot.devices()
        .iter()
        .filter(|d| {
            d.kind == kind
                || (d.kind == DEVICE_VIRTIO_PROBE && {
                    // SAFETY: the boot page lists this as a virtio-mmio
                    // window, mapped uncached for the guest's whole life.
                    let id = unsafe {
                        core::ptr::read_volatile((d.mmio_base + DEVICE_ID) as usize as *const u32)
                    };
                    id == virtio_id
                })
        })
        .nth(n)
}

/// The transport every Wisp driver uses: virtio-mmio, status bits written
/// one step at a time.
pub type Transport = transport::SpecOrder<MmioTransport<'static>>;

/// The virtio-mmio transport of a device found by [`find`].
pub fn transport(dev: &'static Device) -> Option<Transport> {
    let header = NonNull::new(dev.mmio_base as usize as *mut VirtIOHeader)?;
    // SAFETY: the boot page describes a virtio-mmio window of `mmio_len`
    // bytes at `mmio_base`, mapped for the guest's whole life; each device
    // is driven by one driver only (callers take each device once).
    let mmio = unsafe { MmioTransport::new(header, dev.mmio_len as usize) }.ok()?;
    Some(transport::SpecOrder::new(mmio).described_by(dev))
}

/// Declares, in an ELF note the monitor reads, that this image cannot run
/// without a device of `kind` (a `wisp_abi::manifest::DEVICE_*` value); the
/// monitor then refuses to start it without one.
#[macro_export]
macro_rules! require_device {
    ($kind:expr) => {
        const _: () = {
            #[repr(C, align(4))]
            struct DeviceNote {
                namesz: u32,
                descsz: u32,
                kind: u32,
                name: [u8; 8],
                device: u32,
            }
            #[used]
            #[link_section = ".note.wisp"]
            static NOTE: DeviceNote = DeviceNote {
                namesz: 5,
                descsz: 4,
                kind: $crate::NOTE_TYPE_DEVICE,
                name: *b"Wisp\0\0\0\0",
                device: $kind,
            };
        };
    };
}

#[doc(hidden)]
pub use wisp_abi::manifest::NOTE_TYPE_DEVICE;

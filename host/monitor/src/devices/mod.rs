//! Devices the monitor serves to the guest, on an MMIO bus.
//!
//! Every device is a virtio-mmio (version 2) transport at an address the
//! monitor chooses and lists in the boot page (NoXS); accesses reach the
//! monitor as MMIO exits and are dispatched by address here.

pub mod coalesced;
pub mod guest_access;
pub mod virtio;

/// A device's register window, as the bus sees it.
pub trait MmioDevice {
    /// Guest read of `data.len()` bytes at `offset` into the window.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Size of each device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Where the first device window goes (below 4 GiB, above guest RAM).
pub const MMIO_BASE: u64 = 0xd000_0000;

//! # Wisp block storage
//!
//! A micro-library: linked only by applications that use a disk, and then
//! declaring (ELF note) that the image needs a block device.
//!
//! * [`Disk`]: sector I/O on the first virtio-blk device, with `async`
//!   read, write and flush so storage code composes with network code on
//!   the executor. On the Wisp monitor a request completes during the
//!   notification exit itself, so each call finishes without blocking the
//!   executor for longer than that exit.
//! * [`tar`]: reads tar archives (the `wisp-tar` reader), so a disk image made
//!   with `tar` carries files.
#![no_std]

extern crate alloc;

pub mod tar;

use virtio_drivers::device::blk::VirtIOBlk;
use wisp_abi::manifest::DEVICE_BLOCK;
use wisp_virtio::hal::WispHal;

/// Bytes per sector.
pub const SECTOR: usize = 512;
/// Largest transfer sent to the device in one request.
const MAX_CHUNK: usize = 256 * 1024;

wisp::library!("blk");

/// Declares that the image cannot run without a disk (applications for
/// which the disk is optional do not call it).
#[macro_export]
macro_rules! require_disk {
    () => {
        $crate::__virtio::require_device!($crate::__DEVICE_BLOCK);
    };
}

#[doc(hidden)]
pub use wisp_abi::manifest::DEVICE_BLOCK as __DEVICE_BLOCK;
#[doc(hidden)]
pub use wisp_virtio as __virtio;

/// Storage errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlkError {
    NoDevice,
    Driver,
    /// Offset or length not sector-aligned, or past the end of the disk.
    OutOfRange,
    ReadOnly,
    /// The device reported an I/O error.
    Io,
    /// A malformed archive.
    BadArchive,
}

impl core::fmt::Display for BlkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            BlkError::NoDevice => "no block device",
            BlkError::Driver => "block device failed to initialise",
            BlkError::OutOfRange => "request outside the disk or not sector-aligned",
            BlkError::ReadOnly => "disk is read-only",
            BlkError::Io => "disk I/O error",
            BlkError::BadArchive => "malformed tar archive",
        })
    }
}

/// A virtio block device.
pub struct Disk {
    driver: VirtIOBlk<WispHal, wisp_virtio::Transport>,
    sectors: u64,
}

impl Disk {
    /// Opens the first block device. Call once: each device has one driver.
    pub fn open() -> Result<Disk, BlkError> {
        wisp::library_linked(&LIB_NAME);
        let dev = wisp_virtio::find(DEVICE_BLOCK, wisp_virtio::VIRTIO_BLOCK, 0)
            .ok_or(BlkError::NoDevice)?;
        let transport = wisp_virtio::transport(dev).ok_or(BlkError::Driver)?;
        let driver = VirtIOBlk::new(transport).map_err(|_| BlkError::Driver)?;
        let sectors = driver.capacity();
        Ok(Disk { driver, sectors })
    }

    /// Size in bytes.
    pub fn capacity(&self) -> u64 {
        self.sectors * SECTOR as u64
    }

    pub fn read_only(&self) -> bool {
        self.driver.readonly()
    }

    fn check(&self, sector: u64, len: usize) -> Result<(), BlkError> {
        let n = (len / SECTOR) as u64;
        if !len.is_multiple_of(SECTOR) || sector.checked_add(n).is_none_or(|end| end > self.sectors)
        {
            return Err(BlkError::OutOfRange);
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes (a multiple of [`SECTOR`]) from `sector`.
    pub async fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlkError> {
        self.read_now(sector, buf)
    }

    /// Writes `buf` (a multiple of [`SECTOR`]) at `sector`. Not durable
    /// until [`Disk::flush`].
    pub async fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), BlkError> {
        self.write_now(sector, buf)
    }

    /// Makes every completed write durable (the monitor `fdatasync`s).
    pub async fn flush(&mut self) -> Result<(), BlkError> {
        self.flush_now()
    }

    /// [`Disk::read`], completing before it returns (the request is served
    /// during the notification exit).
    pub fn read_now(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlkError> {
        self.check(sector, buf.len())?;
        for (i, chunk) in buf.chunks_mut(MAX_CHUNK).enumerate() {
            let at = sector + (i * MAX_CHUNK / SECTOR) as u64;
            self.driver
                .read_blocks(at as usize, chunk)
                .map_err(|_| BlkError::Io)?;
        }
        Ok(())
    }

    /// [`Disk::write`], completing before it returns.
    pub fn write_now(&mut self, sector: u64, buf: &[u8]) -> Result<(), BlkError> {
        if self.read_only() {
            return Err(BlkError::ReadOnly);
        }
        self.check(sector, buf.len())?;
        for (i, chunk) in buf.chunks(MAX_CHUNK).enumerate() {
            let at = sector + (i * MAX_CHUNK / SECTOR) as u64;
            self.driver
                .write_blocks(at as usize, chunk)
                .map_err(|_| BlkError::Io)?;
        }
        Ok(())
    }

    /// [`Disk::flush`], completing before it returns.
    pub fn flush_now(&mut self) -> Result<(), BlkError> {
        self.driver.flush().map_err(|_| BlkError::Io)
    }
}

//! The virtio-blk disk as the log's sector [`Device`].

use kv_core::aof::Device;
use wisp_blk::{BlkError, Disk};

pub struct BlkDevice(pub Disk);

impl Device for BlkDevice {
    type Error = BlkError;

    fn capacity(&self) -> u64 {
        self.0.capacity()
    }

    // Requests complete during the notification exit on the Wisp monitor,
    // so the synchronous calls block the executor only that long.
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlkError> {
        self.0.read_now(sector, buf)
    }

    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), BlkError> {
        self.0.write_now(sector, buf)
    }

    fn flush(&mut self) -> Result<(), BlkError> {
        self.0.flush_now()
    }
}

//! Tar archives on a [`Disk`]: the reader is the `wisp-tar` crate (no
//! dependency on the runtime, so its tests run on the host); this module
//! lets it read the disk.
//!
//! ```ignore
//! let mut disk = wisp_blk::Disk::open()?;
//! let fs = TarFs::mount(&mut disk).await?;
//! let page = TarFs::read(&mut disk, fs.get("index.html").unwrap()).await?;
//! ```

pub use wisp_tar::{normalise, Entry, Sectors, TarError, TarFs, MAX_FILES};

use crate::{BlkError, Disk};

impl Sectors for Disk {
    type Error = BlkError;

    fn len(&self) -> u64 {
        self.capacity()
    }

    async fn read_sectors(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlkError> {
        self.read(sector, buf).await
    }
}

impl From<TarError<BlkError>> for BlkError {
    fn from(e: TarError<BlkError>) -> BlkError {
        match e {
            TarError::Read(e) => e,
            TarError::Malformed { .. } => BlkError::BadArchive,
        }
    }
}

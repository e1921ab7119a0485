//! A read-only reader for ustar archives on a [`Disk`].
//!
//! Mounting reads every 512-byte header once and keeps an index of regular
//! files (name → offset and size); file data is read on demand. Supported:
//! POSIX ustar with the `prefix` field, GNU long names (`L` entries).
//! Everything read from the disk is untrusted: sizes are parsed strictly,
//! offsets are checked against the disk, and a malformed header ends the
//! archive with an error rather than a panic.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use crate::{BlkError, Disk, SECTOR};

/// Most files indexed.
const MAX_FILES: usize = 100_000;

/// A file in the archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Byte offset of the data on the disk (sector-aligned).
    pub offset: u64,
    pub size: u64,
}

/// An indexed archive.
#[derive(Debug, Default)]
pub struct TarFs {
    files: BTreeMap<String, Entry>,
}

/// Parses an octal field (NUL/space terminated).
fn octal(field: &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    let mut seen = false;
    for &b in field {
        match b {
            b'0'..=b'7' => {
                v = v.checked_mul(8)?.checked_add((b - b'0') as u64)?;
                seen = true;
            }
            b' ' | 0 if seen => break,
            b' ' => continue,
            _ => return None,
        }
    }
    Some(v)
}

fn text(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

/// Checks a header's checksum (the sum of its bytes with the checksum
/// field counted as spaces).
fn checksum_ok(h: &[u8]) -> bool {
    let Some(expected) = octal(&h[148..156]) else {
        return false;
    };
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                b' ' as u64
            } else {
                b as u64
            }
        })
        .sum();
    sum == expected
}

/// Normalises a path: no leading `./` or `/`.
fn normalise(p: &str) -> &str {
    p.trim_start_matches("./").trim_start_matches('/')
}

impl TarFs {
    /// Indexes the archive at the start of `disk`.
    pub async fn mount<S: Sectors>(disk: &mut S) -> Result<TarFs, BlkError> {
        let len = disk.len();
        let mut fs = TarFs::default();
        let mut pos: u64 = 0;
        let mut long_name: Option<String> = None;
        let mut h = vec![0u8; SECTOR];
        while pos + SECTOR as u64 <= len {
            disk.read_sectors(pos / SECTOR as u64, &mut h).await?;
            if h.iter().all(|&b| b == 0) {
                break; // end-of-archive marker
            }
            if !checksum_ok(&h) {
                return Err(BlkError::BadArchive);
            }
            let size = octal(&h[124..136]).ok_or(BlkError::BadArchive)?;
            let data = pos + SECTOR as u64;
            let blocks = size
                .div_ceil(SECTOR as u64)
                .checked_mul(SECTOR as u64)
                .ok_or(BlkError::BadArchive)?;
            let next = data.checked_add(blocks).ok_or(BlkError::BadArchive)?;
            if next > len {
                return Err(BlkError::BadArchive);
            }
            let kind = h[156];
            if kind == b'L' {
                // GNU long name: the data is the next entry's name.
                if size > 4096 {
                    return Err(BlkError::BadArchive);
                }
                let mut name = vec![0u8; blocks as usize];
                disk.read_sectors(data / SECTOR as u64, &mut name).await?;
                long_name =
                    Some(String::from_utf8_lossy(text(&name[..size as usize])).into_owned());
            } else {
                let name = match long_name.take() {
                    Some(n) => n,
                    None => {
                        let base = String::from_utf8_lossy(text(&h[0..100]));
                        let prefix = if &h[257..262] == b"ustar" {
                            text(&h[345..500])
                        } else {
                            &[][..]
                        };
                        if prefix.is_empty() {
                            base.into_owned()
                        } else {
                            alloc::format!("{}/{}", String::from_utf8_lossy(prefix), base)
                        }
                    }
                };
                if kind == b'0' || kind == 0 {
                    if fs.files.len() >= MAX_FILES {
                        return Err(BlkError::BadArchive);
                    }
                    fs.files
                        .insert(String::from(normalise(&name)), Entry { offset: data, size });
                }
            }
            pos = next;
        }
        Ok(fs)
    }

    /// Looks a file up by path (`a/b.html`, `/a/b.html` or `./a/b.html`).
    pub fn get(&self, path: &str) -> Option<Entry> {
        self.files.get(normalise(path)).copied()
    }

    /// Every file path, in order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.files.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Reads a whole file.
    pub async fn read<S: Sectors>(disk: &mut S, entry: Entry) -> Result<Vec<u8>, BlkError> {
        let padded = entry.size.div_ceil(SECTOR as u64) as usize * SECTOR;
        let mut buf = vec![0u8; padded];
        disk.read_sectors(entry.offset / SECTOR as u64, &mut buf)
            .await?;
        buf.truncate(entry.size as usize);
        Ok(buf)
    }
}

/// Something an archive can be read from, a sector at a time.
#[allow(async_fn_in_trait)]
pub trait Sectors {
    /// Size in bytes.
    fn len(&self) -> u64;
    /// Whether there is nothing to read.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Reads whole sectors starting at `sector`.
    async fn read_sectors(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlkError>;
}

impl Sectors for Disk {
    fn len(&self) -> u64 {
        self.capacity()
    }

    async fn read_sectors(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlkError> {
        self.read(sector, buf).await
    }
}

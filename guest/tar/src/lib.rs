//! # A read-only tar reader
//!
//! Indexes a tar archive on anything that reads 512-byte sectors (a
//! virtio-blk disk in a guest, a byte slice in a test): mounting reads every
//! header once and keeps regular files (path → offset and size) and
//! directories; file data is read on demand.
//!
//! Supported: POSIX ustar (names split with the `prefix` field), GNU tar's
//! default format (long names in `L` entries, base-256 sizes), pax extended
//! headers (`path`, `linkpath`, `size`: what bsdtar and `tar --format=pax`
//! write for long names), hard links to earlier files. Symbolic links,
//! devices and FIFOs are not files here and are skipped.
//!
//! Everything read is untrusted: sizes are parsed strictly, offsets are
//! checked against the device, a malformed header ends the mount with an
//! error rather than a panic, and names are normalised (`.` and empty
//! segments dropped); an entry whose name climbs with `..` or is not UTF-8
//! is skipped, as `tar` refuses to extract such names.
//!
//! Written by hand rather than taken from the `tar` crate, which needs
//! `std` (`std::io::Read`); this reader is `no_std` with `alloc` and has no
//! dependency on the library OS, so its tests run on the host.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

/// Bytes per tar block (and per device sector).
pub const SECTOR: usize = 512;
/// Most files indexed.
pub const MAX_FILES: usize = 100_000;
/// Largest GNU long-name entry or pax header read.
const MAX_META: u64 = 64 * 1024;

/// Something an archive can be read from, whole sectors at a time.
#[allow(async_fn_in_trait)]
pub trait Sectors {
    /// What a failed read reports.
    type Error;
    /// Size in bytes.
    fn len(&self) -> u64;
    /// Whether there is nothing to read.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Reads `buf.len()` bytes (a multiple of [`SECTOR`]) from `sector`.
    async fn read_sectors(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), Self::Error>;
}

/// Why an archive could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TarError<E> {
    /// The device failed to read.
    Read(E),
    /// The archive is not a tar archive or is damaged.
    Malformed {
        /// Byte offset of the header at fault.
        offset: u64,
        reason: &'static str,
    },
}

impl<E: core::fmt::Display> core::fmt::Display for TarError<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TarError::Read(e) => write!(f, "reading the archive: {e}"),
            TarError::Malformed { offset, reason } => {
                write!(f, "malformed tar archive at byte {offset}: {reason}")
            }
        }
    }
}

/// A file in the archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Byte offset of the data on the device (sector-aligned).
    pub offset: u64,
    pub size: u64,
}

/// An indexed archive.
#[derive(Debug, Default)]
pub struct TarFs {
    files: BTreeMap<String, Entry>,
    dirs: BTreeSet<String>,
    skipped: usize,
}

/// Parses a numeric field: octal digits (leading spaces allowed, ended by a
/// space or NUL), or GNU's base-256 (first byte 0x80, then big-endian).
fn number(field: &[u8]) -> Option<u64> {
    if let Some((&first, rest)) = field.split_first() {
        if first == 0x80 {
            let mut v: u64 = 0;
            for &b in rest {
                v = v.checked_mul(256)?.checked_add(b as u64)?;
            }
            return Some(v);
        }
    }
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
    seen.then_some(v)
}

/// A NUL-terminated field's bytes.
fn text(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

/// Checks a header's checksum: the sum of its bytes with the checksum field
/// counted as spaces, unsigned as POSIX says or signed as some old tars
/// wrote it.
fn checksum_ok(h: &[u8]) -> bool {
    let Some(expected) = number(&h[148..156]) else {
        return false;
    };
    let field = 148..156;
    let (mut unsigned, mut signed) = (0u64, 0i64);
    for (i, &b) in h.iter().enumerate() {
        let b = if field.contains(&i) { b' ' } else { b };
        unsigned += b as u64;
        signed += b as i8 as i64;
    }
    unsigned == expected || signed == expected as i64
}

/// Normalises an archive path: `/`-separated segments without empty ones
/// or `.`; `None` if a segment is `..` (the name would climb out of the
/// archive's root) or the name is not UTF-8.
pub fn normalise(name: &[u8]) -> Option<String> {
    let name = core::str::from_utf8(name).ok()?;
    let mut out = String::with_capacity(name.len());
    for seg in name.split('/') {
        match seg {
            "" | "." => {}
            ".." => return None,
            s => {
                if !out.is_empty() {
                    out.push('/');
                }
                out.push_str(s);
            }
        }
    }
    Some(out)
}

/// The `path`, `linkpath` and `size` records of a pax extended header
/// (`LEN key=value\n` records; unknown keys ignored).
#[derive(Default)]
struct Pax {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
}

impl Pax {
    fn parse(mut data: &[u8]) -> Option<Pax> {
        let mut pax = Pax::default();
        while !data.is_empty() && data[0] != 0 {
            let space = data.iter().position(|&b| b == b' ')?;
            let len: usize = core::str::from_utf8(&data[..space]).ok()?.parse().ok()?;
            if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
                return None;
            }
            let record = &data[space + 1..len - 1];
            let eq = record.iter().position(|&b| b == b'=')?;
            let (key, value) = (&record[..eq], &record[eq + 1..]);
            match key {
                b"path" => pax.path = Some(value.to_vec()),
                b"linkpath" => pax.linkpath = Some(value.to_vec()),
                b"size" => {
                    let v = core::str::from_utf8(value).ok()?;
                    // Digits only: `parse` would also take a leading `+`.
                    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                        return None;
                    }
                    pax.size = Some(v.parse().ok()?);
                }
                _ => {}
            }
            data = &data[len..];
        }
        Some(pax)
    }
}

impl TarFs {
    /// Indexes the archive at the start of `dev`.
    pub async fn mount<S: Sectors>(dev: &mut S) -> Result<TarFs, TarError<S::Error>> {
        let len = dev.len();
        let mut fs = TarFs::default();
        let mut pos: u64 = 0;
        // Metadata entries that apply to the next header.
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: Option<Pax> = None;
        let mut h = vec![0u8; SECTOR];
        while pos + SECTOR as u64 <= len {
            let bad = |reason| TarError::Malformed {
                offset: pos,
                reason,
            };
            dev.read_sectors(pos / SECTOR as u64, &mut h)
                .await
                .map_err(TarError::Read)?;
            if h.iter().all(|&b| b == 0) {
                break; // end-of-archive marker
            }
            if !checksum_ok(&h) {
                return Err(bad("bad header checksum (not a tar archive?)"));
            }
            let kind = h[156];
            let header_size = number(&h[124..136]).ok_or(bad("bad size field"))?;
            let size = match (kind, &pax) {
                (b'L' | b'K' | b'x' | b'g', _) => header_size,
                // A pending pax header's size replaces the entry's own.
                (_, Some(Pax { size: Some(s), .. })) => *s,
                // Links carry no data whatever their size field says.
                (b'1' | b'2', _) => 0,
                _ => header_size,
            };
            let data = pos + SECTOR as u64;
            let next = size
                .div_ceil(SECTOR as u64)
                .checked_mul(SECTOR as u64)
                .and_then(|blocks| data.checked_add(blocks))
                .filter(|&next| next <= len)
                .ok_or(bad("entry runs past the end of the archive"))?;
            match kind {
                b'L' | b'K' | b'x' => {
                    if size > MAX_META {
                        return Err(bad("long name or pax header too large"));
                    }
                    let mut buf = vec![0u8; (next - data) as usize];
                    dev.read_sectors(data / SECTOR as u64, &mut buf)
                        .await
                        .map_err(TarError::Read)?;
                    buf.truncate(size as usize);
                    match kind {
                        b'L' => long_name = Some(text(&buf).to_vec()),
                        b'K' => long_link = Some(text(&buf).to_vec()),
                        _ => pax = Some(Pax::parse(&buf).ok_or(bad("malformed pax header"))?),
                    }
                }
                // A global pax header: nothing in it concerns the index.
                b'g' => {}
                _ => {
                    // Metadata applies to this entry only, whichever wins.
                    let (pax, long_name, long_link) = (
                        pax.take().unwrap_or_default(),
                        long_name.take(),
                        long_link.take(),
                    );
                    let name = pax.path.or(long_name).unwrap_or_else(|| header_name(&h));
                    let link = pax
                        .linkpath
                        .or(long_link)
                        .unwrap_or_else(|| text(&h[157..257]).to_vec());
                    fs.add(kind, &name, &link, Entry { offset: data, size })
                        .map_err(bad)?;
                }
            }
            pos = next;
        }
        Ok(fs)
    }

    /// Indexes one header's entry.
    fn add(
        &mut self,
        kind: u8,
        name: &[u8],
        link: &[u8],
        entry: Entry,
    ) -> Result<(), &'static str> {
        let Some(path) = normalise(name) else {
            self.skipped += 1;
            return Ok(());
        };
        match kind {
            b'0' | 0 | b'7' | b'1' => {
                let entry = if kind == b'1' {
                    // A hard link: the same data as an earlier file.
                    match normalise(link).and_then(|l| self.files.get(&l).copied()) {
                        Some(target) => target,
                        None => {
                            self.skipped += 1;
                            return Ok(());
                        }
                    }
                } else {
                    entry
                };
                if path.is_empty() {
                    self.skipped += 1;
                    return Ok(());
                }
                if self.files.len() >= MAX_FILES && !self.files.contains_key(&path) {
                    return Err("more files than the reader indexes (100000)");
                }
                self.add_parents(&path);
                // As when extracting, a later entry replaces an earlier one.
                self.files.insert(path, entry);
            }
            b'5' => {
                if !path.is_empty() {
                    self.add_parents(&path);
                    self.dirs.insert(path);
                }
            }
            _ => self.skipped += 1,
        }
        Ok(())
    }

    /// Records every directory above `path`.
    fn add_parents(&mut self, path: &str) {
        let mut end = 0;
        while let Some(i) = path[end..].find('/') {
            end += i;
            if !self.dirs.contains(&path[..end]) {
                self.dirs.insert(String::from(&path[..end]));
            }
            end += 1;
        }
    }

    /// Looks a file up by path (`a/b.html`, `/a/b.html`, `./a//b.html`).
    pub fn get(&self, path: &str) -> Option<Entry> {
        self.files.get(&normalise(path.as_bytes())?).copied()
    }

    /// Whether `path` is a directory: named in the archive, or above a file
    /// in it. The root (`""`, `/`) always is.
    pub fn is_dir(&self, path: &str) -> bool {
        normalise(path.as_bytes()).is_some_and(|p| p.is_empty() || self.dirs.contains(&p))
    }

    /// Every file path (normalised, without a leading `/`), in order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.files.keys().map(String::as_str)
    }

    /// Every directory path (normalised, without a leading `/`), in order.
    pub fn dirs(&self) -> impl Iterator<Item = &str> {
        self.dirs.iter().map(String::as_str)
    }

    /// Number of files.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Entries not indexed: names that climb with `..` or are not UTF-8,
    /// symbolic links, devices, FIFOs, hard links to no earlier file.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// Reads a whole file.
    pub async fn read<S: Sectors>(
        dev: &mut S,
        entry: Entry,
    ) -> Result<Vec<u8>, TarError<S::Error>> {
        let too_big = TarError::Malformed {
            offset: entry.offset,
            reason: "file larger than memory",
        };
        let padded = entry
            .size
            .div_ceil(SECTOR as u64)
            .checked_mul(SECTOR as u64)
            .and_then(|p| usize::try_from(p).ok())
            .ok_or(too_big)?;
        let mut buf = vec![0u8; padded];
        dev.read_sectors(entry.offset / SECTOR as u64, &mut buf)
            .await
            .map_err(TarError::Read)?;
        buf.truncate(entry.size as usize);
        Ok(buf)
    }
}

/// A header's own name: `prefix/name` in POSIX ustar, `name` otherwise (GNU
/// tar's format keeps other fields where ustar has the prefix).
fn header_name(h: &[u8]) -> Vec<u8> {
    let name = text(&h[0..100]);
    let prefix = if &h[257..263] == b"ustar\0" {
        text(&h[345..500])
    } else {
        &[]
    };
    if prefix.is_empty() {
        name.to_vec()
    } else {
        let mut full = prefix.to_vec();
        full.push(b'/');
        full.extend_from_slice(name);
        full
    }
}

#[cfg(test)]
mod tests;

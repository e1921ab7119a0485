//! The snapshot file's layout: a header page, checksummed metadata
//! sections, then guest memory at a page-aligned offset, written sparse.
//!
//! ```text
//! 0          header page: magic "WISPSNAP", format version, memory size and
//!            offset, file length, section table (kind, offset, length,
//!            CRC-32 each), CRC-32 of the header itself
//! 4096       sections: machine, vCPU, devices, boot page, memory index
//! mem_offset guest memory, guest-physical 0 first; only pages the guest
//!            ever touched are written (the rest are holes), so the file
//!            can be mapped privately as a restored guest's RAM
//! ```
//! Everything is little-endian and written by hand (no serde format whose
//! encoding could change under us); the memory index lists the written
//! ranges and a CRC-32 over their bytes.

use super::SnapshotError;

pub const MAGIC: [u8; 8] = *b"WISPSNAP";
/// Bump on any change of what follows; a snapshot of another version is
/// refused.
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_LEN: u64 = 4096;
pub const PAGE: u64 = 4096;

/// Section kinds, in file order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    Machine = 1,
    Vcpu = 2,
    Devices = 3,
    BootPage = 4,
    MemoryIndex = 5,
}

pub const KINDS: [Kind; 5] = [
    Kind::Machine,
    Kind::Vcpu,
    Kind::Devices,
    Kind::BootPage,
    Kind::MemoryIndex,
];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Machine => "machine",
            Kind::Vcpu => "vCPU",
            Kind::Devices => "devices",
            Kind::BootPage => "boot page",
            Kind::MemoryIndex => "memory index",
        }
    }
}

/// One entry of the section table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectionEntry {
    pub kind: u32,
    pub offset: u64,
    pub len: u64,
    pub crc: u32,
}

/// The header page, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub mem_size: u64,
    pub mem_offset: u64,
    pub file_len: u64,
    pub sections: Vec<SectionEntry>,
}

const ENTRY_LEN: usize = 32;
const FIXED_LEN: usize = 48;

impl Header {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.bytes(&MAGIC);
        w.u32(self.version);
        w.u32(HEADER_LEN as u32);
        w.u32(self.sections.len() as u32);
        w.u32(0);
        w.u64(self.mem_size);
        w.u64(self.mem_offset);
        w.u64(self.file_len);
        for s in &self.sections {
            w.u32(s.kind);
            w.u32(0);
            w.u64(s.offset);
            w.u64(s.len);
            w.u32(s.crc);
            w.u32(0);
        }
        let crc = crc32fast::hash(&w.buf);
        w.u32(crc);
        w.buf.resize(HEADER_LEN as usize, 0);
        w.buf
    }

    /// Decodes and checks the header page: magic, version, its own CRC.
    pub fn decode(page: &[u8]) -> Result<Header, SnapshotError> {
        if page.len() < FIXED_LEN || page[..8] != MAGIC {
            return Err(SnapshotError::NotASnapshot);
        }
        let mut r = Reader::new(&page[8..], "header");
        let version = r.u32()?;
        if version != FORMAT_VERSION {
            return Err(SnapshotError::Version {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let header_len = r.u32()?;
        let count = r.u32()? as usize;
        r.u32()?;
        if header_len as u64 != HEADER_LEN || count > KINDS.len() * 2 {
            return Err(SnapshotError::Corrupt("header"));
        }
        let used = FIXED_LEN + count * ENTRY_LEN;
        if page.len() < used + 4 {
            return Err(SnapshotError::Truncated("header"));
        }
        let stored =
            u32::from_le_bytes([page[used], page[used + 1], page[used + 2], page[used + 3]]);
        if crc32fast::hash(&page[..used]) != stored {
            return Err(SnapshotError::Corrupt("header"));
        }
        let mem_size = r.u64()?;
        let mem_offset = r.u64()?;
        let file_len = r.u64()?;
        let mut sections = Vec::with_capacity(count);
        for _ in 0..count {
            let kind = r.u32()?;
            r.u32()?;
            let offset = r.u64()?;
            let len = r.u64()?;
            let crc = r.u32()?;
            r.u32()?;
            sections.push(SectionEntry {
                kind,
                offset,
                len,
                crc,
            });
        }
        Ok(Header {
            version,
            mem_size,
            mem_offset,
            file_len,
            sections,
        })
    }

    pub fn section(&self, kind: Kind) -> Result<&SectionEntry, SnapshotError> {
        self.sections
            .iter()
            .find(|s| s.kind == kind as u32)
            .ok_or(SnapshotError::Corrupt(kind.name()))
    }
}

/// Little-endian encoder.
#[derive(Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }
    /// A length-prefixed byte string.
    pub fn blob(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.bytes(b);
    }
}

/// Little-endian decoder over one section: every read is bounded, a short
/// section is an error naming it, never a panic.
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Reader<'a> {
        Reader { buf, what }
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        if self.buf.len() < n {
            return Err(SnapshotError::Corrupt(self.what));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, SnapshotError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub fn blob(&mut self) -> Result<&'a [u8], SnapshotError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    /// A count of items each at least `min` bytes long: refused if the
    /// section cannot hold that many (no huge allocation from a bad count).
    pub fn count(&mut self, min: usize) -> Result<usize, SnapshotError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min.max(1)) > self.buf.len() {
            return Err(SnapshotError::Corrupt(self.what));
        }
        Ok(n)
    }
    /// The section must be used up exactly.
    pub fn end(&self) -> Result<(), SnapshotError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(SnapshotError::Corrupt(self.what))
        }
    }
}

pub fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

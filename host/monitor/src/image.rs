//! Validation and description of a Wisp image (an ELF64 executable).
//!
//! Everything in the file is untrusted. [`Image::parse`] checks the ELF
//! header and program headers with explicit bounds and overflow checks and
//! refuses, with an error naming the problem, anything the monitor could
//! not load safely: not ELF, not 64-bit x86-64 executable, truncated
//! headers, segments outside the file, overlapping, writable and executable,
//! below [`wisp_abi::IMAGE_MIN_ADDR`], an entry outside code, or a missing or
//! mismatched Wisp manifest. Whether the image fits the guest's memory is
//! checked later, by [`crate::layout`], once `--memory` is known.

use std::path::Path;

use goblin::container::{Container, Ctx, Endian};
use goblin::elf::header::{self, Header};
use goblin::elf::program_header::{ProgramHeader, PF_R, PF_W, PF_X, PT_LOAD, PT_NOTE};
use wisp_abi::manifest::{ImageManifest, MANIFEST_SIZE, NOTE_NAME, NOTE_TYPE, NOTE_TYPE_DEVICE};
use wisp_abi::pod::Pod;

/// Largest image file the monitor reads.
pub const MAX_IMAGE_FILE: u64 = 256 << 20;
/// Most program headers accepted.
const MAX_PHDRS: usize = 64;
const PAGE: u64 = 4096;

/// Why an image was refused.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read image {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("image is empty (0 bytes)")]
    Empty,
    #[error("image is larger than {} MiB", MAX_IMAGE_FILE >> 20)]
    TooLarge,
    #[error("not an ELF file (bad magic)")]
    NotElf,
    #[error("ELF header is truncated ({0} bytes, need 64)")]
    TruncatedHeader(usize),
    #[error("not a 64-bit ELF image (Wisp images are ELF64)")]
    Not64Bit,
    #[error("not a little-endian ELF image")]
    NotLittleEndian,
    #[error("ELF machine is {0} ({1}), not x86-64")]
    WrongMachine(u16, &'static str),
    #[error("ELF type is {0}, not an executable (ET_EXEC)")]
    NotExecutable(&'static str),
    #[error("program headers are malformed: {0}")]
    BadProgramHeaders(String),
    #[error("image has no loadable segments")]
    NoLoadSegments,
    #[error(
        "segment {index}: file range {offset:#x}+{size:#x} is outside the {file_len}-byte file"
    )]
    SegmentOutsideFile {
        index: usize,
        offset: u64,
        size: u64,
        file_len: usize,
    },
    #[error("segment {index}: file size {file_size:#x} exceeds memory size {mem_size:#x}")]
    FileSizeExceedsMemSize {
        index: usize,
        file_size: u64,
        mem_size: u64,
    },
    #[error("segment {index}: address {addr:#x} is below {min:#x}, which is reserved for the monitor's boot structures")]
    SegmentBelowMinimum { index: usize, addr: u64, min: u64 },
    #[error("segment {index}: address {addr:#x} is not 4 KiB aligned")]
    SegmentUnaligned { index: usize, addr: u64 },
    #[error("segment {index}: virtual address {vaddr:#x} differs from physical address {paddr:#x} (Wisp images are identity-mapped)")]
    NotIdentityMapped {
        index: usize,
        vaddr: u64,
        paddr: u64,
    },
    #[error("segment {index}: size {size:#x} at {addr:#x} overflows the address space")]
    SegmentOverflow { index: usize, addr: u64, size: u64 },
    #[error("segments {0} and {1} overlap")]
    SegmentsOverlap(usize, usize),
    #[error("segment {0} is both writable and executable")]
    WritableAndExecutable(usize),
    #[error("entry point {0:#x} is not inside an executable segment")]
    EntryOutsideCode(u64),
    #[error("no Wisp manifest note: not built with the Wisp library OS (wisp build)")]
    NoManifest,
    #[error("image was built for Wisp ABI version {image}, this monitor speaks version {monitor}")]
    AbiMismatch { image: u32, monitor: u32 },
    #[error("manifest {what} address {addr:#x} is not inside a suitable segment")]
    ManifestAddress { what: &'static str, addr: u64 },
}

/// Access rights of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perms {
    pub read: bool,
    pub write: bool,
    pub exec: bool,
}

/// One loadable segment, validated.
#[derive(Clone, Debug)]
pub struct Segment {
    /// Guest-physical (= virtual) address, 4 KiB aligned.
    pub addr: u64,
    pub mem_size: u64,
    pub file_offset: u64,
    pub file_size: u64,
    pub perms: Perms,
}

impl Segment {
    /// End address (exclusive), rounded up to a page.
    pub fn end_page(&self) -> u64 {
        // Cannot overflow: parse checked addr + mem_size plus a page.
        (self.addr + self.mem_size).next_multiple_of(PAGE)
    }

    fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.addr
            && addr
                .checked_add(len)
                .is_some_and(|e| e <= self.addr + self.mem_size)
    }
}

/// A validated image.
pub struct Image {
    bytes: Vec<u8>,
    /// The 64-bit CPL3 entry (ELF `e_entry`).
    pub entry: u64,
    pub segments: Vec<Segment>,
    pub manifest: ImageManifest,
    /// The PVH (32-bit) entry from the Xen note, if present.
    pub pvh_entry: Option<u64>,
    /// Bit `1 << kind` for each device the image needs (its manifest and
    /// the device notes of the libraries it links).
    pub required_devices: u64,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("len", &self.bytes.len())
            .field("entry", &self.entry)
            .field("segments", &self.segments)
            .field("pvh_entry", &self.pvh_entry)
            .finish_non_exhaustive()
    }
}

fn machine_name(m: u16) -> &'static str {
    match m {
        header::EM_386 => "i386",
        header::EM_ARM => "arm",
        header::EM_AARCH64 => "aarch64",
        header::EM_RISCV => "riscv",
        header::EM_PPC64 => "ppc64",
        header::EM_S390 => "s390",
        _ => "unknown",
    }
}

impl Image {
    /// Reads and validates the image at `path`.
    pub fn from_file(path: &Path) -> Result<Image, ImageError> {
        let io = |source| ImageError::Io {
            path: path.display().to_string(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        if !meta.is_file() {
            return Err(io(std::io::Error::other("not a regular file")));
        }
        if meta.len() > MAX_IMAGE_FILE {
            return Err(ImageError::TooLarge);
        }
        Image::parse(std::fs::read(path).map_err(io)?)
    }

    /// Validates an image held in memory.
    pub fn parse(bytes: Vec<u8>) -> Result<Image, ImageError> {
        if bytes.is_empty() {
            return Err(ImageError::Empty);
        }
        if bytes.len() as u64 > MAX_IMAGE_FILE {
            return Err(ImageError::TooLarge);
        }
        if bytes.len() < 4 || &bytes[..4] != b"\x7fELF" {
            return Err(ImageError::NotElf);
        }
        if bytes.len() < 64 {
            return Err(ImageError::TruncatedHeader(bytes.len()));
        }
        if bytes[header::EI_CLASS] != header::ELFCLASS64 {
            return Err(ImageError::Not64Bit);
        }
        if bytes[header::EI_DATA] != header::ELFDATA2LSB {
            return Err(ImageError::NotLittleEndian);
        }
        let hdr: Header = goblin::elf::Elf::parse_header(&bytes)
            .map_err(|e| ImageError::BadProgramHeaders(e.to_string()))?;
        if hdr.e_machine != header::EM_X86_64 {
            return Err(ImageError::WrongMachine(
                hdr.e_machine,
                machine_name(hdr.e_machine),
            ));
        }
        if hdr.e_type != header::ET_EXEC {
            return Err(ImageError::NotExecutable(header::et_to_str(hdr.e_type)));
        }
        let phdrs = Self::program_headers(&bytes, &hdr)?;

        let mut segments = Vec::new();
        let mut notes = Vec::new();
        for (index, ph) in phdrs.iter().enumerate() {
            let in_file = ph
                .p_offset
                .checked_add(ph.p_filesz)
                .is_some_and(|end| end <= bytes.len() as u64);
            if (ph.p_type == PT_LOAD || ph.p_type == PT_NOTE) && !in_file {
                return Err(ImageError::SegmentOutsideFile {
                    index,
                    offset: ph.p_offset,
                    size: ph.p_filesz,
                    file_len: bytes.len(),
                });
            }
            if ph.p_type == PT_NOTE {
                notes.push((ph.p_offset as usize, ph.p_filesz as usize));
                continue;
            }
            if ph.p_type != PT_LOAD || ph.p_memsz == 0 {
                continue;
            }
            if ph.p_filesz > ph.p_memsz {
                return Err(ImageError::FileSizeExceedsMemSize {
                    index,
                    file_size: ph.p_filesz,
                    mem_size: ph.p_memsz,
                });
            }
            if ph.p_vaddr != ph.p_paddr {
                return Err(ImageError::NotIdentityMapped {
                    index,
                    vaddr: ph.p_vaddr,
                    paddr: ph.p_paddr,
                });
            }
            if ph.p_vaddr < wisp_abi::IMAGE_MIN_ADDR {
                return Err(ImageError::SegmentBelowMinimum {
                    index,
                    addr: ph.p_vaddr,
                    min: wisp_abi::IMAGE_MIN_ADDR,
                });
            }
            if ph.p_vaddr % PAGE != 0 {
                return Err(ImageError::SegmentUnaligned {
                    index,
                    addr: ph.p_vaddr,
                });
            }
            // Keep a page of headroom so page-rounded ends cannot overflow.
            if ph
                .p_vaddr
                .checked_add(ph.p_memsz)
                .and_then(|e| e.checked_add(PAGE))
                .is_none()
            {
                return Err(ImageError::SegmentOverflow {
                    index,
                    addr: ph.p_vaddr,
                    size: ph.p_memsz,
                });
            }
            let perms = Perms {
                read: ph.p_flags & PF_R != 0,
                write: ph.p_flags & PF_W != 0,
                exec: ph.p_flags & PF_X != 0,
            };
            if perms.write && perms.exec {
                return Err(ImageError::WritableAndExecutable(index));
            }
            segments.push((
                index,
                Segment {
                    addr: ph.p_vaddr,
                    mem_size: ph.p_memsz,
                    file_offset: ph.p_offset,
                    file_size: ph.p_filesz,
                    perms,
                },
            ));
        }
        if segments.is_empty() {
            return Err(ImageError::NoLoadSegments);
        }
        segments.sort_by_key(|(_, s)| s.addr);
        for pair in segments.windows(2) {
            if pair[0].1.end_page() > pair[1].1.addr {
                return Err(ImageError::SegmentsOverlap(pair[0].0, pair[1].0));
            }
        }
        let segments: Vec<Segment> = segments.into_iter().map(|(_, s)| s).collect();

        let entry = hdr.e_entry;
        if !segments
            .iter()
            .any(|s| s.perms.exec && s.contains(entry, 1))
        {
            return Err(ImageError::EntryOutsideCode(entry));
        }

        let mut manifest = None;
        let mut pvh_entry = None;
        let mut required_devices = 0u64;
        for &(off, len) in &notes {
            for (name, kind, desc) in NoteIter::new(&bytes[off..off + len]) {
                if name == &NOTE_NAME[..4] && kind == NOTE_TYPE && desc.len() == MANIFEST_SIZE {
                    manifest = ImageManifest::read_from(desc);
                } else if name == &NOTE_NAME[..4] && kind == NOTE_TYPE_DEVICE && desc.len() == 4 {
                    let dev = u32::from_le_bytes([desc[0], desc[1], desc[2], desc[3]]);
                    if dev < 64 {
                        required_devices |= 1 << dev;
                    }
                } else if name == b"Xen" && kind == 18 && (desc.len() == 8 || desc.len() == 4) {
                    let mut v = [0u8; 8];
                    v[..desc.len()].copy_from_slice(desc);
                    pvh_entry = Some(u64::from_le_bytes(v));
                }
            }
        }
        let manifest = manifest.ok_or(ImageError::NoManifest)?;
        let abi = manifest.abi_version;
        if abi != wisp_abi::ABI_VERSION {
            return Err(ImageError::AbiMismatch {
                image: abi,
                monitor: wisp_abi::ABI_VERSION,
            });
        }
        let check = |what: &'static str, addr: u64, len: u64, ok: &dyn Fn(&Segment) -> bool| {
            if segments.iter().any(|s| ok(s) && s.contains(addr, len)) {
                Ok(())
            } else {
                Err(ImageError::ManifestAddress { what, addr })
            }
        };
        let vectors = manifest.exception_vectors;
        let stack_top = manifest.stack_top;
        let ist_top = manifest.ist_top;
        check(
            "exception vector table",
            vectors,
            8 * wisp_abi::x86::EXCEPTION_VECTORS as u64,
            &|s| s.perms.read && !s.perms.write,
        )?;
        check("stack top", stack_top.wrapping_sub(64), 64, &|s| {
            s.perms.write
        })?;
        check(
            "exception stack top",
            ist_top.wrapping_sub(256),
            256,
            &|s| s.perms.write,
        )?;
        if stack_top % 16 != 0 || ist_top % 16 != 0 {
            return Err(ImageError::ManifestAddress {
                what: "stack alignment",
                addr: stack_top,
            });
        }
        required_devices |= manifest.devices_required;
        Ok(Image {
            bytes,
            entry,
            segments,
            manifest,
            pvh_entry,
            required_devices,
        })
    }

    fn program_headers(bytes: &[u8], hdr: &Header) -> Result<Vec<ProgramHeader>, ImageError> {
        let bad = |m: String| ImageError::BadProgramHeaders(m);
        let count = hdr.e_phnum as usize;
        if count == 0 {
            return Err(ImageError::NoLoadSegments);
        }
        if count > MAX_PHDRS {
            return Err(bad(format!(
                "{count} program headers (at most {MAX_PHDRS})"
            )));
        }
        if hdr.e_phentsize as usize != goblin::elf64::program_header::SIZEOF_PHDR {
            return Err(bad(format!(
                "entry size {} (expected {})",
                hdr.e_phentsize,
                goblin::elf64::program_header::SIZEOF_PHDR
            )));
        }
        let end = hdr
            .e_phoff
            .checked_add((count * hdr.e_phentsize as usize) as u64);
        if end.is_none_or(|e| e > bytes.len() as u64) {
            return Err(bad(format!(
                "table at {:#x} runs past the end of the {}-byte file",
                hdr.e_phoff,
                bytes.len()
            )));
        }
        let ctx = Ctx::new(Container::Big, Endian::Little);
        ProgramHeader::parse(bytes, hdr.e_phoff as usize, count, ctx)
            .map_err(|e| bad(e.to_string()))
    }

    /// The file bytes of a segment (validated to lie inside the file).
    pub fn segment_bytes(&self, seg: &Segment) -> &[u8] {
        &self.bytes[seg.file_offset as usize..(seg.file_offset + seg.file_size) as usize]
    }

    /// Lowest address the image occupies.
    pub fn start(&self) -> u64 {
        self.segments.first().map_or(0, |s| s.addr)
    }

    /// End of the image (exclusive), page-aligned.
    pub fn end(&self) -> u64 {
        self.segments
            .iter()
            .map(Segment::end_page)
            .max()
            .unwrap_or(0)
    }

    /// The raw file.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Iterates over ELF notes (4-byte aligned) in a byte range; stops at the
/// first malformed one.
pub struct NoteIter<'a> {
    rest: &'a [u8],
}

impl<'a> NoteIter<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        NoteIter { rest: bytes }
    }
}

impl<'a> Iterator for NoteIter<'a> {
    /// (name without NUL, type, descriptor)
    type Item = (&'a [u8], u32, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let word = |b: &[u8], i: usize| -> Option<u32> {
            Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?))
        };
        let namesz = word(self.rest, 0)? as usize;
        let descsz = word(self.rest, 4)? as usize;
        let kind = word(self.rest, 8)?;
        let name_end = 12usize.checked_add(namesz)?;
        let desc_start = 12usize.checked_add(namesz.checked_next_multiple_of(4)?)?;
        let desc_end = desc_start.checked_add(descsz)?;
        let next = desc_start.checked_add(descsz.checked_next_multiple_of(4)?)?;
        let name = self.rest.get(12..name_end)?;
        let desc = self.rest.get(desc_start..desc_end)?;
        self.rest = self.rest.get(next..).unwrap_or(&[]);
        let name = name.strip_suffix(&[0]).unwrap_or(name);
        Some((name, kind, desc))
    }
}

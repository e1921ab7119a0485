//! Test helpers: a synthetic ELF image builder, so image validation,
//! layout and paging are tested on the host without building a guest, and
//! malformed images can be made field by field.

use wisp_abi::manifest::{ImageManifest, MANIFEST_SIZE, NOTE_NAME, NOTE_TYPE};
use wisp_abi::pod::Pod;

/// One segment of a synthetic image.
#[derive(Clone, Debug)]
pub struct Seg {
    pub vaddr: u64,
    pub memsz: u64,
    /// ELF `p_flags` (R=4, W=2, X=1).
    pub flags: u32,
    pub data: Vec<u8>,
}

/// Base text address of [`valid_parts`].
pub const TEXT: u64 = 0x10_0000;
/// Base data address of [`valid_parts`].
pub const DATA: u64 = 0x10_2000;

/// The parts of a small valid image: text (holding a vector table that
/// points into text) and a data segment holding the stacks.
pub fn valid_parts() -> (u64, Vec<Seg>, ImageManifest) {
    let mut text = vec![0xccu8; 4096];
    for v in 0..32 {
        text[0x100 + v * 8..0x108 + v * 8].copy_from_slice(&TEXT.to_le_bytes());
    }
    let segs = vec![
        Seg {
            vaddr: TEXT,
            memsz: 4096,
            flags: 5,
            data: text,
        },
        Seg {
            vaddr: DATA,
            memsz: 0x10000,
            flags: 6,
            data: vec![1; 64],
        },
    ];
    let manifest = ImageManifest {
        abi_version: wisp_abi::ABI_VERSION,
        flags: 0,
        exception_vectors: TEXT + 0x100,
        stack_top: DATA + 0x8000,
        ist_top: DATA + 0x10000,
        devices_required: 0,
    };
    (TEXT, segs, manifest)
}

/// Serialises an ELF64 x86-64 executable with `segs` and, if given, a Wisp
/// manifest note.
pub fn elf(entry: u64, segs: &[Seg], manifest: Option<ImageManifest>) -> Vec<u8> {
    let nphdr = segs.len() + usize::from(manifest.is_some());
    let mut out = vec![0u8; 64 + 56 * nphdr];
    let mut note = Vec::new();
    if let Some(m) = manifest {
        note.extend_from_slice(&(NOTE_NAME.len() as u32).to_le_bytes());
        note.extend_from_slice(&(MANIFEST_SIZE as u32).to_le_bytes());
        note.extend_from_slice(&NOTE_TYPE.to_le_bytes());
        note.extend_from_slice(&[b'W', b'i', b's', b'p', 0, 0, 0, 0]);
        note.extend_from_slice(m.as_bytes());
    }
    let mut phdrs = Vec::new();
    for s in segs {
        let off = out.len().next_multiple_of(4096);
        out.resize(off, 0);
        out.extend_from_slice(&s.data);
        phdrs.push((
            1u32,
            s.flags,
            off as u64,
            s.vaddr,
            s.data.len() as u64,
            s.memsz,
        ));
    }
    if !note.is_empty() {
        let off = out.len().next_multiple_of(8);
        out.resize(off, 0);
        out.extend_from_slice(&note);
        phdrs.push((4u32, 4, off as u64, 0, note.len() as u64, note.len() as u64));
    }
    out[..4].copy_from_slice(b"\x7fELF");
    out[4] = 2; // ELFCLASS64
    out[5] = 1; // little-endian
    out[6] = 1; // EV_CURRENT
    out[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    out[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    out[20..24].copy_from_slice(&1u32.to_le_bytes());
    out[24..32].copy_from_slice(&entry.to_le_bytes());
    out[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    out[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    out[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    out[56..58].copy_from_slice(&(nphdr as u16).to_le_bytes());
    for (i, (ty, flags, off, vaddr, filesz, memsz)) in phdrs.into_iter().enumerate() {
        let p = 64 + 56 * i;
        out[p..p + 4].copy_from_slice(&ty.to_le_bytes());
        out[p + 4..p + 8].copy_from_slice(&flags.to_le_bytes());
        out[p + 8..p + 16].copy_from_slice(&off.to_le_bytes());
        out[p + 16..p + 24].copy_from_slice(&vaddr.to_le_bytes());
        out[p + 24..p + 32].copy_from_slice(&vaddr.to_le_bytes());
        out[p + 32..p + 40].copy_from_slice(&filesz.to_le_bytes());
        out[p + 40..p + 48].copy_from_slice(&memsz.to_le_bytes());
        out[p + 48..p + 56].copy_from_slice(&4096u64.to_le_bytes());
    }
    out
}

/// A small valid image.
pub fn valid_elf() -> Vec<u8> {
    let (entry, segs, m) = valid_parts();
    elf(entry, &segs, Some(m))
}

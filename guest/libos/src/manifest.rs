//! The image manifest note (see `wisp_abi::manifest`), filled with
//! link-time addresses, plus this crate's entry in the library list.

use wisp_abi::manifest::{ImageManifest, MANIFEST_SIZE, NOTE_NAME, NOTE_TYPE};

extern "C" {
    static wisp_exception_vectors: u8;
    static __stack_top: u8;
    static __ist_top: u8;
}

#[repr(C)]
struct Note {
    namesz: u32,
    descsz: u32,
    kind: u32,
    name: [u8; 8],
    desc: ImageManifest<*const u8>,
}

/// Raw pointers are not `Sync`; these are link-time constants never
/// dereferenced by the guest.
struct SyncNote(#[allow(dead_code)] Note);
// SAFETY: immutable data; the pointers are addresses only.
unsafe impl Sync for SyncNote {}

const _: () = assert!(core::mem::size_of::<ImageManifest<*const u8>>() == MANIFEST_SIZE);
const _: () = assert!(core::mem::offset_of!(Note, desc) == 20);

#[used]
#[link_section = ".note.wisp"]
static MANIFEST: SyncNote = SyncNote(Note {
    namesz: NOTE_NAME.len() as u32,
    descsz: MANIFEST_SIZE as u32,
    kind: NOTE_TYPE,
    name: [
        NOTE_NAME[0],
        NOTE_NAME[1],
        NOTE_NAME[2],
        NOTE_NAME[3],
        NOTE_NAME[4],
        0,
        0,
        0,
    ],
    desc: ImageManifest {
        abi_version: wisp_abi::ABI_VERSION,
        flags: 0,
        exception_vectors: &raw const wisp_exception_vectors,
        stack_top: &raw const __stack_top,
        ist_top: &raw const __ist_top,
        devices_required: 0,
    },
});

crate::library!("rt");

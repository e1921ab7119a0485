//! The image manifest: what an image tells the monitor about itself.
//!
//! It lives in an ELF note (name [`NOTE_NAME`], type [`NOTE_TYPE`]) so that
//! the monitor, `wisp inspect` and any ELF tool can read it without running
//! the image. Like Solo5's manifest, it lists the devices the image needs;
//! the monitor refuses to start an image whose devices it was not given.
//!
//! The structure is generic over the address type so the guest can fill it
//! with link-time addresses (pointers) while the monitor reads plain `u64`s;
//! both instantiations have the same layout (asserted in the guest).

use crate::pod::Pod;

/// ELF note name (with its NUL).
pub const NOTE_NAME: &[u8; 5] = b"Wisp\0";
/// ELF note type of the manifest.
pub const NOTE_TYPE: u32 = 0x5749_5350; // "WISP"

/// Device kinds, used as bits in [`ImageManifest::devices_required`] and as
/// `Device::kind` in the boot page.
pub const DEVICE_NET: u32 = 1;
pub const DEVICE_BLOCK: u32 = 2;
/// Boot-page device kind for a virtio-mmio transport whose device type the
/// guest must read from it (devices found on QEMU's command line).
pub const DEVICE_VIRTIO_PROBE: u32 = 0x100;

/// ELF note type by which a device library declares that the image needs a
/// device: the descriptor is one `u32` device kind. Each device library
/// emits it, so an image requires exactly the devices it links drivers for.
pub const NOTE_TYPE_DEVICE: u32 = 0x5749_5344; // "WISD"

/// Section in which each linked library OS component leaves its name
/// (NUL-terminated), so an image lists exactly what it contains.
pub const LIBS_SECTION: &str = ".wisp.libs";

/// The manifest. `A` is `u64` on the monitor side and a pointer type in the
/// guest. Packed to 4 bytes because an ELF note's descriptor follows the
/// 4-byte-padded name (`"Wisp\0"`: 12 + 8 = offset 20).
#[repr(C, packed(4))]
#[derive(Clone, Copy)]
pub struct ImageManifest<A = u64> {
    pub abi_version: u32,
    pub flags: u32,
    /// Address of 32 `u64` handler addresses, one per exception vector,
    /// which the monitor installs in the IDT as DPL3 trap gates.
    pub exception_vectors: A,
    /// Top of the main stack (in a segment of its own, with an unmapped
    /// guard page below).
    pub stack_top: A,
    /// Top of the exception (IST) stack.
    pub ist_top: A,
    /// Bit `1 << kind` for each device kind the image cannot run without.
    pub devices_required: u64,
}

// SAFETY: repr(C, packed(4)); u32, u32, then u64 fields: no padding.
unsafe impl Pod for ImageManifest<u64> {}

/// Size of the manifest: the note's `descsz`.
pub const MANIFEST_SIZE: usize = core::mem::size_of::<ImageManifest>();
const _: () = assert!(MANIFEST_SIZE == 8 + 8 * 4);

//! # Wisp networking
//!
//! A micro-library: an image links it only if the application uses the
//! network, and then declares (in an ELF note) that it needs a NIC, so the
//! monitor refuses to start it without one.
//!
//! * [`hal`]: the DMA and address-translation glue `virtio-drivers` needs
//!   (the guest is identity-mapped, so physical = virtual);
//! * [`phy`]: the virtio-net driver as a smoltcp `Device` (Hermit's habit);
//! * [`stack`]: the smoltcp interface and socket set, polled by the executor;
//! * [`tcp`]: async `TcpListener` / `TcpStream` with back-pressure.
//!
//! NIC discovery uses the boot page: on the Wisp monitor it lists the NIC
//! with its address; under QEMU microvm the PVH start code lists the
//! `virtio_mmio.device=` transports from the command line and this crate
//! probes their device IDs.
#![no_std]

extern crate alloc;

pub mod hal;
pub mod phy;
pub mod stack;
pub mod tcp;

pub use stack::{Config, NetError};
pub use tcp::{TcpListener, TcpStream};

wisp::library!("net");

/// ELF note: this image needs a network device (see
/// `wisp_abi::manifest::NOTE_TYPE_DEVICE`).
#[repr(C, align(4))]
struct DeviceNote {
    namesz: u32,
    descsz: u32,
    kind: u32,
    name: [u8; 8],
    device: u32,
}

#[used]
#[link_section = ".note.wisp"]
static NEEDS_NET: DeviceNote = DeviceNote {
    namesz: 5,
    descsz: 4,
    kind: wisp_abi::manifest::NOTE_TYPE_DEVICE,
    name: *b"Wisp\0\0\0\0",
    device: wisp_abi::manifest::DEVICE_NET,
};

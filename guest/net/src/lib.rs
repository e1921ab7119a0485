//! # Wisp networking
//!
//! A micro-library: an image links it only if the application uses the
//! network, and then declares (in an ELF note) that it needs a NIC, so the
//! monitor refuses to start it without one.
//!
//! * [`phy`]: the virtio-net driver as a smoltcp `Device` (Hermit's habit);
//! * [`stack`]: the smoltcp interface and socket set, polled by the executor;
//! * [`neighbor`]: the gateway's MAC from the boot page, known before the
//!   first frame;
//! * [`tcp`]: async `TcpListener` / `TcpStream` with back-pressure.
//!
//! NIC discovery uses the boot page: on the Wisp monitor it lists the NIC
//! with its address; under QEMU microvm the PVH start code lists the
//! `virtio_mmio.device=` transports from the command line and this crate
//! probes their device IDs.
#![no_std]

extern crate alloc;

pub mod dns;
pub mod neighbor;
pub mod phy;
pub mod stack;
pub mod tcp;
pub mod udp;

pub use smoltcp::wire::{IpAddress, IpEndpoint, Ipv4Address};
pub use stack::{Config, NetError};
pub use tcp::{TcpListener, TcpStream};
pub use udp::UdpSocket;

wisp::library!("net");

// A network library is useless without a NIC: declare it required.
wisp_virtio::require_device!(wisp_abi::manifest::DEVICE_NET);

//! The interface between a Wisp guest and the monitors that run it.
//!
//! Both sides compile against this crate, so the boot page, the image
//! manifest, the hypercall numbers and the x86 boot structures cannot drift
//! apart. It is `no_std`, has no dependencies, and is versioned by
//! [`ABI_VERSION`]: the guest stamps the version into its image manifest and
//! the monitor refuses an image built against another one.
//!
//! The design follows NoXS (LightVM) and Solo5: one page written by the
//! monitor before boot lists everything the guest needs to know (memory,
//! arguments, clock, devices), and a handful of port-I/O hypercalls are the
//! only calls the guest makes into the monitor.
#![no_std]

pub mod boot;
pub mod exit;
pub mod hypercall;
pub mod manifest;
pub mod memmap;
pub mod pod;
pub mod x86;

/// Version of this interface. Bump on any incompatible change. 2: the boot
/// page's clock record (a restored guest's wall clock is re-based by the
/// monitor; a guest built for 1 would keep the time of its snapshot).
/// 3: a device's entry carries what the driver would otherwise read from
/// registers (features, queue sizes, configuration) and, for a NIC, its
/// gateway's MAC address (the entry grew).
pub const ABI_VERSION: u32 = 3;

/// Lowest guest-physical address an image may load at. Everything below is
/// the monitor's: the boot area (page tables, GDT, IDT, TSS, boot page,
/// arguments) and, on the Wisp monitor, memory handed to the heap.
pub const IMAGE_MIN_ADDR: u64 = 0x10_0000;

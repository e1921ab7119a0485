//! # The Wisp monitor
//!
//! A minimal KVM virtual machine monitor for Wisp unikernels, built on the
//! rust-vmm crates (`kvm-ioctls`, `kvm-bindings`, `vm-memory`,
//! `virtio-queue`, `seccompiler`), and shaped as an engine whose steps a
//! caller drives one at a time ([`vm`]): a [`Shell`] (KVM VM, vCPU, guest
//! memory in a memfd) that can wait unloaded, an image loaded into it
//! ([`image`] validates every field, [`layout`], [`paging`] and [`boot`]
//! write the page tables, GDT, IDT, TSS and the NoXS boot page), devices
//! attached from backends already open ([`device_manager`]), then
//! [`Vm::start`]: a vCPU thread ([`vcpu`] enters the 64-bit entry directly
//! at CPL3, since KVM PVM emulates CPL0; see `docs/design.md`) that answers
//! the [`hypercall`]s, and an [`io_thread`] that owns the NICs and polls
//! their rings. [`control`] pauses, resumes and stops a running guest from
//! any thread; each thread runs under its own [`seccomp`] filter.
//!
//! The mappings the guest runs with are fixed before entry: text RX,
//! read-only data R, everything writable NX, the null page and a guard page
//! under each stack unmapped, and the page tables, GDT, IDT and TSS
//! supervisor-only, so a compromised guest cannot forge its way to CPL0.
//! Devices obey the same map ([`devices::guest_access`]).

pub mod boot;
pub mod console;
pub mod control;
pub mod crash;
pub mod device_manager;
pub mod devices;
pub mod hypercall;
pub mod image;
pub mod io_thread;
pub mod kvm;
pub mod layout;
pub mod memory;
pub mod migration;
pub mod net;
pub mod paging;
pub mod pvh_entry;
pub mod quota;
pub mod ratelimit;
pub mod seccomp;
pub mod snapshot;
pub mod trace;
pub mod vcpu;
mod vcpu_thread;
pub mod vm;
pub mod worker;

#[cfg(test)]
mod image_tests;
#[cfg(test)]
mod layout_tests;
#[cfg(test)]
mod testing;

pub use control::{Controller, CounterValues, StopReason, VmState};
pub use image::{Image, ImageError};
pub use vm::{
    DiskConfig, Loaded, Outcome, RunReport, RunningVm, Shell, StartOptions, Vm, VmConfig, VmError,
};

/// Writes a line to stderr, ignoring failure: a closed stderr must never
/// take the monitor down (and `eprintln!` would panic on it).
pub fn report(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{args}");
}

//! x86-64 support: entry points, exception handling, port I/O and the TSC.
//!
//! All Rust code runs at CPL3 (docs/design.md). The only CPL0 code is the short
//! PVH stub in [`pvh`], which QEMU and Firecracker enter in 32-bit mode.

pub mod entry;
pub mod exceptions;
pub mod io;
pub mod pvh;

//! Parsing of the kernel command line a PVH loader (QEMU microvm) passes:
//! the application's arguments, the virtio-mmio devices QEMU lists, and
//! network settings. The logic lives in the `wisp-cmdline` crate, which has
//! no dependency on the runtime, so its unit tests and fuzz target run on
//! the host.

pub use wisp_cmdline::{parse_virtio_mmio, split_args, NetOptions};

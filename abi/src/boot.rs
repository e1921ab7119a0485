//! The boot page: the one page the monitor writes before the guest starts
//! (NoXS). It lists memory, arguments, clock data and devices, so the guest
//! discovers everything in O(1) without probing.

use crate::pod::Pod;

/// `"WISPBOOT"` as a little-endian integer.
pub const MAGIC: u64 = u64::from_le_bytes(*b"WISPBOOT");
/// Most free-memory regions a boot page can list.
pub const MAX_MEM_REGIONS: usize = 16;
/// Most devices a boot page can list.
pub const MAX_DEVICES: usize = 16;

/// The guest runs on the Wisp monitor (hypercalls through ports 0x500+).
pub const PLATFORM_WISP: u32 = 1;
/// The guest was booted through the PVH entry (QEMU microvm, Firecracker):
/// console on COM1, exit through isa-debug-exit.
pub const PLATFORM_PVH: u32 = 2;

/// Flag: the monitor traces the boot; the guest reports reaching `main`.
pub const FLAG_TRACE_BOOT: u32 = 1 << 0;
/// Flag: the monitor may post a shutdown request in
/// [`BootPage::shutdown`] (see there). Without it the word stays 0 and a
/// stop is always forced; a guest needs nothing from it to run.
pub const FLAG_SHUTDOWN_NOTICE: u32 = 1 << 1;

/// [`BootPage::shutdown`]: nothing asked.
pub const SHUTDOWN_NONE: u32 = 0;
/// [`BootPage::shutdown`]: the guest is asked to stop (`wisp stop`,
/// SIGTERM to `wisp run`): it should finish what must not be lost (flush
/// its files) and exit by itself; after the stop timeout it is forced.
pub const SHUTDOWN_STOP: u32 = 1;

/// A range of guest-physical memory that the guest may use freely.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemRegion {
    pub start: u64,
    pub len: u64,
}

/// One device. Devices arrive with the networking work; the layout is fixed
/// now so that the boot page does not change shape then.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Device {
    /// One of the `DEVICE_*` kinds in [`crate::manifest`].
    pub kind: u32,
    /// Notification line (IRQ or event index).
    pub irq: u32,
    pub mmio_base: u64,
    pub mmio_len: u64,
    /// MAC address for network devices (6 bytes used).
    pub mac: [u8; 8],
    /// Capacity in bytes for block devices.
    pub capacity: u64,
    /// Network devices: the guest's IPv4 address (network byte order as
    /// bytes), 0 = unconfigured (use DHCP).
    pub ipv4: [u8; 4],
    /// Network devices: the default gateway.
    pub gateway: [u8; 4],
    /// Network devices: the prefix length of `ipv4`'s network.
    pub prefix_len: u32,
    /// Network devices: a DNS server (0 = none).
    pub dns: [u8; 4],
    /// Network devices: the MAC address (6 bytes used) of `gateway`, when
    /// the monitor knows it (its own user-mode network), so that the guest
    /// sends its first frame without an ARP round first; 0 = unknown (ARP).
    pub gateway_mac: [u8; 8],
    /// virtio devices: the features the device offers (its
    /// `DeviceFeatures` registers), given here so that the driver does not
    /// read them (each register read is an exit to the monitor); 0 = not
    /// given (a modern device always offers `VERSION_1`): read the
    /// registers, as under QEMU.
    pub features: u64,
    /// virtio devices (when `features` is given): each queue's maximum
    /// size (`QueueNumMax`); 0 past the device's last queue.
    pub queue_max: [u16; MAX_QUEUES],
    /// virtio devices (when `features` is given): the first bytes of the
    /// device's configuration space, as its registers show them. The
    /// monitor keeps it current (a clone's new MAC address).
    pub config: [u8; CONFIG_BYTES],
}

/// Queues a [`Device`] entry describes.
pub const MAX_QUEUES: usize = 4;
/// Configuration-space bytes a [`Device`] entry carries.
pub const CONFIG_BYTES: usize = 32;

/// The boot page itself. Its guest-physical address is passed in `rdi` at
/// the 64-bit entry.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BootPage {
    pub magic: u64,
    pub abi_version: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// `PLATFORM_*`.
    pub platform: u32,
    pub mem_region_count: u32,
    /// Free memory for the heap: excludes the image, its stacks and the boot
    /// structures.
    pub mem_regions: [MemRegion; MAX_MEM_REGIONS],
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// TSC frequency in kHz: the monotonic clock's scale.
    pub tsc_khz: u64,
    /// Guest TSC value at the instant `boot_unix_ns` was read.
    pub boot_tsc: u64,
    /// Wall-clock time (ns since the Unix epoch) at `boot_tsc`.
    pub boot_unix_ns: u64,
    /// Guest-physical address of the arguments: `argc` NUL-terminated strings.
    pub args_addr: u64,
    pub args_len: u32,
    pub argc: u32,
    pub device_count: u32,
    /// The shutdown request: [`SHUTDOWN_NONE`] or [`SHUTDOWN_STOP`]
    /// (reserved and always 0 before [`FLAG_SHUTDOWN_NOTICE`], so it needed
    /// no layout change of its own: a guest that never looks here is
    /// forced after the stop timeout).
    ///
    /// Why a word of this page and not a hypercall or an interrupt: it
    /// costs no exit at all. The monitor stores it from its control thread
    /// while the guest runs (an aligned 4-byte store, seen by the guest's
    /// next plain load: the page is ordinary shared memory, read-only only
    /// in the guest's page tables); the guest's executor reads it once per
    /// turn (one load, no exit), and a guest blocked in its wait hypercall
    /// is woken through the eventfd that wait already sleeps on, so the
    /// request rides the exit the guest was making anyway. A reason returned
    /// by the wait would reach only a waiting guest (a busy one would need a
    /// kick, i.e. an extra exit), and an interrupt would need the IST
    /// machinery the Wisp guest avoids. Read it with a volatile load.
    pub shutdown: u32,
    pub devices: [Device; MAX_DEVICES],
    /// The clock record: the monitor re-bases both clocks here after a
    /// restore (the page is read-only to the guest, which re-reads these
    /// fields with volatile loads at every clock read). Bumped with each
    /// re-base; 0 on a monitor without snapshots (then the clocks run on
    /// `boot_tsc` / `boot_unix_ns`).
    pub clock_generation: u64,
    /// Monotonic time is `mono_base_ns + (rdtsc - mono_tsc) / tsc_khz`: a
    /// restored guest continues from its value at the save (time spent in
    /// the snapshot is not counted, as across a suspend), whatever the TSC
    /// of the host it now runs on.
    pub mono_tsc: u64,
    pub mono_base_ns: u64,
    /// Wall time is `wall_unix_ns + (rdtsc - wall_tsc) / tsc_khz`.
    pub wall_tsc: u64,
    pub wall_unix_ns: u64,
    /// Times this guest was restored from a snapshot (0 after a cold boot).
    pub restore_count: u32,
    /// Which clone of its snapshot this guest is (0 for a plain restore or
    /// a cold boot): a guest that sees it change should reseed.
    pub clone_id: u32,
    /// Fresh random bits from the monitor at boot and at every restore.
    pub seed: u64,
}

impl Device {
    /// An empty entry of `kind`.
    pub const fn new(kind: u32) -> Device {
        Device {
            kind,
            irq: 0,
            mmio_base: 0,
            mmio_len: 0,
            mac: [0; 8],
            capacity: 0,
            ipv4: [0; 4],
            gateway: [0; 4],
            prefix_len: 0,
            dns: [0; 4],
            gateway_mac: [0; 8],
            features: 0,
            queue_max: [0; MAX_QUEUES],
            config: [0; CONFIG_BYTES],
        }
    }
}

impl BootPage {
    /// An empty boot page for `platform`, with magic and version filled in.
    pub const fn new(platform: u32) -> Self {
        BootPage {
            magic: MAGIC,
            abi_version: crate::ABI_VERSION,
            flags: 0,
            platform,
            mem_region_count: 0,
            mem_regions: [MemRegion { start: 0, len: 0 }; MAX_MEM_REGIONS],
            mem_size: 0,
            tsc_khz: 0,
            boot_tsc: 0,
            boot_unix_ns: 0,
            args_addr: 0,
            args_len: 0,
            argc: 0,
            device_count: 0,
            shutdown: SHUTDOWN_NONE,
            devices: [Device::new(0); MAX_DEVICES],
            clock_generation: 0,
            mono_tsc: 0,
            mono_base_ns: 0,
            wall_tsc: 0,
            wall_unix_ns: 0,
            restore_count: 0,
            clone_id: 0,
            seed: 0,
        }
    }

    /// Appends a free-memory region; returns `false` when the table is full.
    pub fn push_region(&mut self, start: u64, len: u64) -> bool {
        let i = self.mem_region_count as usize;
        if i >= MAX_MEM_REGIONS || len == 0 {
            return false;
        }
        self.mem_regions[i] = MemRegion { start, len };
        self.mem_region_count += 1;
        true
    }

    /// Appends a device; returns `false` when the table is full.
    pub fn push_device(&mut self, device: Device) -> bool {
        let i = self.device_count as usize;
        if i >= MAX_DEVICES {
            return false;
        }
        self.devices[i] = device;
        self.device_count += 1;
        true
    }

    /// The valid part of the device table.
    pub fn devices(&self) -> &[Device] {
        let n = (self.device_count as usize).min(MAX_DEVICES);
        &self.devices[..n]
    }

    /// The valid part of the region table (never more than the table holds,
    /// whatever `mem_region_count` says).
    pub fn regions(&self) -> &[MemRegion] {
        let n = (self.mem_region_count as usize).min(MAX_MEM_REGIONS);
        &self.mem_regions[..n]
    }
}

// SAFETY: repr(C), integer fields only; the layout is padding-free as
// checked by the size assertions below (every field is 8-byte aligned in
// sequence or paired 4-byte fields).
unsafe impl Pod for BootPage {}
// SAFETY: repr(C), two u64 fields, no padding.
unsafe impl Pod for MemRegion {}
// SAFETY: repr(C), u32,u32,u64,u64,[u8;8],u64,[u8;4],[u8;4],u32,u32: no padding.
unsafe impl Pod for Device {}

const _: () = assert!(core::mem::size_of::<MemRegion>() == 16);
const _: () = assert!(core::mem::size_of::<Device>() == 112);
const _: () = assert!(
    core::mem::size_of::<BootPage>()
        == 8 + 4 * 4 + 16 * MAX_MEM_REGIONS + 8 * 5 + 4 * 4 + 112 * MAX_DEVICES + 8 * 5 + 4 * 2 + 8
);
const _: () = assert!(core::mem::size_of::<BootPage>() <= 4096);
// The shutdown word is written by the monitor while the guest runs: it must
// be naturally aligned, so the store and the guest's load are single
// accesses (never torn).
const _: () = assert!(core::mem::offset_of!(BootPage, shutdown) % 4 == 0);

//! The guest's devices: where each sits on the MMIO bus, its boot-page
//! entry, and how its notifications reach the monitor.
//!
//! Devices are shared between the vCPU thread (register accesses while the
//! driver sets a device up: rare MMIO exits) and the I/O thread (the rings,
//! all the time), behind one mutex each. A NIC's queue notifications are
//! bound to an ioeventfd: the guest's write is answered in the host kernel
//! (~28 µs on KVM PVM instead of a ~100 µs exit to this process) and wakes
//! the I/O thread. The disk is served on the vCPU thread at the
//! notification exit itself, as the guest's driver expects a request to be
//! complete when its notification returns.

use std::sync::{Arc, Mutex, MutexGuard};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use wisp_abi::boot::Device;
use wisp_abi::manifest::{DEVICE_BLOCK, DEVICE_NET};

use crate::devices::coalesced::{self, CoalescedRing};
use crate::devices::guest_access::GuestAccess;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::{TransportState, VirtioDevice, VirtioMmio};
use crate::devices::virtio::net::Net;
use crate::devices::{MmioDevice, MMIO_BASE, MMIO_WINDOW};
use crate::net::{NetBackend, NicConfig};
use crate::ratelimit::Limits;

/// Offset of `QueueNotify` in a virtio-mmio window.
const QUEUE_NOTIFY: u64 = 0x50;

/// MAC address of the guest's first NIC (locally administered); the n-th
/// NIC adds n to the last byte.
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

pub type SharedNet = Arc<Mutex<VirtioMmio<Net>>>;
pub type SharedBlock = Arc<Mutex<VirtioMmio<Block>>>;

/// Locks a device; a thread that panicked while holding it leaves the
/// device as it was (every device method keeps it consistent).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A NIC as the I/O thread sees it.
pub struct NicSlot {
    pub device: SharedNet,
    /// Signalled by KVM when the guest notifies one of the NIC's queues.
    pub notify: EventFd,
}

enum BusDevice {
    /// A NIC and its notification eventfd: activating the NIC (a register
    /// write on the vCPU thread) wakes the I/O thread through it.
    Net(SharedNet, Option<EventFd>),
    Block(SharedBlock),
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("at most {} devices fit in the boot page", wisp_abi::boot::MAX_DEVICES)]
    TooMany,
    #[error("creating an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("binding a notification to an ioeventfd: {0}")]
    IoEvent(kvm_ioctls::Error),
}

/// Copies into a boot-page entry what the driver would read from the
/// device's read-only registers (features, queue sizes, configuration):
/// the guest reads them there instead of taking an exit for each.
fn describe(entry: &mut Device, dev: &impl VirtioDevice) {
    entry.features = dev.avail_features();
    entry.queue_max = [0; wisp_abi::boot::MAX_QUEUES];
    for (slot, &max) in entry.queue_max.iter_mut().zip(dev.queue_max_sizes()) {
        *slot = max;
    }
    dev.read_config(0, &mut entry.config);
}

/// The MMIO bus and the boot page's device table.
#[derive(Default)]
pub struct DeviceManager {
    bus: Vec<(u64, BusDevice)>,
    entries: Vec<Device>,
    nics: Vec<NicSlot>,
    /// The NICs' published TCP listeners (see [`NetBackend::listeners`]).
    listeners: Vec<std::os::fd::OwnedFd>,
}

impl DeviceManager {
    fn next_base(&self) -> Result<u64, DeviceError> {
        if self.bus.len() >= wisp_abi::boot::MAX_DEVICES {
            return Err(DeviceError::TooMany);
        }
        Ok(MMIO_BASE + self.bus.len() as u64 * MMIO_WINDOW)
    }

    /// Adds a NIC served by `backend`, with its addresses from `nic`.
    pub fn attach_net(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        access: GuestAccess,
        backend: Box<dyn NetBackend + Send>,
        nic: &NicConfig,
        limits: (u64, u64),
    ) -> Result<(), DeviceError> {
        let base = self.next_base()?;
        let mut mac = GUEST_MAC;
        mac[5] = mac[5].wrapping_add(self.nics.len() as u8);
        let mut d = Device::new(DEVICE_NET);
        d.mmio_base = base;
        d.mmio_len = MMIO_WINDOW;
        d.mac[..6].copy_from_slice(&mac);
        d.ipv4 = nic.ip.octets();
        d.gateway = nic.gateway.octets();
        d.prefix_len = nic.prefix_len as u32;
        d.dns = nic.dns.map_or([0; 4], |a| a.octets());
        self.listeners.extend(backend.listeners());
        if let Some(gw) = backend.gateway_mac() {
            d.gateway_mac[..6].copy_from_slice(&gw);
        }
        let mut net = Net::new(mac, mem.clone(), access, backend);
        describe(&mut d, &net);
        net.tx_limits = Limits::new(limits.0, limits.1);
        net.rx_limits = Limits::new(limits.0, limits.1);
        let notify = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.register_ioevent(
            &notify,
            &IoEventAddress::Mmio(base + QUEUE_NOTIFY),
            NoDatamatch,
        )
        .map_err(DeviceError::IoEvent)?;
        let device = Arc::new(Mutex::new(VirtioMmio::new(net)));
        let wake = notify.try_clone().ok();
        self.bus.push((base, BusDevice::Net(device.clone(), wake)));
        self.entries.push(d);
        self.nics.push(NicSlot { device, notify });
        Ok(())
    }

    /// The published TCP listeners of the NICs (duplicated handles).
    pub fn take_listeners(&mut self) -> Vec<std::os::fd::OwnedFd> {
        std::mem::take(&mut self.listeners)
    }

    /// Adds a disk.
    pub fn attach_block(&mut self, block: Block) -> Result<(), DeviceError> {
        let base = self.next_base()?;
        let mut d = Device::new(DEVICE_BLOCK);
        d.mmio_base = base;
        d.mmio_len = MMIO_WINDOW;
        d.capacity = block.capacity_bytes();
        describe(&mut d, &block);
        self.bus.push((
            base,
            BusDevice::Block(Arc::new(Mutex::new(VirtioMmio::new(block)))),
        ));
        self.entries.push(d);
        Ok(())
    }

    /// Puts each device in its saved state, in bus order (see
    /// [`MmioBus::save_states`]); `states` must match the bus one to one.
    pub fn restore_states(&mut self, states: &[TransportState]) -> Result<(), String> {
        if states.len() != self.bus.len() {
            return Err(format!(
                "{} devices saved, {} attached",
                states.len(),
                self.bus.len()
            ));
        }
        for (i, ((_, dev), st)) in self.bus.iter().zip(states).enumerate() {
            let r = match dev {
                BusDevice::Net(n, _) => lock(n).restore_state(st),
                BusDevice::Block(b) => lock(b).restore_state(st),
            };
            r.map_err(|e| format!("device {i}: {e}"))?;
        }
        Ok(())
    }

    /// Gives NIC `index` another MAC address (a clone's own identity), in
    /// its configuration space and its boot-page entry.
    pub fn set_mac(&mut self, index: usize, mac: [u8; 6]) {
        let Some(slot) = self.nics.get(index) else {
            return;
        };
        let mut dev = lock(&slot.device);
        dev.device.set_mac(mac);
        if let Some(e) = self
            .entries
            .iter_mut()
            .filter(|e| e.kind == DEVICE_NET)
            .nth(index)
        {
            e.mac[..6].copy_from_slice(&mac);
            describe(e, &dev.device);
        }
    }

    /// Features each device offers, in bus order (a snapshot's devices
    /// must offer the same: same kind, same read-only flag).
    pub fn offered_features(&self) -> Vec<u64> {
        self.bus
            .iter()
            .map(|(_, d)| match d {
                BusDevice::Net(n, _) => lock(n).device.avail_features(),
                BusDevice::Block(b) => lock(b).device.avail_features(),
            })
            .collect()
    }

    /// The boot page's device entries, in bus order.
    pub fn entries(&self) -> &[Device] {
        &self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.bus.is_empty()
    }

    /// Splits into what the vCPU thread needs (the bus) and what the I/O
    /// thread owns (the NICs). The devices' buffered registers are put in
    /// KVM coalesced-MMIO zones (see [`coalesced`]) when KVM offers them;
    /// without, every register write is an exit, which is only slower.
    pub fn split(self, vm: &VmFd, vcpu: &VcpuFd) -> (MmioBus, Vec<NicSlot>) {
        let ring = if self.bus.is_empty() {
            None
        } else {
            Self::coalesce(&self.bus, vm, vcpu)
        };
        (
            MmioBus {
                devices: self.bus,
                ring,
            },
            self.nics,
        )
    }

    /// Maps the coalesced-MMIO ring, then registers every device's zones;
    /// all or nothing (a zone without a ring to drain it would lose the
    /// guest's writes).
    fn coalesce(bus: &[(u64, BusDevice)], vm: &VmFd, vcpu: &VcpuFd) -> Option<CoalescedRing> {
        let ring = CoalescedRing::map(vcpu).ok()?;
        for (i, (base, _)) in bus.iter().enumerate() {
            if coalesced::register_virtio_zones(vm, *base).is_err() {
                for (base, _) in &bus[..=i] {
                    coalesced::unregister_virtio_zones(vm, *base);
                }
                return None;
            }
        }
        Some(ring)
    }
}

/// The vCPU thread's view: register windows by address.
///
/// Every method first applies the register writes KVM buffered in the
/// coalesced-MMIO ring, in order, so whatever it serves or reports sees
/// the devices as the guest left them.
pub struct MmioBus {
    devices: Vec<(u64, BusDevice)>,
    ring: Option<CoalescedRing>,
}

impl MmioBus {
    /// Serves a read; `false` if no device is at `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.drain();
        self.with(addr, |d, off| d.read(off, data))
    }

    /// Serves a write; `false` if no device is at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        self.drain();
        self.with(addr, |d, off| d.write(off, data))
    }

    /// Applies the buffered register writes, oldest first (a write to no
    /// device cannot be buffered: zones lie inside device windows). The
    /// vCPU thread calls it after every exit, before serving it.
    pub fn drain(&self) {
        let Some(ring) = &self.ring else { return };
        while let Some(w) = ring.pop() {
            self.with(w.addr, |d, off| d.write(off, &w.data[..w.len]));
        }
    }

    /// Whether register writes are coalesced (for tests and `--stats`).
    pub fn coalescing(&self) -> bool {
        self.ring.is_some()
    }

    fn with(&self, addr: u64, f: impl FnOnce(&mut dyn MmioDevice, u64)) -> bool {
        let Some((base, dev)) = self
            .devices
            .iter()
            .find(|(base, _)| (*base..*base + MMIO_WINDOW).contains(&addr))
        else {
            return false;
        };
        let off = addr - base;
        match dev {
            BusDevice::Net(n, wake) => {
                let mut n = lock(n);
                let was_active = n.device.is_active();
                f(&mut *n, off);
                if !was_active && n.device.is_active() {
                    // The link is up: the I/O thread starts serving it.
                    if let Some(w) = wake {
                        let _ = w.write(1);
                    }
                }
            }
            BusDevice::Block(b) => f(&mut *lock(b), off),
        }
        true
    }

    /// Each device's transport state and offered features, in bus order,
    /// for a snapshot (the guest must be paused: both threads quiet).
    pub fn save_states(&self) -> Vec<(TransportState, u64)> {
        self.drain();
        self.devices
            .iter()
            .map(|(_, d)| match d {
                BusDevice::Net(n, _) => {
                    let n = lock(n);
                    (n.save_state(), n.device.avail_features())
                }
                BusDevice::Block(b) => {
                    let b = lock(b);
                    (b.save_state(), b.device.avail_features())
                }
            })
            .collect()
    }

    /// Lets `wake` end the disks' rate-limit waits (see
    /// [`crate::ratelimit::Wake`]).
    pub fn set_disk_wake(&self, wake: Arc<dyn crate::ratelimit::Wake>) {
        for (_, dev) in &self.devices {
            if let BusDevice::Block(b) = dev {
                lock(b).device.limits.wake = Some(wake.clone());
            }
        }
    }

    /// Data bytes the disks read and wrote so far (see
    /// [`crate::devices::virtio::block::BlockStats`]).
    pub fn disk_bytes(&self) -> (u64, u64) {
        let mut sum = (0, 0);
        for (_, dev) in &self.devices {
            if let BusDevice::Block(b) = dev {
                let st = lock(b).device.stats;
                sum.0 += st.read_bytes;
                sum.1 += st.write_bytes;
            }
        }
        sum
    }

    /// A backstop for a lost transmit notification, called when the guest
    /// is about to wait: a driver that publishes its available index and
    /// then reads `avail_event` without a full fence between them (as
    /// virtio-drivers 0.13 does) can miss the I/O thread's arming while the
    /// I/O thread misses its frame. If a NIC has frames the device has not
    /// taken, its I/O thread is kicked.
    pub fn kick_pending_tx(&self) {
        self.drain();
        for (_, dev) in &self.devices {
            if let BusDevice::Net(n, Some(wake)) = dev {
                if lock(n).device.tx_pending() {
                    let _ = wake.write(1);
                }
            }
        }
    }
}

//! The `virtio-drivers` transport, initialised in the order the virtio
//! specification gives (1.2, 3.1.1): one status bit per write.
//!
//! `virtio-drivers` 0.13 writes `ACKNOWLEDGE | DRIVER` to the status
//! register in one step, and Firecracker, like the Wisp monitor, refuses a
//! status write that skips a step (the device stays uninitialised and the
//! NIC never comes up). [`SpecOrder`] wraps any transport and passes every
//! call through unchanged except `set_status`, which it splits into the
//! specification's steps; it keeps the status it last wrote, so this costs
//! no extra register read (each is an exit to the monitor). For the same
//! reason it answers "is this queue in use?" itself once it has reset the
//! device, since it set up every queue in use after that, and, when the
//! boot page describes the device (the Wisp monitor copies its offered
//! features, queue sizes and configuration there), answers reads of those
//! read-only registers from that copy: ~9 exits fewer for a NIC. Under
//! QEMU the entry carries no description and every read goes to the
//! device.

use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{PhysAddr, Result};
use wisp_abi::boot::{Device, CONFIG_BYTES, MAX_QUEUES as DESCRIBED_QUEUES};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// The order of the initialisation bits (virtio 1.2, 3.1.1).
const STEPS: [DeviceStatus; 4] = [
    DeviceStatus::ACKNOWLEDGE,
    DeviceStatus::DRIVER,
    DeviceStatus::FEATURES_OK,
    DeviceStatus::DRIVER_OK,
];

/// Most queues a device has here (net: 2, block: 1).
const MAX_QUEUES: usize = 4;
/// `VIRTIO_F_RING_EVENT_IDX`.
const F_RING_EVENT_IDX: u64 = 1 << 29;

/// Where a queue's rings are, for the notification check, and whether
/// the queue is in use.
#[derive(Clone, Copy, Default)]
struct Rings {
    /// Guest-physical (= virtual: identity-mapped) address of the
    /// available ring, and of the used ring; 0 = not set up.
    avail: u64,
    used: u64,
    size: u32,
    /// The available index when this queue's notification was last decided.
    decided: u16,
    /// This driver set the queue up (and has not unset it) since its last
    /// reset of the device.
    set: bool,
}

/// A transport whose status writes follow the specification's order, and
/// whose notifications follow the specification's `EVENT_IDX` rule.
///
/// `virtio-drivers` 0.13 decides to notify with `avail_idx >= avail_event +
/// 1`, a plain integer comparison: once a device asks for a notification
/// it gets one for every buffer added after it, until it writes a new
/// `avail_event` (on KVM each is an exit, ~28 µs on PVM). The wrapper
/// forwards a notification only when the available index crossed
/// `avail_event` since the last decision, modulo 2^16 (virtio 1.2, 2.7.10,
/// `vring_need_event`), after a full fence so that the index the driver
/// just published and the event it reads are ordered.
pub struct SpecOrder<T: Transport> {
    inner: T,
    /// The status this driver last wrote (a reset writes 0).
    written: DeviceStatus,
    /// This driver has reset the device: from then on it knows which
    /// queues are in use without reading `QueueReady` (an exit each).
    reset: bool,
    event_idx: bool,
    rings: [Rings; MAX_QUEUES],
    /// The device's read-only registers as the boot page gives them.
    described: Option<Described>,
}

/// What the monitor copied from a device's read-only registers into its
/// boot-page entry (they never change while the driver runs: this
/// monitor's configuration generation stays 0).
#[derive(Clone, Copy)]
struct Described {
    features: u64,
    queue_max: [u16; DESCRIBED_QUEUES],
    config: [u8; CONFIG_BYTES],
}

impl<T: Transport> SpecOrder<T> {
    pub fn new(inner: T) -> Self {
        SpecOrder {
            inner,
            written: DeviceStatus::empty(),
            reset: false,
            event_idx: false,
            rings: [Rings::default(); MAX_QUEUES],
            described: None,
        }
    }

    /// Also answers reads of the device's read-only registers from its
    /// boot-page entry, if the entry describes it (`features` given).
    pub fn described_by(mut self, entry: &Device) -> Self {
        self.described = (entry.features != 0).then_some(Described {
            features: entry.features,
            queue_max: entry.queue_max,
            config: entry.config,
        });
        self
    }

    /// The status writes that take the device from `from` to `to`, in
    /// order: one per initialisation bit `to` adds, then one for any other
    /// bit it adds (`FAILED`). A status that drops bits is written as is.
    pub fn steps(from: DeviceStatus, to: DeviceStatus) -> impl Iterator<Item = DeviceStatus> {
        let init = STEPS.iter().fold(DeviceStatus::empty(), |a, &b| a | b);
        let grows = to.contains(from);
        let mut now = from;
        let ordered = STEPS
            .into_iter()
            .filter(move |&bit| grows && to.contains(bit) && !from.contains(bit))
            .map(move |bit| {
                now |= bit;
                now
            });
        let rest = (!grows || !to.difference(from).difference(init).is_empty()).then_some(to);
        ordered.chain(rest)
    }
}

impl<T: Transport> SpecOrder<T> {
    /// The specification's rule for a notification of `queue`.
    fn needs_notification(&mut self, queue: u16) -> bool {
        let Some(r) = self.rings.get_mut(queue as usize) else {
            return true;
        };
        if !self.event_idx || r.avail == 0 || r.used == 0 {
            return true;
        }
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        // SAFETY: the rings were given to the device at these (identity-
        // mapped) addresses and stay allocated while the queue is set up;
        // `idx` is at offset 2 of the available ring, `avail_event` after
        // the used ring's `size` 8-byte elements; both are aligned u16s
        // that the device may write concurrently, hence volatile reads.
        let (new, event) = unsafe {
            (
                core::ptr::read_volatile((r.avail + 2) as *const u16),
                core::ptr::read_volatile((r.used + 4 + 8 * r.size as u64) as *const u16),
            )
        };
        let old = core::mem::replace(&mut r.decided, new);
        need_event(event, new, old)
    }
}

/// `vring_need_event` (virtio 1.2, 2.7.10): whether the index moving from
/// `old` to `new` passed `event`, modulo 2^16.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

impl<T: Transport> Transport for SpecOrder<T> {
    fn set_status(&mut self, status: DeviceStatus) {
        if status.is_empty() {
            self.inner.set_status(status);
            // A reset clears every queue's `QueueReady` (virtio 1.2, 4.2.2.1).
            self.reset = true;
            self.rings = [Rings::default(); MAX_QUEUES];
        } else {
            for step in Self::steps(self.written, status) {
                self.inner.set_status(step);
            }
        }
        self.written = status;
    }

    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }

    fn read_device_features(&mut self) -> u64 {
        match &self.described {
            Some(d) => d.features,
            None => self.inner.read_device_features(),
        }
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.event_idx = driver_features & F_RING_EVENT_IDX != 0;
        self.inner.write_driver_features(driver_features)
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        match self
            .described
            .and_then(|d| d.queue_max.get(queue as usize).copied())
        {
            Some(max) => max as u32,
            None => self.inner.max_queue_size(queue),
        }
    }

    fn notify(&mut self, queue: u16) {
        if self.needs_notification(queue) {
            self.inner.notify(queue)
        }
    }

    fn get_status(&self) -> DeviceStatus {
        self.inner.get_status()
    }

    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.inner.set_guest_page_size(guest_page_size)
    }

    fn requires_legacy_layout(&self) -> bool {
        self.inner.requires_legacy_layout()
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        if let Some(r) = self.rings.get_mut(queue as usize) {
            *r = Rings {
                avail: driver_area,
                used: device_area,
                size,
                decided: 0,
                set: true,
            };
        }
        self.inner
            .queue_set(queue, size, descriptors, driver_area, device_area)
    }

    fn queue_unset(&mut self, queue: u16) {
        if let Some(r) = self.rings.get_mut(queue as usize) {
            *r = Rings::default();
        }
        self.inner.queue_unset(queue)
    }

    /// After its own reset, a queue is in use exactly when this driver set
    /// it up since: answered without reading the register.
    fn queue_used(&mut self, queue: u16) -> bool {
        match self.rings.get(queue as usize) {
            Some(r) if self.reset => r.set,
            _ => self.inner.queue_used(queue),
        }
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.inner.ack_interrupt()
    }

    fn read_config_generation(&self) -> u32 {
        match self.described {
            Some(_) => 0,
            None => self.inner.read_config_generation(),
        }
    }

    /// From the described copy when the field lies inside it (aligned as
    /// the register read would need); from the device otherwise.
    fn read_config_space<V: FromBytes + IntoBytes>(&self, offset: usize) -> Result<V> {
        let size = core::mem::size_of::<V>();
        if let Some(d) = &self.described {
            if offset.is_multiple_of(core::mem::align_of::<V>()) {
                if let Some(bytes) = d.config.get(offset..offset + size) {
                    if let Ok(v) = V::read_from_bytes(bytes) {
                        return Ok(v);
                    }
                }
            }
        }
        self.inner.read_config_space(offset)
    }

    fn write_config_space<V: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: V,
    ) -> Result<()> {
        self.inner.write_config_space(offset, value)
    }
}

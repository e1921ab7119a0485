//! The `virtio-drivers` transport, initialised in the order the virtio
//! specification gives (1.2, 3.1.1): one status bit per write.
//!
//! `virtio-drivers` 0.13 writes `ACKNOWLEDGE | DRIVER` to the status
//! register in one step, and Firecracker, like the Wisp monitor, refuses a
//! status write that skips a step (the device stays uninitialised and the
//! NIC never comes up). [`SpecOrder`] wraps any transport and passes every
//! call through unchanged except `set_status`, which it splits into the
//! specification's steps; it keeps the status it last wrote, so this costs
//! no extra register read (each is an exit to the monitor).

use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{PhysAddr, Result};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// The order of the initialisation bits (virtio 1.2, 3.1.1).
const STEPS: [DeviceStatus; 4] = [
    DeviceStatus::ACKNOWLEDGE,
    DeviceStatus::DRIVER,
    DeviceStatus::FEATURES_OK,
    DeviceStatus::DRIVER_OK,
];

/// A transport whose status writes follow the specification's order.
pub struct SpecOrder<T: Transport> {
    inner: T,
    /// The status this driver last wrote (a reset writes 0).
    written: DeviceStatus,
}

impl<T: Transport> SpecOrder<T> {
    pub fn new(inner: T) -> Self {
        SpecOrder {
            inner,
            written: DeviceStatus::empty(),
        }
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

impl<T: Transport> Transport for SpecOrder<T> {
    fn set_status(&mut self, status: DeviceStatus) {
        if status.is_empty() {
            self.inner.set_status(status);
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
        self.inner.read_device_features()
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.inner.write_driver_features(driver_features)
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.inner.max_queue_size(queue)
    }

    fn notify(&mut self, queue: u16) {
        self.inner.notify(queue)
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
        self.inner
            .queue_set(queue, size, descriptors, driver_area, device_area)
    }

    fn queue_unset(&mut self, queue: u16) {
        self.inner.queue_unset(queue)
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.inner.queue_used(queue)
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.inner.ack_interrupt()
    }

    fn read_config_generation(&self) -> u32 {
        self.inner.read_config_generation()
    }

    fn read_config_space<V: FromBytes + IntoBytes>(&self, offset: usize) -> Result<V> {
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

//! The transport's status register follows the specification's
//! initialisation sequence, one step per write, as Firecracker's does.

use virtio_queue::Queue;

use super::{VirtioDevice, VirtioMmio};
use crate::devices::virtio::status::*;
use crate::devices::MmioDevice;

const OFFERED: u64 = crate::devices::virtio::F_VERSION_1;

/// A device that only records whether it was activated.
#[derive(Default)]
struct Recorder {
    activations: usize,
}

impl VirtioDevice for Recorder {
    fn device_type(&self) -> u32 {
        1
    }
    fn avail_features(&self) -> u64 {
        OFFERED
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[8]
    }
    fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
    fn activate(&mut self, _queues: Vec<Queue>, _acked_features: u64) {
        self.activations += 1;
    }
    fn queue_notify(&mut self, _index: u16) {}
    fn broken(&self) -> bool {
        false
    }
    fn reset(&mut self) {}
}

fn status(t: &mut VirtioMmio<Recorder>) -> u32 {
    let mut b = [0u8; 4];
    t.read(0x70, &mut b);
    u32::from_le_bytes(b)
}

fn write_status(t: &mut VirtioMmio<Recorder>, v: u32) {
    t.write(0x70, &v.to_le_bytes());
}

fn ack_features(t: &mut VirtioMmio<Recorder>, features: u64) {
    t.write(0x24, &0u32.to_le_bytes());
    t.write(0x20, &(features as u32).to_le_bytes());
    t.write(0x24, &1u32.to_le_bytes());
    t.write(0x20, &((features >> 32) as u32).to_le_bytes());
}

#[test]
fn one_step_at_a_time_activates_the_device() {
    let mut t = VirtioMmio::new(Recorder::default());
    for (v, want) in [(1, 1), (3, 3)] {
        write_status(&mut t, v);
        assert_eq!(status(&mut t), want);
    }
    ack_features(&mut t, OFFERED);
    write_status(&mut t, 11);
    assert_eq!(status(&mut t), 11);
    write_status(&mut t, 15);
    assert_eq!(status(&mut t), 15);
    assert_eq!(t.device.activations, 1);
}

#[test]
fn a_write_that_skips_a_step_is_refused() {
    let mut t = VirtioMmio::new(Recorder::default());
    // virtio-drivers 0.13 writes ACKNOWLEDGE | DRIVER at once.
    write_status(&mut t, ACKNOWLEDGE | DRIVER);
    assert_eq!(status(&mut t), 0, "0 -> 0x3 skips ACKNOWLEDGE alone");
    write_status(&mut t, ACKNOWLEDGE);
    write_status(&mut t, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(status(&mut t), ACKNOWLEDGE, "0x1 -> 0xb skips DRIVER");
    write_status(&mut t, ACKNOWLEDGE | DRIVER);
    write_status(&mut t, ACKNOWLEDGE | DRIVER | DRIVER_OK);
    assert_eq!(status(&mut t), 3, "DRIVER_OK before FEATURES_OK");
    assert_eq!(t.device.activations, 0);
    write_status(&mut t, DRIVER);
    assert_eq!(status(&mut t), 3, "a write may not drop bits");
}

#[test]
fn features_never_offered_keep_features_ok_clear() {
    let mut t = VirtioMmio::new(Recorder::default());
    write_status(&mut t, 1);
    write_status(&mut t, 3);
    ack_features(&mut t, OFFERED | 1 << 40);
    write_status(&mut t, 11);
    assert_eq!(status(&mut t), 3);
    write_status(&mut t, 15);
    assert_eq!(t.device.activations, 0);
}

#[test]
fn failed_is_always_accepted_and_zero_resets() {
    let mut t = VirtioMmio::new(Recorder::default());
    write_status(&mut t, 1);
    write_status(&mut t, 1 | FAILED);
    assert_eq!(status(&mut t), 1 | FAILED);
    write_status(&mut t, 3 | FAILED);
    assert_eq!(status(&mut t), 1 | FAILED, "no step after FAILED");
    write_status(&mut t, 0);
    assert_eq!(status(&mut t), 0);
    write_status(&mut t, 1);
    assert_eq!(status(&mut t), 1);
}

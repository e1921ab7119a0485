//! The virtio-mmio version 2 register interface (virtio 1.2, 4.2.2), shared
//! by every virtio device.
//!
//! The transport owns the queues' configuration; the device behind it only
//! sees queues once the driver has set `DRIVER_OK`. Every value the guest
//! writes is checked: queue sizes against the maximum, feature bits against
//! what the device offered, accesses against the register width.

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueState, QueueT};

use super::{status, F_RING_EVENT_IDX};
use crate::devices::MmioDevice;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR: u32 = 0x5749_5350; // "WISP"

/// What a device behind the transport provides.
pub trait VirtioDevice {
    /// virtio device ID (1 = net, 2 = block).
    fn device_type(&self) -> u32;
    /// Features the device offers (`avail_features`).
    fn avail_features(&self) -> u64;
    /// Maximum size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver set `DRIVER_OK`: the queues are configured and valid.
    fn activate(&mut self, queues: Vec<Queue>, acked_features: u64);
    /// The driver notified queue `index`.
    fn queue_notify(&mut self, index: u16);
    /// The device stopped after a driver error (it will do nothing more
    /// until reset); the transport then shows `NEEDS_RESET`.
    fn broken(&self) -> bool;
    /// The device was reset by the driver.
    fn reset(&mut self);
    /// The queues the device runs (after activation), for a snapshot: where
    /// each ring is and how far the device got in it.
    fn active_queues(&self) -> Vec<QueueState> {
        Vec::new()
    }
}

/// Everything a snapshot keeps of a transport: its registers, the queues
/// being configured and, once activated, the device's queues (the rings
/// themselves are in guest memory).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransportState {
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub activated: bool,
    /// The device had stopped after a driver error.
    pub broken: bool,
    /// The transport's queues (being configured; fresh once activated).
    pub queues: Vec<QueueState>,
    /// The device's queues, when activated.
    pub active: Vec<QueueState>,
}

/// The transport state for one device.
pub struct VirtioMmio<D: VirtioDevice> {
    pub device: D,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    activated: bool,
}

impl<D: VirtioDevice> VirtioMmio<D> {
    fn fresh_queues(device: &D) -> Vec<Queue> {
        device
            .queue_max_sizes()
            .iter()
            .filter_map(|&max| Queue::new(max).ok())
            .collect()
    }

    pub fn new(device: D) -> Self {
        let queues = Self::fresh_queues(&device);
        VirtioMmio {
            device,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            queues,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            activated: false,
        }
    }

    /// The transport's state for a snapshot (the device must be quiet: the
    /// guest paused).
    pub fn save_state(&self) -> TransportState {
        TransportState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            activated: self.activated,
            broken: self.device.broken(),
            queues: self.queues.iter().map(|q| q.state()).collect(),
            active: if self.activated {
                self.device.active_queues()
            } else {
                Vec::new()
            },
        }
    }

    /// Puts a fresh transport (and its device) in a saved state: the
    /// device's queues continue where they were (`next_avail`, `next_used`).
    /// A state this device cannot have (queue count or sizes) is refused
    /// and leaves the transport as it was.
    pub fn restore_state(&mut self, st: &TransportState) -> Result<(), String> {
        let build = |qs: &[QueueState]| -> Result<Vec<Queue>, String> {
            let max = self.device.queue_max_sizes();
            if qs.len() != max.len() {
                return Err(format!(
                    "{} queues saved, the device has {}",
                    qs.len(),
                    max.len()
                ));
            }
            qs.iter()
                .zip(max)
                .map(|(q, &m)| {
                    if q.max_size != m {
                        return Err(format!(
                            "queue of {} entries, the device has {m}",
                            q.max_size
                        ));
                    }
                    Queue::try_from(*q).map_err(|e| format!("queue state: {e}"))
                })
                .collect()
        };
        let queues = build(&st.queues)?;
        let active = if st.activated && !st.broken {
            Some(build(&st.active)?)
        } else {
            None
        };
        self.device_features_sel = st.device_features_sel;
        self.driver_features_sel = st.driver_features_sel;
        self.acked_features = st.acked_features;
        self.queue_sel = st.queue_sel;
        self.status = st.status;
        self.interrupt_status = st.interrupt_status;
        self.config_generation = st.config_generation;
        self.queues = queues;
        self.activated = st.activated;
        if let Some(active) = active {
            self.device.activate(active, self.acked_features);
        }
        if st.broken {
            self.set_needs_reset();
        }
        Ok(())
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        self.queues = Self::fresh_queues(&self.device);
        self.status = 0;
        self.acked_features = 0;
        self.interrupt_status = 0;
        self.activated = false;
        self.device.reset();
    }

    /// Marks the device as needing a reset (after a guest error).
    pub fn set_needs_reset(&mut self) {
        self.status |= status::NEEDS_RESET;
    }

    /// Shows a device that stopped itself as `NEEDS_RESET`. Checked after
    /// every register write (activation, notification) and before the
    /// driver reads the status, so a failure found outside an MMIO access
    /// (while serving the network at an exit) is seen too.
    fn sync_needs_reset(&mut self) {
        if self.device.broken() {
            self.set_needs_reset();
        }
    }

    /// A status write from the driver. 0 resets the device. Otherwise the
    /// write must add exactly the next step of the specification's
    /// initialisation sequence (virtio 1.2, 3.1.1) to the current status:
    /// `ACKNOWLEDGE`, then `DRIVER`, then `FEATURES_OK` (refused if the
    /// driver acked features the device never offered), then `DRIVER_OK`,
    /// which activates the device; or set `FAILED`. Anything else (a write
    /// that skips or merges steps, or drops bits) is refused and leaves the
    /// status as it was, as Firecracker's transport does, so a driver that
    /// would not work there does not work here either.
    fn set_status(&mut self, value: u32) {
        use status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FAILED, FEATURES_OK, NEEDS_RESET};
        if value == 0 {
            self.reset();
            return;
        }
        // NEEDS_RESET is the device's to set; a driver echoing it back
        // neither sets nor clears it.
        let current = self.status & !NEEDS_RESET;
        let value = value & !NEEDS_RESET;
        if value & FAILED != 0 {
            self.status |= FAILED;
            return;
        }
        let next = match current {
            0 => ACKNOWLEDGE,
            c if c == ACKNOWLEDGE => DRIVER,
            c if c == ACKNOWLEDGE | DRIVER => FEATURES_OK,
            c if c == ACKNOWLEDGE | DRIVER | FEATURES_OK => DRIVER_OK,
            _ => return, // initialised (or failed): nothing more to add
        };
        if value != current | next {
            return;
        }
        if next == FEATURES_OK && self.acked_features & !self.device.avail_features() != 0 {
            return;
        }
        self.status = value | (self.status & NEEDS_RESET);
        if next == DRIVER_OK && !self.activated {
            let event_idx = self.acked_features & F_RING_EVENT_IDX != 0;
            // The device owns the queues from now on; the transport keeps
            // fresh ones for a later reset.
            let mut ready = std::mem::replace(&mut self.queues, Self::fresh_queues(&self.device));
            for q in &mut ready {
                q.set_event_idx(event_idx);
            }
            self.activated = true;
            self.device.activate(ready, self.acked_features);
        }
    }
}

fn word(data: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(data.try_into().ok()?))
}

impl<D: VirtioDevice> MmioDevice for VirtioMmio<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        let v: u32 = match offset {
            0x000 => MAGIC,
            0x004 => 2,
            0x008 => self.device.device_type(),
            0x00c => VENDOR,
            0x010 => match self.device_features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            0x034 => self.selected().map_or(0, |q| q.max_size() as u32),
            0x044 => self.selected().map_or(0, |q| q.ready() as u32),
            0x060 => self.interrupt_status,
            0x070 => {
                self.sync_needs_reset();
                self.status
            }
            0x0fc => self.config_generation,
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            return; // no writable configuration fields
        }
        let Some(v) = word(data) else { return };
        let configurable = self.status & status::DRIVER_OK == 0;
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 if configurable => match self.driver_features_sel {
                0 => self.acked_features = (self.acked_features & !0xffff_ffff) | v as u64,
                1 => self.acked_features = (self.acked_features & 0xffff_ffff) | ((v as u64) << 32),
                _ => {}
            },
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 if configurable => {
                if let Some(q) = self.selected() {
                    q.set_size(v as u16);
                }
            }
            0x044 if configurable => {
                if let Some(q) = self.selected() {
                    q.set_ready(v == 1);
                }
            }
            0x050 if self.activated && self.status & status::NEEDS_RESET == 0 => {
                self.device.queue_notify(v as u16);
            }
            0x064 => self.interrupt_status &= !v,
            0x070 => self.set_status(v),
            0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 if configurable => {
                if let Some(q) = self.selected() {
                    match offset {
                        0x080 => q.set_desc_table_address(Some(v), None),
                        0x084 => q.set_desc_table_address(None, Some(v)),
                        0x090 => q.set_avail_ring_address(Some(v), None),
                        0x094 => q.set_avail_ring_address(None, Some(v)),
                        0x0a0 => q.set_used_ring_address(Some(v), None),
                        _ => q.set_used_ring_address(None, Some(v)),
                    }
                }
            }
            _ => {}
        }
        self.sync_needs_reset();
        std::sync::atomic::fence(Ordering::SeqCst);
    }
}

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod tests;

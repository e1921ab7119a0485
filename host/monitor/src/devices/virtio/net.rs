//! virtio-net (device ID 1): two queues, receive (0) and transmit (1).
//!
//! Frames the guest transmits go to a [`NetBackend`]; frames from the
//! backend are written into the receive buffers the guest posted. The guest
//! is hostile: descriptor chains are walked by `virtio-queue` (bounded
//! length, no loops), rings and every buffer are checked against what the
//! guest itself may read or write ([`GuestAccess`]) before `vm-memory`
//! touches them, and a chain that breaks the rules marks the device as
//! needing a reset and is reported once, without touching memory the guest
//! may not or stopping the monitor.

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::mmio::VirtioDevice;
use super::{F_RING_EVENT_IDX, F_VERSION_1};
use crate::devices::guest_access::GuestAccess;
use crate::net::frames::FrameQueue;
use crate::net::NetBackend;
use crate::ratelimit::Limits;

pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// `virtio_net_hdr_v1` (VERSION_1 always has `num_buffers`).
pub const HDR_LEN: usize = 12;
/// Largest frame accepted from the guest (no TSO offered).
const MAX_FRAME: usize = 65_562;
/// Frames kept for a guest that has posted no receive buffers (or has not
/// activated the device, or broke it). Beyond, frames stay in the backend,
/// whose own queue is bounded and then stops reading its input.
const MAX_PENDING_RX: usize = 1024;
const MAX_PENDING_RX_BYTES: usize = 2 << 20;

/// `avail_event` value that suppresses notifications (see `set_avail_event`).
const SUPPRESSED_EVENT: u16 = 0xfffe;

const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;

/// Counters, for reports and tests.
#[derive(Clone, Copy, Debug, Default)]
pub struct NetStats {
    pub tx_frames: u64,
    pub rx_frames: u64,
    pub rx_dropped: u64,
    /// Bytes of the frames sent and delivered (the Ethernet frame; the
    /// virtio-net header before it is not counted).
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

pub struct Net {
    mac: [u8; 6],
    mem: GuestMemoryMmap,
    /// What the device may read and write in `mem`.
    access: GuestAccess,
    queues: Vec<Queue>,
    backend: Box<dyn NetBackend + Send>,
    pending_rx: FrameQueue,
    /// Why the device stopped, once the guest broke a queue.
    pub broken: Option<String>,
    pub stats: NetStats,
    /// Set while the transmit limit holds the next frame back: how long.
    tx_wait: Option<std::time::Duration>,
    /// Reused for every transmitted frame and its chain's heads: nothing is
    /// allocated per frame.
    tx_buf: Vec<u8>,
    tx_heads: Vec<u16>,
    /// Limits on what the guest sends (stalls it) and receives (queues).
    pub tx_limits: Limits,
    pub rx_limits: Limits,
}

impl Net {
    pub fn new(
        mac: [u8; 6],
        mem: GuestMemoryMmap,
        access: GuestAccess,
        mut backend: Box<dyn NetBackend + Send>,
    ) -> Net {
        backend.set_guest_mac(mac);
        Net {
            mac,
            mem,
            access,
            queues: Vec::new(),
            backend,
            pending_rx: FrameQueue::new(MAX_PENDING_RX, MAX_PENDING_RX_BYTES),
            broken: None,
            stats: NetStats::default(),
            tx_wait: None,
            tx_buf: Vec::with_capacity(2048),
            tx_heads: Vec::with_capacity(QUEUE_SIZE as usize),
            tx_limits: Limits::default(),
            rx_limits: Limits::default(),
        }
    }

    /// How long until the next queued frame may be delivered (rate limit);
    /// `None` when nothing can be delivered now or by waiting alone: no
    /// frame, no receive buffer (the guest's next buffer notifies: see
    /// [`Net::arm_notifications`]), or the device inactive or broken.
    pub fn rx_delay(&mut self) -> Option<std::time::Duration> {
        if !self.active() || !self.has_buffer(RX) {
            return None;
        }
        let len = self.pending_rx.front()?.len() as u64;
        Some(self.rx_limits.time_until(len))
    }

    /// How long the transmit limit holds the guest's next frame back, if
    /// it does.
    pub fn tx_delay(&self) -> Option<std::time::Duration> {
        self.tx_wait
    }

    /// Whether the guest queued frames that the device has not taken (and
    /// the limit does not hold back): the I/O thread should look.
    pub fn tx_pending(&self) -> bool {
        self.active() && self.tx_wait.is_none() && self.has_buffer(TX)
    }

    /// Whether the driver has made buffers available on queue `q` that the
    /// device has not taken yet.
    fn has_buffer(&self, q: usize) -> bool {
        let queue = &self.queues[q];
        match queue.avail_idx(&self.mem, std::sync::atomic::Ordering::Acquire) {
            Ok(idx) => idx.0 != queue.next_avail(),
            Err(_) => true, // the next pass reports the broken ring
        }
    }

    /// Changes the MAC address the device reports (a clone's identity).
    pub fn set_mac(&mut self, mac: [u8; 6]) {
        self.mac = mac;
        self.backend.set_guest_mac(mac);
    }

    pub fn pending_len(&self) -> usize {
        self.pending_rx.len()
    }

    pub fn backend(&mut self) -> &mut dyn NetBackend {
        self.backend.as_mut()
    }

    fn fail(&mut self, why: String) {
        if self.broken.is_none() {
            crate::report(format_args!("wisp: virtio-net stopped: {why}"));
            self.broken = Some(why);
        }
    }

    fn active(&self) -> bool {
        self.queues.len() == 2 && self.broken.is_none()
    }

    /// Sends every frame the guest has queued for transmission; returns how
    /// many were sent.
    ///
    /// Transmit notifications stay suppressed while the I/O thread polls the
    /// ring (EVENT_IDX `avail_event`, see `set_avail_event`): the guest
    /// queues frames without exiting. Before the I/O thread
    /// sleeps it calls [`Net::arm_notifications`], so that the guest's next
    /// frame kicks it through an ioeventfd (no exit to this process).
    pub fn process_tx(&mut self) -> usize {
        let sent = self.process_tx_once();
        self.set_avail_event(TX, None);
        sent
    }

    /// Whether the device is running (activated and not broken).
    pub fn is_active(&self) -> bool {
        self.active()
    }

    /// Asks the guest to notify on its next transmitted frame (and on new
    /// receive buffers if frames are waiting for some), then looks again:
    /// returns `true` if work arrived meanwhile, in which case the caller
    /// must not sleep.
    pub fn arm_notifications(&mut self) -> bool {
        if !self.active() {
            return false;
        }
        self.set_avail_event(TX, Some(()));
        if !self.pending_rx.is_empty() {
            self.set_avail_event(RX, Some(()));
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        if !self.active() {
            return false;
        }
        // Work that the caller can do now: a frame to send that the limit
        // lets through, or a frame to deliver with a buffer for it and the
        // limit's leave. Work that waits for a timer is not "late".
        let tx = self.tx_wait.is_none() && self.has_buffer(TX);
        let rx = match self.pending_rx.front() {
            Some(f) if self.has_buffer(RX) => {
                let len = f.len() as u64;
                self.rx_limits.time_until(len).is_zero()
            }
            _ => false,
        };
        tx || rx
    }

    /// Suppresses the guest's notifications again (the I/O thread is polling).
    pub fn suppress_notifications(&mut self) {
        if self.active() {
            self.set_avail_event(TX, None);
            self.set_avail_event(RX, None);
        }
    }

    /// Writes the `avail_event` of queue `q`: `Some` = notify on the next
    /// buffer, `None` = (almost) never.
    fn set_avail_event(&mut self, q: usize, armed: Option<()>) {
        if !self.active() {
            return;
        }
        let queue = &self.queues[q];
        if !queue.event_idx_enabled() {
            let r = if armed.is_some() {
                self.queues[q].enable_notification(&self.mem).map(|_| ())
            } else {
                self.queues[q].disable_notification(&self.mem)
            };
            if let Err(e) = r {
                self.fail(format!("queue {q}: {e}"));
            }
            return;
        }
        // avail_event follows the used ring's entries.
        let at = queue.used_ring().checked_add(4 + 8 * queue.size() as u64);
        // Armed: notify when the entry at `next_avail` is added (virtio 1.2,
        // 2.7.10). Suppressed: 0xfffe, which asks for one notification per
        // 65,536 buffers both from a driver that compares indices modulo
        // 2^16 as the specification does and from one that compares them
        // as plain integers (virtio-drivers 0.13: `avail_idx >= event + 1`),
        // where "half the index space ahead" would notify on every buffer
        // for half of the index space.
        let value = if armed.is_some() {
            queue.next_avail()
        } else {
            SUPPRESSED_EVENT
        };
        let written = at
            .ok_or_else(|| format!("queue {q}: used ring outside guest memory"))
            .and_then(|a| {
                self.access
                    .check_write(a, 2)
                    .map_err(|e| format!("queue {q}: avail_event refused: {e}"))?;
                self.mem
                    .write_obj(value, GuestAddress(a))
                    .map_err(|_| format!("queue {q}: used ring outside guest memory"))
            });
        if let Err(e) = written {
            self.fail(e);
        }
    }

    fn process_tx_once(&mut self) -> usize {
        if !self.active() {
            return 0;
        }
        self.tx_wait = None;
        let mut heads = std::mem::take(&mut self.tx_heads);
        heads.clear();
        let mut frame = std::mem::take(&mut self.tx_buf);
        let mut rewind = false;
        let result = 'chains: {
            let q = &mut self.queues[TX];
            let iter = match q.iter(&self.mem) {
                Ok(it) => it,
                Err(e) => break 'chains Err(format!("transmit queue: {e}")),
            };
            for chain in iter {
                let head = chain.head_index();
                frame.clear();
                let mut last_has_next = false;
                for desc in chain {
                    last_has_next = desc.has_next();
                    if desc.is_write_only() {
                        break 'chains Err("transmit descriptor is device-writable".into());
                    }
                    let len = desc.len() as usize;
                    if frame.len() + len > MAX_FRAME + HDR_LEN {
                        break 'chains Err(format!(
                            "transmit chain longer than {} bytes",
                            MAX_FRAME + HDR_LEN
                        ));
                    }
                    if let Err(e) = self.access.check_read(desc.addr().0, len as u64) {
                        break 'chains Err(format!("transmit buffer refused: {e}"));
                    }
                    let start = frame.len();
                    frame.resize(start + len, 0);
                    if self
                        .mem
                        .read_slice(&mut frame[start..], desc.addr())
                        .is_err()
                    {
                        break 'chains Err(format!(
                            "transmit buffer {:#x}+{len} is outside guest memory",
                            desc.addr().0
                        ));
                    }
                }
                // virtio-queue ends a chain after queue-size descriptors; one
                // that still points on loops (or is longer than the ring).
                if last_has_next {
                    break 'chains Err(
                        "transmit descriptor chain loops or is longer than the queue".into(),
                    );
                }
                if frame.len() > HDR_LEN {
                    let payload = (frame.len() - HDR_LEN) as u64;
                    // Over the limit: the chain stays in the ring (never a
                    // sleep here: this runs on the I/O thread, under the
                    // device's lock) and the I/O thread comes back when the
                    // limiter allows it.
                    if !self.tx_limits.try_take(payload) {
                        self.tx_wait = Some(self.tx_limits.time_until(payload));
                        rewind = true;
                        break;
                    }
                    self.backend.send(&frame[HDR_LEN..]);
                    self.stats.tx_frames += 1;
                    self.stats.tx_bytes += payload;
                }
                heads.push(head);
            }
            Ok(())
        };
        if rewind {
            self.queues[TX].go_to_previous_position();
        }
        let sent = heads.len();
        for &head in &heads {
            if let Err(e) = self.queues[TX].add_used(&self.mem, head, 0) {
                self.fail(format!("transmit used ring: {e}"));
                break;
            }
        }
        self.tx_heads = heads;
        self.tx_buf = frame;
        if let Err(e) = result {
            self.fail(e);
        }
        sent
    }

    /// Moves frames from the backend into the guest's receive buffers;
    /// returns how many were delivered.
    pub fn process_rx(&mut self) -> usize {
        while self.pending_rx.has_room() {
            match self.backend.recv() {
                Some(f) => self.pending_rx.push_back(f),
                None => break,
            };
        }
        if !self.active() {
            return 0;
        }
        let mut delivered = 0;
        while let Some(frame) = self.pending_rx.pop_front() {
            if !self.has_buffer(RX) {
                self.pending_rx.push_front(frame); // no buffer posted yet
                break;
            }
            if !self.rx_limits.try_take(frame.len() as u64) {
                self.pending_rx.push_front(frame); // over the limit: later
                break;
            }
            let chain = match self.queues[RX].iter(&self.mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    self.fail(format!("receive queue: {e}"));
                    return delivered;
                }
            };
            let Some(chain) = chain else {
                self.pending_rx.push_front(frame); // no buffer posted yet
                break;
            };
            let head = chain.head_index();
            let mut hdr = [0u8; HDR_LEN];
            hdr[10] = 1; // num_buffers
            let total = HDR_LEN + frame.len();
            // The chain's writable buffers, up to what the frame needs; the
            // header and the frame are then written straight into them.
            let mut bufs = Vec::new();
            let mut room = 0usize;
            for desc in chain {
                if !desc.is_write_only() {
                    self.fail("receive descriptor is not device-writable".into());
                    return delivered;
                }
                if let Err(e) = self.access.check_write(desc.addr().0, desc.len().into()) {
                    self.fail(format!("receive buffer refused: {e}"));
                    return delivered;
                }
                bufs.push((desc.addr(), desc.len() as usize));
                room += desc.len() as usize;
                if room >= total {
                    break;
                }
            }
            let fits = room >= total;
            if fits {
                let written = scatter(&self.mem, &bufs, 0, &hdr)
                    .and_then(|()| scatter(&self.mem, &bufs, HDR_LEN, &frame));
                if let Err(addr) = written {
                    self.fail(format!(
                        "receive buffer {:#x} is outside guest memory",
                        addr.0
                    ));
                    return delivered;
                }
            }
            let len = if fits {
                self.stats.rx_frames += 1;
                self.stats.rx_bytes += frame.len() as u64;
                delivered += 1;
                total as u32
            } else {
                self.stats.rx_dropped += 1; // buffers too small: drop the frame
                0
            };
            if let Err(e) = self.queues[RX].add_used(&self.mem, head, len) {
                self.fail(format!("receive used ring: {e}"));
                return delivered;
            }
        }
        delivered
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        1
    }

    fn avail_features(&self) -> u64 {
        F_VERSION_1 | F_RING_EVENT_IDX | F_MAC | F_STATUS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac[6], status u16 (link up), max_virtqueue_pairs u16.
        let mut cfg = [0u8; 10];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[6] = 1;
        cfg[8] = 1;
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, queues: Vec<Queue>, _acked: u64) {
        if let Some(i) = queues.iter().position(|q| !q.is_valid(&self.mem)) {
            self.fail(format!("queue {i} is not valid (addresses or size)"));
            return;
        }
        for (i, q) in queues.iter().enumerate() {
            if let Err(e) = self.access.check_queue(q) {
                self.fail(format!("queue {i} refused: {e}"));
                return;
            }
        }
        self.queues = queues;
    }

    fn queue_notify(&mut self, _index: u16) {
        // Notifications reach the I/O thread through an ioeventfd; a
        // transport without one (tests, fuzzing) moves the rings here. The
        // backend's own I/O stays on the I/O thread (and its filter).
        self.process_tx();
        self.process_rx();
    }

    fn broken(&self) -> bool {
        self.broken.is_some()
    }

    fn active_queues(&self) -> Vec<virtio_queue::QueueState> {
        self.queues.iter().map(|q| q.state()).collect()
    }

    fn reset(&mut self) {
        self.queues.clear();
        self.pending_rx.clear();
        self.broken = None;
    }
}

/// Writes `data` at byte `offset` of the buffer list `bufs` (guest address,
/// length), which the caller sized to hold it; returns the address that
/// could not be written.
fn scatter(
    mem: &GuestMemoryMmap,
    bufs: &[(GuestAddress, usize)],
    mut offset: usize,
    mut data: &[u8],
) -> Result<(), GuestAddress> {
    for &(addr, len) in bufs {
        if data.is_empty() {
            break;
        }
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = (len - offset).min(data.len());
        let at = GuestAddress(addr.0.wrapping_add(offset as u64));
        mem.write_slice(&data[..n], at).map_err(|_| at)?;
        data = &data[n..];
        offset = 0;
    }
    Ok(())
}

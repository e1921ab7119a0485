//! The virtio-net driver as a smoltcp [`Device`], with batched transmit.
//!
//! Built on `virtio-drivers`' non-blocking `VirtIONetRaw`: transmitted
//! frames are queued in the ring and completed later, never waited for, so
//! a burst of frames costs no exit per frame. On the Wisp monitor the
//! device suppresses transmit notifications (EVENT_IDX) and drains the ring
//! whenever the guest exits anyway (typically the wait at the end of the
//! executor's turn); under QEMU the device asks for notifications as it
//! needs them. Receive buffers are posted once and re-posted as soon as
//! smoltcp has consumed them.

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use virtio_drivers::device::net::VirtIONetRaw;
use wisp_virtio::hal::WispHal;

/// Ring size of each queue.
pub const QUEUE_SIZE: usize = 64;
/// Buffer size: a full Ethernet frame plus the virtio header.
pub const BUF_LEN: usize = 2048;

pub type Driver = VirtIONetRaw<WispHal, wisp_virtio::Transport, QUEUE_SIZE>;

/// The driver and the buffers the device owns, by token.
pub struct NicState {
    raw: Driver,
    rx: Vec<Option<Box<[u8]>>>,
    tx: Vec<Option<Box<[u8]>>>,
    /// Transmit buffers whose frames completed, for reuse.
    free: Vec<Box<[u8]>>,
}

impl NicState {
    /// Takes the driver and posts every receive buffer.
    pub fn new(raw: Driver) -> Result<NicState, virtio_drivers::Error> {
        let mut s = NicState {
            raw,
            rx: vec![None; QUEUE_SIZE],
            tx: vec![None; QUEUE_SIZE],
            free: Vec::new(),
        };
        for _ in 0..QUEUE_SIZE {
            s.post_rx(vec![0u8; BUF_LEN].into_boxed_slice())?;
        }
        Ok(s)
    }

    pub fn mac_address(&self) -> [u8; 6] {
        self.raw.mac_address()
    }

    fn post_rx(&mut self, mut buf: Box<[u8]>) -> Result<(), virtio_drivers::Error> {
        // SAFETY: the buffer is kept (by token) and not touched until the
        // device hands it back through `poll_receive`.
        let token = unsafe { self.raw.receive_begin(&mut buf)? };
        *self
            .rx
            .get_mut(token as usize)
            .ok_or(virtio_drivers::Error::WrongToken)? = Some(buf);
        Ok(())
    }

    /// Takes back transmit buffers whose frames the device has sent.
    fn reap_tx(&mut self) {
        while let Some(token) = self.raw.poll_transmit() {
            let Some(buf) = self.tx.get_mut(token as usize).and_then(Option::take) else {
                break;
            };
            // SAFETY: `buf` is the buffer given to `transmit_begin` for `token`.
            let _ = unsafe { self.raw.transmit_complete(token, &buf) };
            self.free.push(buf);
        }
    }

    /// Whether the transmit ring is full (the device has not drained it).
    pub fn tx_full(&mut self) -> bool {
        self.reap_tx();
        !self.raw.can_send()
    }

    /// Whether a received frame is waiting.
    pub fn can_recv(&self) -> bool {
        self.raw.poll_receive().is_some()
    }

    /// The next received frame: (buffer, header length, frame length).
    fn recv(&mut self) -> Option<(Box<[u8]>, usize, usize)> {
        let token = self.raw.poll_receive()?;
        let mut buf = self.rx.get_mut(token as usize)?.take()?;
        // SAFETY: `buf` is the buffer given to `receive_begin` for `token`.
        match unsafe { self.raw.receive_complete(token, &mut buf) } {
            Ok((hdr, len)) if hdr + len <= buf.len() => Some((buf, hdr, len)),
            _ => {
                let _ = self.post_rx(buf); // malformed completion: reuse the buffer
                None
            }
        }
    }

    /// Queues a frame of `len` bytes written by `fill`.
    fn send<R>(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> R) -> R {
        let mut buf = self
            .free
            .pop()
            .unwrap_or_else(|| vec![0u8; BUF_LEN].into_boxed_slice());
        let hdr = self.raw.fill_buffer_header(&mut buf).unwrap_or(0);
        let len = len.min(buf.len() - hdr);
        let r = fill(&mut buf[hdr..hdr + len]);
        // SAFETY: the buffer is kept (by token) and not touched until the
        // device completes it (`reap_tx`).
        match unsafe { self.raw.transmit_begin(&buf[..hdr + len]) } {
            Ok(token) if (token as usize) < QUEUE_SIZE => self.tx[token as usize] = Some(buf),
            _ => self.free.push(buf), // ring full: the frame is dropped, TCP retransmits
        }
        r
    }
}

/// The NIC, shared by the tokens smoltcp holds during a poll.
#[derive(Clone)]
pub struct Nic(pub Rc<RefCell<NicState>>);

pub struct RxToken(Nic, Box<[u8]>, usize, usize);
pub struct TxToken(Nic);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let RxToken(nic, buf, hdr, len) = self;
        let r = f(&buf[hdr..hdr + len]);
        let _ = nic.0.borrow_mut().post_rx(buf);
        r
    }
}

impl phy::TxToken for TxToken {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.0 .0.borrow_mut().send(len, f)
    }
}

impl Device for Nic {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken;

    fn receive(&mut self, _: Instant) -> Option<(RxToken, TxToken)> {
        let mut s = self.0.borrow_mut();
        // A frame received may need an immediate answer (a SYN-ACK): take
        // it only when the answer has room, or the answer would be lost.
        s.reap_tx();
        if !s.raw.can_send() {
            return None;
        }
        let (buf, hdr, len) = s.recv()?;
        drop(s);
        Some((RxToken(self.clone(), buf, hdr, len), TxToken(self.clone())))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken> {
        let mut s = self.0.borrow_mut();
        s.reap_tx();
        s.raw.can_send().then(|| TxToken(self.clone()))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps.max_burst_size = Some(QUEUE_SIZE / 2);
        caps
    }
}

//! The virtio-net driver as a smoltcp [`Device`].

use alloc::rc::Rc;
use core::cell::RefCell;

use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use virtio_drivers::device::net::{RxBuffer, VirtIONet};
use virtio_drivers::transport::mmio::MmioTransport;

use wisp_virtio::hal::WispHal;

/// Ring size of each queue.
pub const QUEUE_SIZE: usize = 64;
/// Receive buffer size: a full Ethernet frame plus the virtio header.
pub const BUF_LEN: usize = 2048;

pub type Driver = VirtIONet<WispHal, MmioTransport<'static>, QUEUE_SIZE>;

/// The NIC, shared by the tokens smoltcp holds during a poll.
#[derive(Clone)]
pub struct Nic(pub Rc<RefCell<Driver>>);

pub struct RxToken(Nic, RxBuffer);
pub struct TxToken(Nic);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let r = f(self.1.packet());
        // A buffer that cannot be recycled is lost; the ring shrinks by one.
        let _ = self.0 .0.borrow_mut().recycle_rx_buffer(self.1);
        r
    }
}

impl phy::TxToken for TxToken {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut nic = self.0 .0.borrow_mut();
        let mut buf = nic.new_tx_buffer(len);
        let r = f(buf.packet_mut());
        // A full ring drops the frame; TCP retransmits.
        let _ = nic.send(buf);
        r
    }
}

impl Device for Nic {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken;

    fn receive(&mut self, _: Instant) -> Option<(RxToken, TxToken)> {
        let buf = self.0.borrow_mut().receive().ok()?;
        Some((RxToken(self.clone(), buf), TxToken(self.clone())))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken> {
        self.0.borrow().can_send().then(|| TxToken(self.clone()))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps.max_burst_size = Some(QUEUE_SIZE / 2);
        caps
    }
}

//! Neighbors the boot page already names.
//!
//! On the Wisp monitor's user-mode network the monitor is the gateway and
//! writes its MAC address in the NIC's boot-page entry. Without it the
//! guest's first frame to the gateway (say, the SYN-ACK of the first
//! connection) would wait for an ARP round first. smoltcp has no public
//! way to fill its neighbor cache, so the stack is handed the ARP reply it
//! would have received, through a one-frame device: the entry then ages
//! out and is refreshed by ARP like any other.

use alloc::vec;
use alloc::vec::Vec;

use smoltcp::iface::{Interface, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Ipv4Address,
};

/// Teaches `iface` (whose address is `own_ip` at `own_mac`) that `ip` is at
/// `mac`. A no-op for an address that is not a unicast neighbor.
pub fn learn(
    iface: &mut Interface,
    sockets: &mut SocketSet<'_>,
    now: Instant,
    (own_mac, own_ip): ([u8; 6], Ipv4Address),
    (mac, ip): ([u8; 6], Ipv4Address),
) {
    let frame = arp_reply((mac, ip), (own_mac, own_ip));
    iface.poll(now, &mut OneFrame(Some(frame)), sockets);
}

/// An Ethernet frame with the ARP reply "`from.1` is at `from.0`", sent to
/// `to`.
pub fn arp_reply(from: ([u8; 6], Ipv4Address), to: ([u8; 6], Ipv4Address)) -> Vec<u8> {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: EthernetAddress(from.0),
        source_protocol_addr: from.1,
        target_hardware_addr: EthernetAddress(to.0),
        target_protocol_addr: to.1,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(from.0),
        dst_addr: EthernetAddress(to.0),
        ethertype: EthernetProtocol::Arp,
    };
    let mut buf = vec![0u8; eth.buffer_len() + arp.buffer_len()];
    let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
    eth.emit(&mut frame);
    arp.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
    buf
}

/// A device that receives one frame and transmits nothing (an ARP reply
/// asks for no answer; the stack has no sockets yet).
struct OneFrame(Option<Vec<u8>>);

struct Rx(Vec<u8>);
struct Tx;

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        f(&mut vec![0u8; len])
    }
}

impl Device for OneFrame {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx;

    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx)> {
        self.0.take().map(|f| (Rx(f), Tx))
    }

    fn transmit(&mut self, _: Instant) -> Option<Tx> {
        None
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps
    }
}

//! Async UDP sockets on the Wisp executor.

use alloc::vec;
use core::future::poll_fn;
use core::task::Poll;

use smoltcp::iface::SocketHandle;
use smoltcp::socket::udp;
use smoltcp::wire::IpEndpoint;

use crate::stack::{self, NetError};

/// Datagrams buffered per direction, and their total bytes.
const PACKETS: usize = 64;
const BYTES: usize = 64 * 1024;

/// A UDP socket bound to a local port.
pub struct UdpSocket {
    handle: SocketHandle,
}

impl UdpSocket {
    /// Binds `port` on every address of the interface.
    pub fn bind(port: u16) -> Result<UdpSocket, NetError> {
        stack::init()?;
        let mut s = udp::Socket::new(
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; PACKETS], vec![0; BYTES]),
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; PACKETS], vec![0; BYTES]),
        );
        s.bind(port).map_err(|_| NetError::Bind)?;
        Ok(UdpSocket {
            handle: stack::with(|st| st.sockets.add(s)),
        })
    }

    /// Receives one datagram; returns its length (truncated to `buf`) and
    /// sender.
    pub async fn recv_from(&mut self, buf: &mut [u8]) -> Result<(usize, IpEndpoint), NetError> {
        let h = self.handle;
        poll_fn(|cx| {
            stack::with(|st| {
                let s = st.sockets.get_mut::<udp::Socket>(h);
                match s.recv() {
                    Ok((data, meta)) => {
                        let n = data.len().min(buf.len());
                        buf[..n].copy_from_slice(&data[..n]);
                        Poll::Ready(Ok((n, meta.endpoint)))
                    }
                    Err(_) => {
                        s.register_recv_waker(cx.waker());
                        Poll::Pending
                    }
                }
            })
        })
        .await
    }

    /// Sends one datagram, waiting while the send buffer is full.
    pub async fn send_to(&mut self, data: &[u8], to: IpEndpoint) -> Result<(), NetError> {
        let h = self.handle;
        poll_fn(|cx| {
            stack::with(|st| {
                let s = st.sockets.get_mut::<udp::Socket>(h);
                match s.send_slice(data, to) {
                    Ok(()) => Poll::Ready(Ok(())),
                    Err(udp::SendError::BufferFull) => {
                        s.register_send_waker(cx.waker());
                        Poll::Pending
                    }
                    Err(udp::SendError::Unaddressable) => Poll::Ready(Err(NetError::Unreachable)),
                }
            })
        })
        .await
    }
}

impl Drop for UdpSocket {
    fn drop(&mut self) {
        stack::with(|st| {
            st.sockets.remove(self.handle);
        });
    }
}

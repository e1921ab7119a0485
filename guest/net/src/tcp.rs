//! Async TCP sockets on the Wisp executor.
//!
//! Back-pressure is smoltcp's: `write` waits while the send buffer is full,
//! `read` waits while the receive buffer is empty, and the peer's window
//! shrinks as unread data accumulates.

use alloc::vec;
use core::future::poll_fn;
use core::task::Poll;

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::{self, State};
use smoltcp::time::Duration;
use smoltcp::wire::IpEndpoint;

use crate::stack::{self, NetError};

/// Per-connection buffer sizes.
const RX_BUFFER: usize = 16 * 1024;
const TX_BUFFER: usize = 16 * 1024;
/// Listening sockets kept per port: connections whose handshake can be
/// in progress at once.
pub(crate) const BACKLOG: usize = 32;
/// Idle connections are dropped after this long without any segment.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

fn new_socket() -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; RX_BUFFER]),
        tcp::SocketBuffer::new(vec![0; TX_BUFFER]),
    );
    s.set_nagle_enabled(false);
    s.set_timeout(Some(IDLE_TIMEOUT));
    s
}

/// A TCP listener on a local port, on every address of the interface.
///
/// Like a kernel's accept queue: the stack keeps [`BACKLOG`] sockets
/// listening on the port and, on every poll, moves those that completed a
/// handshake to a ready queue and replaces them, so connections keep being
/// accepted even while the application is busy.
pub struct TcpListener {
    port: u16,
    id: u64,
}

impl TcpListener {
    /// Starts listening on `port` (brings the network up if needed).
    pub fn bind(port: u16) -> Result<TcpListener, NetError> {
        stack::init()?;
        if port == 0 {
            return Err(NetError::Bind);
        }
        let id = stack::with(|st| {
            if st.listeners.iter().any(|l| l.port == port) {
                return Err(NetError::Bind);
            }
            let id = st.next_listener;
            st.next_listener += 1;
            st.listeners.push(stack::ListenQueue::new(id, port));
            Ok(id)
        })?;
        stack::with(|st| st.refill_listeners())?;
        Ok(TcpListener { port, id })
    }

    /// The port listened on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Waits for the next connection.
    pub async fn accept(&mut self) -> Result<TcpStream, NetError> {
        let id = self.id;
        poll_fn(|cx| {
            stack::with(|st| {
                st.collect_accepted();
                let Some(q) = st.listeners.iter_mut().find(|l| l.id == id) else {
                    return Poll::Ready(Err(NetError::Closed));
                };
                match q.ready.pop_front() {
                    Some(handle) => Poll::Ready(Ok(TcpStream { handle })),
                    None => {
                        q.waker = Some(cx.waker().clone());
                        Poll::Pending
                    }
                }
            })
        })
        .await
    }
}

impl Drop for TcpListener {
    fn drop(&mut self) {
        stack::with(|st| {
            if let Some(i) = st.listeners.iter().position(|l| l.id == self.id) {
                let q = st.listeners.remove(i);
                for h in q.listening.into_iter().chain(q.ready) {
                    st.sockets.remove(h);
                }
            }
        });
    }
}

/// A fresh socket listening on `port`.
pub(crate) fn listening_socket(port: u16) -> Option<tcp::Socket<'static>> {
    let mut s = new_socket();
    s.listen(port).ok()?;
    Some(s)
}

/// One TCP connection.
pub struct TcpStream {
    handle: SocketHandle,
}

impl TcpStream {
    /// The peer's address.
    pub fn remote_endpoint(&self) -> Option<IpEndpoint> {
        stack::with(|st| st.sockets.get::<tcp::Socket>(self.handle).remote_endpoint())
    }

    /// Reads into `buf`; `Ok(0)` means the peer closed its side.
    pub async fn read(&mut self, buf: &mut [u8]) -> Result<usize, NetError> {
        let h = self.handle;
        poll_fn(|cx| {
            stack::with(|st| {
                let s = st.sockets.get_mut::<tcp::Socket>(h);
                if s.can_recv() {
                    return Poll::Ready(s.recv_slice(buf).map_err(|_| NetError::Closed));
                }
                if !s.may_recv() {
                    return Poll::Ready(if s.state() == State::Closed {
                        Err(NetError::Closed)
                    } else {
                        Ok(0)
                    });
                }
                s.register_recv_waker(cx.waker());
                Poll::Pending
            })
        })
        .await
    }

    /// Writes some of `buf`, waiting while the send buffer is full.
    pub async fn write(&mut self, buf: &[u8]) -> Result<usize, NetError> {
        let h = self.handle;
        poll_fn(|cx| {
            stack::with(|st| {
                let s = st.sockets.get_mut::<tcp::Socket>(h);
                if !s.may_send() {
                    return Poll::Ready(Err(NetError::Closed));
                }
                if s.can_send() {
                    return Poll::Ready(s.send_slice(buf).map_err(|_| NetError::Closed));
                }
                s.register_send_waker(cx.waker());
                Poll::Pending
            })
        })
        .await
    }

    /// Writes all of `buf`.
    pub async fn write_all(&mut self, mut buf: &[u8]) -> Result<(), NetError> {
        while !buf.is_empty() {
            let n = self.write(buf).await?;
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Closes the sending side (the peer reads end-of-file).
    pub fn shutdown(&mut self) {
        stack::with(|st| st.sockets.get_mut::<tcp::Socket>(self.handle).close());
    }
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        // Closing sends what is buffered, then FIN; the socket is freed by
        // the stack once the connection has closed.
        stack::with(|st| {
            st.sockets.get_mut::<tcp::Socket>(self.handle).close();
            st.closing.push(self.handle);
        });
    }
}

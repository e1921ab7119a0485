//! The built-in user-mode network: no root, no tap.
//!
//! The guest's NIC is wired to a virtual gateway (10.0.2.2, the addresses
//! QEMU's user network uses) that runs its own TCP/IP stack (smoltcp) in the
//! monitor. Each published port (`-p [127.0.0.1:]HOST:GUEST`) is a host
//! socket listening on loopback by default; every accepted connection
//! becomes a TCP connection from the gateway to the guest's port, and the
//! monitor copies bytes between the two. No traffic leaves the host except
//! through the published listeners.
//!
//! Host memory stays bounded whatever the guest does: the frames between
//! the gateway and the guest are in bounded queues ([`FrameQueue`]), each
//! socket buffer is fixed, and while the guest is not taking frames the
//! backend stops reading its host sockets (and leaves them out of
//! [`NetBackend::fds`]), so the kernel's bounded socket queues hold or drop
//! the rest and a stalled guest costs no CPU.

use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpEndpoint};

use super::frames::FrameQueue;
use super::NetBackend;

/// Address of the virtual gateway.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// Address given to the guest.
pub const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
pub const PREFIX_LEN: u8 = 24;
const GATEWAY_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x35, 0x02];
const SOCKET_BUFFER: usize = 64 * 1024;
const MAX_CONNECTIONS: usize = 4096;
/// Connections in handshake toward the guest at once. The guest listens
/// with a fixed backlog of sockets; beyond it, a SYN would be refused, so
/// further host connections wait in the host's accept queue instead.
const MAX_HANDSHAKES: usize = 8;
/// Host accept-queue length for published ports.
pub(crate) const HOST_BACKLOG: i32 = 4096;
/// Frames between the gateway's stack and the guest's NIC, each way.
const WIRE_FRAMES: usize = 1024;
const WIRE_BYTES: usize = 2 << 20;

/// One `-p` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortForward {
    pub host: SocketAddr,
    pub guest_port: u16,
    pub udp: bool,
}

impl std::str::FromStr for PortForward {
    type Err = String;

    /// `HOST:GUEST` or `ADDR:HOST:GUEST` (ADDR defaults to 127.0.0.1),
    /// with an optional `/tcp` (the default) or `/udp` suffix.
    fn from_str(s: &str) -> Result<Self, String> {
        let (spec, udp) = match s.rsplit_once('/') {
            Some((spec, "udp")) => (spec, true),
            Some((spec, "tcp")) => (spec, false),
            Some((_, p)) => {
                return Err(format!("unknown protocol '{p}' in '{s}' (use tcp or udp)"))
            }
            None => (s, false),
        };
        let parts: Vec<&str> = spec.rsplitn(3, ':').collect();
        let port = |p: &str| {
            p.parse::<u16>()
                .map_err(|_| format!("'{p}' is not a port number in '{s}'"))
        };
        let (addr, host, guest) = match parts.as_slice() {
            [guest, host] => (Ipv4Addr::LOCALHOST, port(host)?, port(guest)?),
            [guest, host, addr] => (
                addr.parse::<Ipv4Addr>()
                    .map_err(|_| format!("'{addr}' is not an IPv4 address in '{s}'"))?,
                port(host)?,
                port(guest)?,
            ),
            _ => return Err(format!("'{s}' is not HOST:GUEST or ADDR:HOST:GUEST")),
        };
        if guest == 0 {
            return Err(format!("guest port 0 in '{s}'"));
        }
        Ok(PortForward {
            host: SocketAddr::new(addr.into(), host),
            guest_port: guest,
            udp,
        })
    }
}

/// Frames between the gateway's stack and the guest.
struct Wire {
    from_guest: FrameQueue,
    to_guest: FrameQueue,
}

impl Default for Wire {
    fn default() -> Wire {
        Wire {
            from_guest: FrameQueue::new(WIRE_FRAMES, WIRE_BYTES),
            to_guest: FrameQueue::new(WIRE_FRAMES, WIRE_BYTES),
        }
    }
}

struct RxToken(Vec<u8>);
/// A frame the gateway sends toward the guest (dropped, and counted, if
/// the queue is full).
struct TxToken<'a>(&'a mut FrameQueue);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl Device for Wire {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let f = self.from_guest.pop_front()?;
        Some((RxToken(f), TxToken(&mut self.to_guest)))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        Some(TxToken(&mut self.to_guest))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps
    }
}

struct Listener {
    socket: TcpListener,
    guest_port: u16,
}

/// A published UDP port: datagrams from each host client go to the guest
/// from a gateway socket of their own, so replies find their way back.
struct UdpForward {
    socket: UdpSocket,
    guest_port: u16,
    /// client -> (gateway socket, last activity)
    clients: Vec<(SocketAddr, SocketHandle, std::time::Instant)>,
    /// The next datagram's client cannot take it now (its gateway socket
    /// is full: the guest is not taking frames): the host socket is not
    /// read, and its queue in the kernel holds or drops what comes.
    paused: bool,
    /// Datagrams read and dropped (too many clients, socket full).
    dropped: u64,
}

/// Host clients tracked per UDP port, and how long an idle one is kept.
const UDP_CLIENTS: usize = 256;
const UDP_IDLE: Duration = Duration::from_secs(60);

struct Connection {
    stream: TcpStream,
    /// Its epoll token.
    id: u64,
    /// The host socket may have bytes to read (an edge was seen and no read
    /// has hit `WouldBlock` since): only such sockets are read, so a poll
    /// costs system calls in proportion to what is ready.
    readable: bool,
    handle: SocketHandle,
    /// The host side closed its write half: close toward the guest once
    /// everything was sent.
    host_eof: bool,
    /// The connection to the guest was established at some point.
    established: bool,
    /// The guest's end-of-file was passed on to the host.
    guest_eof: bool,
}

/// The user-mode network backend.
pub struct UserNet {
    /// Readiness of every host socket (edge-triggered): the one descriptor
    /// the I/O thread sleeps on for this backend.
    epoll: OwnedFd,
    /// Connections whose sockets reported readiness since the last pump.
    ready: HashSet<u64>,
    next_id: u64,
    wire: Wire,
    iface: Interface,
    sockets: SocketSet<'static>,
    listeners: Vec<Listener>,
    udp: Vec<UdpForward>,
    connections: Vec<Connection>,
    next_port: u16,
}

impl UserNet {
    /// Binds every published port; fails if one cannot be bound.
    pub fn new(forwards: &[PortForward]) -> std::io::Result<UserNet> {
        let mut listeners = Vec::new();
        let mut udp = Vec::new();
        for f in forwards.iter().filter(|f| f.udp) {
            let socket = UdpSocket::bind(f.host).map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot publish {}/udp: {e}", f.host))
            })?;
            socket.set_nonblocking(true)?;
            udp.push(UdpForward {
                socket,
                guest_port: f.guest_port,
                clients: Vec::new(),
                paused: false,
                dropped: 0,
            });
        }
        for f in forwards.iter().filter(|f| !f.udp) {
            let socket = TcpListener::bind(f.host).map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot publish {}: {e}", f.host))
            })?;
            socket.set_nonblocking(true)?;
            // std listens with a backlog of 128; deepen it so bursts of
            // connections wait in the kernel rather than being refused.
            // SAFETY: re-listening on a bound, listening socket we own.
            unsafe { libc::listen(socket.as_raw_fd(), HOST_BACKLOG) };
            listeners.push(Listener {
                socket,
                guest_port: f.guest_port,
            });
        }
        // SAFETY: a plain syscall; the result is checked.
        let efd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if efd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `efd` is a new descriptor owned by nothing else.
        let epoll = unsafe { OwnedFd::from_raw_fd(efd) };
        for fd in listeners
            .iter()
            .map(|l| l.socket.as_raw_fd())
            .chain(udp.iter().map(|u| u.socket.as_raw_fd()))
        {
            watch(&epoll, fd, SERVICE_TOKEN)?;
        }
        let mut wire = Wire::default();
        let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(GATEWAY_MAC)));
        let mut iface = Interface::new(config, &mut wire, Instant::now());
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(GATEWAY), PREFIX_LEN));
        });
        Ok(UserNet {
            epoll,
            ready: HashSet::new(),
            next_id: 0,
            wire,
            iface,
            sockets: SocketSet::new(vec![]),
            listeners,
            udp,
            connections: Vec::new(),
            // A random start: a guest restored from a snapshot still holds
            // the connections of its old backend, and a new one that reused
            // their ports would run into them.
            next_port: 49152 + (crate::boot::random_seed() % 16384) as u16,
        })
    }

    /// The host addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.socket.local_addr().ok())
            .collect()
    }

    /// Connections toward the guest still in their handshake.
    fn handshakes(&self) -> usize {
        self.connections
            .iter()
            .filter(|c| self.sockets.get::<tcp::Socket>(c.handle).state() == tcp::State::SynSent)
            .count()
    }

    /// Whether [`UserNet::accept`] would take a connection now.
    fn can_accept(&self, handshakes: usize) -> bool {
        self.connections.len() < MAX_CONNECTIONS
            && handshakes < MAX_HANDSHAKES
            && self.wire.to_guest.has_room()
    }

    fn accept(&mut self) {
        let mut handshakes = self.handshakes();
        for l in &self.listeners {
            while self.can_accept(handshakes) {
                let stream = match l.socket.accept() {
                    Ok((s, _)) => s,
                    Err(_) => break,
                };
                if stream.set_nonblocking(true).is_err() {
                    continue;
                }
                let _ = stream.set_nodelay(true);
                let mut sock = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
                    tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
                );
                sock.set_nagle_enabled(false);
                let port = self.next_port;
                self.next_port = if self.next_port == u16::MAX {
                    49152
                } else {
                    self.next_port + 1
                };
                let remote = IpEndpoint::new(IpAddress::Ipv4(GUEST), l.guest_port);
                if sock.connect(self.iface.context(), remote, port).is_err() {
                    continue;
                }
                let id = self.next_id;
                if watch(&self.epoll, stream.as_raw_fd(), id).is_err() {
                    continue;
                }
                self.next_id += 1;
                let handle = self.sockets.add(sock);
                handshakes += 1;
                self.connections.push(Connection {
                    stream,
                    id,
                    readable: true,
                    handle,
                    host_eof: false,
                    established: false,
                    guest_eof: false,
                });
            }
        }
    }

    fn new_port(&mut self) -> u16 {
        let port = self.next_port;
        self.next_port = if self.next_port == u16::MAX {
            49152
        } else {
            self.next_port + 1
        };
        port
    }

    /// Moves datagrams between published UDP ports and the guest.
    fn pump_udp(&mut self) {
        if self.udp.is_empty() {
            return; // runs on every poll: no buffer, no clock read, without UDP ports
        }
        let now = std::time::Instant::now();
        let mut buf = vec![0u8; 65536];
        for i in 0..self.udp.len() {
            // Host clients -> guest, while the next datagram's client can
            // take it (peeked, so a datagram it cannot take stays queued in
            // the kernel, which drops beyond its buffer).
            self.udp[i].paused = false;
            loop {
                if !self.wire.to_guest.has_room() {
                    self.udp[i].paused = true;
                    break;
                }
                let Ok((len, next)) = self.udp[i].socket.peek_from(&mut buf) else {
                    break;
                };
                let full = self.udp[i]
                    .clients
                    .iter()
                    .find(|c| c.0 == next)
                    .is_some_and(|c| {
                        let s = self.sockets.get::<udp::Socket>(c.1);
                        !s.can_send() || s.payload_send_capacity() - s.send_queue() < len
                    });
                if full {
                    self.udp[i].paused = true;
                    break;
                }
                let Ok((n, from)) = self.udp[i].socket.recv_from(&mut buf) else {
                    break;
                };
                let handle = match self.udp[i].clients.iter_mut().find(|c| c.0 == from) {
                    Some(c) => {
                        c.2 = now;
                        c.1
                    }
                    None => {
                        if self.udp[i].clients.len() >= UDP_CLIENTS {
                            // Too many clients: drop, as a full queue would.
                            self.udp[i].dropped += 1;
                            continue;
                        }
                        let mut s = udp::Socket::new(
                            udp::PacketBuffer::new(
                                vec![udp::PacketMetadata::EMPTY; 64],
                                vec![0; 65536],
                            ),
                            udp::PacketBuffer::new(
                                vec![udp::PacketMetadata::EMPTY; 64],
                                vec![0; 65536],
                            ),
                        );
                        let port = self.new_port();
                        if s.bind(port).is_err() {
                            continue;
                        }
                        let h = self.sockets.add(s);
                        self.udp[i].clients.push((from, h, now));
                        h
                    }
                };
                let to = IpEndpoint::new(IpAddress::Ipv4(GUEST), self.udp[i].guest_port);
                if self
                    .sockets
                    .get_mut::<udp::Socket>(handle)
                    .send_slice(&buf[..n], to)
                    .is_err()
                {
                    // No contiguous room after all (or too big): drop it,
                    // and read no more for now.
                    self.udp[i].dropped += 1;
                    self.udp[i].paused = true;
                    break;
                }
            }
            // Guest -> host clients; forget idle clients.
            let fwd = &mut self.udp[i];
            let sockets = &mut self.sockets;
            fwd.clients.retain(|&(client, h, last)| {
                let s = sockets.get_mut::<udp::Socket>(h);
                while let Ok((data, _)) = s.recv() {
                    let _ = fwd.socket.send_to(data, client);
                }
                let keep = now.duration_since(last) < UDP_IDLE;
                if !keep {
                    sockets.remove(h);
                }
                keep
            });
        }
    }

    /// Copies bytes both ways; drops finished connections.
    fn pump(&mut self) {
        let sockets = &mut self.sockets;
        let ready = &mut self.ready;
        self.connections.retain_mut(|c| {
            if !ready.is_empty() && ready.remove(&c.id) {
                c.readable = true;
            }
            let sock = sockets.get_mut::<tcp::Socket>(c.handle);
            if sock.state() == tcp::State::Established {
                c.established = true;
            }
            // Guest -> host.
            while sock.can_recv() {
                let r = sock.recv(|buf| match c.stream.write(buf) {
                    Ok(n) => (n, Ok(n)),
                    Err(e) => (0, Err(e)),
                });
                match r {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(_)) => {}
                    Err(_) => break,
                }
            }
            // Host -> guest.
            if c.readable && !c.host_eof && sock.may_send() {
                while sock.can_send() {
                    let r = sock.send(|buf| match c.stream.read(buf) {
                        Ok(n) => (n, Ok(n)),
                        Err(e) => (0, Err(e)),
                    });
                    match r {
                        Ok(Ok(0)) => {
                            c.host_eof = true;
                            sock.close();
                            break;
                        }
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) if e.kind() == ErrorKind::WouldBlock => {
                            c.readable = false;
                            break;
                        }
                        Ok(Err(_)) => {
                            sock.abort();
                            break;
                        }
                        Err(_) => break,
                    }
                }
            }
            // The guest closed its side: pass the EOF on to the host.
            if c.established && !c.guest_eof && !sock.may_recv() && sock.recv_queue() == 0 {
                let _ = c.stream.shutdown(std::net::Shutdown::Write);
                c.guest_eof = true;
            }
            let finished = matches!(sock.state(), tcp::State::Closed | tcp::State::TimeWait)
                || (c.host_eof && sock.state() == tcp::State::Closed);
            if finished {
                sockets.remove(c.handle);
                return false;
            }
            true
        });
        // Edges of connections that just went away.
        self.ready.clear();
    }
}

/// Epoll token of listeners and UDP sockets (served on every poll).
const SERVICE_TOKEN: u64 = u64::MAX;

/// Adds `fd` to `epoll`, edge-triggered, for reading, writing and hang-ups.
fn watch(epoll: &OwnedFd, fd: RawFd, token: u64) -> std::io::Result<()> {
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
        u64: token,
    };
    // SAFETY: valid descriptors and a valid event struct.
    if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl UserNet {
    /// Takes the readiness edges seen since the last poll (never blocks).
    /// A closed socket leaves epoll by itself when its descriptor closes.
    fn collect_events(&mut self) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 256];
        loop {
            // SAFETY: `events` is a valid buffer of its length.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    0,
                )
            };
            if n <= 0 {
                return;
            }
            for ev in &events[..n as usize] {
                let token = ev.u64;
                if token != SERVICE_TOKEN {
                    self.ready.insert(token);
                }
            }
            if (n as usize) < events.len() {
                return;
            }
        }
    }
}

impl NetBackend for UserNet {
    fn listeners(&self) -> Vec<OwnedFd> {
        self.listeners
            .iter()
            .filter_map(|l| l.socket.try_clone().ok().map(OwnedFd::from))
            .collect()
    }

    fn send(&mut self, frame: &[u8]) {
        if self.wire.from_guest.has_room() {
            self.wire.from_guest.push_back(frame.to_vec());
        } else {
            self.wire.from_guest.count_dropped();
        }
    }

    fn recv(&mut self) -> Option<Vec<u8>> {
        self.wire.to_guest.pop_front()
    }

    fn poll(&mut self) {
        self.collect_events();
        self.accept();
        for _ in 0..4 {
            self.iface
                .poll(Instant::now(), &mut self.wire, &mut self.sockets);
            self.pump();
            self.pump_udp();
            if self.wire.from_guest.is_empty() {
                break;
            }
        }
        self.iface
            .poll(Instant::now(), &mut self.wire, &mut self.sockets);
    }

    /// Only the sockets [`NetBackend::poll`] would read now: listeners
    /// while a connection can be taken, connections while the gateway's
    /// socket has room for the host's bytes, UDP ports not paused.
    fn fds(&self) -> Vec<RawFd> {
        vec![self.epoll.as_raw_fd()]
    }

    fn next_timeout(&mut self) -> Option<Duration> {
        self.iface
            .poll_delay(Instant::now(), &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_port_rules() {
        assert_eq!(
            "8080:80".parse::<PortForward>(),
            Ok(PortForward {
                host: "127.0.0.1:8080".parse().unwrap(),
                guest_port: 80,
                udp: false
            })
        );
        assert_eq!(
            "0.0.0.0:6379:6379".parse::<PortForward>(),
            Ok(PortForward {
                host: "0.0.0.0:6379".parse().unwrap(),
                guest_port: 6379,
                udp: false
            })
        );
        assert!("80".parse::<PortForward>().is_err());
        assert!("x:80".parse::<PortForward>().is_err());
        assert!("8080:0".parse::<PortForward>().is_err());
        assert!("1.2.3:8080:80".parse::<PortForward>().is_err());
        assert!("53:53/udp".parse::<PortForward>().unwrap().udp);
        assert!(!"53:53/tcp".parse::<PortForward>().unwrap().udp);
        assert!("53:53/sctp".parse::<PortForward>().is_err());
    }
}

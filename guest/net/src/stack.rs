//! The TCP/IP stack: one smoltcp interface on the guest's NIC, and the
//! socket set every [`crate::tcp`] object lives in.
//!
//! Brought up on first use. The executor polls it on every turn (see
//! `wisp::exec::set_io_poller`); polling moves frames between the virtio
//! rings and smoltcp, which wakes the tasks whose sockets changed.

use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};
use wisp_abi::manifest::DEVICE_NET;

use crate::phy::{Driver, Nic, NicState};

/// Network errors visible to applications.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetError {
    /// The boot page lists no network device.
    NoDevice,
    /// The device did not initialise.
    Driver,
    /// The port is in use or invalid.
    Bind,
    /// The connection was reset or closed.
    Closed,
    /// No route to the destination (or no address yet).
    Unreachable,
    /// No DNS server is configured.
    NoDnsServer,
    /// Not a valid DNS name.
    BadName,
    /// The name does not resolve.
    NotFound,
}

impl core::fmt::Display for NetError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            NetError::NoDevice => "no network device",
            NetError::Driver => "network device failed to initialise",
            NetError::Bind => "cannot listen on that port",
            NetError::Closed => "connection closed",
            NetError::Unreachable => "destination unreachable",
            NetError::NoDnsServer => "no DNS server configured",
            NetError::BadName => "invalid DNS name",
            NetError::NotFound => "name not found",
        })
    }
}

/// Interface configuration (an unspecified address means "not configured
/// yet": DHCP is running).
#[derive(Clone, Debug)]
pub struct Config {
    pub address: Ipv4Address,
    pub prefix_len: u8,
    pub gateway: Ipv4Address,
    pub dns_servers: Vec<Ipv4Address>,
}

/// The stack.
pub struct Stack {
    pub iface: Interface,
    pub sockets: SocketSet<'static>,
    pub nic: Nic,
    pub config: Config,
    /// Sockets whose owners dropped them; removed once closed.
    pub closing: Vec<SocketHandle>,
    /// The DHCP client, when the address comes from DHCP.
    pub dhcp: Option<SocketHandle>,
    /// Accept queues of the TCP listeners.
    pub listeners: Vec<ListenQueue>,
    pub next_listener: u64,
}

/// One listening port: sockets waiting for a handshake, and connections
/// established but not yet accepted.
pub struct ListenQueue {
    pub id: u64,
    pub port: u16,
    pub listening: Vec<SocketHandle>,
    pub ready: alloc::collections::VecDeque<SocketHandle>,
    pub waker: Option<core::task::Waker>,
}

impl ListenQueue {
    pub fn new(id: u64, port: u16) -> ListenQueue {
        ListenQueue {
            id,
            port,
            listening: Vec::new(),
            ready: Default::default(),
            waker: None,
        }
    }
}

impl Stack {
    /// Moves sockets that left the listening states to their accept queue
    /// (waking the acceptor), and keeps every queue's backlog listening.
    pub fn collect_accepted(&mut self) {
        use smoltcp::socket::tcp::{Socket, State};
        for q in &mut self.listeners {
            let sockets = &mut self.sockets;
            let mut moved = false;
            q.listening.retain(|&h| {
                let waiting = matches!(
                    sockets.get::<Socket>(h).state(),
                    State::Listen | State::SynReceived
                );
                if !waiting {
                    q.ready.push_back(h);
                    moved = true;
                }
                waiting
            });
            if moved {
                if let Some(w) = q.waker.take() {
                    w.wake();
                }
            }
        }
        let _ = self.refill_listeners();
    }

    /// Tops every listener's backlog up to `BACKLOG` listening sockets.
    pub fn refill_listeners(&mut self) -> Result<(), NetError> {
        for q in &mut self.listeners {
            while q.listening.len() < crate::tcp::BACKLOG {
                let s = crate::tcp::listening_socket(q.port).ok_or(NetError::Bind)?;
                q.listening.push(self.sockets.add(s));
            }
        }
        Ok(())
    }
}

struct Global(RefCell<Option<Stack>>);
// SAFETY: the guest is single-threaded and exception handlers never touch
// the stack.
unsafe impl Sync for Global {}
static STACK: Global = Global(RefCell::new(None));

fn now() -> Instant {
    Instant::from_micros((wisp::time::monotonic_ns() / 1000) as i64)
}

/// Brings the stack up if it is not yet.
pub fn init() -> Result<(), NetError> {
    if STACK.0.borrow().is_some() {
        return Ok(());
    }
    wisp::library_linked(&crate::LIB_NAME);
    let dev =
        wisp_virtio::find(DEVICE_NET, wisp_virtio::VIRTIO_NET, 0).ok_or(NetError::NoDevice)?;
    let transport = wisp_virtio::transport(dev).ok_or(NetError::Driver)?;
    let driver = Driver::new(transport).map_err(|_| NetError::Driver)?;
    let state = NicState::new(driver).map_err(|_| NetError::Driver)?;
    let mac = state.mac_address();
    let mut nic = Nic(alloc::rc::Rc::new(RefCell::new(state)));

    let dns_servers = if dev.dns != [0; 4] {
        vec![Ipv4Address::from_octets(dev.dns)]
    } else {
        Vec::new()
    };
    let use_dhcp = dev.ipv4 == [0; 4];
    let config = Config {
        address: Ipv4Address::from_octets(dev.ipv4),
        prefix_len: dev.prefix_len as u8,
        gateway: Ipv4Address::from_octets(dev.gateway),
        dns_servers,
    };
    let mut ic = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
    ic.random_seed = wisp::arch::x86_64::io::rdtsc();
    let mut iface = Interface::new(ic, &mut nic, now());
    let mut sockets = SocketSet::new(vec![]);
    let dhcp = if use_dhcp {
        Some(sockets.add(smoltcp::socket::dhcpv4::Socket::new()))
    } else {
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(config.address.into(), config.prefix_len));
        });
        let _ = iface.routes_mut().add_default_ipv4_route(config.gateway);
        if dev.gateway_mac[..6] != [0; 6] {
            let mut gw = [0u8; 6];
            gw.copy_from_slice(&dev.gateway_mac[..6]);
            crate::neighbor::learn(
                &mut iface,
                &mut sockets,
                now(),
                (mac, config.address),
                (gw, config.gateway),
            );
        }
        None
    };
    *STACK.0.borrow_mut() = Some(Stack {
        iface,
        sockets,
        nic,
        config,
        closing: Vec::new(),
        dhcp,
        listeners: Vec::new(),
        next_listener: 0,
    });
    wisp::exec::set_io_poller(poll);
    Ok(())
}

/// Runs `f` on the stack (which must be up).
pub fn with<R>(f: impl FnOnce(&mut Stack) -> R) -> R {
    let mut guard = STACK.0.borrow_mut();
    let stack = guard.as_mut().expect("network stack used before init");
    f(stack)
}

/// The interface's configuration, once up.
pub fn config() -> Option<Config> {
    STACK.0.borrow().as_ref().map(|s| s.config.clone())
}

/// The DNS servers known so far.
pub fn dns_servers() -> Vec<Ipv4Address> {
    STACK
        .0
        .borrow()
        .as_ref()
        .map(|s| s.config.dns_servers.clone())
        .unwrap_or_default()
}

/// Waits until the interface has an address (immediately for a static
/// one; after the DHCP exchange otherwise).
pub async fn configured() -> Result<Config, NetError> {
    init()?;
    loop {
        let c = config().expect("stack is up");
        if !c.address.is_unspecified() {
            return Ok(c);
        }
        // Sleep rather than spin: on the Wisp monitor frames arrive while
        // the guest waits, so a spinning guest would never see the answer.
        wisp::exec::sleep(core::time::Duration::from_millis(5)).await;
    }
}

/// Applies DHCP events to the interface.
fn poll_dhcp(s: &mut Stack) {
    let Some(h) = s.dhcp else { return };
    let event = s
        .sockets
        .get_mut::<smoltcp::socket::dhcpv4::Socket>(h)
        .poll();
    match event {
        None => {}
        Some(smoltcp::socket::dhcpv4::Event::Configured(c)) => {
            s.iface.update_ip_addrs(|a| {
                a.clear();
                let _ = a.push(IpCidr::Ipv4(c.address));
            });
            s.iface.routes_mut().remove_default_ipv4_route();
            if let Some(r) = c.router {
                let _ = s.iface.routes_mut().add_default_ipv4_route(r);
            }
            s.config.address = c.address.address();
            s.config.prefix_len = c.address.prefix_len();
            s.config.gateway = c.router.unwrap_or(Ipv4Address::UNSPECIFIED);
            s.config.dns_servers = c.dns_servers.iter().copied().collect();
        }
        Some(smoltcp::socket::dhcpv4::Event::Deconfigured) => {
            s.iface.update_ip_addrs(|a| a.clear());
            s.iface.routes_mut().remove_default_ipv4_route();
            s.config.address = Ipv4Address::UNSPECIFIED;
        }
    }
}

/// The executor's I/O poller: moves frames and returns the next deadline.
fn poll() -> Option<u64> {
    with(|s| {
        let t = now();
        // The monitor drains the transmit ring at the guest's exits; when it
        // is full, exit now (a zero wait) so it drains and smoltcp can go on.
        for _ in 0..8 {
            s.iface.poll(t, &mut s.nic, &mut s.sockets);
            // Keep every backlog listening before more SYNs come in.
            s.collect_accepted();
            if !s.nic.0.borrow_mut().tx_full() {
                break;
            }
            wisp::platform::wait(0);
        }
        poll_dhcp(s);
        s.collect_accepted();
        let sockets = &mut s.sockets;
        s.closing.retain(|&h| {
            let sock = sockets.get::<smoltcp::socket::tcp::Socket>(h);
            let done = matches!(
                sock.state(),
                smoltcp::socket::tcp::State::Closed | smoltcp::socket::tcp::State::TimeWait
            );
            if done {
                sockets.remove(h);
            }
            !done
        });
        // Frames still in the receive ring must be handled before any wait.
        if s.nic.0.borrow().can_recv() {
            return Some(wisp::time::monotonic_ns());
        }
        s.iface
            .poll_delay(t, &s.sockets)
            .map(|d| wisp::time::monotonic_ns() + d.total_micros() * 1000)
    })
}

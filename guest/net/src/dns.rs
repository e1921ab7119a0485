//! A DNS resolver (A records) on smoltcp's DNS socket, using the servers
//! the network was configured with (DHCP, or `dns=` on the command line).

use alloc::vec::Vec;
use core::future::poll_fn;
use core::task::Poll;

use smoltcp::socket::dns::{self, GetQueryResultError};
use smoltcp::wire::{DnsQueryType, IpAddress, Ipv4Address};

use crate::stack::{self, NetError};

/// Resolves `name` to its IPv4 addresses.
pub async fn resolve(name: &str) -> Result<Vec<Ipv4Address>, NetError> {
    stack::init()?;
    // A literal address needs no query.
    if let Ok(a) = name.parse::<Ipv4Address>() {
        return Ok(alloc::vec![a]);
    }
    let servers: Vec<IpAddress> = stack::dns_servers()
        .into_iter()
        .map(IpAddress::Ipv4)
        .collect();
    if servers.is_empty() {
        return Err(NetError::NoDnsServer);
    }
    let (socket, query) = stack::with(|st| {
        let mut s = dns::Socket::new(&servers, Vec::new());
        let q = s.start_query(st.iface.context(), name, DnsQueryType::A);
        (st.sockets.add(s), q)
    });
    let query = match query {
        Ok(q) => q,
        Err(_) => {
            stack::with(|st| st.sockets.remove(socket));
            return Err(NetError::BadName);
        }
    };
    let result = poll_fn(|cx| {
        stack::with(|st| {
            let s = st.sockets.get_mut::<dns::Socket>(socket);
            match s.get_query_result(query) {
                Ok(addrs) => Poll::Ready(Ok(addrs
                    .iter()
                    .map(|a| match a {
                        IpAddress::Ipv4(v4) => *v4,
                    })
                    .collect())),
                Err(GetQueryResultError::Pending) => {
                    s.register_query_waker(query, cx.waker());
                    Poll::Pending
                }
                Err(GetQueryResultError::Failed) => Poll::Ready(Err(NetError::NotFound)),
            }
        })
    })
    .await;
    stack::with(|st| st.sockets.remove(socket));
    result
}

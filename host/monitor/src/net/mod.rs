//! Network backends: where a guest's virtio-net frames go.

pub mod frames;
pub mod tap;
pub mod user;

use std::os::fd::RawFd;
use std::time::Duration;

/// The host side of a guest NIC.
pub trait NetBackend {
    /// A frame the guest transmitted.
    fn send(&mut self, frame: &[u8]);
    /// The next frame for the guest, if any.
    fn recv(&mut self) -> Option<Vec<u8>>;
    /// Makes progress on host-side I/O (accept connections, move bytes).
    fn poll(&mut self);
    /// File descriptors whose readiness means [`NetBackend::poll`] has work
    /// it will do now. Input the backend is not reading (its queue toward
    /// the guest is full: the guest is not taking frames) is left out, so a
    /// stalled guest costs the host no wakeups.
    fn fds(&self) -> Vec<RawFd>;
    /// When the backend next needs [`NetBackend::poll`] even without I/O.
    fn next_timeout(&mut self) -> Option<Duration>;
    /// Its published TCP listeners (duplicated handles on the same
    /// sockets): a live migration on one host stops them listening at its
    /// pause, so that the destination can bind the same ports, and makes
    /// them listen again if it fails.
    fn listeners(&self) -> Vec<std::os::fd::OwnedFd> {
        Vec::new()
    }
}

use std::net::Ipv4Addr;

/// One `--net` NIC: its backend and the guest's address on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NicConfig {
    pub backend: BackendKind,
    /// The guest's address; unspecified (0.0.0.0) means "use DHCP".
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    /// A DNS server for the guest, if any.
    pub dns: Option<Ipv4Addr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// The built-in user-mode network (with the run's `-p` ports).
    User,
    /// A host tap interface by name.
    Tap(String),
}

impl std::str::FromStr for NicConfig {
    type Err = String;

    /// `user` or `tap:NAME`, then optional `,ip=A.B.C.D/N` (or `ip=dhcp`),
    /// `,gw=A.B.C.D` and `,dns=A.B.C.D`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let kind = parts.next().unwrap_or("");
        let backend = match kind.split_once(':') {
            None if kind == "user" => BackendKind::User,
            Some(("tap", name)) if !name.is_empty() => BackendKind::Tap(name.to_string()),
            _ => return Err(format!("'{kind}' is not a network (use user or tap:NAME)")),
        };
        let addr = |v: &str| {
            v.parse::<Ipv4Addr>()
                .map_err(|_| format!("'{v}' is not an IPv4 address"))
        };
        let mut nic = NicConfig {
            backend,
            ip: user::GUEST,
            prefix_len: user::PREFIX_LEN,
            gateway: user::GATEWAY,
            dns: None,
        };
        let mut custom = false;
        for opt in parts {
            custom = true;
            match opt.split_once('=') {
                Some(("ip", "dhcp")) => {
                    nic.ip = Ipv4Addr::UNSPECIFIED;
                    nic.gateway = Ipv4Addr::UNSPECIFIED;
                }
                Some(("ip", v)) => {
                    let (ip, len) = v.split_once('/').unwrap_or((v, "24"));
                    nic.ip = addr(ip)?;
                    nic.prefix_len =
                        len.parse().ok().filter(|l| *l <= 32).ok_or(format!("'{len}' is not a prefix length"))?;
                }
                Some(("gw", v)) => nic.gateway = addr(v)?,
                Some(("dns", v)) => nic.dns = Some(addr(v)?),
                _ => {
                    return Err(format!(
                        "unknown network option '{opt}' (use ip=A.B.C.D/N, ip=dhcp, gw=A.B.C.D or dns=A.B.C.D)"
                    ))
                }
            }
        }
        if nic.backend == BackendKind::User && custom {
            return Err(
                "the user network's addresses are fixed (10.0.2.15/24 via 10.0.2.2)".into(),
            );
        }
        Ok(nic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nic_specs() {
        let n: NicConfig = "tap:tap0,ip=10.0.3.2/24,gw=10.0.3.1,dns=10.0.3.1"
            .parse()
            .unwrap();
        assert_eq!(n.backend, BackendKind::Tap("tap0".into()));
        assert_eq!(n.ip, Ipv4Addr::new(10, 0, 3, 2));
        assert_eq!(n.dns, Some(Ipv4Addr::new(10, 0, 3, 1)));
        let d: NicConfig = "tap:t,ip=dhcp".parse().unwrap();
        assert!(d.ip.is_unspecified());
        assert_eq!(
            "user".parse::<NicConfig>().unwrap().backend,
            BackendKind::User
        );
        assert!("user,ip=1.2.3.4".parse::<NicConfig>().is_err());
        assert!("tap:".parse::<NicConfig>().is_err());
        assert!("wifi".parse::<NicConfig>().is_err());
        assert!("tap:x,ip=300.1.1.1".parse::<NicConfig>().is_err());
        assert!("tap:x,mtu=9000".parse::<NicConfig>().is_err());
    }
}

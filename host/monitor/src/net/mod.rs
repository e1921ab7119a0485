//! Network backends: where a guest's virtio-net frames go.

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
    /// File descriptors whose readiness means [`NetBackend::poll`] has work.
    fn fds(&self) -> Vec<RawFd>;
    /// When the backend next needs [`NetBackend::poll`] even without I/O.
    fn next_timeout(&mut self) -> Option<Duration>;
}

use std::net::Ipv4Addr;

/// One `--net` NIC: its backend and the guest's address on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NicConfig {
    pub backend: BackendKind,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
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

    /// `user` or `tap:NAME`, then optional `,ip=A.B.C.D/N` and `,gw=A.B.C.D`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let kind = parts.next().unwrap_or("");
        let backend = match kind.split_once(':') {
            None if kind == "user" => BackendKind::User,
            Some(("tap", name)) if !name.is_empty() => BackendKind::Tap(name.to_string()),
            _ => return Err(format!("'{kind}' is not a network (use user or tap:NAME)")),
        };
        let mut nic = NicConfig {
            backend,
            ip: user::GUEST,
            prefix_len: user::PREFIX_LEN,
            gateway: user::GATEWAY,
        };
        for opt in parts {
            match opt.split_once('=') {
                Some(("ip", v)) => {
                    let (ip, len) = v.split_once('/').unwrap_or((v, "24"));
                    nic.ip = ip
                        .parse()
                        .map_err(|_| format!("'{ip}' is not an IPv4 address"))?;
                    nic.prefix_len = len
                        .parse()
                        .ok()
                        .filter(|l| *l <= 32)
                        .ok_or(format!("'{len}' is not a prefix length"))?;
                }
                Some(("gw", v)) => {
                    nic.gateway = v
                        .parse()
                        .map_err(|_| format!("'{v}' is not an IPv4 address"))?
                }
                _ => {
                    return Err(format!(
                        "unknown network option '{opt}' (use ip=A.B.C.D/N or gw=A.B.C.D)"
                    ))
                }
            }
        }
        if nic.backend == BackendKind::User
            && (nic.ip != user::GUEST || nic.gateway != user::GATEWAY)
        {
            return Err(
                "the user network's addresses are fixed (10.0.2.15, gateway 10.0.2.2)".into(),
            );
        }
        Ok(nic)
    }
}

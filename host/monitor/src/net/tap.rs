//! A tap device backend: the guest's frames go to a host tap interface by
//! name (created beforehand, e.g. inside a network namespace with
//! `ip tuntap add NAME mode tap`). Opening an existing tap needs only
//! access to `/dev/net/tun` and the tap's owner rights, not root.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use super::frames::FrameQueue;
use super::NetBackend;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// Frames read from the tap per poll, at most.
const READ_BATCH: usize = 256;
/// Frames read from the tap and not yet taken by the device, at most.
/// Beyond, the tap is not read: the kernel's queue (`txqueuelen`) fills and
/// drops, counted in the interface's statistics.
const MAX_TO_GUEST: usize = 256;
const MAX_TO_GUEST_BYTES: usize = 1 << 20;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

pub struct Tap {
    file: File,
    name: String,
    to_guest: FrameQueue,
}

impl Tap {
    /// Attaches to the tap interface `name`.
    pub fn open(name: &str) -> std::io::Result<Tap> {
        if name.is_empty()
            || name.len() >= libc::IFNAMSIZ
            || !name.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(std::io::Error::new(
                ErrorKind::InvalidInput,
                format!("'{name}' is not an interface name"),
            ));
        }
        // TUNSETIFF creates the interface when it does not exist; attaching
        // to one that was never set up would leave the guest on a link to
        // nowhere. Look the name up first, in this process's own network
        // namespace (a sysfs lookup would see the namespace /sys was
        // mounted in, which `nsenter --net` does not change).
        let c_name = std::ffi::CString::new(name).map_err(|_| {
            std::io::Error::new(
                ErrorKind::InvalidInput,
                format!("'{name}' is not an interface name"),
            )
        })?;
        // SAFETY: `c_name` is a NUL-terminated string that outlives the call.
        if unsafe { libc::if_nametoindex(c_name.as_ptr()) } == 0 {
            let e = std::io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::ENODEV) {
                std::io::Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "there is no interface '{name}' (create the tap first: ip tuntap add {name} mode tap)"
                    ),
                )
            } else {
                std::io::Error::new(e.kind(), format!("looking up interface '{name}': {e}"))
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| std::io::Error::new(e.kind(), format!("/dev/net/tun: {e}")))?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let _ = IFF_VNET_HDR; // frames carry no virtio header on the tap side
                              // SAFETY: TUNSETIFF reads and writes an `ifreq`-sized struct, which
                              // `req` is (name[16], flags, padding to 40 bytes).
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            return Err(std::io::Error::new(
                e.kind(),
                format!("cannot attach to tap '{name}': {e}"),
            ));
        }
        Ok(Tap {
            file,
            name: name.to_string(),
            to_guest: FrameQueue::new(MAX_TO_GUEST, MAX_TO_GUEST_BYTES),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl NetBackend for Tap {
    fn send(&mut self, frame: &[u8]) {
        // A full tap queue drops the frame, as a congested link would.
        let _ = self.file.write(frame);
    }

    fn recv(&mut self) -> Option<Vec<u8>> {
        self.to_guest.pop_front()
    }

    fn poll(&mut self) {
        let mut buf = [0u8; 65536];
        for _ in 0..READ_BATCH {
            if !self.to_guest.has_room() {
                break;
            }
            match self.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    self.to_guest.push_back(buf[..n].to_vec());
                }
                Err(_) => break,
            }
        }
    }

    fn fds(&self) -> Vec<RawFd> {
        if self.to_guest.has_room() {
            vec![self.file.as_raw_fd()]
        } else {
            Vec::new() // not read until the device takes frames
        }
    }

    fn next_timeout(&mut self) -> Option<Duration> {
        None
    }
}

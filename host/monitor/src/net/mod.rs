//! Network backends: where a guest's virtio-net frames go.

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

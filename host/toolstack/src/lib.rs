//! # The Wisp toolstack
//!
//! A daemon that starts unikernels fast and by the thousand, and the client
//! side of its API. Each guest runs in its own monitor process (a KVM VM
//! belongs to the process that created it); the daemon keeps a pool of
//! pre-started ones, "shells", that have already created their VM, vCPU and
//! memory ([`pool`]), and hands a shell the image and open files of a `run`
//! request over a Unix socket ([`proto`], [`shell`]). It supervises every
//! monitor ([`vms`]), keeps per-VM records, control sockets and bounded
//! logs in a state directory ([`record`], [`logs`]) so that a restarted
//! daemon re-adopts running guests, and serves an HTTP/JSON API on a Unix
//! socket ([`http`], [`api`], `docs/api.yaml`) with Prometheus metrics
//! ([`metrics`]).

pub mod acceptors;
pub mod api;
pub mod client;
pub mod daemon;
pub mod http;
pub mod images;
pub mod logs;
pub mod metrics;
pub mod migration;
pub mod pool;
pub mod priority;
pub mod process;
pub mod proto;
pub mod reaper;
pub mod record;
pub mod shell;
pub mod spawner;
pub mod trim;
pub mod vms;

/// A line on the daemon's stderr (its journal under systemd); a closed
/// stderr is ignored.
pub fn log(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "wisp daemon: {args}");
}

/// Entry of `wisp shell`: runs one monitor on the hand-off channel the
/// daemon passed as descriptor [`pool::CHANNEL_FD`] (a `background` one
/// creates its VM at idle CPU priority: see [`priority`]).
pub fn shell_main(memory: u64, background: bool) -> i32 {
    use std::os::fd::FromRawFd;
    // SAFETY: the daemon starts `wisp shell` with its end of the hand-off
    // socket pair at this descriptor, and nothing else in this process
    // owns it.
    let channel = unsafe { std::os::unix::net::UnixStream::from_raw_fd(pool::CHANNEL_FD) };
    shell::run(memory, background, channel)
}

//! Live migration between daemons, the parts outside the VM table: what
//! the stream's META says, the receiving daemon's TCP listener, and the
//! monitor process's side (send from the control thread, receive during a
//! hand-off).
//!
//! ```text
//! source daemon                                destination daemon
//!  POST /v1/vms/ID/migrate {to}                 --migration-listen ADDR
//!  connect to ADDR ------------------------->   accept; read header + META,
//!  hand the socket to the monitor               check it (name free, ports,
//!  (Migrate request, SCM_RIGHTS)                disk, memory), hand the
//!                                               socket to a shell (Handoff
//!  monitor: pages, rounds, pause, state -->     with `migration`)
//!                                               shell: memory, restore,
//!  monitor: stop the guest   <------ RUNNING    start, confirm
//!  exit record: migrated to ADDR                VM listed with its name
//! ```
//! The source keeps its guest until RUNNING arrives: a refusal, a cut
//! connection or a receiver killed on the way resumes it.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::ops::RangeInclusive;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use wisp_monitor::migration::{self, SendOptions};
use wisp_monitor::{RunningVm, Vm, VmConfig};

use crate::proto::{DiskMode, Handoff, MigrateFigures};
use crate::vms::Vms;

/// How long a migration waits for the other side at any one step.
pub const STEP_LIMIT: Duration = Duration::from_secs(5);

/// What the source tells the destination daemon about the guest (the
/// stream's META message, JSON).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// The name the guest gets on the destination.
    pub name: String,
    /// The image it was booted from (for `ps`; not read).
    pub image: String,
    pub memory: u64,
    /// `-p` rules the destination publishes.
    pub publish: Vec<String>,
    /// The disk's path on the destination's host (same path on one host).
    pub disk: Option<String>,
    #[serde(default)]
    pub disk_read_only: bool,
    pub cpus: Option<f64>,
}

/// `POST /v1/vms/{ref}/migrate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// `HOST:PORT` of the destination daemon's migration listener.
    pub to: String,
    /// The guest's name there (default: its name here).
    pub name: Option<String>,
    /// The ports it publishes there (default: the same rules as here).
    pub publish: Option<Vec<String>>,
}

/// What a daemon accepts from arriving guests. The listener is not
/// authenticated, so everything a META asks for is the peer's choice:
/// without these bounds any peer could make this daemon allocate memory,
/// bind host ports or attach files as it likes.
#[derive(Clone, Debug)]
pub struct Policy {
    /// The only directory whose regular files an arriving guest may have
    /// as its disk (none: a guest with a disk is refused).
    pub disks: Option<PathBuf>,
    /// Most memory one arriving guest may have (at most
    /// [`MAX_INCOMING`] of them arrive at once).
    pub max_memory: u64,
    /// The host ports an arriving guest may publish (none: a guest that
    /// publishes any port is refused).
    pub ports: Option<RangeInclusive<u16>>,
    /// Besides loopback, the one address an arriving guest may publish
    /// on: the address the operator exposed for migrations
    /// (`--migration-listen`'s). A peer cannot put a guest on an
    /// interface the operator did not open.
    pub listen_ip: Option<std::net::IpAddr>,
}

/// [`Policy::max_memory`] unless the operator says otherwise: room for
/// the usual small unikernel, not for a peer to take the host's memory.
pub const DEFAULT_MAX_MEMORY: u64 = 256 << 20;

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            disks: None,
            max_memory: DEFAULT_MAX_MEMORY,
            ports: None,
            listen_ip: None,
        }
    }
}

/// Most migrations a daemon receives at once. Each holds a thread and,
/// once its META is read, a monitor process with the guest's memory (the
/// listener is not authenticated): any more are refused at once, and
/// their sources resume their guests.
pub const MAX_INCOMING: usize = 4;

/// Migrations being received now.
static ARRIVING: AtomicUsize = AtomicUsize::new(0);

/// One of the [`MAX_INCOMING`] places, given back when dropped.
struct Place;

impl Place {
    fn take() -> Option<Place> {
        ARRIVING
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_INCOMING).then_some(n + 1)
            })
            .ok()
            .map(|_| Place)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        ARRIVING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Binds the migration listener and serves it on a thread of its own:
/// each connection is handed to [`Vms::receive_migration`], at most
/// [`MAX_INCOMING`] at once, each checked against `policy`.
pub fn listen(vms: Arc<Vms>, addr: SocketAddr, policy: Policy) -> std::io::Result<SocketAddr> {
    let policy = Arc::new(policy);
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("wisp-migration".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(c) => {
                        let Some(place) = Place::take() else {
                            // A fresh socket's buffer takes the short
                            // reply without waiting.
                            let _ = c.set_nonblocking(true);
                            refuse(&c, "too many migrations arriving; try again later");
                            continue;
                        };
                        let vms = vms.clone();
                        let policy = policy.clone();
                        let spawned =
                            std::thread::Builder::new()
                                .stack_size(256 << 10)
                                .spawn(move || {
                                    let _place = place;
                                    vms.receive_migration(c, &policy)
                                });
                        if let Err(e) = spawned {
                            crate::log(format_args!("cannot serve a migration: {e}"));
                        }
                    }
                    Err(e) => {
                        crate::log(format_args!("migration accept: {e}"));
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        })?;
    Ok(bound)
}

/// Reads the start of an incoming stream: memory size and META.
pub fn read_meta(conn: &TcpStream) -> Result<(u64, Meta), String> {
    let (size, meta) = migration::read_start(conn, STEP_LIMIT).map_err(|e| e.to_string())?;
    let meta: Meta =
        serde_json::from_slice(&meta).map_err(|e| format!("bad migration META: {e}"))?;
    if meta.memory != size {
        return Err(format!(
            "META says {} bytes of memory, the stream {size}",
            meta.memory
        ));
    }
    Ok((size, meta))
}

/// Tells the source the migration was refused here.
pub fn refuse(conn: &dyn AsRawFd, error: &str) {
    migration::refuse(conn, error, STEP_LIMIT);
}

// ---- in the monitor process ------------------------------------------------

/// Where this monitor's guest went (set once a migration succeeded).
static MIGRATED_TO: OnceLock<String> = OnceLock::new();

/// The destination this monitor's guest migrated to, if it did.
pub fn migrated_to() -> Option<&'static str> {
    MIGRATED_TO.get().map(String::as_str)
}

/// Migrates the guest over `conn` (handed over with the request); on
/// success the guest is stopped here and its exit record will say where
/// it went.
pub fn send_in_shell(
    running: &RunningVm,
    conn: Option<OwnedFd>,
    meta: String,
    to: String,
) -> Result<MigrateFigures, String> {
    let conn = conn.ok_or("a migrate request came without its connection")?;
    let opts = SendOptions {
        meta: meta.into_bytes(),
        timeout: STEP_LIMIT,
        ..SendOptions::default()
    };
    // Recorded first: the guest is stopped inside `send` once confirmed.
    let r = migration::send(running, &conn, &opts);
    let r = r.map_err(|e| format!("migration to {to}: {e}"))?;
    let _ = MIGRATED_TO.set(to);
    Ok(MigrateFigures {
        memory: r.memory_size,
        rounds: r.rounds,
        final_pages: r.final_pages,
        bytes_sent: r.bytes_sent,
        total_us: r.total.as_micros() as u64,
        downtime_us: r.downtime.as_micros() as u64,
    })
}

/// Receives the guest from `conn` (the daemon read the header and META)
/// and builds it with the hand-off's ports and disk; the caller starts it
/// and then calls [`confirm_in_shell`]. On an error the source is told.
pub fn receive_in_shell(
    h: &Handoff,
    conn: &OwnedFd,
    disk: Option<&OwnedFd>,
    size: u64,
) -> Result<Vm, String> {
    let built = (|| -> Result<Vm, String> {
        let (publish, nics) = crate::shell::user_nics(&h.publish)?;
        // The disk was opened by the daemon; the restore opens it again
        // through /proc, before this process gives up opening files.
        let disk = match (h.disk, disk) {
            (Some(mode), Some(fd)) => Some(wisp_monitor::vm::DiskConfig {
                path: format!("/proc/self/fd/{}", fd.as_raw_fd()).into(),
                read_only: mode == DiskMode::ReadOnly,
            }),
            _ => None,
        };
        let cfg = VmConfig {
            memory: size,
            args: vec![],
            trace_boot: false,
            nics,
            publish,
            net_limits: (0, 0),
            disk_limits: (0, 0),
            disk,
        };
        let (vm, _) = migration::receive(conn, size, &cfg, STEP_LIMIT)
            .map_err(|e| format!("receiving the migration: {e}"))?;
        Ok(vm)
    })();
    if let Err(e) = &built {
        refuse(conn, e);
    }
    built
}

/// Confirms to the source that the guest runs here; if the source cannot
/// be told, the guest is stopped here (the source keeps it).
pub fn confirm_in_shell(running: &RunningVm, conn: &OwnedFd) -> Result<(), String> {
    migration::confirm(conn, STEP_LIMIT).map_err(|e| {
        running
            .controller()
            .stop(wisp_monitor::StopReason::Requested);
        format!("confirming to the source: {e}")
    })
}

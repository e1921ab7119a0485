//! Live migration in the VM table (a child of [`crate::vms`]): sending a
//! VM to another daemon, and creating the VM a migration brings in.

use std::cell::RefCell;
use std::net::{TcpStream, ToSocketAddrs};
use std::ops::RangeInclusive;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use wisp_monitor::control::monotonic_ns;

use super::{lock, open_disk, Vm, VmError, Vms};
use crate::migration::{self, Meta, MigrateRequest, Policy};
use crate::proto::{ControlReply, ControlRequest, MigrateFigures};
use crate::record::{self, RestartPolicy, Spec, State};

/// The connection of a migration being received, with its memory size,
/// from the moment its META is accepted until the launch of the VM it
/// creates hands it to a shell.
pub(super) type Incoming = (OwnedFd, u64);

thread_local! {
    /// The connection this thread's [`Vms::receive_migration`] is
    /// creating a VM for. Per thread, not in a table by the VM's name: the
    /// create and its launch run on the serving thread, so a `wisp run
    /// --name X` served on another thread at the same moment cannot take
    /// the connection of a migration of a guest named X.
    static INCOMING: RefCell<Option<Incoming>> = const { RefCell::new(None) };
}

/// The incoming connection for the VM this thread launches, if its launch
/// is that of a migration.
pub(super) fn take_incoming() -> Option<Incoming> {
    INCOMING.with(|i| i.borrow_mut().take())
}

/// Offers `i` to the next launch on this thread (see [`INCOMING`]).
fn offer_incoming(i: Incoming) {
    INCOMING.with(|slot| *slot.borrow_mut() = Some(i));
}

impl Vms {
    /// Migrates a running VM to the daemon listening at `req.to`. The
    /// daemon connects; the monitor streams the guest and, once the
    /// destination confirms it runs there, stops it here (`exited`, how
    /// `migrated`). On any error the guest runs on here.
    pub fn migrate(&self, vm: &Arc<Vm>, req: &MigrateRequest) -> Result<MigrateFigures, VmError> {
        let _op = lock(&vm.op);
        let r = Vms::require_state(vm, &[State::Running], "migrate")?;
        let bad = VmError::BadRequest;
        if let Some(n) = &req.name {
            record::check_name(n).map_err(bad)?;
        }
        let publish = req.publish.clone().unwrap_or(r.spec.publish.clone());
        for p in &publish {
            p.parse::<wisp_monitor::net::user::PortForward>()
                .map_err(|e| bad(format!("publish: {e}")))?;
        }
        let addr = req
            .to
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| bad(format!("'{}' is not HOST:PORT", req.to)))?;
        let conn = TcpStream::connect_timeout(&addr, migration::STEP_LIMIT).map_err(|e| {
            VmError::Unavailable(format!("cannot reach a migration listener at {addr}: {e}"))
        })?;
        // The monitor waits in poll(2) with its own timeouts; small
        // messages (SYNC, STATE) must not wait for ACKs (Nagle).
        conn.set_nonblocking(true)
            .and_then(|_| conn.set_nodelay(true))
            .map_err(|e| VmError::Internal(format!("migration socket: {e}")))?;
        let meta = Meta {
            name: req.name.clone().unwrap_or(r.name.clone()),
            image: r.spec.image.clone(),
            memory: r.spec.memory,
            publish,
            disk: r.spec.disk.clone(),
            disk_read_only: r.spec.disk_read_only,
            cpus: r.spec.cpus,
        };
        let meta = serde_json::to_string(&meta).map_err(|e| VmError::Internal(e.to_string()))?;
        self.mark_stop_requested(vm)?;
        let sock = self.dir(&r.id).join("control.sock");
        let msg = ControlRequest::Migrate {
            meta,
            to: addr.to_string(),
        };
        let result = request_migrate(&sock, msg, &conn).and_then(|reply| match reply {
            ControlReply::Migrated(f) => Ok(f),
            ControlReply::Failed { error } => Err(VmError::Conflict(error)),
            _ => Err(VmError::Internal("the monitor did not migrate".into())),
        });
        drop(conn);
        match result {
            Ok(f) => {
                // The monitor stops its guest once confirmed: wait for its
                // end so that the caller sees the VM exited.
                vm.wait_not_live(Duration::from_secs(10));
                Ok(f)
            }
            Err(e) => {
                // The monitor resumed the guest: it is not being stopped.
                let mut rec = lock(&vm.record);
                rec.stop_requested = false;
                let _ = rec.save(&self.state_dir);
                Err(e)
            }
        }
    }

    /// Serves one connection of the migration listener: reads the start
    /// of the stream, checks what it asks for, and creates the VM from it
    /// (a shell receives the rest). Anything refused is told to the
    /// source, which then resumes its guest.
    pub fn receive_migration(self: &Arc<Self>, conn: TcpStream, policy: &Policy) {
        let request_ns = monotonic_ns();
        let peer = conn
            .peer_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string());
        let result = (|| {
            let (size, meta) = migration::read_meta(&conn)?;
            let (name, spec) = check_meta(meta, policy)?;
            conn.set_nonblocking(true)
                .and_then(|_| conn.set_nodelay(true))
                .map_err(|e| format!("migration socket: {e}"))?;
            let fd = OwnedFd::from(conn.try_clone().map_err(|e| e.to_string())?);
            offer_incoming((fd, size));
            let created = self.create(Some(name), spec, request_ns);
            // Not taken if the create failed before its launch.
            drop(take_incoming());
            created.map_err(|e| e.to_string())
        })();
        match result {
            Ok(r) => crate::log(format_args!(
                "received '{}' ({}) by migration from {peer}",
                r.name, r.id
            )),
            Err(e) => {
                crate::log(format_args!("migration from {peer} refused: {e}"));
                migration::refuse(&conn, &e);
            }
        }
    }
}

/// How long the daemon waits for a monitor's migration: the monitor's own
/// limit is per step (no progress for [`migration::STEP_LIMIT`]), and its
/// rounds are bounded, so this only bounds a monitor that hangs.
const MIGRATE_LIMIT: Duration = Duration::from_secs(600);

/// The migrate request to a monitor, with the connection, and its reply
/// (as `vms::request`, with a limit for a whole migration).
fn request_migrate(
    sock: &Path,
    req: ControlRequest,
    conn: &TcpStream,
) -> Result<ControlReply, VmError> {
    use std::io::{BufRead, BufReader, Write};
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let unavailable =
        |e: std::io::Error| VmError::Unavailable(format!("the VM's monitor does not answer: {e}"));
    let mut s = std::os::unix::net::UnixStream::connect(sock).map_err(unavailable)?;
    s.set_read_timeout(Some(MIGRATE_LIMIT))
        .map_err(unavailable)?;
    let mut line = serde_json::to_vec(&req).map_err(|e| VmError::Internal(e.to_string()))?;
    line.push(b'\n');
    let n = s
        .send_with_fds(&[&line[..]], &[conn.as_raw_fd()])
        .map_err(|e| unavailable(std::io::Error::from_raw_os_error(e.errno())))?;
    s.write_all(&line[n..]).map_err(unavailable)?;
    let mut reply = String::new();
    BufReader::new(&s)
        .read_line(&mut reply)
        .map_err(unavailable)?;
    serde_json::from_str::<ControlReply>(&reply)
        .map_err(|_| VmError::Unavailable("the VM's monitor ended or sent no reply".into()))
}

/// Checks a META as a run request is checked, and what it asks of this
/// host against `policy`: its memory, its published ports (see
/// [`check_ports`]) and its disk (see [`check_disk`]); returns the VM's
/// name and spec.
fn check_meta(mut m: Meta, policy: &Policy) -> Result<(String, Spec), String> {
    wisp_monitor::layout::check_memory(m.memory).map_err(|e| format!("memory: {e}"))?;
    if m.memory > policy.max_memory {
        return Err(format!(
            "the guest has {} MiB of memory, more than this daemon takes by migration ({} MiB, wisp daemon --migration-max-memory)",
            m.memory >> 20,
            policy.max_memory >> 20
        ));
    }
    record::check_name(&m.name)?;
    check_ports(&m.publish, policy.ports.as_ref(), policy.listen_ip)?;
    if let Some(d) = m.disk.take() {
        let d = check_disk(&d, policy.disks.as_deref())?;
        open_disk(&d, m.disk_read_only).map_err(|e| format!("disk {d}: {e}"))?;
        m.disk = Some(d);
    }
    if let Some(c) = m.cpus {
        if !(c > 0.0 && c <= 1.0) {
            return Err(format!("cpus {c} is not in (0, 1]"));
        }
    }
    Ok((
        m.name,
        Spec {
            image: m.image,
            memory: m.memory,
            args: vec![],
            publish: m.publish,
            disk: m.disk,
            disk_read_only: m.disk_read_only,
            cpus: m.cpus,
            restart: RestartPolicy::No,
            snapshot: None,
        },
    ))
}

/// Checks the `-p` rules a META asks this host to publish: each must
/// parse and its host port lie in `ports` (the daemon's
/// `--migration-ports`); without a range, any rule is refused. Its
/// address must be loopback or `listen_ip` (the migration listener's).
fn check_ports(
    publish: &[String],
    ports: Option<&RangeInclusive<u16>>,
    listen_ip: Option<std::net::IpAddr>,
) -> Result<(), String> {
    for p in publish {
        let rule = p
            .parse::<wisp_monitor::net::user::PortForward>()
            .map_err(|e| format!("publish: {e}"))?;
        let ip = rule.host.ip();
        if !ip.is_loopback() && Some(ip) != listen_ip {
            return Err(format!(
                "the guest publishes {p}: an arriving guest publishes on loopback or on this daemon's --migration-listen address only"
            ));
        }
        let port = rule.host.port();
        match ports {
            None => {
                return Err(format!(
                    "the guest publishes {p}, and this daemon publishes no ports for arriving guests (wisp daemon --migration-ports LO-HI)"
                ))
            }
            Some(r) if !r.contains(&port) => {
                return Err(format!(
                    "the guest publishes {p}: host port {port} is outside this daemon's --migration-ports {}-{}",
                    r.start(),
                    r.end()
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The disk a META names, if it is a regular file under `disks` (the
/// directory the daemon was given for them): its path with every link
/// resolved, which the VM then opens.
fn check_disk(d: &str, disks: Option<&Path>) -> Result<String, String> {
    let dir = disks.ok_or_else(|| {
        format!("the guest has a disk ({d}), and this daemon takes none by migration (wisp daemon --migration-disks DIR)")
    })?;
    if !Path::new(d).is_absolute() {
        return Err(format!("disk '{d}' is not an absolute path"));
    }
    let real = std::fs::canonicalize(d).map_err(|e| format!("disk {d}: {e}"))?;
    let root = std::fs::canonicalize(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !real.starts_with(&root) {
        return Err(format!("disk {d} is not under {}", dir.display()));
    }
    let meta = std::fs::metadata(&real).map_err(|e| format!("disk {d}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("disk {d} is not a regular file"));
    }
    real.into_os_string()
        .into_string()
        .map_err(|_| format!("disk {d}: not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::{check_disk, check_ports, offer_incoming, take_incoming};

    /// A connection offered for one migration's launch is not found by a
    /// launch on another thread (a `wisp run` of a VM with the same name
    /// served at that moment), and is found once by its own.
    #[test]
    fn an_incoming_connection_goes_only_to_its_own_launch() {
        let (x, _y) = std::os::unix::net::UnixStream::pair().unwrap();
        offer_incoming((x.into(), 16 << 20));
        let other = std::thread::spawn(|| take_incoming().is_some());
        assert!(!other.join().unwrap(), "another thread took the connection");
        assert_eq!(take_incoming().map(|(_, size)| size), Some(16 << 20));
        assert!(take_incoming().is_none());
    }

    #[test]
    fn published_ports_only_inside_the_given_range() {
        let rules = |r: &[&str]| r.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_ports(&[], None, None).is_ok());
        let e = check_ports(&rules(&["8080:80"]), None, None).unwrap_err();
        assert!(e.contains("no ports"), "{e}");
        let range = 8000..=8099;
        let ok = |r: &[&str]| check_ports(&rules(r), Some(&range), None);
        assert!(ok(&["8080:80", "127.0.0.1:8000:1/udp"]).is_ok());
        let e = ok(&["8080:80", "22:22"]).unwrap_err();
        assert!(e.contains("host port 22 is outside"), "{e}");
        let e = ok(&["8100:80"]).unwrap_err();
        assert!(e.contains("outside"), "{e}");
        assert!(ok(&["x:80"]).is_err());
        // Only loopback, or the address the operator opened for migrations.
        let e = ok(&["0.0.0.0:8080:80"]).unwrap_err();
        assert!(e.contains("loopback"), "{e}");
        let listen = Some("192.0.2.7".parse().unwrap());
        assert!(check_ports(&rules(&["192.0.2.7:8080:80"]), Some(&range), listen).is_ok());
        assert!(check_ports(&rules(&["0.0.0.0:8080:80"]), Some(&range), listen).is_err());
    }

    #[test]
    fn disks_only_from_the_given_directory() {
        let dir = std::env::temp_dir().join(format!("wisp-disks-{}", std::process::id()));
        let inside = dir.join("in");
        std::fs::create_dir_all(&inside).unwrap();
        let f = inside.join("d.img");
        std::fs::write(&f, [0u8; 512]).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", inside.join("link")).unwrap();
        let f = f.to_str().unwrap();
        assert!(check_disk(f, None).unwrap_err().contains("takes none"));
        assert_eq!(check_disk(f, Some(&inside)).unwrap(), f);
        let up = format!("{}/../in/d.img", inside.display());
        assert_eq!(check_disk(&up, Some(&inside)).unwrap(), f);
        let e = check_disk("/etc/hostname", Some(&inside)).unwrap_err();
        assert!(e.contains("not under"), "{e}");
        let link = inside.join("link");
        let e = check_disk(link.to_str().unwrap(), Some(&inside)).unwrap_err();
        assert!(e.contains("not under"), "{e}");
        let e = check_disk(inside.to_str().unwrap(), Some(&dir)).unwrap_err();
        assert!(e.contains("regular file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

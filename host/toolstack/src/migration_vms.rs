//! Live migration in the VM table (a child of [`crate::vms`]): sending a
//! VM to another daemon, and creating the VM a migration brings in.

use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wisp_monitor::control::monotonic_ns;

use super::{lock, open_disk, Vm, VmError, Vms};
use crate::migration::{self, Meta, MigrateRequest};
use crate::proto::{ControlReply, ControlRequest, MigrateFigures};
use crate::record::{self, RestartPolicy, Spec, State};

/// Connections of migrations being received, by the name of the VM they
/// create, until its launch hands them to a shell: (connection, memory).
static INCOMING: Mutex<Vec<(String, OwnedFd, u64)>> = Mutex::new(Vec::new());

/// The incoming connection for the VM named `name`, if its launch is that
/// of a migration.
pub(super) fn take_incoming(name: &str) -> Option<(OwnedFd, u64)> {
    let mut t = lock(&INCOMING);
    let i = t.iter().position(|(n, _, _)| n == name)?;
    let (_, fd, size) = t.swap_remove(i);
    Some((fd, size))
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
    pub fn receive_migration(self: &Arc<Self>, conn: TcpStream, disks: Option<&Path>) {
        let request_ns = monotonic_ns();
        let peer = conn
            .peer_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string());
        let result = (|| {
            let (size, meta) = migration::read_meta(&conn)?;
            let (name, spec) = check_meta(meta, disks)?;
            conn.set_nonblocking(true)
                .and_then(|_| conn.set_nodelay(true))
                .map_err(|e| format!("migration socket: {e}"))?;
            let fd = OwnedFd::from(conn.try_clone().map_err(|e| e.to_string())?);
            {
                let mut t = lock(&INCOMING);
                if t.iter().any(|(n, _, _)| *n == name) {
                    return Err(format!("a migration of '{name}' is already arriving"));
                }
                t.push((name.clone(), fd, size));
            }
            let created = self.create(Some(name.clone()), spec, request_ns);
            // Not taken if the create failed before its launch.
            drop(take_incoming(&name));
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

/// Checks a META as a run request is checked, and its disk against
/// `disks` (see [`check_disk`]); returns the VM's name and spec.
fn check_meta(mut m: Meta, disks: Option<&Path>) -> Result<(String, Spec), String> {
    wisp_monitor::layout::check_memory(m.memory).map_err(|e| format!("memory: {e}"))?;
    record::check_name(&m.name)?;
    for p in &m.publish {
        p.parse::<wisp_monitor::net::user::PortForward>()
            .map_err(|e| format!("publish: {e}"))?;
    }
    if let Some(d) = m.disk.take() {
        let d = check_disk(&d, disks)?;
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
    use super::check_disk;

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

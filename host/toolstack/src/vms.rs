//! The VMs the daemon knows: their lifecycle, supervision and re-adoption.
//!
//! Each VM is one monitor process. The daemon learns of its end through a
//! pidfd (and `waitpid` when it is the parent, which adds the signal), and
//! of how its guest ended from the exit record the monitor writes. Every
//! change of a VM is written to its `vm.json` before it is acknowledged,
//! so a daemon started after a crash finds each guest again: a live
//! monitor process (same pid, same start time) is adopted, and one that
//! ended meanwhile is recorded from its exit record.
//!
//! Locks: the table lock is held only to find, add or remove a VM; a VM's
//! `op` lock serialises its lifecycle operations (a stop and a pause do not
//! interleave); its `record` lock only guards the fields.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use serde::Deserialize;
use wisp_monitor::control::monotonic_ns;

use crate::images::{CheckedSnapshots, ImageCache};
use crate::logs::watch::LogWatch;
use crate::metrics::Histogram;
use crate::pool::{Pool, PoolError};
use crate::process;
use crate::proto::{
    self, ControlReply, ControlRequest, DiskMode, ExitRecord, GuestStats, Handoff, SaveFigures,
    Started,
};
use crate::record::{self, Exit, FromSnapshot, Record, RestartPolicy, Spec, State};

#[path = "migration_vms.rs"]
mod migration_vms;

/// An API error: the HTTP status it maps to and a message for the user.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{0}")]
    BadRequest(String),
    #[error("no such VM: '{0}'")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl VmError {
    pub fn status(&self) -> u16 {
        match self {
            VmError::BadRequest(_) => 400,
            VmError::NotFound(_) => 404,
            VmError::Conflict(_) => 409,
            VmError::Unavailable(_) => 503,
            VmError::Internal(_) => 500,
        }
    }
}

fn internal(what: &str) -> impl FnOnce(std::io::Error) -> VmError + '_ {
    move |e| VmError::Internal(format!("{what}: {e}"))
}

/// `POST /v1/vms`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// Absolute path of the image on the daemon's host.
    pub image: String,
    pub name: Option<String>,
    /// Guest memory in bytes (default 64 MiB).
    pub memory: Option<u64>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub publish: Vec<String>,
    pub disk: Option<String>,
    #[serde(default)]
    pub disk_read_only: bool,
    pub cpus: Option<f64>,
    pub restart: Option<String>,
}

/// `POST /v1/restore`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// Absolute path of the snapshot on the daemon's host.
    pub snapshot: String,
    pub name: Option<String>,
    #[serde(default)]
    pub publish: Vec<String>,
    /// 0 (default): a plain restore; N: clone number N (own MAC, reseeds).
    #[serde(default)]
    pub clone_id: u32,
    pub cpus: Option<f64>,
    /// The disk of a guest saved with one (absolute path; the same size).
    pub disk: Option<String>,
    #[serde(default)]
    pub disk_read_only: bool,
}

/// `POST /v1/clone`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneRequest {
    /// Absolute path of the snapshot on the daemon's host.
    pub snapshot: String,
    pub count: u32,
    /// Clone N is named `NAME-N` (default: generated names).
    pub name: Option<String>,
    #[serde(default)]
    pub publish: Vec<String>,
    pub cpus: Option<f64>,
}

/// Most clones one request may start.
pub const MAX_CLONES: u32 = 10_000;

/// What `POST /v1/clone` did.
#[derive(Debug, Default, serde::Serialize)]
pub struct CloneReport {
    /// The clones started, in clone-id order.
    pub vms: Vec<Record>,
    /// Request -> snapshot opened and checked, in µs.
    pub open_us: u64,
    /// Per clone: from the end of the previous one (or the request) to
    /// this one running, in µs.
    pub per_clone_us: Vec<u64>,
    pub total_us: u64,
    /// Why it stopped early, if it did.
    pub error: Option<String>,
    /// HTTP status of that error.
    #[serde(skip)]
    pub status: u16,
}

/// `POST /v1/vms/{ref}/save`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaveRequest {
    /// Absolute path of the snapshot to write (replaced if it exists).
    pub path: String,
    #[serde(default)]
    pub leave_running: bool,
}

pub const DEFAULT_MEMORY: u64 = 64 << 20;
/// How long `stop` waits by default before it forces the guest.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a monitor has, after a forced stop, before it is killed.
const FORCE_GRACE: Duration = Duration::from_secs(5);
/// Backoff before a restart: doubles per restart up to the cap.
const RESTART_BACKOFF: Duration = Duration::from_millis(100);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How long a control request to a monitor may take.
const CONTROL_LIMIT: Duration = Duration::from_secs(10);

/// One VM.
pub struct Vm {
    record: Mutex<Record>,
    /// Signalled whenever the record's state changes.
    changed: Condvar,
    /// Serialises lifecycle operations on this VM.
    op: Mutex<()>,
    /// The monitor process, while it may be alive.
    pidfd: Mutex<Option<Arc<OwnedFd>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Vm {
    fn new(r: Record) -> Arc<Vm> {
        Arc::new(Vm {
            record: Mutex::new(r),
            changed: Condvar::new(),
            op: Mutex::new(()),
            pidfd: Mutex::new(None),
        })
    }

    pub fn snapshot(&self) -> Record {
        lock(&self.record).clone()
    }

    /// Waits until the VM is no longer live, for at most `limit`.
    fn wait_not_live(&self, limit: Duration) -> bool {
        let g = lock(&self.record);
        let (g, _) = self
            .changed
            .wait_timeout_while(g, limit, |r| r.state.is_live())
            .unwrap_or_else(|p| p.into_inner());
        !g.state.is_live()
    }
}

/// The VMs by id, with an index by name, so that a start does not look
/// at every other VM (names never change).
#[derive(Default)]
struct Table {
    by_id: HashMap<String, Arc<Vm>>,
    names: HashMap<String, String>,
}

impl Table {
    fn insert(&mut self, id: String, vm: Arc<Vm>) -> Option<Arc<Vm>> {
        let name = lock(&vm.record).name.clone();
        self.names.insert(name, id.clone());
        self.by_id.insert(id, vm)
    }

    fn remove(&mut self, id: &str) -> Option<Arc<Vm>> {
        let vm = self.by_id.remove(id)?;
        let name = lock(&vm.record).name.clone();
        if self.names.get(&name).map(String::as_str) == Some(id) {
            self.names.remove(&name);
        }
        Some(vm)
    }

    fn get(&self, id: &str) -> Option<&Arc<Vm>> {
        self.by_id.get(id)
    }

    fn by_name(&self, name: &str) -> Option<&Arc<Vm>> {
        self.by_id.get(self.names.get(name)?)
    }

    fn values(&self) -> impl Iterator<Item = &Arc<Vm>> {
        self.by_id.values()
    }

    fn iter(&self) -> impl Iterator<Item = (&String, &Arc<Vm>)> {
        self.by_id.iter()
    }
}

/// The daemon's table of VMs.
pub struct Vms {
    state_dir: PathBuf,
    pool: Arc<Pool>,
    table: Mutex<Table>,
    /// Start latencies: (warm, cold).
    latency: Mutex<(Histogram, Histogram)>,
    /// Images validated once, shared by every start of the same file.
    images: ImageCache,
    /// Snapshots whose memory was checked (restores do not read it again).
    snapshots: CheckedSnapshots,
    /// Learns of every monitor's end (one thread for all of them); `None`
    /// if it could not start, and then each VM gets its own thread.
    reaper: Option<Arc<crate::reaper::Reaper>>,
    /// The logs of the live VMs, bounded as they are written.
    logs: LogWatch,
}

impl Vms {
    pub fn new(state_dir: PathBuf, pool: Arc<Pool>) -> Arc<Vms> {
        Arc::new(Vms {
            state_dir,
            pool,
            table: Mutex::new(Table::default()),
            latency: Mutex::new(Default::default()),
            images: ImageCache::new(),
            snapshots: CheckedSnapshots::new(),
            reaper: crate::reaper::Reaper::start()
                .map_err(|e| crate::log(format_args!("reaper: {e}; one thread per VM instead")))
                .ok(),
            logs: LogWatch::new().unwrap_or_else(|e| {
                crate::log(format_args!(
                    "{e}: checking every VM's log every second instead"
                ));
                LogWatch::polling()
            }),
        })
    }

    /// Which logs to bound: those of the live VMs (see [`LogWatch::run`]).
    pub fn logs(&self) -> &LogWatch {
        &self.logs
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn images(&self) -> &ImageCache {
        &self.images
    }

    pub fn latency(&self) -> (Histogram, Histogram) {
        lock(&self.latency).clone()
    }

    fn dir(&self, id: &str) -> PathBuf {
        Record::dir(&self.state_dir, id)
    }

    /// Every VM, oldest first.
    pub fn list(&self) -> Vec<(Arc<Vm>, Record)> {
        let vms: Vec<Arc<Vm>> = lock(&self.table).values().cloned().collect();
        let mut v: Vec<_> = vms
            .into_iter()
            .map(|vm| {
                let r = vm.snapshot();
                (vm, r)
            })
            .collect();
        v.sort_by(|a, b| (a.1.created_unix_ms, &a.1.id).cmp(&(b.1.created_unix_ms, &b.1.id)));
        v
    }

    /// Finds a VM by name, id, or unique id prefix.
    pub fn find(&self, r: &str) -> Result<Arc<Vm>, VmError> {
        let t = lock(&self.table);
        if let Some(vm) = t.get(r) {
            return Ok(vm.clone());
        }
        if let Some(vm) = t.by_name(r) {
            return Ok(vm.clone());
        }
        let prefixed: Vec<_> = if r.len() >= 4 {
            t.iter().filter(|(id, _)| id.starts_with(r)).collect()
        } else {
            vec![]
        };
        match prefixed.as_slice() {
            [(_, vm)] => Ok((*vm).clone()),
            [] => Err(VmError::NotFound(r.into())),
            _ => Err(VmError::BadRequest(format!("'{r}' matches several VM ids"))),
        }
    }

    // ---- create ----------------------------------------------------------

    /// Checks a request; nothing is created.
    fn validate(&self, req: RunRequest) -> Result<(Option<String>, Spec), VmError> {
        let bad = VmError::BadRequest;
        let memory = req.memory.unwrap_or(DEFAULT_MEMORY);
        wisp_monitor::layout::check_memory(memory).map_err(|e| bad(format!("memory: {e}")))?;
        if !Path::new(&req.image).is_absolute() {
            return Err(bad(format!(
                "image '{}' is not an absolute path",
                req.image
            )));
        }
        self.image(&req.image)?;
        for p in &req.publish {
            p.parse::<wisp_monitor::net::user::PortForward>()
                .map_err(|e| bad(format!("publish: {e}")))?;
        }
        if let Some(d) = &req.disk {
            if !Path::new(d).is_absolute() {
                return Err(bad(format!("disk '{d}' is not an absolute path")));
            }
            open_disk(d, req.disk_read_only).map_err(|e| bad(format!("disk {d}: {e}")))?;
        }
        if let Some(c) = req.cpus {
            if !(c > 0.0 && c <= 1.0) {
                return Err(bad(format!("cpus {c} is not in (0, 1]")));
            }
        }
        let restart = match &req.restart {
            Some(r) => r.parse::<RestartPolicy>().map_err(bad)?,
            None => RestartPolicy::No,
        };
        if let Some(n) = &req.name {
            record::check_name(n).map_err(bad)?;
        }
        Ok((
            req.name,
            Spec {
                image: req.image,
                memory,
                args: req.args,
                publish: req.publish,
                disk: req.disk,
                disk_read_only: req.disk_read_only,
                cpus: req.cpus,
                restart,
                snapshot: None,
            },
        ))
    }

    /// Checks a restore request (the snapshot is opened and checked
    /// whole); nothing is created.
    fn validate_restore(&self, req: RestoreRequest) -> Result<(Option<String>, Spec), VmError> {
        let bad = VmError::BadRequest;
        if !Path::new(&req.snapshot).is_absolute() {
            return Err(bad(format!(
                "snapshot '{}' is not an absolute path",
                req.snapshot
            )));
        }
        let snap = self
            .snapshots
            .check(Path::new(&req.snapshot), |memory| {
                wisp_monitor::snapshot::Snapshot::open_checked(Path::new(&req.snapshot), memory)
            })
            .map_err(|e| bad(format!("cannot restore {}: {e}", req.snapshot)))?;
        for p in &req.publish {
            p.parse::<wisp_monitor::net::user::PortForward>()
                .map_err(|e| bad(format!("publish: {e}")))?;
        }
        // What the restore can give: one user-mode NIC (with -p), and the
        // disk the request names if the guest had one.
        let kinds = || snap.devices().iter().map(|d| d.entry.kind);
        let had_disk = kinds().any(|k| k == wisp_abi::manifest::DEVICE_BLOCK);
        match (&req.disk, had_disk) {
            (None, true) => {
                return Err(bad(format!(
                    "{}'s guest had a disk: restore it with its disk (--disk)",
                    req.snapshot
                )))
            }
            (Some(_), false) => return Err(bad(format!("{}'s guest had no disk", req.snapshot))),
            (Some(d), true) => {
                if !Path::new(d).is_absolute() {
                    return Err(bad(format!("disk '{d}' is not an absolute path")));
                }
                let f =
                    open_disk(d, req.disk_read_only).map_err(|e| bad(format!("disk {d}: {e}")))?;
                let len = f
                    .metadata()
                    .map_err(|e| bad(format!("disk {d}: {e}")))?
                    .len();
                let saved = snap
                    .devices()
                    .iter()
                    .find(|x| x.entry.kind == wisp_abi::manifest::DEVICE_BLOCK)
                    .map_or(0, |x| x.entry.capacity);
                if len / 512 * 512 != saved {
                    return Err(bad(format!(
                        "the snapshot's disk has {saved} bytes, {d} has {len}"
                    )));
                }
            }
            (None, false) => {}
        }
        let nics = kinds()
            .filter(|&k| k == wisp_abi::manifest::DEVICE_NET)
            .count();
        if nics != usize::from(!req.publish.is_empty()) {
            return Err(bad(format!(
                "{}'s guest has {nics} NIC(s): restore it with {} (-p)",
                req.snapshot,
                if nics == 0 {
                    "no published ports"
                } else {
                    "its ports published"
                }
            )));
        }
        if let Some(c) = req.cpus {
            if !(c > 0.0 && c <= 1.0) {
                return Err(bad(format!("cpus {c} is not in (0, 1]")));
            }
        }
        if let Some(n) = &req.name {
            record::check_name(n).map_err(bad)?;
        }
        Ok((
            req.name,
            Spec {
                image: req.snapshot,
                memory: snap.memory(),
                args: vec![],
                publish: req.publish,
                disk: req.disk,
                disk_read_only: req.disk_read_only,
                cpus: req.cpus,
                restart: RestartPolicy::No,
                snapshot: Some(FromSnapshot {
                    clone_id: req.clone_id,
                }),
            },
        ))
    }

    /// Creates and starts a VM; `request_ns` is when the request arrived.
    pub fn run(self: &Arc<Self>, req: RunRequest, request_ns: u64) -> Result<Record, VmError> {
        let (name, spec) = self.validate(req)?;
        self.create(name, spec, request_ns)
    }

    /// Creates and starts a VM from a snapshot.
    pub fn restore(
        self: &Arc<Self>,
        req: RestoreRequest,
        request_ns: u64,
    ) -> Result<Record, VmError> {
        let (name, spec) = self.validate_restore(req)?;
        self.create(name, spec, request_ns)
    }

    /// Starts `req.count` clones of a snapshot (clone ids 1..=count) in
    /// one request: the snapshot is opened and checked once, then each
    /// clone maps it copy-on-write in a shell (pooled when one is free).
    /// Stops at the first failure; the clones started before it stay.
    pub fn clone_many(self: &Arc<Self>, req: CloneRequest, request_ns: u64) -> CloneReport {
        let mut report = CloneReport::default();
        if req.count == 0 || req.count > MAX_CLONES {
            report.error = Some(format!("count {} is not 1-{MAX_CLONES}", req.count));
            return report;
        }
        let first = RestoreRequest {
            snapshot: req.snapshot.clone(),
            name: req.name.as_ref().map(|n| format!("{n}-1")),
            publish: req.publish.clone(),
            clone_id: 1,
            cpus: req.cpus,
            // Clones cannot share one writable disk: a snapshot of a guest
            // with a disk is refused here.
            disk: None,
            disk_read_only: false,
        };
        let (name, spec) = match self.validate_restore(first) {
            Ok(v) => v,
            Err(e) => {
                report.error = Some(e.to_string());
                report.status = e.status();
                return report;
            }
        };
        report.open_us = monotonic_ns().saturating_sub(request_ns) / 1000;
        let mut t = request_ns;
        for id in 1..=req.count {
            let mut spec = spec.clone();
            spec.snapshot = Some(FromSnapshot { clone_id: id });
            let name = match (id, &req.name) {
                (1, _) => name.clone(),
                (_, Some(n)) => Some(format!("{n}-{id}")),
                (_, None) => None,
            };
            if let Some(n) = &name {
                if let Err(e) = record::check_name(n) {
                    report.error = Some(e);
                    report.status = 400;
                    break;
                }
            }
            match self.create(name, spec, t) {
                Ok(r) => {
                    let now = monotonic_ns();
                    report.per_clone_us.push(now.saturating_sub(t) / 1000);
                    report.vms.push(r);
                    t = now;
                }
                Err(e) => {
                    report.error = Some(format!("clone {id} of {}: {e}", req.count));
                    report.status = e.status();
                    break;
                }
            }
        }
        report.total_us = monotonic_ns().saturating_sub(request_ns) / 1000;
        report
    }

    /// The validated image at `path` (from the cache while the file is
    /// unchanged).
    fn image(&self, path: &str) -> Result<Arc<crate::images::CachedImage>, VmError> {
        self.images
            .get(Path::new(path))
            .map_err(|e| VmError::BadRequest(format!("{path} is not a bootable Wisp image: {e}")))
    }

    fn create(
        self: &Arc<Self>,
        name: Option<String>,
        spec: Spec,
        request_ns: u64,
    ) -> Result<Record, VmError> {
        let id = record::new_id();
        let name = name.unwrap_or_else(|| format!("vm-{}", &id[..8]));
        let rec = Record {
            id: id.clone(),
            name: name.clone(),
            spec,
            state: State::Creating,
            pid: None,
            pid_start: None,
            created_unix_ms: record::unix_ms(),
            started_unix_ms: None,
            start_us: None,
            main_exit_us: None,
            launch_us: None,
            from_pool: false,
            ports: vec![],
            restarts: 0,
            stop_requested: false,
            exit: None,
        };
        let vm = Vm::new(rec.clone());
        {
            let mut t = lock(&self.table);
            if t.by_name(&name).is_some() {
                return Err(VmError::Conflict(format!(
                    "the name '{name}' is already in use (wisp rm it first)"
                )));
            }
            t.insert(id.clone(), vm.clone());
        }
        let _op = lock(&vm.op);
        // `launch` makes the directory (or renames a spare one into place)
        // and writes the first record while the shell loads the guest.
        let result = self.launch(&vm, request_ns);
        match result {
            Ok(()) => Ok(vm.snapshot()),
            Err(e) => {
                // Nothing of a failed create is left behind.
                lock(&self.table).remove(&id);
                let _ = std::fs::remove_dir_all(self.dir(&id));
                Err(e)
            }
        }
    }

    /// Hands the VM's spec to a shell and starts supervising it.
    fn launch(self: &Arc<Self>, vm: &Arc<Vm>, request_ns: u64) -> Result<(), VmError> {
        let (id, spec) = {
            let r = lock(&vm.record);
            (r.id.clone(), r.spec.clone())
        };
        // A VM a migration brings in (created on this thread): its
        // connection goes in the image's place.
        let incoming = migration_vms::take_incoming();
        let dir = self.dir(&id);
        // For a restore, the snapshot goes in the image's place and for a
        // migration the connection from the source; an image comes
        // validated from the cache (a restart checks it again).
        let migration = incoming.as_ref().map(|(_, size)| *size);
        let (image, cached) = match (incoming, &spec.snapshot) {
            (Some((conn, _)), _) => (Some(std::fs::File::from(conn)), None),
            (None, Some(_)) => {
                let f = std::fs::File::open(&spec.image)
                    .map_err(|e| VmError::BadRequest(format!("image {}: {e}", spec.image)))?;
                (Some(f), None)
            }
            (None, None) => (None, Some(self.image(&spec.image)?)),
        };
        let image_fd = match (&image, &cached) {
            (Some(f), _) => f.as_raw_fd(),
            (None, Some(c)) => c.fd.as_raw_fd(),
            (None, None) => unreachable!("one of the two is set above"),
        };
        let disk = spec
            .disk
            .as_ref()
            .map(|d| {
                open_disk(d, spec.disk_read_only)
                    .map_err(|e| VmError::BadRequest(format!("disk {d}: {e}")))
            })
            .transpose()?;
        let (mut shell, warm) = self.pool.take(spec.memory).map_err(|e| match e {
            PoolError::Spawn(..) | PoolError::NotReady(_) => VmError::Unavailable(e.to_string()),
        })?;
        // Refilled once this start is over (or failed), not during it.
        struct Refill<'a>(&'a Pool);
        impl Drop for Refill<'_> {
            fn drop(&mut self) {
                self.0.refill_soon();
            }
        }
        let _refill = Refill(&self.pool);
        // A spare directory renamed into place names its shell
        // (`shell.pid`): a daemon that crashes before the VM's record is
        // written ends that shell when it restarts (the start was never
        // acknowledged). A directory that already existed (a restart) or
        // was made here does not.
        let (log, exit, control, named) = match self.vm_files(&dir, &mut shell) {
            Ok(f) => f,
            Err(e) => {
                let _ = shell.child.kill();
                let _ = shell.child.wait();
                return Err(e);
            }
        };
        let mut fds = vec![
            image_fd,
            log.as_raw_fd(),
            exit.as_raw_fd(),
            control.as_raw_fd(),
        ];
        if let Some(d) = &disk {
            fds.push(d.as_raw_fd());
        }
        let handoff = Handoff {
            args: spec.args.clone(),
            publish: spec.publish.clone(),
            disk: spec.disk.as_ref().map(|_| {
                if spec.disk_read_only {
                    DiskMode::ReadOnly
                } else {
                    DiskMode::ReadWrite
                }
            }),
            cpus: spec.cpus,
            request_ns,
            snapshot: spec.snapshot.as_ref().map(|s| s.clone_id),
            migration,
            snapshot_checked: migration.is_none()
                && spec.snapshot.is_some()
                && image
                    .as_ref()
                    .is_some_and(|f| self.snapshots.is_checked_file(Path::new(&spec.image), f)),
        };
        let fail = |shell: &mut crate::pool::ReadyShell, e: VmError| {
            let _ = shell.child.kill();
            let _ = shell.child.wait();
            e
        };
        if let Err(e) = proto::send(&shell.channel, &handoff, &fds) {
            return Err(fail(
                &mut shell,
                VmError::Internal(format!("hand-off: {e}")),
            ));
        }
        drop((image, log, exit, control, disk));
        // A directory made here does not name its shell: a first record
        // does, written while the shell loads the guest, so that a daemon
        // that crashes now re-adopts it. (With a spare directory nothing
        // is written until the guest runs: on a host of two CPUs that
        // write competed with the start it waited for.)
        if !named {
            let first = {
                let mut r = lock(&vm.record);
                r.pid = Some(shell.child.id());
                r.pid_start = shell.start_time;
                r.save(&self.state_dir)
            };
            if let Err(e) = first {
                return Err(fail(&mut shell, VmError::Internal(format!("saving: {e}"))));
            }
        }
        let started = match proto::recv::<Started>(&shell.channel) {
            Ok((s, _)) => s,
            Err(e) => {
                let e = VmError::Internal(format!("the monitor process failed: {e}"));
                return Err(fail(&mut shell, e));
            }
        };
        let (published, started_ns, main_ns, main_exit_ns) = match started {
            Started::Ok {
                published,
                started_ns,
                main_ns,
                main_exit_ns,
            } => (published, started_ns, main_ns, main_exit_ns),
            Started::Failed { error } => {
                return Err(fail(&mut shell, VmError::BadRequest(error)));
            }
        };
        let pid = shell.child.id();
        let pidfd = Arc::new(process::pidfd(pid).map_err(internal("pidfd"))?);
        let us = |t: u64| t.saturating_sub(request_ns) / 1000;
        let start_us = main_ns.map(us);
        if let Some(s) = start_us {
            let mut l = lock(&self.latency);
            let h = if warm { &mut l.0 } else { &mut l.1 };
            h.observe(s as f64 / 1e6);
        }
        {
            let mut r = lock(&vm.record);
            r.state = State::Running;
            r.pid = Some(pid);
            r.pid_start = shell.start_time;
            r.started_unix_ms = Some(record::unix_ms());
            r.start_us = start_us;
            r.main_exit_us = main_exit_ns.map(us);
            r.launch_us = Some(us(started_ns));
            r.from_pool = warm;
            r.ports = published;
            r.exit = None;
            r.save(&self.state_dir).map_err(internal("saving"))?;
        }
        *lock(&vm.pidfd) = Some(pidfd.clone());
        vm.changed.notify_all();
        self.on_end(vm, pidfd, Some(shell.child));
        Ok(())
    }

    /// Calls [`Vms::ended`] when the monitor behind `pidfd` ends (`child`:
    /// when the daemon is its parent, to reap it and learn its status).
    /// Every VM that becomes live passes here (a start of any kind, a
    /// restart, a re-adoption), after its start was measured: its log is
    /// bounded from now until [`Vms::ended`].
    fn on_end(
        self: &Arc<Self>,
        vm: &Arc<Vm>,
        pidfd: Arc<OwnedFd>,
        child: Option<std::process::Child>,
    ) {
        let id = lock(&vm.record).id.clone();
        self.logs.watch(&self.dir(&id));
        let vms = self.clone();
        let vm2 = vm.clone();
        let ended = move |status| vms.ended(&vm2, status);
        let child = match &self.reaper {
            Some(r) => match r.watch(pidfd.clone(), child, ended) {
                Ok(()) => return,
                Err(e) => {
                    crate::log(format_args!("reaper: {e}"));
                    // The watch was not taken: a thread of its own.
                    None
                }
            },
            None => child,
        };
        // Without the reaper (rare): a thread per VM.
        let vms = self.clone();
        let vm2 = vm.clone();
        spawn_small(move || {
            let status = match child {
                Some(mut c) => c.wait().ok(),
                None => {
                    process::wait_exit(&pidfd, -1);
                    None
                }
            };
            vms.ended(&vm2, status);
        });
    }

    /// The log, exit record and control listener of the VM in `dir`: the
    /// shell's spare ones, renamed into place, when `dir` is new and the
    /// shell has them; otherwise made now. The directory exists after.
    fn vm_files(
        &self,
        dir: &Path,
        shell: &mut crate::pool::ReadyShell,
    ) -> Result<(std::fs::File, std::fs::File, UnixListener, bool), VmError> {
        let spare = shell.spare.take();
        if let Some(sp) = spare {
            // `shell.pid` stays: see `adopt`.
            if rename_noreplace(&sp.dir, dir).is_ok() {
                return Ok((sp.log, sp.exit, sp.control, true));
            }
            sp.discard();
        }
        std::fs::create_dir_all(dir).map_err(internal("creating the VM's directory"))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(crate::logs::CURRENT))
            .map_err(internal("opening the log"))?;
        let exit = std::fs::File::create(dir.join("exit.json"))
            .map_err(internal("creating the exit record"))?;
        let sock = dir.join("control.sock");
        let _ = std::fs::remove_file(&sock);
        let control = UnixListener::bind(&sock).map_err(internal("binding the control socket"))?;
        Ok((log, exit, control, false))
    }

    /// Records a monitor's end (and restarts it if its policy says so).
    fn ended(self: &Arc<Self>, vm: &Arc<Vm>, wait: Option<std::process::ExitStatus>) {
        let id = lock(&vm.record).id.clone();
        self.logs.unwatch(&self.dir(&id));
        let exit_rec: Option<ExitRecord> = std::fs::read(self.dir(&id).join("exit.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        *lock(&vm.pidfd) = None;
        let restart = {
            let mut r = lock(&vm.record);
            let exit = Exit::from_parts(exit_rec, wait, r.stop_requested);
            let restart =
                r.spec.restart == RestartPolicy::OnFailure && !r.stop_requested && exit.failed();
            r.exit = Some(exit);
            r.pid = None;
            r.pid_start = None;
            r.state = if restart {
                State::Restarting
            } else {
                State::Exited
            };
            let _ = r.save(&self.state_dir);
            restart.then_some(r.restarts)
        };
        vm.changed.notify_all();
        if let Some(n) = restart {
            let delay = RESTART_BACKOFF
                .saturating_mul(1 << n.min(16))
                .min(RESTART_BACKOFF_MAX);
            let vms = self.clone();
            let vm = vm.clone();
            spawn_small(move || {
                std::thread::sleep(delay);
                vms.restart(&vm)
            });
        }
    }

    fn restart(self: &Arc<Self>, vm: &Arc<Vm>) {
        let _op = lock(&vm.op);
        {
            let mut r = lock(&vm.record);
            // Stopped, killed or removed meanwhile.
            if r.state != State::Restarting || r.stop_requested {
                return;
            }
            r.restarts += 1;
        }
        if let Err(e) = self.launch(vm, monotonic_ns()) {
            let mut r = lock(&vm.record);
            r.state = State::Exited;
            r.pid = None;
            r.pid_start = None;
            if let Some(x) = r.exit.as_mut() {
                x.detail = Some(format!("restart failed: {e}"));
            }
            let _ = r.save(&self.state_dir);
            drop(r);
            vm.changed.notify_all();
        }
    }

    // ---- operations on a running VM -------------------------------------

    /// Sends a control request to the VM's monitor.
    fn control(&self, vm: &Vm, req: ControlRequest) -> Result<GuestStats, VmError> {
        let id = lock(&vm.record).id.clone();
        control(&self.dir(&id).join("control.sock"), req)
    }

    fn require_state(vm: &Vm, ok: &[State], what: &str) -> Result<Record, VmError> {
        let r = vm.snapshot();
        if ok.contains(&r.state) {
            Ok(r)
        } else {
            Err(VmError::Conflict(format!(
                "cannot {what} '{}': it is {}",
                r.name,
                r.state.as_str()
            )))
        }
    }

    fn set_state(&self, vm: &Vm, s: State) -> Result<Record, VmError> {
        let mut r = lock(&vm.record);
        if r.state.is_live() {
            r.state = s;
        }
        r.save(&self.state_dir).map_err(internal("saving"))?;
        let snap = r.clone();
        drop(r);
        vm.changed.notify_all();
        Ok(snap)
    }

    pub fn pause(&self, vm: &Arc<Vm>) -> Result<Record, VmError> {
        let _op = lock(&vm.op);
        Vms::require_state(vm, &[State::Running, State::Paused], "pause")?;
        self.control(vm, ControlRequest::Pause)?;
        self.set_state(vm, State::Paused)
    }

    pub fn resume(&self, vm: &Arc<Vm>) -> Result<Record, VmError> {
        let _op = lock(&vm.op);
        Vms::require_state(vm, &[State::Running, State::Paused], "resume")?;
        self.control(vm, ControlRequest::Resume)?;
        self.set_state(vm, State::Running)
    }

    /// Saves the guest to `req.path`: the daemon creates `PATH.tmp`, hands
    /// it to the monitor with the request, and renames it into place once
    /// the monitor has written it (its filter does not let it open files).
    /// Without `leave_running` the guest then stops (`exited`, how
    /// `saved`). On any error no file is left and the guest runs on.
    pub fn save(&self, vm: &Arc<Vm>, req: &SaveRequest) -> Result<SaveFigures, VmError> {
        let _op = lock(&vm.op);
        Vms::require_state(vm, &[State::Running, State::Paused], "save")?;
        let path = Path::new(&req.path);
        if !path.is_absolute() {
            return Err(VmError::BadRequest(format!(
                "snapshot '{}' is not an absolute path",
                req.path
            )));
        }
        let tmp = PathBuf::from(format!("{}.tmp", req.path));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| VmError::BadRequest(format!("{}: {e}", tmp.display())))?;
        if !req.leave_running {
            self.mark_stop_requested(vm)?;
        }
        let id = lock(&vm.record).id.clone();
        let sock = self.dir(&id).join("control.sock");
        let req_msg = ControlRequest::Save {
            leave_running: req.leave_running,
        };
        let result = request(&sock, req_msg, Some(file.as_raw_fd())).and_then(|r| match r {
            ControlReply::Saved(f) => Ok(f),
            ControlReply::Failed { error } => Err(VmError::Conflict(error)),
            ControlReply::Ok(_) | ControlReply::Migrated(_) => {
                Err(VmError::Internal("the monitor did not save".into()))
            }
        });
        drop(file);
        let result = result.and_then(|f| {
            std::fs::rename(&tmp, path)
                .map_err(|e| VmError::BadRequest(format!("{}: {e}", path.display())))?;
            Ok(f)
        });
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
            if !req.leave_running {
                // The monitor resumed the guest: it is not being stopped.
                let mut r = lock(&vm.record);
                r.stop_requested = false;
                let _ = r.save(&self.state_dir);
            }
        }
        result
    }

    fn mark_stop_requested(&self, vm: &Vm) -> Result<(), VmError> {
        let mut r = lock(&vm.record);
        r.stop_requested = true;
        if r.state == State::Restarting {
            r.state = State::Exited;
        }
        r.save(&self.state_dir).map_err(internal("saving"))
    }

    /// Stops the guest as `docker stop` does: asks it to stop by itself
    /// (it may flush and exit with its own status: `stopped`), and after
    /// `timeout` stops it by force through its monitor (`killed`); a monitor
    /// that does not end then is killed with SIGKILL. A paused guest is
    /// resumed so that it can act on the request. A zero `timeout`, or a
    /// guest that cannot be asked, is stopped by force at once.
    pub fn stop(&self, vm: &Arc<Vm>, timeout: Duration) -> Result<Record, VmError> {
        let _op = lock(&vm.op);
        let r = Vms::require_state(
            vm,
            &[State::Running, State::Paused, State::Restarting],
            "stop",
        )?;
        self.mark_stop_requested(vm)?;
        if r.state == State::Restarting {
            vm.changed.notify_all();
            return Ok(vm.snapshot());
        }
        let asked = if timeout.is_zero() {
            Err(VmError::Conflict("no time to stop".into()))
        } else {
            self.control(vm, ControlRequest::Shutdown)
        };
        match asked {
            Ok(_) => {
                if r.state == State::Paused {
                    let _ = self.control(vm, ControlRequest::Resume);
                }
                if !vm.wait_not_live(timeout) {
                    // Forced through the monitor (its record then says
                    // `killed`); one that does not end is killed.
                    let _ = self.control(vm, ControlRequest::Stop);
                    if !vm.wait_not_live(FORCE_GRACE) {
                        self.kill_process(vm);
                    }
                }
            }
            // The monitor does not answer: killed after the timeout.
            Err(VmError::Unavailable(_)) => {
                if !vm.wait_not_live(timeout) {
                    self.kill_process(vm);
                }
            }
            // It cannot be asked (an image or a monitor from before the
            // request) or there is no time (`-t 0`): stopped at once by its
            // monitor, which answers; killed if that does not end it.
            Err(_) => {
                let _ = self.control(vm, ControlRequest::Stop);
                if !vm.wait_not_live(timeout.max(FORCE_GRACE)) {
                    self.kill_process(vm);
                }
            }
        }
        Ok(vm.snapshot())
    }

    /// Kills the monitor process (SIGKILL) and waits for its end.
    pub fn kill(&self, vm: &Arc<Vm>) -> Result<Record, VmError> {
        let _op = lock(&vm.op);
        let r = Vms::require_state(
            vm,
            &[State::Running, State::Paused, State::Restarting],
            "kill",
        )?;
        self.mark_stop_requested(vm)?;
        if r.state != State::Restarting {
            self.kill_process(vm);
        }
        vm.changed.notify_all();
        Ok(vm.snapshot())
    }

    fn kill_process(&self, vm: &Vm) {
        let fd = lock(&vm.pidfd).clone();
        if let Some(fd) = fd {
            let _ = process::signal(&fd, libc::SIGKILL);
        }
        vm.wait_not_live(Duration::from_secs(30));
    }

    /// Removes a VM that has ended (or, with `force`, kills it first).
    pub fn remove(&self, vm: &Arc<Vm>, force: bool) -> Result<(), VmError> {
        let _op = lock(&vm.op);
        let r = vm.snapshot();
        if r.state == State::Creating {
            return Err(VmError::Conflict(format!("'{}' is being created", r.name)));
        }
        if r.state.is_live() || r.state == State::Restarting {
            if !force {
                return Err(VmError::Conflict(format!(
                    "'{}' is {}: stop it first, or use force",
                    r.name,
                    r.state.as_str()
                )));
            }
            self.mark_stop_requested(vm)?;
            self.kill_process(vm);
            if vm.snapshot().state.is_live() {
                return Err(VmError::Internal(format!(
                    "'{}' did not end after SIGKILL",
                    r.name
                )));
            }
        }
        lock(&self.table).remove(&r.id);
        std::fs::remove_dir_all(self.dir(&r.id)).map_err(internal("removing its directory"))
    }

    /// Engine counters of a live VM (`None` if it is not live or does not
    /// answer).
    pub fn guest_stats(&self, vm: &Vm) -> Option<GuestStats> {
        if !vm.snapshot().state.is_live() {
            return None;
        }
        self.control(vm, ControlRequest::Stats).ok()
    }

    pub fn is_live(&self, vm: &Vm) -> bool {
        vm.snapshot().state.is_live()
    }

    pub fn log_dir(&self, vm: &Vm) -> PathBuf {
        self.dir(&vm.snapshot().id)
    }

    // ---- daemon start ------------------------------------------------------

    /// Finds the VMs of a previous daemon: adopts those whose monitor is
    /// still running, records the end of the others.
    pub fn adopt(self: &Arc<Self>) -> std::io::Result<(usize, usize)> {
        let root = self.state_dir.join("vms");
        std::fs::create_dir_all(&root)?;
        let (mut adopted, mut ended) = (0, 0);
        for entry in std::fs::read_dir(&root)? {
            let dir = entry?.path();
            let mut r = match Record::load(&dir) {
                Ok(r) => r,
                Err(e) => {
                    if let Some((pid, start)) = crate::pool::read_shell_pid(&dir) {
                        // A start the daemon crashed in, before its first
                        // record: never acknowledged, so undone.
                        if process::same_process(pid, Some(start)) {
                            if let Ok(fd) = process::pidfd(pid) {
                                let _ = process::signal(&fd, libc::SIGKILL);
                                process::wait_exit(&fd, 5000);
                            }
                        }
                        crate::log(format_args!("removing {}: {e}", dir.display()));
                        let _ = std::fs::remove_dir_all(&dir);
                        continue;
                    }
                    crate::log(format_args!("skipping {}: {e}", dir.display()));
                    continue;
                }
            };
            let alive = r
                .pid
                .filter(|&p| r.state.is_live() && process::same_process(p, r.pid_start));
            let fd = alive.and_then(|p| process::pidfd(p).ok());
            let vm = Vm::new(r.clone());
            match fd {
                Some(fd) => {
                    adopted += 1;
                    if r.state == State::Creating {
                        // Started but never confirmed: ask it.
                        r.state = match self.control_at(&dir, ControlRequest::Stats) {
                            Ok(s) if s.state == "paused" => State::Paused,
                            _ => State::Running,
                        };
                        *lock(&vm.record) = r.clone();
                        let _ = r.save(&self.state_dir);
                    }
                    let fd = Arc::new(fd);
                    *lock(&vm.pidfd) = Some(fd.clone());
                    self.on_end(&vm, fd, None);
                }
                None if r.state.is_live() || r.state == State::Restarting => {
                    ended += 1;
                    lock(&self.table).insert(r.id.clone(), vm.clone());
                    // Records how it ended; a restart policy applies.
                    self.ended(&vm, None);
                    continue;
                }
                None => {}
            }
            lock(&self.table).insert(r.id.clone(), vm);
        }
        Ok((adopted, ended))
    }

    fn control_at(&self, dir: &Path, req: ControlRequest) -> Result<GuestStats, VmError> {
        control(&dir.join("control.sock"), req)
    }
}

/// Renames `from` to `to`, failing if `to` exists (one call where a check
/// and a rename would be two, and racy).
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn open_disk(path: &str, read_only: bool) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
}

/// One request to a monitor's control socket.
fn control(sock: &Path, req: ControlRequest) -> Result<GuestStats, VmError> {
    match request(sock, req, None)? {
        ControlReply::Ok(st) => Ok(st),
        ControlReply::Failed { error } => Err(VmError::Conflict(error)),
        ControlReply::Saved(_) | ControlReply::Migrated(_) => {
            Err(VmError::Internal("unexpected reply".into()))
        }
    }
}

/// One request (with `file`, sent with its bytes) and its reply.
fn request(
    sock: &Path,
    req: ControlRequest,
    file: Option<std::os::fd::RawFd>,
) -> Result<ControlReply, VmError> {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let unavailable =
        |e: std::io::Error| VmError::Unavailable(format!("the VM's monitor does not answer: {e}"));
    let mut s = UnixStream::connect(sock).map_err(unavailable)?;
    s.set_read_timeout(Some(CONTROL_LIMIT))
        .map_err(unavailable)?;
    let mut line = serde_json::to_vec(&req).map_err(|e| VmError::Internal(e.to_string()))?;
    line.push(b'\n');
    match file {
        Some(fd) => {
            let n = s
                .send_with_fds(&[&line[..]], &[fd])
                .map_err(|e| unavailable(std::io::Error::from_raw_os_error(e.errno())))?;
            s.write_all(&line[n..]).map_err(unavailable)?;
        }
        None => s.write_all(&line).map_err(unavailable)?,
    }
    let mut reply = String::new();
    BufReader::new(&s)
        .read_line(&mut reply)
        .map_err(unavailable)?;
    serde_json::from_str::<ControlReply>(&reply)
        .map_err(|_| VmError::Unavailable("the VM's monitor ended or sent no reply".into()))
}

/// A thread with a small stack (one per VM: thousands of them).
fn spawn_small(f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new().stack_size(128 << 10).spawn(f) {
        crate::log(format_args!("cannot start a supervisor thread: {e}"));
    }
}

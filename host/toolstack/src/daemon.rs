//! `wisp daemon`: binds the API socket, re-adopts the guests of a previous
//! daemon, keeps the shell pool full and serves requests on the API
//! threads ([`crate::acceptors`]). SIGTERM or SIGINT ends the daemon and its idle shells; running
//! guests keep running, for the next daemon to adopt.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use crate::pool::Pool;
use crate::vms::Vms;

pub struct Config {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    /// (memory, shells kept ready)
    pub pool: Vec<(u64, usize)>,
    /// Bound of each VM's log, in bytes (twice this at most on disk).
    pub log_limit: u64,
    /// The `wisp` executable, run as `wisp shell` for each monitor.
    pub exe: PathBuf,
    /// Where to accept live migrations from other daemons (TCP).
    pub migration_listen: Option<std::net::SocketAddr>,
    /// What arriving guests may have (disk, memory, host ports).
    pub migration_policy: crate::migration::Policy,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("a Wisp daemon is already listening on {0}")]
    Running(PathBuf),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("the state directory {0} is too long for Unix socket paths (at most {1} bytes)")]
    StateDirTooLong(PathBuf, usize),
}

/// Longest state directory: `vms/<16 hex>/control.sock` must fit in
/// `sun_path` (108 bytes with its NUL).
const MAX_STATE_DIR: usize = 107 - 34;

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> DaemonError {
    let what = what.to_string();
    move |e| DaemonError::Io(what, e)
}

/// Blocks SIGTERM and SIGINT in this thread and those it creates; a
/// dedicated thread waits for them.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local set; the mask change affects
    // this thread and threads created after it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Binds the API socket, refusing if a daemon answers on it and removing a
/// stale one left by a daemon that died.
fn bind(socket: &Path) -> Result<UnixListener, DaemonError> {
    if socket.exists() {
        if UnixStream::connect(socket).is_ok() {
            return Err(DaemonError::Running(socket.to_path_buf()));
        }
        std::fs::remove_file(socket).map_err(io(format!("removing {}", socket.display())))?;
    }
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
    }
    let l = UnixListener::bind(socket).map_err(io(format!("binding {}", socket.display())))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(io("socket permissions"))?;
    Ok(l)
}

/// Raises the soft limit on open descriptors to the hard one (as Go
/// programs and most servers do): the daemon holds one per running guest
/// (the pidfd its reaper waits on), and the usual soft limit of 1,024
/// would cap a daemon started from a shell at about a thousand guests.
/// (The systemd unit sets both limits high.)
fn raise_descriptor_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills a struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 || r.rlim_cur >= r.rlim_max {
        return;
    }
    r.rlim_cur = r.rlim_max;
    // SAFETY: setrlimit reads a valid struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        crate::log(format_args!(
            "cannot raise the open-file limit: {}",
            std::io::Error::last_os_error()
        ));
    }
}

pub fn run(cfg: Config) -> Result<(), DaemonError> {
    let sigs = block_stop_signals();
    raise_descriptor_limit();
    if cfg.state_dir.as_os_str().len() > MAX_STATE_DIR {
        return Err(DaemonError::StateDirTooLong(cfg.state_dir, MAX_STATE_DIR));
    }
    std::fs::create_dir_all(cfg.state_dir.join("vms"))
        .map_err(io(format!("creating {}", cfg.state_dir.display())))?;
    std::fs::set_permissions(&cfg.state_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io("state directory permissions"))?;
    let listener = bind(&cfg.socket)?;
    let pool = Pool::with_spares(
        cfg.exe.clone(),
        cfg.pool.clone(),
        Some(cfg.state_dir.join("pool")),
    );
    let vms = Vms::new(cfg.state_dir.clone(), pool.clone());
    let (adopted, ended) = vms.adopt().map_err(io("reading the state directory"))?;
    crate::log(format_args!(
        "listening on {} (state in {}); re-adopted {adopted} running VM(s), {ended} ended while no daemon ran",
        cfg.socket.display(),
        cfg.state_dir.display()
    ));
    if let Some(addr) = cfg.migration_listen {
        let policy = cfg.migration_policy.clone();
        let bound = crate::migration::listen(vms.clone(), addr, policy)
            .map_err(io(format!("binding the migration listener {addr}")))?;
        crate::log(format_args!("accepting migrations on {bound}"));
    }
    {
        let pool = pool.clone();
        std::thread::spawn(move || pool.refill());
    }
    {
        // The logs written are bounded (an idle guest costs nothing here).
        let vms = vms.clone();
        let limit = cfg.log_limit;
        std::thread::spawn(move || vms.logs().run(limit));
    }
    {
        let socket = cfg.socket.clone();
        let pool = pool.clone();
        std::thread::spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: waits for one of the signals blocked above.
            unsafe { libc::sigwait(&sigs, &mut sig) };
            crate::log(format_args!(
                "signal {sig}: stopping (running guests keep running)"
            ));
            let _ = std::fs::remove_file(&socket);
            pool.stop();
            std::process::exit(0);
        });
    }
    let api_vms = vms.clone();
    crate::acceptors::serve(
        listener,
        Box::new(move |conn, arrived| crate::api::serve(&api_vms, conn, arrived)),
    )
    .map_err(io("starting the API threads"))?;
    // The API threads serve from here on; this one waits for the end
    // (the signal thread exits the process).
    loop {
        std::thread::park();
    }
}

/// The documented default socket and state directory: `/run/wisp` for
/// root, `$XDG_RUNTIME_DIR/wisp` otherwise (or `/tmp/wisp-UID`).
pub fn default_dir() -> PathBuf {
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/wisp");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("wisp"),
        _ => PathBuf::from(format!("/tmp/wisp-{uid}")),
    }
}

pub fn default_socket() -> PathBuf {
    default_dir().join("wisp.sock")
}

//! What the daemon keeps about each VM, on disk so that a restarted daemon
//! finds its guests again.
//!
//! ```text
//! STATE_DIR/vms/ID/vm.json       this record (written whole, then renamed)
//!                  control.sock  the monitor's control socket
//!                  console.log   the guest's console and the monitor's messages
//!                  console.log.1 the previous part, once the log reached its bound
//!                  exit.json     written by the monitor when the guest ends
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::proto::{ExitRecord, Published};

/// Where a VM is in its life.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Being handed to a shell.
    Creating,
    Running,
    Paused,
    /// Ended; waiting for `--restart on-failure` to start it again.
    Restarting,
    /// Ended (exited, crashed, stopped or killed).
    Exited,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Creating => "creating",
            State::Running => "running",
            State::Paused => "paused",
            State::Restarting => "restarting",
            State::Exited => "exited",
        }
    }

    /// Whether a monitor process is (or may be) alive for it.
    pub fn is_live(self) -> bool {
        matches!(self, State::Creating | State::Running | State::Paused)
    }
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    #[default]
    No,
    OnFailure,
}

impl std::str::FromStr for RestartPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "no" => Ok(RestartPolicy::No),
            "on-failure" => Ok(RestartPolicy::OnFailure),
            _ => Err(format!("restart policy '{s}' is not 'no' or 'on-failure'")),
        }
    }
}

/// What a VM runs (the request, validated): a restart uses it again.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Spec {
    /// Absolute path of the image.
    pub image: String,
    pub memory: u64,
    pub args: Vec<String>,
    pub publish: Vec<String>,
    /// Absolute path of the disk, if any.
    pub disk: Option<String>,
    pub disk_read_only: bool,
    pub cpus: Option<f64>,
    pub restart: RestartPolicy,
    /// Restored from a snapshot (`image` is then the snapshot's path).
    #[serde(default)]
    pub snapshot: Option<FromSnapshot>,
}

/// A VM restored from a snapshot.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FromSnapshot {
    /// 0 for a plain restore, else the clone's number.
    pub clone_id: u32,
}

/// How a VM's monitor process ended.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Exit {
    /// The exit status (the guest's, or 101/124/125/139 as `wisp run`'s).
    pub status: Option<i32>,
    /// The signal that ended the monitor process, if one did.
    pub signal: Option<i32>,
    /// `exited`, `crashed`, `stopped`, `saved` (stopped by a save),
    /// `migrated` (stopped once the destination ran it),
    /// `killed`, `error` or `lost`.
    pub how: String,
    pub detail: Option<String>,
    pub at_unix_ms: u64,
}

impl Exit {
    /// From the monitor's own exit record, if it wrote one, and what
    /// waiting for the process said (when the daemon is its parent).
    pub fn from_parts(
        record: Option<ExitRecord>,
        wait: Option<std::process::ExitStatus>,
        killed_by_request: bool,
    ) -> Exit {
        use std::os::unix::process::ExitStatusExt;
        let signal = wait.and_then(|w| w.signal());
        let at_unix_ms = unix_ms();
        match record {
            Some(r) => Exit {
                status: Some(r.status as i32),
                signal,
                how: r.how,
                detail: r.detail,
                at_unix_ms,
            },
            None if killed_by_request => Exit {
                status: signal.map(|s| 128 + s),
                signal,
                how: "killed".into(),
                detail: None,
                at_unix_ms,
            },
            None => Exit {
                status: wait.and_then(|w| w.code()).or(signal.map(|s| 128 + s)),
                signal,
                how: if signal.is_some() { "killed" } else { "lost" }.into(),
                detail: Some(match (signal, wait) {
                    (Some(s), _) => format!("the monitor process was killed by signal {s}"),
                    (None, Some(w)) => format!("the monitor process ended ({w}) without a record"),
                    (None, None) => "the monitor process ended while no daemon watched it, \
                                     without writing its exit record"
                        .into(),
                }),
                at_unix_ms,
            },
        }
    }

    /// A failure, for `--restart on-failure`.
    pub fn failed(&self) -> bool {
        self.how != "stopped"
            && self.how != "saved"
            && self.how != "migrated"
            && self.status != Some(0)
    }
}

/// One VM, as stored in `vm.json` and shown by the API.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub id: String,
    pub name: String,
    pub spec: Spec,
    pub state: State,
    /// Monitor process and its start time (clock ticks since boot, from
    /// `/proc/PID/stat`) so that a reused pid is not mistaken for it.
    pub pid: Option<u32>,
    pub pid_start: Option<u64>,
    pub created_unix_ms: u64,
    pub started_unix_ms: Option<u64>,
    /// Request reached the daemon -> guest's `main`, in µs.
    pub start_us: Option<u64>,
    /// Request reached the daemon -> the monitor handled the guest's `main`
    /// mark (after the exit that reports it), in µs.
    #[serde(default)]
    pub main_exit_us: Option<u64>,
    /// Request reached the daemon -> guest's threads started, in µs.
    pub launch_us: Option<u64>,
    /// Whether the last start used a pre-started shell from the pool.
    pub from_pool: bool,
    pub ports: Vec<Published>,
    pub restarts: u32,
    /// A user stopped or killed it: no restart, and `killed` if no record.
    pub stop_requested: bool,
    pub exit: Option<Exit>,
}

impl Record {
    pub fn dir(state_dir: &Path, id: &str) -> PathBuf {
        state_dir.join("vms").join(id)
    }

    /// Writes the record atomically (a crash leaves the old or the new).
    pub fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        let dir = Record::dir(state_dir, &self.id);
        let tmp = dir.join("vm.json.tmp");
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(tmp, dir.join("vm.json"))
    }

    pub fn load(dir: &Path) -> std::io::Result<Record> {
        let bytes = std::fs::read(dir.join("vm.json"))?;
        serde_json::from_slice(&bytes).map_err(std::io::Error::other)
    }
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A new VM id: 16 hex digits from the kernel's random source.
pub fn new_id() -> String {
    let mut b = [0u8; 8];
    // SAFETY: fills the 8 bytes of `b`, which we own.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // Cannot really happen for 8 bytes; fall back to time and pid.
        let t = wisp_monitor::control::monotonic_ns() ^ ((std::process::id() as u64) << 40);
        b = t.to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Checks a user-given name: 1-63 of `[A-Za-z0-9_.-]`, starting with a
/// letter or digit (it names a directory-free record and a CLI argument).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(&c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "name '{name}' is not 1-63 letters, digits, '_', '.' or '-' starting with a letter or digit"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("web-1.a_b").is_ok());
        for bad in ["", "-x", "a/b", "..", "a b", &"x".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ids_are_distinct_hex() {
        let a = new_id();
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, new_id());
    }

    #[test]
    fn exits_without_a_record() {
        use std::os::unix::process::ExitStatusExt;
        let killed = Exit::from_parts(None, Some(std::process::ExitStatus::from_raw(9)), false);
        assert_eq!((killed.how.as_str(), killed.signal), ("killed", Some(9)));
        assert!(killed.failed());
        let lost = Exit::from_parts(None, None, false);
        assert_eq!(lost.how, "lost");
        let rec = ExitRecord {
            status: 0,
            how: "exited".into(),
            detail: None,
        };
        assert!(!Exit::from_parts(Some(rec), None, false).failed());
    }
}

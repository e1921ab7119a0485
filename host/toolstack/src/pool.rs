//! The pool of pre-started shells (LightVM's split toolstack).
//!
//! A KVM VM belongs to the process that created it, so a ready VM is a
//! ready process: `wisp shell` with its VM, vCPU and guest memory created,
//! blocked on its hand-off channel. The pool keeps a configured number per
//! memory size and refills in the background; `run` takes one, or spawns
//! one on the spot (a cold start) when none is free.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::proto::{self, Hello};
use crate::spawner::Spawner;

/// How often the refiller looks for pooled shells that died waiting.
const PRUNE_EVERY: Duration = Duration::from_secs(1);
/// How long a new shell may take to create its VM.
const READY_LIMIT: Duration = Duration::from_secs(20);
/// How long a shell made at idle CPU priority may stay there: on a host
/// whose CPUs other work keeps busy it would hardly progress, so it then
/// goes on at the normal policy (see [`crate::priority`]).
pub const IDLE_GRACE: Duration = Duration::from_millis(100);
/// The fd number the hand-off channel has in the shell: its standard
/// input, so that the daemon spawns it without a `pre_exec` hook, which
/// lets the standard library use `posix_spawn` (a `vfork`) instead of a
/// `fork` that copies the page tables of a daemon with thousands of
/// threads.
pub const CHANNEL_FD: i32 = 0;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cannot start a monitor process ({0}): {1}")]
    Spawn(String, std::io::Error),
    #[error("the monitor process failed before it was ready: {0}")]
    NotReady(String),
}

/// A monitor process with its VM created, waiting for a guest.
pub struct ReadyShell {
    pub child: Child,
    /// Its start time (/proc/PID/stat), read once while it waited: with
    /// the pid it names the process in records.
    pub start_time: Option<u64>,
    pub channel: UnixStream,
    pub memory: u64,
    /// The files of the VM it will run, made while it waited.
    pub spare: Option<SpareDir>,
}

/// A VM directory made ahead of its request (`STATE/pool/PID`): log, exit
/// record and bound control socket, so that a start only renames it into
/// place (`STATE/vms/ID`) instead of creating four files. `shell.pid`
/// names the shell (pid and start time) so that a daemon that crashed
/// between the rename and the VM's first record can find and end it.
pub struct SpareDir {
    pub dir: PathBuf,
    pub log: File,
    pub exit: File,
    pub control: UnixListener,
}

/// The shell's pid and start time in a spare directory.
pub const SHELL_PID: &str = "shell.pid";

impl SpareDir {
    fn create(root: &Path, pid: u32, start: u64) -> std::io::Result<SpareDir> {
        let dir = root.join(pid.to_string());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let made = (|| {
            std::fs::write(dir.join(SHELL_PID), format!("{pid} {start}\n"))?;
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(crate::logs::CURRENT))?;
            let exit = File::create(dir.join("exit.json"))?;
            let control = UnixListener::bind(dir.join("control.sock"))?;
            Ok(SpareDir {
                dir: dir.clone(),
                log,
                exit,
                control,
            })
        })();
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        made
    }

    /// Removes a spare that will not be used.
    pub fn discard(self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reads a spare directory's `shell.pid`: (pid, start time).
pub fn read_shell_pid(dir: &Path) -> Option<(u32, u64)> {
    let s = std::fs::read_to_string(dir.join(SHELL_PID)).ok()?;
    let mut it = s.split_whitespace();
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Starts a shell for `memory` bytes and waits until it is ready (a
/// `background` one at idle CPU priority until then: see
/// [`crate::priority`]).
pub fn spawn(spawner: &Spawner, memory: u64, background: bool) -> Result<ReadyShell, PoolError> {
    let (ours, theirs) =
        UnixStream::pair().map_err(|e| PoolError::Spawn("socketpair".into(), e))?;
    let mut child = spawner
        .spawn(memory, OwnedFd::from(theirs), background)
        .map_err(|e| PoolError::Spawn(spawner.exe().display().to_string(), e))?;
    // Our copy of the shell's end was closed by the spawn.
    let fail = |child: &mut Child, why: String| {
        let _ = child.kill();
        let _ = child.wait();
        PoolError::NotReady(why)
    };
    let grace_ms = IDLE_GRACE.as_millis() as i32;
    if background && !crate::process::readable(ours.as_raw_fd(), grace_ms) {
        if let Err(e) = crate::priority::restore_process(child.id()) {
            crate::log(format_args!("pool: restoring a shell's priority: {e}"));
        }
    }
    let _ = ours.set_read_timeout(Some(READY_LIMIT));
    match proto::recv::<Hello>(&ours) {
        Ok((Hello::Ready { .. }, _)) => {}
        Ok((Hello::Failed { error }, _)) => return Err(fail(&mut child, error)),
        Err(e) => return Err(fail(&mut child, e.to_string())),
    }
    let _ = ours.set_read_timeout(None);
    Ok(ReadyShell {
        start_time: crate::process::start_time(child.id()),
        child,
        channel: ours,
        memory,
        spare: None,
    })
}

/// Drops the waiting shells that have ended (killed from outside, say):
/// reaped, their spare directories removed, so that the pool counts only
/// live ones and the refiller replaces the others. A few `waitid` calls:
/// the pool is small whatever the number of guests.
fn prune_dead(g: &mut Inner) {
    for q in g.ready.values_mut() {
        q.retain_mut(|s| match s.child.try_wait() {
            Ok(None) => true,
            _ => {
                if let Some(d) = s.spare.take() {
                    d.discard();
                }
                false
            }
        });
    }
}

/// Counters of the pool.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct PoolCounters {
    /// Starts served by a pooled shell.
    pub warm: u64,
    /// Starts that had to spawn a shell.
    pub cold: u64,
    /// Shells spawned by the refiller.
    pub spawned: u64,
    /// Shells the refiller could not start.
    pub failed: u64,
}

struct Inner {
    ready: HashMap<u64, VecDeque<ReadyShell>>,
    counters: PoolCounters,
    stopping: bool,
}

pub struct Pool {
    spawner: Spawner,
    /// Where spare VM directories are made (`STATE/pool`), if anywhere.
    spares: Option<PathBuf>,
    /// (memory, shells to keep ready)
    targets: Vec<(u64, usize)>,
    inner: Mutex<Inner>,
    wake: Condvar,
}

impl Pool {
    pub fn new(exe: PathBuf, targets: Vec<(u64, usize)>) -> Arc<Pool> {
        Pool::with_spares(exe, targets, None)
    }

    /// A pool whose shells each come with a spare VM directory under
    /// `spares` (emptied first: what a previous daemon left there belongs
    /// to shells that ended with it).
    pub fn with_spares(
        exe: PathBuf,
        targets: Vec<(u64, usize)>,
        spares: Option<PathBuf>,
    ) -> Arc<Pool> {
        if let Some(root) = &spares {
            let _ = std::fs::remove_dir_all(root);
        }
        Arc::new(Pool {
            spawner: Spawner::new(exe),
            spares,
            targets,
            inner: Mutex::new(Inner {
                ready: HashMap::new(),
                counters: PoolCounters::default(),
                stopping: false,
            }),
            wake: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A shell for `memory`: a pooled one if there is one alive, otherwise a
    /// new one. Returns it and whether it came from the pool. The refill is
    /// not started here: call [`Pool::refill_soon`] once the start is done,
    /// so that spawning the next shell does not compete for the CPU with
    /// the guest being started.
    pub fn take(&self, memory: u64) -> Result<(ReadyShell, bool), PoolError> {
        loop {
            let got = self
                .lock()
                .ready
                .get_mut(&memory)
                .and_then(VecDeque::pop_front);
            match got {
                // A shell that died while waiting (e.g. killed) is skipped
                // (and not counted).
                Some(mut s) => match s.child.try_wait() {
                    Ok(None) => {
                        self.lock().counters.warm += 1;
                        return Ok((s, true));
                    }
                    _ => {
                        if let Some(d) = s.spare.take() {
                            d.discard();
                        }
                        self.wake.notify_all();
                        continue;
                    }
                },
                None => {
                    self.lock().counters.cold += 1;
                    return spawn(&self.spawner, memory, false).map(|s| (s, false));
                }
            }
        }
    }

    /// Wakes the refiller (after a start, or a shell taken for other use).
    pub fn refill_soon(&self) {
        self.wake.notify_all();
    }

    /// Ready shells per memory size: (memory, ready, target).
    pub fn status(&self) -> Vec<(u64, usize, usize)> {
        let g = self.lock();
        self.targets
            .iter()
            .map(|&(m, t)| (m, g.ready.get(&m).map_or(0, VecDeque::len), t))
            .collect()
    }

    pub fn counters(&self) -> PoolCounters {
        self.lock().counters
    }

    /// Keeps every size at its target; runs until [`Pool::stop`].
    pub fn refill(self: &Arc<Self>) {
        loop {
            let want = {
                let mut g = self.lock();
                loop {
                    if g.stopping {
                        return;
                    }
                    prune_dead(&mut g);
                    let short = self
                        .targets
                        .iter()
                        .find(|&&(m, t)| g.ready.get(&m).map_or(0, VecDeque::len) < t);
                    match short {
                        Some(&(m, _)) => break m,
                        None => {
                            // Woken by a start, or after a while to look
                            // for shells that died while they waited.
                            g = self
                                .wake
                                .wait_timeout(g, PRUNE_EVERY)
                                .unwrap_or_else(|p| p.into_inner())
                                .0;
                        }
                    }
                }
            };
            let spawned = spawn(&self.spawner, want, true).map(|mut s| {
                // Only a shell named by pid and start time gets one (a
                // restarted daemon must be able to tell it is this shell).
                if let (Some(root), Some(start)) = (&self.spares, s.start_time) {
                    match SpareDir::create(root, s.child.id(), start) {
                        Ok(d) => s.spare = Some(d),
                        // Starts then make the files themselves.
                        Err(e) => crate::log(format_args!("pool: spare directory: {e}")),
                    }
                }
                s
            });
            match spawned {
                Ok(s) => {
                    let mut g = self.lock();
                    g.counters.spawned += 1;
                    g.ready.entry(want).or_default().push_back(s);
                }
                Err(e) => {
                    self.lock().counters.failed += 1;
                    crate::log(format_args!("pool: {e}"));
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    /// Stops refilling and ends the pooled shells (closing their channel
    /// makes them exit).
    pub fn stop(&self) {
        let shells: Vec<ReadyShell> = {
            let mut g = self.lock();
            g.stopping = true;
            g.ready.drain().flat_map(|(_, q)| q).collect()
        };
        self.wake.notify_all();
        for mut s in shells {
            drop(s.channel);
            let _ = s.child.wait();
            if let Some(d) = s.spare.take() {
                d.discard();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A background shell still starting after [`IDLE_GRACE`] is put back
    /// to the normal policy by the daemon (a busy host would starve it).
    #[test]
    fn a_slow_background_shell_is_put_back_to_normal_priority() {
        use crate::priority::testing::{policy_in, policy_recorder};
        // Records its policy well after the grace.
        let (dir, script) = policy_recorder("pool-grace", "0.6");
        let spawner = Spawner::new(script);
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            assert!(spawner.lowers_background(), "root lowers background shells");
        }
        assert!(matches!(
            spawn(&spawner, 0, true),
            Err(PoolError::NotReady(_))
        ));
        let sched = std::fs::read_to_string(dir.join("sched")).unwrap();
        // Lowered at the spawn (when this process may), restored since.
        assert_eq!(policy_in(&sched), "0", "{sched}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

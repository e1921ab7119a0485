//! The pool of pre-started shells (LightVM's split toolstack).
//!
//! A KVM VM belongs to the process that created it, so a ready VM is a
//! ready process: `wisp shell` with its VM, vCPU and guest memory created,
//! blocked on its hand-off channel. The pool keeps a configured number per
//! memory size and refills in the background; `run` takes one, or spawns
//! one on the spot (a cold start) when none is free.

use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::proto::{self, Hello};

/// How long a new shell may take to create its VM.
const READY_LIMIT: Duration = Duration::from_secs(20);
/// The fd number the hand-off channel has in the shell.
pub const CHANNEL_FD: i32 = 3;

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
    pub channel: UnixStream,
    pub memory: u64,
}

/// Starts a shell for `memory` bytes and waits until it is ready.
pub fn spawn(exe: &PathBuf, memory: u64) -> Result<ReadyShell, PoolError> {
    let (ours, theirs) =
        UnixStream::pair().map_err(|e| PoolError::Spawn("socketpair".into(), e))?;
    let fd = theirs.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.args(["shell", "--memory", &memory.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own process group: a terminal's ^C to the daemon does not
        // reach the guests, which outlive the daemon by design.
        .process_group(0);
    // SAFETY: between fork and exec, only dup2/fcntl (async-signal-safe) on a
    // descriptor that stays open in the parent until after the spawn.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself would keep close-on-exec: clear it instead.
            let rc = if fd == CHANNEL_FD {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, CHANNEL_FD)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| PoolError::Spawn(exe.display().to_string(), e))?;
    drop(theirs);
    let fail = |child: &mut Child, why: String| {
        let _ = child.kill();
        let _ = child.wait();
        PoolError::NotReady(why)
    };
    let _ = ours.set_read_timeout(Some(READY_LIMIT));
    match proto::recv::<Hello>(&ours) {
        Ok((Hello::Ready { .. }, _)) => {}
        Ok((Hello::Failed { error }, _)) => return Err(fail(&mut child, error)),
        Err(e) => return Err(fail(&mut child, e.to_string())),
    }
    let _ = ours.set_read_timeout(None);
    Ok(ReadyShell {
        child,
        channel: ours,
        memory,
    })
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
    exe: PathBuf,
    /// (memory, shells to keep ready)
    targets: Vec<(u64, usize)>,
    inner: Mutex<Inner>,
    wake: Condvar,
}

impl Pool {
    pub fn new(exe: PathBuf, targets: Vec<(u64, usize)>) -> Arc<Pool> {
        Arc::new(Pool {
            exe,
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
    /// new one. Returns it and whether it came from the pool.
    pub fn take(&self, memory: u64) -> Result<(ReadyShell, bool), PoolError> {
        loop {
            let got = {
                let mut g = self.lock();
                let s = g.ready.get_mut(&memory).and_then(VecDeque::pop_front);
                if s.is_some() {
                    g.counters.warm += 1;
                } else {
                    g.counters.cold += 1;
                }
                s
            };
            self.wake.notify_all();
            match got {
                // A shell that died while waiting (e.g. killed) is skipped.
                Some(mut s) => match s.child.try_wait() {
                    Ok(None) => return Ok((s, true)),
                    _ => continue,
                },
                None => return spawn(&self.exe, memory).map(|s| (s, false)),
            }
        }
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
                    let short = self
                        .targets
                        .iter()
                        .find(|&&(m, t)| g.ready.get(&m).map_or(0, VecDeque::len) < t);
                    match short {
                        Some(&(m, _)) => break m,
                        None => {
                            g = self.wake.wait(g).unwrap_or_else(|p| p.into_inner());
                        }
                    }
                }
            };
            match spawn(&self.exe, want) {
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
        }
    }
}

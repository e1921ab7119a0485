//! Starts shell processes from a thread with a file table of its own.
//!
//! A spawn (`posix_spawn`, a `vfork`) copies the calling thread's table of
//! open files into the child, and the child's `exec` then closes every
//! close-on-exec entry: both cost one step per descriptor open in the
//! daemon. The daemon holds one descriptor per running guest (the pidfd
//! its reaper waits on), so with thousands of guests every refill of the
//! pool paid milliseconds of CPU for descriptors the shell never sees,
//! competing with the starts it serves.
//!
//! The spawner thread leaves the daemon's table at the start
//! (`unshare(CLONE_FILES)`, when the table is still small), closes what it
//! inherited but its end of a socket pair, and from then on holds nothing
//! else: a spawn copies a handful of entries whatever the number of guests.
//! The one descriptor a shell needs from the daemon, the shell's end of its
//! hand-off channel, crosses from the daemon's table to the spawner's over
//! that socket pair (`SCM_RIGHTS`).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// What a spawn asks: a shell for `memory` bytes, started at idle CPU
/// priority if `background` (see [`crate::priority`]).
struct Job {
    memory: u64,
    background: bool,
    reply: mpsc::Sender<std::io::Result<Child>>,
}

/// The spawner thread and the daemon-side end of its socket pair.
pub struct Spawner {
    exe: PathBuf,
    /// `None` when the thread could not be set up: spawns happen on the
    /// caller's thread then (correct, only slower with many guests).
    link: Option<Mutex<(mpsc::Sender<Job>, UnixStream)>>,
    /// Background spawns start at idle priority (the daemon may restore
    /// it: see [`crate::priority`]).
    lower_background: bool,
    /// The spawner thread's id (0 without one), for its /proc entry.
    #[cfg_attr(not(test), allow(dead_code))]
    tid: i32,
}

impl Spawner {
    /// Starts the thread. Call it early, while the daemon holds few
    /// descriptors: the thread's table starts as a copy of the daemon's.
    pub fn new(exe: PathBuf) -> Spawner {
        let lower_background = crate::priority::can_lower_and_restore();
        match Self::start(exe.clone(), lower_background) {
            Ok((tx, sock, tid)) => Spawner {
                exe,
                link: Some(Mutex::new((tx, sock))),
                lower_background,
                tid,
            },
            Err(e) => {
                crate::log(format_args!("spawner: {e} (spawning from the daemon)"));
                Spawner {
                    exe,
                    link: None,
                    lower_background: false,
                    tid: 0,
                }
            }
        }
    }

    fn start(
        exe: PathBuf,
        lower_background: bool,
    ) -> std::io::Result<(mpsc::Sender<Job>, UnixStream, i32)> {
        let (ours, theirs) = UnixStream::pair()?;
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("wisp-spawner".into())
            .stack_size(256 << 10)
            .spawn(move || {
                // SAFETY: gettid has no arguments and cannot fail.
                let tid = unsafe { libc::gettid() };
                let _ = ready_tx.send(own_table(&theirs).map(|()| tid));
                for job in rx {
                    // The child inherits this thread's policy: lowered for
                    // the spawn only, so that a foreground (cold-start)
                    // spawn after it runs at normal priority.
                    let lowered =
                        lower_background && job.background && crate::priority::lower().is_ok();
                    let child = receive_fd(&theirs).and_then(|fd| spawn(&exe, job.memory, fd));
                    if lowered && crate::priority::restore().is_err() {
                        // Cannot happen once the probe passed; never leave
                        // a cold start at idle priority.
                        let _ = job.reply.send(Err(std::io::Error::other(
                            "the spawner could not restore its priority",
                        )));
                        return;
                    }
                    let _ = job.reply.send(child);
                }
            })?;
        let tid = ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("the spawner thread ended"))??;
        Ok((tx, ours, tid))
    }

    /// The program it starts.
    pub fn exe(&self) -> &PathBuf {
        &self.exe
    }

    /// Whether background spawns start at idle priority.
    pub fn lowers_background(&self) -> bool {
        self.link.is_some() && self.lower_background
    }

    /// Starts `wisp shell --memory MEMORY` with `channel` as its standard
    /// input (see [`crate::pool::CHANNEL_FD`]); `channel` is closed here.
    /// A `background` shell starts at idle priority when the daemon can
    /// restore it ([`Spawner::lowers_background`]); the shell restores
    /// itself before it says it is ready.
    pub fn spawn(&self, memory: u64, channel: OwnedFd, background: bool) -> std::io::Result<Child> {
        let Some(link) = &self.link else {
            return spawn(&self.exe, memory, channel);
        };
        let link = link.lock().unwrap_or_else(|p| p.into_inner());
        let (reply, answer) = mpsc::channel();
        link.0
            .send(Job {
                memory,
                background,
                reply,
            })
            .map_err(|_| std::io::Error::other("the spawner thread ended"))?;
        link.1
            .send_with_fd(&[0u8][..], channel.as_raw_fd())
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        drop(channel);
        answer
            .recv()
            .map_err(|_| std::io::Error::other("the spawner thread ended"))?
    }
}

/// Gives the calling thread a file table of its own holding only the
/// standard descriptors and `keep`.
fn own_table(keep: &UnixStream) -> std::io::Result<()> {
    // SAFETY: unshare only changes this thread's own table: the
    // descriptors the daemon's other threads use stay open in theirs.
    if unsafe { libc::unshare(libc::CLONE_FILES) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let k = keep.as_raw_fd() as libc::c_uint;
    // SAFETY: closes entries of this thread's private copy of the table;
    // the only Rust owner of a descriptor on this thread is `keep`, which
    // stays open.
    unsafe {
        if k > 3 {
            libc::syscall(libc::SYS_close_range, 3u32, k - 1, 0u32);
        }
        libc::syscall(libc::SYS_close_range, k + 1, u32::MAX, 0u32);
    }
    Ok(())
}

/// Receives the descriptor a [`Spawner::spawn`] sends.
fn receive_fd(sock: &UnixStream) -> std::io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let (_, fd) = sock
        .recv_with_fd(&mut byte[..])
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    fd.map(OwnedFd::from)
        .ok_or_else(|| std::io::Error::other("no channel descriptor came with the spawn"))
}

fn spawn(exe: &PathBuf, memory: u64, channel: OwnedFd) -> std::io::Result<Child> {
    Command::new(exe)
        .args(["shell", "--memory", &memory.to_string()])
        .stdin(Stdio::from(channel))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own process group: a terminal's ^C to the daemon does not
        // reach the guests, which outlive the daemon by design.
        .process_group(0)
        .spawn()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/thread-self/fd").unwrap().count()
    }

    /// The spawner's table does not grow with the daemon's: the child is
    /// spawned from a table of a handful of entries.
    #[test]
    fn the_spawner_thread_holds_only_its_socket() {
        let s = Spawner::new(PathBuf::from("/bin/true"));
        assert!(s.link.is_some(), "the spawner thread starts");
        let _many: Vec<std::fs::File> = (0..200)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        assert!(open_fds() > 200);
        // Counted from inside the spawner thread: a spawned `ls` of its
        // own /proc/PID/fd would show its own table, so ask the thread's.
        let (a, b) = UnixStream::pair().unwrap();
        let mut child = s.spawn(0, OwnedFd::from(b), false).unwrap();
        child.wait().unwrap();
        drop(a);
        // Between spawns it holds stdin, stdout, stderr and its socket.
        let n = std::fs::read_dir(format!("/proc/self/task/{}/fd", s.tid))
            .unwrap()
            .count();
        assert!(n <= 4, "the spawner thread holds {n} descriptors");
    }

    /// Spawns a script that records the policy it runs under; returns it
    /// and whether the spawner lowers background spawns.
    fn policy_of_spawn(background: bool) -> (String, bool) {
        use crate::priority::testing::{policy_in as policy, policy_recorder};
        let (dir, script) = policy_recorder(&format!("spawner-{background}"), "0");
        let s = Spawner::new(script);
        let (_ours, theirs) = UnixStream::pair().unwrap();
        let mut child = s.spawn(0, OwnedFd::from(theirs), background).unwrap();
        assert!(child.wait().unwrap().success());
        let got = policy(&std::fs::read_to_string(dir.join("sched")).unwrap());
        // The spawner thread itself is back at the normal policy.
        let own = std::fs::read_to_string(format!("/proc/self/task/{}/sched", s.tid)).unwrap();
        assert_eq!(policy(&own), "0");
        let _ = std::fs::remove_dir_all(&dir);
        (got, s.lowers_background())
    }

    /// A background spawn starts at idle priority (SCHED_IDLE, 5) when the
    /// process can restore it, a foreground one at the normal policy.
    #[test]
    fn background_spawns_start_at_idle_priority() {
        let (idle, lowers) = policy_of_spawn(true);
        let expected = if lowers { libc::SCHED_IDLE } else { 0 };
        assert_eq!(idle, expected.to_string());
        assert_eq!(policy_of_spawn(false).0, "0");
    }
}

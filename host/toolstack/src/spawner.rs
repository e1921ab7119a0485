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

/// Bytes of a job: the shell's memory size (little-endian) and whether it
/// is a background one; the channel's descriptor comes in the same message.
const JOB_LEN: usize = 9;

/// The spawner thread's side: one job per message, one answer per job.
struct Link {
    sock: UnixStream,
    answers: mpsc::Receiver<std::io::Result<Child>>,
}

/// The spawner thread and the daemon-side end of its socket pair.
pub struct Spawner {
    exe: PathBuf,
    /// `None` when the thread could not be set up or has ended: spawns
    /// happen on the caller's thread then (correct, only slower with many
    /// guests).
    link: Mutex<Option<Link>>,
    /// Background shells lower themselves to idle priority (see
    /// [`crate::priority`]): only when this process can restore them.
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
        let (link, tid) = match Self::start(exe.clone()) {
            Ok((link, tid)) => (Some(link), tid),
            Err(e) => {
                crate::log(format_args!("spawner: {e} (spawning from the daemon)"));
                (None, 0)
            }
        };
        Spawner {
            exe,
            link: Mutex::new(link),
            lower_background,
            tid,
        }
    }

    fn start(exe: PathBuf) -> std::io::Result<(Link, i32)> {
        let (ours, theirs) = UnixStream::pair()?;
        let (answer_tx, answers) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("wisp-spawner".into())
            .stack_size(256 << 10)
            .spawn(move || {
                // SAFETY: gettid has no arguments and cannot fail.
                let tid = unsafe { libc::gettid() };
                let ok = own_table(&theirs);
                let failed = ok.is_err();
                let _ = ready_tx.send(ok.map(|()| tid));
                if failed {
                    return;
                }
                // Ends when the daemon's end is closed (or the socket
                // fails): the daemon then spawns by itself.
                while let Some((memory, background, fd)) = receive_job(&theirs) {
                    let child = fd.and_then(|fd| spawn(&exe, memory, background, fd));
                    if answer_tx.send(child).is_err() {
                        return;
                    }
                }
            })?;
        let tid = ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("the spawner thread ended"))??;
        Ok((
            Link {
                sock: ours,
                answers,
            },
            tid,
        ))
    }

    /// The program it starts.
    pub fn exe(&self) -> &PathBuf {
        &self.exe
    }

    /// Whether background shells start at idle priority.
    pub fn lowers_background(&self) -> bool {
        self.lower_background
    }

    /// Starts `wisp shell --memory MEMORY` with `channel` as its standard
    /// input (see [`crate::pool::CHANNEL_FD`]); `channel` is closed here.
    /// A `background` shell starts at idle priority when the daemon can
    /// restore it ([`Spawner::lowers_background`]); the shell restores
    /// itself before it says it is ready.
    pub fn spawn(&self, memory: u64, channel: OwnedFd, background: bool) -> std::io::Result<Child> {
        let background = background && self.lower_background;
        let mut link = self.link.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = link.as_ref() {
            let mut job = [0u8; JOB_LEN];
            job[..8].copy_from_slice(&memory.to_le_bytes());
            job[8] = u8::from(background);
            // One message: the job and its descriptor arrive together or
            // not at all, and each job gets exactly one answer.
            let sent = l
                .sock
                .send_with_fd(&job[..], channel.as_raw_fd())
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
            match sent.and_then(|n| {
                if n == JOB_LEN {
                    l.answers
                        .recv()
                        .map_err(|_| std::io::Error::other("the spawner thread ended"))
                } else {
                    Err(std::io::Error::other("a short write to the spawner"))
                }
            }) {
                Ok(answer) => return answer,
                Err(e) => {
                    crate::log(format_args!("spawner: {e} (spawning from the daemon)"));
                    *link = None;
                }
            }
        }
        drop(link);
        spawn(&self.exe, memory, background, channel)
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

/// Receives one job: (memory, background, the channel's descriptor, or
/// why it is missing); `None` once the daemon's end is closed or fails.
fn receive_job(sock: &UnixStream) -> Option<(u64, bool, std::io::Result<OwnedFd>)> {
    loop {
        let mut job = [0u8; JOB_LEN];
        match sock.recv_with_fd(&mut job[..]) {
            Ok((0, _)) => return None,
            Ok((n, fd)) => {
                let fd = fd.map(OwnedFd::from);
                if n != JOB_LEN {
                    return Some((0, false, Err(std::io::Error::other("a short job"))));
                }
                let memory = u64::from_le_bytes(job[..8].try_into().ok()?);
                let fd = fd.ok_or_else(|| {
                    std::io::Error::other("no channel descriptor came with the spawn")
                });
                return Some((memory, job[8] != 0, fd));
            }
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(_) => return None,
        }
    }
}

fn spawn(exe: &PathBuf, memory: u64, background: bool, channel: OwnedFd) -> std::io::Result<Child> {
    let mut cmd = Command::new(exe);
    cmd.args(["shell", "--memory", &memory.to_string()]);
    if background {
        cmd.arg("--background");
    }
    cmd.stdin(Stdio::from(channel))
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
        assert!(
            s.link.lock().unwrap().is_some(),
            "the spawner thread starts"
        );
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

    /// A background spawn is asked to start at idle priority (SCHED_IDLE,
    /// 5; the stand-in lowers itself as a shell does) when the process can
    /// restore it, and a foreground one is not. Root always can.
    #[test]
    fn background_spawns_start_at_idle_priority() {
        let (idle, lowers) = policy_of_spawn(true);
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            assert!(lowers, "root can restore a lowered shell");
        }
        let expected = if lowers { libc::SCHED_IDLE } else { 0 };
        assert_eq!(idle, expected.to_string());
        assert_eq!(policy_of_spawn(false).0, "0");
    }
}

//! What the daemon and a guest's monitor process (a "shell") say to each
//! other.
//!
//! Two channels:
//! * the **hand-off** channel, a socket pair created when the daemon spawns
//!   the shell: the shell says it is [`Ready`] (its KVM VM, vCPU and memory
//!   exist), the daemon sends one [`Handoff`] with the open files the guest
//!   needs (`SCM_RIGHTS`), the shell answers [`Started`] or an error. A
//!   pooled shell whose channel closes before a hand-off exits: the daemon
//!   that made it is gone.
//! * the **control** socket, a listening Unix socket the daemon binds in
//!   the VM's state directory and hands over: one JSON request line, one
//!   JSON reply line per connection ([`ControlRequest`], [`ControlReply`]).
//!   Any daemon, including a restarted one, can connect to it.
//!
//! Messages are JSON preceded by a 4-byte little-endian length; the files
//! of a hand-off travel with its first bytes.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Largest message either side accepts (a hand-off carries the guest's
/// arguments, which the boot page bounds to far less).
pub const MAX_MESSAGE: usize = 1 << 20;
/// Most files one hand-off carries.
pub const MAX_FDS: usize = 8;

/// The shell's first message.
#[derive(Debug, Serialize, Deserialize)]
pub enum Hello {
    /// VM, vCPU and memory created; waiting for a hand-off.
    Ready {
        pid: u32,
    },
    Failed {
        error: String,
    },
}

/// The guest to run. Files, in this order: image, log (console and the
/// monitor's own messages), exit record, control listener, then the disk if
/// `disk` is set.
#[derive(Debug, Serialize, Deserialize)]
pub struct Handoff {
    pub args: Vec<String>,
    /// `-p` rules (`[ADDR:]HOST:GUEST[/udp]`); any gives the guest a
    /// user-mode NIC.
    pub publish: Vec<String>,
    /// Whether the disk is read-only (present: a disk is attached).
    pub disk: Option<DiskMode>,
    pub cpus: Option<f64>,
    /// `CLOCK_MONOTONIC` ns when the request reached the daemon.
    pub request_ns: u64,
    /// Restore instead of boot: the first file is a snapshot, not an
    /// image, and this is the clone id (0: a plain restore).
    #[serde(default)]
    pub snapshot: Option<u32>,
    /// Receive a live migration instead of booting: the first file is the
    /// connection from the source (its header and META already read by
    /// the daemon), and this is the guest's memory size.
    #[serde(default)]
    pub migration: Option<u64>,
    /// The daemon checked this snapshot's memory (checksum and holes) and
    /// the file has not changed since: the shell checks every other
    /// section but not the memory again (a batch of clones reads it once).
    #[serde(default)]
    pub snapshot_checked: bool,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum DiskMode {
    ReadOnly,
    ReadWrite,
}

/// One host address a published port listens on.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Published {
    pub host: String,
    pub guest_port: u16,
    pub udp: bool,
}

/// The shell's answer to a hand-off.
#[derive(Debug, Serialize, Deserialize)]
pub enum Started {
    Ok {
        published: Vec<Published>,
        /// `CLOCK_MONOTONIC` ns when the guest's threads were started.
        started_ns: u64,
        /// When the guest reached `main`, if it did within the wait.
        main_ns: Option<u64>,
        /// When the monitor handled the guest's `main` mark (after its
        /// exit; `main_ns` is dated from the guest's TSC).
        #[serde(default)]
        main_exit_ns: Option<u64>,
    },
    Failed {
        error: String,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ControlRequest {
    Pause,
    Resume,
    /// Stops the guest through its controller, at once (the monitor then
    /// exits). After a [`ControlRequest::Shutdown`], this is the forced
    /// stop: the exit record then says `killed`.
    Stop,
    /// Asks the guest to stop by itself (its boot page's shutdown word);
    /// the daemon forces it with [`ControlRequest::Stop`] after the stop
    /// timeout. Fails if the guest cannot be asked (an image from before
    /// the shutdown word). A monitor from before this request answers
    /// "bad control request": the daemon then stops it at once.
    Shutdown,
    Stats,
    /// Saves the guest into the file that comes with the request
    /// (`SCM_RIGHTS`), then stops it unless `leave_running`.
    Save {
        leave_running: bool,
    },
    /// Migrates the guest live over the connection that comes with the
    /// request (`SCM_RIGHTS`): `meta` is sent first for the receiving
    /// daemon, `to` names the destination in the exit record.
    Migrate {
        meta: String,
        to: String,
    },
}

/// What a live migration did.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MigrateFigures {
    pub memory: u64,
    /// Pages sent per pre-copy round (round 0, every touched page, first).
    pub rounds: Vec<u64>,
    /// Pages sent with the guest paused.
    pub final_pages: u64,
    pub bytes_sent: u64,
    /// Request to the destination's confirmation, in µs.
    pub total_us: u64,
    /// Pause to the destination's confirmation, in µs.
    pub downtime_us: u64,
}

/// What a save did.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SaveFigures {
    pub pages_written: u64,
    pub bytes_written: u64,
    pub memory: u64,
    /// Request to the file complete, in µs.
    pub total_us: u64,
    /// How long the guest did not run, in µs.
    pub downtime_us: u64,
}

/// Engine counters and state of a running guest.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestStats {
    /// `running`, `paused` or `ended`.
    pub state: String,
    pub exits: u64,
    pub waits: u64,
    pub wakeups: u64,
    pub tx_frames: u64,
    pub rx_frames: u64,
    pub main_ns: Option<u64>,
    /// Network bytes sent and received by the guest (Ethernet frames), and
    /// data bytes its disk read and wrote (absent from older monitors).
    #[serde(default)]
    pub tx_bytes: u64,
    #[serde(default)]
    pub rx_bytes: u64,
    #[serde(default)]
    pub disk_read_bytes: u64,
    #[serde(default)]
    pub disk_write_bytes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ControlReply {
    Ok(GuestStats),
    Saved(SaveFigures),
    Migrated(MigrateFigures),
    Failed { error: String },
}

/// What a monitor process writes to its exit record when its guest ends.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExitRecord {
    /// The status the monitor exits with (as `wisp run`'s).
    pub status: u8,
    /// `exited`, `crashed`, `stopped` (the guest exited when asked to stop,
    /// or was stopped without being asked), `killed` (asked to stop, it did
    /// not within the timeout and was stopped by force), `saved` or `error`.
    pub how: String,
    /// The crash report or error, one paragraph.
    pub detail: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("the other side closed the channel")]
    Closed,
    #[error("channel: {0}")]
    Io(#[from] std::io::Error),
    #[error("message of {0} bytes is too large")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
}

/// Sends `msg` with `fds` (which stay owned by the caller).
pub fn send<T: Serialize>(s: &UnixStream, msg: &T, fds: &[RawFd]) -> Result<(), ProtoError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_MESSAGE {
        return Err(ProtoError::TooLarge(body.len()));
    }
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    if fds.is_empty() {
        (&*s).write_all(&frame)?;
        return Ok(());
    }
    // The files go with the first bytes; the rest follows as plain data.
    let n = s
        .send_with_fds(&[&frame[..]], fds)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    (&*s).write_all(&frame[n..])?;
    Ok(())
}

/// Receives one message and the files that came with it.
pub fn recv<T: DeserializeOwned>(s: &UnixStream) -> Result<(T, Vec<OwnedFd>), ProtoError> {
    let mut head = [0u8; 4];
    let mut fds = [-1; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: head.as_mut_ptr().cast(),
        iov_len: head.len(),
    }];
    // SAFETY: the iovec points at `head`, which we own and may hold any
    // bytes; received descriptors are wrapped in `OwnedFd` at once.
    let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    let files: Vec<OwnedFd> = fds[..nfds]
        .iter()
        // SAFETY: each of the first `nfds` entries is a new descriptor the
        // kernel installed for us.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Err(ProtoError::Closed);
    }
    (&*s).read_exact(&mut head[n..]).map_err(eof_is_closed)?;
    let len = u32::from_le_bytes(head) as usize;
    if len > MAX_MESSAGE {
        return Err(ProtoError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    (&*s).read_exact(&mut body).map_err(eof_is_closed)?;
    Ok((serde_json::from_slice(&body)?, files))
}

fn eof_is_closed(e: std::io::Error) -> ProtoError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        ProtoError::Closed
    } else {
        ProtoError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_message_and_its_files_arrive_together() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let msg = Handoff {
            args: vec!["x".repeat(100_000)],
            publish: vec!["8080:80".into()],
            disk: Some(DiskMode::ReadOnly),
            cpus: None,
            request_ns: 7,
            snapshot: None,
            migration: None,
            snapshot_checked: false,
        };
        let t = std::thread::spawn(move || send(&a, &msg, &[file.as_raw_fd()]).unwrap());
        let (got, fds): (Handoff, _) = recv(&b).unwrap();
        t.join().unwrap();
        assert_eq!(got.args[0].len(), 100_000);
        assert_eq!(got.request_ns, 7);
        assert_eq!(fds.len(), 1);
        let mut text = String::new();
        std::fs::File::from(fds.into_iter().next().unwrap())
            .read_to_string(&mut text)
            .unwrap();
        assert!(text.contains("Pid:"));
    }

    #[test]
    fn a_closed_channel_and_a_huge_length_are_errors() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        assert!(matches!(recv::<Hello>(&b), Err(ProtoError::Closed)));
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&u32::MAX.to_le_bytes()).unwrap();
        assert!(matches!(recv::<Hello>(&b), Err(ProtoError::TooLarge(_))));
    }
}

//! The migration stream on the wire: a versioned header, then framed,
//! checksummed messages; the receiver answers with one message.
//!
//! ```text
//! header   "WISPMIGR", version u32, 0 u32, memory size u64      (24 bytes)
//! message  kind u32, length u32, CRC-32 (kind, length, payload) u32, payload
//!   META    the toolstack's description of the guest (opaque here)
//!   PAGES   count u32, count page numbers u64, count pages of 4096 bytes
//!   SYNC    (empty) after each pre-copy round: the receiver answers
//!           SYNCED once it has taken in everything before it
//!   STATE   the snapshot's four state sections, each a u32-length blob
//!   GO      (empty) after READY: the receiver may start the guest
//! replies  SYNCED; READY (empty: the guest is built, not started) and,
//!          after GO, RUNNING (empty); or FAILED (a UTF-8 message)
//! ```
//! Everything is little-endian. The sender is untrusted: every length is
//! bounded before anything is allocated, every page number is checked
//! against the memory size, and a short read, a bad checksum or an
//! unexpected kind ends the stream with an error naming it.
//!
//! The connection may be blocking or not: reads and writes wait in
//! `poll(2)` with a timeout, and use `read(2)`/`write(2)` only (what a
//! monitor's control thread may call under its seccomp filter).

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use super::MigrationError;

pub const MAGIC: [u8; 8] = *b"WISPMIGR";
/// Bump on any change of the stream; the receiver refuses another.
pub const VERSION: u32 = 2;
pub const HEADER_LEN: usize = 24;
const FRAME_LEN: usize = 12;
pub const PAGE: usize = 4096;
/// Most pages in one PAGES message.
pub const BATCH: usize = 256;
const MAX_META: usize = 64 << 10;
const MAX_STATE: usize = 4 << 20;
const MAX_FAILED: usize = 4 << 10;

/// Message kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    Meta = 1,
    Pages = 2,
    State = 3,
    Sync = 4,
    Go = 5,
    Running = 16,
    Failed = 17,
    Synced = 18,
    Ready = 19,
}

impl Kind {
    fn from_u32(v: u32) -> Option<Kind> {
        Some(match v {
            1 => Kind::Meta,
            2 => Kind::Pages,
            3 => Kind::State,
            4 => Kind::Sync,
            5 => Kind::Go,
            16 => Kind::Running,
            17 => Kind::Failed,
            18 => Kind::Synced,
            19 => Kind::Ready,
            _ => return None,
        })
    }

    fn max_len(self) -> usize {
        match self {
            Kind::Meta => MAX_META,
            Kind::Pages => 4 + BATCH * (8 + PAGE),
            Kind::State => MAX_STATE,
            Kind::Running | Kind::Sync | Kind::Synced | Kind::Go | Kind::Ready => 0,
            Kind::Failed => MAX_FAILED,
        }
    }
}

/// One end of a migration connection, with a limit on how long any one
/// read or write may wait.
pub struct Conn<'a> {
    fd: RawFd,
    _owner: &'a dyn AsRawFd,
    pub timeout: Duration,
    /// When the whole exchange must be over, whatever progress each step
    /// makes (a receiver's bound on a sender that trickles).
    pub deadline: Option<(Instant, Duration)>,
    /// Bytes written so far.
    pub sent: u64,
}

impl<'a> Conn<'a> {
    pub fn new(owner: &'a dyn AsRawFd, timeout: Duration) -> Conn<'a> {
        Conn {
            fd: owner.as_raw_fd(),
            _owner: owner,
            timeout,
            deadline: None,
            sent: 0,
        }
    }

    /// When the next read or write must be done by: `timeout` from now,
    /// or the deadline if that is sooner.
    fn step_until(&self) -> Instant {
        let step = Instant::now() + self.timeout;
        self.deadline.map_or(step, |(d, _)| d.min(step))
    }

    fn wait(&self, events: libc::c_short, until: Instant) -> Result<(), MigrationError> {
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(match self.deadline {
                    Some((d, total)) if Instant::now() >= d => MigrationError::Deadline(total),
                    _ => MigrationError::Timeout(self.timeout),
                });
            }
            let mut p = libc::pollfd {
                fd: self.fd,
                events,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd that outlives the call.
            let n = unsafe { libc::poll(&mut p, 1, ms) };
            if n > 0 {
                return Ok(());
            }
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(MigrationError::Io(e));
                }
            }
        }
    }

    pub fn write_all(&mut self, mut buf: &[u8]) -> Result<(), MigrationError> {
        let until = self.step_until();
        while !buf.is_empty() {
            self.wait(libc::POLLOUT, until)?;
            // SAFETY: writes from `buf`, which we own, to an open descriptor.
            let n = unsafe { libc::write(self.fd, buf.as_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => continue,
                    _ => return Err(MigrationError::Io(e)),
                }
            }
            if n == 0 {
                return Err(MigrationError::Closed);
            }
            buf = &buf[n as usize..];
            self.sent += n as u64;
        }
        Ok(())
    }

    pub fn read_exact(&mut self, mut buf: &mut [u8]) -> Result<(), MigrationError> {
        let until = self.step_until();
        while !buf.is_empty() {
            self.wait(libc::POLLIN, until)?;
            // SAFETY: reads into `buf`, which we own and may hold any bytes.
            let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => continue,
                    _ => return Err(MigrationError::Io(e)),
                }
            }
            if n == 0 {
                return Err(MigrationError::Closed);
            }
            buf = &mut std::mem::take(&mut buf)[n as usize..];
        }
        Ok(())
    }

    pub fn write_header(&mut self, mem_size: u64) -> Result<(), MigrationError> {
        let mut h = Vec::with_capacity(HEADER_LEN);
        h.extend_from_slice(&MAGIC);
        h.extend_from_slice(&VERSION.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&mem_size.to_le_bytes());
        self.write_all(&h)
    }

    /// Reads and checks the header; returns the guest's memory size.
    pub fn read_header(&mut self) -> Result<u64, MigrationError> {
        let mut h = [0u8; HEADER_LEN];
        self.read_exact(&mut h[..8])?;
        if h[..8] != MAGIC {
            return Err(MigrationError::Protocol(
                "not a Wisp migration stream (bad magic)".into(),
            ));
        }
        self.read_exact(&mut h[8..])?;
        let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        if version != VERSION {
            return Err(MigrationError::Protocol(format!(
                "migration stream version {version}; this monitor speaks version {VERSION}"
            )));
        }
        let mut size = [0u8; 8];
        size.copy_from_slice(&h[16..24]);
        Ok(u64::from_le_bytes(size))
    }

    /// Sends one message whose payload is the concatenation of `parts`.
    pub fn send(&mut self, kind: Kind, parts: &[&[u8]]) -> Result<(), MigrationError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > kind.max_len() {
            return Err(MigrationError::Protocol(format!(
                "{kind:?} message of {len} bytes is too large"
            )));
        }
        let mut frame = Vec::with_capacity(FRAME_LEN);
        frame.extend_from_slice(&(kind as u32).to_le_bytes());
        frame.extend_from_slice(&(len as u32).to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&frame);
        for p in parts {
            crc.update(p);
        }
        frame.extend_from_slice(&crc.finalize().to_le_bytes());
        // One write for a small message: a frame and its payload in two
        // would wait for an ACK under Nagle's algorithm.
        if len <= 64 << 10 {
            for p in parts {
                frame.extend_from_slice(p);
            }
            return self.write_all(&frame);
        }
        self.write_all(&frame)?;
        for p in parts {
            self.write_all(p)?;
        }
        Ok(())
    }

    /// Receives one message (its kind and payload, checksum checked).
    pub fn recv(&mut self) -> Result<(Kind, Vec<u8>), MigrationError> {
        let mut frame = [0u8; FRAME_LEN];
        self.read_exact(&mut frame)?;
        let word =
            |i: usize| u32::from_le_bytes([frame[i], frame[i + 1], frame[i + 2], frame[i + 3]]);
        let (raw_kind, len, crc) = (word(0), word(4) as usize, word(8));
        let kind = Kind::from_u32(raw_kind)
            .ok_or_else(|| MigrationError::Protocol(format!("unknown message kind {raw_kind}")))?;
        if len > kind.max_len() {
            return Err(MigrationError::Protocol(format!(
                "{kind:?} message of {len} bytes is too large"
            )));
        }
        let mut payload = vec![0u8; len];
        self.read_exact(&mut payload)?;
        let mut h = crc32fast::Hasher::new();
        h.update(&frame[..8]);
        h.update(&payload);
        if h.finalize() != crc {
            return Err(MigrationError::Protocol(format!(
                "{kind:?} message fails its checksum"
            )));
        }
        Ok((kind, payload))
    }
}

/// The pages of a PAGES payload: (page number, its bytes), each number
/// below `pages`.
pub fn decode_pages(payload: &[u8], pages: u64) -> Result<Vec<(u64, &[u8])>, MigrationError> {
    let bad = |m: String| MigrationError::Protocol(format!("PAGES message: {m}"));
    if payload.len() < 4 {
        return Err(bad("too short".into()));
    }
    let count = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize;
    if count > BATCH || payload.len() != 4 + count * (8 + PAGE) {
        return Err(bad(format!(
            "{count} pages do not fit its {} bytes",
            payload.len()
        )));
    }
    let (numbers, data) = payload[4..].split_at(count * 8);
    let mut out = Vec::with_capacity(count);
    for (n, page) in numbers.chunks_exact(8).zip(data.chunks_exact(PAGE)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(n);
        let n = u64::from_le_bytes(b);
        if n >= pages {
            return Err(bad(format!(
                "page {n} is outside the guest's {pages} pages"
            )));
        }
        out.push((n, page));
    }
    Ok(out)
}

/// The four blobs of a STATE payload.
pub fn decode_state(payload: &[u8]) -> Result<[Vec<u8>; 4], MigrationError> {
    let mut rest = payload;
    let mut take = || -> Result<Vec<u8>, MigrationError> {
        let bad = || MigrationError::Protocol("STATE message is truncated".into());
        if rest.len() < 4 {
            return Err(bad());
        }
        let n = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if rest.len() - 4 < n {
            return Err(bad());
        }
        let b = rest[4..4 + n].to_vec();
        rest = &rest[4 + n..];
        Ok(b)
    };
    let out = [take()?, take()?, take()?, take()?];
    if !rest.is_empty() {
        return Err(MigrationError::Protocol(
            "STATE message has trailing bytes".into(),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn messages_round_trip_and_damage_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let t = Duration::from_secs(2);
        let mut w = Conn::new(&a, t);
        let mut r = Conn::new(&b, t);
        w.write_header(64 << 20).unwrap();
        w.send(Kind::Meta, &[b"{}"]).unwrap();
        assert_eq!(r.read_header().unwrap(), 64 << 20);
        assert_eq!(r.recv().unwrap(), (Kind::Meta, b"{}".to_vec()));

        // A flipped payload byte fails the checksum.
        let mut frame = Vec::new();
        frame.extend_from_slice(&(Kind::Meta as u32).to_le_bytes());
        frame.extend_from_slice(&2u32.to_le_bytes());
        frame.extend_from_slice(&0u32.to_le_bytes());
        frame.extend_from_slice(b"xx");
        w.write_all(&frame).unwrap();
        assert!(matches!(r.recv(), Err(MigrationError::Protocol(m)) if m.contains("checksum")));

        // A huge length is refused before anything is read or allocated.
        let mut frame = Vec::new();
        frame.extend_from_slice(&(Kind::State as u32).to_le_bytes());
        frame.extend_from_slice(&u32::MAX.to_le_bytes());
        frame.extend_from_slice(&0u32.to_le_bytes());
        w.write_all(&frame).unwrap();
        assert!(matches!(r.recv(), Err(MigrationError::Protocol(m)) if m.contains("too large")));

        drop(a);
        assert!(matches!(r.recv(), Err(MigrationError::Closed)));
    }

    #[test]
    fn pages_outside_memory_or_miscounted_are_refused() {
        let mut p = 1u32.to_le_bytes().to_vec();
        p.extend_from_slice(&10u64.to_le_bytes());
        p.extend_from_slice(&[7u8; PAGE]);
        assert_eq!(decode_pages(&p, 11).unwrap()[0].0, 10);
        assert!(decode_pages(&p, 10).is_err());
        p.pop();
        assert!(decode_pages(&p, 11).is_err());
        assert!(decode_state(&[1, 0, 0, 0]).is_err());
    }
}

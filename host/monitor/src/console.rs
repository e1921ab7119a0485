//! The guest console's way out to a descriptor the monitor does not
//! control (`wisp run`'s stdout: a terminal, a pipe, a socket), written
//! from the vCPU thread without ever blocking it for long.
//!
//! A plain blocking write to a full pipe nobody reads waits forever: the
//! vCPU thread would stop running the guest and answering pause and stop.
//! [`ConsoleOut`] waits at most [`STALL_LIMIT`] for the reader; then it
//! says [`std::io::ErrorKind::WouldBlock`] (the vCPU thread drops the rest
//! and counts it), and until the reader reads again it does not wait at
//! all, so that a stalled reader slows the guest by one wait, not one per
//! write.

use std::io::{self, Write};
use std::os::fd::RawFd;
use std::time::Duration;

/// Longest a console write waits for a reader that does not read.
pub const STALL_LIMIT: Duration = Duration::from_millis(500);

/// Most bytes one `write(2)` is given: a pipe that polls writable has
/// room for at least a page, so a write this small does not block.
const PIPE_BUF: usize = 4096;

/// A console on a descriptor (e.g. stdout) that does not block the caller
/// for more than [`STALL_LIMIT`] at a time.
pub struct ConsoleOut {
    fd: RawFd,
    /// The reader did not read for [`STALL_LIMIT`]: do not wait again
    /// until it does.
    stalled: bool,
}

impl ConsoleOut {
    /// The process's stdout (descriptor 1, never closed while it runs).
    pub fn stdout() -> ConsoleOut {
        // Flush what Rust's own buffered stdout holds, so that it comes
        // before the guest's output.
        let _ = io::stdout().flush();
        ConsoleOut {
            fd: libc::STDOUT_FILENO,
            stalled: false,
        }
    }

    /// Waits until the descriptor takes a write: false if it did not
    /// within `timeout`.
    fn writable(&self, timeout: Duration) -> io::Result<bool> {
        let mut p = libc::pollfd {
            fd: self.fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd, for the length given.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r >= 0 {
            // POLLERR/POLLHUP: the write reports it.
            return Ok(r > 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            // A kick: the controller wants the vCPU thread (pause, stop);
            // it does not wait for the reader.
            return Ok(false);
        }
        Err(e)
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let wait = if self.stalled {
            Duration::ZERO
        } else {
            STALL_LIMIT
        };
        if !self.writable(wait)? {
            self.stalled = true;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.stalled = false;
        let n = buf.len().min(PIPE_BUF);
        // SAFETY: writes at most `n` bytes from `buf`, which holds them, to
        // a descriptor this process keeps open (a closed one gives EBADF).
        let r = unsafe { libc::write(self.fd, buf.as_ptr().cast(), n) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

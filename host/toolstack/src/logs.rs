//! Per-VM logs with a size bound.
//!
//! The monitor appends the guest's console (and its own messages) to
//! `console.log`, opened `O_APPEND`. The daemon bounds it the way
//! logrotate's `copytruncate` does, since the monitor, under its seccomp
//! filter, can neither rename nor reopen files: when the log passes the
//! bound, it is copied to `console.log.1` and truncated, and the monitor's
//! next write lands at the new end. A log thus holds at most twice the
//! bound plus what the guest writes between two checks (its console is
//! rate-limited by the monitor). Which logs are checked, and when, is
//! [`watch`]'s business: those written, at most once a second.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

#[path = "log_watch.rs"]
pub mod watch;

pub const CURRENT: &str = "console.log";
pub const PREVIOUS: &str = "console.log.1";

/// Rotates `dir`'s log if it is over `limit` bytes.
pub fn bound(dir: &Path, limit: u64) -> std::io::Result<()> {
    let cur = dir.join(CURRENT);
    let len = match std::fs::metadata(&cur) {
        Ok(m) => m.len(),
        Err(_) => return Ok(()),
    };
    if len <= limit {
        return Ok(());
    }
    std::fs::copy(&cur, dir.join(PREVIOUS))?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cur)?
        .set_len(0)
}

/// The whole log: the previous part, then the current one.
pub fn read(dir: &Path) -> Vec<u8> {
    let mut out = std::fs::read(dir.join(PREVIOUS)).unwrap_or_default();
    out.extend(std::fs::read(dir.join(CURRENT)).unwrap_or_default());
    out
}

/// Writes the log to `out`, then what is appended to it until `live()`
/// turns false and nothing more is left, or `out` fails.
pub fn follow(dir: &Path, out: &mut dyn Write, live: &dyn Fn() -> bool) {
    let previous = std::fs::read(dir.join(PREVIOUS)).unwrap_or_default();
    let current = std::fs::read(dir.join(CURRENT)).unwrap_or_default();
    if out
        .write_all(&previous)
        .and_then(|_| out.write_all(&current))
        .is_err()
    {
        return;
    }
    let mut pos = current.len() as u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let ended = !live();
        if let Ok(mut f) = std::fs::File::open(dir.join(CURRENT)) {
            let len = f.metadata().map_or(0, |m| m.len());
            if len < pos {
                // Rotated: what was written since is at the start.
                pos = 0;
            }
            if f.seek(SeekFrom::Start(pos)).is_ok() {
                loop {
                    match f.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if out.write_all(&buf[..n]).is_err() {
                                return;
                            }
                            pos += n as u64;
                        }
                    }
                }
            }
        }
        if ended {
            return;
        }
        // Detects a client that went away while nothing was written.
        if out.flush().is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_over_its_bound_is_rotated_and_read_whole() {
        let dir = std::env::temp_dir().join(format!("wisp-logs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(CURRENT))
            .unwrap();
        f.write_all(b"aaaa").unwrap();
        bound(&dir, 10).unwrap();
        assert!(!dir.join(PREVIOUS).exists());
        f.write_all(b"bbbbbbbb").unwrap();
        bound(&dir, 10).unwrap();
        assert_eq!(std::fs::metadata(dir.join(CURRENT)).unwrap().len(), 0);
        // The writer keeps appending at the (new) end.
        f.write_all(b"cc").unwrap();
        assert_eq!(read(&dir), b"aaaabbbbbbbbcc");
        let mut out = Vec::new();
        follow(&dir, &mut out, &|| false);
        assert_eq!(out, b"aaaabbbbbbbbcc");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

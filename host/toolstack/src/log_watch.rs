//! Bounds the logs that are written, and only those.
//!
//! Checking every live VM's log every second costs a stat per guest per
//! second, and with thousands of idle guests that burst is what a start
//! colliding with it waits for. Instead, one inotify instance watches each
//! live VM's `console.log` for `IN_MODIFY`; one thread waits for events,
//! bounds the logs they name ([`super::bound`]), then sleeps a second
//! while the kernel merges the events of a flooding guest, so that a log
//! is checked at most once a second and an idle one never.
//!
//! Nothing is left unbounded when a watch cannot be had: a log whose watch
//! could not be added (`max_user_watches`) or went away is checked every
//! second (and its watch tried again); an event queue that overflowed has
//! every log checked; and without inotify at all every log is checked
//! every second, as before. A rotation truncates the file in place, so its
//! watch stays valid.

use std::collections::{HashMap, HashSet};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why events cannot be had (the daemon then checks every log).
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("inotify: {0}")]
    Inotify(std::io::Error),
    #[error("eventfd: {0}")]
    Wake(std::io::Error),
}

/// How long a checked log is left alone: the bound holds to within what
/// the guest writes in this time (its console is rate-limited).
pub const INTERVAL: Duration = Duration::from_secs(1);

/// The logs of the live VMs, by directory, and how each is followed.
pub struct LogWatch {
    /// `None`: no inotify, every log is polled.
    events: Option<Events>,
    tracked: Mutex<Tracked>,
}

struct Events {
    /// Read by the bounding thread only.
    inotify: Mutex<Inotify>,
    /// Written when a log is added, so that a waiting thread checks it.
    wake: EventFd,
}

#[derive(Default)]
struct Tracked {
    /// Adds and removes watches (`None` without inotify).
    watches: Option<Watches>,
    /// Watched logs: the directory of each watch, and the watch of each.
    dirs: HashMap<i32, PathBuf>,
    wds: HashMap<PathBuf, WatchDescriptor>,
    /// Logs without a watch: checked every round.
    polled: HashSet<PathBuf>,
    /// Logs to check once at the next round (just added: a re-adopted
    /// guest's log may have grown while no daemon ran).
    pending: HashSet<PathBuf>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LogWatch {
    /// Follows logs through inotify.
    pub fn new() -> Result<LogWatch, WatchError> {
        let inotify = Inotify::init().map_err(WatchError::Inotify)?;
        let wake = EventFd::new(EFD_NONBLOCK).map_err(WatchError::Wake)?;
        let tracked = Tracked {
            watches: Some(inotify.watches()),
            ..Tracked::default()
        };
        Ok(LogWatch {
            events: Some(Events {
                inotify: Mutex::new(inotify),
                wake,
            }),
            tracked: Mutex::new(tracked),
        })
    }

    /// Checks every log every [`INTERVAL`] (when [`LogWatch::new`] fails).
    pub fn polling() -> LogWatch {
        LogWatch {
            events: None,
            tracked: Mutex::new(Tracked::default()),
        }
    }

    /// Starts bounding the log in `dir` (a VM became live); it is checked
    /// once soon, then whenever it is written.
    pub fn watch(&self, dir: &Path) {
        let mut t = lock(&self.tracked);
        t.pending.insert(dir.to_path_buf());
        if !t.wds.contains_key(dir) && !t.add(dir) {
            t.polled.insert(dir.to_path_buf());
        }
        drop(t);
        if let Some(ev) = &self.events {
            // Cannot fail short of a counter at its maximum, which a
            // pending wake-up already is.
            let _ = ev.wake.write(1);
        }
    }

    /// Stops bounding the log in `dir` (its VM ended).
    pub fn unwatch(&self, dir: &Path) {
        let mut t = lock(&self.tracked);
        t.polled.remove(dir);
        t.pending.remove(dir);
        if let Some(wd) = t.wds.remove(dir) {
            t.dirs.remove(&wd.get_watch_descriptor_id());
            if let Some(w) = t.watches.as_mut() {
                // Fails only if the watch already went (the file was
                // deleted); its IN_IGNORED is then dropped as unknown.
                let _ = w.remove(wd);
            }
        }
    }

    /// Bounds the logs to `limit` bytes, forever: a round, then a pause.
    pub fn run(&self, limit: u64) -> ! {
        loop {
            self.round(limit, None);
            std::thread::sleep(INTERVAL);
        }
    }

    /// Waits (at most `max_wait`, `None`: as long as it takes) until a log
    /// is written or added, unless some must be checked now; then bounds
    /// each log that was written, added or is polled, once. Returns the
    /// directories checked.
    pub fn round(&self, limit: u64, max_wait: Option<Duration>) -> Vec<PathBuf> {
        let mut dirty = HashSet::new();
        let mut all = false;
        match &self.events {
            Some(ev) => {
                let urgent = {
                    let t = lock(&self.tracked);
                    !t.polled.is_empty() || !t.pending.is_empty()
                };
                let timeout = match (urgent, max_wait) {
                    (true, _) => Duration::ZERO,
                    (false, Some(d)) => d,
                    (false, None) => Duration::MAX,
                };
                if let Err(e) = ev.wait(timeout) {
                    crate::log(format_args!("waiting for log events: {e}"));
                    all = true;
                }
                match ev.drain(&mut dirty) {
                    Ok(overflow) => all |= overflow,
                    Err(e) => {
                        crate::log(format_args!("reading log events: {e}"));
                        all = true;
                    }
                }
            }
            None => all = true,
        }
        let checked: Vec<PathBuf> = {
            let mut t = lock(&self.tracked);
            let mut checked = HashSet::new();
            // A watch not known any more was removed meanwhile (and this
            // is its last event, or its IN_IGNORED).
            for wd in dirty {
                if let Some(dir) = t.dirs.get(&wd.id).cloned() {
                    if wd.gone {
                        // The file went away: polled until its VM ends.
                        t.forget(&dir);
                        t.polled.insert(dir.clone());
                    }
                    checked.insert(dir);
                }
            }
            checked.extend(t.pending.drain());
            // Each polled log gets its watch if it can be had now.
            let polled: Vec<PathBuf> = t.polled.iter().cloned().collect();
            for dir in polled {
                if t.add(&dir) {
                    t.polled.remove(&dir);
                }
                checked.insert(dir);
            }
            if all {
                checked.extend(t.wds.keys().cloned());
            }
            checked.into_iter().collect()
        };
        for dir in &checked {
            if let Err(e) = super::bound(dir, limit) {
                crate::log(format_args!("bounding the log in {}: {e}", dir.display()));
            }
        }
        checked
    }
}

impl Tracked {
    /// Adds the watch of `dir`'s log; false if it cannot be had.
    fn add(&mut self, dir: &Path) -> bool {
        let Some(w) = self.watches.as_mut() else {
            return false;
        };
        match w.add(dir.join(super::CURRENT), WatchMask::MODIFY) {
            Ok(wd) => {
                self.dirs
                    .insert(wd.get_watch_descriptor_id(), dir.to_path_buf());
                self.wds.insert(dir.to_path_buf(), wd);
                true
            }
            Err(e) => {
                if !self.polled.contains(dir) {
                    crate::log(format_args!(
                        "cannot watch the log in {} ({e}): checking it every second",
                        dir.display()
                    ));
                }
                false
            }
        }
    }

    /// Drops what is known of `dir`'s watch (it is gone).
    fn forget(&mut self, dir: &Path) {
        if let Some(wd) = self.wds.remove(dir) {
            self.dirs.remove(&wd.get_watch_descriptor_id());
        }
    }
}

/// A watch that reported: its id, and whether the watch is gone.
#[derive(PartialEq, Eq, Hash)]
struct Reported {
    id: i32,
    gone: bool,
}

impl Events {
    /// Waits until the inotify or the wake-up descriptor is readable, for
    /// at most `timeout`.
    fn wait(&self, timeout: Duration) -> std::io::Result<()> {
        let inotify_fd = lock(&self.inotify).as_raw_fd();
        let mut fds = [
            libc::pollfd {
                fd: inotify_fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = if timeout == Duration::MAX {
            -1
        } else {
            libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX)
        };
        // SAFETY: `fds` is an array of two initialised pollfd entries that
        // outlives the call; both descriptors are owned by `self`.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        if fds[1].revents & libc::POLLIN != 0 {
            // Non-blocking; resets the counter (the adds are in `pending`).
            let _ = self.wake.read();
        }
        Ok(())
    }

    /// Reads every queued event into `dirty`; true if the queue overflowed
    /// (events were lost).
    fn drain(&self, dirty: &mut HashSet<Reported>) -> std::io::Result<bool> {
        let mut inotify = lock(&self.inotify);
        let mut buf = [0u8; 4096];
        let mut overflow = false;
        loop {
            let events = match inotify.read_events(&mut buf) {
                Ok(ev) => ev,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(overflow),
                Err(e) => return Err(e),
            };
            for e in events {
                if e.mask.contains(EventMask::Q_OVERFLOW) {
                    overflow = true;
                    continue;
                }
                dirty.insert(Reported {
                    id: e.wd.get_watch_descriptor_id(),
                    gone: e.mask.contains(EventMask::IGNORED),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            let d =
                std::env::temp_dir().join(format!("wisp-logwatch-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(super::super::CURRENT), b"").unwrap();
            Dir(d)
        }

        fn append(&self, bytes: &[u8]) {
            std::fs::OpenOptions::new()
                .append(true)
                .open(self.0.join(super::super::CURRENT))
                .unwrap()
                .write_all(bytes)
                .unwrap();
        }

        fn len(&self) -> u64 {
            std::fs::metadata(self.0.join(super::super::CURRENT))
                .unwrap()
                .len()
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const SHORT: Option<Duration> = Some(Duration::from_millis(50));

    #[test]
    fn only_the_logs_written_are_checked_and_each_once_a_round() {
        let w = LogWatch::new().unwrap();
        let (busy, idle) = (Dir::new("busy"), Dir::new("idle"));
        w.watch(&busy.0);
        w.watch(&idle.0);
        // Each is checked once when added.
        let mut first = w.round(10, SHORT);
        first.sort();
        let mut both = vec![busy.0.clone(), idle.0.clone()];
        both.sort();
        assert_eq!(first, both);
        // Nothing written: nothing checked.
        assert!(w.round(10, SHORT).is_empty());
        // Many writes to one log: it alone, once, and it is bounded.
        for _ in 0..100 {
            busy.append(b"0123456789");
        }
        assert_eq!(w.round(10, SHORT), vec![busy.0.clone()]);
        assert_eq!(busy.len(), 0);
        assert!(busy.0.join(super::super::PREVIOUS).exists());
        // The truncation is a write of its own (checked once, under the
        // bound), then all is quiet again.
        assert!(w.round(10, SHORT).len() <= 1);
        assert!(w.round(10, SHORT).is_empty());
        // The watch outlives the rotation (same file).
        busy.append(b"0123456789abc");
        assert_eq!(w.round(10, SHORT), vec![busy.0.clone()]);
        assert_eq!(busy.len(), 0);
        // Once its VM ended, a log is not checked any more.
        w.unwatch(&busy.0);
        let _ = w.round(10, SHORT);
        busy.append(b"0123456789abc");
        assert!(w.round(10, SHORT).is_empty());
        assert_eq!(busy.len(), 13);
    }

    #[test]
    fn a_log_without_a_watch_is_polled_and_a_lost_queue_checks_every_log() {
        let w = LogWatch::new().unwrap();
        // No log yet: the watch cannot be added, so it is polled.
        let late = Dir::new("late");
        std::fs::remove_file(late.0.join(super::super::CURRENT)).unwrap();
        w.watch(&late.0);
        assert_eq!(w.round(10, SHORT), vec![late.0.clone()]);
        assert_eq!(w.round(10, SHORT), vec![late.0.clone()]);
        // Once the file exists the watch is had, and polling stops.
        late.append_new(b"0123456789abc");
        assert_eq!(w.round(10, SHORT), vec![late.0.clone()]);
        assert_eq!(late.len(), 0);
        let _ = w.round(10, SHORT);
        assert!(w.round(10, SHORT).is_empty());

        // Interleaved writes to two logs are not merged: past the queue's
        // size events are lost, and every watched log is checked.
        let (a, b) = (Dir::new("a"), Dir::new("b"));
        w.watch(&a.0);
        w.watch(&b.0);
        let _ = w.round(1 << 30, SHORT);
        let max: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let open = |d: &Dir| {
            std::fs::OpenOptions::new()
                .append(true)
                .open(d.0.join(super::super::CURRENT))
                .unwrap()
        };
        let (mut fa, mut fb) = (open(&a), open(&b));
        for _ in 0..max / 2 + 1 {
            fa.write_all(b"a").unwrap();
            fb.write_all(b"b").unwrap();
        }
        let mut all = w.round(1 << 30, SHORT);
        all.sort();
        let mut want = vec![late.0.clone(), a.0.clone(), b.0.clone()];
        want.sort();
        assert_eq!(all, want);
    }

    #[test]
    fn without_inotify_every_log_is_checked_every_round() {
        let w = LogWatch::polling();
        let d = Dir::new("poll");
        w.watch(&d.0);
        assert_eq!(w.round(10, None), vec![d.0.clone()]);
        d.append(b"0123456789abc");
        assert_eq!(w.round(10, None), vec![d.0.clone()]);
        assert_eq!(d.len(), 0);
        w.unwatch(&d.0);
        assert!(w.round(10, None).is_empty());
    }

    impl Dir {
        fn append_new(&self, bytes: &[u8]) {
            std::fs::write(self.0.join(super::super::CURRENT), bytes).unwrap();
        }
    }
}

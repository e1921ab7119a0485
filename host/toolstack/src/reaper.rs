//! One thread that learns of every monitor process's end.
//!
//! A thread per VM waiting on its monitor costs, for thousands of idle
//! guests, thousands of threads (a stack, a kernel stack and a task each,
//! ~30-40 KiB, and a pid). Instead one thread waits in `epoll` on the
//! monitors' pidfds (readable when the process ends) and runs each one's
//! end handler, reaping the process first when the daemon is its parent.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::process::{Child, ExitStatus};
use std::sync::{Arc, Mutex};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

type OnExit = Box<dyn FnOnce(Option<ExitStatus>) + Send>;

struct Watch {
    /// Kept open while watched (its number is the epoll key).
    _pidfd: Arc<OwnedFd>,
    /// The process, when the daemon started it: reaped at its end.
    child: Option<Child>,
    on_exit: OnExit,
}

pub struct Reaper {
    epoll: Epoll,
    watches: Mutex<HashMap<RawFd, Watch>>,
}

impl Reaper {
    /// Creates the reaper and starts its thread.
    pub fn start() -> std::io::Result<Arc<Reaper>> {
        let r = Arc::new(Reaper {
            epoll: Epoll::new()?,
            watches: Mutex::new(HashMap::new()),
        });
        let r2 = r.clone();
        std::thread::Builder::new()
            .name("wisp-reaper".into())
            .spawn(move || r2.run())?;
        Ok(r)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RawFd, Watch>> {
        self.watches.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `on_exit` (on the reaper's thread) once the process behind
    /// `pidfd` has ended, with its status if `child` (the daemon's own
    /// child) is given. A process that has ended already is reported at
    /// once.
    pub fn watch(
        &self,
        pidfd: Arc<OwnedFd>,
        child: Option<Child>,
        on_exit: impl FnOnce(Option<ExitStatus>) + Send + 'static,
    ) -> std::io::Result<()> {
        let key = pidfd.as_raw_fd();
        let mut g = self.lock();
        self.epoll.ctl(
            ControlOperation::Add,
            key,
            EpollEvent::new(EventSet::IN, key as u64),
        )?;
        g.insert(
            key,
            Watch {
                _pidfd: pidfd,
                child,
                on_exit: Box::new(on_exit),
            },
        );
        Ok(())
    }

    fn run(&self) {
        let mut events = [EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    crate::log(format_args!("reaper: {e}"));
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                }
            };
            for ev in &events[..n] {
                let key = ev.data() as RawFd;
                let w = {
                    let mut g = self.lock();
                    // The fd is still open (the watch holds it).
                    let _ = self
                        .epoll
                        .ctl(ControlOperation::Delete, key, EpollEvent::default());
                    g.remove(&key)
                };
                if let Some(mut w) = w {
                    let status = w.child.as_mut().and_then(|c| c.wait().ok());
                    (w.on_exit)(status);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_end_is_reported_once_with_its_status() {
        let r = Reaper::start().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut kids = vec![];
        for code in 0..5 {
            let child = std::process::Command::new("sh")
                .args(["-c", &format!("sleep 0.1; exit {code}")])
                .spawn()
                .unwrap();
            let fd = Arc::new(crate::process::pidfd(child.id()).unwrap());
            kids.push(child.id());
            let tx = tx.clone();
            r.watch(fd, Some(child), move |st| {
                let _ = tx.send(st.and_then(|s| s.code()));
            })
            .unwrap();
        }
        // One that has ended before it is watched, not reaped by us.
        let mut done = std::process::Command::new("true").spawn().unwrap();
        let fd = Arc::new(crate::process::pidfd(done.id()).unwrap());
        done.wait().unwrap();
        let tx2 = tx.clone();
        r.watch(fd, None, move |st| {
            let _ = tx2.send(st.map(|_| -1).or(Some(99)));
        })
        .unwrap();
        let mut got: Vec<i32> = (0..6)
            .map(|_| {
                rx.recv_timeout(std::time::Duration::from_secs(10))
                    .unwrap()
                    .unwrap()
            })
            .collect();
        got.sort_unstable();
        assert_eq!(got, [0, 1, 2, 3, 4, 99]);
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(200))
            .is_err());
        assert!(r.lock().is_empty());
    }
}

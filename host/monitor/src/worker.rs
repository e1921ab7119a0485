//! A thread started ahead of its work, already under its seccomp filter.
//!
//! Starting a thread (~40 µs here) and installing its filter (two BPF
//! programs, ~120-160 µs on this host) cost as much as the rest of a warm
//! start. A pooled shell does both while it waits for a guest: the vCPU
//! thread exists, filtered, blocked on a channel, and [`crate::Vm::start_on`]
//! hands it the guest's run loop.

use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use crate::seccomp::{self, SeccompError, ThreadKind};

type Job = Box<dyn FnOnce() + Send>;

/// A started thread waiting for one job.
#[derive(Debug)]
pub struct Worker {
    jobs: Mutex<Option<SyncSender<Job>>>,
    filter: ThreadKind,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("starting a thread: {0}")]
    Spawn(std::io::Error),
    #[error("{0}")]
    Filter(#[from] SeccompError),
    #[error("the thread ended before it was ready")]
    Gone,
}

impl Worker {
    /// Starts a thread named `name` and installs the filter for `filter`
    /// on it; returns once it waits for its job.
    pub fn spawn(name: &str, filter: ThreadKind) -> Result<Arc<Worker>, WorkerError> {
        Worker::spawn_with(name, filter, || {})
    }

    /// As [`Worker::spawn`], and runs `first` on the thread, under its
    /// filter, before it says it is ready: work that must happen on the
    /// thread that will do the job, done ahead of it.
    pub fn spawn_with(
        name: &str,
        filter: ThreadKind,
        first: impl FnOnce() + Send + 'static,
    ) -> Result<Arc<Worker>, WorkerError> {
        let prog = seccomp::program(filter)?;
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Job>(1);
        let (ready_tx, ready) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let r = seccomp::apply(&prog);
                let ok = r.is_ok();
                if ok {
                    first();
                }
                let _ = ready_tx.send(r);
                if ok {
                    wait_for_job(rx);
                }
            })
            .map_err(WorkerError::Spawn)?;
        ready.recv().map_err(|_| WorkerError::Gone)??;
        Ok(Arc::new(Worker {
            jobs: Mutex::new(Some(jobs)),
            filter,
        }))
    }

    /// The filter the thread runs under.
    pub fn filter(&self) -> ThreadKind {
        self.filter
    }

    /// Runs `job` on the thread; gives it back if the thread was used
    /// already or has ended.
    pub(crate) fn run(&self, job: Job) -> Result<(), Job> {
        let tx = self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take();
        match tx {
            Some(tx) => tx.send(job).map_err(|e| e.0),
            None => Err(job),
        }
    }
}

/// Starts a thread's work on a worker when there is one, else on a new
/// thread from the builder.
pub trait SpawnOn {
    fn spawn_on<F: FnOnce() + Send + 'static>(
        self,
        worker: Option<Arc<Worker>>,
        f: F,
    ) -> std::io::Result<Option<std::thread::JoinHandle<()>>>;
}

impl SpawnOn for std::thread::Builder {
    fn spawn_on<F: FnOnce() + Send + 'static>(
        self,
        worker: Option<Arc<Worker>>,
        f: F,
    ) -> std::io::Result<Option<std::thread::JoinHandle<()>>> {
        let job: Job = Box::new(f);
        let job = match worker {
            Some(w) => match w.run(job) {
                Ok(()) => return Ok(None),
                Err(job) => job,
            },
            None => job,
        };
        self.spawn(job).map(Some)
    }
}

fn wait_for_job(rx: Receiver<Job>) {
    // A closed channel (the worker was dropped unused) ends the thread.
    if let Ok(job) = rx.recv() {
        job()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_runs_one_job_under_its_filter() {
        let w = Worker::spawn("wisp-test", ThreadKind::Vcpu).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let job: Job = Box::new(move || {
            // The filter is on: opening a file is refused with EACCES.
            let open = std::fs::File::open("/proc/self/status");
            let _ = tx.send(open.err().and_then(|e| e.raw_os_error()));
        });
        assert!(w.run(job).is_ok());
        assert_eq!(rx.recv().unwrap(), Some(libc::EACCES));
        // Only one job per worker.
        assert!(w.run(Box::new(|| {})).is_err());
    }
}

//! The threads that serve the API socket.
//!
//! A thread made per connection cost each request a `clone`, a stack
//! mapping and the new thread's start-up (~0.1 ms here) before its first
//! byte was read. Instead, threads wait in `accept` on the listener (the
//! kernel wakes one per connection) and serve what they accept; the pool
//! grows when the last idle one takes a connection (that request then
//! pays for the new thread: only when every waiting thread is busy), so
//! that long requests (`logs -f`, a stop that waits, 200 concurrent runs)
//! never hold up the others, and shrinks back to [`MAX_IDLE`] waiting
//! threads.

use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use wisp_monitor::control::monotonic_ns;

/// Threads kept waiting for a connection.
pub const MAX_IDLE: usize = 4;

/// What a connection is handed to, with the time it was accepted (start
/// latency counts from there).
pub type Handler = dyn Fn(UnixStream, u64) + Send + Sync;

struct Shared {
    listener: UnixListener,
    handler: Box<Handler>,
    /// Threads waiting in `accept`.
    idle: AtomicUsize,
}

/// Serves `listener` with `handler` on a pool of threads; returns once the
/// first of them is started (they run until the process ends).
pub fn serve(listener: UnixListener, handler: Box<Handler>) -> std::io::Result<()> {
    let shared = Arc::new(Shared {
        listener,
        handler,
        idle: AtomicUsize::new(0),
    });
    start(&shared)?;
    // A second is welcome, not required.
    if let Err(e) = start(&shared) {
        crate::log(format_args!("cannot start an API thread: {e}"));
    }
    Ok(())
}

fn start(shared: &Arc<Shared>) -> std::io::Result<()> {
    let s = shared.clone();
    s.idle.fetch_add(1, Ordering::SeqCst);
    let spawned = std::thread::Builder::new()
        .name("wisp-api".into())
        .stack_size(256 << 10)
        .spawn(move || run(s));
    if spawned.is_err() {
        shared.idle.fetch_sub(1, Ordering::SeqCst);
    }
    spawned.map(drop)
}

fn run(shared: Arc<Shared>) {
    loop {
        let conn = match shared.listener.accept() {
            Ok((c, _)) => c,
            Err(e) => {
                crate::log(format_args!("accept: {e}"));
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let arrived = monotonic_ns();
        // The last idle thread took this one: another waits for the next.
        if shared.idle.fetch_sub(1, Ordering::SeqCst) == 1 {
            if let Err(e) = start(&shared) {
                crate::log(format_args!("cannot start an API thread: {e}"));
            }
        }
        (shared.handler)(conn, arrived);
        // Back to waiting, unless enough threads wait already. Counted
        // with a compare-and-swap: the count never exceeds the threads
        // really waiting, so a taker that sees 1 is really the last.
        let mut n = shared.idle.load(Ordering::SeqCst);
        loop {
            if n >= MAX_IDLE {
                return;
            }
            match shared
                .idle
                .compare_exchange(n, n + 1, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => break,
                Err(now) => n = now,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::mpsc;

    /// Connections held open by their handler do not hold up new ones,
    /// and the threads left waiting afterwards are at most [`MAX_IDLE`].
    #[test]
    fn held_connections_do_not_block_others_and_idle_threads_are_bounded() {
        let dir = std::env::temp_dir().join(format!("wisp-acceptors-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let listener = UnixListener::bind(&path).unwrap();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = std::sync::Mutex::new(release_rx);
        let served = Arc::new(AtomicUsize::new(0));
        let s2 = served.clone();
        serve(
            listener,
            Box::new(move |mut c: UnixStream, arrived: u64| {
                assert!(arrived > 0);
                let mut b = [0u8; 1];
                c.read_exact(&mut b).unwrap();
                if b[0] == b'h' {
                    // Held until released.
                    let _ = release_rx.lock().unwrap().recv();
                }
                s2.fetch_add(1, Ordering::SeqCst);
                c.write_all(b"k").unwrap();
            }),
        )
        .unwrap();
        // This module's threads only (other tests run beside this one).
        let count = || {
            std::fs::read_dir("/proc/self/task")
                .unwrap()
                .flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.trim() == "wisp-api")
                })
                .count()
        };
        let start = std::time::Instant::now();
        while count() < 2 && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(count(), 2, "two threads wait at first");
        // Ten held connections, then a quick one that must still be served.
        let held: Vec<UnixStream> = (0..10)
            .map(|_| {
                let mut c = UnixStream::connect(&path).unwrap();
                c.write_all(b"h").unwrap();
                c
            })
            .collect();
        let mut quick = UnixStream::connect(&path).unwrap();
        quick
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        quick.write_all(b"q").unwrap();
        let mut b = [0u8; 1];
        quick
            .read_exact(&mut b)
            .expect("a quick request is served while ten are held");
        assert_eq!(&b, b"k");
        for _ in 0..10 {
            release_tx.send(()).unwrap();
        }
        for mut c in held {
            c.read_exact(&mut b).unwrap();
        }
        assert_eq!(served.load(Ordering::SeqCst), 11);
        // Threads beyond MAX_IDLE end once their connection is served.
        let start = std::time::Instant::now();
        while count() > MAX_IDLE && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(count() <= MAX_IDLE, "{} threads", count());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! kv: a key-value server unikernel speaking the Redis protocol (RESP).
//!
//! Redis 7.0's string commands (GET, SET with all its options, SETNX,
//! SETEX, PSETEX, GETSET, GETDEL, GETEX, MGET, MSET, MSETNX, APPEND,
//! STRLEN, INCR, DECR, INCRBY, DECRBY, INCRBYFLOAT, GETRANGE, SETRANGE),
//! key-space commands (DEL, UNLINK, EXISTS, TOUCH, TYPE, RENAME, RENAMENX,
//! KEYS, SCAN, DBSIZE, FLUSHALL, FLUSHDB, EXPIRE/PEXPIRE/EXPIREAT/PEXPIREAT
//! with NX/XX/GT/LT, PERSIST, TTL, PTTL, EXPIRETIME, PEXPIRETIME), and PING,
//! ECHO, SELECT 0, QUIT, TIME, CLIENT, CONFIG and COMMAND, which describe
//! this server. The logic lives in `kv-core` (tested on the host); this
//! crate adds the network, the disk and the timers.
//!
//! With a disk (`--disk data.img`, a zero-filled file the first time), every
//! write is appended to a log on it and replayed at boot, so keys survive
//! restarts and a killed monitor; `--appendfsync always|everysec|no` (or
//! `CONFIG SET appendfsync`) says when the log is flushed to stable storage
//! (see `kv_core::aof`). Arguments: `[PORT] [--appendfsync POLICY]`.
//!
//! Asked to stop (`wisp stop`, SIGTERM to `wisp run`), kv flushes its log
//! whatever the policy, as Redis does on SIGTERM, and exits with status 0
//! (1 if the flush failed).
//!
//! `wisp run -p 6379:6379 --disk data.img kv.wisp`, then
//! `redis-cli -p 6379 SET k v && redis-cli -p 6379 GET k`.
#![no_std]
#![no_main]

extern crate alloc;

mod disk;
mod wake;

use alloc::format;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cell::RefCell;
use core::time::Duration;

use disk::BlkDevice;
use kv_core::aof::Aof;
use kv_core::engine::{ClientId, Config, Engine, Flow, Fsync};
use kv_core::resp;
use wake::Notify;
use wisp_net::{TcpListener, TcpStream};

wisp::main!(main);

/// Wall-clock Unix milliseconds: key deadlines.
fn now_ms() -> u64 {
    wisp::time::unix_time().as_millis() as u64
}

/// Monotonic milliseconds: flush timing.
fn mono_ms() -> u64 {
    wisp::time::monotonic_ns() / 1_000_000
}

/// Most bytes of one unfinished command a connection may buffer.
const MAX_QUERY: usize = 2 * resp::MAX_BULK + resp::MAX_INLINE;

struct Server {
    engine: Engine,
    aof: Option<Aof<BlkDevice>>,
}

impl Server {
    /// Writes log records to the disk (flushing as the policy says).
    /// While that fails, the engine refuses writes.
    fn persist(&mut self, log: &[u8]) -> Result<(), String> {
        let Some(aof) = self.aof.as_mut() else {
            return Ok(());
        };
        aof.set_policy(self.engine.config().appendfsync);
        match aof.append(log, mono_ms()) {
            Ok(()) => {
                if !log.is_empty() {
                    self.engine.set_write_error(None);
                }
                Ok(())
            }
            Err(e) => {
                let e = e.to_string();
                self.engine.set_write_error(Some(e.clone()));
                Err(e)
            }
        }
    }
}

fn parse_args(args: wisp::Args) -> Result<(u16, Fsync), String> {
    let mut port = 6379u16;
    let mut policy = Fsync::Always;
    let mut it = args;
    while let Some(a) = it.next() {
        match a {
            "--appendfsync" => {
                let v = it.next().unwrap_or("");
                policy = Fsync::parse(v.as_bytes()).ok_or_else(|| {
                    format!("--appendfsync takes always, everysec or no, not {v:?}")
                })?;
            }
            p => {
                port = p.parse().map_err(|_| {
                    format!(
                        "unknown argument '{p}' (usage: [PORT] [--appendfsync always|everysec|no])"
                    )
                })?
            }
        }
    }
    Ok((port, policy))
}

fn main(args: wisp::Args) -> i32 {
    let (port, policy) = match parse_args(args) {
        Ok(a) => a,
        Err(e) => {
            wisp::println!("kv: {e}");
            return 2;
        }
    };
    let disk = match wisp_blk::Disk::open() {
        Ok(d) => Some(d),
        Err(wisp_blk::BlkError::NoDevice) => {
            wisp::println!("kv: no disk: data is kept in memory only");
            None
        }
        Err(e) => {
            wisp::println!("kv: disk: {e}");
            return 1;
        }
    };
    let mut engine = Engine::new(Config {
        appendfsync: policy,
        appendonly: disk.is_some(),
        port,
    });
    let mut aof = None;
    if let Some(disk) = disk {
        let (mut records, mut failed) = (0u64, 0u64);
        let opened = Aof::open(BlkDevice(disk), policy, mono_ms(), |args| {
            records += 1;
            if engine.replay(&args).is_err() {
                failed += 1;
            }
        });
        match opened {
            Ok(a) => {
                wisp::println!(
                    "kv: replayed {records} commands ({} bytes of log, appendfsync {})",
                    a.len(),
                    policy.name()
                );
                if failed > 0 {
                    wisp::println!("kv: {failed} log records failed to replay");
                }
                aof = Some(a);
            }
            Err(e) => {
                wisp::println!("kv: disk: {e}");
                return 1;
            }
        }
    }
    let server = Rc::new(RefCell::new(Server { engine, aof }));
    let notify = Rc::new(Notify::default());

    wisp::exec::block_on(async move {
        let listener = match TcpListener::bind(port) {
            Ok(l) => l,
            Err(e) => {
                wisp::println!("kv: cannot listen on port {port}: {e}");
                return 1;
            }
        };
        wisp::println!("kv: listening on port {port}");
        wisp::exec::spawn(housekeeping(server.clone(), notify.clone()));
        let stop = wisp::shutdown::requested();
        wisp::exec::spawn(accept_loop(listener, port, server.clone(), notify));
        stop.await;
        shut_down(&server)
    })
}

/// Accepts clients and serves each on its own task.
async fn accept_loop(
    mut listener: TcpListener,
    port: u16,
    server: Rc<RefCell<Server>>,
    notify: Rc<Notify>,
) {
    loop {
        if let Ok(stream) = listener.accept().await {
            let addr = stream
                .remote_endpoint()
                .map(|e| e.to_string())
                .unwrap_or_default();
            let laddr = match wisp_net::stack::config() {
                Some(c) => format!("{}:{port}", c.address),
                None => format!("0.0.0.0:{port}"),
            };
            let id = server.borrow_mut().engine.connect(addr, laddr, now_ms());
            wisp::exec::spawn(serve(stream, id, server.clone(), notify.clone()));
        }
    }
}

/// The guest was asked to stop: every record is already on the disk (each
/// batch is appended before its replies, with no await in between, so no
/// batch is half done here); flush them to stable storage and end.
fn shut_down(server: &RefCell<Server>) -> i32 {
    let mut s = server.borrow_mut();
    let Some(aof) = s.aof.as_mut() else {
        wisp::println!("kv: stopping (no disk)");
        return 0;
    };
    match aof.flush(mono_ms()) {
        Ok(()) => {
            wisp::println!("kv: stopping: log flushed ({} bytes)", aof.len());
            0
        }
        Err(e) => {
            wisp::println!("kv: stopping: log flush failed: {e}");
            1
        }
    }
}

/// Flushes the log when `everysec` says so and removes keys when they
/// expire (logging their deletion), sleeping in between; woken early when
/// a client changes data.
async fn housekeeping(server: Rc<RefCell<Server>>, notify: Rc<Notify>) {
    loop {
        let delay = {
            let s = server.borrow();
            let flush = s
                .aof
                .as_ref()
                .and_then(|a| a.flush_due())
                .map(|t| t.saturating_sub(mono_ms()));
            let expire = s.engine.next_expiry().map(|t| t.saturating_sub(now_ms()));
            match (flush, expire) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        };
        notify
            .wait(delay.map(|ms| wisp::exec::sleep(Duration::from_millis(ms))))
            .await;
        // Let replies written just now leave before a flush holds the vCPU.
        wake::yield_now().await;
        let mut s = server.borrow_mut();
        let s = &mut *s;
        let mut log = Vec::new();
        s.engine.expire(now_ms(), &mut log);
        if !log.is_empty() {
            let _ = s.persist(&log);
        }
        if let Some(aof) = s.aof.as_mut() {
            aof.set_policy(s.engine.config().appendfsync);
            if aof.flush_due().is_some_and(|t| t <= mono_ms()) {
                if let Err(e) = aof.flush(mono_ms()) {
                    s.engine.set_write_error(Some(e.to_string()));
                }
            }
        }
    }
}

async fn serve(
    mut stream: TcpStream,
    id: ClientId,
    server: Rc<RefCell<Server>>,
    notify: Rc<Notify>,
) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = alloc::vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        let (mut out, mut log) = (Vec::new(), Vec::new());
        let mut close = false;
        let mut consumed = 0;
        {
            let mut s = server.borrow_mut();
            loop {
                match resp::parse(&buf[consumed..]) {
                    Ok((args, used)) => {
                        consumed += used;
                        if s.engine.execute(id, &args, now_ms(), &mut out, &mut log) == Flow::Close
                        {
                            close = true;
                            break;
                        }
                    }
                    Err(resp::Error::Incomplete) => break,
                    Err(resp::Error::Protocol(msg)) => {
                        resp::err(&mut out, &msg);
                        close = true;
                        break;
                    }
                }
            }
            // On the device (and, with `always`, flushed) before any reply.
            if let Err(e) = s.persist(&log) {
                out.clear();
                resp::err(&mut out, &format!("persistence failed: {e}"));
                close = true;
            }
        }
        if !log.is_empty() {
            notify.notify();
        }
        buf.drain(..consumed);
        if buf.len() > MAX_QUERY {
            break;
        }
        if (!out.is_empty() && stream.write_all(&out).await.is_err()) || close {
            break;
        }
    }
    server.borrow_mut().engine.disconnect(id);
}

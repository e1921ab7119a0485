//! kv: a key-value server unikernel speaking the Redis protocol (RESP).
//!
//! Commands: PING, ECHO, GET, SET (EX/PX/EXAT/PXAT/NX/XX/KEEPTTL), DEL,
//! EXISTS, INCR, DECR, INCRBY, DECRBY, MGET, MSET, KEYS, DBSIZE, FLUSHALL,
//! FLUSHDB, EXPIRE, PEXPIRE, PEXPIREAT, PERSIST, TTL, PTTL, plus the
//! CONFIG GET / COMMAND / CLIENT / SELECT 0 / QUIT replies clients send on
//! connect. Unknown commands get a RESP error, never a crash; malformed
//! input gets an error and the connection is closed.
//!
//! With a disk (`--disk data.img`, a zero-filled file the first time), every
//! write is appended to a log on it and replayed at boot (see [`aof`] for
//! the format and the fsync policy), so keys survive restarts and a killed
//! monitor. Arguments: `[PORT] [--appendfsync always|everysec|no]`.
//!
//! `wisp run -p 6379:6379 --disk data.img kv.wisp`, then
//! `redis-cli -p 6379 SET k v && redis-cli -p 6379 GET k`.
#![no_std]
#![no_main]

extern crate alloc;

mod aof;
mod resp;
mod store;

use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;

use aof::{Aof, Fsync};
use store::Store;
use wisp_net::{TcpListener, TcpStream};

wisp::main!(main);

fn now_ms() -> u64 {
    wisp::time::unix_time().as_millis() as u64
}

struct Server {
    store: Store,
    aof: Option<Aof>,
}

fn parse_i64(b: &[u8]) -> Option<i64> {
    core::str::from_utf8(b).ok()?.parse().ok()
}

fn upper(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_ascii_uppercase()
}

impl Server {
    /// Executes one command, appending its reply to `out` and, if it
    /// changed the data, its log record to `log`.
    fn execute(&mut self, args: &[Vec<u8>], out: &mut Vec<u8>, log: &mut Vec<u8>) {
        let now = now_ms();
        let Some(name) = args.first() else {
            return resp::error(out, "ERR empty command");
        };
        let cmd = upper(name);
        let argc = args.len();
        let wrong = |out: &mut Vec<u8>| {
            resp::error(
                out,
                &alloc::format!(
                    "ERR wrong number of arguments for '{}' command",
                    cmd.to_ascii_lowercase()
                ),
            )
        };
        let a = |i: usize| args[i].as_slice();
        match cmd.as_str() {
            "PING" => match argc {
                1 => resp::simple(out, "PONG"),
                2 => resp::bulk(out, Some(a(1))),
                _ => wrong(out),
            },
            "ECHO" if argc == 2 => resp::bulk(out, Some(a(1))),
            "GET" if argc == 2 => {
                let v = self.store.get(a(1), now).map(|e| e.value.clone());
                resp::bulk(out, v.as_deref());
            }
            "SET" if argc >= 3 => self.set(args, now, out, log),
            "DEL" if argc >= 2 => {
                let n = args[1..]
                    .iter()
                    .filter(|k| self.store.remove(k, now))
                    .count();
                if n > 0 {
                    resp::encode_command(log, &args.iter().map(Vec::as_slice).collect::<Vec<_>>());
                }
                resp::integer(out, n as i64);
            }
            "EXISTS" if argc >= 2 => {
                let n = args[1..]
                    .iter()
                    .filter(|k| self.store.get(k, now).is_some())
                    .count();
                resp::integer(out, n as i64);
            }
            "INCR" | "DECR" | "INCRBY" | "DECRBY" => {
                let by = match (cmd.as_str(), argc) {
                    ("INCR", 2) => Some(1),
                    ("DECR", 2) => Some(-1),
                    ("INCRBY", 3) => parse_i64(a(2)),
                    ("DECRBY", 3) => parse_i64(a(2)).and_then(|v| v.checked_neg()),
                    _ => return wrong(out),
                };
                let Some(by) = by else {
                    return resp::error(out, "ERR value is not an integer or out of range");
                };
                let (cur, exp) = match self.store.get(a(1), now) {
                    Some(e) => match parse_i64(&e.value) {
                        Some(v) => (v, e.expires_at),
                        None => {
                            return resp::error(out, "ERR value is not an integer or out of range")
                        }
                    },
                    None => (0, None),
                };
                let Some(new) = cur.checked_add(by) else {
                    return resp::error(out, "ERR increment or decrement would overflow");
                };
                let value = alloc::format!("{new}").into_bytes();
                self.store.set(args[1].clone(), value.clone(), exp);
                resp::encode_command(log, &[b"SET", a(1), &value, b"KEEPTTL"]);
                resp::integer(out, new);
            }
            "MGET" if argc >= 2 => {
                resp::array_header(out, argc - 1);
                for k in &args[1..] {
                    let v = self.store.get(k, now).map(|e| e.value.clone());
                    resp::bulk(out, v.as_deref());
                }
            }
            "MSET" if argc >= 3 && argc % 2 == 1 => {
                for kv in args[1..].chunks(2) {
                    self.store.set(kv[0].clone(), kv[1].clone(), None);
                }
                resp::encode_command(log, &args.iter().map(Vec::as_slice).collect::<Vec<_>>());
                resp::simple(out, "OK");
            }
            "KEYS" if argc == 2 => {
                let keys = self.store.keys(a(1), now);
                resp::array_header(out, keys.len());
                for k in &keys {
                    resp::bulk(out, Some(k));
                }
            }
            "DBSIZE" if argc == 1 => resp::integer(out, self.store.sweep(now) as i64),
            "FLUSHALL" | "FLUSHDB" => {
                self.store.clear();
                resp::encode_command(log, &[b"FLUSHALL"]);
                resp::simple(out, "OK");
            }
            "EXPIRE" | "PEXPIRE" | "PEXPIREAT" if argc == 3 => {
                let Some(n) = parse_i64(a(2)) else {
                    return resp::error(out, "ERR value is not an integer or out of range");
                };
                let at = match cmd.as_str() {
                    "EXPIRE" => n
                        .checked_mul(1000)
                        .and_then(|ms| (now as i64).checked_add(ms)),
                    "PEXPIRE" => (now as i64).checked_add(n),
                    _ => Some(n),
                };
                let Some(at) = at else {
                    return resp::error(out, "ERR invalid expire time");
                };
                if at <= now as i64 {
                    // Expiring in the past deletes the key.
                    let n = self.store.remove(a(1), now);
                    if n {
                        resp::encode_command(log, &[b"DEL", a(1)]);
                    }
                    return resp::integer(out, n as i64);
                }
                let ok = self.store.set_expiry(a(1), Some(at as u64), now);
                if ok {
                    resp::encode_command(
                        log,
                        &[b"PEXPIREAT", a(1), alloc::format!("{at}").as_bytes()],
                    );
                }
                resp::integer(out, ok as i64);
            }
            "PERSIST" if argc == 2 => {
                let had = self
                    .store
                    .get(a(1), now)
                    .is_some_and(|e| e.expires_at.is_some());
                if had {
                    self.store.set_expiry(a(1), None, now);
                    resp::encode_command(log, &[b"PERSIST", a(1)]);
                }
                resp::integer(out, had as i64);
            }
            "TTL" | "PTTL" if argc == 2 => {
                let v = match self.store.get(a(1), now) {
                    None => -2,
                    Some(e) => match e.expires_at {
                        None => -1,
                        Some(at) if cmd == "TTL" => (at - now).div_ceil(1000) as i64,
                        Some(at) => (at - now) as i64,
                    },
                };
                resp::integer(out, v);
            }
            // What clients and tools send on connect.
            "CONFIG" if argc >= 3 && upper(a(1)) == "GET" => {
                resp::array_header(out, 2);
                resp::bulk(out, Some(a(2)));
                resp::bulk(out, Some(b""));
            }
            "COMMAND" | "CLIENT" => resp::array_header(out, 0),
            "SELECT" if argc == 2 && a(1) == b"0" => resp::simple(out, "OK"),
            "QUIT" => resp::simple(out, "OK"),
            "ECHO" | "GET" | "SET" | "DEL" | "EXISTS" | "MGET" | "MSET" | "KEYS" | "DBSIZE"
            | "EXPIRE" | "PEXPIRE" | "PEXPIREAT" | "PERSIST" | "TTL" | "PTTL" | "SELECT" => {
                wrong(out)
            }
            _ => {
                let shown: String = String::from_utf8_lossy(name).chars().take(64).collect();
                resp::error(out, &alloc::format!("ERR unknown command '{shown}'"))
            }
        }
    }

    fn set(&mut self, args: &[Vec<u8>], now: u64, out: &mut Vec<u8>, log: &mut Vec<u8>) {
        let (mut at, mut nx, mut xx, mut keep) = (None, false, false, false);
        let mut i = 3;
        while i < args.len() {
            let opt = upper(&args[i]);
            let arg = args.get(i + 1).and_then(|v| parse_i64(v));
            let ms = match opt.as_str() {
                "NX" => {
                    nx = true;
                    i += 1;
                    continue;
                }
                "XX" => {
                    xx = true;
                    i += 1;
                    continue;
                }
                "KEEPTTL" => {
                    keep = true;
                    i += 1;
                    continue;
                }
                "EX" => arg
                    .and_then(|s| s.checked_mul(1000))
                    .and_then(|ms| (now as i64).checked_add(ms)),
                "PX" => arg.and_then(|ms| (now as i64).checked_add(ms)),
                "EXAT" => arg.and_then(|s| s.checked_mul(1000)),
                "PXAT" => arg,
                _ => return resp::error(out, "ERR syntax error"),
            };
            match ms {
                Some(ms) if ms > 0 && arg.is_some_and(|v| v > 0) => at = Some(ms as u64),
                _ => return resp::error(out, "ERR invalid expire time in 'set' command"),
            }
            i += 2;
        }
        if (nx && xx) || (keep && at.is_some()) {
            return resp::error(out, "ERR syntax error");
        }
        let existing = self.store.get(&args[1], now).map(|e| e.expires_at);
        if (nx && existing.is_some()) || (xx && existing.is_none()) {
            return resp::bulk(out, None);
        }
        let expires = if keep { existing.flatten() } else { at };
        self.store.set(args[1].clone(), args[2].clone(), expires);
        match expires {
            Some(t) => resp::encode_command(
                log,
                &[
                    b"SET",
                    &args[1],
                    &args[2],
                    b"PXAT",
                    alloc::format!("{t}").as_bytes(),
                ],
            ),
            None => resp::encode_command(log, &[b"SET", &args[1], &args[2]]),
        }
        resp::simple(out, "OK");
    }
}

fn main(args: wisp::Args) -> i32 {
    let mut port = 6379u16;
    let mut policy = Fsync::Always;
    let mut it = args;
    while let Some(a) = it.next() {
        match a {
            "--appendfsync" => {
                policy = match it.next() {
                    Some("always") => Fsync::Always,
                    Some("everysec") => Fsync::EverySec,
                    Some("no") => Fsync::No,
                    other => {
                        wisp::println!(
                            "kv: --appendfsync takes always, everysec or no, not {other:?}"
                        );
                        return 2;
                    }
                }
            }
            p => match p.parse() {
                Ok(p) => port = p,
                Err(_) => {
                    wisp::println!("kv: unknown argument '{p}' (usage: [PORT] [--appendfsync always|everysec|no])");
                    return 2;
                }
            },
        }
    }

    let mut server = Server {
        store: Store::default(),
        aof: None,
    };
    match wisp_blk::Disk::open() {
        Ok(disk) => match Aof::open(disk, policy) {
            Ok((aof, commands)) => {
                let (mut out, mut log) = (Vec::new(), Vec::new());
                for c in &commands {
                    server.execute(c, &mut out, &mut log);
                    out.clear();
                    log.clear();
                }
                wisp::println!(
                    "kv: replayed {} commands ({} bytes of log)",
                    commands.len(),
                    aof.len()
                );
                server.aof = Some(aof);
            }
            Err(e) => {
                wisp::println!("kv: disk: {e}");
                return 1;
            }
        },
        Err(wisp_blk::BlkError::NoDevice) => {
            wisp::println!("kv: no disk: data is kept in memory only")
        }
        Err(e) => {
            wisp::println!("kv: disk: {e}");
            return 1;
        }
    }
    let server = Rc::new(RefCell::new(server));

    wisp::exec::block_on(async move {
        let mut listener = match TcpListener::bind(port) {
            Ok(l) => l,
            Err(e) => {
                wisp::println!("kv: cannot listen on port {port}: {e}");
                return 1;
            }
        };
        wisp::println!("kv: listening on port {port}");
        loop {
            if let Ok(stream) = listener.accept().await {
                wisp::exec::spawn(serve(stream, server.clone()));
            }
        }
    })
}

async fn serve(mut stream: TcpStream, server: Rc<RefCell<Server>>) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = alloc::vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        let (mut out, mut log) = (Vec::new(), Vec::new());
        let mut quit = false;
        let mut consumed = 0;
        {
            let mut s = server.borrow_mut();
            loop {
                match resp::parse(&buf[consumed..]) {
                    Ok((args, used)) => {
                        consumed += used;
                        if args.is_empty() {
                            continue;
                        }
                        quit = args[0].eq_ignore_ascii_case(b"QUIT");
                        s.execute(&args, &mut out, &mut log);
                        if quit {
                            break;
                        }
                    }
                    Err(resp::Error::Incomplete) => break,
                    Err(resp::Error::Protocol(why)) => {
                        resp::error(&mut out, &alloc::format!("ERR Protocol error: {why}"));
                        quit = true;
                        break;
                    }
                }
            }
            // Durable before any reply leaves (appendfsync always).
            if let Some(aof) = s.aof.as_mut() {
                if let Err(e) = aof.append(&log, now_ms()) {
                    out.clear();
                    resp::error(&mut out, &alloc::format!("ERR persistence failed: {e}"));
                    quit = true;
                }
            }
        }
        buf.drain(..consumed);
        if buf.len() > resp::MAX_BULK + 1024 {
            return;
        }
        if stream.write_all(&out).await.is_err() || quit {
            return;
        }
    }
}

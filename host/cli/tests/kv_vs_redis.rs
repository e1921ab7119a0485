//! kv side by side with redis-server (Debian's, 7.0): the same command
//! sequences go to both, one command at a time, and the replies must be
//! the same bytes, except where the comparison says otherwise:
//!
//! * `Sorted`: replies whose order Redis leaves unspecified (KEYS).
//! * `Ttl(n)`: remaining times, which depend on the clock: the same when
//!   either is -1, -2 or 0, else within n.
//! * `Kind`: only the reply type (CLIENT ID, whose numbering differs).
//!
//! Documented differences that are not compared (see examples/kv in the
//! README): kv has one database (`SELECT 1` fails), fewer commands
//! (`COMMAND COUNT`, `COMMAND DOCS` without argument lists), its own
//! `CONFIG` parameters and `CLIENT LIST` fields, SCAN cursors of its own
//! (compared here by the keys a full iteration returns), an 8 MiB string
//! limit, and `DBSIZE` counts only keys that have not expired.

mod common;
mod resp;

use common::*;
use resp::{Conn, Reply};
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// redis-server on a free port on 127.0.0.1, without persistence; killed
/// when dropped.
struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    fn start() -> RedisServer {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--dir", scratch().to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server (installed by scripts/install-deps.sh)");
        let mut s = RedisServer { child, port };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if ping(port) {
                return s;
            }
            if let Some(st) = s.child.try_wait().unwrap() {
                panic!("redis-server exited: {st}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server never answered");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// kv (in memory, `appendfsync everysec` like Redis's default) and Redis.
struct Servers {
    _kv: Guest,
    _redis: RedisServer,
    kv_port: u16,
    redis_port: u16,
}

fn servers() -> Servers {
    let kv = start_guest(
        &example("kv"),
        6379,
        &[],
        &["--appendfsync", "everysec"],
        ping,
    );
    let redis = RedisServer::start();
    Servers {
        kv_port: kv.port,
        redis_port: redis.port,
        _kv: kv,
        _redis: redis,
    }
}

#[derive(Clone, Copy, Debug)]
enum Cmp {
    Exact,
    Sorted,
    Ttl(i64),
    Kind,
}

struct Pair {
    kv: Conn,
    redis: Conn,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Replaces `@ms+N`/`@ms-N` and `@s+N`/`@s-N` with the Unix time now plus
/// or minus N (milliseconds or seconds), so both servers get the same
/// absolute deadline.
fn expand(word: &str) -> String {
    for (prefix, unit) in [("@ms", 1), ("@s", 1000)] {
        if let Some(rest) = word.strip_prefix(prefix) {
            let n: i64 = rest.parse().expect("@ms+N / @s-N");
            return ((now_ms() + n * unit) / unit).to_string();
        }
    }
    word.to_string()
}

impl Pair {
    fn new(s: &Servers) -> Pair {
        Pair {
            kv: Conn::connect(s.kv_port),
            redis: Conn::connect(s.redis_port),
        }
    }

    /// Sends one command to both; compares the replies.
    fn check(&mut self, words: &[&str], cmp: Cmp) -> Reply {
        let words: Vec<String> = words.iter().map(|w| expand(w)).collect();
        let args: Vec<&[u8]> = words.iter().map(|w| w.as_bytes()).collect();
        let (r, r_raw) = self.redis.cmd(&args);
        let (k, k_raw) = self.kv.cmd(&args);
        let same = match cmp {
            Cmp::Exact => k_raw == r_raw,
            Cmp::Sorted => k.sorted() == r.sorted(),
            Cmp::Ttl(d) => match (&k, &r) {
                (Reply::Int(a), Reply::Int(b)) if *a <= 0 || *b <= 0 => a == b,
                (Reply::Int(a), Reply::Int(b)) => (a - b).abs() <= d,
                _ => false,
            },
            Cmp::Kind => std::mem::discriminant(&k) == std::mem::discriminant(&r),
        };
        assert!(
            same,
            "{words:?} ({cmp:?}):\n  redis: {:?}\n  kv:    {:?}",
            String::from_utf8_lossy(&r_raw),
            String::from_utf8_lossy(&k_raw)
        );
        k
    }

    fn run(&mut self, script: &[(&[&str], Cmp)]) {
        self.check(&["FLUSHALL"], Cmp::Exact);
        for (words, cmp) in script {
            self.check(words, *cmp);
        }
    }
}

use Cmp::*;

#[test]
fn string_commands_match_redis() {
    let s = servers();
    let mut p = Pair::new(&s);
    p.run(&[
        (&["GET", "k"], Exact),
        (&["SET", "k", "v"], Exact),
        (&["GET", "k"], Exact),
        (&["SETNX", "k", "w"], Exact),
        (&["SETNX", "k2", "w"], Exact),
        (&["GETSET", "k", "new"], Exact),
        (&["GETSET", "nokey", "x"], Exact),
        (&["GETDEL", "k"], Exact),
        (&["GETDEL", "k"], Exact),
        (&["APPEND", "a", "hello"], Exact),
        (&["APPEND", "a", " world"], Exact),
        (&["STRLEN", "a"], Exact),
        (&["STRLEN", "missing"], Exact),
        (&["GETRANGE", "a", "0", "4"], Exact),
        (&["GETRANGE", "a", "-5", "-1"], Exact),
        (&["GETRANGE", "a", "-1", "-5"], Exact),
        (&["GETRANGE", "a", "5", "1"], Exact),
        (&["GETRANGE", "a", "0", "1000"], Exact),
        (&["GETRANGE", "a", "-1000", "2"], Exact),
        (&["GETRANGE", "missing", "0", "-1"], Exact),
        (&["GETRANGE", "a", "x", "1"], Exact),
        (&["SETRANGE", "a", "6", "WORLD"], Exact),
        (&["SETRANGE", "pad", "5", "x"], Exact),
        (&["GET", "pad"], Exact),
        (&["SETRANGE", "none", "3", ""], Exact),
        (&["EXISTS", "none"], Exact),
        (&["SETRANGE", "a", "-1", "x"], Exact),
        (&["SETRANGE", "a", "1", ""], Exact),
        (&["MSET", "m1", "1", "m2", "2"], Exact),
        (&["MSET", "m1", "1", "m2"], Exact),
        (&["MGET", "m1", "m2", "nope", "a"], Exact),
        (&["MSETNX", "m1", "x", "m3", "3"], Exact),
        (&["MSETNX", "m3", "3", "m4", "4"], Exact),
        (&["MGET", "m3", "m4"], Exact),
        (&["ECHO", "hi"], Exact),
        (&["PING"], Exact),
        (&["PING", "there"], Exact),
        (&["PING", "a", "b"], Exact),
        (&["SET", "bin", "a\r\nb\0c"], Exact),
        (&["GET", "bin"], Exact),
        (&["SET", "empty", ""], Exact),
        (&["GET", "empty"], Exact),
        (&["TYPE", "empty"], Exact),
        (&["TYPE", "nothing"], Exact),
    ]);
}

#[test]
fn set_options_match_redis() {
    let s = servers();
    let mut p = Pair::new(&s);
    p.run(&[
        (&["SET", "k", "v", "NX"], Exact),
        (&["SET", "k", "v2", "NX"], Exact),
        (&["SET", "x", "v", "XX"], Exact),
        (&["SET", "k", "v3", "XX", "GET"], Exact),
        (&["SET", "k", "v4", "NX", "GET"], Exact),
        (&["SET", "fresh", "v", "NX", "GET"], Exact),
        (&["SET", "k", "v", "NX", "XX"], Exact),
        (&["SET", "k", "v", "GET", "GET"], Exact),
        (&["SET", "k", "v", "EX", "100"], Exact),
        (&["TTL", "k"], Ttl(1)),
        (&["PTTL", "k"], Ttl(1000)),
        (&["SET", "k", "w", "KEEPTTL"], Exact),
        (&["TTL", "k"], Ttl(1)),
        (&["SET", "k", "w"], Exact),
        (&["TTL", "k"], Ttl(1)),
        (&["SET", "k", "v", "px", "100000"], Exact),
        (&["TTL", "k"], Ttl(1)),
        (&["SET", "k", "v", "EXAT", "@s+200"], Exact),
        (&["TTL", "k"], Ttl(1)),
        (&["SET", "k", "v", "PXAT", "@ms+300000"], Exact),
        (&["TTL", "k"], Ttl(1)),
        (&["SET", "k", "v", "EX", "10", "EX", "20"], Exact),
        (&["TTL", "k"], Ttl(1)),
        (&["SET", "k", "v", "EX", "10", "PX", "20"], Exact),
        (&["SET", "k", "v", "KEEPTTL", "EX", "10"], Exact),
        (&["SET", "k", "v", "EX", "10", "KEEPTTL"], Exact),
        (&["SET", "k", "v", "EX"], Exact),
        (&["SET", "k", "v", "EX", "0"], Exact),
        (&["SET", "k", "v", "EX", "-1"], Exact),
        (&["SET", "k", "v", "EX", "1.5"], Exact),
        (&["SET", "k", "v", "EX", "9223372036854775807"], Exact),
        (&["SET", "k", "v", "PX", "9223372036854775807"], Exact),
        (&["SET", "k", "v", "PXAT", "@ms-1000"], Exact),
        (&["GET", "k"], Exact),
        (&["SET", "k", "v", "PERSIST"], Exact),
        (&["SET", "k", "v", "BOGUS"], Exact),
        (&["SET", "k"], Exact),
        (&["SETEX", "se", "100", "v"], Exact),
        (&["TTL", "se"], Ttl(1)),
        (&["SETEX", "se", "0", "v"], Exact),
        (&["SETEX", "se", "x", "v"], Exact),
        (&["PSETEX", "pse", "100000", "v"], Exact),
        (&["TTL", "pse"], Ttl(1)),
        (&["PSETEX", "pse", "-5", "v"], Exact),
        (&["SETEX", "se", "100"], Exact),
    ]);
}

#[test]
fn getex_matches_redis() {
    let s = servers();
    let mut p = Pair::new(&s);
    p.run(&[
        (&["GETEX", "k"], Exact),
        (&["GETEX", "k", "EX", "nonsense"], Exact),
        (&["SET", "k", "v"], Exact),
        (&["GETEX", "k"], Exact),
        (&["GETEX", "k", "EX", "100"], Exact),
        (&["TTL", "k"], Ttl(1)),
        (&["GETEX", "k", "PERSIST"], Exact),
        (&["TTL", "k"], Ttl(1)),
        (&["GETEX", "k", "PX", "200000"], Exact),
        (&["TTL", "k"], Ttl(1)),
        (&["GETEX", "k", "EXAT", "@s+500"], Exact),
        (&["TTL", "k"], Ttl(1)),
        (&["GETEX", "k", "EX", "nonsense"], Exact),
        (&["GETEX", "k", "EX", "0"], Exact),
        (&["GETEX", "k", "EX", "1", "PX", "1"], Exact),
        (&["GETEX", "k", "PERSIST", "EX", "1"], Exact),
        (&["GETEX", "k", "KEEPTTL"], Exact),
        (&["GETEX", "k", "NX"], Exact),
        (&["GETEX", "k", "PXAT", "@ms-5000"], Exact),
        (&["EXISTS", "k"], Exact),
    ]);
}

#[test]
fn counters_match_redis() {
    let s = servers();
    let mut p = Pair::new(&s);
    p.run(&[
        (&["INCR", "n"], Exact),
        (&["INCRBY", "n", "41"], Exact),
        (&["DECR", "n"], Exact),
        (&["DECRBY", "n", "-10"], Exact),
        (&["INCRBY", "n", "x"], Exact),
        (&["INCRBY", "n", "+5"], Exact),
        (&["INCRBY", "n", " 5"], Exact),
        (&["INCRBY", "n", "05"], Exact),
        (&["SET", "z", "007"], Exact),
        (&["INCR", "z"], Exact),
        (&["SET", "z", "-0"], Exact),
        (&["INCR", "z"], Exact),
        (&["SET", "z", "abc"], Exact),
        (&["INCR", "z"], Exact),
        (&["SET", "big", "9223372036854775807"], Exact),
        (&["INCR", "big"], Exact),
        (&["DECRBY", "big", "-9223372036854775808"], Exact),
        (&["SET", "small", "-9223372036854775808"], Exact),
        (&["DECR", "small"], Exact),
        (&["INCRBY", "small", "9223372036854775807"], Exact),
        (&["SET", "t", "5", "EX", "100"], Exact),
        (&["INCR", "t"], Exact),
        (&["TTL", "t"], Ttl(1)),
        (&["INCR", "n", "extra"], Exact),
    ]);
}

#[test]
fn incrbyfloat_matches_redis_digit_for_digit() {
    let s = servers();
    let mut p = Pair::new(&s);
    p.check(&["FLUSHALL"], Exact);
    let steps = [
        "10.50",
        "0.1",
        "-5",
        "5.0e3",
        "2.0e2",
        "1e-20",
        "-0.1",
        "3.14159265358979323846",
        "1e18",
        "0.5",
        "-1e18",
        "0x1p-3",
        "1E+2",
        ".5",
        "5.",
        "+7",
        "-0",
        "123456789.987654321",
        "1e300",
        "-1e300",
        "0.000000000000000015",
        "1e-4950",
        "-1e-4950",
    ];
    p.check(&["SET", "f", "0"], Exact);
    for step in steps {
        p.check(&["INCRBYFLOAT", "f", step], Exact);
        p.check(&["INCRBYFLOAT", "fresh", step], Exact);
        p.check(&["DEL", "fresh"], Exact);
    }
    for bad in [
        "", " 1", "1 ", "abc", "nan", "inf", "-inf", "1e5000", "1e-5000", "1..2", "0x",
    ] {
        p.check(&["INCRBYFLOAT", "f", bad], Exact);
    }
    for stored in ["abc", " 1", "inf", "1e4932", "0x10", "  "] {
        p.check(&["SET", "g", stored], Exact);
        p.check(&["INCRBYFLOAT", "g", "1"], Exact);
        p.check(&["INCRBYFLOAT", "g", "1e4932"], Exact);
    }
    p.check(&["SET", "h", "1.5", "EX", "100"], Exact);
    p.check(&["INCRBYFLOAT", "h", "0.25"], Exact);
    p.check(&["TTL", "h"], Ttl(1));
}

#[test]
fn expiry_commands_match_redis() {
    let s = servers();
    let mut p = Pair::new(&s);
    p.run(&[
        (&["EXPIRE", "k", "100"], Exact),
        (&["SET", "k", "v"], Exact),
        (&["TTL", "k"], Ttl(1)),
        (&["PTTL", "k"], Ttl(1000)),
        (&["EXPIRETIME", "k"], Exact),
        (&["EXPIRE", "k", "100", "XX"], Exact),
        (&["EXPIRE", "k", "100", "GT"], Exact),
        (&["EXPIRE", "k", "100", "LT"], Exact),
        (&["TTL", "k"], Ttl(1)),
        (&["EXPIRE", "k", "50", "NX"], Exact),
        (&["EXPIRE", "k", "200", "GT"], Exact),
        (&["EXPIRE", "k", "150", "GT"], Exact),
        (&["EXPIRE", "k", "150", "LT"], Exact),
        (&["TTL", "k"], Ttl(1)),
        (&["PEXPIRE", "k", "90000", "lt", "xx"], Exact),
        (&["TTL", "k"], Ttl(1)),
        (&["EXPIRE", "k", "1", "NX", "GT"], Exact),
        (&["EXPIRE", "k", "1", "XX", "NX"], Exact),
        (&["EXPIRE", "k", "1", "GT", "LT"], Exact),
        (&["EXPIRE", "k", "1", "SOON"], Exact),
        (&["EXPIRE", "k", "x"], Exact),
        (&["EXPIRE", "k", "9223372036854775807"], Exact),
        (&["PEXPIRE", "k", "9223372036854775807"], Exact),
        (&["EXPIREAT", "k", "@s+1000"], Exact),
        (&["TTL", "k"], Ttl(1)),
        (&["PEXPIREAT", "k", "@ms+1000000"], Exact),
        (&["TTL", "k"], Ttl(1)),
        (&["PERSIST", "k"], Exact),
        (&["PERSIST", "k"], Exact),
        (&["TTL", "k"], Ttl(1)),
        (&["EXPIRETIME", "k"], Exact),
        (&["PEXPIRETIME", "nokey"], Exact),
        (&["EXPIRE", "k", "-1"], Exact),
        (&["EXISTS", "k"], Exact),
        (&["SET", "k", "v"], Exact),
        (&["EXPIREAT", "k", "@s-10"], Exact),
        (&["GET", "k"], Exact),
        (&["SET", "k", "v", "PX", "150"], Exact),
        (&["TTL", "k"], Ttl(1)),
        (&["PERSIST", "nokey"], Exact),
    ]);
    std::thread::sleep(Duration::from_millis(300));
    p.check(&["GET", "k"], Exact);
    p.check(&["TTL", "k"], Ttl(1));
    p.check(&["EXISTS", "k"], Exact);
}

#[test]
fn key_space_commands_match_redis() {
    let s = servers();
    let mut p = Pair::new(&s);
    p.run(&[
        (
            &[
                "MSET", "a", "1", "b", "2", "c", "3", "hello", "x", "hallo", "y", "h*llo", "z",
            ],
            Exact,
        ),
        (&["EXISTS", "a", "a", "b", "nope"], Exact),
        (&["TOUCH", "a", "b", "nope"], Exact),
        (&["KEYS", "*"], Sorted),
        (&["KEYS", "h?llo"], Sorted),
        (&["KEYS", "h[ae]llo"], Sorted),
        (&["KEYS", "h[^e]llo"], Sorted),
        (&["KEYS", "h\\*llo"], Sorted),
        (&["KEYS", "[a-b]"], Sorted),
        (&["KEYS", "nomatch*"], Sorted),
        (&["DBSIZE"], Exact),
        (&["DEL", "a", "b", "nope"], Exact),
        (&["DEL", "a"], Exact),
        (&["UNLINK", "c"], Exact),
        (&["SET", "src", "v", "EX", "100"], Exact),
        (&["SET", "dst", "old"], Exact),
        (&["RENAME", "src", "dst"], Exact),
        (&["GET", "dst"], Exact),
        (&["TTL", "dst"], Ttl(1)),
        (&["EXISTS", "src"], Exact),
        (&["RENAME", "src", "dst"], Exact),
        (&["RENAME", "dst", "dst"], Exact),
        (&["RENAMENX", "dst", "dst"], Exact),
        (&["RENAMENX", "missing", "x"], Exact),
        (&["SET", "other", "o"], Exact),
        (&["RENAMENX", "dst", "other"], Exact),
        (&["RENAMENX", "dst", "third"], Exact),
        (&["TTL", "third"], Ttl(1)),
        (&["TYPE", "third"], Exact),
        (&["FLUSHDB", "ASYNC"], Exact),
        (&["DBSIZE"], Exact),
        (&["FLUSHALL", "sync"], Exact),
        (&["FLUSHALL", "later"], Exact),
        (&["FLUSHALL", "sync", "x"], Exact),
        (&["SELECT", "0"], Exact),
        (&["SELECT", "x"], Exact),
        (&["SELECT", "99999999999"], Exact),
        (&["SELECT", "-1"], Exact),
    ]);
}

/// Every key a full SCAN returns (kv's cursors are its own).
fn scan_all(c: &mut Conn, extra: &[&str]) -> Vec<Vec<u8>> {
    let mut cursor = "0".to_string();
    let mut keys = Vec::new();
    for _ in 0..10_000 {
        let mut args = vec!["SCAN", cursor.as_str()];
        args.extend_from_slice(extra);
        let Reply::Array(Some(items)) = c.call(&args) else {
            panic!("SCAN {extra:?} did not return an array");
        };
        let (Reply::Bulk(Some(next)), Reply::Array(Some(batch))) = (&items[0], &items[1]) else {
            panic!("SCAN reply shape: {items:?}");
        };
        for k in batch {
            let Reply::Bulk(Some(k)) = k else {
                panic!("SCAN key: {k:?}")
            };
            keys.push(k.clone());
        }
        cursor = String::from_utf8(next.clone()).unwrap();
        if cursor == "0" {
            keys.sort();
            keys.dedup();
            return keys;
        }
    }
    panic!("SCAN {extra:?} never finished");
}

#[test]
fn scan_matches_redis() {
    let s = servers();
    let mut p = Pair::new(&s);
    p.check(&["FLUSHALL"], Exact);
    for i in 0..300 {
        let k = format!("user:{i}");
        p.check(&["SET", &k, "v"], Exact);
    }
    p.check(&["SET", "other", "v"], Exact);
    for extra in [
        &[][..],
        &["COUNT", "7"],
        &["MATCH", "user:1*"],
        &["MATCH", "user:1*", "COUNT", "1000"],
        &["TYPE", "string"],
        &["TYPE", "STRING", "MATCH", "o*"],
        &["TYPE", "hash"],
        &["MATCH", "*"],
    ] {
        let kv = scan_all(&mut p.kv, extra);
        let redis = scan_all(&mut p.redis, extra);
        assert_eq!(kv, redis, "SCAN {extra:?}");
    }
    for bad in [
        &["SCAN", "abc"][..],
        &["SCAN", "0", "COUNT", "0"],
        &["SCAN", "0", "COUNT", "x"],
        &["SCAN", "0", "COUNT"],
        &["SCAN", "0", "BOGUS", "1"],
        &["SCAN", " 0"],
        &["SCAN", "18446744073709551616"],
        &["SCAN"],
    ] {
        p.check(bad, Exact);
    }
    // An empty key space scans in one step with cursor 0 in both.
    p.check(&["FLUSHALL"], Exact);
    p.check(&["SCAN", "0"], Exact);
}

#[test]
fn errors_and_connection_commands_match_redis() {
    let s = servers();
    let mut p = Pair::new(&s);
    p.run(&[
        (&["FROBNICATE", "x", "y"], Exact),
        (&["frobnicate"], Exact),
        (&["GET"], Exact),
        (&["GET", "a", "b"], Exact),
        (&["CLIENT"], Exact),
        (&["CLIENT", "NOSUCH"], Exact),
        (&["CLIENT", "GETNAME"], Exact),
        (&["CLIENT", "SETNAME", "app-1"], Exact),
        (&["CLIENT", "GETNAME"], Exact),
        (&["CLIENT", "SETNAME", "bad name"], Exact),
        (&["CLIENT", "SETNAME", "bad\nname"], Exact),
        (&["CLIENT", "SETNAME"], Exact),
        (&["CLIENT", "SETNAME", ""], Exact),
        (&["CLIENT", "GETNAME"], Exact),
        (&["CLIENT", "ID"], Kind),
        (&["CLIENT", "LIST", "TYPE", "bogus"], Exact),
        (&["CLIENT", "LIST", "TYPE", "pubsub"], Exact),
        (&["CLIENT", "LIST", "ID", "x"], Exact),
        (&["CLIENT", "LIST", "x"], Exact),
        (&["CONFIG"], Exact),
        (&["CONFIG", "GET"], Exact),
        (&["CONFIG", "GET", "appendfsync"], Exact),
        (&["CONFIG", "GET", "APPENDFSYNC"], Exact),
        (&["CONFIG", "GET", "appendonly", "save"], Sorted),
        (&["CONFIG", "GET", "appendfsyn?"], Exact),
        (&["CONFIG", "GET", "no-such-param"], Exact),
        (&["CONFIG", "SET", "appendfsync", "no"], Exact),
        (&["CONFIG", "GET", "appendfsync"], Exact),
        (&["CONFIG", "SET", "APPENDFSYNC", "Always"], Exact),
        (&["CONFIG", "GET", "appendfsync"], Exact),
        (&["CONFIG", "SET", "appendfsync", "sometimes"], Exact),
        (
            &["CONFIG", "SET", "appendfsync", "no", "appendfsync", "no"],
            Exact,
        ),
        (&["CONFIG", "SET", "no-such-param", "1"], Exact),
        (&["CONFIG", "SET", "appendfsync"], Exact),
        (&["CONFIG", "SET", "appendfsync", "everysec"], Exact),
        (&["COMMAND", "NOSUCH"], Exact),
        (&["COMMAND", "INFO", "nosuchcommand"], Exact),
        (&["COMMAND", "LIST", "FILTERBY", "BOGUS", "x"], Exact),
    ]);
    // What kv says about each command it has is what Redis says about it.
    let names: Vec<&str> = [
        "get",
        "set",
        "setnx",
        "setex",
        "psetex",
        "getset",
        "getdel",
        "getex",
        "mget",
        "mset",
        "msetnx",
        "append",
        "strlen",
        "incr",
        "decr",
        "incrby",
        "decrby",
        "incrbyfloat",
        "getrange",
        "setrange",
        "del",
        "unlink",
        "exists",
        "touch",
        "type",
        "rename",
        "renamenx",
        "keys",
        "scan",
        "expire",
        "pexpire",
        "expireat",
        "pexpireat",
        "expiretime",
        "pexpiretime",
        "persist",
        "ttl",
        "pttl",
        "dbsize",
        "flushall",
        "flushdb",
        "time",
        "ping",
        "echo",
        "select",
        "quit",
        "client|setname",
        "client|getname",
        "client|id",
        "client|info",
        "client|list",
        "config|get",
        "config|set",
        "command|count",
        "command|docs",
        "command|info",
        "command|list",
    ]
    .to_vec();
    for n in names {
        p.check(&["COMMAND", "INFO", n], Exact);
    }
    // Both name the client's last command in CLIENT INFO.
    p.check(&["CLIENT", "SETNAME", "probe"], Exact);
    for c in [&mut p.kv, &mut p.redis] {
        let Reply::Bulk(Some(info)) = c.call(&["CLIENT", "INFO"]) else {
            panic!("CLIENT INFO is a bulk string")
        };
        let info = String::from_utf8(info).unwrap();
        for field in ["name=probe ", "flags=N ", "db=0 ", "cmd=client|info "] {
            assert!(info.contains(field), "{field} in {info}");
        }
    }
}

/// Sends raw bytes on a fresh connection; returns everything the server
/// answers until it closes the connection or goes quiet.
fn raw_exchange(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

#[test]
fn the_protocol_is_parsed_like_redis() {
    let s = servers();
    for input in [
        &b"PING\r\n"[..],
        b"ECHO \"a b\\x41\\n\" 'c\\'d'\r\nPING\n",
        b"SET k \"unbalanced\r\n",
        b"SET k \"a\"b\r\n",
        b"  \r\n\r\nPING\r\n",
        b"*0\r\n*-1\r\nPING\r\n",
        b"*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nECHO\r\n$2\r\nhi\r\n",
        b"*x\r\n",
        b"*2\r\n$3\r\nGET\r\n+oops\r\n",
        b"*1\r\n$-5\r\n",
        b"*1\r\n$99999999999\r\n",
        b"*1\r\nGET\r\n",
        b"*3000000000\r\n",
        b"QUIT\r\nPING\r\n",
    ] {
        let kv = raw_exchange(s.kv_port, input);
        let redis = raw_exchange(s.redis_port, input);
        assert_eq!(
            String::from_utf8_lossy(&kv),
            String::from_utf8_lossy(&redis),
            "input {:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn redis_cli_and_redis_benchmark_work_against_kv() {
    let s = servers();
    let port = s.kv_port.to_string();
    let mut cmd = Command::new("redis-benchmark");
    cmd.args([
        "-p",
        &port,
        "-q",
        "-n",
        "2000",
        "-c",
        "10",
        "-t",
        "set,get,incr,mset",
    ]);
    let o = output_within(cmd, Duration::from_secs(120));
    assert!(o.status.success(), "redis-benchmark: {}", stderr(&o));
    let out = stdout(&o).replace('\r', "\n");
    for t in ["SET", "GET", "INCR", "MSET"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(t) && l.contains(" requests per second")),
            "no {t} result in:\n{out}"
        );
    }
    assert!(!out.contains("WARNING"), "{out}");
    let mut cmd = Command::new("redis-cli");
    cmd.args(["-p", &port, "--no-raw", "INCRBYFLOAT", "cli:float", "1.5"]);
    let o = output_within(cmd, Duration::from_secs(20));
    assert_eq!(stdout(&o).trim(), "\"1.5\"");
}

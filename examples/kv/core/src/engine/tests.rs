//! The engine on its own: dispatch, expiry on a fake clock, the log's
//! replay, and the server commands. (Command-by-command agreement with
//! redis-server is checked side by side in host/cli/tests/kv_vs_redis.rs.)

use alloc::format;
use alloc::string::{self, String, ToString};
use alloc::vec::Vec;

use super::*;
use crate::resp::parse_record;

struct T {
    e: Engine,
    id: ClientId,
    now: u64,
    log: Vec<u8>,
}

impl T {
    fn new() -> T {
        let mut e = Engine::new(Config {
            appendfsync: Fsync::Always,
            appendonly: true,
            port: 6379,
        });
        let id = e.connect("10.0.2.2:40000".into(), "10.0.2.15:6379".into(), 1_000_000);
        T {
            e,
            id,
            now: 1_000_000,
            log: Vec::new(),
        }
    }

    /// Runs a command; returns its raw reply.
    fn raw(&mut self, words: &[&str]) -> String {
        let args: Vec<Vec<u8>> = words.iter().map(|w| w.as_bytes().to_vec()).collect();
        let mut out = Vec::new();
        self.e
            .execute(self.id, &args, self.now, &mut out, &mut self.log);
        String::from_utf8_lossy(&out).into_owned()
    }

    fn records(&self) -> Vec<Vec<Vec<u8>>> {
        let mut rest = &self.log[..];
        let mut out = Vec::new();
        while !rest.is_empty() {
            let (args, used) = parse_record(rest).expect("the log holds records");
            out.push(args);
            rest = &rest[used..];
        }
        out
    }
}

fn words(r: &[Vec<u8>]) -> Vec<String> {
    r.iter()
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect()
}

#[test]
fn every_command_in_the_table_is_implemented() {
    for c in table::all().filter(|c| c.subcommands.is_empty()) {
        let mut t = T::new();
        let mut args: Vec<String> = c.name.split('|').map(string::ToString::to_string).collect();
        while !c.arity_ok(args.len()) {
            args.push("1".into());
        }
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = t.raw(&a);
        assert!(!r.contains("not implemented"), "{}: {r}", c.name);
        assert!(!r.starts_with("-ERR unknown"), "{}: {r}", c.name);
        assert!(!r.starts_with("-ERR wrong number"), "{}: {r}", c.name);
    }
}

#[test]
fn unknown_commands_subcommands_and_arity_get_redis_errors() {
    let mut t = T::new();
    assert_eq!(
        t.raw(&["FROBNICATE", "x", "y"]),
        "-ERR unknown command 'FROBNICATE', with args beginning with: 'x' 'y' \r\n"
    );
    assert_eq!(
        t.raw(&["nope"]),
        "-ERR unknown command 'nope', with args beginning with: \r\n"
    );
    assert_eq!(
        t.raw(&["client", "kill", "x"]),
        "-ERR unknown subcommand 'kill'. Try CLIENT HELP.\r\n"
    );
    assert_eq!(
        t.raw(&["GET"]),
        "-ERR wrong number of arguments for 'get' command\r\n"
    );
    assert_eq!(
        t.raw(&["config"]),
        "-ERR wrong number of arguments for 'config' command\r\n"
    );
    assert_eq!(
        t.raw(&["CONFIG", "GET"]),
        "-ERR wrong number of arguments for 'config|get' command\r\n"
    );
    // Client bytes in an error never break the reply line.
    let r = t.raw(&["bad\r\ncmd"]);
    assert_eq!(r.matches("\r\n").count(), 1, "{r:?}");
    // Long arguments are cut at 128 bytes, as Redis does.
    let long = "x".repeat(300);
    let r = t.raw(&["nope", &long]);
    assert!(r.len() < 220, "{}", r.len());
}

#[test]
fn keys_expire_on_time_and_their_deletion_is_logged() {
    let mut t = T::new();
    assert_eq!(t.raw(&["SET", "k", "v", "PX", "100"]), "+OK\r\n");
    assert_eq!(t.raw(&["PTTL", "k"]), ":100\r\n");
    t.now += 99;
    assert_eq!(t.raw(&["GET", "k"]), "$1\r\nv\r\n");
    assert_eq!(t.raw(&["TTL", "k"]), ":0\r\n", "1 ms left rounds to 0 s");
    t.now += 1;
    assert_eq!(t.raw(&["GET", "k"]), "$-1\r\n");
    assert_eq!(t.raw(&["EXISTS", "k"]), ":0\r\n");
    let recs: Vec<Vec<String>> = t.records().iter().map(|r| words(r)).collect();
    assert_eq!(recs[0], ["SET", "k", "v", "PXAT", "1000100"]);
    assert_eq!(recs[1], ["DEL", "k"]);
    assert_eq!(recs.len(), 2);
}

#[test]
fn active_expiry_removes_due_keys_without_a_command() {
    let mut t = T::new();
    t.raw(&["SET", "a", "1", "PX", "50"]);
    t.raw(&["SET", "b", "1", "PX", "80"]);
    t.raw(&["SET", "c", "1"]);
    assert_eq!(t.e.next_expiry(), Some(t.now + 50));
    let mut log = Vec::new();
    t.e.expire(t.now + 60, &mut log);
    assert_eq!(t.e.store().len(), 2);
    assert_eq!(t.e.next_expiry(), Some(t.now + 80));
    assert_eq!(log, b"*2\r\n$3\r\nDEL\r\n$1\r\na\r\n");
}

#[test]
fn ttl_rounds_to_the_nearest_second_like_redis() {
    let mut t = T::new();
    t.raw(&["SET", "k", "v", "PX", "1499"]);
    assert_eq!(t.raw(&["TTL", "k"]), ":1\r\n");
    t.raw(&["SET", "k", "v", "PX", "1500"]);
    assert_eq!(t.raw(&["TTL", "k"]), ":2\r\n");
    assert_eq!(t.raw(&["EXPIRETIME", "k"]), ":1002\r\n");
    assert_eq!(t.raw(&["PEXPIRETIME", "k"]), ":1001500\r\n");
    assert_eq!(t.raw(&["TTL", "none"]), ":-2\r\n");
}

#[test]
fn expire_options_nx_xx_gt_lt() {
    let mut t = T::new();
    t.raw(&["SET", "k", "v"]);
    assert_eq!(t.raw(&["EXPIRE", "k", "100", "XX"]), ":0\r\n");
    assert_eq!(
        t.raw(&["EXPIRE", "k", "100", "GT"]),
        ":0\r\n",
        "no TTL counts as infinite"
    );
    assert_eq!(t.raw(&["EXPIRE", "k", "100", "LT"]), ":1\r\n");
    assert_eq!(t.raw(&["EXPIRE", "k", "50", "NX"]), ":0\r\n");
    assert_eq!(t.raw(&["EXPIRE", "k", "200", "GT"]), ":1\r\n");
    assert_eq!(t.raw(&["EXPIRE", "k", "150", "GT"]), ":0\r\n");
    assert_eq!(t.raw(&["PEXPIRE", "k", "150000", "lt", "xx"]), ":1\r\n");
    assert_eq!(t.raw(&["TTL", "k"]), ":150\r\n");
    assert_eq!(
        t.raw(&["EXPIRE", "k", "1", "NX", "GT"]),
        "-ERR NX and XX, GT or LT options at the same time are not compatible\r\n"
    );
    assert_eq!(
        t.raw(&["EXPIRE", "k", "1", "GT", "LT"]),
        "-ERR GT and LT options at the same time are not compatible\r\n"
    );
    assert_eq!(
        t.raw(&["EXPIRE", "k", "1", "SOON"]),
        "-ERR Unsupported option SOON\r\n"
    );
    assert_eq!(
        t.raw(&["EXPIRE", "k", "9223372036854775807"]),
        "-ERR invalid expire time in 'expire' command\r\n"
    );
    // A deadline in the past deletes the key (and logs a DEL).
    assert_eq!(t.raw(&["EXPIRE", "k", "-1"]), ":1\r\n");
    assert_eq!(t.raw(&["EXISTS", "k"]), ":0\r\n");
    assert_eq!(words(t.records().last().unwrap()), ["DEL", "k"]);
}

#[test]
fn incrbyfloat_uses_long_double_and_logs_the_result() {
    let mut t = T::new();
    t.raw(&["SET", "f", "10.50"]);
    assert_eq!(t.raw(&["INCRBYFLOAT", "f", "0.1"]), "$4\r\n10.6\r\n");
    assert_eq!(t.raw(&["INCRBYFLOAT", "f", "-5"]), "$3\r\n5.6\r\n");
    assert_eq!(
        t.raw(&["INCRBYFLOAT", "f", "x"]),
        "-ERR value is not a valid float\r\n"
    );
    assert_eq!(
        t.raw(&["INCRBYFLOAT", "f", "inf"]),
        "-ERR increment would produce NaN or Infinity\r\n"
    );
    assert_eq!(
        words(t.records().last().unwrap()),
        ["SET", "f", "5.6", "KEEPTTL"]
    );
}

#[test]
fn writes_are_refused_while_the_log_cannot_be_written() {
    let mut t = T::new();
    t.e.set_write_error(Some("the disk is full".into()));
    assert_eq!(
        t.raw(&["SET", "k", "v"]),
        "-MISCONF Errors writing to the AOF file: the disk is full\r\n"
    );
    assert_eq!(t.raw(&["GET", "k"]), "$-1\r\n", "reads still work");
    t.e.set_write_error(None);
    assert_eq!(t.raw(&["SET", "k", "v"]), "+OK\r\n");
}

#[test]
fn client_names_ids_and_lists() {
    let mut t = T::new();
    assert_eq!(t.raw(&["CLIENT", "GETNAME"]), "$-1\r\n");
    assert_eq!(t.raw(&["CLIENT", "SETNAME", "worker-1"]), "+OK\r\n");
    assert_eq!(t.raw(&["CLIENT", "GETNAME"]), "$8\r\nworker-1\r\n");
    assert_eq!(
        t.raw(&["CLIENT", "SETNAME", "has space"]),
        "-ERR Client names cannot contain spaces, newlines or special characters.\r\n"
    );
    assert_eq!(t.raw(&["CLIENT", "ID"]), format!(":{}\r\n", t.id));
    let other =
        t.e.connect("10.0.2.2:40001".into(), "10.0.2.15:6379".into(), t.now);
    t.now += 3000;
    let info = t.raw(&["CLIENT", "INFO"]);
    assert!(
        info.contains(&format!("id={} addr=10.0.2.2:40000 laddr=10.0.2.15:6379 name=worker-1 age=3 idle=0 flags=N db=0 cmd=client|info", t.id)),
        "{info}"
    );
    let list = t.raw(&["CLIENT", "LIST"]);
    assert!(
        list.contains("name=worker-1") && list.contains(&format!("id={other} ")),
        "{list}"
    );
    assert!(list.contains("cmd=NULL"), "{list}");
    let only = t.raw(&["CLIENT", "LIST", "ID", &other.to_string()]);
    assert!(
        !only.contains("worker-1") && only.contains(&format!("id={other} ")),
        "{only}"
    );
    assert_eq!(t.raw(&["CLIENT", "LIST", "TYPE", "pubsub"]), "$0\r\n\r\n");
    assert_eq!(
        t.raw(&["CLIENT", "LIST", "TYPE", "bogus"]),
        "-ERR Unknown client type 'bogus'\r\n"
    );
    t.e.disconnect(other);
    assert!(!t.raw(&["CLIENT", "LIST"]).contains(&format!("id={other} ")));
    assert_eq!(t.raw(&["CLIENT", "SETNAME", ""]), "+OK\r\n");
    assert_eq!(t.raw(&["CLIENT", "GETNAME"]), "$-1\r\n");
}

#[test]
fn config_reports_and_changes_the_real_policy() {
    let mut t = T::new();
    assert_eq!(
        t.raw(&["CONFIG", "GET", "appendfsync"]),
        "*2\r\n$11\r\nappendfsync\r\n$6\r\nalways\r\n"
    );
    assert_eq!(
        t.raw(&["CONFIG", "GET", "APPENDFSYNC"]),
        "*2\r\n$11\r\nAPPENDFSYNC\r\n$6\r\nalways\r\n",
        "an exact name is echoed as given"
    );
    assert_eq!(
        t.raw(&["CONFIG", "GET", "APPEND*"]),
        "*4\r\n$10\r\nappendonly\r\n$3\r\nyes\r\n$11\r\nappendfsync\r\n$6\r\nalways\r\n"
    );
    assert_eq!(t.raw(&["CONFIG", "GET", "nosuch"]), "*0\r\n");
    assert_eq!(
        t.raw(&["CONFIG", "SET", "appendfsync", "EverySec"]),
        "+OK\r\n"
    );
    assert_eq!(t.e.config().appendfsync, Fsync::EverySec);
    assert_eq!(
        t.raw(&["CONFIG", "SET", "appendfsync", "sometimes"]),
        "-ERR CONFIG SET failed (possibly related to argument 'appendfsync') - argument(s) must be one of the following: everysec, always, no\r\n"
    );
    assert_eq!(
        t.raw(&["CONFIG", "SET", "port", "1"]),
        "-ERR CONFIG SET failed (possibly related to argument 'port') - can't set immutable config\r\n"
    );
    assert_eq!(
        t.raw(&["CONFIG", "SET", "foo", "2", "port", "1"]),
        "-ERR Unknown option or number of arguments for CONFIG SET - 'foo'\r\n"
    );
    assert_eq!(
        t.raw(&["CONFIG", "SET", "port", "1", "foo", "2"]),
        "-ERR CONFIG SET failed (possibly related to argument 'port') - can't set immutable config\r\n",
        "the first problem wins, as in Redis"
    );
    assert_eq!(
        t.raw(&["CONFIG", "SET", "appendfsync", "no", "appendfsync", "always"]),
        "-ERR CONFIG SET failed (possibly related to argument 'appendfsync') - duplicate parameter\r\n"
    );
    assert_eq!(
        t.raw(&["CONFIG", "SET", "appendfsync"]),
        "-ERR wrong number of arguments for 'config|set' command\r\n"
    );
    assert_eq!(
        t.e.config().appendfsync,
        Fsync::EverySec,
        "failed sets change nothing"
    );
}

#[test]
fn command_answers_from_the_table() {
    let mut t = T::new();
    assert_eq!(
        t.raw(&["COMMAND", "COUNT"]),
        format!(":{}\r\n", table::COMMANDS.len())
    );
    let get = t.raw(&["COMMAND", "INFO", "get", "nosuch"]);
    assert!(
        get.starts_with(
            "*2\r\n*10\r\n$3\r\nget\r\n:2\r\n*2\r\n+readonly\r\n+fast\r\n:1\r\n:1\r\n:1\r\n"
        ),
        "{get:?}"
    );
    assert!(get.ends_with("$-1\r\n"), "unknown names are null");
    let docs = t.raw(&["COMMAND", "DOCS", "incrbyfloat"]);
    assert!(
        docs.starts_with("*2\r\n$11\r\nincrbyfloat\r\n*8\r\n$7\r\nsummary\r\n"),
        "{docs:?}"
    );
    let list = t.raw(&["COMMAND", "LIST", "FILTERBY", "PATTERN", "client|*"]);
    assert!(
        list.contains("client|setname") && !list.contains("$3\r\nget\r\n"),
        "{list}"
    );
    let list = t.raw(&["COMMAND", "LIST", "FILTERBY", "ACLCAT", "string"]);
    assert!(
        list.contains("$11\r\nincrbyfloat\r\n") && !list.contains("$4\r\nscan\r\n"),
        "{list}"
    );
    assert_eq!(
        t.raw(&["COMMAND", "LIST", "FILTERBY", "MODULE", "x"]),
        "*0\r\n"
    );
}

/// A small deterministic PRNG (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

fn random_command(r: &mut Rng, now: u64) -> Vec<String> {
    let keys = ["a", "b", "c", "d"];
    let k = r.pick(&keys).to_string();
    let k2 = r.pick(&keys).to_string();
    let v = format!("{}", r.below(30));
    let small = format!("{}", r.below(400));
    let at = format!("{}", now as i64 + r.below(800) as i64 - 200);
    let s = |x: &[&str]| x.iter().map(|w| w.to_string()).collect::<Vec<_>>();
    match r.below(26) {
        0 => s(&["SET", &k, &v]),
        1 => s(&["SET", &k, &v, "PX", &small, r.pick(&["NX", "XX", "GET"])]),
        2 => s(&["SET", &k, &v, "KEEPTTL", r.pick(&["GET", "XX", "NX"])]),
        3 => s(&["SET", &k, &v, "PXAT", &at]),
        4 => s(&["SETNX", &k, &v]),
        5 => s(&["PSETEX", &k, &small, &v]),
        6 => s(&["GETSET", &k, &v]),
        7 => s(&["GETDEL", &k]),
        8 => s(&["GETEX", &k, "PX", &small]),
        9 => s(&["GETEX", &k, "PERSIST"]),
        10 => s(&["GETEX", &k, "PXAT", &at]),
        11 => s(&["DEL", &k, &k2]),
        12 => s(&["APPEND", &k, &v]),
        13 => s(&["SETRANGE", &k, &format!("{}", r.below(6)), &v]),
        14 => s(&["INCR", &k]),
        15 => s(&["INCRBY", &k, &small]),
        16 => s(&["INCRBYFLOAT", &k, "0.1"]),
        17 => s(&["RENAME", &k, &k2]),
        18 => s(&["RENAMENX", &k, &k2]),
        19 => s(&["PEXPIRE", &k, &small, r.pick(&["NX", "XX", "GT", "LT"])]),
        20 => s(&["PEXPIREAT", &k, &at]),
        21 => s(&["PERSIST", &k]),
        22 => s(&["MSET", &k, &v, &k2, &v]),
        23 => s(&["MSETNX", &k, &v, &k2, &v]),
        24 if r.below(10) == 0 => s(&["FLUSHALL"]),
        _ => s(&["GET", &k]),
    }
}

type Snapshot = Vec<(Vec<u8>, Vec<u8>, Option<u64>)>;

fn snapshot(e: &mut Engine, now: u64) -> Snapshot {
    e.expire(now, &mut Vec::new());
    let mut s: Snapshot = e
        .store()
        .keys()
        .map(|k| {
            let en = e.store().get(k).unwrap();
            (k.to_vec(), en.value.clone(), en.expires_at)
        })
        .collect();
    s.sort();
    s
}

#[test]
fn replaying_the_log_reproduces_the_state_at_any_later_time() {
    for seed in 1..=40u64 {
        let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut t = T::new();
        for _ in 0..400 {
            t.now += r.below(60);
            let cmd = random_command(&mut r, t.now);
            let a: Vec<&str> = cmd.iter().map(String::as_str).collect();
            t.raw(&a);
        }
        let mut replayed = Engine::new(Config {
            appendfsync: Fsync::Always,
            appendonly: true,
            port: 6379,
        });
        for rec in t.records() {
            replayed.replay(&rec).unwrap_or_else(|e| {
                panic!(
                    "seed {seed}: {:?} failed: {}",
                    words(&rec),
                    String::from_utf8_lossy(&e)
                )
            });
        }
        for later in [0, 1, 150, 10_000] {
            let when = t.now + later;
            assert_eq!(
                snapshot(&mut replayed, when),
                snapshot(&mut t.e, when),
                "seed {seed}, {later} ms after the last command"
            );
        }
    }
}

#[test]
fn replay_does_not_expire_keys_whose_deadline_has_passed() {
    // As Redis while loading: a key that expired while the server was down
    // keeps its data through the replay (a later record may rename it),
    // and goes at the first command.
    let mut e = Engine::new(Config {
        appendfsync: Fsync::Always,
        appendonly: true,
        port: 6379,
    });
    let rec = |w: &[&str]| w.iter().map(|x| x.as_bytes().to_vec()).collect::<Vec<_>>();
    e.replay(&rec(&["SET", "k", "v", "PXAT", "5"])).unwrap();
    e.replay(&rec(&["RENAME", "k", "j"])).unwrap();
    e.replay(&rec(&["SET", "j", "w", "KEEPTTL"])).unwrap();
    assert_eq!(e.store().get(b"j").map(|x| x.expires_at), Some(Some(5)));
    let (mut out, mut log) = (Vec::new(), Vec::new());
    e.execute(REPLAY, &rec(&["GET", "j"]), 10, &mut out, &mut log);
    assert_eq!(out, b"$-1\r\n");
    assert_eq!(log, b"*2\r\n$3\r\nDEL\r\n$1\r\nj\r\n");
}

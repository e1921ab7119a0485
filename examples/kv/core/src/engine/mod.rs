//! Command execution: Redis 7.0's semantics for the string and key-space
//! commands in the [command table](crate::table), plus the connection and
//! server commands clients send (`CLIENT`, `CONFIG`, `COMMAND`, `SELECT`,
//! `QUIT`), answered with what is true of this server.
//!
//! Every command that changes data appends a record to the caller's log
//! buffer, in a form whose replay does not depend on when it is replayed:
//! relative expiry becomes absolute (`SET ... PXAT`, `PEXPIREAT`), counters
//! become `SET ... KEEPTTL` with the new value, and a key that expires is
//! logged as `DEL` when it goes (before the command that noticed). Replay
//! ([`Engine::replay`]) runs the records at time 0, when nothing has
//! expired yet, as Redis does while loading its append-only file; keys
//! whose deadline passed while the server was down go at the first
//! command after the restart.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::glob;
use crate::resp::{self, string2ll, MAX_BULK};
use crate::store::Store;
use crate::table::{self, Cmd};

mod keys;
mod server;
mod strings;

use server::help;
use strings::{string_too_long, SetOpts, SetReply};

/// When the append-only log is flushed to stable storage (Redis's
/// `appendfsync`); see the `aof` module for what each policy guarantees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    Always,
    EverySec,
    No,
}

impl Fsync {
    pub fn name(self) -> &'static str {
        match self {
            Fsync::Always => "always",
            Fsync::EverySec => "everysec",
            Fsync::No => "no",
        }
    }

    /// Case-insensitively, as Redis reads enum configuration values.
    pub fn parse(s: &[u8]) -> Option<Fsync> {
        [Fsync::Always, Fsync::EverySec, Fsync::No]
            .into_iter()
            .find(|f| f.name().as_bytes().eq_ignore_ascii_case(s))
    }
}

/// The server's configuration, as `CONFIG GET` reports it.
pub struct Config {
    pub appendfsync: Fsync,
    /// Whether writes go to an append-only log (a disk is attached).
    pub appendonly: bool,
    pub port: u16,
}

pub type ClientId = u64;

/// What a connection should do after a command.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Close the connection once the replies are sent (`QUIT`).
    Close,
}

struct Client {
    addr: String,
    laddr: String,
    name: Option<Vec<u8>>,
    created_ms: u64,
    last_ms: u64,
    last_cmd: &'static str,
}

pub struct Engine {
    store: Store,
    config: Config,
    clients: BTreeMap<ClientId, Client>,
    next_client: ClientId,
    /// Set while the log cannot be written: writes are refused.
    write_error: Option<String>,
}

/// The pseudo-client that replays the log.
const REPLAY: ClientId = 0;

/// One command's context: time, where replies and log records go.
struct Ctx<'a> {
    now: u64,
    client: ClientId,
    out: &'a mut Vec<u8>,
    log: &'a mut Vec<u8>,
}

impl Ctx<'_> {
    fn err(&mut self, msg: &str) {
        resp::err(self.out, msg);
    }

    fn ok(&mut self) {
        resp::simple(self.out, "OK");
    }

    fn int(&mut self, n: i64) {
        resp::integer(self.out, n);
    }

    fn record(&mut self, args: &[&[u8]]) {
        resp::encode_command(self.log, args);
    }

    fn not_integer(&mut self) {
        self.err("value is not an integer or out of range");
    }

    fn syntax(&mut self) {
        self.err("syntax error");
    }
}

/// A C string's view of bytes: up to the first NUL, at most `max` bytes
/// (Redis formats client bytes into errors with `%.128s`).
fn cstr(b: &[u8], max: usize) -> &[u8] {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end.min(max)]
}

fn eq(a: &[u8], b: &str) -> bool {
    a.eq_ignore_ascii_case(b.as_bytes())
}

fn i64_bytes(n: i64) -> Vec<u8> {
    format!("{n}").into_bytes()
}

impl Engine {
    pub fn new(config: Config) -> Engine {
        Engine {
            store: Store::default(),
            config,
            clients: BTreeMap::new(),
            next_client: REPLAY + 1,
            write_error: None,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Refuses writes (Redis's `MISCONF`) while the log cannot be written.
    pub fn set_write_error(&mut self, e: Option<String>) {
        self.write_error = e;
    }

    /// A new connection from `addr` to `laddr` (as `CLIENT LIST` shows
    /// them).
    pub fn connect(&mut self, addr: String, laddr: String, now: u64) -> ClientId {
        let id = self.next_client;
        self.next_client += 1;
        self.clients.insert(
            id,
            Client {
                addr,
                laddr,
                name: None,
                created_ms: now,
                last_ms: now,
                last_cmd: "NULL",
            },
        );
        id
    }

    pub fn disconnect(&mut self, id: ClientId) {
        self.clients.remove(&id);
    }

    /// The earliest deadline of any key (when [`Engine::expire`] has work).
    pub fn next_expiry(&self) -> Option<u64> {
        self.store.next_expiry()
    }

    /// Removes the keys due at `now`, logging a `DEL` for each.
    pub fn expire(&mut self, now: u64, log: &mut Vec<u8>) {
        for key in self.store.expire_due(now) {
            resp::encode_command(log, &[b"DEL", &key]);
        }
    }

    /// Replays one log record. Returns the error reply if it failed.
    pub fn replay(&mut self, args: &[Vec<u8>]) -> Result<(), Vec<u8>> {
        let (mut out, mut log) = (Vec::new(), Vec::new());
        self.execute(REPLAY, args, 0, &mut out, &mut log);
        if out.first() == Some(&b'-') {
            Err(out)
        } else {
            Ok(())
        }
    }

    /// Executes one command for `client` at `now` (Unix ms), appending
    /// its reply to `out` and, if it changed data, its records to `log`.
    pub fn execute(
        &mut self,
        client: ClientId,
        args: &[Vec<u8>],
        now: u64,
        out: &mut Vec<u8>,
        log: &mut Vec<u8>,
    ) -> Flow {
        let Some(name) = args.first() else {
            return Flow::Continue;
        };
        self.expire(now, log);
        let mut cx = Ctx {
            now,
            client,
            out,
            log,
        };
        let Some(top) = table::lookup(name) else {
            let mut msg = b"ERR unknown command '".to_vec();
            msg.extend_from_slice(cstr(name, 128));
            msg.extend_from_slice(b"', with args beginning with: ");
            let start = msg.len();
            for a in &args[1..] {
                let used = msg.len() - start;
                if used >= 128 {
                    break;
                }
                msg.push(b'\'');
                msg.extend_from_slice(cstr(a, 128 - used));
                msg.extend_from_slice(b"' ");
            }
            resp::error(cx.out, &msg);
            return Flow::Continue;
        };
        let cmd = if top.subcommands.is_empty() || args.len() < 2 {
            top
        } else {
            match table::lookup_sub(top, &args[1]) {
                Some(sub) => sub,
                None => {
                    let mut msg = b"ERR unknown subcommand '".to_vec();
                    msg.extend_from_slice(cstr(&args[1], 128));
                    msg.extend_from_slice(b"'. Try ");
                    msg.extend_from_slice(&name.to_ascii_uppercase());
                    msg.extend_from_slice(b" HELP.");
                    resp::error(cx.out, &msg);
                    return Flow::Continue;
                }
            }
        };
        if let Some(c) = self.clients.get_mut(&client) {
            c.last_cmd = cmd.name;
            c.last_ms = now;
        }
        if !cmd.arity_ok(args.len()) {
            cx.err(&format!(
                "wrong number of arguments for '{}' command",
                cmd.name
            ));
            return Flow::Continue;
        }
        if let Some(e) = &self.write_error {
            if cmd.is_write() || cmd.name == "ping" {
                let msg = format!("MISCONF Errors writing to the AOF file: {e}");
                resp::error(cx.out, msg.as_bytes());
                return Flow::Continue;
            }
        }
        self.dispatch(cmd, args, &mut cx)
    }

    fn dispatch(&mut self, cmd: &'static Cmd, args: &[Vec<u8>], cx: &mut Ctx) -> Flow {
        let a = |i: usize| args[i].as_slice();
        match cmd.name {
            "ping" => match args.len() {
                1 => resp::simple(cx.out, "PONG"),
                2 => resp::bulk(cx.out, a(1)),
                _ => cx.err("wrong number of arguments for 'ping' command"),
            },
            "echo" => resp::bulk(cx.out, a(1)),
            "quit" => {
                cx.ok();
                return Flow::Close;
            }
            "select" => match string2ll(a(1)) {
                Some(0) => cx.ok(),
                Some(n) if i32::try_from(n).is_ok() => cx.err("DB index is out of range"),
                Some(_) => cx.err(
                    "value is out of range, value must between -2147483648 and 2147483647",
                ),
                None => cx.not_integer(),
            },
            "time" => {
                resp::array_header(cx.out, 2);
                resp::bulk(cx.out, format!("{}", cx.now / 1000).as_bytes());
                resp::bulk(cx.out, format!("{}", cx.now % 1000 * 1000).as_bytes());
            }
            "dbsize" => cx.int(self.store.len() as i64),
            "flushall" | "flushdb" => {
                let flag_ok = |f: &[u8]| eq(f, "sync") || eq(f, "async");
                if args.len() > 2 || (args.len() == 2 && !flag_ok(a(1))) {
                    cx.syntax();
                } else {
                    self.store.clear();
                    cx.record(&[b"FLUSHALL"]);
                    cx.ok();
                }
            }
            "del" | "unlink" => {
                let n = args[1..]
                    .iter()
                    .filter(|k| self.store.remove(k).is_some())
                    .count();
                if n > 0 {
                    let mut rec: Vec<&[u8]> = alloc::vec![b"DEL"];
                    rec.extend(args[1..].iter().map(Vec::as_slice));
                    cx.record(&rec);
                }
                cx.int(n as i64);
            }
            "exists" | "touch" => {
                let n = args[1..].iter().filter(|k| self.store.contains(k)).count();
                cx.int(n as i64);
            }
            "type" => resp::simple(
                cx.out,
                if self.store.contains(a(1)) {
                    "string"
                } else {
                    "none"
                },
            ),
            "rename" | "renamenx" => self.rename(args, cmd.name == "renamenx", cx),
            "keys" => {
                let all = a(1) == b"*";
                let keys: Vec<&[u8]> = self
                    .store
                    .keys()
                    .filter(|k| all || glob::matches(a(1), k, false))
                    .collect();
                resp::array_header(cx.out, keys.len());
                for k in keys {
                    resp::bulk(cx.out, k);
                }
            }
            "scan" => self.scan(args, cx),
            "expire" | "pexpire" | "expireat" | "pexpireat" => self.expire_cmd(cmd, args, cx),
            "persist" => {
                let had = self.store.get(a(1)).is_some_and(|e| e.expires_at.is_some());
                if had {
                    self.store.set_expiry(a(1), None);
                    cx.record(&[b"PERSIST", a(1)]);
                }
                cx.int(i64::from(had));
            }
            "ttl" | "pttl" | "expiretime" | "pexpiretime" => {
                let v = match self.store.get(a(1)) {
                    None => -2,
                    Some(e) => match e.expires_at {
                        None => -1,
                        Some(at) => {
                            let abs = cmd.name.ends_with("expiretime");
                            let ms = if abs {
                                at as i64
                            } else {
                                (at as i64 - cx.now as i64).max(0)
                            };
                            if cmd.name.starts_with('p') {
                                ms
                            } else {
                                (ms + 500) / 1000
                            }
                        }
                    },
                };
                cx.int(v);
            }
            "get" => {
                let v = self.store.get(a(1)).map(|e| e.value.as_slice());
                resp::opt_bulk(cx.out, v);
            }
            "set" => match SetOpts::parse(args, 3, true) {
                Some(o) => self.set(cmd, a(1), a(2), o, SetReply::Ok, cx),
                None => cx.syntax(),
            },
            "setnx" => {
                let o = SetOpts {
                    nx: true,
                    ..SetOpts::default()
                };
                self.set(cmd, a(1), a(2), o, SetReply::Bool, cx);
            }
            "setex" | "psetex" => {
                let unit = if cmd.name == "setex" { "EX" } else { "PX" };
                let o = SetOpts {
                    expire: Some((unit, a(2))),
                    ..SetOpts::default()
                };
                self.set(cmd, a(1), a(3), o, SetReply::Ok, cx);
            }
            "getset" => {
                let old = self.store.get(a(1)).map(|e| e.value.clone());
                resp::opt_bulk(cx.out, old.as_deref());
                self.store.insert(a(1), a(2).to_vec(), None);
                cx.record(&[b"SET", a(1), a(2)]);
            }
            "getdel" => {
                let old = self.store.remove(a(1));
                resp::opt_bulk(cx.out, old.as_ref().map(|e| e.value.as_slice()));
                if old.is_some() {
                    cx.record(&[b"DEL", a(1)]);
                }
            }
            "getex" => self.getex(cmd, args, cx),
            "mget" => {
                resp::array_header(cx.out, args.len() - 1);
                for k in &args[1..] {
                    let v = self.store.get(k).map(|e| e.value.as_slice());
                    resp::opt_bulk(cx.out, v);
                }
            }
            "mset" | "msetnx" => {
                if args.len().is_multiple_of(2) {
                    cx.err(&format!(
                        "wrong number of arguments for '{}' command",
                        cmd.name
                    ));
                } else if cmd.name == "msetnx"
                    && args[1..].chunks(2).any(|kv| self.store.contains(&kv[0]))
                {
                    cx.int(0);
                } else {
                    for kv in args[1..].chunks(2) {
                        self.store.insert(&kv[0], kv[1].clone(), None);
                    }
                    let mut rec: Vec<&[u8]> = alloc::vec![b"MSET"];
                    rec.extend(args[1..].iter().map(Vec::as_slice));
                    cx.record(&rec);
                    if cmd.name == "msetnx" {
                        cx.int(1);
                    } else {
                        cx.ok();
                    }
                }
            }
            "append" => {
                let cur = self.store.get(a(1)).map_or(0, |e| e.value.len());
                if cur.checked_add(a(2).len()).is_none_or(|n| n > MAX_BULK) {
                    string_too_long(cx);
                    return Flow::Continue;
                }
                match self.store.value_mut(a(1)) {
                    Some(v) => v.extend_from_slice(a(2)),
                    None => self.store.insert(a(1), a(2).to_vec(), None),
                }
                cx.record(&[b"APPEND", a(1), a(2)]);
                cx.int((cur + a(2).len()) as i64);
            }
            "strlen" => {
                let n = self.store.get(a(1)).map_or(0, |e| e.value.len());
                cx.int(n as i64);
            }
            "incr" => self.incr_by(a(1), 1, cx),
            "decr" => self.incr_by(a(1), -1, cx),
            "incrby" => match string2ll(a(2)) {
                Some(by) => self.incr_by(a(1), by, cx),
                None => cx.not_integer(),
            },
            "decrby" => match string2ll(a(2)) {
                Some(i64::MIN) => cx.err("decrement would overflow"),
                Some(by) => self.incr_by(a(1), -by, cx),
                None => cx.not_integer(),
            },
            "incrbyfloat" => self.incr_by_float(a(1), a(2), cx),
            "getrange" => self.getrange(args, cx),
            "setrange" => self.setrange(args, cx),
            "client" | "client|help" => help(
                cx,
                "CLIENT",
                &[
                    "GETNAME",
                    "    Return the name of the current connection.",
                    "ID",
                    "    Return the ID of the current connection.",
                    "INFO",
                    "    Return information about the current client connection.",
                    "LIST [TYPE (NORMAL|MASTER|REPLICA|PUBSUB)] [ID <id> ...]",
                    "    Return information about client connections.",
                    "SETNAME <name>",
                    "    Assign the name <name> to the current connection.",
                ],
            ),
            "client|id" => cx.int(cx.client as i64),
            "client|info" => {
                let mut s = self.client_line(cx.client, cx.now);
                s.push('\n');
                resp::bulk(cx.out, s.as_bytes());
            }
            "client|list" => self.client_list(args, cx),
            "client|getname" => {
                let name = self.clients.get(&cx.client).and_then(|c| c.name.clone());
                resp::opt_bulk(cx.out, name.as_deref());
            }
            "client|setname" => {
                let name = a(2);
                if name.iter().any(|&b| !(b'!'..=b'~').contains(&b)) {
                    cx.err("Client names cannot contain spaces, newlines or special characters.");
                } else {
                    if let Some(c) = self.clients.get_mut(&cx.client) {
                        c.name = (!name.is_empty()).then(|| name.to_vec());
                    }
                    cx.ok();
                }
            }
            "config" | "config|help" => help(
                cx,
                "CONFIG",
                &[
                    "GET <pattern>",
                    "    Return parameters matching the glob-like <pattern> and their values.",
                    "SET <directive> <value>",
                    "    Set the configuration <directive> to <value> (only appendfsync can change).",
                ],
            ),
            "config|get" => self.config_get(args, cx),
            "config|set" => self.config_set(args, cx),
            "command" => {
                resp::array_header(cx.out, table::COMMANDS.len());
                for c in table::COMMANDS {
                    table::info(cx.out, c);
                }
            }
            "command|help" => help(
                cx,
                "COMMAND",
                &[
                    "(no subcommand)",
                    "    Return details about all commands.",
                    "COUNT",
                    "    Return the total number of commands in this server.",
                    "LIST [FILTERBY (MODULE <module-name>|ACLCAT <category>|PATTERN <pattern>)]",
                    "    Return a list of all commands in this server.",
                    "INFO [<command-name> ...]",
                    "    Return details about the given commands, or all of them.",
                    "DOCS [<command-name> ...]",
                    "    Return documentation details about the given commands, or all of them.",
                ],
            ),
            "command|count" => cx.int(table::COMMANDS.len() as i64),
            "command|info" => {
                if args.len() == 2 {
                    resp::array_header(cx.out, table::COMMANDS.len());
                    for c in table::COMMANDS {
                        table::info(cx.out, c);
                    }
                } else {
                    resp::array_header(cx.out, args.len() - 2);
                    for n in &args[2..] {
                        match table::lookup_full(n) {
                            Some(c) => table::info(cx.out, c),
                            None => resp::null(cx.out),
                        }
                    }
                }
            }
            "command|docs" => {
                let found: Vec<&Cmd> = if args.len() == 2 {
                    table::COMMANDS.iter().collect()
                } else {
                    args[2..].iter().filter_map(|n| table::lookup_full(n)).collect()
                };
                resp::array_header(cx.out, found.len() * 2);
                for c in found {
                    resp::bulk(cx.out, c.name.as_bytes());
                    table::docs(cx.out, c);
                }
            }
            "command|list" => self.command_list(args, cx),
            other => cx.err(&format!("command '{other}' is in the table but not implemented")),
        }
        Flow::Continue
    }
}

#[cfg(test)]
mod tests;

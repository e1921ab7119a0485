//! The command table: every command kv implements, with what Redis 7.0's
//! own table says about it (arity, flags, ACL categories, key positions,
//! documentation; generated into `table_data.rs`). Dispatch uses it to look
//! commands up and check their arity, and `COMMAND` answers from it, so
//! `COMMAND COUNT`, `INFO`, `LIST` and `DOCS` describe this server.

use alloc::vec::Vec;

use crate::resp;
pub use crate::table_data::COMMANDS;

/// Where a command's keys are, as Redis's key specs say (kv's commands
/// all use the "index" begin-search and "range" find-keys forms).
pub struct KeySpec {
    pub notes: Option<&'static str>,
    pub flags: &'static [&'static str],
    pub index: i32,
    pub lastkey: i32,
    pub keystep: i32,
    pub limit: i32,
}

pub struct Cmd {
    /// Lower case; `container|sub` for subcommands.
    pub name: &'static str,
    pub summary: &'static str,
    pub complexity: &'static str,
    pub since: &'static str,
    pub group: &'static str,
    /// N: exactly N arguments (name included); -N: at least N.
    pub arity: i32,
    pub flags: &'static [&'static str],
    pub acl: &'static [&'static str],
    pub tips: &'static [&'static str],
    /// Legacy (first key, last key, step).
    pub keys: (i32, i32, i32),
    pub key_specs: &'static [KeySpec],
    pub subcommands: &'static [Cmd],
}

impl Cmd {
    /// Whether `argc` arguments (the name included) fit the arity.
    pub fn arity_ok(&self, argc: usize) -> bool {
        let argc = argc as i64;
        let a = i64::from(self.arity);
        if a >= 0 {
            argc == a
        } else {
            argc >= -a
        }
    }

    pub fn is_write(&self) -> bool {
        self.flags.contains(&"write")
    }

    /// The name a subcommand is typed with (`get` for `config|get`).
    pub fn short_name(&self) -> &'static str {
        self.name.rsplit('|').next().unwrap_or(self.name)
    }
}

/// Looks up a top-level command, case-insensitively.
pub fn lookup(name: &[u8]) -> Option<&'static Cmd> {
    COMMANDS
        .iter()
        .find(|c| c.name.as_bytes().eq_ignore_ascii_case(name))
}

/// Looks up a subcommand of `parent`, case-insensitively.
pub fn lookup_sub(parent: &'static Cmd, name: &[u8]) -> Option<&'static Cmd> {
    parent
        .subcommands
        .iter()
        .find(|c| c.short_name().as_bytes().eq_ignore_ascii_case(name))
}

/// Looks up `name` or `container|sub` (as `COMMAND INFO`/`DOCS` take them).
pub fn lookup_full(name: &[u8]) -> Option<&'static Cmd> {
    match name.iter().position(|&b| b == b'|') {
        None => lookup(name),
        Some(bar) => lookup_sub(lookup(&name[..bar])?, &name[bar + 1..]),
    }
}

/// Every command and subcommand.
pub fn all() -> impl Iterator<Item = &'static Cmd> {
    COMMANDS
        .iter()
        .flat_map(|c| core::iter::once(c).chain(c.subcommands.iter()))
}

fn statuses(out: &mut Vec<u8>, items: &[&str]) {
    resp::array_header(out, items.len());
    for i in items {
        resp::simple(out, i);
    }
}

fn bulks(out: &mut Vec<u8>, items: &[&str]) {
    resp::array_header(out, items.len());
    for i in items {
        resp::bulk(out, i.as_bytes());
    }
}

/// RESP2 map: a flat array of `2 * pairs` elements.
fn map_header(out: &mut Vec<u8>, pairs: usize) {
    resp::array_header(out, pairs * 2);
}

fn key_spec(out: &mut Vec<u8>, k: &KeySpec) {
    map_header(out, 3 + usize::from(k.notes.is_some()));
    if let Some(n) = k.notes {
        resp::bulk(out, b"notes");
        resp::bulk(out, n.as_bytes());
    }
    resp::bulk(out, b"flags");
    statuses(out, k.flags);
    resp::bulk(out, b"begin_search");
    map_header(out, 2);
    resp::bulk(out, b"type");
    resp::bulk(out, b"index");
    resp::bulk(out, b"spec");
    map_header(out, 1);
    resp::bulk(out, b"index");
    resp::integer(out, i64::from(k.index));
    resp::bulk(out, b"find_keys");
    map_header(out, 2);
    resp::bulk(out, b"type");
    resp::bulk(out, b"range");
    resp::bulk(out, b"spec");
    map_header(out, 3);
    for (name, v) in [
        ("lastkey", k.lastkey),
        ("keystep", k.keystep),
        ("limit", k.limit),
    ] {
        resp::bulk(out, name.as_bytes());
        resp::integer(out, i64::from(v));
    }
}

/// One command as `COMMAND INFO` shows it (Redis's 10-element form).
pub fn info(out: &mut Vec<u8>, c: &Cmd) {
    resp::array_header(out, 10);
    resp::bulk(out, c.name.as_bytes());
    resp::integer(out, i64::from(c.arity));
    statuses(out, c.flags);
    resp::integer(out, i64::from(c.keys.0));
    resp::integer(out, i64::from(c.keys.1));
    resp::integer(out, i64::from(c.keys.2));
    statuses(out, c.acl);
    bulks(out, c.tips);
    resp::array_header(out, c.key_specs.len());
    for k in c.key_specs {
        key_spec(out, k);
    }
    resp::array_header(out, c.subcommands.len());
    for s in c.subcommands {
        info(out, s);
    }
}

/// One command's documentation as `COMMAND DOCS` shows it: summary,
/// since, group, complexity and subcommands (Redis also lists arguments
/// and history; kv's table does not carry them).
pub fn docs(out: &mut Vec<u8>, c: &Cmd) {
    map_header(out, 4 + usize::from(!c.subcommands.is_empty()));
    for (k, v) in [
        ("summary", c.summary),
        ("since", c.since),
        ("group", c.group),
        ("complexity", c.complexity),
    ] {
        resp::bulk(out, k.as_bytes());
        resp::bulk(out, v.as_bytes());
    }
    if !c.subcommands.is_empty() {
        resp::bulk(out, b"subcommands");
        map_header(out, c.subcommands.len());
        for s in c.subcommands {
            resp::bulk(out, s.name.as_bytes());
            docs(out, s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_are_case_insensitive_and_know_subcommands() {
        assert_eq!(lookup(b"gEt").map(|c| c.name), Some("get"));
        assert!(lookup(b"frobnicate").is_none());
        let config = lookup(b"CONFIG").unwrap();
        assert_eq!(
            lookup_sub(config, b"Get").map(|c| c.name),
            Some("config|get")
        );
        assert_eq!(lookup_full(b"client|setname").map(|c| c.arity), Some(3));
        assert!(lookup_full(b"client|kill").is_none());
    }

    #[test]
    fn arity_follows_redis_convention() {
        let get = lookup(b"get").unwrap();
        assert!(get.arity_ok(2) && !get.arity_ok(1) && !get.arity_ok(3));
        let set = lookup(b"set").unwrap();
        assert!(set.arity_ok(3) && set.arity_ok(9) && !set.arity_ok(2));
    }

    #[test]
    fn the_table_is_what_redis_says() {
        let rename = lookup(b"rename").unwrap();
        assert_eq!(rename.keys, (1, 2, 1));
        assert_eq!(rename.acl, ["@keyspace", "@write", "@slow"]);
        let mset = lookup(b"mset").unwrap();
        assert_eq!(mset.keys, (1, -1, 2));
        assert!(lookup(b"incr").unwrap().is_write());
        assert!(!lookup(b"get").unwrap().is_write());
        // Names are unique and every subcommand is "parent|name".
        let names: Vec<&str> = all().map(|c| c.name).collect();
        for (i, n) in names.iter().enumerate() {
            assert!(!names[i + 1..].contains(n), "{n} twice");
        }
        for c in COMMANDS {
            for s in c.subcommands {
                assert!(s.name.starts_with(c.name) && s.name[c.name.len()..].starts_with('|'));
            }
        }
    }
}

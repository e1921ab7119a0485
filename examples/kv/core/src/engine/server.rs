//! What clients ask about the server and their connection: `CLIENT`,
//! `CONFIG`, `COMMAND`, and `HELP` replies.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::{cstr, eq, ClientId, Ctx, Engine, Fsync};
use crate::glob;
use crate::resp::{self, string2ll, MAX_BULK};
use crate::table;

/// What `CONFIG GET` knows, in the order it lists them.
const PARAMS: &[&str] = &[
    "appendonly",
    "appendfsync",
    "save",
    "port",
    "databases",
    "proto-max-bulk-len",
];

/// A `HELP` reply: Redis's header and footer around `lines`.
pub(super) fn help(cx: &mut Ctx, name: &str, lines: &[&str]) {
    resp::array_header(cx.out, lines.len() + 3);
    resp::simple(
        cx.out,
        &format!("{name} <subcommand> [<arg> [value] [opt] ...]. Subcommands are:"),
    );
    for l in lines {
        resp::simple(cx.out, l);
    }
    resp::simple(cx.out, "HELP");
    resp::simple(cx.out, "    Print this help.");
}

impl Engine {
    /// One `CLIENT LIST` line: the fields that mean something here.
    pub(super) fn client_line(&self, id: ClientId, now: u64) -> String {
        let Some(c) = self.clients.get(&id) else {
            return format!("id={id} addr= laddr= name= age=0 idle=0 flags=N db=0 cmd=NULL");
        };
        format!(
            "id={id} addr={} laddr={} name={} age={} idle={} flags=N db=0 cmd={} user=default resp=2",
            c.addr,
            c.laddr,
            String::from_utf8_lossy(c.name.as_deref().unwrap_or(b"")),
            (now / 1000).saturating_sub(c.created_ms / 1000),
            (now / 1000).saturating_sub(c.last_ms / 1000),
            c.last_cmd,
        )
    }

    pub(super) fn client_list(&self, args: &[Vec<u8>], cx: &mut Ctx) {
        let mut ids: Vec<ClientId> = Vec::new();
        if args.len() == 4 && eq(&args[2], "type") {
            let t = args[3].as_slice();
            if eq(t, "normal") {
                ids = self.clients.keys().copied().collect();
            } else if !["slave", "replica", "pubsub", "master"]
                .iter()
                .any(|n| eq(t, n))
            {
                let mut msg = b"ERR Unknown client type '".to_vec();
                msg.extend_from_slice(cstr(t, usize::MAX));
                msg.push(b'\'');
                return resp::error(cx.out, &msg);
            }
        } else if args.len() > 3 && eq(&args[2], "id") {
            for a in &args[3..] {
                match string2ll(a) {
                    None => return cx.err("Invalid client ID"),
                    Some(id) => {
                        if let Ok(id) = u64::try_from(id) {
                            if self.clients.contains_key(&id) {
                                ids.push(id);
                            }
                        }
                    }
                }
            }
        } else if args.len() != 2 {
            return cx.syntax();
        } else {
            ids = self.clients.keys().copied().collect();
        }
        let mut s = String::new();
        for id in ids {
            s.push_str(&self.client_line(id, cx.now));
            s.push('\n');
        }
        resp::bulk(cx.out, s.as_bytes());
    }

    pub(super) fn param(&self, name: &str) -> Vec<u8> {
        match name {
            "appendonly" => (if self.config.appendonly { "yes" } else { "no" }).into(),
            "appendfsync" => self.config.appendfsync.name().into(),
            "save" => Vec::new(),
            "port" => format!("{}", self.config.port).into_bytes(),
            "databases" => b"1".to_vec(),
            "proto-max-bulk-len" => format!("{MAX_BULK}").into_bytes(),
            _ => Vec::new(),
        }
    }

    /// `CONFIG GET`: exact names (echoed as given) and glob patterns
    /// (matched case-insensitively, as in Redis), each parameter once.
    pub(super) fn config_get(&self, args: &[Vec<u8>], cx: &mut Ctx) {
        let mut found: Vec<(Vec<u8>, &str)> = Vec::new();
        for p in &args[2..] {
            if !p.iter().any(|b| b"[*?".contains(b)) {
                if let Some(name) = PARAMS.iter().find(|n| eq(p, n)) {
                    if !found.iter().any(|(_, n)| n == name) {
                        found.push((p.clone(), name));
                    }
                }
                continue;
            }
            for name in PARAMS {
                if !found.iter().any(|(_, n)| n == name) && glob::matches(p, name.as_bytes(), true)
                {
                    found.push((name.as_bytes().to_vec(), name));
                }
            }
        }
        resp::array_header(cx.out, found.len() * 2);
        for (shown, name) in found {
            resp::bulk(cx.out, &shown);
            resp::bulk(cx.out, &self.param(name));
        }
    }

    /// `CONFIG SET`: only `appendfsync` can change at run time; all pairs
    /// are checked before any is applied.
    pub(super) fn config_set(&mut self, args: &[Vec<u8>], cx: &mut Ctx) {
        if args.len() % 2 == 1 {
            return cx.syntax();
        }
        let pairs: Vec<&[Vec<u8>]> = args[2..].chunks(2).collect();
        // Redis reports the first unknown name, else the first other
        // problem found before it.
        let mut invalid = false;
        let mut unknown = None;
        let mut failed: Option<(Vec<u8>, &str)> = None;
        let mut seen: Vec<&str> = Vec::new();
        for pair in &pairs {
            let Some(&name) = PARAMS.iter().find(|n| eq(&pair[0], n)) else {
                if !invalid {
                    unknown = Some(pair[0].clone());
                    invalid = true;
                }
                continue;
            };
            if invalid {
                continue;
            }
            if name != "appendfsync" {
                failed = Some((pair[0].clone(), "can't set immutable config"));
                invalid = true;
            } else if seen.contains(&name) {
                failed = Some((pair[0].clone(), "duplicate parameter"));
                invalid = true;
            }
            seen.push(name);
        }
        if let Some(name) = unknown {
            let mut msg = b"ERR Unknown option or number of arguments for CONFIG SET - '".to_vec();
            msg.extend_from_slice(cstr(&name, usize::MAX));
            msg.push(b'\'');
            return resp::error(cx.out, &msg);
        }
        let fail = |cx: &mut Ctx, name: &[u8], why: &str| {
            let mut msg = b"ERR CONFIG SET failed (possibly related to argument '".to_vec();
            msg.extend_from_slice(cstr(name, usize::MAX));
            msg.extend_from_slice(b"') - ");
            msg.extend_from_slice(why.as_bytes());
            resp::error(cx.out, &msg);
        };
        if let Some((name, why)) = failed {
            return fail(cx, &name, why);
        }
        let mut policy = self.config.appendfsync;
        for pair in &pairs {
            match Fsync::parse(&pair[1]) {
                Some(f) => policy = f,
                None => {
                    return fail(
                        cx,
                        b"appendfsync",
                        "argument(s) must be one of the following: everysec, always, no",
                    )
                }
            }
        }
        self.config.appendfsync = policy;
        cx.ok();
    }

    pub(super) fn command_list(&self, args: &[Vec<u8>], cx: &mut Ctx) {
        let mut filter: Option<(&[u8], &[u8])> = None;
        let mut i = 2;
        while i < args.len() {
            if eq(&args[i], "filterby") && args.len() - 1 - i == 2 {
                let kind = args[i + 1].as_slice();
                if !["module", "aclcat", "pattern"].iter().any(|k| eq(kind, k)) {
                    return cx.syntax();
                }
                filter = Some((kind, &args[i + 2]));
                i += 3;
            } else {
                return cx.syntax();
            }
        }
        let names: Vec<&str> = table::all()
            .filter(|c| match filter {
                None => true,
                Some((kind, _)) if eq(kind, "module") => false,
                Some((kind, cat)) if eq(kind, "aclcat") => c.acl.iter().any(|a| eq(cat, &a[1..])),
                Some((_, pattern)) => glob::matches(pattern, c.name.as_bytes(), true),
            })
            .map(|c| c.name)
            .collect();
        resp::array_header(cx.out, names.len());
        for n in names {
            resp::bulk(cx.out, n.as_bytes());
        }
    }
}

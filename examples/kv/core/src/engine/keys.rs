//! Key-space commands: `RENAME`, `SCAN` and the `EXPIRE` family.

use alloc::format;
use alloc::vec::Vec;

use super::{cstr, eq, i64_bytes, Ctx, Engine};
use crate::glob;
use crate::resp::{self, string2ll};
use crate::table::Cmd;

/// Redis's `strtoul(s, &end, 10)` with its checks, for `SCAN` cursors: an
/// optional sign (a minus wraps), digits, nothing else; an empty string
/// is 0.
fn parse_cursor(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return Some(0);
    }
    let (neg, digits) = match s[0] {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut v: u64 = 0;
    for &d in digits {
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    Some(if neg { v.wrapping_neg() } else { v })
}

impl Engine {
    pub(super) fn rename(&mut self, args: &[Vec<u8>], nx: bool, cx: &mut Ctx) {
        let (src, dst) = (args[1].as_slice(), args[2].as_slice());
        if !self.store.contains(src) {
            return cx.err("no such key");
        }
        if src == dst {
            return if nx { cx.int(0) } else { cx.ok() };
        }
        if nx && self.store.contains(dst) {
            return cx.int(0);
        }
        if let Some(e) = self.store.remove(src) {
            self.store.insert(dst, e.value, e.expires_at);
        }
        cx.record(&[b"RENAME", src, dst]);
        if nx {
            cx.int(1)
        } else {
            cx.ok()
        }
    }

    pub(super) fn scan(&mut self, args: &[Vec<u8>], cx: &mut Ctx) {
        let Some(cursor) = parse_cursor(&args[1]) else {
            return cx.err("invalid cursor");
        };
        let (mut count, mut pattern, mut kind) = (10i64, None, None);
        let mut i = 2;
        while i < args.len() {
            let more = args.len() - i >= 2;
            if eq(&args[i], "count") && more {
                match string2ll(&args[i + 1]) {
                    None => return cx.not_integer(),
                    Some(n) if n < 1 => return cx.syntax(),
                    Some(n) => count = n,
                }
            } else if eq(&args[i], "match") && more {
                pattern = Some(args[i + 1].as_slice()).filter(|p| *p != b"*");
            } else if eq(&args[i], "type") && more {
                kind = Some(args[i + 1].as_slice());
            } else {
                return cx.syntax();
            }
            i += 2;
        }
        let (next, keys) = self
            .store
            .scan(cursor, usize::try_from(count).unwrap_or(usize::MAX));
        let keys: Vec<&[u8]> = keys
            .into_iter()
            .filter(|k| pattern.is_none_or(|p| glob::matches(p, k, false)))
            .filter(|_| kind.is_none_or(|t| eq(t, "string")))
            .collect();
        resp::array_header(cx.out, 2);
        resp::bulk(cx.out, format!("{next}").as_bytes());
        resp::array_header(cx.out, keys.len());
        for k in keys {
            resp::bulk(cx.out, k);
        }
    }

    /// `EXPIRE`, `PEXPIRE`, `EXPIREAT`, `PEXPIREAT` with `NX`/`XX`/`GT`/`LT`
    /// (Redis's `expireGenericCommand`).
    pub(super) fn expire_cmd(&mut self, cmd: &Cmd, args: &[Vec<u8>], cx: &mut Ctx) {
        let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
        for opt in &args[3..] {
            if eq(opt, "nx") {
                nx = true;
            } else if eq(opt, "xx") {
                xx = true;
            } else if eq(opt, "gt") {
                gt = true;
            } else if eq(opt, "lt") {
                lt = true;
            } else {
                let mut msg = b"ERR Unsupported option ".to_vec();
                msg.extend_from_slice(cstr(opt, usize::MAX));
                return resp::error(cx.out, &msg);
            }
        }
        if nx && (xx || gt || lt) {
            return cx.err("NX and XX, GT or LT options at the same time are not compatible");
        }
        if gt && lt {
            return cx.err("GT and LT options at the same time are not compatible");
        }
        let Some(mut when) = string2ll(&args[2]) else {
            return cx.not_integer();
        };
        let invalid =
            |cx: &mut Ctx| cx.err(&format!("invalid expire time in '{}' command", cmd.name));
        if !cmd.name.starts_with('p') {
            match when.checked_mul(1000) {
                Some(ms) => when = ms,
                None => return invalid(cx),
            }
        }
        if !cmd.name.ends_with("at") {
            match when.checked_add(cx.now as i64) {
                Some(t) => when = t,
                None => return invalid(cx),
            }
        }
        let key = args[1].as_slice();
        let Some(current) = self.store.get(key).map(|e| e.expires_at) else {
            return cx.int(0);
        };
        let cur = current.map_or(-1, |t| t as i64);
        if (nx && current.is_some())
            || (xx && current.is_none())
            || (gt && (current.is_none() || when <= cur))
            || (lt && current.is_some() && when >= cur)
        {
            return cx.int(0);
        }
        if when <= cx.now as i64 {
            self.store.remove(key);
            cx.record(&[b"DEL", key]);
        } else {
            self.store.set_expiry(key, Some(when as u64));
            cx.record(&[b"PEXPIREAT", key, &i64_bytes(when)]);
        }
        cx.int(1);
    }
}

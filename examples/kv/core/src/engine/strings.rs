//! String commands with options: the `SET` family, `GETEX`, counters,
//! ranges.

use alloc::format;
use alloc::vec::Vec;

use super::{eq, i64_bytes, Ctx, Engine};
use crate::float::LongDouble;
use crate::resp::{self, string2ll, MAX_BULK};
use crate::table::Cmd;

/// Expiry options of `SET` and `GETEX` (Redis's `OBJ_*` flags).
#[derive(Default)]
pub(super) struct SetOpts<'a> {
    pub(super) nx: bool,
    pub(super) xx: bool,
    pub(super) get: bool,
    pub(super) keepttl: bool,
    pub(super) persist: bool,
    /// The option's name (`EX`, `PX`, `EXAT`, `PXAT`) and its argument.
    pub(super) expire: Option<(&'static str, &'a [u8])>,
}

impl<'a> SetOpts<'a> {
    /// Redis's `parseExtendedStringArgumentsOrReply`: options from
    /// `args[first..]`, with its exact exclusions (so `EX 1 EX 2` is
    /// allowed and `EX 1 PX 2` is not).
    pub(super) fn parse(args: &'a [Vec<u8>], first: usize, set: bool) -> Option<SetOpts<'a>> {
        let mut o = SetOpts::default();
        let mut j = first;
        while j < args.len() {
            let opt = args[j].as_slice();
            let next = args.get(j + 1).map(Vec::as_slice);
            let kind = o.expire.map(|(k, _)| k);
            let no_other_expiry = |this: &str| kind.is_none_or(|k| k == this);
            if eq(opt, "nx") && !o.xx && set {
                o.nx = true;
            } else if eq(opt, "xx") && !o.nx && set {
                o.xx = true;
            } else if eq(opt, "get") && set {
                o.get = true;
            } else if eq(opt, "keepttl") && !o.persist && kind.is_none() && set {
                o.keepttl = true;
            } else if eq(opt, "persist") && !set && kind.is_none() && !o.keepttl {
                o.persist = true;
            } else if let Some(name) = ["EX", "PX", "EXAT", "PXAT"]
                .into_iter()
                .find(|n| eq(opt, n))
            {
                match next {
                    Some(arg) if !o.keepttl && !o.persist && no_other_expiry(name) => {
                        o.expire = Some((name, arg));
                        j += 1;
                    }
                    _ => return None,
                }
            } else {
                return None;
            }
            j += 1;
        }
        Some(o)
    }
}

/// What `SET`-like commands answer when they set (or, with NX/XX, do not).
#[derive(Clone, Copy)]
pub(super) enum SetReply {
    /// `+OK` / null.
    Ok,
    /// `:1` / `:0` (SETNX).
    Bool,
}

pub(super) fn string_too_long(cx: &mut Ctx) {
    cx.err("string exceeds maximum allowed size (proto-max-bulk-len)");
}

impl Engine {
    /// The absolute deadline (ms) an `EX`/`PX`/`EXAT`/`PXAT` argument
    /// gives, or the error reply (Redis's `getExpireMillisecondsOrReply`).
    pub(super) fn deadline(cmd: &Cmd, unit: &str, arg: &[u8], cx: &mut Ctx) -> Option<u64> {
        let Some(mut ms) = string2ll(arg) else {
            cx.not_integer();
            return None;
        };
        let seconds = unit == "EX" || unit == "EXAT";
        let invalid =
            |cx: &mut Ctx| cx.err(&format!("invalid expire time in '{}' command", cmd.name));
        if ms <= 0 || (seconds && ms > i64::MAX / 1000) {
            invalid(cx);
            return None;
        }
        if seconds {
            ms *= 1000;
        }
        if unit == "EX" || unit == "PX" {
            ms = ms.wrapping_add(cx.now as i64);
        }
        if ms <= 0 {
            invalid(cx);
            return None;
        }
        Some(ms as u64)
    }

    /// Redis's `setGenericCommand` (SET, SETNX, SETEX, PSETEX).
    pub(super) fn set(
        &mut self,
        cmd: &Cmd,
        key: &[u8],
        value: &[u8],
        o: SetOpts,
        reply: SetReply,
        cx: &mut Ctx,
    ) {
        let mut at = None;
        if let Some((unit, arg)) = o.expire {
            match Self::deadline(cmd, unit, arg, cx) {
                Some(t) => at = Some(t),
                None => return,
            }
        }
        let existing = self.store.get(key).map(|e| e.expires_at);
        if o.get {
            let old = self.store.get(key).map(|e| e.value.as_slice());
            resp::opt_bulk(cx.out, old);
        }
        if (o.nx && existing.is_some()) || (o.xx && existing.is_none()) {
            if !o.get {
                match reply {
                    SetReply::Ok => resp::null(cx.out),
                    SetReply::Bool => cx.int(0),
                }
            }
            return;
        }
        let expires = match at {
            Some(t) => Some(t),
            None if o.keepttl => existing.flatten(),
            None => None,
        };
        self.store.insert(key, value.to_vec(), expires);
        match (at, o.keepttl) {
            (Some(t), _) => cx.record(&[b"SET", key, value, b"PXAT", &i64_bytes(t as i64)]),
            (None, true) => cx.record(&[b"SET", key, value, b"KEEPTTL"]),
            (None, false) => cx.record(&[b"SET", key, value]),
        }
        if !o.get {
            match reply {
                SetReply::Ok => cx.ok(),
                SetReply::Bool => cx.int(1),
            }
        }
    }

    pub(super) fn getex(&mut self, cmd: &Cmd, args: &[Vec<u8>], cx: &mut Ctx) {
        let Some(o) = SetOpts::parse(args, 2, false) else {
            return cx.syntax();
        };
        let key = args[1].as_slice();
        let Some(value) = self.store.get(key).map(|e| e.value.clone()) else {
            return resp::null(cx.out);
        };
        let mut at = None;
        if let Some((unit, arg)) = o.expire {
            match Self::deadline(cmd, unit, arg, cx) {
                Some(t) => at = Some(t),
                None => return,
            }
        }
        resp::bulk(cx.out, &value);
        let absolute = matches!(o.expire, Some(("EXAT" | "PXAT", _)));
        match at {
            Some(t) if absolute && t <= cx.now => {
                self.store.remove(key);
                cx.record(&[b"DEL", key]);
            }
            Some(t) => {
                self.store.set_expiry(key, Some(t));
                cx.record(&[b"PEXPIREAT", key, &i64_bytes(t as i64)]);
            }
            None if o.persist && self.store.get(key).is_some_and(|e| e.expires_at.is_some()) => {
                self.store.set_expiry(key, None);
                cx.record(&[b"PERSIST", key]);
            }
            None => {}
        }
    }

    pub(super) fn incr_by(&mut self, key: &[u8], by: i64, cx: &mut Ctx) {
        let cur = match self.store.get(key) {
            None => 0,
            Some(e) => match string2ll(&e.value) {
                Some(v) => v,
                None => return cx.not_integer(),
            },
        };
        let Some(new) = cur.checked_add(by) else {
            return cx.err("increment or decrement would overflow");
        };
        let value = i64_bytes(new);
        self.store.insert_keep_ttl(key, value.clone());
        cx.record(&[b"SET", key, &value, b"KEEPTTL"]);
        cx.int(new);
    }

    pub(super) fn incr_by_float(&mut self, key: &[u8], by: &[u8], cx: &mut Ctx) {
        let cur = match self.store.get(key) {
            None => Some(LongDouble::Zero { neg: false }),
            Some(e) => LongDouble::parse(&e.value),
        };
        let (Some(cur), Some(by)) = (cur, LongDouble::parse(by)) else {
            return cx.err("value is not a valid float");
        };
        let sum = cur + by;
        if !sum.is_finite() {
            return cx.err("increment would produce NaN or Infinity");
        }
        let value = sum.to_human();
        self.store.insert_keep_ttl(key, value.clone());
        cx.record(&[b"SET", key, &value, b"KEEPTTL"]);
        resp::bulk(cx.out, &value);
    }

    pub(super) fn getrange(&mut self, args: &[Vec<u8>], cx: &mut Ctx) {
        let (Some(mut start), Some(mut end)) = (string2ll(&args[2]), string2ll(&args[3])) else {
            return cx.not_integer();
        };
        let Some(e) = self.store.get(&args[1]) else {
            return resp::bulk(cx.out, b"");
        };
        let s = e.value.as_slice();
        let len = s.len() as i64;
        if start < 0 && end < 0 && start > end {
            return resp::bulk(cx.out, b"");
        }
        if start < 0 {
            start += len;
        }
        if end < 0 {
            end += len;
        }
        start = start.max(0);
        end = end.max(0);
        if end >= len {
            end = len - 1;
        }
        if start > end || len == 0 {
            resp::bulk(cx.out, b"");
        } else {
            resp::bulk(cx.out, &s[start as usize..=end as usize]);
        }
    }

    pub(super) fn setrange(&mut self, args: &[Vec<u8>], cx: &mut Ctx) {
        let (key, value) = (args[1].as_slice(), args[3].as_slice());
        let Some(offset) = string2ll(&args[2]) else {
            return cx.not_integer();
        };
        if offset < 0 {
            return cx.err("offset is out of range");
        }
        let cur = self.store.get(key).map(|e| e.value.len());
        if value.is_empty() {
            return cx.int(cur.unwrap_or(0) as i64);
        }
        let offset = offset as u64;
        if offset + value.len() as u64 > MAX_BULK as u64 {
            return string_too_long(cx);
        }
        let offset = offset as usize;
        if cur.is_none() {
            self.store.insert(key, Vec::new(), None);
        }
        let len = match self.store.value_mut(key) {
            Some(v) => {
                if v.len() < offset + value.len() {
                    v.resize(offset + value.len(), 0);
                }
                v[offset..offset + value.len()].copy_from_slice(value);
                v.len()
            }
            None => 0,
        };
        cx.record(&[b"SETRANGE", key, &args[2], value]);
        cx.int(len as i64);
    }
}

#!/usr/bin/env python3
"""Generates kv's command table (examples/kv/core/src/table_data.rs) from
Redis 7.0's src/commands.c: names, arity, flags, ACL categories, tips, key
specs and docs of the commands kv implements, so COMMAND replies say what
Redis says about them.
Usage: gen_table.py REDIS_SRC_DIR > src/table_data.rs && cargo fmt"""
import re, sys

SRC = open(sys.argv[1] + "/commands.c").read()

TOP = ["ping", "echo", "select", "quit", "client", "command", "config", "dbsize",
       "flushall", "flushdb", "time", "del", "unlink", "exists", "type", "rename",
       "renamenx", "keys", "scan", "expire", "pexpire", "expireat", "pexpireat",
       "expiretime", "pexpiretime", "persist", "ttl", "pttl", "touch", "get", "set",
       "setnx", "setex", "psetex", "getset", "getdel", "getex", "mget", "mset",
       "msetnx", "append", "strlen", "incr", "decr", "incrby", "decrby",
       "incrbyfloat", "getrange", "setrange"]
SUBS = {"client": ["id", "info", "list", "getname", "setname", "help"],
        "command": ["count", "docs", "info", "list", "help"],
        "config": ["get", "set", "help"]}

CMD_FLAGS = [("CMD_WRITE", "write"), ("CMD_READONLY", "readonly"), ("CMD_DENYOOM", "denyoom"),
             ("CMD_MODULE", "module"), ("CMD_ADMIN", "admin"), ("CMD_PUBSUB", "pubsub"),
             ("CMD_NOSCRIPT", "noscript"), ("CMD_BLOCKING", "blocking"), ("CMD_LOADING", "loading"),
             ("CMD_STALE", "stale"), ("CMD_SKIP_MONITOR", "skip_monitor"),
             ("CMD_SKIP_SLOWLOG", "skip_slowlog"), ("CMD_ASKING", "asking"), ("CMD_FAST", "fast"),
             ("CMD_NO_AUTH", "no_auth"), ("CMD_NO_MANDATORY_KEYS", "no_mandatory_keys"),
             ("CMD_NO_ASYNC_LOADING", "no_async_loading"), ("CMD_NO_MULTI", "no_multi"),
             ("CMD_MOVABLE_KEYS", "movablekeys"), ("CMD_ALLOW_BUSY", "allow_busy")]
ACL = ["keyspace", "read", "write", "set", "sortedset", "list", "hash", "string", "bitmap",
       "hyperloglog", "geo", "stream", "pubsub", "admin", "fast", "slow", "blocking",
       "dangerous", "connection", "transaction", "scripting"]
KEY_FLAGS = [("CMD_KEY_RO", "RO"), ("CMD_KEY_RW", "RW"), ("CMD_KEY_OW", "OW"), ("CMD_KEY_RM", "RM"),
             ("CMD_KEY_ACCESS", "access"), ("CMD_KEY_UPDATE", "update"), ("CMD_KEY_INSERT", "insert"),
             ("CMD_KEY_DELETE", "delete"), ("CMD_KEY_NOT_KEY", "not_key"),
             ("CMD_KEY_INCOMPLETE", "incomplete"), ("CMD_KEY_VARIABLE_FLAGS", "variable_flags")]


def split_top(s):
    """Splits a brace initializer's body on top-level commas."""
    parts, depth, cur, q = [], 0, "", False
    i = 0
    while i < len(s):
        c = s[i]
        if q:
            cur += c
            if c == "\\":
                cur += s[i + 1]
                i += 1
            elif c == '"':
                q = False
        elif c == '"':
            q = True
            cur += c
        elif c == "{":
            depth += 1
            cur += c
        elif c == "}":
            depth -= 1
            cur += c
        elif c == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += c
        i += 1
    if cur.strip():
        parts.append(cur.strip())
    return parts


def entry(table_start, name):
    """The initializer of command `name` in the table beginning at table_start."""
    i = SRC.index(table_start)
    m = re.compile(r'^\{"' + re.escape(name) + r'",.*\},?$', re.M).search(SRC, i)
    line = m.group(0).rstrip(",")
    return split_top(line[1:-1])


def unq(s):
    if s == "NULL":
        return None
    assert s.startswith('"'), s
    return bytes(s[1:-1], "utf-8").decode("unicode_escape")


def tips(name):
    m = re.search(r"const char \*" + re.escape(name) + r"\[\] = \{(.*?)\};", SRC, re.S)
    if not m:
        return []
    return [unq(t.strip()) for t in m.group(1).split(",\n") if t.strip() and t.strip() != "NULL"]


def flag_names(expr, table):
    bits = set(x.strip() for x in expr.split("|"))
    return [n for (f, n) in table if f in bits]


def key_specs(parts):
    out = []
    for p in parts:
        if not p.startswith("{{"):
            continue
        body = p[1:-1]
        for spec in split_top(body):
            f = split_top(spec[1:-1])
            notes = unq(f[0])
            kflags = flag_names(f[1], KEY_FLAGS)
            assert f[2] == "KSPEC_BS_INDEX" and f[4] == "KSPEC_FK_RANGE", f
            index = int(re.search(r"\{(-?\d+)\}", f[3]).group(1))
            last, step, limit = map(int, re.search(r"\{(-?\d+),(-?\d+),(-?\d+)\}", f[5]).groups())
            out.append((notes, kflags, index, last, step, limit))
    return out


def rs(s):
    return "None" if s is None else "Some(" + rstr(s) + ")"


def rstr(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def emit(parts, full, subs_ident, indent):
    flags_expr = parts[12]
    acl_expr = parts[13]
    flags = flag_names(flags_expr, CMD_FLAGS)
    acl = set()
    for a in acl_expr.split("|"):
        a = a.strip()
        if a.startswith("ACL_CATEGORY_"):
            acl.add(a[len("ACL_CATEGORY_"):].lower())
    fl = set(x.strip() for x in flags_expr.split("|"))
    if "CMD_WRITE" in fl: acl.add("write")
    if "CMD_READONLY" in fl and "scripting" not in acl: acl.add("read")
    if "CMD_ADMIN" in fl: acl |= {"admin", "dangerous"}
    if "CMD_FAST" in fl: acl.add("fast")
    if "CMD_BLOCKING" in fl: acl.add("blocking")
    if "fast" not in acl: acl.add("slow")
    cats = ["@" + c for c in ACL if c in acl]
    ks = key_specs(parts[14:])
    first = last = step = 0
    if len(ks) == 1:
        first, last, step = ks[0][2], ks[0][3], ks[0][4]
        if last >= 0:
            last += first
    elif len(ks) > 1:
        first = min(k[2] for k in ks)
        last = max(k[2] + k[3] if k[3] >= 0 else k[3] for k in ks)
        step = 1
    tip_ident = parts[9]
    pad = " " * indent
    o = []
    o.append(pad + "Cmd {")
    o.append(pad + f"    name: {rstr(full)},")
    o.append(pad + f"    summary: {rstr(unq(parts[1]))},")
    o.append(pad + f"    complexity: {rstr(unq(parts[2]))},")
    o.append(pad + f"    since: {rstr(unq(parts[3]))},")
    o.append(pad + f"    group: {rstr(parts[7][len('COMMAND_GROUP_'):].lower().replace('_', '-'))},")
    o.append(pad + f"    arity: {int(parts[11])},")
    o.append(pad + f"    flags: &[{', '.join(rstr(f) for f in flags)}],")
    o.append(pad + f"    acl: &[{', '.join(rstr(c) for c in cats)}],")
    o.append(pad + f"    tips: &[{', '.join(rstr(t) for t in tips(tip_ident))}],")
    o.append(pad + f"    keys: ({first}, {last}, {step}),")
    specs = []
    for (notes, kf, idx, l, s, lim) in ks:
        specs.append(f"KeySpec {{ notes: {rs(notes)}, flags: &[{', '.join(rstr(f) for f in kf)}], index: {idx}, lastkey: {l}, keystep: {s}, limit: {lim} }}")
    o.append(pad + f"    key_specs: &[{', '.join(specs)}],")
    o.append(pad + f"    subcommands: {subs_ident},")
    o.append(pad + "},")
    return "\n".join(o)


print("// Generated by examples/kv/core/tools/gen_table.py from Redis 7.0.15's")
print("// src/commands.c (BSD-3-Clause, Copyright (c) Redis Ltd.): what Redis says about")
print("// each command kv implements. Do not edit by hand: regenerate, then cargo fmt.")
print("use crate::table::{Cmd, KeySpec};")
print()
for parent, subs in SUBS.items():
    table = "struct redisCommand " + parent.upper() + "_Subcommands[] = {"
    print(f"pub static {parent.upper()}_SUBCOMMANDS: &[Cmd] = &[")
    for s in subs:
        print(emit(entry(table, s), parent + "|" + s, "&[]", 4))
    print("];")
    print()
print("pub static COMMANDS: &[Cmd] = &[")
for name in TOP:
    parts = entry("struct redisCommand redisCommandTable[] = {", name)
    subs = f"{name.upper()}_SUBCOMMANDS" if name in SUBS else "&[]"
    print(emit(parts, name, subs, 4))
print("];")

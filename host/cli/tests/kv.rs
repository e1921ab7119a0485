//! The kv unikernel against redis-cli (Debian's redis-tools): commands,
//! errors, malformed input, the configuration it reports, and persistence
//! across a restart and across `kill -9` of the monitor. (When writes are
//! flushed is tested in kv_durability.rs; agreement with redis-server in
//! kv_vs_redis.rs.)

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn cli(port: u16, args: &[&str]) -> String {
    let mut cmd = Command::new("redis-cli");
    cmd.args(["-p", &port.to_string()]).args(args);
    let o = output_within(cmd, Duration::from_secs(20));
    assert!(o.status.success(), "redis-cli {args:?}: {}", stderr(&o));
    stdout(&o).trim_end().to_string()
}

fn pong(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

fn start(disk: Option<&Path>) -> Guest {
    start_with(disk, &[])
}

fn start_with(disk: Option<&Path>, args: &[&str]) -> Guest {
    let image = example("kv");
    let disk_flag;
    let mut flags = vec![];
    if let Some(d) = disk {
        disk_flag = d.display().to_string();
        flags = vec!["--disk", disk_flag.as_str()];
    }
    start_guest(&image, 6379, &flags, args, pong)
}

fn fresh_disk(name: &str) -> std::path::PathBuf {
    let p = scratch().join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(8 << 20).unwrap();
    p
}

#[test]
fn commands_behave_like_redis() {
    let g = start(None);
    let p = g.port;
    assert_eq!(cli(p, &["PING"]), "PONG");
    assert_eq!(cli(p, &["ECHO", "hi there"]), "hi there");
    assert_eq!(cli(p, &["SET", "k", "v"]), "OK");
    assert_eq!(cli(p, &["GET", "k"]), "v");
    assert_eq!(cli(p, &["GET", "missing"]), "");
    assert_eq!(cli(p, &["SET", "k", "w", "NX"]), "");
    assert_eq!(cli(p, &["SET", "new", "w", "XX"]), "");
    assert_eq!(cli(p, &["INCR", "n"]), "1");
    assert_eq!(cli(p, &["INCRBY", "n", "41"]), "42");
    assert_eq!(cli(p, &["DECR", "n"]), "41");
    assert_eq!(
        cli(p, &["INCR", "k"]),
        "ERR value is not an integer or out of range"
    );
    assert_eq!(cli(p, &["MSET", "a", "1", "b", "2"]), "OK");
    assert_eq!(cli(p, &["MGET", "a", "b", "c"]), "1\n2"); // nil prints as an empty line
    assert_eq!(cli(p, &["EXISTS", "a", "b", "c"]), "2");
    let mut keys: Vec<String> = cli(p, &["KEYS", "[ab]"])
        .lines()
        .map(String::from)
        .collect();
    keys.sort();
    assert_eq!(keys, ["a", "b"]);
    assert_eq!(cli(p, &["DBSIZE"]), "4");
    assert_eq!(cli(p, &["DEL", "a", "b", "c"]), "2");
    assert_eq!(cli(p, &["TTL", "k"]), "-1");
    assert_eq!(cli(p, &["TTL", "nothing"]), "-2");
    assert_eq!(cli(p, &["EXPIRE", "k", "100"]), "1");
    let ttl: i64 = cli(p, &["TTL", "k"]).parse().unwrap();
    assert!((99..=100).contains(&ttl), "{ttl}");
    assert_eq!(cli(p, &["SET", "short", "x", "PX", "50"]), "OK");
    std::thread::sleep(Duration::from_millis(120));
    assert_eq!(cli(p, &["GET", "short"]), "");
    assert_eq!(cli(p, &["FLUSHALL"]), "OK");
    assert_eq!(cli(p, &["DBSIZE"]), "0");
}

#[test]
fn unknown_commands_and_bad_arguments_are_errors_not_crashes() {
    let g = start(None);
    let p = g.port;
    assert_eq!(
        cli(p, &["FROBNICATE", "x"]),
        "ERR unknown command 'FROBNICATE', with args beginning with: 'x'"
    );
    assert_eq!(
        cli(p, &["GET"]),
        "ERR wrong number of arguments for 'get' command"
    );
    assert_eq!(
        cli(p, &["SET", "k", "v", "EX", "-5"]),
        "ERR invalid expire time in 'set' command"
    );
    assert_eq!(cli(p, &["SET", "k", "v", "BOGUS"]), "ERR syntax error");
    assert_eq!(cli(p, &["PING"]), "PONG");
}

#[test]
fn malformed_resp_gets_an_error_and_the_server_survives() {
    let g = start(None);
    for garbage in [
        &b"*2\r\n$3\r\nGET\r\n+oops\r\n"[..],
        b"*x\r\n",
        b"*1\r\n$-5\r\n",
        b"*1\r\n$99999999999\r\n",
        b"*1\r\nGET\r\n",
        b"SET k \"unbalanced\r\n",
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", g.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(garbage).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(
            out.starts_with("-ERR Protocol error"),
            "{garbage:?}: {out:?}"
        );
    }
    assert!(pong(g.port));
}

#[test]
fn pipelined_commands_in_one_write() {
    let g = start(None);
    let mut s = TcpStream::connect(("127.0.0.1", g.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = Vec::new();
    for i in 0..200 {
        req.extend_from_slice(
            format!("*3\r\n$3\r\nSET\r\n$4\r\nk{i:03}\r\n$1\r\nv\r\n").as_bytes(),
        );
    }
    req.extend_from_slice(b"*1\r\n$6\r\nDBSIZE\r\n");
    s.write_all(&req).unwrap();
    let mut got = Vec::new();
    let want = "+OK\r\n".repeat(200) + ":200\r\n";
    let mut buf = [0u8; 4096];
    while got.len() < want.len() {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed early");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(String::from_utf8(got).unwrap(), want);
}

#[test]
fn data_survives_a_restart() {
    let disk = fresh_disk("kv-restart.img");
    let g = start(Some(&disk));
    assert_eq!(cli(g.port, &["SET", "city", "Lisbon"]), "OK");
    assert_eq!(cli(g.port, &["INCRBY", "visits", "7"]), "7");
    assert_eq!(cli(g.port, &["SET", "gone", "x"]), "OK");
    assert_eq!(cli(g.port, &["DEL", "gone"]), "1");
    assert_eq!(cli(g.port, &["EXPIRE", "city", "1000"]), "1");
    assert_eq!(cli(g.port, &["APPEND", "log", "a"]), "1");
    assert_eq!(cli(g.port, &["APPEND", "log", "bc"]), "3");
    assert_eq!(cli(g.port, &["SETRANGE", "log", "5", "z"]), "6");
    assert_eq!(cli(g.port, &["INCRBYFLOAT", "f", "10.50"]), "10.5");
    assert_eq!(cli(g.port, &["INCRBYFLOAT", "f", "0.1"]), "10.6");
    assert_eq!(cli(g.port, &["SET", "old", "o", "EX", "500"]), "OK");
    assert_eq!(cli(g.port, &["RENAME", "old", "new"]), "OK");
    assert_eq!(cli(g.port, &["SET", "short", "s", "PX", "300"]), "OK");
    assert_eq!(cli(g.port, &["GETEX", "visits", "EX", "100"]), "7");
    assert_eq!(cli(g.port, &["GETEX", "visits", "PERSIST"]), "7");
    drop(g);
    // "short" expires while the server is down.
    std::thread::sleep(Duration::from_millis(400));
    let g = start(Some(&disk));
    assert_eq!(cli(g.port, &["GET", "city"]), "Lisbon");
    assert_eq!(cli(g.port, &["GET", "visits"]), "7");
    assert_eq!(cli(g.port, &["TTL", "visits"]), "-1");
    assert_eq!(cli(g.port, &["GET", "gone"]), "");
    assert_eq!(cli(g.port, &["GET", "log"]), "abc\0\0z");
    assert_eq!(cli(g.port, &["GET", "f"]), "10.6");
    assert_eq!(cli(g.port, &["EXISTS", "old", "new", "short"]), "1");
    let ttl: i64 = cli(g.port, &["TTL", "new"]).parse().unwrap();
    assert!((490..=500).contains(&ttl), "{ttl}");
    let ttl: i64 = cli(g.port, &["TTL", "city"]).parse().unwrap();
    assert!(
        (990..=1000).contains(&ttl),
        "expiry is absolute and survives: {ttl}"
    );
}

/// A reply means the record reached the disk file (the host's page cache
/// keeps it when the monitor is killed). Whether it was also flushed is
/// what kv_durability.rs checks.
#[test]
fn acknowledged_writes_survive_kill_9() {
    let disk = fresh_disk("kv-kill9.img");
    let g = start(Some(&disk));
    for i in 0..50 {
        assert_eq!(
            cli(g.port, &["SET", &format!("key{i}"), &format!("value{i}")]),
            "OK"
        );
    }
    // The replies above were sent after the log was flushed to the file.
    g.kill9();
    let g = start(Some(&disk));
    assert_eq!(cli(g.port, &["DBSIZE"]), "50");
    assert_eq!(cli(g.port, &["GET", "key49"]), "value49");
}

#[test]
fn config_reports_the_policy_it_runs_with_and_changes_it() {
    let disk = fresh_disk("kv-config.img");
    let g = start_with(Some(&disk), &["--appendfsync", "everysec"]);
    assert_eq!(
        cli(g.port, &["CONFIG", "GET", "appendfsync"]),
        "appendfsync\neverysec"
    );
    assert_eq!(
        cli(g.port, &["CONFIG", "GET", "appendonly"]),
        "appendonly\nyes"
    );
    assert_eq!(cli(g.port, &["CONFIG", "SET", "appendfsync", "no"]), "OK");
    assert_eq!(
        cli(g.port, &["CONFIG", "GET", "append*"]),
        "appendonly\nyes\nappendfsync\nno"
    );
    drop(g);
    let g = start(None);
    assert_eq!(
        cli(g.port, &["CONFIG", "GET", "appendonly"]),
        "appendonly\nno"
    );
    assert_eq!(
        cli(g.port, &["CONFIG", "GET", "appendfsync"]),
        "appendfsync\nalways"
    );
    assert_eq!(cli(g.port, &["CLIENT", "SETNAME", "me"]), "OK");
    assert_eq!(
        cli(g.port, &["CLIENT", "GETNAME"]),
        "",
        "a new connection has no name"
    );
    let count: usize = cli(g.port, &["COMMAND", "COUNT"]).parse().unwrap();
    assert!(count > 40, "{count}");
}

/// Interactive redis-cli (on a terminal) builds its help from `COMMAND
/// DOCS`: `HELP @connection` then lists kv's connection commands (its
/// built-in fallback for servers without COMMAND DOCS would also list
/// AUTH, HELLO and others kv does not have).
#[test]
fn interactive_redis_cli_takes_its_help_from_kv() {
    use std::os::unix::io::{AsRawFd, FromRawFd};
    use std::os::unix::process::CommandExt;
    let g = start(None);
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two new descriptors into the given integers.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty");
    // SAFETY: the descriptors are new and owned here from now on.
    let (master, slave) = unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    };
    let mut cmd = Command::new("redis-cli");
    cmd.args(["-p", &g.port.to_string()])
        .env("TERM", "dumb")
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave);
    // SAFETY: only async-signal-safe calls between fork and exec: a new
    // session with the terminal as its controlling terminal.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            libc::ioctl(0, libc::TIOCSCTTY, 0);
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("redis-cli");
    let mut out = Vec::new();
    let read_until = |out: &mut Vec<u8>, needle: &str| {
        let start = std::time::Instant::now();
        while !String::from_utf8_lossy(out).contains(needle) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no {needle:?} in {}",
                String::from_utf8_lossy(out)
            );
            let mut pfd = libc::pollfd {
                fd: master.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, 100) } > 0 {
                let mut buf = [0u8; 4096];
                match (&master).read(&mut buf) {
                    Ok(n) if n > 0 => out.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
        }
    };
    let prompt = format!("127.0.0.1:{}> ", g.port);
    read_until(&mut out, &prompt);
    (&master).write_all(b"HELP @connection\n").unwrap();
    read_until(&mut out, "SELECT");
    read_until(&mut out, &prompt);
    let help = String::from_utf8_lossy(&out).into_owned();
    (&master).write_all(b"quit\n").unwrap();
    let _ = child.wait();
    for present in [
        "CLIENT SETNAME",
        "CLIENT GETNAME",
        "CLIENT LIST",
        "ECHO",
        "PING",
    ] {
        assert!(help.contains(present), "{present} missing from:\n{help}");
    }
    for absent in ["AUTH", "HELLO", "CLIENT KILL", "RESET"] {
        assert!(!help.contains(absent), "{absent} listed in:\n{help}");
    }
}

#[test]
fn a_disk_holding_something_else_is_not_overwritten() {
    let p = scratch().join("kv-foreign.img");
    std::fs::write(&p, vec![0x55u8; 1 << 20]).unwrap();
    let o = run(
        &example("kv"),
        &["--disk", p.to_str().unwrap(), "--net", "user"],
        &[],
    );
    assert!(stdout(&o).contains("not a kv log"), "{}", stdout(&o));
    assert_eq!(status(&o), 1);
    assert!(std::fs::read(&p).unwrap().iter().all(|&b| b == 0x55));
}

//! A small RESP2 client for the kv tests: sends commands as arrays of bulk
//! strings and reads exactly one reply each, keeping its raw bytes (so
//! replies from kv and redis-server can be compared byte for byte).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A parsed reply.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reply {
    Simple(Vec<u8>),
    Error(Vec<u8>),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The reply with every array's elements sorted (for replies whose
    /// order is unspecified, like KEYS).
    pub fn sorted(&self) -> Reply {
        match self {
            Reply::Array(Some(items)) => {
                let mut v: Vec<Reply> = items.iter().map(Reply::sorted).collect();
                v.sort();
                Reply::Array(Some(v))
            }
            other => other.clone(),
        }
    }
}

pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

fn line(r: &mut impl BufRead, raw: &mut Vec<u8>) -> std::io::Result<Vec<u8>> {
    let mut l = Vec::new();
    r.read_until(b'\n', &mut l)?;
    if !l.ends_with(b"\r\n") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!(
                "reply line not terminated: {:?}",
                String::from_utf8_lossy(&l)
            ),
        ));
    }
    raw.extend_from_slice(&l);
    l.truncate(l.len() - 2);
    Ok(l)
}

fn number(b: &[u8]) -> i64 {
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad number in reply: {:?}", String::from_utf8_lossy(b)))
}

/// Reads one reply; appends its raw bytes to `raw`.
pub fn read_reply(r: &mut impl BufRead, raw: &mut Vec<u8>) -> std::io::Result<Reply> {
    let l = line(r, raw)?;
    let (kind, rest) = l.split_first().expect("empty reply line");
    Ok(match kind {
        b'+' => Reply::Simple(rest.to_vec()),
        b'-' => Reply::Error(rest.to_vec()),
        b':' => Reply::Int(number(rest)),
        b'$' => {
            let n = number(rest);
            if n < 0 {
                Reply::Bulk(None)
            } else {
                let mut data = vec![0u8; n as usize + 2];
                std::io::Read::read_exact(r, &mut data)?;
                raw.extend_from_slice(&data);
                data.truncate(n as usize);
                Reply::Bulk(Some(data))
            }
        }
        b'*' => {
            let n = number(rest);
            if n < 0 {
                Reply::Array(None)
            } else {
                let mut items = Vec::new();
                for _ in 0..n {
                    items.push(read_reply(r, raw)?);
                }
                Reply::Array(Some(items))
            }
        }
        other => panic!("unknown reply type {:?}", *other as char),
    })
}

/// Encodes a command as a RESP array of bulk strings.
pub fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

impl Conn {
    pub fn connect(port: u16) -> Conn {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.set_nodelay(true).unwrap();
        Conn {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        }
    }

    /// The local port of this connection (how the server sees it).
    pub fn local_port(&self) -> u16 {
        self.writer.local_addr().unwrap().port()
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("send");
    }

    /// Reads one reply: parsed and raw.
    pub fn reply(&mut self) -> (Reply, Vec<u8>) {
        let mut raw = Vec::new();
        let r = read_reply(&mut self.reader, &mut raw).expect("read reply");
        (r, raw)
    }

    /// Sends a command and reads its reply.
    pub fn cmd(&mut self, args: &[&[u8]]) -> (Reply, Vec<u8>) {
        self.send_raw(&encode(args));
        self.reply()
    }

    /// `cmd` with string arguments.
    pub fn call(&mut self, args: &[&str]) -> Reply {
        let a: Vec<&[u8]> = args.iter().map(|s| s.as_bytes()).collect();
        self.cmd(&a).0
    }
}

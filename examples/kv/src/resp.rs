//! RESP (REdis Serialization Protocol) request parsing and reply encoding.
//!
//! Requests are arrays of bulk strings (what redis-cli and client libraries
//! send) or inline commands (`PING\r\n`, what telnet users type). Input is
//! untrusted: lengths are parsed strictly and bounded, and anything
//! malformed is a [`Error::Protocol`] (the connection gets an error reply
//! and is closed), never a panic.

use alloc::vec::Vec;

/// Largest bulk string accepted.
pub const MAX_BULK: usize = 8 << 20;
/// Most arguments in one command.
pub const MAX_ARGS: usize = 64 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub enum Error {
    /// More bytes are needed.
    Incomplete,
    /// The input is not RESP.
    Protocol(&'static str),
}

fn line(buf: &[u8]) -> Result<(&[u8], usize), Error> {
    let end = buf
        .windows(2)
        .position(|w| w == b"\r\n")
        .ok_or(Error::Incomplete)?;
    Ok((&buf[..end], end + 2))
}

fn number(digits: &[u8]) -> Result<i64, Error> {
    let s = core::str::from_utf8(digits).map_err(|_| Error::Protocol("invalid length"))?;
    s.parse::<i64>()
        .map_err(|_| Error::Protocol("invalid length"))
}

/// Parses one command from the start of `buf`: its arguments and the
/// number of bytes it used.
pub fn parse(buf: &[u8]) -> Result<(Vec<Vec<u8>>, usize), Error> {
    if buf.is_empty() {
        return Err(Error::Incomplete);
    }
    if buf[0] != b'*' {
        // Inline command: words separated by spaces, up to CRLF (or LF).
        let end = buf
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(Error::Incomplete)?;
        if end > MAX_BULK {
            return Err(Error::Protocol("inline command too long"));
        }
        let text = buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]);
        let args = text
            .split(|&b| b == b' ')
            .filter(|w| !w.is_empty())
            .map(|w| w.to_vec())
            .collect();
        return Ok((args, end + 1));
    }
    let (head, mut pos) = line(&buf[1..]).map(|(l, n)| (l, n + 1))?;
    let count = number(head)?;
    if count < 0 || count as usize > MAX_ARGS {
        return Err(Error::Protocol("invalid multibulk length"));
    }
    let mut args = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let rest = &buf[pos..];
        if rest.is_empty() {
            return Err(Error::Incomplete);
        }
        if rest[0] != b'$' {
            return Err(Error::Protocol("expected '$'"));
        }
        let (len, n) = line(&rest[1..])?;
        let len = number(len)?;
        if len < 0 || len as usize > MAX_BULK {
            return Err(Error::Protocol("invalid bulk length"));
        }
        let len = len as usize;
        let start = pos + 1 + n;
        let end = start
            .checked_add(len)
            .ok_or(Error::Protocol("invalid bulk length"))?;
        if buf.len() < end + 2 {
            return Err(Error::Incomplete);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(Error::Protocol("bulk string not terminated by CRLF"));
        }
        args.push(buf[start..end].to_vec());
        pos = end + 2;
    }
    Ok((args, pos))
}

/// Reply encoders.
pub fn simple(out: &mut Vec<u8>, s: &str) {
    out.push(b'+');
    out.extend_from_slice(s.as_bytes());
    out.extend_from_slice(b"\r\n");
}

pub fn error(out: &mut Vec<u8>, s: &str) {
    out.push(b'-');
    out.extend_from_slice(s.as_bytes());
    out.extend_from_slice(b"\r\n");
}

pub fn integer(out: &mut Vec<u8>, n: i64) {
    out.extend_from_slice(alloc::format!(":{n}\r\n").as_bytes());
}

pub fn bulk(out: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        None => out.extend_from_slice(b"$-1\r\n"),
        Some(b) => {
            out.extend_from_slice(alloc::format!("${}\r\n", b.len()).as_bytes());
            out.extend_from_slice(b);
            out.extend_from_slice(b"\r\n");
        }
    }
}

pub fn array_header(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(alloc::format!("*{n}\r\n").as_bytes());
}

/// Encodes a command as a RESP array (for the append-only log).
pub fn encode_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    array_header(out, args.len());
    for a in args {
        bulk(out, Some(a));
    }
}

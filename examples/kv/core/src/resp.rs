//! RESP (REdis Serialization Protocol) request parsing and reply encoding.
//!
//! Requests are arrays of bulk strings (what redis-cli and client libraries
//! send) or inline commands (`PING\r\n`, what telnet users type), parsed as
//! Redis 7.0 parses them (`processMultibulkBuffer`, `processInlineBuffer`
//! and `sdssplitargs` in its networking.c and sds.c), with the same error
//! messages. Input is untrusted: lengths are parsed strictly and bounded
//! (more tightly than Redis: see [`MAX_BULK`] and [`MAX_ARGS`]), and
//! anything malformed is an [`Error::Protocol`] (the connection gets an
//! error reply and is closed), never a panic.
//!
//! This file is self-contained (it uses only `alloc`) because the fuzz
//! target includes it directly.

use alloc::string::String;
use alloc::vec::Vec;

/// Largest bulk string accepted (Redis: `proto-max-bulk-len`, 512 MiB; a
/// unikernel with tens of MiB of memory takes less).
pub const MAX_BULK: usize = 8 << 20;
/// Most arguments in one command (Redis: `INT_MAX`).
pub const MAX_ARGS: usize = 64 * 1024;
/// Longest inline command or length line (Redis: `PROTO_INLINE_MAX_SIZE`).
pub const MAX_INLINE: usize = 64 * 1024;

/// A command's arguments.
pub type Args = Vec<Vec<u8>>;

#[derive(Debug, PartialEq, Eq)]
pub enum Error {
    /// More bytes are needed.
    Incomplete,
    /// The input is not RESP: the text of the error reply (after `ERR `).
    Protocol(String),
}

fn protocol(what: &str) -> Error {
    Error::Protocol(alloc::format!("Protocol error: {what}"))
}

/// Redis's `string2ll`: a strict decimal `i64` (no sign but `-`, no
/// leading zeros, no spaces, at most 20 characters).
pub fn string2ll(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() >= 21 {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let (negative, digits) = match s.split_first() {
        Some((b'-', rest)) if !rest.is_empty() => (true, rest),
        _ => (false, s),
    };
    if !(b'1'..=b'9').contains(&digits[0]) {
        return None;
    }
    let mut v: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    if negative {
        if v > i64::MAX as u64 + 1 {
            return None;
        }
        Some((v as i64).wrapping_neg())
    } else {
        i64::try_from(v).ok()
    }
}

/// Index of the first `\r` in `buf`, looking no further than a length
/// line can be.
fn find_cr(buf: &[u8]) -> Option<usize> {
    buf.iter().take(MAX_INLINE + 2).position(|&b| b == b'\r')
}

/// Parses one command from the start of `buf`: its arguments (empty for
/// an empty line or a `*0`/negative count, which Redis ignores) and the
/// number of bytes it used.
pub fn parse(buf: &[u8]) -> Result<(Args, usize), Error> {
    match buf.first() {
        None => Err(Error::Incomplete),
        Some(b'*') => parse_multibulk(buf, false),
        Some(_) => parse_inline(buf),
    }
}

/// Parses one record of the append-only log: a multibulk command whose
/// every line and payload ends in CRLF (a client's stream is parsed as
/// leniently as Redis does, but a torn record must not parse).
pub fn parse_record(buf: &[u8]) -> Result<(Args, usize), Error> {
    match buf.first() {
        None => Err(Error::Incomplete),
        Some(b'*') => parse_multibulk(buf, true),
        Some(_) => Err(protocol("not a record")),
    }
}

/// Whether the two bytes at `at` are CRLF (always, unless `strict`).
fn crlf(buf: &[u8], at: usize, strict: bool) -> bool {
    !strict || &buf[at..at + 2] == b"\r\n"
}

fn parse_multibulk(buf: &[u8], strict: bool) -> Result<(Args, usize), Error> {
    let Some(cr) = find_cr(buf) else {
        return if buf.len() > MAX_INLINE {
            Err(protocol("too big mbulk count string"))
        } else {
            Err(Error::Incomplete)
        };
    };
    // Redis waits for the byte after '\r' and skips it unchecked.
    if cr + 2 > buf.len() {
        return Err(Error::Incomplete);
    }
    if !crlf(buf, cr, strict) {
        return Err(protocol("invalid multibulk length"));
    }
    let count = match string2ll(&buf[1..cr]) {
        Some(n) if n <= i64::from(i32::MAX) => n,
        _ => return Err(protocol("invalid multibulk length")),
    };
    let mut pos = cr + 2;
    if count <= 0 {
        return Ok((Vec::new(), pos));
    }
    if count as usize > MAX_ARGS {
        return Err(protocol("invalid multibulk length"));
    }
    let mut args = Vec::with_capacity((count as usize).min(1024));
    for _ in 0..count {
        let rest = &buf[pos..];
        let Some(cr) = find_cr(rest) else {
            return if rest.len() > MAX_INLINE {
                Err(protocol("too big bulk count string"))
            } else {
                Err(Error::Incomplete)
            };
        };
        if cr + 2 > rest.len() {
            return Err(Error::Incomplete);
        }
        if !crlf(rest, cr, strict) {
            return Err(protocol("invalid bulk length"));
        }
        if rest[0] != b'$' {
            let mut msg = String::from("Protocol error: expected '$', got '");
            msg.push(char::from(rest[0]));
            msg.push('\'');
            return Err(Error::Protocol(msg));
        }
        let len = match string2ll(&rest[1..cr]) {
            Some(n) if n >= 0 && n as u64 <= MAX_BULK as u64 => n as usize,
            _ => return Err(protocol("invalid bulk length")),
        };
        let start = pos + cr + 2;
        // The payload, then two bytes Redis skips without looking at them.
        if buf.len() < start + len + 2 {
            return Err(Error::Incomplete);
        }
        if !crlf(buf, start + len, strict) {
            return Err(protocol("bulk string not terminated by CRLF"));
        }
        args.push(buf[start..start + len].to_vec());
        pos = start + len + 2;
    }
    Ok((args, pos))
}

fn parse_inline(buf: &[u8]) -> Result<(Args, usize), Error> {
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() > MAX_INLINE {
            Err(protocol("too big inline request"))
        } else {
            Err(Error::Incomplete)
        };
    };
    if nl > MAX_INLINE {
        return Err(protocol("too big inline request"));
    }
    let line = buf[..nl].strip_suffix(b"\r").unwrap_or(&buf[..nl]);
    match split_args(line) {
        Some(args) if args.len() <= MAX_ARGS => Ok((args, nl + 1)),
        Some(_) => Err(protocol("invalid multibulk length")),
        None => Err(protocol("unbalanced quotes in request")),
    }
}

/// C's `isspace` in the C locale.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Redis's `sdssplitargs`: words separated by spaces, with "double
/// quoted" strings (escapes `\n \r \t \b \a \xHH`, `\c` for any other c)
/// and 'single quoted' strings (only `\'`). A closing quote must be
/// followed by a space or the end. `None` for unbalanced quotes. Like
/// the C original, the line ends at a NUL byte.
pub fn split_args(line: &[u8]) -> Option<Args> {
    let line = match line.iter().position(|&b| b == 0) {
        Some(end) => &line[..end],
        None => line,
    };
    let at = |i: usize| line.get(i).copied().unwrap_or(0);
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut args = Vec::new();
    let mut p = 0;
    loop {
        while p < line.len() && is_space(line[p]) {
            p += 1;
        }
        if p >= line.len() {
            return Some(args);
        }
        let (mut inq, mut insq) = (false, false);
        let mut cur = Vec::new();
        loop {
            let c = at(p);
            if inq {
                match (c, hex(at(p + 2)), hex(at(p + 3))) {
                    (b'\\', Some(h), Some(l)) if at(p + 1) == b'x' => {
                        cur.push(h * 16 + l);
                        p += 3;
                    }
                    (b'\\', _, _) if at(p + 1) != 0 => {
                        p += 1;
                        cur.push(match at(p) {
                            b'n' => b'\n',
                            b'r' => b'\r',
                            b't' => b'\t',
                            b'b' => 0x08,
                            b'a' => 0x07,
                            other => other,
                        });
                    }
                    (b'"', _, _) => {
                        if at(p + 1) != 0 && !is_space(at(p + 1)) {
                            return None;
                        }
                        p += 1;
                        break;
                    }
                    (0, _, _) => return None,
                    _ => cur.push(c),
                }
            } else if insq {
                match c {
                    b'\\' if at(p + 1) == b'\'' => {
                        p += 1;
                        cur.push(b'\'');
                    }
                    b'\'' => {
                        if at(p + 1) != 0 && !is_space(at(p + 1)) {
                            return None;
                        }
                        p += 1;
                        break;
                    }
                    0 => return None,
                    _ => cur.push(c),
                }
            } else {
                match c {
                    b' ' | b'\n' | b'\r' | b'\t' | 0 => {
                        if c != 0 {
                            p += 1;
                        }
                        break;
                    }
                    b'"' => inq = true,
                    b'\'' => insq = true,
                    _ => cur.push(c),
                }
            }
            p += 1;
        }
        args.push(cur);
    }
}

// Reply encoders.

pub fn simple(out: &mut Vec<u8>, s: &str) {
    out.push(b'+');
    out.extend_from_slice(s.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// An error reply. `msg` is the whole text (`ERR ...`, `WRONGTYPE ...`);
/// CR and LF become spaces so a message quoting client bytes stays one line.
pub fn error(out: &mut Vec<u8>, msg: &[u8]) {
    out.push(b'-');
    out.extend(msg.iter().map(|&b| match b {
        b'\r' | b'\n' => b' ',
        b => b,
    }));
    out.extend_from_slice(b"\r\n");
}

/// `-ERR msg`.
pub fn err(out: &mut Vec<u8>, msg: &str) {
    let mut m = Vec::with_capacity(msg.len() + 4);
    m.extend_from_slice(b"ERR ");
    m.extend_from_slice(msg.as_bytes());
    error(out, &m);
}

pub fn integer(out: &mut Vec<u8>, n: i64) {
    out.push(b':');
    out.extend_from_slice(alloc::format!("{n}").as_bytes());
    out.extend_from_slice(b"\r\n");
}

pub fn bulk(out: &mut Vec<u8>, b: &[u8]) {
    out.push(b'$');
    out.extend_from_slice(alloc::format!("{}", b.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(b);
    out.extend_from_slice(b"\r\n");
}

/// A bulk string, or the null bulk string for `None`.
pub fn opt_bulk(out: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        Some(b) => bulk(out, b),
        None => null(out),
    }
}

/// RESP2's null (bulk) reply.
pub fn null(out: &mut Vec<u8>) {
    out.extend_from_slice(b"$-1\r\n");
}

pub fn array_header(out: &mut Vec<u8>, n: usize) {
    out.push(b'*');
    out.extend_from_slice(alloc::format!("{n}").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Encodes a command as a RESP array (for the append-only log).
pub fn encode_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    array_header(out, args.len());
    for a in args {
        bulk(out, a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn ok(input: &[u8]) -> (Vec<Vec<u8>>, usize) {
        parse(input).unwrap_or_else(|e| panic!("{input:?}: {e:?}"))
    }

    fn proto(input: &[u8]) -> String {
        match parse(input) {
            Err(Error::Protocol(m)) => m,
            other => panic!("{input:?}: expected a protocol error, got {other:?}"),
        }
    }

    #[test]
    fn multibulk_commands_parse_and_report_their_length() {
        let req = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nPING\r\n";
        let (args, used) = ok(req);
        assert_eq!(args, vec![b"GET".to_vec(), b"k".to_vec()]);
        assert_eq!(used, 20);
        let (args, used2) = ok(&req[used..]);
        assert_eq!(args, vec![b"PING".to_vec()]);
        assert_eq!(used + used2, req.len());
    }

    #[test]
    fn binary_payloads_are_kept_verbatim() {
        let (args, _) = ok(b"*2\r\n$3\r\nSET\r\n$5\r\na\r\n\0b\r\n");
        assert_eq!(args[1], b"a\r\n\0b");
    }

    #[test]
    fn every_proper_prefix_is_incomplete() {
        let req = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n";
        for n in 0..req.len() {
            assert_eq!(parse(&req[..n]), Err(Error::Incomplete), "prefix {n}");
        }
        assert_eq!(ok(req).1, req.len());
        for n in 1..7 {
            assert_eq!(parse(&b"PING\r\n"[..n - 1]), Err(Error::Incomplete));
        }
    }

    #[test]
    fn empty_and_negative_counts_are_ignored_like_redis() {
        assert_eq!(ok(b"*0\r\n"), (vec![], 4));
        assert_eq!(ok(b"*-1\r\n"), (vec![], 5));
        assert_eq!(ok(b"\r\n"), (vec![], 2));
        assert_eq!(ok(b"   \n"), (vec![], 4));
    }

    #[test]
    fn malformed_requests_get_redis_messages() {
        assert_eq!(proto(b"*x\r\n"), "Protocol error: invalid multibulk length");
        assert_eq!(
            proto(b"*01\r\n"),
            "Protocol error: invalid multibulk length"
        );
        assert_eq!(
            proto(b"*3000000000\r\n"),
            "Protocol error: invalid multibulk length"
        );
        assert_eq!(
            proto(b"*2\r\n$3\r\nGET\r\n+oops\r\n"),
            "Protocol error: expected '$', got '+'"
        );
        assert_eq!(
            proto(b"*1\r\n$-1\r\n"),
            "Protocol error: invalid bulk length"
        );
        assert_eq!(
            proto(b"*1\r\n$99999999999\r\n"),
            "Protocol error: invalid bulk length"
        );
        assert_eq!(
            proto(b"SET k \"unterminated\r\n"),
            "Protocol error: unbalanced quotes in request"
        );
        let long = vec![b'a'; MAX_INLINE + 1];
        assert_eq!(proto(&long), "Protocol error: too big inline request");
        let mut star = vec![b'*'];
        star.extend(vec![b'1'; MAX_INLINE + 1]);
        assert_eq!(proto(&star), "Protocol error: too big mbulk count string");
    }

    #[test]
    fn the_two_bytes_after_a_payload_are_skipped_unchecked_like_redis() {
        // Redis trusts the length and does not look at the CRLF.
        let (args, used) = ok(b"*1\r\n$3\r\nGETXX\r\n");
        assert_eq!(args, vec![b"GET".to_vec()]);
        assert_eq!(used, 13);
    }

    #[test]
    fn log_records_must_be_terminated_where_client_input_need_not_be() {
        assert!(parse_record(b"*1\r\n$3\r\nGETXX").is_err());
        assert!(parse_record(b"*1\r\n$3\r\nGET\0\0").is_err());
        assert!(parse_record(b"*1\r\n$3\0\0GET\r\n").is_err());
        assert!(parse_record(b"*1\0\0$3\r\nGET\r\n").is_err());
        assert!(parse_record(b"PING\r\n").is_err());
        assert_eq!(parse_record(b"*1\r\n$3\r\nGET\r\n").unwrap().1, 13);
        assert_eq!(parse_record(b"*1\r\n$3\r\nGE"), Err(Error::Incomplete));
    }

    #[test]
    fn inline_commands_split_like_sdssplitargs() {
        let words = |s: &[u8]| split_args(s).unwrap();
        assert_eq!(
            words(b"  SET  k   v "),
            vec![b"SET".to_vec(), b"k".to_vec(), b"v".to_vec()]
        );
        assert_eq!(
            words(b"SET k \"a b\\x41\\n\\\"\""),
            vec![b"SET".to_vec(), b"k".to_vec(), b"a bA\n\"".to_vec()]
        );
        assert_eq!(
            words(b"SET k 'it\\'s'"),
            vec![b"SET".to_vec(), b"k".to_vec(), b"it's".to_vec()]
        );
        assert_eq!(
            words(b"SET k \"\""),
            vec![b"SET".to_vec(), b"k".to_vec(), b"".to_vec()]
        );
        assert_eq!(
            split_args(b"SET k \"a\"b"),
            None,
            "closing quote must end the word"
        );
        assert_eq!(split_args(b"SET k 'a"), None);
        assert_eq!(words(b"PING\0 ignored"), vec![b"PING".to_vec()]);
        let (args, used) = ok(b"ECHO \"x y\"\r\nPING\r\n");
        assert_eq!(args, vec![b"ECHO".to_vec(), b"x y".to_vec()]);
        assert_eq!(used, 12);
    }

    #[test]
    fn string2ll_is_strict() {
        for good in [
            "0",
            "1",
            "-1",
            "9223372036854775807",
            "-9223372036854775808",
            "100",
        ] {
            assert_eq!(string2ll(good.as_bytes()), good.parse().ok(), "{good}");
        }
        for bad in [
            "",
            "-",
            "+1",
            "01",
            "-0",
            " 1",
            "1 ",
            "1.0",
            "9223372036854775808",
            "-9223372036854775809",
            "99999999999999999999",
            "0x10",
        ] {
            assert_eq!(string2ll(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn encoders_write_resp2() {
        let mut out = Vec::new();
        simple(&mut out, "OK");
        err(&mut out, "bad\r\nthing");
        integer(&mut out, -7);
        bulk(&mut out, b"hi");
        null(&mut out);
        array_header(&mut out, 2);
        encode_command(&mut out, &[b"DEL", b"k"]);
        assert_eq!(
            out,
            b"+OK\r\n-ERR bad  thing\r\n:-7\r\n$2\r\nhi\r\n$-1\r\n*2\r\n*2\r\n$3\r\nDEL\r\n$1\r\nk\r\n"
        );
    }
}

//! The little HTTP/1.1 the API needs, over a Unix socket: one request per
//! connection (`Connection: close`), bodies by `Content-Length`, responses
//! with a length or, for a followed log, until the connection closes.
//!
//! Parsing is `httparse`'s; the server crates of the field (hyper,
//! tiny_http) either want an async runtime or have no Unix-socket
//! listener, and one request per connection is all a local API needs.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Largest request head and body the daemon reads.
const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 1 << 20;
/// A client that sends nothing for this long is dropped.
const READ_LIMIT: Duration = Duration::from_secs(10);

pub struct Request {
    pub method: String,
    /// The path without the query.
    pub path: String,
    pub query: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn query(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A boolean query flag: present as `1`, `true` or empty.
    pub fn flag(&self, key: &str) -> bool {
        matches!(self.query(key), Some("" | "1" | "true"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("reading the request: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed HTTP request: {0}")]
    Parse(String),
    #[error("request head or body too large")]
    TooLarge,
}

/// Reads one request.
pub fn read_request(s: &mut UnixStream) -> Result<Request, HttpError> {
    s.set_read_timeout(Some(READ_LIMIT))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(HttpError::Parse("connection closed mid-request".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let method = req.method.unwrap_or("").to_string();
                let target = req.path.unwrap_or("/");
                let length = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .map(|h| {
                        std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .ok_or_else(|| HttpError::Parse("bad Content-Length".into()))
                    })
                    .transpose()?
                    .unwrap_or(0);
                if length > MAX_BODY {
                    return Err(HttpError::TooLarge);
                }
                let (path, query) = split_target(target);
                let mut body = buf[head_len..].to_vec();
                body.truncate(length);
                while body.len() < length {
                    let n = s.read(&mut chunk)?;
                    if n == 0 {
                        return Err(HttpError::Parse("body shorter than Content-Length".into()));
                    }
                    let take = n.min(length - body.len());
                    body.extend_from_slice(&chunk[..take]);
                }
                return Ok(Request {
                    method,
                    path,
                    query,
                    body,
                });
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            Ok(httparse::Status::Partial) => return Err(HttpError::TooLarge),
            Err(e) => return Err(HttpError::Parse(e.to_string())),
        }
    }
}

fn split_target(target: &str) -> (String, Vec<(String, String)>) {
    let (path, q) = target.split_once('?').unwrap_or((target, ""));
    let query = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    (percent_decode(path), query)
}

/// Decodes `%XX` escapes (invalid ones are kept as they are).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json<T: serde::Serialize>(status: u16, v: &T) -> Response {
        let mut body = serde_json::to_vec_pretty(v).unwrap_or_else(|_| b"{}".to_vec());
        body.push(b'\n');
        Response {
            status,
            content_type: "application/json",
            body,
        }
    }

    /// `{"error": MESSAGE}` with `status`.
    pub fn error(status: u16, message: impl std::fmt::Display) -> Response {
        Response::json(status, &serde_json::json!({ "error": message.to_string() }))
    }

    pub fn text(status: u16, content_type: &'static str, body: Vec<u8>) -> Response {
        Response {
            status,
            content_type,
            body,
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

pub fn write_response(s: &mut UnixStream, r: &Response) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(&r.body);
    s.write_all(&out)
}

/// Starts a response whose body runs until the connection closes.
pub fn write_stream_head(s: &mut UnixStream, content_type: &str) -> std::io::Result<()> {
    write!(
        s,
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nConnection: close\r\n\r\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Request, HttpError> {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        b.write_all(raw).unwrap();
        drop(b);
        read_request(&mut a)
    }

    #[test]
    fn a_request_with_query_and_body() {
        let r = parse(b"POST /v1/vms/a%20b/stop?timeout=3&force HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello").unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("POST", "/v1/vms/a b/stop")
        );
        assert_eq!(r.query("timeout"), Some("3"));
        assert!(r.flag("force") && !r.flag("all"));
        assert_eq!(r.body, b"hello");
    }

    #[test]
    fn bad_requests_are_errors() {
        assert!(parse(b"GARBAGE\r\n\r\n").is_err());
        assert!(parse(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort").is_err());
        assert!(parse(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n").is_err());
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"),
            Err(HttpError::TooLarge)
        ));
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%41"), "A");
    }
}

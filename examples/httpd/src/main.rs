//! httpd: an HTTP/1.1 server unikernel.
//!
//! Serves a built-in page on port 80 (or the port given as first argument)
//! to any number of concurrent connections: GET and HEAD, keep-alive
//! (HTTP/1.1 default, `Connection: close` honoured), Content-Length,
//! 404 for unknown paths, 405 for other methods, 400 for malformed requests
//! (parsed by httparse), 431 for oversized headers.
//!
//! `wisp run -p 8080:80 httpd.wisp`, then `curl http://127.0.0.1:8080/`.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::vec::Vec;
use wisp_net::{TcpListener, TcpStream};

wisp::main!(main);

const INDEX: &str = "<!doctype html>\n<html><head><title>Wisp</title></head>\n<body><h1>Hello from a Wisp unikernel!</h1>\n<p>Served by httpd, a Rust unikernel on the Wisp monitor.</p></body></html>\n";
/// Largest request head accepted.
const MAX_HEAD: usize = 16 * 1024;

fn main(args: wisp::Args) -> i32 {
    let port = args
        .clone()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(80);
    wisp::exec::block_on(async move {
        let mut listener = match TcpListener::bind(port) {
            Ok(l) => l,
            Err(e) => {
                wisp::println!("httpd: cannot listen on port {port}: {e}");
                return 1;
            }
        };
        wisp::println!("httpd: listening on port {port}");
        loop {
            match listener.accept().await {
                Ok(stream) => {
                    wisp::exec::spawn(serve(stream));
                }
                Err(e) => wisp::println!("httpd: accept failed: {e}"),
            }
        }
    })
}

struct Response {
    status: &'static str,
    body: &'static str,
    content_type: &'static str,
    extra: &'static str,
}

fn route(method: &str, path: &str) -> Response {
    let html = "text/html; charset=utf-8";
    match (method, path) {
        ("GET" | "HEAD", "/" | "/index.html") => Response {
            status: "200 OK",
            body: INDEX,
            content_type: html,
            extra: "",
        },
        ("GET" | "HEAD", _) => Response {
            status: "404 Not Found",
            body: "not found\n",
            content_type: "text/plain",
            extra: "",
        },
        _ => Response {
            status: "405 Method Not Allowed",
            body: "method not allowed\n",
            content_type: "text/plain",
            extra: "Allow: GET, HEAD\r\n",
        },
    }
}

async fn respond(stream: &mut TcpStream, r: &Response, head_only: bool, close: bool) -> bool {
    let head = format!(
        "HTTP/1.1 {}\r\nServer: wisp-httpd\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}{}\r\n",
        r.status,
        r.content_type,
        r.body.len(),
        r.extra,
        if close { "Connection: close\r\n" } else { "" }
    );
    let mut out = Vec::with_capacity(head.len() + r.body.len());
    out.extend_from_slice(head.as_bytes());
    if !head_only {
        out.extend_from_slice(r.body.as_bytes());
    }
    stream.write_all(&out).await.is_ok()
}

async fn serve(mut stream: TcpStream) {
    let mut buf: Vec<u8> = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    loop {
        // Parse whatever is buffered; read more until a whole head arrives.
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let method = req.method.unwrap_or("");
                let path = req.path.unwrap_or("/");
                let http10 = req.version == Some(0);
                let conn = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("connection"))
                    .map(|h| h.value);
                let close = match conn {
                    Some(v) if v.eq_ignore_ascii_case(b"close") => true,
                    Some(v) if v.eq_ignore_ascii_case(b"keep-alive") => false,
                    _ => http10,
                };
                // Request bodies are not supported: GET/HEAD have none.
                let has_body = req.headers.iter().any(|h| {
                    (h.name.eq_ignore_ascii_case("content-length") && h.value != b"0")
                        || h.name.eq_ignore_ascii_case("transfer-encoding")
                });
                let r = route(method, path);
                let close = close || has_body;
                if !respond(&mut stream, &r, method == "HEAD", close).await || close {
                    return;
                }
                buf.drain(..len);
                continue;
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() > MAX_HEAD {
                    let r = Response {
                        status: "431 Request Header Fields Too Large",
                        body: "request head too large\n",
                        content_type: "text/plain",
                        extra: "",
                    };
                    respond(&mut stream, &r, false, true).await;
                    return;
                }
            }
            Err(_) => {
                let r = Response {
                    status: "400 Bad Request",
                    body: "bad request\n",
                    content_type: "text/plain",
                    extra: "",
                };
                respond(&mut stream, &r, false, true).await;
                return;
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

//! httpd: an HTTP/1.1 server unikernel.
//!
//! Serves port 80 (or the port given as first argument) to any number of
//! concurrent connections: GET and HEAD, keep-alive (HTTP/1.1 default,
//! `Connection: close` honoured), Content-Length, 404 for unknown paths,
//! 405 for other methods, 400 for malformed requests (parsed by httparse),
//! 431 for oversized headers.
//!
//! With a disk (`--disk site.tar,ro`, a tar archive made with `tar`), the
//! files in it are the site (`/` serves `index.html`); they are loaded into
//! memory at boot (up to 64 MiB). Without a disk, a built-in page is served.
//!
//! `wisp run -p 8080:80 httpd.wisp`, then `curl http://127.0.0.1:8080/`.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use wisp_blk::tar::TarFs;
use wisp_blk::{BlkError, Disk};
use wisp_net::{TcpListener, TcpStream};

wisp::main!(main);

const INDEX: &str = "<!doctype html>\n<html><head><title>Wisp</title></head>\n<body><h1>Hello from a Wisp unikernel!</h1>\n<p>Served by httpd, a Rust unikernel on the Wisp monitor.</p></body></html>\n";
/// Largest request head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Most bytes of site content loaded from the disk.
const MAX_SITE: u64 = 64 << 20;

/// The site: path -> (content type, body).
type Site = BTreeMap<String, (&'static str, Rc<[u8]>)>;

fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next().unwrap_or("") {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css",
        "js" => "text/javascript",
        "json" => "application/json",
        "txt" => "text/plain; charset=utf-8",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "svg" => "image/svg+xml",
        _ => "application/octet-stream",
    }
}

/// Loads the site from the disk, if there is one.
async fn load_site() -> Option<Site> {
    let mut disk = match Disk::open() {
        Ok(d) => d,
        Err(BlkError::NoDevice) => return None,
        Err(e) => {
            wisp::println!("httpd: disk: {e}; serving the built-in page");
            return None;
        }
    };
    let fs = match TarFs::mount(&mut disk).await {
        Ok(fs) => fs,
        Err(e) => {
            wisp::println!("httpd: disk is not a tar archive ({e}); serving the built-in page");
            return None;
        }
    };
    let mut site = Site::new();
    let mut total = 0u64;
    let paths: Vec<String> = fs.paths().map(String::from).collect();
    for path in paths {
        let Some(entry) = fs.get(&path) else { continue };
        total += entry.size;
        if total > MAX_SITE {
            wisp::println!(
                "httpd: site larger than {} MiB; {path} and later files skipped",
                MAX_SITE >> 20
            );
            break;
        }
        match TarFs::read(&mut disk, entry).await {
            Ok(body) => {
                site.insert(format!("/{path}"), (content_type(&path), Rc::from(body)));
            }
            Err(e) => wisp::println!("httpd: reading {path}: {e}"),
        }
    }
    wisp::println!("httpd: serving {} files from the disk", site.len());
    Some(site)
}

fn main(args: wisp::Args) -> i32 {
    let port = args
        .clone()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(80);
    wisp::exec::block_on(async move {
        let site = Rc::new(load_site().await);
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
                    wisp::exec::spawn(serve(stream, site.clone()));
                }
                Err(e) => wisp::println!("httpd: accept failed: {e}"),
            }
        }
    })
}

struct Response<'a> {
    status: &'static str,
    body: &'a [u8],
    content_type: &'static str,
    extra: &'static str,
}

fn text(status: &'static str, body: &'static str) -> Response<'static> {
    Response {
        status,
        body: body.as_bytes(),
        content_type: "text/plain",
        extra: "",
    }
}

fn route<'a>(site: &'a Option<Site>, method: &str, path: &str) -> Response<'a> {
    if method != "GET" && method != "HEAD" {
        return Response {
            extra: "Allow: GET, HEAD\r\n",
            ..text("405 Method Not Allowed", "method not allowed\n")
        };
    }
    let path = path.split(['?', '#']).next().unwrap_or("/");
    match site {
        None => match path {
            "/" | "/index.html" => Response {
                status: "200 OK",
                body: INDEX.as_bytes(),
                content_type: "text/html; charset=utf-8",
                extra: "",
            },
            _ => text("404 Not Found", "not found\n"),
        },
        Some(site) => {
            let key = if path.ends_with('/') {
                format!("{path}index.html")
            } else {
                String::from(path)
            };
            match site.get(&key) {
                Some((ct, body)) => Response {
                    status: "200 OK",
                    body,
                    content_type: ct,
                    extra: "",
                },
                None => text("404 Not Found", "not found\n"),
            }
        }
    }
}

async fn respond(stream: &mut TcpStream, r: &Response<'_>, head_only: bool, close: bool) -> bool {
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
        out.extend_from_slice(r.body);
    }
    stream.write_all(&out).await.is_ok()
}

async fn serve(mut stream: TcpStream, site: Rc<Option<Site>>) {
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
                let r = route(&site, method, path);
                let close = close || has_body;
                if !respond(&mut stream, &r, method == "HEAD", close).await || close {
                    return;
                }
                buf.drain(..len);
                continue;
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() > MAX_HEAD {
                    let r = text(
                        "431 Request Header Fields Too Large",
                        "request head too large\n",
                    );
                    respond(&mut stream, &r, false, true).await;
                    return;
                }
            }
            Err(_) => {
                let r = text("400 Bad Request", "bad request\n");
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

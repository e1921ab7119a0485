//! httpd: an HTTP/1.1 server unikernel.
//!
//! Serves port 80 (or the port given as first argument) to any number of
//! concurrent connections: GET and HEAD, keep-alive (HTTP/1.1 default,
//! `Connection: close` honoured), Content-Length, 404 for unknown paths,
//! 405 for other methods, 400 for malformed requests (parsed by httparse)
//! and for request paths that are badly encoded or climb above the root,
//! 431 for oversized headers. Request paths are percent-decoded and
//! normalised as RFC 3986 says (see `path.rs`); a directory asked for
//! without its `/` is redirected (301), one without `index.html` is 403.
//!
//! With a disk (`--disk site.tar,ro`, a tar archive made with `tar`), the
//! files in it are the site (`/` serves `index.html`); they are loaded into
//! memory at boot (up to 64 MiB). Without a disk, a built-in page is served.
//!
//! Asked to stop (`wisp stop`, SIGTERM to `wisp run`), httpd stops at once
//! with status 0, as nginx does on SIGTERM: it keeps no state to save.
//!
//! `wisp run -p 8080:80 httpd.wisp`, then `curl http://127.0.0.1:8080/`.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::rc::Rc;
use alloc::vec::Vec;
use httpd::site::{Answer, Site};
use wisp_blk::tar::TarFs;
use wisp_blk::{BlkError, Disk};
use wisp_net::{TcpListener, TcpStream};

wisp::main!(main);

/// Largest request head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Most bytes of site content loaded from the disk.
const MAX_SITE: u64 = 64 << 20;

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
            wisp::println!(
                "httpd: disk is not a usable tar archive ({e}); serving the built-in page"
            );
            return None;
        }
    };
    if fs.skipped() > 0 {
        wisp::println!(
            "httpd: {} archive entries skipped (links, devices, or names outside the root)",
            fs.skipped()
        );
    }
    let mut site = Site::default();
    for dir in fs.dirs() {
        site.add_dir(dir);
    }
    let mut total = 0u64;
    for path in fs.paths() {
        let Some(entry) = fs.get(path) else { continue };
        total += entry.size;
        if total > MAX_SITE {
            wisp::println!(
                "httpd: site larger than {} MiB; {path} and later files skipped",
                MAX_SITE >> 20
            );
            break;
        }
        match TarFs::read(&mut disk, entry).await {
            Ok(body) => site.add_file(path, Rc::from(body)),
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
        let site = Rc::new(load_site().await.unwrap_or_else(Site::built_in));
        let mut listener = match TcpListener::bind(port) {
            Ok(l) => l,
            Err(e) => {
                wisp::println!("httpd: cannot listen on port {port}: {e}");
                return 1;
            }
        };
        wisp::println!("httpd: listening on port {port}");
        let stop = wisp::shutdown::requested();
        wisp::exec::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok(stream) => {
                        wisp::exec::spawn(serve(stream, site.clone()));
                    }
                    Err(e) => wisp::println!("httpd: accept failed: {e}"),
                }
            }
        });
        stop.await;
        wisp::println!("httpd: stopping");
        0
    })
}

struct Response {
    status: &'static str,
    body: Rc<[u8]>,
    content_type: &'static str,
    extra: alloc::string::String,
    /// Whether the connection ends after this response.
    close: bool,
}

fn text(status: &'static str, body: &'static str) -> Response {
    Response {
        status,
        body: Rc::from(body.as_bytes()),
        content_type: "text/plain",
        extra: alloc::string::String::new(),
        close: false,
    }
}

fn response(answer: Answer) -> Response {
    match answer {
        Answer::File(content_type, body) => Response {
            status: "200 OK",
            body,
            content_type,
            extra: alloc::string::String::new(),
            close: false,
        },
        Answer::Redirect(to) => Response {
            extra: format!("Location: {to}\r\n"),
            ..text("301 Moved Permanently", "moved permanently\n")
        },
        // A malformed target: like any malformed request, the last one.
        Answer::BadRequest(_) => Response {
            close: true,
            ..text("400 Bad Request", "bad request\n")
        },
        Answer::Forbidden => text("403 Forbidden", "forbidden\n"),
        Answer::NotFound => text("404 Not Found", "not found\n"),
        Answer::MethodNotAllowed => Response {
            extra: alloc::string::String::from("Allow: GET, HEAD\r\n"),
            ..text("405 Method Not Allowed", "method not allowed\n")
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
        out.extend_from_slice(&r.body);
    }
    stream.write_all(&out).await.is_ok()
}

async fn serve(mut stream: TcpStream, site: Rc<Site>) {
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
                let r = response(site.route(method, path));
                let close = close || has_body || r.close;
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

//! The httpd example against nginx (Debian's, installed by
//! `scripts/install-deps.sh`) serving the same site: the same request
//! targets, byte for byte, must get the same status from both, the same
//! body for a 200 and the same redirect for a 301. Both listen on
//! 127.0.0.1 only; nginx runs as the current user from a directory the
//! test makes and removes.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The site's files (path, body). Names with a space, a `%`, a `+`, a
/// `?` and non-ASCII, a nested directory with an index, one without, and
/// an empty one.
const FILES: &[(&str, &str)] = &[
    ("index.html", "<h1>home</h1>\n"),
    ("a.txt", "file a\n"),
    ("space file.txt", "a file with a space\n"),
    ("100%.txt", "percent\n"),
    ("a+b.txt", "plus\n"),
    ("q?.txt", "question\n"),
    ("ü.txt", "u umlaut\n"),
    ("sub/index.html", "<h1>sub</h1>\n"),
    ("sub/b.txt", "file b\n"),
    ("sub/deeper/d.txt", "file d\n"),
    ("sp dir/x.txt", "in a spaced dir\n"),
];
const EMPTY_DIRS: &[&str] = &["empty"];

/// Request targets sent to both, exactly as written.
const TARGETS: &[&str] = &[
    "/",
    "/index.html",
    "/a.txt",
    "/space%20file.txt",
    "/%61.txt",
    "/%2e/a.txt",
    "/./a.txt",
    "/sub/../a.txt",
    "/sub/./b.txt",
    "/sub/%2e%2e/a.txt",
    "/sub/%2E%2E/a.txt",
    "//a.txt",
    "/sub//b.txt",
    "/a.txt?x=1",
    "/a.txt?%zz",
    "/100%25.txt",
    "/a+b.txt",
    "/a%2bb.txt",
    "/q%3F.txt",
    "/%C3%BC.txt",
    "/%c3%bc.txt",
    "/sub",
    "/sub?x=1",
    "/%73ub",
    "/sub/",
    "/sub/.",
    "/sub/..",
    "/sub/../sub",
    "/sub/deeper",
    "/sub/./deeper",
    "/sub/deeper/",
    "/sub/deeper/..",
    "/sp%20dir",
    "/sp%20dir/x.txt",
    "/empty",
    "/empty/",
    "/.",
    "/..",
    "/../etc/passwd",
    "/%2e%2e/a.txt",
    "/%2E%2E/a.txt",
    "/.%2e/a.txt",
    "/sub/../../a.txt",
    "/a.txt%00",
    "/a%00.txt",
    "/%00",
    "/%zz",
    "/%4",
    "/%",
    "/nosuch",
    "/nosuch/",
    "/a.txt/",
    "/a.txt/.",
    "/sub/b.txt%20",
    "/%ff",
    "/%C3",
    "/a.txt%3Fx",
    "http://localhost/a.txt",
    "http://localhost/sub/%2e%2e/a.txt",
    "a.txt",
    "*",
];

/// Where httpd deliberately answers otherwise, and why. nginx decodes
/// `%2F` into a path separator; RFC 3986 (§2.2) says an encoded reserved
/// character is data, not a delimiter, and no file name holds a `/`, so
/// httpd answers 404 (as Apache does by default).
const DIFFERENT: &[(&str, u16, u16)] =
    &[("/sub%2Fb.txt", 200, 404), ("/sub%2f..%2fa.txt", 200, 404)];

/// One HTTP exchange: status, Location header, body.
#[derive(Debug, PartialEq)]
struct Reply {
    status: u16,
    location: Option<String>,
    body: Vec<u8>,
}

/// Sends `METHOD target HTTP/1.1` with `Connection: close` and reads the
/// whole reply.
fn ask(port: u16, method: &str, target: &str) -> Reply {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("reading the reply to {target} on port {port}: {e}"));
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no reply head for {target}: {raw:?}"));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let body = raw[split + 4..].to_vec();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line for {target}: {head}"));
    let location = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("location"))
        .map(|(_, v)| v.trim().to_string());
    Reply {
        status,
        location,
        body,
    }
}

/// The path of a Location (nginx sends absolute URLs, httpd paths).
fn location_path(loc: &str) -> &str {
    match loc.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => loc,
    }
}

/// nginx serving `root` on 127.0.0.1:`port`, killed and cleaned up when
/// dropped.
struct Nginx {
    child: Child,
    dir: PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nginx_binary() -> PathBuf {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/usr/local/sbin"])
    {
        let p = Path::new(dir).join("nginx");
        if p.is_file() {
            return p;
        }
    }
    panic!("nginx is missing: run scripts/install-deps.sh (this test does not skip without it)");
}

fn start_nginx(root: &Path) -> (Nginx, u16) {
    let dir = scratch().join(format!("nginx-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let d = dir.display();
    // One process (no master, so no switch to another user), every path
    // it writes under `dir`, only 127.0.0.1.
    let conf = format!(
        "daemon off;\n\
         master_process off;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n\
           access_log off;\n\
           client_body_temp_path {d}/body;\n\
           proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n\
           uwsgi_temp_path {d}/uwsgi;\n\
           scgi_temp_path {d}/scgi;\n\
           server {{\n\
             listen 127.0.0.1:{port};\n\
             root {root};\n\
             index index.html;\n\
           }}\n\
         }}\n",
        root = root.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let child = Command::new(nginx_binary())
        .arg("-p")
        .arg(&dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start nginx");
    let mut nginx = Nginx { child, dir };
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(st) = nginx.child.try_wait().unwrap() {
            let log = std::fs::read_to_string(nginx.dir.join("error.log")).unwrap_or_default();
            panic!("nginx exited ({st}): {log}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "nginx never listened on port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (nginx, port)
}

/// Writes the site to a directory and archives it with `tar`, as the
/// README tells users to: `tar cf site.tar -C mysite .`.
fn make_site() -> (PathBuf, PathBuf) {
    let root = scratch().join(format!("vs-nginx-site-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for (path, body) in FILES {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }
    for d in EMPTY_DIRS {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let tar = scratch().join(format!("vs-nginx-{}.tar", std::process::id()));
    let st = Command::new("tar")
        .arg("cf")
        .arg(&tar)
        .arg("-C")
        .arg(&root)
        .arg(".")
        .status()
        .expect("run tar");
    assert!(st.success());
    (root, tar)
}

#[test]
fn httpd_answers_request_paths_as_nginx_does() {
    require_kvm();
    let (root, tar) = make_site();
    let (_nginx, nginx_port) = start_nginx(&root);
    let disk = format!("{},ro", tar.display());
    let httpd = start_guest(&example("httpd"), 80, &["--disk", &disk], &[], |port| {
        TcpStream::connect(("127.0.0.1", port)).is_ok() && ask(port, "GET", "/a.txt").status == 200
    });

    let mut differences = Vec::new();
    let mut compared = 0;
    for method in ["GET", "HEAD"] {
        for target in TARGETS {
            let want = ask(nginx_port, method, target);
            let got = ask(httpd.port, method, target);
            compared += 1;
            let same = want.status == got.status
                && (want.status != 200 || want.body == got.body)
                && (want.status != 301
                    || want.location.as_deref().map(location_path)
                        == got.location.as_deref().map(location_path));
            if !same {
                differences.push(format!(
                    "{method} {target}: nginx {} {:?} {:?}, httpd {} {:?} {:?}",
                    want.status,
                    want.location,
                    String::from_utf8_lossy(&want.body[..want.body.len().min(40)]),
                    got.status,
                    got.location,
                    String::from_utf8_lossy(&got.body[..got.body.len().min(40)]),
                ));
            }
        }
    }
    assert!(
        differences.is_empty(),
        "{} of {compared} requests answered differently:\n{}",
        differences.len(),
        differences.join("\n")
    );

    // Every file is served, with its content, by both.
    for (path, body) in FILES {
        let target: String = path
            .bytes()
            .map(|b| match b {
                b'/' => "/".to_string(),
                b if b.is_ascii_alphanumeric() || b".-_".contains(&b) => (b as char).to_string(),
                b => format!("%{b:02X}"),
            })
            .collect();
        for port in [nginx_port, httpd.port] {
            let r = ask(port, "GET", &format!("/{target}"));
            assert_eq!(
                (r.status, r.body.as_slice()),
                (200, body.as_bytes()),
                "/{target} on {port}"
            );
        }
    }

    // The deliberate differences: nginx still does what we say it does,
    // and httpd does what RFC 3986 says.
    for (target, nginx_status, httpd_status) in DIFFERENT {
        assert_eq!(
            ask(nginx_port, "GET", target).status,
            *nginx_status,
            "nginx {target}"
        );
        assert_eq!(
            ask(httpd.port, "GET", target).status,
            *httpd_status,
            "httpd {target}"
        );
    }
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_file(&tar);
}

//! The site and what each request gets from it: the answer a static file
//! server gives (as nginx does with `index index.html` and no directory
//! listings), decided without any I/O.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::rc::Rc;
use alloc::string::String;

use crate::path::{PathError, SitePath};

/// A site: files by path relative to the root (`sub/b.txt`), and its
/// directories (the root is always one).
#[derive(Default)]
pub struct Site {
    files: BTreeMap<String, (&'static str, Rc<[u8]>)>,
    dirs: BTreeSet<String>,
}

/// The page served without a disk.
pub const BUILT_IN_INDEX: &str = "<!doctype html>\n<html><head><title>Wisp</title></head>\n<body><h1>Hello from a Wisp unikernel!</h1>\n<p>Served by httpd, a Rust unikernel on the Wisp monitor.</p></body></html>\n";

/// The file a directory serves.
const INDEX: &str = "index.html";

/// A content type from a file name's extension.
pub fn content_type(path: &str) -> &'static str {
    let name = path.rsplit('/').next().unwrap_or(path);
    match name.rsplit_once('.').map_or("", |(_, ext)| ext) {
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

impl Site {
    /// The built-in one-page site.
    pub fn built_in() -> Site {
        let mut site = Site::default();
        site.add_file(INDEX, Rc::from(BUILT_IN_INDEX.as_bytes()));
        site
    }

    /// Adds a file (`sub/b.txt`, normalised, no leading `/`) and the
    /// directories above it.
    pub fn add_file(&mut self, path: &str, body: Rc<[u8]>) {
        let mut end = 0;
        while let Some(i) = path[end..].find('/') {
            end += i;
            self.dirs.insert(String::from(&path[..end]));
            end += 1;
        }
        self.files
            .insert(String::from(path), (content_type(path), body));
    }

    /// Adds a directory (`sub/deeper`, normalised), which may hold nothing.
    pub fn add_dir(&mut self, path: &str) {
        if !path.is_empty() {
            self.dirs.insert(String::from(path));
        }
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    fn is_dir(&self, key: &str) -> bool {
        key.is_empty() || self.dirs.contains(key)
    }

    /// The answer to `method target`.
    pub fn route(&self, method: &str, target: &str) -> Answer {
        let path = match SitePath::parse(target) {
            Ok(p) => p,
            Err(e) => return Answer::BadRequest(e),
        };
        if method != "GET" && method != "HEAD" {
            return Answer::MethodNotAllowed;
        }
        let Some(key) = path.key() else {
            return Answer::NotFound;
        };
        if !path.trailing_slash {
            if let Some((ct, body)) = self.files.get(&key) {
                return Answer::File(ct, body.clone());
            }
            if self.is_dir(&key) {
                return Answer::Redirect(path.to_uri(true));
            }
            return Answer::NotFound;
        }
        if !self.is_dir(&key) {
            return Answer::NotFound;
        }
        let index = if key.is_empty() {
            String::from(INDEX)
        } else {
            alloc::format!("{key}/{INDEX}")
        };
        match self.files.get(&index) {
            Some((ct, body)) => Answer::File(ct, body.clone()),
            // A directory without an index: no listings.
            None => Answer::Forbidden,
        }
    }
}

/// What a request gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// 200 with this content type and body.
    File(&'static str, Rc<[u8]>),
    /// 301 to this URI (a directory asked for without its `/`).
    Redirect(String),
    /// 400.
    BadRequest(PathError),
    /// 403: a directory without an index file.
    Forbidden,
    /// 404.
    NotFound,
    /// 405.
    MethodNotAllowed,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site() -> Site {
        let mut s = Site::default();
        for (p, body) in [
            ("index.html", "home"),
            ("a.txt", "a"),
            ("sub/index.html", "sub home"),
            ("sub/b.txt", "b"),
            ("sub/deeper/d.txt", "d"),
            ("sp dir/x.txt", "x"),
        ] {
            s.add_file(p, Rc::from(body.as_bytes()));
        }
        s.add_dir("empty");
        s
    }

    fn body(a: Answer) -> String {
        match a {
            Answer::File(_, b) => String::from_utf8(b.to_vec()).unwrap(),
            other => panic!("expected a file, got {other:?}"),
        }
    }

    #[test]
    fn files_and_directory_indexes() {
        let s = site();
        assert_eq!(body(s.route("GET", "/")), "home");
        assert_eq!(body(s.route("HEAD", "/a.txt")), "a");
        assert_eq!(body(s.route("GET", "/sub/")), "sub home");
        assert_eq!(body(s.route("GET", "/sub/b.txt")), "b");
        assert_eq!(body(s.route("GET", "/%73ub/./b.txt?x")), "b");
        assert_eq!(body(s.route("GET", "/sub/..")), "home");
    }

    #[test]
    fn a_directory_without_its_slash_is_redirected() {
        let s = site();
        let r = |t| s.route("GET", t);
        assert_eq!(r("/sub"), Answer::Redirect("/sub/".into()));
        assert_eq!(r("/sub?q=1"), Answer::Redirect("/sub/?q=1".into()));
        assert_eq!(r("/sub/deeper"), Answer::Redirect("/sub/deeper/".into()));
        assert_eq!(r("/sp%20dir"), Answer::Redirect("/sp%20dir/".into()));
        assert_eq!(r("/empty"), Answer::Redirect("/empty/".into()));
    }

    #[test]
    fn directories_without_an_index_are_forbidden() {
        let s = site();
        assert_eq!(s.route("GET", "/empty/"), Answer::Forbidden);
        assert_eq!(s.route("GET", "/sub/deeper/"), Answer::Forbidden);
    }

    #[test]
    fn what_is_not_there_is_not_found() {
        let s = site();
        for t in [
            "/nosuch",
            "/a.txt/",
            "/a.txt/.",
            "/sub%2Fb.txt",
            "/%ff",
            "/nosuch/",
        ] {
            assert_eq!(s.route("GET", t), Answer::NotFound, "{t}");
        }
    }

    #[test]
    fn bad_targets_come_before_bad_methods() {
        let s = site();
        assert_eq!(
            s.route("POST", "/../x"),
            Answer::BadRequest(PathError::AboveRoot)
        );
        assert_eq!(s.route("POST", "/a.txt"), Answer::MethodNotAllowed);
        assert_eq!(s.route("DELETE", "/nosuch"), Answer::MethodNotAllowed);
    }

    #[test]
    fn the_built_in_site_has_one_page() {
        let s = Site::built_in();
        assert_eq!(body(s.route("GET", "/")), BUILT_IN_INDEX);
        assert_eq!(body(s.route("GET", "/index.html")), BUILT_IN_INDEX);
        assert_eq!(s.route("GET", "/other"), Answer::NotFound);
    }

    #[test]
    fn content_types_follow_the_extension() {
        assert_eq!(content_type("a/b.html"), "text/html; charset=utf-8");
        assert_eq!(content_type("x.tar.svg"), "image/svg+xml");
        assert_eq!(content_type("README"), "application/octet-stream");
        assert_eq!(content_type("v1.0/README"), "application/octet-stream");
    }
}

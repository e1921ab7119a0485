//! Request targets to site paths, as RFC 3986 says: percent-decoding,
//! dot-segment removal, never above the site's root.
//!
//! Decisions, each where RFC 3986 leaves the server a choice:
//! * Segments are split on the raw `/` first and decoded after, so `%2F` is
//!   a byte inside a segment, not a separator (§2.2: URIs that differ by
//!   percent-encoding a reserved character are not equivalent). No file
//!   name holds a `/`, so such a path names nothing (404). nginx decodes
//!   `%2F` into a separator; Apache answers 404 as here.
//! * `.` and `..` are recognised after decoding: `.` is unreserved, so `%2E`
//!   is `.` (§6.2.2.2).
//! * A `..` that would climb above the root is refused (400, as nginx
//!   does) rather than clamped at the root (§5.2.4): no well-formed link
//!   produces it, so it is an attack or a bug.
//! * Empty segments are dropped (`//a` is `/a`), as file systems and nginx
//!   resolve them.
//! * An encoded NUL, a `%` not followed by two hex digits, or a target that
//!   is not in origin form (`/…`) or absolute form (`http://host/…`) is a
//!   bad request (400).

use alloc::string::String;
use alloc::vec::Vec;

/// Why a request target is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Neither origin form nor absolute form.
    NotAPath,
    /// `%` not followed by two hex digits.
    BadEncoding,
    /// `%00`.
    EncodedNul,
    /// A `..` above the site's root.
    AboveRoot,
}

/// A request target, decoded and normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SitePath {
    /// The decoded segments, none empty, `.` or `..`. A segment may hold
    /// bytes that are not UTF-8 or a `/` (from `%2F`); such a path names no
    /// file.
    pub segments: Vec<Vec<u8>>,
    /// Whether the path names a directory's contents: it ended in `/`
    /// (or in a `.` or `..` segment, which stand for one).
    pub trailing_slash: bool,
    /// The query, without its `?`, as received.
    pub query: Option<String>,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decodes one segment.
fn decode(seg: &[u8]) -> Result<Vec<u8>, PathError> {
    let mut out = Vec::with_capacity(seg.len());
    let mut i = 0;
    while i < seg.len() {
        if seg[i] == b'%' {
            let hi = seg.get(i + 1).copied().and_then(hex);
            let lo = seg.get(i + 2).copied().and_then(hex);
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return Err(PathError::BadEncoding);
            };
            let b = hi << 4 | lo;
            if b == 0 {
                return Err(PathError::EncodedNul);
            }
            out.push(b);
            i += 3;
        } else {
            out.push(seg[i]);
            i += 1;
        }
    }
    Ok(out)
}

impl SitePath {
    /// Parses a request target (`/a/b?q`, or `http://host/a/b?q`).
    pub fn parse(target: &str) -> Result<SitePath, PathError> {
        // Absolute form: drop the scheme and authority.
        let target = match target
            .strip_prefix("http://")
            .or_else(|| target.strip_prefix("https://"))
        {
            Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]),
            None => target,
        };
        if !target.starts_with('/') {
            return Err(PathError::NotAPath);
        }
        // A fragment is never sent by a client; drop one if it is.
        let target = target.split('#').next().unwrap_or(target);
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(String::from(q))),
            None => (target, None),
        };
        let mut segments: Vec<Vec<u8>> = Vec::new();
        let mut trailing_slash = false;
        // Skip the leading `/`: every segment follows a separator.
        for raw in path.as_bytes()[1..].split(|&b| b == b'/') {
            let seg = decode(raw)?;
            trailing_slash = true;
            match seg.as_slice() {
                b"" | b"." => {}
                b".." => {
                    segments.pop().ok_or(PathError::AboveRoot)?;
                }
                _ => {
                    segments.push(seg);
                    trailing_slash = false;
                }
            }
        }
        Ok(SitePath {
            segments,
            trailing_slash,
            query,
        })
    }

    /// The path relative to the root (`a/b.txt`; `""` for the root), or
    /// `None` if it cannot name anything in a site: a segment is not UTF-8
    /// or holds a `/`.
    pub fn key(&self) -> Option<String> {
        let mut key = String::new();
        for seg in &self.segments {
            let seg = core::str::from_utf8(seg).ok()?;
            if seg.contains('/') {
                return None;
            }
            if !key.is_empty() {
                key.push('/');
            }
            key.push_str(seg);
        }
        Some(key)
    }

    /// The path as a URI path again (`/a%20b/c`), with a trailing `/` if
    /// `slash`, and the query: the target of a redirect.
    pub fn to_uri(&self, slash: bool) -> String {
        let mut out = String::new();
        for seg in &self.segments {
            out.push('/');
            for &b in seg {
                // pchar (RFC 3986 §3.3) passes, everything else is encoded.
                if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b) {
                    out.push(b as char);
                } else {
                    const HEX: &[u8; 16] = b"0123456789ABCDEF";
                    out.push('%');
                    out.push(HEX[(b >> 4) as usize] as char);
                    out.push(HEX[(b & 15) as usize] as char);
                }
            }
        }
        if slash || out.is_empty() {
            out.push('/');
        }
        if let Some(q) = &self.query {
            out.push('?');
            out.push_str(q);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(t: &str) -> Result<(Option<String>, bool), PathError> {
        SitePath::parse(t).map(|p| (p.key(), p.trailing_slash))
    }

    fn file(k: &str) -> Result<(Option<String>, bool), PathError> {
        Ok((Some(String::from(k)), false))
    }

    fn dir(k: &str) -> Result<(Option<String>, bool), PathError> {
        Ok((Some(String::from(k)), true))
    }

    #[test]
    fn percent_encoding_is_decoded() {
        assert_eq!(key("/space%20file.txt"), file("space file.txt"));
        assert_eq!(key("/%61.txt"), file("a.txt"));
        assert_eq!(key("/100%25.txt"), file("100%.txt"));
        assert_eq!(key("/%C3%BC.txt"), file("ü.txt"));
        assert_eq!(
            key("/%c3%bc.txt"),
            file("ü.txt"),
            "hex digits in either case"
        );
        assert_eq!(
            key("/a+b.txt"),
            file("a+b.txt"),
            "+ is not a space in a path"
        );
        assert_eq!(key("/q%3F.txt"), file("q?.txt"));
    }

    #[test]
    fn dot_segments_are_removed() {
        assert_eq!(key("/./a.txt"), file("a.txt"));
        assert_eq!(key("/sub/../a.txt"), file("a.txt"));
        assert_eq!(key("/sub/./b.txt"), file("sub/b.txt"));
        assert_eq!(key("/%2e/a.txt"), file("a.txt"));
        assert_eq!(key("/sub/%2E%2E/a.txt"), file("a.txt"));
        assert_eq!(key("/sub/.."), dir(""));
        assert_eq!(key("/sub/."), dir("sub"));
        assert_eq!(key("/."), dir(""));
        assert_eq!(key("/"), dir(""));
        assert_eq!(key("/a/b/c/../../d"), file("a/d"));
        assert_eq!(key("/..a/b.."), file("..a/b.."), "only whole segments");
        assert_eq!(key("/.../x"), file(".../x"));
    }

    #[test]
    fn empty_segments_are_dropped() {
        assert_eq!(key("//a.txt"), file("a.txt"));
        assert_eq!(key("/sub//b.txt"), file("sub/b.txt"));
        assert_eq!(key("/sub//"), dir("sub"));
    }

    #[test]
    fn nothing_climbs_above_the_root() {
        for t in [
            "/..",
            "/../etc/passwd",
            "/%2e%2e/a.txt",
            "/%2E%2E/a.txt",
            "/.%2e/a.txt",
            "/sub/../../a.txt",
            "/sub/%2e%2e/..",
            "http://host/../a",
        ] {
            assert_eq!(key(t), Err(PathError::AboveRoot), "{t}");
        }
    }

    #[test]
    fn bad_encodings_and_nul_are_refused() {
        for t in ["/%", "/%4", "/%zz", "/a%g1", "/%%41", "/a.txt%"] {
            assert_eq!(key(t), Err(PathError::BadEncoding), "{t}");
        }
        for t in ["/%00", "/a.txt%00", "/a%00.txt"] {
            assert_eq!(key(t), Err(PathError::EncodedNul), "{t}");
        }
    }

    #[test]
    fn an_encoded_slash_is_not_a_separator() {
        assert_eq!(key("/sub%2Fb.txt"), Ok((None, false)));
        // ... but a `..` still removes the segment that holds it.
        assert_eq!(key("/x%2Fy/../a.txt"), file("a.txt"));
    }

    #[test]
    fn bytes_that_are_not_utf8_name_nothing() {
        assert_eq!(key("/%ff"), Ok((None, false)));
        assert_eq!(key("/%C3"), Ok((None, false)));
    }

    #[test]
    fn query_and_fragment_are_split_off() {
        let p = SitePath::parse("/sub?x=%20y&z").unwrap();
        assert_eq!(p.key().as_deref(), Some("sub"));
        assert_eq!(p.query.as_deref(), Some("x=%20y&z"));
        assert_eq!(key("/a.txt?%zz"), file("a.txt"), "the query is not decoded");
        assert_eq!(key("/a.txt#frag"), file("a.txt"));
        assert_eq!(SitePath::parse("/a?").unwrap().query.as_deref(), Some(""));
    }

    #[test]
    fn targets_in_absolute_form_or_not_paths() {
        assert_eq!(key("http://example.com/sub/b.txt"), file("sub/b.txt"));
        assert_eq!(key("http://example.com"), dir(""));
        assert_eq!(key("https://h:8080/a.txt?q"), file("a.txt"));
        for t in ["a.txt", "*", "", "ftp://h/a"] {
            assert_eq!(key(t), Err(PathError::NotAPath), "{t}");
        }
    }

    #[test]
    fn redirect_targets_are_encoded_again() {
        let uri = |t: &str| SitePath::parse(t).unwrap().to_uri(true);
        assert_eq!(uri("/sub"), "/sub/");
        assert_eq!(uri("/%73ub"), "/sub/");
        assert_eq!(uri("/sp%20dir"), "/sp%20dir/");
        assert_eq!(uri("/sub/./deeper"), "/sub/deeper/");
        assert_eq!(uri("/sub?a=%20b"), "/sub/?a=%20b");
        assert_eq!(uri("/%C3%BC"), "/%C3%BC/");
        assert_eq!(uri("/a%2Fb"), "/a%2Fb/", "an encoded slash stays encoded");
        assert_eq!(uri("/%25%3F%23"), "/%25%3F%23/");
        assert_eq!(SitePath::parse("/").unwrap().to_uri(false), "/");
    }
}

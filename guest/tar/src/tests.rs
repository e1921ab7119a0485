//! The reader against archives made by GNU tar in each of its formats (as
//! users make them) and against hand-made headers for what tar never
//! writes: damaged, truncated and hostile archives.

use super::*;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::task::{Context, Poll, Waker};

/// An archive in memory.
struct Mem(Vec<u8>);

#[derive(Debug, PartialEq)]
struct OutOfRange;

impl Sectors for Mem {
    type Error = OutOfRange;

    fn len(&self) -> u64 {
        self.0.len() as u64
    }

    async fn read_sectors(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), OutOfRange> {
        assert_eq!(buf.len() % SECTOR, 0, "whole sectors only");
        let start = sector as usize * SECTOR;
        let src = self.0.get(start..start + buf.len()).ok_or(OutOfRange)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// Runs a future that never waits (the in-memory device answers at once).
fn now<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("an in-memory read never waits"),
    }
}

fn mount(bytes: Vec<u8>) -> Result<(TarFs, Mem), TarError<OutOfRange>> {
    let mut mem = Mem(bytes);
    let fs = now(TarFs::mount(&mut mem))?;
    Ok((fs, mem))
}

fn read(fs: &TarFs, mem: &mut Mem, path: &str) -> Vec<u8> {
    let entry = fs.get(path).unwrap_or_else(|| panic!("{path} not found"));
    now(TarFs::read(mem, entry)).expect("read")
}

/// A fresh directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wisp-tar-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `tar cf - ARGS` run in `dir`: the archive's bytes.
fn tar(dir: &Path, args: &[&str]) -> Vec<u8> {
    let o = Command::new("tar")
        .current_dir(dir)
        .arg("cf")
        .arg("-")
        .args(args)
        .output()
        .expect("run tar");
    assert!(
        o.status.success(),
        "tar {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

/// A name longer than ustar's 100-byte name field and than its 155-byte
/// prefix.
fn long_dir() -> String {
    format!("{}/{}", "d".repeat(120), "e".repeat(140))
}

/// A site: nested files, an empty directory, a name past 100 bytes, and a
/// file in a directory whose path is longer than 255 bytes.
fn make_site(name: &str) -> PathBuf {
    let dir = scratch(name);
    let w = |p: &str, body: &str| {
        let p = dir.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    };
    w("index.html", "<h1>home</h1>\n");
    w("sub/b.txt", "bee\n");
    w("sub/deeper/c.txt", &"c".repeat(1500));
    w("space file.txt", "spaced\n");
    w(&format!("{}.txt", "n".repeat(130)), "long name\n");
    w(&format!("{}/f.txt", long_dir()), "deep\n");
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    dir
}

fn check_site(fs: &TarFs, mem: &mut Mem) {
    assert_eq!(read(fs, mem, "index.html"), b"<h1>home</h1>\n");
    assert_eq!(read(fs, mem, "/sub/b.txt"), b"bee\n");
    assert_eq!(
        read(fs, mem, "./sub//deeper/c.txt"),
        "c".repeat(1500).as_bytes()
    );
    assert_eq!(read(fs, mem, "space file.txt"), b"spaced\n");
    assert_eq!(
        read(fs, mem, &format!("{}.txt", "n".repeat(130))),
        b"long name\n"
    );
    assert_eq!(read(fs, mem, &format!("{}/f.txt", long_dir())), b"deep\n");
    assert_eq!(fs.len(), 6, "{:?}", fs.paths().collect::<Vec<_>>());
    for d in ["", "/", "sub", "sub/deeper", "/sub/", "empty", &long_dir()] {
        assert!(fs.is_dir(d), "{d} is a directory");
    }
    for not in ["index.html", "nosuch", "sub/b.txt", "su", "../sub"] {
        assert!(!fs.is_dir(not), "{not} is not a directory");
    }
    assert!(fs.get("sub").is_none(), "a directory is not a file");
    assert!(fs.get("nosuch").is_none());
    assert!(
        fs.get("sub/../index.html").is_none(),
        "no climbing in lookups"
    );
}

#[test]
fn reads_gnu_tars_default_format() {
    let dir = make_site("gnu");
    // `tar cf site.tar -C mysite .`, as the README says: names start `./`.
    let (fs, mut mem) = mount(tar(&dir, &["--format=gnu", "."])).unwrap();
    check_site(&fs, &mut mem);
    assert_eq!(fs.skipped(), 0);
}

#[test]
fn reads_pax_archives() {
    let dir = make_site("pax");
    let (fs, mut mem) = mount(tar(&dir, &["--format=pax", "."])).unwrap();
    check_site(&fs, &mut mem);
}

#[test]
fn reads_ustar_names_split_into_prefix_and_name() {
    let dir = scratch("ustar");
    // Longer than the name field, short enough for prefix + name.
    let sub = format!("{}/{}", "p".repeat(90), "q".repeat(40));
    std::fs::create_dir_all(dir.join(&sub)).unwrap();
    std::fs::write(dir.join(&sub).join("file.txt"), "split\n").unwrap();
    let (fs, mut mem) = mount(tar(&dir, &["--format=ustar", "."])).unwrap();
    assert_eq!(read(&fs, &mut mem, &format!("{sub}/file.txt")), b"split\n");
    assert!(fs.is_dir(&sub));
}

#[test]
fn hard_links_share_their_targets_data_and_symlinks_are_skipped() {
    let dir = scratch("links");
    std::fs::write(dir.join("a.txt"), "shared\n").unwrap();
    std::fs::hard_link(dir.join("a.txt"), dir.join("b.txt")).unwrap();
    std::os::unix::fs::symlink("a.txt", dir.join("s.txt")).unwrap();
    for format in ["--format=gnu", "--format=pax", "--format=ustar"] {
        let (fs, mut mem) = mount(tar(&dir, &[format, "a.txt", "b.txt", "s.txt"])).unwrap();
        assert_eq!(read(&fs, &mut mem, "a.txt"), b"shared\n", "{format}");
        assert_eq!(read(&fs, &mut mem, "b.txt"), b"shared\n", "{format}");
        assert!(fs.get("s.txt").is_none(), "{format}");
        assert_eq!(fs.skipped(), 1, "{format}: the symlink");
    }
}

/// A ustar header (POSIX magic unless `gnu`), checksum filled in.
fn header(name: &[u8], kind: u8, size: u64, gnu: bool) -> Vec<u8> {
    let mut h = vec![0u8; SECTOR];
    h[..name.len()].copy_from_slice(name);
    h[100..108].copy_from_slice(b"0000644\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = kind;
    if gnu {
        h[257..265].copy_from_slice(b"ustar  \0");
    } else {
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
    }
    seal(&mut h);
    h
}

/// Writes a header's checksum.
fn seal(h: &mut [u8]) {
    h[148..156].copy_from_slice(b"        ");
    let sum: u64 = h.iter().map(|&b| b as u64).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

/// An entry: header plus data padded to whole blocks.
fn entry(name: &[u8], kind: u8, data: &[u8]) -> Vec<u8> {
    let mut e = header(name, kind, data.len() as u64, false);
    e.extend_from_slice(data);
    e.resize(e.len().next_multiple_of(SECTOR), 0);
    e
}

/// Entries followed by the two zero blocks that end an archive.
fn archive(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut a = entries.concat();
    a.extend_from_slice(&[0u8; 2 * SECTOR]);
    a
}

#[test]
fn a_gnu_header_has_no_prefix_field() {
    // GNU's format keeps access and change times where ustar has the
    // prefix: they must not become part of the name.
    let mut h = header(b"a.txt", b'0', 3, true);
    h[345..357].copy_from_slice(b"14712345671\0");
    seal(&mut h);
    h.extend_from_slice(b"abc");
    h.resize(2 * SECTOR, 0);
    let (fs, mut mem) = mount(archive(&[h])).unwrap();
    assert_eq!(fs.paths().collect::<Vec<_>>(), ["a.txt"]);
    assert_eq!(read(&fs, &mut mem, "a.txt"), b"abc");
}

#[test]
fn names_that_climb_or_are_not_utf8_are_skipped() {
    let a = archive(&[
        entry(b"../evil.txt", b'0', b"x"),
        entry(b"sub/../../evil2.txt", b'0', b"x"),
        entry(b"bad\xff.txt", b'0', b"x"),
        entry(b"/abs/ok.txt", b'0', b"ok"),
        entry(b"./", b'5', b""),
        entry(b"", b'0', b"no name"),
    ]);
    let (fs, mut mem) = mount(a).unwrap();
    assert_eq!(fs.paths().collect::<Vec<_>>(), ["abs/ok.txt"]);
    assert_eq!(read(&fs, &mut mem, "abs/ok.txt"), b"ok");
    assert_eq!(fs.skipped(), 4);
    assert_eq!(fs.dirs().collect::<Vec<_>>(), ["abs"]);
}

#[test]
fn a_later_entry_replaces_an_earlier_one() {
    let a = archive(&[
        entry(b"a.txt", b'0', b"old"),
        entry(b"./a.txt", b'0', b"new"),
    ]);
    let (fs, mut mem) = mount(a).unwrap();
    assert_eq!(fs.len(), 1);
    assert_eq!(read(&fs, &mut mem, "a.txt"), b"new");
}

#[test]
fn old_style_and_contiguous_files_are_files_and_others_are_skipped() {
    let a = archive(&[
        entry(b"v7.txt", 0, b"v7"),
        entry(b"contig.txt", b'7', b"c"),
        entry(b"fifo", b'6', b""),
        entry(b"chardev", b'3', b""),
        entry(b"to-nowhere", b'1', b""),
    ]);
    let (fs, mut mem) = mount(a).unwrap();
    assert_eq!(read(&fs, &mut mem, "v7.txt"), b"v7");
    assert_eq!(read(&fs, &mut mem, "contig.txt"), b"c");
    assert_eq!(fs.len(), 2);
    assert_eq!(fs.skipped(), 3);
}

#[test]
fn large_sizes_in_base_256_are_read() {
    assert_eq!(number(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0]), Some(512));
    assert_eq!(
        number(&[0x80, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]),
        Some(2 << 56)
    );
    assert_eq!(
        number(&[0x80, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        None,
        "overflow"
    );
    assert_eq!(number(&[0xff; 12]), None, "negative");
    // A base-256 size in a real header.
    let mut h = header(b"b256.txt", b'0', 0, true);
    h[124..136].copy_from_slice(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4]);
    seal(&mut h);
    h.extend_from_slice(b"wxyz");
    h.resize(2 * SECTOR, 0);
    let (fs, mut mem) = mount(archive(&[h])).unwrap();
    assert_eq!(read(&fs, &mut mem, "b256.txt"), b"wxyz");
}

#[test]
fn octal_fields_are_parsed_strictly() {
    assert_eq!(number(b"00000000017\0"), Some(15));
    assert_eq!(number(b"     17 \0\0\0\0"), Some(15));
    assert_eq!(
        number(b"17\0garbage!!"),
        Some(15),
        "nothing after the end counts"
    );
    assert_eq!(number(b"\0\0\0\0\0\0\0\0\0\0\0\0"), None, "empty");
    assert_eq!(number(b"0000000008\0\0"), None, "not octal");
    assert_eq!(number(b"-0000000001\0"), None);
    assert_eq!(number(b"77777777777777777777777"), None, "overflow");
}

#[test]
fn a_signed_checksum_is_accepted() {
    // Old tars summed bytes as signed chars: differs when a byte is >= 0x80.
    let mut h = header(b"caf\xc3\xa9.txt", b'0', 0, false);
    h[148..156].copy_from_slice(b"        ");
    let signed: i64 = h.iter().map(|&b| b as i8 as i64).sum();
    h[148..156].copy_from_slice(format!("{signed:06o}\0 ").as_bytes());
    let (fs, _) = mount(archive(&[h])).unwrap();
    assert!(fs.get("café.txt").is_some());
}

fn malformed(a: Vec<u8>) -> (u64, &'static str) {
    match mount(a) {
        Err(TarError::Malformed { offset, reason }) => (offset, reason),
        Err(e) => panic!("expected a malformed archive, got {e:?}"),
        Ok((fs, _)) => panic!(
            "expected a malformed archive, got {:?}",
            fs.paths().collect::<Vec<_>>()
        ),
    }
}

#[test]
fn damaged_archives_are_errors_not_panics() {
    // Not a tar archive at all.
    let (at, why) = malformed(b"hello, world\n".repeat(100));
    assert_eq!(at, 0);
    assert!(why.contains("checksum"), "{why}");

    // A damaged second header.
    let mut a = archive(&[entry(b"a.txt", b'0', b"a"), entry(b"b.txt", b'0', b"b")]);
    a[1024 + 10] ^= 1;
    assert_eq!(malformed(a).0, 1024);

    // A size that runs past the end, or that overflows the offset.
    let mut big = header(b"big", b'0', 0, false);
    big[124..136].copy_from_slice(b"77777777777\0");
    seal(&mut big);
    assert!(malformed(archive(&[big])).1.contains("past the end"));
    let mut huge = header(b"huge", b'0', 0, true);
    huge[124..136].copy_from_slice(&[
        0x80, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    ]);
    seal(&mut huge);
    assert!(malformed(archive(&[huge])).1.contains("past the end"));

    // A size field that is not a number.
    let mut h = header(b"x", b'0', 0, false);
    h[124..136].copy_from_slice(b"12x45678901\0");
    seal(&mut h);
    assert!(malformed(archive(&[h])).1.contains("size"));

    // A truncated archive: the data stops before the size says.
    let mut a = entry(b"t.txt", b'0', &[7u8; 3000]);
    a.truncate(SECTOR * 3);
    assert!(malformed(a).1.contains("past the end"));

    // A long name too large to be one.
    let a = archive(&[entry(b"././@LongLink", b'L', &vec![b'n'; 70_000])]);
    assert!(malformed(a).1.contains("too large"));

    // Pax headers whose records lie about their length or lack a `=`.
    for bad in [
        &b"99 path=a\n"[..],
        b"5 path=abc\n",
        b"12 pathabc\n",
        b"x path=a\n",
        b"12 size=+12\n",
    ] {
        let a = archive(&[entry(b"pax", b'x', bad), entry(b"f", b'0', b"")]);
        assert!(
            malformed(a).1.contains("pax"),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn metadata_applies_to_the_next_entry_only() {
    let a = archive(&[
        entry(b"././@LongLink", b'L', b"the-long-name.txt\0"),
        entry(b"short", b'0', b"1"),
        entry(b"plain.txt", b'0', b"2"),
        entry(b"PaxHeader", b'x', b"21 path=pax-name.txt\n"),
        entry(b"ignored", b'0', b"3"),
        entry(b"after.txt", b'0', b"4"),
    ]);
    let (fs, _) = mount(a).unwrap();
    assert_eq!(
        fs.paths().collect::<Vec<_>>(),
        [
            "after.txt",
            "pax-name.txt",
            "plain.txt",
            "the-long-name.txt"
        ]
    );
}

#[test]
fn a_pax_size_replaces_the_header_size() {
    let mut a = entry(b"PaxHeader", b'x', b"10 size=5\n");
    let mut h = header(b"f.txt", b'0', 0, false);
    h.extend_from_slice(b"12345");
    h.resize(2 * SECTOR, 0);
    a.extend(h);
    let (fs, mut mem) = mount(archive(&[a])).unwrap();
    assert_eq!(read(&fs, &mut mem, "f.txt"), b"12345");
}

#[test]
fn empty_devices_and_end_markers() {
    let (fs, _) = mount(Vec::new()).unwrap();
    assert!(fs.is_empty());
    let (fs, _) = mount(vec![0u8; 10 * SECTOR]).unwrap();
    assert!(fs.is_empty());
    // Nothing after the end marker is read.
    let mut a = archive(&[entry(b"a", b'0', b"a")]);
    a.extend_from_slice(&[0xffu8; SECTOR]);
    let (fs, _) = mount(a).unwrap();
    assert_eq!(fs.len(), 1);
    // A device shorter than a block holds no archive.
    let (fs, _) = mount(vec![1u8; 100]).unwrap();
    assert!(fs.is_empty());
}

#[test]
fn device_errors_are_reported_as_such() {
    let (fs, _) = mount(archive(&[entry(b"a.txt", b'0', b"a")])).unwrap();
    let entry = fs.get("a.txt").unwrap();
    let mut short = Mem(vec![0u8; SECTOR]);
    assert_eq!(
        now(TarFs::read(&mut short, entry)),
        Err(TarError::Read(OutOfRange))
    );
    let huge = Entry {
        offset: 0,
        size: u64::MAX,
    };
    assert!(matches!(
        now(TarFs::read(&mut short, huge)),
        Err(TarError::Malformed { .. })
    ));
    assert_eq!(
        format!(
            "{}",
            TarError::<&str>::Malformed {
                offset: 512,
                reason: "bad"
            }
        ),
        "malformed tar archive at byte 512: bad"
    );
}

#[test]
fn the_file_count_is_bounded() {
    let one = entry(b"f", b'0', b"");
    let mut a = Vec::with_capacity((MAX_FILES + 3) * SECTOR);
    for i in 0..=MAX_FILES {
        let mut h = one.clone();
        let name = format!("f{i}");
        h[..name.len()].copy_from_slice(name.as_bytes());
        seal(&mut h);
        a.extend_from_slice(&h);
    }
    a.extend_from_slice(&[0u8; 2 * SECTOR]);
    let (at, why) = malformed(a);
    assert_eq!(at, (MAX_FILES * SECTOR) as u64);
    assert!(why.contains("more files"), "{why}");
}

#[test]
fn paths_are_normalised() {
    assert_eq!(normalise(b"./a//b/./c").as_deref(), Some("a/b/c"));
    assert_eq!(normalise(b"/").as_deref(), Some(""));
    assert_eq!(normalise(b"a/..").as_deref(), None);
    assert_eq!(
        normalise(b"a/..b").as_deref(),
        Some("a/..b"),
        "only whole segments"
    );
    assert_eq!(normalise(b"\xc3").as_deref(), None);
}

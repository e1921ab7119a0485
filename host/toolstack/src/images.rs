//! Validated images, kept by the daemon so that a second `run` of the same
//! file neither reads nor validates it again.
//!
//! An entry is keyed by the file's identity and version as `fstat` reports
//! them (device, inode, size, modification and change times): rewriting
//! the file in place changes its times and size, replacing it changes its
//! inode, so a changed image is read and validated again and never served
//! stale. The bytes that were validated are kept in a sealed memfd (no
//! write, grow or shrink): the shell loads exactly what was checked, even
//! if the file changes between the check and the load, and every shell of
//! the same image shares that one copy. Shells read it with `pread`, so one
//! descriptor can be handed to many at once.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use wisp_monitor::image::MAX_IMAGE_FILE;

/// Most images kept; the least recently used one goes first.
const CAPACITY: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ImageCacheError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not a regular file")]
    NotAFile,
    #[error("{0}")]
    Invalid(#[from] wisp_monitor::ImageError),
}

/// The identity and version of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Key {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Key {
    fn of(m: &std::fs::Metadata) -> Key {
        Key {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        }
    }
}

/// A validated image: its bytes in a sealed memfd.
pub struct CachedImage {
    pub fd: OwnedFd,
    pub len: u64,
}

struct Entry {
    key: Key,
    image: Arc<CachedImage>,
    used: u64,
}

/// Counters of the cache (`GET /v1/pool` shows them).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct ImageCacheCounters {
    /// Requests served from the cache.
    pub hits: u64,
    /// Images read and validated (first use, or the file changed).
    pub loads: u64,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<PathBuf, Entry>,
    clock: u64,
    counters: ImageCacheCounters,
}

#[derive(Default)]
pub struct ImageCache {
    inner: Mutex<Inner>,
}

impl ImageCache {
    pub fn new() -> ImageCache {
        ImageCache::default()
    }

    pub fn counters(&self) -> ImageCacheCounters {
        self.lock().counters
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The validated image at `path`: from the cache if the file has not
    /// changed since it was validated, else read and validated now.
    pub fn get(&self, path: &Path) -> Result<Arc<CachedImage>, ImageCacheError> {
        let meta = std::fs::metadata(path)?;
        if !meta.is_file() {
            return Err(ImageCacheError::NotAFile);
        }
        let key = Key::of(&meta);
        {
            let mut g = self.lock();
            g.clock += 1;
            let now = g.clock;
            if let Some(e) = g.entries.get_mut(path) {
                if e.key == key {
                    e.used = now;
                    let image = e.image.clone();
                    g.counters.hits += 1;
                    return Ok(image);
                }
            }
        }
        // Read from one open file and keyed by what that file was before
        // and after the read: a write during the read is not cached.
        let mut file = std::fs::File::open(path)?;
        let before = Key::of(&file.metadata()?);
        if before.size > MAX_IMAGE_FILE {
            return Err(wisp_monitor::ImageError::TooLarge.into());
        }
        let mut bytes = Vec::with_capacity(before.size as usize);
        Read::by_ref(&mut file)
            .take(MAX_IMAGE_FILE + 1)
            .read_to_end(&mut bytes)?;
        let after = Key::of(&file.metadata()?);
        let image = wisp_monitor::Image::parse(bytes)?;
        let fd = sealed_memfd(image.bytes())?;
        let cached = Arc::new(CachedImage {
            fd,
            len: image.bytes().len() as u64,
        });
        let mut g = self.lock();
        g.counters.loads += 1;
        if before == after {
            if g.entries.len() >= CAPACITY && !g.entries.contains_key(path) {
                let oldest = g
                    .entries
                    .iter()
                    .min_by_key(|(_, e)| e.used)
                    .map(|(p, _)| p.clone());
                if let Some(p) = oldest {
                    g.entries.remove(&p);
                }
            }
            let used = g.clock;
            g.entries.insert(
                path.to_path_buf(),
                Entry {
                    key: after,
                    image: cached.clone(),
                    used,
                },
            );
        }
        Ok(cached)
    }
}

/// Snapshots whose memory the daemon has checked (checksum and holes),
/// keyed as images are: a restore of an unchanged snapshot, and every clone
/// of a batch, tells its shell not to read the memory again.
#[derive(Default)]
pub struct CheckedSnapshots {
    inner: Mutex<HashMap<PathBuf, Key>>,
}

impl CheckedSnapshots {
    pub fn new() -> CheckedSnapshots {
        CheckedSnapshots::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Key>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the open file `file` is the version of `path` that was
    /// checked.
    pub fn is_checked_file(&self, path: &Path, file: &std::fs::File) -> bool {
        match file.metadata() {
            Ok(m) => self.lock().get(path) == Some(&Key::of(&m)),
            Err(_) => false,
        }
    }

    /// Checks `path` with `check` (which opens it whole) unless it was
    /// checked as it is now; records it as checked if it did not change
    /// meanwhile. Returns what `check` returns.
    pub fn check<T, E>(
        &self,
        path: &Path,
        check: impl FnOnce(bool) -> Result<T, E>,
    ) -> Result<T, E> {
        let before = std::fs::metadata(path).ok().map(|m| Key::of(&m));
        let known = before.is_some() && self.lock().get(path) == before.as_ref();
        let r = check(!known)?;
        let after = std::fs::metadata(path).ok().map(|m| Key::of(&m));
        if let (Some(b), true) = (before, before == after) {
            let mut g = self.lock();
            if g.len() >= CAPACITY && !g.contains_key(path) {
                g.clear();
            }
            g.insert(path.to_path_buf(), b);
        }
        Ok(r)
    }
}

/// A memfd holding `bytes`, sealed against any change.
fn sealed_memfd(bytes: &[u8]) -> std::io::Result<OwnedFd> {
    // SAFETY: a plain syscall with a NUL-terminated name; checked.
    let fd = unsafe {
        libc::memfd_create(
            c"wisp-image".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut f = std::fs::File::from(fd);
    f.write_all(bytes)?;
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(OwnedFd::from(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_memfd_refuses_writes() {
        let fd = sealed_memfd(b"abc").unwrap();
        let mut f = std::fs::File::from(fd);
        assert!(f.write_all(b"x").is_err());
        assert!(f.set_len(0).is_err());
        let mut s = String::new();
        use std::io::{Seek, SeekFrom};
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "abc");
    }

    #[test]
    fn a_snapshot_is_checked_whole_again_only_when_it_changed() {
        let dir = std::env::temp_dir().join(format!("wisp-snaps-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.snap");
        std::fs::write(&p, b"one").unwrap();
        let c = CheckedSnapshots::new();
        let whole = |c: &CheckedSnapshots| c.check(&p, Ok::<bool, ()>).unwrap();
        assert!(whole(&c), "first time: checked whole");
        assert!(!whole(&c), "unchanged: memory not read again");
        assert!(c.is_checked_file(&p, &std::fs::File::open(&p).unwrap()));
        std::fs::write(&p, b"other").unwrap();
        assert!(!c.is_checked_file(&p, &std::fs::File::open(&p).unwrap()));
        assert!(whole(&c), "changed: checked whole again");
        // A failed check is not remembered.
        std::fs::write(&p, b"third!").unwrap();
        assert!(c.check(&p, |_| Err::<(), ()>(())).is_err());
        assert!(whole(&c));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_that_is_not_an_image_is_refused_and_not_cached() {
        let dir = std::env::temp_dir().join(format!("wisp-images-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.wisp");
        std::fs::write(&p, b"not an image").unwrap();
        let c = ImageCache::new();
        assert!(matches!(c.get(&p), Err(ImageCacheError::Invalid(_))));
        assert!(matches!(c.get(&dir), Err(ImageCacheError::NotAFile)));
        assert_eq!(c.counters().hits, 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Guest RAM: one region at guest-physical 0, backed by a memfd.
//!
//! A memfd rather than anonymous memory so that the guest's memory is a file
//! the monitor can hand on (a snapshot writes it out, a restore or a clone
//! maps one copy-on-write) without changing how the running guest sees it.
//! The mapping is shared and `MAP_NORESERVE`: untouched pages cost the host
//! nothing, and the guest pays its first-touch faults only where it looks.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create the guest memory file: {0}")]
    Create(std::io::Error),
    #[error("cannot size the guest memory file to {size} bytes: {source}")]
    Size { size: u64, source: std::io::Error },
    #[error("cannot map {size} bytes of guest memory: {reason}")]
    Map { size: u64, reason: String },
}

/// The guest's RAM and the file behind it.
pub struct GuestRam {
    pub mem: GuestMemoryMmap,
    pub file: File,
    pub size: u64,
    /// Host address of guest-physical 0 (for the KVM memory slot).
    pub host_addr: u64,
    /// Where guest-physical 0 is in `file`.
    pub file_offset: u64,
    /// The mapping is private (a restored guest: the snapshot's memory,
    /// copy-on-write): what the guest wrote is in anonymous pages, not in
    /// `file`.
    pub private: bool,
    /// Pages the monitor's devices wrote while a migration tracks them
    /// (KVM's dirty log sees only the guest CPU's writes).
    pub dirty: Arc<DirtyPages>,
}

/// A bitmap of guest pages written by the monitor itself (devices copying
/// received frames, block reads, used-ring updates), kept only while a
/// live migration asks for it: marking costs one atomic load otherwise.
///
/// Two sets: `round`, taken (and cleared) by each pre-copy round, and
/// `ever`, every page marked since tracking started. A device marks a page
/// when it checks the access, just before it writes, so a round may copy
/// the page before the write lands; the final stop-and-copy (devices
/// quiet) therefore resends `ever`, which closes that window.
#[derive(Debug)]
pub struct DirtyPages {
    enabled: AtomicBool,
    round: Box<[AtomicU64]>,
    ever: Box<[AtomicU64]>,
    pages: u64,
}

impl DirtyPages {
    /// A tracker for `size` bytes of guest memory, off.
    pub fn new(size: u64) -> DirtyPages {
        let pages = size / PAGE;
        let words = pages.div_ceil(64) as usize;
        let zeros = || (0..words).map(|_| AtomicU64::new(0)).collect();
        DirtyPages {
            enabled: AtomicBool::new(false),
            round: zeros(),
            ever: zeros(),
            pages,
        }
    }

    /// Starts tracking, with both sets empty.
    pub fn start(&self) {
        for w in self.round.iter().chain(self.ever.iter()) {
            w.store(0, Ordering::Relaxed);
        }
        self.enabled.store(true, Ordering::SeqCst);
    }

    /// Stops tracking (a finished or abandoned migration).
    pub fn stop(&self) {
        self.enabled.store(false, Ordering::SeqCst);
    }

    /// Marks the pages of `[addr, addr + len)` (clipped to guest memory)
    /// if tracking is on.
    pub fn mark(&self, addr: u64, len: u64) {
        if len == 0 || !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let first = addr / PAGE;
        let last = (addr.saturating_add(len - 1) / PAGE).min(self.pages.saturating_sub(1));
        for p in first..=last {
            let (w, b) = ((p / 64) as usize, 1u64 << (p % 64));
            if let (Some(r), Some(e)) = (self.round.get(w), self.ever.get(w)) {
                r.fetch_or(b, Ordering::SeqCst);
                e.fetch_or(b, Ordering::SeqCst);
            }
        }
    }

    /// ORs the pages marked since the last call into `bitmap` (one bit per
    /// page, KVM's dirty-log layout) and clears them.
    pub fn take_into(&self, bitmap: &mut [u64]) {
        for (w, r) in bitmap.iter_mut().zip(self.round.iter()) {
            *w |= r.swap(0, Ordering::SeqCst);
        }
    }

    /// ORs every page marked since [`DirtyPages::start`] into `bitmap`.
    pub fn ever_into(&self, bitmap: &mut [u64]) {
        for (w, e) in bitmap.iter_mut().zip(self.ever.iter()) {
            *w |= e.load(Ordering::SeqCst);
        }
    }
}

const PAGE: u64 = 4096;

/// A new memfd of `size` zero bytes (holes: it costs nothing until
/// written).
pub fn memfd(size: u64) -> Result<File, MemoryError> {
    // SAFETY: a plain syscall with a static NUL-terminated name; the
    // result is checked before use.
    let fd = unsafe { libc::memfd_create(c"wisp-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Create(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| MemoryError::Size { size, source })?;
    Ok(file)
}

impl GuestRam {
    /// Creates `size` bytes of zero-filled guest memory.
    pub fn new(size: u64) -> Result<GuestRam, MemoryError> {
        let file = memfd(size)?;
        let map_err = |e: &dyn std::fmt::Display| MemoryError::Map {
            size,
            reason: e.to_string(),
        };
        let len = usize::try_from(size).map_err(|e| map_err(&e))?;
        let backing = file.try_clone().map_err(|e| map_err(&e))?;
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            len,
            Some(FileOffset::new(backing, 0)),
        )])
        .map_err(|e| map_err(&e))?;
        let host_addr = mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| map_err(&e))? as u64;
        Ok(GuestRam {
            mem,
            file,
            size,
            host_addr,
            file_offset: 0,
            private: false,
            dirty: Arc::new(DirtyPages::new(size)),
        })
    }

    /// Maps `size` bytes of `file` from `offset` privately: the guest
    /// reads the file's pages on demand and its writes go to its own
    /// copies, so restoring (or cloning) costs no copy however large the
    /// guest is.
    pub fn map_private(file: File, offset: u64, size: u64) -> Result<GuestRam, MemoryError> {
        use vm_memory::{GuestRegionMmap, MmapRegion};
        let map_err = |e: &dyn std::fmt::Display| MemoryError::Map {
            size,
            reason: e.to_string(),
        };
        let len = usize::try_from(size).map_err(|e| map_err(&e))?;
        let backing = file.try_clone().map_err(|e| map_err(&e))?;
        let region = MmapRegion::<()>::build(
            Some(FileOffset::new(backing, offset)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| map_err(&e))?;
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| map_err(&"region does not fit the address space"))?;
        let mem = GuestMemoryMmap::from_regions(vec![region]).map_err(|e| map_err(&e))?;
        let host_addr = mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| map_err(&e))? as u64;
        Ok(GuestRam {
            mem,
            file,
            size,
            host_addr,
            file_offset: offset,
            private: true,
            dirty: Arc::new(DirtyPages::new(size)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_pages_mark_only_while_on_and_keep_every_page_marked() {
        let d = DirtyPages::new(256 * PAGE);
        d.mark(0, 1);
        let mut b = vec![0u64; 4];
        d.take_into(&mut b);
        assert_eq!(b, [0; 4], "marked while off");
        d.start();
        d.mark(PAGE - 1, 2); // pages 0 and 1
        d.mark(200 * PAGE, 10 << 20); // clipped at the end of memory
        d.take_into(&mut b);
        assert_eq!(b[0], 0b11);
        assert_eq!(b[3], !0u64 << 8, "pages 200..255");
        let mut again = vec![0u64; 4];
        d.take_into(&mut again);
        assert_eq!(again, [0; 4], "taken once");
        d.ever_into(&mut again);
        assert_eq!(again, b, "ever keeps them");
        d.stop();
        d.mark(64 * PAGE, 1);
        let mut ever = vec![0u64; 4];
        d.ever_into(&mut ever);
        assert_eq!(ever[1], 0);
    }
}

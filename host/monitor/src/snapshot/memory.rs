//! Guest memory in a snapshot: which pages to write (only those the guest
//! ever touched), writing them at their guest-physical offset in the file,
//! and checking them when a snapshot is opened.
//!
//! A fresh guest's RAM is a memfd: pages never touched are holes, found
//! with `SEEK_DATA`/`SEEK_HOLE`. A restored guest's RAM is a private
//! mapping of its snapshot: what it has written since is in anonymous
//! pages, found in `/proc/self/pagemap`, and what it has not is the
//! snapshot's data, found with `SEEK_DATA` as before.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use super::format::PAGE;

/// Byte ranges `(start, len)` of guest memory, sorted and merged.
pub type Ranges = Vec<(u64, u64)>;

/// The ranges of `file` between `offset` and `offset + size` that hold
/// data, relative to `offset`, rounded out to whole pages.
pub fn data_ranges(file: &File, offset: u64, size: u64) -> std::io::Result<Ranges> {
    let fd = file.as_raw_fd();
    let end = offset + size;
    let mut out = Vec::new();
    let mut at = offset;
    while at < end {
        // SAFETY: plain lseek on a descriptor we own; results are checked.
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after `at`
            }
            return Err(e);
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let hole = (hole as u64).min(end);
        let start = (data - offset) / PAGE * PAGE;
        let stop = (hole - offset).div_ceil(PAGE) * PAGE;
        out.push((start, stop.min(size) - start));
        at = hole.max(data + 1);
    }
    Ok(merge(out))
}

/// Pages of this process's mapping at `host_addr` (`size` bytes) that are
/// private anonymous copies: what a restored guest wrote since its restore.
/// `pagemap` is this process's `/proc/self/pagemap`.
pub fn anonymous_pages(pagemap: &File, host_addr: u64, size: u64) -> std::io::Result<Ranges> {
    let pages = size / PAGE;
    let f = pagemap;
    let mut raw = vec![0u8; (pages * 8) as usize];
    let first = host_addr / PAGE;
    let mut done = 0usize;
    while done < raw.len() {
        let n = f.read_at(&mut raw[done..], first * 8 + done as u64)?;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        }
        done += n;
    }
    let mut out = Vec::new();
    for (i, e) in raw.chunks_exact(8).enumerate() {
        let e = u64::from_le_bytes(e.try_into().unwrap_or([0; 8]));
        let present_or_swapped = e & (3 << 62) != 0;
        let file_or_shared = e & (1 << 61) != 0;
        if present_or_swapped && !file_or_shared {
            out.push((i as u64 * PAGE, PAGE));
        }
    }
    Ok(merge(out))
}

/// Sorts and merges overlapping or touching ranges.
pub fn merge(mut r: Ranges) -> Ranges {
    r.sort_unstable();
    let mut out: Ranges = Vec::with_capacity(r.len());
    for (s, l) in r {
        match out.last_mut() {
            Some((ps, pl)) if *ps + *pl >= s => *pl = (*pl).max(s + l - *ps),
            _ => out.push((s, l)),
        }
    }
    out
}

/// Writes `ranges` of the guest memory at `host` into `out` at
/// `mem_offset + address`; returns the CRC-32 of the bytes, in order.
///
/// # Safety
/// `host` must point to `size` readable bytes (the guest's RAM mapping, kept
/// alive by the caller) that nothing writes while this runs (the guest is
/// paused), and every range must lie within `size`.
pub unsafe fn write_ranges(
    host: *const u8,
    ranges: &[(u64, u64)],
    out: &File,
    mem_offset: u64,
) -> std::io::Result<u32> {
    let mut crc = crc32fast::Hasher::new();
    for &(start, len) in ranges {
        // SAFETY: the caller guarantees the range is inside the mapping and
        // not written meanwhile.
        let bytes = unsafe { std::slice::from_raw_parts(host.add(start as usize), len as usize) };
        crc.update(bytes);
        out.write_all_at(bytes, mem_offset + start)?;
    }
    Ok(crc.finalize())
}

/// The CRC-32 of `ranges` of the memory region of `file` at `mem_offset`.
pub fn checksum(file: &File, mem_offset: u64, ranges: &[(u64, u64)]) -> std::io::Result<u32> {
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    for &(start, len) in ranges {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], mem_offset + start + done)?;
            crc.update(&buf[..n]);
            done += n as u64;
        }
    }
    Ok(crc.finalize())
}

/// The parts of `a` not in `b` (both merged).
pub fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Ranges {
    let mut out = Vec::new();
    for &(s, l) in a {
        let mut at = s;
        let end = s + l;
        for &(bs, bl) in b {
            let be = bs + bl;
            if be <= at || bs >= end {
                continue;
            }
            if bs > at {
                out.push((at, bs - at));
            }
            at = at.max(be);
        }
        if at < end {
            out.push((at, end - at));
        }
    }
    out
}

/// Whether `ranges` of the memory region of `file` at `mem_offset` hold
/// only zeros (pages a snapshot did not write, in a copy that filled its
/// holes in).
pub fn all_zero(file: &File, mem_offset: u64, ranges: &[(u64, u64)]) -> std::io::Result<bool> {
    let mut buf = vec![0u8; 1 << 20];
    for &(start, len) in ranges {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], mem_offset + start + done)?;
            if buf[..n].iter().any(|&b| b != 0) {
                return Ok(false);
            }
            done += n as u64;
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges() {
        assert_eq!(
            merge(vec![(8192, 4096), (0, 4096), (4096, 4096), (20480, 4096)]),
            vec![(0, 12288), (20480, 4096)]
        );
        assert_eq!(
            subtract(&[(0, 20480)], &[(4096, 4096), (12288, 4096)]),
            vec![(0, 4096), (8192, 4096), (16384, 4096)]
        );
        assert!(subtract(&[(4096, 4096)], &[(0, 12288)]).is_empty());
    }

    #[test]
    fn finds_only_written_pages_of_a_memfd() {
        let ram = crate::memory::GuestRam::new(4 << 20).unwrap();
        ram.file.write_all_at(&[1], 3 * PAGE + 5).unwrap();
        ram.file.write_all_at(&[1; 5000], 100 * PAGE).unwrap();
        assert_eq!(
            data_ranges(&ram.file, 0, ram.size).unwrap(),
            vec![(3 * PAGE, PAGE), (100 * PAGE, 2 * PAGE)]
        );
    }
}

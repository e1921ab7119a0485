//! Monitor processes seen from the daemon: pidfds (signals and exit
//! notification that cannot hit a reused pid), and their CPU time and
//! memory from `/proc`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A pidfd for `pid`.
pub fn pidfd(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: a plain syscall; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Sends `sig` to the process behind `fd` (harmless if it has ended).
pub fn signal(fd: &OwnedFd, sig: libc::c_int) -> std::io::Result<()> {
    // SAFETY: a plain syscall on a pidfd we own.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// Waits until the process behind `fd` has ended, or `timeout_ms` passes
/// (-1: no limit); returns whether it ended.
pub fn wait_exit(fd: &OwnedFd, timeout_ms: i32) -> bool {
    readable(fd.as_raw_fd(), timeout_ms)
}

/// Whether `fd` becomes readable (or hung up) within `timeout_ms` (-1: no
/// limit); a signal does not end the wait.
pub fn readable(fd: std::os::fd::RawFd, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd that outlives the call.
        let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        return n > 0 && p.revents != 0;
    }
}

/// Fields of `/proc/PID/stat` after the command name.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let rest = &s[s.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// The process's start time (clock ticks after boot): with the pid, it
/// names one process for the whole life of the host.
pub fn start_time(pid: u32) -> Option<u64> {
    // Field 22 of stat; index 19 after the name and state.
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// Whether `pid` is alive and is the process that started at `start`.
pub fn same_process(pid: u32, start: Option<u64>) -> bool {
    match (start_time(pid), start) {
        (Some(now), Some(then)) => now == then,
        _ => false,
    }
}

/// CPU time (user + system, all threads) in seconds, and resident memory in
/// bytes.
pub fn usage(pid: u32) -> Option<(f64, u64)> {
    let f = stat_fields(pid)?;
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf with a constant name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf with a constant name.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    Some((ticks as f64 / hz, pages * page))
}

/// `MemAvailable` of the host in bytes.
pub fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_itself_and_a_child_ends() {
        let me = std::process::id();
        let start = start_time(me);
        assert!(start.is_some());
        assert!(same_process(me, start));
        assert!(!same_process(me, start.map(|s| s + 1)));
        let (cpu, rss) = usage(me).unwrap();
        assert!(cpu >= 0.0 && rss > 0);
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let fd = pidfd(child.id()).unwrap();
        assert!(!wait_exit(&fd, 0));
        signal(&fd, libc::SIGKILL).unwrap();
        assert!(wait_exit(&fd, 5000));
        let _ = child.wait();
        // A signal to an ended (reaped) process is not an error.
        signal(&fd, libc::SIGKILL).unwrap();
    }
}

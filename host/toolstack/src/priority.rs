//! CPU priority of background work: shells made to refill the pool.
//!
//! A refill (a process started, a KVM VM, vCPU and memory created, pages
//! faulted in) costs several milliseconds of CPU; a warm start half a
//! millisecond. On a small host they compete: in a burst of starts each
//! start ran beside the refill the previous one began, and its threads
//! waited for a CPU the refill held. A shell being made for the pool
//! (`wisp shell --background`) lowers itself to `SCHED_IDLE` first thing,
//! so that any start (or anything else the host runs) takes the CPU first,
//! and goes back to the normal policy before it tells the daemon it is
//! ready: a guest never runs at idle priority.
//!
//! On a host whose CPUs are kept busy, an idle-priority shell would hardly
//! progress: the daemon puts a shell that is not ready after
//! [`crate::pool::IDLE_GRACE`] back to the normal policy itself.
//!
//! Going back from `SCHED_IDLE` needs `CAP_SYS_NICE` (a daemon run by root,
//! as the shipped unit does) or an `RLIMIT_NICE` that allows it: the daemon
//! probes ([`can_lower_and_restore`]) and, if it cannot, does not ask
//! shells to lower themselves, and refills compete as before.

use std::io;

/// Sets the calling thread's policy (priority 0, the only one these two
/// policies have).
fn set_policy(policy: libc::c_int) -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param; pid 0 is the calling thread.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread's policy.
pub fn current() -> libc::c_int {
    // SAFETY: pid 0 is the calling thread; no pointers.
    unsafe { libc::sched_getscheduler(0) }
}

/// Lowers the calling thread to `SCHED_IDLE` (always allowed).
pub fn lower() -> io::Result<()> {
    set_policy(libc::SCHED_IDLE)
}

/// Puts the calling thread back to the normal policy.
pub fn restore() -> io::Result<()> {
    set_policy(libc::SCHED_OTHER)
}

/// Puts the main thread of process `pid` (a shell this daemon started)
/// back to the normal policy.
pub fn restore_process(pid: u32) -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param; `pid` names our child, which
    // is not reaped while the caller holds it.
    if unsafe { libc::sched_setscheduler(pid as libc::pid_t, libc::SCHED_OTHER, &param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether this process may lower a thread and restore it: tried on a
/// thread of its own, which ends either way (a thread that could lower
/// itself but not come back would stay idle).
pub fn can_lower_and_restore() -> bool {
    std::thread::Builder::new()
        .name("wisp-prio-probe".into())
        .spawn(|| lower().and_then(|()| restore()).is_ok())
        .ok()
        .and_then(|t| t.join().ok())
        .unwrap_or(false)
}

/// Helpers for the tests of the spawner and the pool.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::PathBuf;

    /// The `policy` field of a /proc/.../sched text ("" if none).
    pub fn policy_in(sched: &str) -> String {
        sched
            .lines()
            .find_map(|l| l.strip_prefix("policy"))
            .map(|v| v.trim_start_matches([' ', ':']).trim().to_string())
            .unwrap_or_default()
    }

    /// A fresh directory `name` with an executable `probe.sh` that stands
    /// in for `wisp shell`: given `--background` it lowers itself to
    /// `SCHED_IDLE` as a shell does; after `sleep` seconds it copies its own
    /// /proc/PID/sched to `sched` beside it (it never says it is ready).
    /// Returns both.
    pub fn policy_recorder(name: &str, sleep: &str) -> (PathBuf, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("wisp-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("probe.sh");
        let body =
            format!(
                "#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = --background ] && chrt --idle -p 0 $$; done\n\
                 sleep {sleep}\ncp /proc/$$/sched \"$(dirname \"$0\")/sched\"\n"
            );
        std::fs::write(&script, body).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        (dir, script)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_then_restore_on_a_thread() {
        let capable = can_lower_and_restore();
        let (idle, back) = std::thread::spawn(move || {
            lower().unwrap();
            let idle = current();
            let back = restore().map(|()| current());
            (idle, back.ok())
        })
        .join()
        .unwrap();
        assert_eq!(idle, libc::SCHED_IDLE);
        // The probe's answer is what a real restore does.
        assert_eq!(back.is_some(), capable);
        if capable {
            assert_eq!(back, Some(libc::SCHED_OTHER));
        }
    }
}

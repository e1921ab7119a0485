//! The monitor's seccomp filter (Firecracker's model: every vCPU runs
//! hostile code from its first instruction).
//!
//! Installed once the VM is built (memory mapped, devices open, ports
//! bound) and before the guest first runs, it allows only the system calls
//! serving a running guest needs; anything else kills the process. `ioctl`
//! is limited to the requests the run loop makes (KVM_RUN, register reads
//! for crash reports, FIONBIO on accepted sockets), and `clone` to the
//! one shape the teardown child uses. The monitor runs one thread, so one
//! filter covers it.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the seccomp filter: {0}")]
    Build(String),
    #[error("installing the seccomp filter: {0}")]
    Install(String),
}

/// `ioctl` requests allowed after the filter is installed.
const IOCTLS: &[u64] = &[
    0xae80,      // KVM_RUN
    0x8090_ae81, // KVM_GET_REGS
    0x8138_ae83, // KVM_GET_SREGS
    0x5421,      // FIONBIO (std's set_nonblocking on accepted sockets)
];

/// System calls allowed without conditions.
const SYSCALLS: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_close,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_setitimer,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

fn cond(arg: u8, value: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, value)
        .map_err(|e| SeccompError::Build(e.to_string()))
}

/// The filter as a BPF program.
pub fn program() -> Result<BpfProgram, SeccompError> {
    let build = |e: seccompiler::BackendError| SeccompError::Build(e.to_string());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        SYSCALLS.iter().map(|&s| (s, vec![])).collect();
    let ioctl_rules = IOCTLS
        .iter()
        .map(|&req| SeccompRule::new(vec![cond(1, req)?]).map_err(build))
        .collect::<Result<Vec<_>, SeccompError>>()?;
    rules.insert(libc::SYS_ioctl, ioctl_rules);
    let teardown_clone = (libc::CLONE_VM | libc::CLONE_FILES) as u64;
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![cond(0, teardown_clone)?]).map_err(build)?],
    );
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError::Build(e.to_string()))
}

/// Installs the filter on the calling thread (and so on the process: the
/// monitor has one thread).
pub fn install() -> Result<(), SeccompError> {
    let prog = program()?;
    seccompiler::apply_filter(&prog).map_err(|e| SeccompError::Install(e.to_string()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn filter_builds() {
        let p = super::program().expect("filter");
        assert!(p.len() > 40);
    }
}

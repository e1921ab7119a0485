//! The monitor's seccomp filters, one per kind of thread (Firecracker's
//! model: every vCPU runs hostile code from its first instruction).
//!
//! Each thread of a running guest installs its own filter on itself before
//! it does any work for the guest: the vCPU thread (run the guest, answer
//! hypercalls, serve the disk at its notification), the I/O thread (host
//! sockets, tap, the rings), and the thread that controls them (waits,
//! signals, exit). Anything outside a thread's list kills the process.
//! `ioctl` is limited per thread to the requests that thread makes.

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

/// Which thread a filter is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs `KVM_RUN` and answers hypercalls.
    Vcpu = 0,
    /// Owns the NICs' backends and polls the rings.
    Io = 1,
    /// Starts, waits for and controls the guest (`wisp run`'s main thread).
    Control = 2,
}

impl std::str::FromStr for ThreadKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vcpu" => Ok(ThreadKind::Vcpu),
            "io" => Ok(ThreadKind::Io),
            "control" => Ok(ThreadKind::Control),
            _ => Err(format!("'{s}' is not a thread (vcpu, io or control)")),
        }
    }
}

const KVM_RUN: u64 = 0xae80;
const KVM_GET_REGS: u64 = 0x8090_ae81;
const KVM_GET_SREGS: u64 = 0x8138_ae83;
// Read by the paused vCPU thread for a snapshot (`snapshot::save`).
const KVM_GET_MSRS: u64 = 0xc008_ae88;
const KVM_GET_VCPU_EVENTS: u64 = 0x8040_ae9f;
const KVM_GET_XSAVE: u64 = 0x9000_aea4;
const KVM_GET_XCRS: u64 = 0x8188_aea6;
const FIONBIO: u64 = 0x5421;
// A live migration, from the control thread: dirty logging switched on and
// off on the RAM slot, and the dirty log read each round.
const KVM_SET_USER_MEMORY_REGION: u64 = 0x4020_ae46;
const KVM_GET_DIRTY_LOG: u64 = 0x4010_ae42;

/// What every thread needs: memory, locks, time, signals, ending.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

fn syscalls(kind: ThreadKind) -> Vec<i64> {
    let mut v = COMMON.to_vec();
    v.extend_from_slice(match kind {
        // Console, the disk (read/write/flush at its notification), a tap
        // frame written if a NIC's queues are served at a register access.
        ThreadKind::Vcpu => &[
            libc::SYS_writev,
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_fdatasync,
            libc::SYS_fsync,
            libc::SYS_timer_delete,
            // Its own id, when the thread was started (and filtered) ahead
            // of its guest (`worker`).
            libc::SYS_gettid,
        ],
        // Host sockets (accept, read, write, shutdown, no-delay), the
        // user network's epoll, the tap.
        ThreadKind::Io => &[
            libc::SYS_accept4,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_shutdown,
            libc::SYS_setsockopt,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_ctl,
            libc::SYS_timer_delete,
        ],
        // Kicks (tgkill), the teardown child (clone, checked below), and
        // the connections of the toolstack's control socket (accept4; the
        // listener was bound and handed over before the filter).
        ThreadKind::Control => &[
            libc::SYS_tgkill,
            libc::SYS_getpid,
            libc::SYS_writev,
            libc::SYS_accept4,
            // A save: the request's file arrives with it (recvmsg); the
            // snapshot is written into it (lseek over the memory's holes,
            // ftruncate, pwrite, pread of the pagemap opened at start).
            libc::SYS_recvmsg,
            libc::SYS_lseek,
            libc::SYS_ftruncate,
            libc::SYS_pwrite64,
            libc::SYS_pread64,
            // (shutdown and listen, for a live migration: with their
            // arguments checked, see `allow_list`)
        ],
    });
    v
}

fn ioctls(kind: ThreadKind) -> &'static [u64] {
    match kind {
        ThreadKind::Vcpu => &[
            KVM_RUN,
            KVM_GET_REGS,
            KVM_GET_SREGS,
            KVM_GET_MSRS,
            KVM_GET_VCPU_EVENTS,
            KVM_GET_XSAVE,
            KVM_GET_XCRS,
            FIONBIO,
        ],
        ThreadKind::Io => &[FIONBIO],
        ThreadKind::Control => &[KVM_SET_USER_MEMORY_REGION, KVM_GET_DIRTY_LOG],
    }
}

fn cond(arg: u8, value: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, value)
        .map_err(|e| SeccompError::Build(e.to_string()))
}

/// An `int` argument equal to `value` (its low 32 bits: the upper half
/// of the register is not defined for an `int`).
fn cond32(arg: u8, value: u32) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        u64::from(value),
    )
    .map_err(|e| SeccompError::Build(e.to_string()))
}

/// A thread's filter: one BPF program, so one install per thread (each
/// `seccomp(2)` install costs ~30 µs here plus the program's length, on
/// the cold start's path). Its prefix turns `openat`/`open` into `EACCES`,
/// then the thread's allow-list decides everything else. glibc's malloc
/// reads `/proc/sys/vm/overcommit_memory` the first time a thread arena
/// shrinks; with `EACCES` it falls back to `madvise` instead of the process
/// being killed, and no thread can open a file either way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    program: BpfProgram,
}

/// The filter for `kind`, compiled once per process: a pooled shell calls
/// [`precompile`] while it waits, so that starting a guest does not pay for
/// it.
pub fn program(kind: ThreadKind) -> Result<Filter, SeccompError> {
    type Cached = std::sync::OnceLock<Result<Filter, String>>;
    static CACHE: [Cached; 3] = [Cached::new(), Cached::new(), Cached::new()];
    CACHE[kind as usize]
        .get_or_init(|| compile(kind).map_err(|e| e.to_string()))
        .clone()
        .map_err(SeccompError::Build)
}

/// Compiles every thread's filter now (see [`program`]).
pub fn precompile() -> Result<(), SeccompError> {
    for kind in [ThreadKind::Vcpu, ThreadKind::Io, ThreadKind::Control] {
        program(kind)?;
    }
    Ok(())
}

fn compile(kind: ThreadKind) -> Result<Filter, SeccompError> {
    let allow = allow_list(kind)?;
    let mut program = no_open_prefix();
    program.extend(allow);
    if program.len() > BPF_MAXINSNS {
        return Err(SeccompError::Build(format!(
            "{} BPF instructions (the kernel takes {BPF_MAXINSNS})",
            program.len()
        )));
    }
    Ok(Filter { program })
}

/// Most instructions one BPF program may have (`linux/bpf_common.h`).
const BPF_MAXINSNS: usize = 4096;

/// The program's first instructions: on x86-64, `openat` and `open` return
/// `EACCES`; every other call (and any other architecture, which the
/// allow-list then kills) falls through to the allow-list that follows.
/// Jumps are relative and forward only, so the prefix does not depend on
/// what follows it.
fn no_open_prefix() -> BpfProgram {
    const ARCH_OFFSET: u32 = 4; // seccomp_data.arch
    const NR_OFFSET: u32 = 0; // seccomp_data.nr
    let ld = |k| stmt(BPF_LD | BPF_W | BPF_ABS, k);
    vec![
        ld(ARCH_OFFSET),
        // Not x86-64: on to the allow-list (4 ahead), which kills.
        jump(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 0, 4),
        ld(NR_OFFSET),
        jump(BPF_JMP | BPF_JEQ | BPF_K, libc::SYS_openat as u32, 1, 0),
        jump(BPF_JMP | BPF_JEQ | BPF_K, libc::SYS_open as u32, 0, 1),
        stmt(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | libc::EACCES as u32),
    ]
}

const BPF_LD: u16 = 0x00;
const BPF_W: u16 = 0x00;
const BPF_ABS: u16 = 0x20;
const BPF_JMP: u16 = 0x05;
const BPF_JEQ: u16 = 0x10;
const BPF_K: u16 = 0x00;
const BPF_RET: u16 = 0x06;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

fn stmt(code: u16, k: u32) -> seccompiler::sock_filter {
    seccompiler::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> seccompiler::sock_filter {
    seccompiler::sock_filter { code, jt, jf, k }
}

/// The allow-list of `kind` as a BPF program.
fn allow_list(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let build = |e: seccompiler::BackendError| SeccompError::Build(e.to_string());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        syscalls(kind).into_iter().map(|s| (s, vec![])).collect();
    let ioctl_rules = ioctls(kind)
        .iter()
        .map(|&req| SeccompRule::new(vec![cond(1, req)?]).map_err(build))
        .collect::<Result<Vec<_>, SeccompError>>()?;
    if !ioctl_rules.is_empty() {
        rules.insert(libc::SYS_ioctl, ioctl_rules);
    }
    if kind == ThreadKind::Control {
        // A live migration on one host: the published listeners stop
        // listening at its pause (`shutdown(fd, SHUT_RD)`) and listen
        // again if it fails (`listen(fd, HOST_BACKLOG)`); nothing else.
        rules.insert(
            libc::SYS_shutdown,
            vec![SeccompRule::new(vec![cond32(1, libc::SHUT_RD as u32)?]).map_err(build)?],
        );
        let backlog = crate::net::user::HOST_BACKLOG as u32;
        rules.insert(
            libc::SYS_listen,
            vec![SeccompRule::new(vec![cond32(1, backlog)?]).map_err(build)?],
        );
        // Only the teardown child's shape (see the CLI's `teardown`).
        let teardown_clone = (libc::CLONE_VM | libc::CLONE_FILES) as u64;
        rules.insert(
            libc::SYS_clone,
            vec![SeccompRule::new(vec![cond(0, teardown_clone)?]).map_err(build)?],
        );
    }
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

/// Installs `filter` on the calling thread only.
pub fn apply(filter: &Filter) -> Result<(), SeccompError> {
    seccompiler::apply_filter(&filter.program).map_err(|e| SeccompError::Install(e.to_string()))
}

/// Installs the filter for `kind` on the calling thread.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    apply(&program(kind)?)
}

/// Test hook: a system call no monitor thread may make. Under a filter the
/// process is killed here (SIGSYS); without one it reports and exits 125.
pub fn forbidden_call() -> ! {
    // SAFETY: a plain syscall with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    crate::report(format_args!(
        "wisp: seccomp self-test: socket() was allowed (fd {fd})"
    ));
    // SAFETY: ends the process at once; this is a test hook.
    unsafe { libc::_exit(wisp_abi::exit::MONITOR_ERROR as i32) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_build_and_differ() {
        let v = program(ThreadKind::Vcpu).expect("vcpu filter");
        let i = program(ThreadKind::Io).expect("io filter");
        let c = program(ThreadKind::Control).expect("control filter");
        let prefix = no_open_prefix();
        assert!(v.program.len() > 40 && i.program.len() > 40 && c.program.len() > 20);
        assert_ne!(v.program, i.program);
        for f in [&v, &i, &c] {
            assert_eq!(f.program[..prefix.len()], prefix[..]);
        }
    }

    /// The control thread may stop a listener listening and make it
    /// listen again, as a migration does, and no other shutdown or listen
    /// (in a forked child: a refused call kills the process).
    #[test]
    fn control_thread_shutdown_and_listen_are_narrowed() {
        let filter = program(ThreadKind::Control).expect("control filter");
        let backlog = crate::net::user::HOST_BACKLOG;
        for (how, listen_backlog, allowed) in [
            (libc::SHUT_RD, backlog, true),
            (libc::SHUT_WR, backlog, false),
            (libc::SHUT_RD, 1, false),
        ] {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let fd = std::os::fd::AsRawFd::as_raw_fd(&l);
            // SAFETY: the child only installs the prepared filter, makes
            // two syscalls and leaves with _exit.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0);
            if pid == 0 {
                // SAFETY: as above, in the child.
                unsafe {
                    if apply(&filter).is_err() {
                        libc::_exit(2);
                    }
                    libc::shutdown(fd, how);
                    libc::listen(fd, listen_backlog);
                    libc::_exit(0);
                }
            }
            let mut status = 0;
            // SAFETY: waits for the child forked above.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            let killed = libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS;
            let clean = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
            assert_eq!(
                (clean, killed),
                (allowed, !allowed),
                "shutdown how {how}, listen backlog {listen_backlog}: status {status:#x}"
            );
        }
    }

    /// A filtered thread that opens a file (glibc does, the first time a
    /// thread arena shrinks) gets EACCES instead of killing the process.
    #[test]
    fn opening_a_file_is_refused_not_fatal() {
        let filter = program(ThreadKind::Io).expect("io filter");
        let r = std::thread::spawn(move || {
            apply(&filter).expect("install");
            std::fs::File::open("/proc/sys/vm/overcommit_memory").map(|_| ())
        })
        .join()
        .expect("the filtered thread ran to its end");
        let e = r.expect_err("a filtered thread opened a file");
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    }
}

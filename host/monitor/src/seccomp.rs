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

use seccompiler::BpfProgram;

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

/// A thread's filter: one BPF program, so one install per thread.
///
/// The program is a binary search on the system call number, not the
/// linear chain of comparisons `seccompiler` emits: when a filter is
/// installed the kernel runs it once for every system call number of
/// every architecture to fill its per-filter cache of always-allowed
/// calls (`seccomp_cache_prepare`), so the install costs the number of
/// calls times the length of the path through the program. Measured here:
/// the vCPU thread's filter as `seccompiler`'s chain (209 instructions)
/// took 125-180 µs to install, as this search (135) 50-90 µs, of which
/// ~45 µs is the cost of any install; each thread of a cold start pays it.
///
/// `openat` and `open` return `EACCES`: glibc's malloc reads
/// `/proc/sys/vm/overcommit_memory` the first time a thread arena shrinks;
/// with `EACCES` it falls back to `madvise` instead of the process being
/// killed, and no thread can open a file either way. Any other call the
/// thread's allow-list does not name, or a call from another architecture
/// (including x32's numbers), kills the process.
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

/// What a filter does with one system call.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    Allow,
    /// Fails with `EACCES`.
    Refuse,
    /// Allowed if one of these arguments has its value, else kills.
    AllowIf(Vec<ArgEq>),
}

/// Argument `arg` equals `value`: all 64 bits, or for an `int` argument
/// only the low 32 (the upper half of the register is not defined).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ArgEq {
    arg: u8,
    value: u64,
    qword: bool,
}

/// Every call `kind`'s thread may make, by number, with its verdict.
fn rules(kind: ThreadKind) -> BTreeMap<i64, Verdict> {
    let mut rules: BTreeMap<i64, Verdict> = syscalls(kind)
        .into_iter()
        .map(|s| (s, Verdict::Allow))
        .collect();
    let qword = |arg, value| ArgEq {
        arg,
        value,
        qword: true,
    };
    let dword = |arg, value: u32| ArgEq {
        arg,
        value: u64::from(value),
        qword: false,
    };
    let ioctl: Vec<ArgEq> = ioctls(kind).iter().map(|&req| qword(1, req)).collect();
    if !ioctl.is_empty() {
        rules.insert(libc::SYS_ioctl, Verdict::AllowIf(ioctl));
    }
    if kind == ThreadKind::Control {
        // A live migration on one host: the published listeners stop
        // listening at its pause (`shutdown(fd, SHUT_RD)`) and listen
        // again if it fails (`listen(fd, HOST_BACKLOG)`); nothing else.
        rules.insert(
            libc::SYS_shutdown,
            Verdict::AllowIf(vec![dword(1, libc::SHUT_RD as u32)]),
        );
        let backlog = crate::net::user::HOST_BACKLOG as u32;
        rules.insert(libc::SYS_listen, Verdict::AllowIf(vec![dword(1, backlog)]));
        // Only the teardown child's shape (see the CLI's `teardown`).
        let teardown_clone = (libc::CLONE_VM | libc::CLONE_FILES) as u64;
        rules.insert(
            libc::SYS_clone,
            Verdict::AllowIf(vec![qword(0, teardown_clone)]),
        );
    }
    rules.insert(libc::SYS_openat, Verdict::Refuse);
    rules.insert(libc::SYS_open, Verdict::Refuse);
    rules
}

fn compile(kind: ThreadKind) -> Result<Filter, SeccompError> {
    let rules: Vec<(u32, Verdict)> = rules(kind)
        .into_iter()
        .map(|(nr, v)| Ok((u32::try_from(nr).map_err(|e| build_err(&e))?, v)))
        .collect::<Result<_, SeccompError>>()?;
    let mut program = vec![
        stmt(BPF_LD | BPF_W | BPF_ABS, ARCH_OFFSET),
        jump(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        stmt(BPF_LD | BPF_W | BPF_ABS, NR_OFFSET),
    ];
    program.extend(search(&rules)?);
    if program.len() > BPF_MAXINSNS {
        return Err(SeccompError::Build(format!(
            "{} BPF instructions (the kernel takes {BPF_MAXINSNS})",
            program.len()
        )));
    }
    Ok(Filter { program })
}

fn build_err(e: &dyn std::fmt::Display) -> SeccompError {
    SeccompError::Build(e.to_string())
}

/// Up to this many calls are compared one after the other rather than
/// split further.
const LEAF: usize = 3;

/// The binary search over `rules` (sorted by number), with the call number
/// in the accumulator. Every path ends in a return, so the pieces can be
/// laid out one after the other with forward jumps only.
fn search(rules: &[(u32, Verdict)]) -> Result<BpfProgram, SeccompError> {
    let mut out = Vec::new();
    if rules.len() <= LEAF {
        for (nr, verdict) in rules {
            let action = verdict_code(verdict)?;
            out.push(jump(
                BPF_JMP | BPF_JEQ | BPF_K,
                *nr,
                0,
                offset(action.len())?,
            ));
            out.extend(action);
        }
        out.push(stmt(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS));
        return Ok(out);
    }
    let (low, high) = rules.split_at(rules.len() / 2);
    let below = search(low)?;
    // nr >= the first of the upper half: skip the lower half's code.
    out.push(jump(
        BPF_JMP | BPF_JGE | BPF_K,
        high[0].0,
        offset(below.len())?,
        0,
    ));
    out.extend(below);
    out.extend(search(high)?);
    Ok(out)
}

/// A jump over `n` instructions (BPF jumps reach 255 ahead).
fn offset(n: usize) -> Result<u8, SeccompError> {
    u8::try_from(n).map_err(|_| SeccompError::Build(format!("a BPF jump over {n} instructions")))
}

/// The instructions that decide one call, ending in a return on every
/// path. They may load an argument: the call number is not needed again.
fn verdict_code(verdict: &Verdict) -> Result<BpfProgram, SeccompError> {
    let ret = |k| stmt(BPF_RET | BPF_K, k);
    let ld = |k| stmt(BPF_LD | BPF_W | BPF_ABS, k);
    let eq = |k, jt, jf| jump(BPF_JMP | BPF_JEQ | BPF_K, k, jt, jf);
    Ok(match verdict {
        Verdict::Allow => vec![ret(SECCOMP_RET_ALLOW)],
        Verdict::Refuse => vec![ret(SECCOMP_RET_ERRNO | libc::EACCES as u32)],
        Verdict::AllowIf(alternatives) => {
            let mut out = Vec::new();
            for a in alternatives {
                if a.arg > 5 {
                    return Err(SeccompError::Build(format!("no argument {}", a.arg)));
                }
                // seccomp_data.args[arg], little-endian: low half first.
                let low = ARGS_OFFSET + 8 * u32::from(a.arg);
                if a.qword {
                    // High half wrong: on to the next alternative (3 ahead).
                    out.push(ld(low + 4));
                    out.push(eq((a.value >> 32) as u32, 0, 3));
                }
                out.push(ld(low));
                out.push(eq(a.value as u32, 0, 1));
                out.push(ret(SECCOMP_RET_ALLOW));
            }
            out.push(ret(SECCOMP_RET_KILL_PROCESS));
            out
        }
    })
}

/// Most instructions one BPF program may have (`linux/bpf_common.h`).
const BPF_MAXINSNS: usize = 4096;

/// Offsets in `struct seccomp_data`.
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;
const ARGS_OFFSET: u32 = 16;

const BPF_LD: u16 = 0x00;
const BPF_W: u16 = 0x00;
const BPF_ABS: u16 = 0x20;
const BPF_JMP: u16 = 0x05;
const BPF_JEQ: u16 = 0x10;
const BPF_JGE: u16 = 0x30;
const BPF_K: u16 = 0x00;
const BPF_RET: u16 = 0x06;
const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
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
        assert!(v.program.len() > 40 && i.program.len() > 40 && c.program.len() > 20);
        assert_ne!(v.program, i.program);
        assert_ne!(v.program, c.program);
    }

    /// `struct seccomp_data` as the filter sees it.
    #[derive(Clone, Copy)]
    struct Data {
        nr: u32,
        arch: u32,
        args: [u64; 6],
    }

    impl Data {
        fn word(&self, offset: u32) -> u32 {
            match offset {
                0 => self.nr,
                4 => self.arch,
                o if (16..64).contains(&o) && o % 4 == 0 => {
                    let a = self.args[(o as usize - 16) / 8];
                    if o % 8 == 0 {
                        a as u32
                    } else {
                        (a >> 32) as u32
                    }
                }
                o => panic!("load at offset {o}"),
            }
        }
    }

    /// Runs a classic BPF seccomp program (the instructions either
    /// compiler emits) on `d`: the returned action and how many
    /// instructions ran before the first argument load or the return (what
    /// the kernel's cache pass emulates per call number).
    fn run(program: &[seccompiler::sock_filter], d: &Data) -> (u32, usize) {
        let (mut pc, mut acc, mut steps, mut nr_only) = (0usize, 0u32, 0usize, true);
        loop {
            let i = &program[pc];
            if nr_only {
                steps += 1;
            }
            pc += 1;
            match i.code {
                0x20 => {
                    if i.k >= ARGS_OFFSET {
                        nr_only = false;
                    }
                    acc = d.word(i.k)
                }
                0x05 => pc += i.k as usize,
                0x15 | 0x25 | 0x35 | 0x45 => {
                    let taken = match i.code {
                        0x15 => acc == i.k,
                        0x25 => acc > i.k,
                        0x35 => acc >= i.k,
                        _ => acc & i.k != 0,
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                0x06 => return (i.k, steps),
                c => panic!("unexpected BPF opcode {c:#x}"),
            }
        }
    }

    /// The filters as they were built with `seccompiler` (a linear chain):
    /// the reference the binary search must agree with.
    fn reference(kind: ThreadKind) -> BpfProgram {
        use seccompiler::{
            SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
            SeccompRule, TargetArch,
        };
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        for (nr, v) in super::rules(kind) {
            let conds = match v {
                Verdict::Allow => vec![],
                Verdict::Refuse => continue,
                Verdict::AllowIf(alts) => alts
                    .iter()
                    .map(|a| {
                        let len = if a.qword {
                            SeccompCmpArgLen::Qword
                        } else {
                            SeccompCmpArgLen::Dword
                        };
                        let c = SeccompCondition::new(a.arg, len, SeccompCmpOp::Eq, a.value);
                        SeccompRule::new(vec![c.unwrap()]).unwrap()
                    })
                    .collect(),
            };
            rules.insert(nr, conds);
        }
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::KillProcess,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .unwrap();
        let allow: BpfProgram = filter.try_into().unwrap();
        // The EACCES prefix for openat/open, then the allow-list.
        let mut p = vec![
            stmt(BPF_LD | BPF_W | BPF_ABS, ARCH_OFFSET),
            jump(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 0, 4),
            stmt(BPF_LD | BPF_W | BPF_ABS, NR_OFFSET),
            jump(BPF_JMP | BPF_JEQ | BPF_K, libc::SYS_openat as u32, 1, 0),
            jump(BPF_JMP | BPF_JEQ | BPF_K, libc::SYS_open as u32, 0, 1),
            stmt(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | libc::EACCES as u32),
        ];
        p.extend(allow);
        p
    }

    /// Every call number (and some of another ABI), with every argument
    /// value any filter tests and near misses of each in each argument:
    /// the binary search decides as the linear chain does.
    #[test]
    fn binary_search_decides_as_the_linear_chain() {
        let kinds = [ThreadKind::Vcpu, ThreadKind::Io, ThreadKind::Control];
        let mut values = vec![0u64, 1, u64::MAX];
        for k in kinds {
            for v in super::rules(k).into_values() {
                if let Verdict::AllowIf(alts) = v {
                    for a in alts {
                        let v = a.value;
                        values.extend([v, v ^ 1, v | 1 << 32, v | 0xffff_ffff << 32, v + 1]);
                    }
                }
            }
        }
        let mut numbers: Vec<u32> = (0..600).collect();
        numbers.extend([0x4000_0000, 0x4000_0010, 0x4000_0101, u32::MAX]);
        for kind in kinds {
            let (ours, theirs) = (program(kind).unwrap().program, reference(kind));
            let mut decided = 0;
            for arch in [AUDIT_ARCH_X86_64, 0x4000_0003] {
                for &nr in &numbers {
                    for arg in 0..2 {
                        for &value in &values {
                            let mut args = [0u64; 6];
                            args[arg] = value;
                            let d = Data { nr, arch, args };
                            let (a, b) = (run(&ours, &d).0, run(&theirs, &d).0);
                            assert_eq!(a, b, "{kind:?} nr {nr} arch {arch:#x} args {args:x?}");
                            decided += usize::from(a == SECCOMP_RET_ALLOW);
                        }
                    }
                }
            }
            assert!(decided > 0, "{kind:?} allowed nothing");
        }
    }

    /// The point of the binary search: every call number is decided (or
    /// reaches its argument check) in a few instructions, where the chain
    /// needs up to its whole length. The kernel runs this path for each
    /// call number when the filter is installed.
    #[test]
    fn every_call_number_is_decided_in_a_few_instructions() {
        for kind in [ThreadKind::Vcpu, ThreadKind::Io, ThreadKind::Control] {
            let (ours, theirs) = (program(kind).unwrap().program, reference(kind));
            let longest = |p: &[seccompiler::sock_filter]| {
                (0..600)
                    .map(|nr| {
                        let d = Data {
                            nr,
                            arch: AUDIT_ARCH_X86_64,
                            args: [0; 6],
                        };
                        run(p, &d).1
                    })
                    .max()
                    .unwrap()
            };
            let (a, b) = (longest(&ours), longest(&theirs));
            assert!(a <= 16, "{kind:?}: {a} instructions on the longest path");
            assert!(b > 3 * a, "{kind:?}: the chain's longest path is {b}");
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

//! Entering an image through its PVH entry, as QEMU and Firecracker do, but
//! with everything the PVH boot ABI leaves undefined set to hostile values.
//!
//! Not wired into the run path yet. Its purpose is a test of the guest's
//! PVH entry on the Wisp monitor, without Firecracker: a loader that keeps
//! only the ABI's promises, and no more, must still boot the image. The PVH
//! ABI (Xen's `docs/misc/pvh.pandoc`, which Firecracker and QEMU follow)
//! promises, at the 32-bit entry:
//! * `ebx` = guest-physical address of the `hvm_start_info`;
//! * CS a flat 32-bit code segment, DS/ES/SS flat 32-bit data segments
//!   (selectors unspecified), TR a 32-bit TSS;
//! * CR0 with PE set and PG clear, CR4 clear;
//! * EFLAGS with IF and VM clear.
//!
//! Everything else is undefined, so here it is garbage: `rsp` is 0 (what
//! Firecracker gives; a push then faults), the other general registers are
//! pseudo-random, the GDT and IDT registers point at garbage, FS and GS
//! are unusable garbage, EFER has SCE and NXE set, and EFLAGS has every
//! undefined bit set (DF, AC, NT, IOPL 3, the arithmetic flags) except TF,
//! which would trap before the entry's first instruction could clear it.
//!
//! To wire it: load the image's segments, write a start info with
//! [`write_start_info`], call [`enter`] with the PVH entry address from the
//! image's Xen note (type 18), and serve COM1 (0x3f8) and isa-debug-exit
//! (0xf4) port writes; the guest builds its own tables and drops to CPL3.
//! [`boot`] does exactly that in a minimal loop of its own, for tests: it
//! is not the monitor's run path (no devices, no seccomp, no limits).

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// `hvm_start_info.magic`.
pub const START_INFO_MAGIC: u32 = 0x336e_c578;
/// Where [`write_start_info`] puts the start info (Firecracker's address).
pub const START_INFO_ADDR: u64 = 0x6000;
/// Where it puts the one-entry memory map, right after the start info.
pub const MEMMAP_ADDR: u64 = START_INFO_ADDR + 0x40;
/// Where it puts the command line.
pub const CMDLINE_ADDR: u64 = 0x7000;
/// Longest command line accepted (NUL included).
pub const CMDLINE_MAX: usize = 4096;

/// A step of a xorshift generator: garbage, but reproducible from `seed`.
fn garbage(state: &mut u64) -> u64 {
    let mut x = (*state).max(1);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

/// EFLAGS at entry: bit 1 (always 1) and every bit the ABI leaves
/// undefined except TF: CF, PF, AF, ZF, SF, DF, OF, IOPL 3, NT, AC.
pub const HOSTILE_RFLAGS: u64 =
    0x2 | 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x400 | 0x800 | 0x3000 | 0x4000 | 0x4_0000;

/// The general registers at the PVH entry: `rip` = `entry`, `rbx` =
/// `start_info`, `rsp` = 0, the rest garbage from `seed`.
pub fn hostile_regs(entry: u32, start_info: u32, seed: u64) -> kvm_regs {
    let mut s = seed;
    let mut g = || garbage(&mut s);
    kvm_regs {
        rax: g(),
        rbx: start_info as u64,
        rcx: g(),
        rdx: g(),
        rsi: g(),
        rdi: g(),
        rsp: 0,
        rbp: g(),
        r8: g(),
        r9: g(),
        r10: g(),
        r11: g(),
        r12: g(),
        r13: g(),
        r14: g(),
        r15: g(),
        rip: entry as u64,
        rflags: HOSTILE_RFLAGS,
    }
}

fn flat(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Sets the special registers of `sregs` (as read from the vCPU) to the
/// PVH entry state: the promised flat segments with arbitrary selectors,
/// a 32-bit TSS, PE only, CR4 clear, and garbage in the rest.
pub fn apply_hostile_sregs(sregs: &mut kvm_sregs, seed: u64) {
    let mut s = seed ^ 0x5eed;
    let mut g = || garbage(&mut s);
    // Selectors the ABI leaves unspecified: odd ones, not the guest's.
    sregs.cs = flat(0x08 * 7, 0xb);
    let data = flat(0x08 * 9, 0x3);
    sregs.ds = data;
    sregs.es = data;
    sregs.ss = data;
    let junk = kvm_segment {
        base: g() & 0xffff_ffff,
        limit: g() as u32,
        selector: g() as u16,
        unusable: 1,
        ..Default::default()
    };
    sregs.fs = junk;
    sregs.gs = junk;
    sregs.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: 0,
        type_: 0xb, // busy 32-bit TSS
        present: 1,
        ..Default::default()
    };
    sregs.ldt = kvm_segment {
        type_: 0x2,
        present: 1,
        unusable: 1,
        ..Default::default()
    };
    sregs.gdt.base = g() & 0xffff_ffff;
    sregs.gdt.limit = g() as u16;
    sregs.idt.base = g() & 0xffff_ffff;
    sregs.idt.limit = g() as u16;
    sregs.cr0 = 1; // PE
    sregs.cr2 = g();
    sregs.cr3 = g() & 0xffff_f000;
    sregs.cr4 = 0;
    sregs.efer = 1 | (1 << 11); // SCE, NXE: set, though LME is not
}

/// Puts the vCPU at the PVH entry `entry` with `start_info` in `ebx`, in
/// the hostile state above (reproducible from `seed`).
pub fn enter(
    vcpu: &VcpuFd,
    entry: u32,
    start_info: u32,
    seed: u64,
) -> Result<(), kvm_ioctls::Error> {
    let mut sregs = vcpu.get_sregs()?;
    apply_hostile_sregs(&mut sregs, seed);
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&hostile_regs(entry, start_info, seed))
}

/// Why a start info could not be written.
#[derive(Debug, thiserror::Error)]
pub enum StartInfoError {
    #[error("command line of {0} bytes is longer than {CMDLINE_MAX}")]
    CmdlineTooLong(usize),
    #[error("writing the start info: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Writes an `hvm_start_info` (version 1) at [`START_INFO_ADDR`] with
/// `cmdline` and a memory map of one RAM entry, `[0, mem_size)`, as
/// Firecracker does; returns the start info's address for `ebx`.
pub fn write_start_info(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    cmdline: &[u8],
) -> Result<u32, StartInfoError> {
    if cmdline.len() >= CMDLINE_MAX {
        return Err(StartInfoError::CmdlineTooLong(cmdline.len()));
    }
    let mut line = cmdline.to_vec();
    line.push(0);
    mem.write_slice(&line, GuestAddress(CMDLINE_ADDR))?;
    // hvm_memmap_table_entry: addr, size, type (1 = RAM), reserved.
    let mut entry = Vec::with_capacity(24);
    entry.extend_from_slice(&0u64.to_le_bytes());
    entry.extend_from_slice(&mem_size.to_le_bytes());
    entry.extend_from_slice(&1u32.to_le_bytes());
    entry.extend_from_slice(&0u32.to_le_bytes());
    mem.write_slice(&entry, GuestAddress(MEMMAP_ADDR))?;
    // hvm_start_info: magic, version, flags, nr_modules, modlist_paddr,
    // cmdline_paddr, rsdp_paddr, memmap_paddr, memmap_entries, reserved.
    let mut info = Vec::with_capacity(56);
    info.extend_from_slice(&START_INFO_MAGIC.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    info.extend_from_slice(&0u64.to_le_bytes());
    info.extend_from_slice(&CMDLINE_ADDR.to_le_bytes());
    info.extend_from_slice(&0u64.to_le_bytes());
    info.extend_from_slice(&MEMMAP_ADDR.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    mem.write_slice(&info, GuestAddress(START_INFO_ADDR))?;
    Ok(START_INFO_ADDR as u32)
}

/// What a [`boot`] ended with.
#[derive(Debug)]
pub struct PvhRun {
    /// Everything the guest wrote to COM1.
    pub console: Vec<u8>,
    /// The status written to isa-debug-exit, if the guest ended that way.
    pub status: Option<u8>,
}

/// Why a [`boot`] failed.
#[derive(Debug, thiserror::Error)]
pub enum PvhBootError {
    #[error("the image has no PVH entry note")]
    NoEntry,
    #[error(transparent)]
    Kvm(#[from] crate::kvm::KvmError),
    #[error("{0}: {1}")]
    Call(&'static str, kvm_ioctls::Error),
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error(transparent)]
    Load(#[from] crate::boot::BootError),
    #[error(transparent)]
    StartInfo(#[from] StartInfoError),
    #[error("the guest triple-faulted at rip {rip:#x} after writing {console:?}")]
    TripleFault { rip: u64, console: String },
    #[error("KVM stopped the guest ({0}) after it wrote {1:?}")]
    Stopped(String, String),
    #[error("the guest did not finish in time")]
    Timeout,
}

/// Boots `image` through its PVH entry from the hostile state of `seed`,
/// with `mem_size` bytes of RAM, an in-kernel LAPIC and IOAPIC and KVM's
/// supported CPUID, and no device but COM1 and isa-debug-exit; runs until
/// the guest writes isa-debug-exit, resets through the i8042, or `limit`
/// passes.
pub fn boot(
    image: &crate::Image,
    mem_size: u64,
    cmdline: &[u8],
    seed: u64,
    limit: std::time::Duration,
) -> Result<PvhRun, PvhBootError> {
    let entry = image.pvh_entry.ok_or(PvhBootError::NoEntry)? as u32;
    let kvm = crate::kvm::open()?;
    let call = |what| move |e| PvhBootError::Call(what, e);
    let vm = kvm.create_vm().map_err(call("create VM"))?;
    vm.create_irq_chip().map_err(call("create irqchip"))?;
    let ram = crate::memory::GuestRam::new(mem_size)?;
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: mem_size,
        userspace_addr: ram.host_addr,
    };
    // SAFETY: the region is `ram`'s mapping, which outlives the VM (both
    // are dropped when this function returns, the VM first).
    unsafe { vm.set_user_memory_region(region) }.map_err(call("set memory region"))?;
    crate::boot::load_image(&ram.mem, image)?;
    let start_info = write_start_info(&ram.mem, mem_size, cmdline)?;
    let mut vcpu = vm.create_vcpu(0).map_err(call("create vCPU"))?;
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(call("get CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(call("set CPUID"))?;
    enter(&vcpu, entry, start_info, seed).map_err(call("enter"))?;

    // KVM_RUN blocks while the guest halts: a thread that kicks the vCPU
    // out (a signal with an empty handler) once `limit` has passed.
    let deadline = std::time::Instant::now() + limit;
    let mut run = PvhRun {
        console: Vec::new(),
        status: None,
    };
    let text = |c: &[u8]| String::from_utf8_lossy(c).into_owned();
    let kicker = Kicker::start(limit);
    loop {
        if std::time::Instant::now() > deadline {
            return Err(PvhBootError::Timeout);
        }
        match vcpu.run() {
            Ok(kvm_ioctls::VcpuExit::IoOut(port, data)) => match (port, data.first()) {
                (0x3f8, Some(&b)) => run.console.push(b),
                (0xf4..=0xf7, Some(&b)) => {
                    run.status = Some(b);
                    break;
                }
                (0x64, Some(&0xfe)) => break,
                _ => {}
            },
            Ok(kvm_ioctls::VcpuExit::IoIn(port, data)) => {
                // isa-debug-exit reads as 0, missing ports as all ones.
                let v = if (0xf4..=0xf7).contains(&port) {
                    0
                } else {
                    0xff
                };
                data.fill(v);
            }
            Ok(kvm_ioctls::VcpuExit::MmioRead(_, data)) => data.fill(0xff),
            Ok(kvm_ioctls::VcpuExit::MmioWrite(..)) => {}
            Ok(kvm_ioctls::VcpuExit::Shutdown) => {
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                return Err(PvhBootError::TripleFault {
                    rip,
                    console: text(&run.console),
                });
            }
            Ok(other) => {
                return Err(PvhBootError::Stopped(
                    format!("{other:?}"),
                    text(&run.console),
                ))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(PvhBootError::Call("run", e)),
        }
    }
    drop(kicker);
    Ok(run)
}

/// Sends SIGUSR2 (with an empty handler, so `KVM_RUN` returns EINTR) to
/// the thread that created it once a time limit passes.
struct Kicker {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

extern "C" fn ignore_signal(_: libc::c_int) {}

impl Kicker {
    fn start(limit: std::time::Duration) -> Kicker {
        // SAFETY: installs a handler that does nothing (async-signal-safe)
        // for a signal the monitor uses for nothing else.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = ignore_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigaction(libc::SIGUSR2, &act, std::ptr::null_mut());
        }
        // SAFETY: pthread_self has no preconditions.
        let target = unsafe { libc::pthread_self() };
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = done.clone();
        std::thread::spawn(move || {
            let end = std::time::Instant::now() + limit;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if std::time::Instant::now() > end {
                    // SAFETY: `target` is alive: it owns `done` and sets it
                    // before it ends; at worst the signal hits a thread
                    // that ignores it.
                    unsafe { libc::pthread_kill(target, libc::SIGUSR2) };
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        });
        Kicker { done }
    }
}

impl Drop for Kicker {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_promises_are_kept() {
        let r = hostile_regs(0x10_0009, 0x6000, 42);
        assert_eq!((r.rip, r.rbx, r.rsp), (0x10_0009, 0x6000, 0));
        assert_eq!(r.rflags & (1 << 9), 0, "IF clear");
        assert_eq!(r.rflags & (1 << 17), 0, "VM clear");
        assert_eq!(r.rflags & (1 << 8), 0, "no TF");
        assert_ne!(r.rflags & (1 << 10), 0, "DF set");
        assert_ne!(r.rax, r.rcx, "garbage differs per register");
        assert_eq!(hostile_regs(1, 2, 42).r15, r.r15, "reproducible");
        let mut s = kvm_sregs::default();
        apply_hostile_sregs(&mut s, 42);
        assert_eq!((s.cr0, s.cr4), (1, 0));
        assert_eq!(
            (s.cs.db, s.cs.l, s.cs.base, s.cs.limit),
            (1, 0, 0, 0xffff_ffff)
        );
        assert_eq!(s.ss.type_, 0x3);
        assert_ne!(s.gdt.base, 0);
    }

    #[test]
    fn start_info_describes_memory_and_command_line() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let at = write_start_info(&mem, 64 << 20, b"exit 7").expect("fits");
        let u32_at = |a: u64| mem.read_obj::<u32>(GuestAddress(a)).unwrap();
        let u64_at = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        let si = at as u64;
        assert_eq!(u32_at(si), START_INFO_MAGIC);
        assert_eq!(u32_at(si + 4), 1);
        assert_eq!(u64_at(si + 24), CMDLINE_ADDR);
        assert_eq!(u64_at(si + 40), MEMMAP_ADDR);
        assert_eq!(u32_at(si + 48), 1);
        assert_eq!(u64_at(MEMMAP_ADDR + 8), 64 << 20);
        assert_eq!(u32_at(MEMMAP_ADDR + 16), 1);
        let mut line = [0u8; 7];
        mem.read_slice(&mut line, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&line, b"exit 7\0");
        assert!(write_start_info(&mem, 1 << 20, &[b'x'; CMDLINE_MAX]).is_err());
    }
}

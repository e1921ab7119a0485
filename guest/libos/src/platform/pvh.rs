//! Booted through the PVH entry (QEMU microvm, Firecracker).
//!
//! The CPL0 stub (`arch::x86_64::pvh`) enters [`wisp_start_pvh`] at CPL3
//! under a bootstrap map of the first 2 MiB. This boot code is the only
//! CPL3 code that runs before the map is locked, and it trusts nothing the
//! loader gave it beyond what it checks:
//! 1. it reads the `hvm_start_info`, its memory map and the command line
//!    (each must lie in the bootstrap window), and turns them into the same
//!    [`BootPage`] the Wisp monitor writes: memory (RAM above the image),
//!    arguments (the command line, after a `--` token if there is one) and
//!    devices (`virtio_mmio.device=` entries);
//! 2. it describes the guest as a [`wisp_abi::memmap::Map`] and builds the
//!    final page tables with the code the Wisp monitor uses, so both grant
//!    exactly the same: RAM only as far as the loader says there is RAM,
//!    below the image read-only, the system segment supervisor-only, device
//!    windows user read-write, the IOAPIC supervisor-only;
//! 3. it picks what the CPL0 stub must set up (kvmclock, the x2APIC with a
//!    TSC-deadline timer, each device's IOAPIC entry) and has it applied,
//!    with the final tables, by one `LOCKDOWN` call;
//! 4. it reads the clock: TSC rate and wall clock from kvmclock when the
//!    hypervisor offers it, else the hypervisor timing leaf, PIT
//!    calibration and the CMOS clock.
//!
//! Services: COM1 for the console (no LSR polling: each port access is an
//! exit, ~87 µs); exit through isa-debug-exit at 0xf4 (QEMU exits with
//! `status * 2 + 1`), else a line with the status and an i8042 reset
//! (Firecracker), else a halt; waiting halts the vCPU at CPL0 until the
//! deadline or a device interrupt.

use crate::arch::x86_64::io::{in32, in8, out32, out8, pause, rdtsc};
use crate::arch::x86_64::pvh::{
    self as stub, Lockdown, FLAG_IDLE, FLAG_TSC_DEADLINE, IRQ_VECTOR_BASE, MAX_IRQS,
    MAX_MMIO_WRITES, MAX_MSRS, SPURIOUS_VECTOR, TABLE_PAGES, TIMER_VECTOR,
};
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use wisp_abi::boot::{BootPage, PLATFORM_PVH};
use wisp_abi::hypercall::{vector_name, CrashReport, GPR_NAMES};
use wisp_abi::memmap::{Kind, Map, Range, PAGE};
use wisp_abi::x86;

const START_INFO_MAGIC: u32 = 0x336e_c578;
const START_INFO_SIZE: u64 = 56;
const MEMMAP_ENTRY: u64 = 24;
const MEMMAP_MAX: usize = 32;
const COM1: u16 = 0x3f8;
const DEBUG_EXIT: u16 = 0xf4;
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;
/// What the bootstrap map covers: the start info, its memory map and the
/// command line must lie below this.
const BOOT_WINDOW: u64 = 2 << 20;
/// RAM is used below 4 GiB only (the tables reserved in the image cover it).
const RAM_LIMIT: u64 = 1 << 32;
const CMDLINE_MAX: usize = 4096;
/// The IOAPICs of microvm (the second serves GSIs 24-47 when present).
const IOAPIC: [u64; 2] = [0xfec0_0000, 0xfec1_0000];
const IOAPIC_PINS: u32 = 24;
/// Most ranges in the memory map.
const MAX_RANGES: usize = 64;
/// How long QEMU may take to act on isa-debug-exit.
const EXIT_GRACE_NS: u64 = 1_000_000_000;
/// The same where an i8042 is there to reset (Firecracker).
const EXIT_GRACE_I8042_NS: u64 = 20_000_000;
/// Waits shorter than this spin: entering and leaving the halt costs more.
const SPIN_BELOW_NS: u64 = 100_000;

const MSR_APIC_BASE: u64 = 0x1b;
const MSR_X2APIC_SVR: u64 = 0x80f;
const MSR_X2APIC_LVT_TIMER: u64 = 0x832;
const MSR_X2APIC_TIMER_DIVIDE: u64 = 0x83e;
const MSR_X2APIC_LVT_LINT0: u64 = 0x835;
const MSR_X2APIC_LVT_LINT1: u64 = 0x836;
const MSR_KVM_WALL_CLOCK: [u64; 2] = [0x4b56_4d00, 0x11];
const MSR_KVM_SYSTEM_TIME: [u64; 2] = [0x4b56_4d01, 0x12];

/// Memory written once, during the single-threaded PVH boot, before
/// anything else can reference it.
struct BootCell<T>(core::cell::UnsafeCell<T>);
// SAFETY: only `wisp_start_pvh` writes it, once, before any reader exists.
unsafe impl<T> Sync for BootCell<T> {}

/// The boot page built from the start info, read-only once the map is
/// locked (`.pvh_boot` is not loaded: it starts zeroed, whatever the
/// initialiser says).
#[link_section = ".pvh_boot"]
static BOOT: BootCell<BootPage> =
    BootCell(core::cell::UnsafeCell::new(BootPage::new(PLATFORM_PVH)));
/// The arguments, NUL-separated, copied out of the command line; read-only
/// once the map is locked.
#[link_section = ".pvh_boot"]
static ARGS: BootCell<[u8; CMDLINE_MAX]> = BootCell(core::cell::UnsafeCell::new([0; CMDLINE_MAX]));

/// kvmclock's per-vCPU time (`pvclock_vcpu_time_info`), written by KVM.
#[repr(C, align(64))]
struct PvClock {
    version: u32,
    _pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    _pad: [u8; 2],
}
/// kvmclock's wall clock at system time 0 (`pvclock_wall_clock`).
#[repr(C, align(16))]
struct WallClock {
    version: u32,
    sec: u32,
    nsec: u32,
}
static PVCLOCK: BootCell<PvClock> = BootCell(core::cell::UnsafeCell::new(PvClock {
    version: 0,
    _pad0: 0,
    tsc_timestamp: 0,
    system_time: 0,
    tsc_to_system_mul: 0,
    tsc_shift: 0,
    flags: 0,
    _pad: [0; 2],
}));
static WALL: BootCell<WallClock> = BootCell(core::cell::UnsafeCell::new(WallClock {
    version: 0,
    sec: 0,
    nsec: 0,
}));

/// `wait` halts the vCPU (the timer and interrupts are set up).
static IDLE: AtomicBool = AtomicBool::new(false);
/// The one-shot LAPIC timer's rate in kHz; 0 when it runs in TSC-deadline
/// mode (its argument is then a TSC value).
static TIMER_KHZ: AtomicU64 = AtomicU64::new(0);
/// Timer ticks used to measure the one-shot timer's rate.
const CALIBRATION_TICKS: u64 = 200_000;
/// Every device's interrupt wakes a halted vCPU.
static DEVICES_WAKE: AtomicBool = AtomicBool::new(false);
/// Where the TSC rate and wall clock came from, for diagnostics.
static CLOCK_SOURCE: AtomicU32 = AtomicU32::new(0);

/// Where the clock came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockSource {
    /// kvmclock: TSC rate and wall clock, nothing calibrated or probed.
    KvmClock,
    /// TSC rate from the hypervisor timing leaf, wall clock from CMOS.
    TimingLeaf,
    /// TSC rate calibrated against the PIT, wall clock from CMOS.
    Calibrated,
}

/// Where this guest's clock came from (`None` on the Wisp monitor).
pub fn clock_source() -> Option<ClockSource> {
    match CLOCK_SOURCE.load(Ordering::Relaxed) {
        1 => Some(ClockSource::KvmClock),
        2 => Some(ClockSource::TimingLeaf),
        3 => Some(ClockSource::Calibrated),
        _ => None,
    }
}

/// Where the PVH path keeps what the CPL3 guest must not reach (for the
/// protection tests): name and address of each structure.
pub fn system_structures() -> [(&'static str, u64); 6] {
    extern "C" {
        static WISP_PVH_GDT: u8;
        static WISP_PVH_TSS: u8;
    }
    [
        ("gdt", &raw const WISP_PVH_GDT as u64),
        ("tss", &raw const WISP_PVH_TSS as u64),
        ("idt", &raw const stub::wisp_pvh_idt as u64),
        ("page tables", &raw const stub::wisp_pvh_tables as u64),
        ("lockdown", &raw const stub::wisp_pvh_lockdown as u64),
        ("ioapic", IOAPIC[0]),
    ]
}

/// Whether an idle guest halts (no host CPU) rather than spins.
pub fn halts_when_idle() -> bool {
    IDLE.load(Ordering::Relaxed)
}

/// Whether device interrupts wake a halted guest, so an executor with I/O
/// may sleep until its next timer.
pub fn wakes_on_io() -> bool {
    halts_when_idle() && DEVICES_WAKE.load(Ordering::Relaxed)
}

extern "C" {
    static __image_start: u8;
    static __text_end: u8;
    static __rodata_end: u8;
    static __stack_bottom: u8;
    static __stack_top: u8;
    static __ist_bottom: u8;
    static __image_end: u8;
}

/// Reads a `T` at guest-physical address `addr` under the bootstrap map.
///
/// # Safety
/// `addr..addr + size_of::<T>()` must lie in the bootstrap window and `T`
/// be valid for any bit pattern.
unsafe fn read_phys<T: Copy>(addr: u64) -> T {
    // SAFETY: per the contract; identity-mapped memory written by the loader.
    unsafe { core::ptr::read_volatile(addr as usize as *const T) }
}

/// Whether `addr..addr + len` lies in the bootstrap window.
fn in_window(addr: u64, len: u64) -> bool {
    addr.checked_add(len).is_some_and(|end| end <= BOOT_WINDOW)
}

fn fail(msg: &str) -> ! {
    let _ = writeln!(Com1, "wisp: {msg}");
    exit(wisp_abi::exit::CRASH)
}

/// A fixed-capacity list (no heap before the map is locked).
struct List<T: Copy, const N: usize> {
    items: [T; N],
    len: usize,
}

impl<T: Copy, const N: usize> List<T, N> {
    const fn new(empty: T) -> Self {
        List {
            items: [empty; N],
            len: 0,
        }
    }

    fn push(&mut self, item: T) {
        if self.len == N {
            fail("PVH boot: too many memory ranges or devices");
        }
        self.items[self.len] = item;
        self.len += 1;
    }

    fn as_slice(&self) -> &[T] {
        &self.items[..self.len]
    }
}

fn addr_of<T>(s: &T) -> u64 {
    s as *const T as u64
}

/// CPL3 entry from the PVH stub, with the start-info address.
#[no_mangle]
extern "C" fn wisp_start_pvh(start_info: u32) -> ! {
    super::set(PLATFORM_PVH);
    let si = start_info as u64;
    if !in_window(si, START_INFO_SIZE) {
        fail("PVH start info is not in the first 2 MiB");
    }
    // SAFETY: in the window (checked above); all fields are plain integers.
    let (magic, version, cmdline, memmap, entries) = unsafe {
        (
            read_phys::<u32>(si),
            read_phys::<u32>(si + 4),
            read_phys::<u64>(si + 24),
            read_phys::<u64>(si + 40),
            read_phys::<u32>(si + 48),
        )
    };
    if magic != START_INFO_MAGIC {
        fail("bad PVH start info magic");
    }
    if version < 1 || entries == 0 {
        fail("PVH start info has no memory map");
    }
    let entries = (entries as usize).min(MEMMAP_MAX) as u64;
    if !in_window(memmap, entries * MEMMAP_ENTRY) {
        fail("PVH memory map is not in the first 2 MiB");
    }
    // SAFETY: single-threaded boot, entered once; nothing else references
    // BOOT or ARGS yet.
    let boot: &'static mut BootPage = unsafe { &mut *BOOT.0.get() };
    *boot = BootPage::new(PLATFORM_PVH);
    // SAFETY: as above.
    let args: &'static mut [u8; CMDLINE_MAX] = unsafe { &mut *ARGS.0.get() };

    let image_start = &raw const __image_start as u64;
    let image_end = &raw const __image_end as u64;
    let mut ram: List<(u64, u64), MEMMAP_MAX> = List::new((0, 0));
    for i in 0..entries {
        let e = memmap + i * MEMMAP_ENTRY;
        // SAFETY: inside the table, checked to lie in the window.
        let (addr, size, kind) = unsafe {
            (
                read_phys::<u64>(e),
                read_phys::<u64>(e + 8),
                read_phys::<u32>(e + 16),
            )
        };
        if kind != 1 {
            continue;
        }
        let start = addr.next_multiple_of(PAGE);
        let end = addr.saturating_add(size).min(RAM_LIMIT) & !(PAGE - 1);
        if end > start {
            ram.push((start, end));
            boot.mem_size = boot.mem_size.max(end);
            let free = start.max(image_end);
            if end > free {
                boot.push_region(free, end - free);
            }
        }
    }
    if !ram
        .as_slice()
        .iter()
        .any(|&(s, e)| s <= image_start && e >= image_end)
    {
        fail("the image is not in RAM according to the PVH memory map");
    }

    read_command_line(cmdline, boot, args);

    let cpu = Cpu::detect();
    // Boot phase: nothing else uses the lockdown structure, the tables or
    // the IDT, which the bootstrap map lets CPL3 write.
    let (lockdown, tables, idt) = {
        let l = &raw mut stub::wisp_pvh_lockdown;
        let t = &raw mut stub::wisp_pvh_tables;
        let i = &raw mut stub::wisp_pvh_idt;
        // SAFETY: as above; the pointers are to distinct statics.
        unsafe { (&mut *l, &mut *t, &mut *i) }
    };
    let routed = plan_interrupts(&cpu, boot, lockdown, idt);
    let ranges = memory_ranges(ram.as_slice(), boot, routed.ioapics);
    let map = Map {
        ram: ram.as_slice(),
        ranges: ranges.as_slice(),
    };
    let base = addr_of(tables);
    if let Err(e) = map.build(base, &mut tables[..]) {
        fail(e.reason());
    }
    lockdown.cr3 = base;
    let kvmclock = cpu.kvmclock.map(|i| {
        // SAFETY: boot phase; KVM writes these from now on, we only read.
        let (wall, time) = unsafe { (addr_of(&*WALL.0.get()), addr_of(&*PVCLOCK.0.get())) };
        msr(lockdown, MSR_KVM_WALL_CLOCK[i], wall);
        msr(lockdown, MSR_KVM_SYSTEM_TIME[i], time | 1);
    });
    if stub::call(stub::SERVICE_SETUP, 0) != 0 {
        fail("PVH set-up refused");
    }
    DEVICES_WAKE.store(routed.all_devices, Ordering::Relaxed);

    let (khz, unix_ns, at_tsc, source) = match kvmclock.and_then(|()| read_kvmclock()) {
        Some((khz, ns, tsc)) => (khz, ns, tsc, ClockSource::KvmClock),
        None => {
            let (khz, source) = match cpu.timing_leaf_khz {
                Some(k) => (k, ClockSource::TimingLeaf),
                None => (pit_calibrate_khz(10), ClockSource::Calibrated),
            };
            let ns = rtc_unix_seconds().saturating_mul(1_000_000_000);
            (khz, ns, rdtsc(), source)
        }
    };
    CLOCK_SOURCE.store(source as u32 + 1, Ordering::Relaxed);
    boot.tsc_khz = khz;
    boot.boot_unix_ns = unix_ns;
    boot.boot_tsc = at_tsc;
    if routed.idle {
        let khz_timer = if cpu.tsc_deadline {
            Some(0)
        } else {
            cpu.apic_bus_khz.or_else(|| calibrate_timer_khz(khz))
        };
        if let Some(k) = khz_timer {
            TIMER_KHZ.store(k, Ordering::Relaxed);
            IDLE.store(true, Ordering::Relaxed);
        }
    }
    // The boot page is complete: from here on it is read-only.
    if stub::call(stub::SERVICE_LOCKDOWN, 0) != 0 {
        fail("PVH lockdown refused");
    }
    crate::start(boot)
}

/// Reads the command line (in the bootstrap window) into the devices and
/// arguments of `boot`.
fn read_command_line(cmdline: u64, boot: &mut BootPage, args: &'static mut [u8; CMDLINE_MAX]) {
    if cmdline == 0 {
        return;
    }
    let mut line = [0u8; CMDLINE_MAX];
    let mut n = 0;
    while n < CMDLINE_MAX - 1 && in_window(cmdline + n as u64, 1) {
        // SAFETY: checked in the window just above.
        let b = unsafe { read_phys::<u8>(cmdline + n as u64) };
        if b == 0 {
            break;
        }
        line[n] = b;
        n += 1;
    }
    if n == 0 && !in_window(cmdline, 1) {
        let _ = writeln!(
            Com1,
            "wisp: command line at {cmdline:#x} is not in the first 2 MiB; arguments ignored"
        );
    }
    // Firecracker appends " pci=off" to every command line, after the
    // application's arguments: a loader option, not an argument.
    if line[..n].ends_with(b" pci=off") {
        n -= b" pci=off".len();
    }
    let text = core::str::from_utf8(&line[..n]).unwrap_or("");
    let net = crate::cmdline::NetOptions::parse(text);
    for token in text.split_ascii_whitespace() {
        if let Some(mut dev) = crate::cmdline::parse_virtio_mmio(token) {
            net.apply(&mut dev);
            boot.push_device(dev);
        }
    }
    let (len, argc) = crate::cmdline::split_args(&line[..n], args);
    boot.args_addr = args.as_ptr() as u64;
    boot.args_len = len as u32;
    boot.argc = argc;
}

/// The guest's memory map under PVH (see [`wisp_abi::memmap`] for what each
/// kind grants): below the image read-only, the image by sections, its
/// system segment supervisor-only, device windows, the IOAPICs in use.
fn memory_ranges(
    ram: &[(u64, u64)],
    boot: &BootPage,
    ioapics: [bool; 2],
) -> List<Range, MAX_RANGES> {
    let sym = |s: &u8| s as *const u8 as u64;
    // SAFETY: linker symbols; only their addresses are taken.
    let (image_start, text_end, rodata_end, data_end, boot_start, sys_end) = unsafe {
        (
            sym(&__image_start),
            sym(&__text_end),
            sym(&__rodata_end),
            sym(&stub::__data_end),
            sym(&stub::__pvh_boot_start),
            sym(&stub::__pvh_sys_end),
        )
    };
    // SAFETY: as above.
    let (stack_bottom, stack_top, ist_bottom, image_end) = unsafe {
        (
            sym(&__stack_bottom),
            sym(&__stack_top),
            sym(&__ist_bottom),
            sym(&__image_end),
        )
    };
    let mut r = List::new(Range::new(0, 0, Kind::Unmapped));
    for &(s, e) in ram {
        let (lo, hi) = (s.max(PAGE), e.min(image_start));
        if hi > lo {
            r.push(Range::new(lo, hi, Kind::BootData));
        }
    }
    r.push(Range::new(image_start, image_end, Kind::Unmapped));
    r.push(Range::new(image_start, text_end, Kind::Text));
    r.push(Range::new(text_end, rodata_end, Kind::ReadOnly));
    r.push(Range::new(rodata_end, data_end, Kind::Data));
    r.push(Range::new(data_end, boot_start, Kind::System));
    r.push(Range::new(boot_start, sys_end, Kind::BootData));
    r.push(Range::new(stack_bottom, stack_top, Kind::Data));
    r.push(Range::new(ist_bottom, image_end, Kind::Data));
    for d in boot.devices() {
        let start = d.mmio_base & !(PAGE - 1);
        let end = d
            .mmio_base
            .saturating_add(d.mmio_len)
            .next_multiple_of(PAGE);
        r.push(Range::new(start, end, Kind::DeviceMmio));
    }
    for (i, &used) in ioapics.iter().enumerate() {
        if used {
            r.push(Range::new(IOAPIC[i], IOAPIC[i] + PAGE, Kind::SystemMmio));
        }
    }
    r
}

/// What the VM's CPU and hypervisor offer.
struct Cpu {
    /// Index into the `MSR_KVM_*` pairs (new, old) if kvmclock is offered.
    kvmclock: Option<usize>,
    /// TSC kHz from the hypervisor timing leaf 0x40000010.
    timing_leaf_khz: Option<u64>,
    /// LAPIC timer kHz from the same leaf.
    apic_bus_khz: Option<u64>,
    x2apic: bool,
    tsc_deadline: bool,
    apic_id: u32,
}

impl Cpu {
    /// Asks the VM's CPUID through the CPL0 service (see
    /// `arch::x86_64::pvh`: at CPL3 the outer hypervisor would answer).
    fn detect() -> Cpu {
        let (_, leaf1_b, leaf1_c, _) = stub::cpuid(1);
        let (hv_max, b, c, d) = stub::cpuid(0x4000_0000);
        let kvm = (b, c, d) == (0x4b4d_564b, 0x564b_4d56, 0x4d);
        let kvmclock = if kvm && hv_max >= 0x4000_0001 {
            let features = stub::cpuid(0x4000_0001).0;
            if features & (1 << 3) != 0 {
                Some(0)
            } else if features & 1 != 0 {
                Some(1)
            } else {
                None
            }
        } else {
            None
        };
        let timing = (hv_max >= 0x4000_0010).then(|| stub::cpuid(0x4000_0010));
        let nonzero = |v: u32| (v != 0).then_some(v as u64);
        Cpu {
            kvmclock,
            timing_leaf_khz: timing.and_then(|t| nonzero(t.0)),
            apic_bus_khz: timing.and_then(|t| nonzero(t.1)),
            x2apic: leaf1_c & (1 << 21) != 0,
            tsc_deadline: leaf1_c & (1 << 24) != 0,
            apic_id: leaf1_b >> 24,
        }
    }
}

fn msr(l: &mut Lockdown, index: u64, value: u64) {
    let i = l.msr_count as usize;
    if i >= MAX_MSRS {
        fail("PVH boot: too many MSR writes");
    }
    l.msrs[i] = [index, value];
    l.msr_count += 1;
}

fn mmio(l: &mut Lockdown, addr: u64, value: u32) {
    let i = l.mmio_count as usize;
    if i >= MAX_MMIO_WRITES {
        fail("PVH boot: too many interrupt controller writes");
    }
    l.mmio[i] = [addr, value as u64];
    l.mmio_count += 1;
}

/// What [`plan_interrupts`] set up.
struct Routed {
    /// `IDLE` halts: the x2APIC and its TSC-deadline timer are set up.
    idle: bool,
    /// Every device's interrupt is routed to a vector.
    all_devices: bool,
    /// Which IOAPICs are programmed (and so mapped for CPL0).
    ioapics: [bool; 2],
}

/// Chooses the LAPIC and IOAPIC set-up for halting while idle: the x2APIC
/// timer on [`TIMER_VECTOR`] (TSC-deadline mode where offered, else
/// one-shot), each device's pin (edge, active high) on its own vector, the
/// gates for them. Without an x2APIC the guest spins instead.
fn plan_interrupts(
    cpu: &Cpu,
    boot: &BootPage,
    l: &mut Lockdown,
    idt: &mut [[u64; 2]; 256],
) -> Routed {
    let mut routed = Routed {
        idle: false,
        all_devices: boot.devices().is_empty(),
        ioapics: [false; 2],
    };
    if !cpu.x2apic {
        return routed;
    }
    // SAFETY: a table of addresses in the image's read-only data.
    let handlers = unsafe { &stub::wisp_pvh_irq_handlers };
    let gate = |handler: u64| x86::gate(handler, x86::KERNEL_CS, 0, 0, false);
    idt[TIMER_VECTOR as usize] = gate(handlers[0]);
    idt[SPURIOUS_VECTOR as usize] = gate(handlers[1 + MAX_IRQS]);
    msr(
        l,
        MSR_APIC_BASE,
        0xfee0_0000 | (1 << 11) | (1 << 10) | (1 << 8),
    );
    msr(l, MSR_X2APIC_SVR, 0x100 | SPURIOUS_VECTOR as u64);
    msr(l, MSR_X2APIC_LVT_LINT0, 1 << 16);
    msr(l, MSR_X2APIC_LVT_LINT1, 1 << 16);
    if cpu.tsc_deadline {
        msr(l, MSR_X2APIC_LVT_TIMER, (0b10 << 17) | TIMER_VECTOR as u64);
        l.flags |= FLAG_TSC_DEADLINE;
    } else {
        msr(l, MSR_X2APIC_TIMER_DIVIDE, 0b1011); // divide by 1
        msr(l, MSR_X2APIC_LVT_TIMER, TIMER_VECTOR as u64); // one-shot
    }
    let mut all = true;
    for (i, d) in boot.devices().iter().enumerate() {
        let (chip, pin) = ((d.irq / IOAPIC_PINS) as usize, d.irq % IOAPIC_PINS);
        if i >= MAX_IRQS || chip >= IOAPIC.len() || d.irq == 0 {
            all = false;
            continue;
        }
        let vector = IRQ_VECTOR_BASE as u32 + i as u32;
        idt[vector as usize] = gate(handlers[1 + i]);
        l.irq_windows[i] = d.mmio_base;
        let (select, window) = (IOAPIC[chip], IOAPIC[chip] + 0x10);
        mmio(l, select, 0x11 + 2 * pin);
        mmio(l, window, cpu.apic_id << 24);
        mmio(l, select, 0x10 + 2 * pin);
        mmio(l, window, vector); // fixed, physical, active high, edge, unmasked
        routed.ioapics[chip] = true;
    }
    l.flags |= FLAG_IDLE;
    routed.idle = true;
    routed.all_devices = all;
    routed
}

/// The one-shot timer's rate: the longer of two halts of
/// [`CALIBRATION_TICKS`] each (anything that delays a wake-up only lowers
/// the estimate, so timers fire early, never late), if plausible.
fn calibrate_timer_khz(tsc_khz: u64) -> Option<u64> {
    let mut longest = 0;
    for _ in 0..2 {
        let t0 = rdtsc();
        stub::call(stub::SERVICE_IDLE, CALIBRATION_TICKS);
        longest = longest.max(rdtsc().wrapping_sub(t0));
    }
    let khz = CALIBRATION_TICKS.saturating_mul(tsc_khz) / longest.max(1);
    // KVM's LAPIC timer runs at 1 GHz unless the VMM slows it.
    (1_000..=10_000_000).contains(&khz).then_some(khz)
}

/// TSC kHz, wall-clock ns and the TSC at that instant, from kvmclock.
fn read_kvmclock() -> Option<(u64, u64, u64)> {
    let (time, wall) = (PVCLOCK.0.get(), WALL.0.get());
    for _ in 0..1000 {
        // SAFETY: KVM updates these in place; reading them volatile and
        // checking the version (odd: being written) is the pvclock protocol.
        let (v0, tsc_ts, sys, mul, shift, wsec, wnsec) = unsafe {
            (
                core::ptr::read_volatile(&raw const (*time).version),
                core::ptr::read_volatile(&raw const (*time).tsc_timestamp),
                core::ptr::read_volatile(&raw const (*time).system_time),
                core::ptr::read_volatile(&raw const (*time).tsc_to_system_mul),
                core::ptr::read_volatile(&raw const (*time).tsc_shift),
                core::ptr::read_volatile(&raw const (*wall).sec),
                core::ptr::read_volatile(&raw const (*wall).nsec),
            )
        };
        let tsc = rdtsc();
        // SAFETY: as above.
        let v1 = unsafe { core::ptr::read_volatile(&raw const (*time).version) };
        if v0 == 0 || v0 & 1 != 0 || v0 != v1 {
            pause();
            continue;
        }
        if mul == 0 {
            return None;
        }
        // Plain u64 arithmetic (no 128-bit division in the image): 10^6
        // << 32 and seconds in ns both fit.
        let mut khz = (1_000_000u64 << 32) / mul as u64;
        let mut delta = tsc.wrapping_sub(tsc_ts);
        if shift < 0 {
            khz <<= -shift as u32;
            delta >>= -shift as u32;
        } else {
            khz >>= shift as u32;
            delta <<= shift as u32;
        }
        let now = sys.wrapping_add(((delta as u128 * mul as u128) >> 32) as u64);
        let unix = (wsec as u64 * 1_000_000_000 + wnsec as u64).wrapping_add(now);
        return Some((khz, unix, tsc));
    }
    None
}

/// Counts TSC ticks while PIT channel 2 counts down `ms` milliseconds.
fn pit_calibrate_khz(ms: u64) -> u64 {
    const PIT_HZ: u64 = 1_193_182;
    let count = (PIT_HZ * ms / 1000) as u16;
    let port61 = in8(0x61);
    out8(0x61, (port61 & !0x02) | 0x01); // gate on, speaker off
    out8(0x43, 0b1011_0000); // channel 2, lo/hi byte, mode 0
    out8(0x42, count as u8);
    out8(0x42, (count >> 8) as u8);
    let t0 = rdtsc();
    let mut t1 = t0;
    // Bounded: give up after ~10^10 ticks if there is no PIT.
    while in8(0x61) & 0x20 == 0 {
        t1 = rdtsc();
        if t1 - t0 > 10_000_000_000 {
            break;
        }
    }
    out8(0x61, port61);
    let khz = (t1 - t0) / ms;
    if khz == 0 {
        2_000_000
    } else {
        khz
    }
}

fn cmos(reg: u8) -> u8 {
    out8(0x70, reg);
    in8(0x71)
}

/// Wall-clock seconds since the epoch from the CMOS RTC (0 if there is
/// none: a missing device reads as all ones).
fn rtc_unix_seconds() -> u64 {
    let status_b = cmos(0x0b);
    if status_b == 0xff {
        return 0;
    }
    let mut spins = 0;
    while cmos(0x0a) & 0x80 != 0 && spins < 1000 {
        spins += 1;
    }
    let bcd = status_b & 0x04 == 0;
    let conv = |v: u8| if bcd { (v & 0x0f) + (v >> 4) * 10 } else { v };
    let sec = conv(cmos(0x00)) as u64;
    let min = conv(cmos(0x02)) as u64;
    let hour_raw = cmos(0x04);
    let pm = hour_raw & 0x80 != 0;
    let mut hour = conv(hour_raw & 0x7f) as u64;
    if status_b & 0x02 == 0 && pm {
        hour = (hour % 12) + 12;
    }
    let day = conv(cmos(0x07)) as i64;
    let month = conv(cmos(0x08)) as i64;
    let year = 2000 + conv(cmos(0x09)) as i64;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return 0;
    }
    let days = crate::time::days_from_civil(year, month, day);
    (days as u64) * 86400 + hour * 3600 + min * 60 + sec
}

pub fn console_write(bytes: &[u8]) {
    for &b in bytes {
        out8(COM1, b);
    }
}

/// Blocks for at most `timeout_ns`: halts at CPL0 until the TSC deadline or
/// a device interrupt where the timer is set up, else spins.
pub fn wait(timeout_ns: u64) {
    if timeout_ns == 0 {
        return;
    }
    let khz = crate::time::tsc_khz().max(1);
    // Saturates only for waits of hours; the caller waits again.
    let ticks = timeout_ns.saturating_mul(khz) / 1_000_000;
    let start = rdtsc();
    if halts_when_idle() && timeout_ns >= SPIN_BELOW_NS {
        let timer_khz = TIMER_KHZ.load(Ordering::Relaxed);
        let arg = if timer_khz == 0 {
            start.saturating_add(ticks)
        } else {
            let count = timeout_ns.saturating_mul(timer_khz) / 1_000_000;
            count.clamp(1, u32::MAX as u64)
        };
        stub::call(stub::SERVICE_IDLE, arg);
        return;
    }
    while rdtsc().wrapping_sub(start) < ticks {
        pause();
    }
}

/// Ends the guest: isa-debug-exit ends QEMU with the status; where there is
/// none (Firecracker), the status goes to the console and an i8042 reset
/// ends the VM (with status 0); failing that, the vCPU halts for good.
pub fn exit(status: u8) -> ! {
    // An i8042 (Firecracker has one, QEMU microvm only when asked) answers
    // its status port; an absent one reads as all ones.
    let i8042 = in8(I8042_COMMAND) != 0xff;
    // isa-debug-exit reads as 0; an absent port reads as all ones under
    // QEMU, and as 0 under Firecracker.
    if in32(DEBUG_EXIT) == 0 {
        out32(DEBUG_EXIT, status as u32);
        // QEMU (since 9.1) ends the VM from its main loop, a little later:
        // give it the time to stop this vCPU before concluding there is no
        // such device, but not long where an i8042 promises another way out.
        wait(if i8042 {
            EXIT_GRACE_I8042_NS
        } else {
            EXIT_GRACE_NS
        });
    }
    let _ = writeln!(Com1, "wisp: exit status {status}");
    out8(I8042_COMMAND, I8042_RESET);
    loop {
        stub::call(stub::SERVICE_HALT, 0);
        pause();
    }
}

/// Writes straight to COM1 (no buffer, no allocation): used for the crash
/// report, which must work whatever state the heap and console are in.
struct Com1;

impl Write for Com1 {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        console_write(s.as_bytes());
        Ok(())
    }
}

pub fn crash(r: &CrashReport) -> ! {
    let mut w = Com1;
    let _ = writeln!(
        w,
        "\nwisp: guest crashed: {} (vector {}), error code {:#x}",
        vector_name(r.vector),
        r.vector,
        r.error_code
    );
    let _ = writeln!(
        w,
        "  rip {:#018x}  rsp {:#018x}  rflags {:#x}  cs {:#x}  ss {:#x}",
        r.rip, r.rsp, r.rflags, r.cs, r.ss
    );
    if r.vector == 14 {
        // SAFETY: written by the CPL0 page-fault gate before it passed the
        // fault on; a plain integer.
        let cr2 = unsafe { core::ptr::read_volatile(&raw const stub::wisp_pvh_cr2) };
        let (access, why) = x86::page_fault_cause(r.error_code);
        let _ = writeln!(w, "  fault address (cr2) {cr2:#018x}: {access}, {why}");
    }
    for (i, (name, v)) in GPR_NAMES.iter().zip(r.gprs.iter()).enumerate() {
        let _ = write!(w, "  {:>3} {:#018x}", name, v);
        if i % 4 == 3 {
            let _ = writeln!(w);
        }
    }
    let _ = writeln!(w);
    exit(wisp_abi::exit::CRASH)
}

/// Table pages are a whole number of 4 KiB pages of 512 entries.
const _: () = assert!(core::mem::size_of::<[[u64; 512]; TABLE_PAGES]>() == TABLE_PAGES * 4096);

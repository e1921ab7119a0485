//! Booted through the PVH entry (QEMU microvm, Firecracker).
//!
//! The CPL0 stub has already built page tables and entered CPL3; here, at
//! native speed, the runtime turns the `hvm_start_info` the loader left in
//! low memory into the same [`BootPage`] the Wisp monitor writes, so the rest
//! of the library OS does not care how it was booted:
//! * memory: RAM entries of the PVH memory map above the image;
//! * arguments: the kernel command line, split on spaces (after a `--` token
//!   if there is one, so loader options can precede the arguments);
//! * clock: TSC frequency from the hypervisor CPUID leaf when present, else
//!   calibrated against the PIT for 10 ms; wall clock from the CMOS RTC.
//!
//! Services: COM1 for the console (no LSR polling: each port access is an
//! exit, ~87 µs), isa-debug-exit at 0xf4 for the exit status (QEMU exits
//! with `status * 2 + 1`), and a TSC spin for waiting.

use crate::arch::x86_64::entry::{MEMMAP_MAX, START_INFO_SIZE};
use crate::arch::x86_64::io::{in8, out32, out8, pause, rdtsc};
use core::fmt::Write;
use wisp_abi::boot::{BootPage, PLATFORM_PVH};
use wisp_abi::hypercall::{vector_name, CrashReport, GPR_NAMES};

const START_INFO_MAGIC: u32 = 0x336e_c578;
const COM1: u16 = 0x3f8;
const DEBUG_EXIT: u16 = 0xf4;
/// Highest address the PVH stub maps (1 GiB identity map).
const MAPPED_END: u64 = 1 << 30;
const CMDLINE_MAX: usize = 4096;

/// Memory written once, during the single-threaded PVH boot, before
/// anything else can reference it.
struct BootCell<T>(core::cell::UnsafeCell<T>);
// SAFETY: only `wisp_start_pvh` writes it, once, before any reader exists.
unsafe impl<T> Sync for BootCell<T> {}

/// The boot page built from the start info.
static BOOT: BootCell<BootPage> =
    BootCell(core::cell::UnsafeCell::new(BootPage::new(PLATFORM_PVH)));
/// The arguments, NUL-separated, copied out of the command line.
static ARGS: BootCell<[u8; CMDLINE_MAX]> = BootCell(core::cell::UnsafeCell::new([0; CMDLINE_MAX]));

extern "C" {
    static __image_end: u8;
    /// Copies made by the PVH stub before paging (see `arch::x86_64::entry`).
    static wisp_pvh_memmap: [u8; MEMMAP_MAX * 24];
}

/// Reads a `T` at guest-physical address `addr`.
///
/// # Safety
/// `addr..addr + size_of::<T>()` must be mapped (below 1 GiB, not page 0)
/// and `T` valid for any bit pattern.
unsafe fn read_phys<T: Copy>(addr: u64) -> T {
    // SAFETY: per the contract; identity-mapped memory written by the loader.
    unsafe { core::ptr::read_volatile(addr as usize as *const T) }
}

fn readable(addr: u64, len: u64) -> bool {
    addr >= 4096 && addr.checked_add(len).is_some_and(|end| end <= MAPPED_END)
}

fn fail(msg: &str) -> ! {
    console_write(b"wisp: ");
    console_write(msg.as_bytes());
    console_write(b"\n");
    exit(wisp_abi::exit::CRASH)
}

/// CPL3 entry from the PVH stub, with the start-info address.
#[no_mangle]
extern "C" fn wisp_start_pvh(start_info: u32) -> ! {
    super::set(PLATFORM_PVH);
    let si = start_info as u64;
    if !readable(si, START_INFO_SIZE as u64) {
        fail("PVH start info outside mapped memory");
    }
    // SAFETY: range checked above; all fields are plain integers.
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
    // SAFETY: single-threaded boot, entered once; nothing else references
    // BOOT or ARGS yet.
    let boot: &'static mut BootPage = unsafe { &mut *BOOT.0.get() };
    // SAFETY: as above.
    let args: &'static mut [u8; CMDLINE_MAX] = unsafe { &mut *ARGS.0.get() };

    // The stub copied at most MEMMAP_MAX entries of the loader's table.
    let entries = (entries as usize).min(MEMMAP_MAX);
    let _ = memmap;
    let memmap = &raw const wisp_pvh_memmap as u64;
    if version >= 1 && entries > 0 {
        let image_end = &raw const __image_end as u64;
        for i in 0..entries as u64 {
            // SAFETY: within the stub's copy of the table (i < MEMMAP_MAX).
            let (addr, size, kind) = unsafe {
                (
                    read_phys::<u64>(memmap + i * 24),
                    read_phys::<u64>(memmap + i * 24 + 8),
                    read_phys::<u32>(memmap + i * 24 + 16),
                )
            };
            let end = addr.saturating_add(size);
            boot.mem_size = boot.mem_size.max(end);
            if kind != 1 {
                continue;
            }
            let start = addr.max(image_end.next_multiple_of(4096));
            let end = end.min(MAPPED_END) & !4095;
            if end > start {
                boot.push_region(start, end - start);
            }
        }
    } else {
        fail("PVH start info has no memory map");
    }

    if cmdline != 0 {
        if !readable(cmdline, 1) {
            let _ = writeln!(
                Com1,
                "wisp: command line at {cmdline:#x} is not mapped; arguments ignored"
            );
        }
        let mut line = [0u8; CMDLINE_MAX];
        let mut n = 0;
        while n < CMDLINE_MAX - 1 && readable(cmdline + n as u64, 1) {
            // SAFETY: checked readable just above.
            let b = unsafe { read_phys::<u8>(cmdline + n as u64) };
            if b == 0 {
                break;
            }
            line[n] = b;
            n += 1;
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

    boot.tsc_khz = tsc_khz();
    boot.boot_unix_ns = rtc_unix_seconds().saturating_mul(1_000_000_000);
    boot.boot_tsc = rdtsc();
    crate::start(boot)
}

/// TSC frequency: the hypervisor timing leaf if offered, else the PIT.
fn tsc_khz() -> u64 {
    // `cpuid` traps to the hypervisor at CPL3, which answers it (~37 µs).
    let max_hv = core::arch::x86_64::__cpuid(0x4000_0000).eax;
    if max_hv >= 0x4000_0010 {
        let khz = core::arch::x86_64::__cpuid(0x4000_0010).eax as u64;
        if khz != 0 {
            return khz;
        }
    }
    pit_calibrate_khz(10)
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

/// Wall-clock seconds since the epoch from the CMOS RTC (0 if unreadable).
fn rtc_unix_seconds() -> u64 {
    let mut spins = 0;
    while cmos(0x0a) & 0x80 != 0 && spins < 1000 {
        spins += 1;
    }
    let status_b = cmos(0x0b);
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

pub fn wait(timeout_ns: u64) {
    let khz = crate::time::tsc_khz().max(1);
    let ticks = (timeout_ns as u128 * khz as u128 / 1_000_000) as u64;
    let start = rdtsc();
    while rdtsc().wrapping_sub(start) < ticks {
        pause();
    }
}

pub fn exit(status: u8) -> ! {
    loop {
        out32(DEBUG_EXIT, status as u32);
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
    let _ = writeln!(w, "  fault address (cr2): not readable at CPL3 under PVH");
    for (i, (name, v)) in GPR_NAMES.iter().zip(r.gprs.iter()).enumerate() {
        let _ = write!(w, "  {:>3} {:#018x}", name, v);
        if i % 4 == 3 {
            let _ = writeln!(w);
        }
    }
    let _ = writeln!(w);
    exit(wisp_abi::exit::CRASH)
}

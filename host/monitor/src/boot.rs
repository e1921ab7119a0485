//! Writes a guest's initial memory: the image's segments, the page tables,
//! GDT, IDT, TSS, the boot page and the arguments.
//!
//! Guest memory is fresh from `mmap` (zero-filled), so the zero-filled tail
//! of each segment (`.bss`, stacks) is not written: untouched pages cost the
//! host nothing.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use wisp_abi::boot::{BootPage, Device, FLAG_TRACE_BOOT, PLATFORM_WISP};
use wisp_abi::pod::Pod;
use wisp_abi::x86;

use crate::image::Image;
use crate::layout::Layout;
use crate::paging;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("writing guest memory at {addr:#x}: {source}")]
    Memory {
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
    #[error("exception vector {vector} of the image points to {addr:#x}, outside its code")]
    BadExceptionVector { vector: usize, addr: u64 },
}

fn write(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) -> Result<(), BootError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| BootError::Memory { addr, source })
}

/// Copies the image's file-backed bytes into guest memory.
pub fn load_image(mem: &GuestMemoryMmap, image: &Image) -> Result<(), BootError> {
    for seg in &image.segments {
        write(mem, seg.addr, image.segment_bytes(seg))?;
    }
    Ok(())
}

/// Encodes the arguments as consecutive NUL-terminated strings.
pub fn encode_args(args: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for a in args {
        out.extend_from_slice(a.as_bytes());
        out.push(0);
    }
    out
}

/// Clock data for the boot page.
#[derive(Clone, Copy, Debug, Default)]
pub struct Clock {
    pub tsc_khz: u64,
    pub boot_tsc: u64,
    pub boot_unix_ns: u64,
}

/// Writes page tables, GDT, IDT, TSS and the arguments. The exception
/// handlers' addresses are read back from the loaded image (its manifest
/// names the table) and each must lie in executable code.
pub fn write_system(
    mem: &GuestMemoryMmap,
    layout: &Layout,
    image: &Image,
    args: &[u8],
) -> Result<(), BootError> {
    for table in paging::build(layout, image) {
        write(mem, table.addr, &table.bytes())?;
    }

    let mut gdt = [0u64; x86::GDT_ENTRIES];
    gdt[..x86::GDT_FIXED.len()].copy_from_slice(&x86::GDT_FIXED);
    let [low, high] = x86::tss_descriptor(layout.tss, x86::TSS_SIZE as u32 - 1);
    // Marked busy: TR is loaded with a busy TSS through the vCPU registers.
    gdt[8] = low | (1 << 41);
    gdt[9] = high;
    write(
        mem,
        layout.gdt,
        &gdt.iter()
            .flat_map(|e| e.to_le_bytes())
            .collect::<Vec<u8>>(),
    )?;

    let table = image.manifest.exception_vectors;
    let mut idt = Vec::with_capacity(x86::EXCEPTION_VECTORS * 16);
    for vector in 0..x86::EXCEPTION_VECTORS {
        let mut raw = [0u8; 8];
        let at = table + vector as u64 * 8;
        mem.read_slice(&mut raw, GuestAddress(at))
            .map_err(|source| BootError::Memory { addr: at, source })?;
        let handler = u64::from_le_bytes(raw);
        if !image
            .segments
            .iter()
            .any(|s| s.perms.exec && handler >= s.addr && handler < s.addr + s.mem_size)
        {
            return Err(BootError::BadExceptionVector {
                vector,
                addr: handler,
            });
        }
        let [lo, hi] = x86::trap_gate(handler);
        idt.extend_from_slice(&lo.to_le_bytes());
        idt.extend_from_slice(&hi.to_le_bytes());
    }
    write(mem, layout.idt, &idt)?;

    write(
        mem,
        layout.tss,
        &x86::tss_bytes(image.manifest.ist_top, x86::WISP_PORTS),
    )?;
    write(mem, layout.args, args)?;
    Ok(())
}

/// Writes the boot page (last, once the clock has been read).
pub fn write_boot_page(
    mem: &GuestMemoryMmap,
    layout: &Layout,
    args: &[u8],
    argc: usize,
    clock: Clock,
    trace: bool,
    devices: &[Device],
) -> Result<(), BootError> {
    let mut page = BootPage::new(PLATFORM_WISP);
    for d in devices {
        page.push_device(*d);
    }
    if trace {
        page.flags |= FLAG_TRACE_BOOT;
    }
    // This monitor can post a stop request (`Controller::request_shutdown`).
    page.flags |= wisp_abi::boot::FLAG_SHUTDOWN_NOTICE;
    for &(start, len) in &layout.free {
        page.push_region(start, len);
    }
    page.mem_size = layout.mem_size;
    page.tsc_khz = clock.tsc_khz;
    page.boot_tsc = clock.boot_tsc;
    page.boot_unix_ns = clock.boot_unix_ns;
    // The clock record starts at the boot reference; a restore re-bases it.
    page.clock_generation = 1;
    page.mono_tsc = clock.boot_tsc;
    page.wall_tsc = clock.boot_tsc;
    page.wall_unix_ns = clock.boot_unix_ns;
    page.seed = random_seed();
    page.args_addr = layout.args;
    page.args_len = args.len() as u32;
    page.argc = argc as u32;
    write(mem, layout.boot_page, page.as_bytes())
}

/// Random bits for the boot page's seed (0 if the kernel gives none, which
/// a guest must treat as "no seed").
pub fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: writes at most 8 bytes into `b`, which outlives the call.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_NONBLOCK) };
    if n == 8 {
        u64::from_le_bytes(b)
    } else {
        0
    }
}

/// Nanoseconds for `ticks` of a `tsc_khz` TSC, computed exactly as the
/// guest computes them (32.32 fixed point), so that a value the monitor
/// derives is never ahead of or behind the guest's own by rounding.
pub fn ticks_to_ns(ticks: u64, tsc_khz: u64) -> u64 {
    let fp = ((1_000_000u128 << 32) / tsc_khz.max(1) as u128) as u64;
    ((ticks as u128 * fp as u128) >> 32) as u64
}

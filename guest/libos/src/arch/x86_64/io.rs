//! Port I/O and the time-stamp counter. Ports are reachable from CPL3 only
//! where the TSS I/O bitmap allows them (see `wisp_abi::x86`).

use core::arch::asm;

/// Writes a 32-bit value to `port`.
#[inline(always)]
pub fn out32(port: u16, value: u32) {
    // SAFETY: `out` touches no memory Rust knows about; the monitor may read
    // guest memory named by `value`, so this is not `nomem`: the compiler
    // must have stored any argument block before the instruction.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags))
    }
}

/// Writes a byte to `port`.
#[inline(always)]
pub fn out8(port: u16, value: u8) {
    // SAFETY: as for `out32`; a device port write has no effect on Rust memory.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from `port`.
#[inline(always)]
pub fn in8(port: u16) -> u8 {
    let v: u8;
    // SAFETY: a port read has no effect on Rust memory.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Reads 32 bits from `port`.
#[inline(always)]
pub fn in32(port: u16) -> u32 {
    let v: u32;
    // SAFETY: a port read has no effect on Rust memory.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// The time-stamp counter (native at CPL3: ~30 ns on KVM PVM).
#[inline(always)]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: `rdtsc` only reads the counter into edx:eax.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    ((hi as u64) << 32) | lo as u64
}

/// Spin-loop hint.
#[inline(always)]
pub fn pause() {
    core::hint::spin_loop();
}

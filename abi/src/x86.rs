//! x86-64 boot structures shared by the Wisp monitor (which builds them in
//! guest memory) and the guest's PVH stub (which builds them for QEMU).
//!
//! The guest's Rust code runs at CPL3 (see docs/design.md: on KVM PVM CPL0 code is
//! emulated). The GDT uses Linux's layout so the user selectors are the
//! familiar 0x33 (code) and 0x2b (data); the TSS carries the IST stack for
//! exceptions and an I/O permission bitmap that lets CPL3 reach exactly the
//! ports it needs.

/// Kernel 32-bit code selector: the PVH entry's protected-mode code, before
/// long mode (the loader's own selectors are not promised).
pub const KERNEL32_CS: u16 = 0x08;
/// Kernel 64-bit code selector (only the PVH stub runs there).
pub const KERNEL_CS: u16 = 0x10;
/// Kernel data selector.
pub const KERNEL_DS: u16 = 0x18;
/// User data selector, RPL 3.
pub const USER_DS: u16 = 0x2b;
/// User 64-bit code selector, RPL 3.
pub const USER_CS: u16 = 0x33;
/// TSS selector (a 16-byte descriptor in entries 8 and 9).
pub const TSS_SEL: u16 = 0x40;

/// GDT entries 0..8; the TSS descriptor (entries 8, 9) depends on the TSS
/// address and comes from [`tss_descriptor`]. Accessed bits are preset so
/// the CPU never writes to the GDT, which is mapped read-only.
pub const GDT_FIXED: [u64; 8] = [
    0,
    0x00cf_9b00_0000_ffff, // 0x08 kernel code, 32-bit (PVH entry)
    0x00af_9b00_0000_ffff, // 0x10 kernel code, 64-bit
    0x00cf_9300_0000_ffff, // 0x18 kernel data
    0x00cf_fb00_0000_ffff, // 0x23 user code, 32-bit (unused, Linux layout)
    0x00cf_f300_0000_ffff, // 0x2b user data
    0x00af_fb00_0000_ffff, // 0x33 user code, 64-bit
    0,
];
/// Number of GDT entries including the 16-byte TSS descriptor.
pub const GDT_ENTRIES: usize = 10;

/// The two GDT words of an available 64-bit TSS at `base` with `limit`.
pub const fn tss_descriptor(base: u64, limit: u32) -> [u64; 2] {
    let low = (limit as u64 & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40) // present, DPL0, type 9 (available 64-bit TSS)
        | (((limit as u64 >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    [low, base >> 32]
}

/// Size of the fixed part of a 64-bit TSS.
pub const TSS_HEADER: usize = 104;
/// The highest port any platform lets CPL3 use: the bitmap covers up to it;
/// ports beyond the TSS limit are denied by the CPU.
pub const IO_BITMAP_MAX_PORT: u16 = 0x507;
/// Bytes of I/O bitmap, plus the terminating 0xff byte the CPU requires.
pub const IO_BITMAP_LEN: usize = IO_BITMAP_MAX_PORT as usize / 8 + 2;
/// Total TSS size, header and bitmap.
pub const TSS_SIZE: usize = TSS_HEADER + IO_BITMAP_LEN;
/// Byte offset of RSP0 (the stack for a switch to CPL0) in the TSS.
pub const TSS_RSP0_OFFSET: usize = 4;
/// Byte offset of IST1 in the TSS.
pub const TSS_IST1_OFFSET: usize = 36;

/// Ports a guest on the Wisp monitor may use: the hypercalls. A 4-byte
/// `out` to port P is checked against the bits of P..P+3, so the range
/// extends 3 past the last hypercall port.
pub const WISP_PORTS: &[(u16, u16)] = &[(
    crate::hypercall::PORT_BASE,
    crate::hypercall::PORT_BASE + crate::hypercall::PORT_COUNT - 1 + 3,
)];
/// Ports a guest booted through PVH (QEMU microvm, Firecracker) may use:
/// COM1, the isa-debug-exit device (QEMU's exit), the i8042 command port
/// (Firecracker's exit: a reset), the PIT and port 0x61 (TSC calibration
/// where there is no kvmclock) and the CMOS clock (wall clock where there
/// is no kvmclock).
pub const PVH_PORTS: &[(u16, u16)] = &[
    (0x3f8, 0x3ff),
    (0xf4, 0xf7),
    (0x64, 0x64),
    (0x40, 0x43),
    (0x61, 0x61),
    (0x70, 0x71),
];

/// A TSS image with IST1 = `ist1` and an I/O bitmap allowing the inclusive
/// port ranges in `ports` (all within [`IO_BITMAP_MAX_PORT`]).
pub const fn tss_bytes(ist1: u64, ports: &[(u16, u16)]) -> [u8; TSS_SIZE] {
    let mut t = [0u8; TSS_SIZE];
    let ist = ist1.to_le_bytes();
    let mut i = 0;
    while i < 8 {
        t[TSS_IST1_OFFSET + i] = ist[i];
        i += 1;
    }
    let iomap = (TSS_HEADER as u16).to_le_bytes();
    t[102] = iomap[0];
    t[103] = iomap[1];
    let mut b = TSS_HEADER;
    while b < TSS_SIZE {
        t[b] = 0xff;
        b += 1;
    }
    let mut r = 0;
    while r < ports.len() {
        let (lo, hi) = ports[r];
        let mut p = lo;
        while p <= hi && p <= IO_BITMAP_MAX_PORT {
            t[TSS_HEADER + (p as usize / 8)] &= !(1u8 << (p % 8));
            p += 1;
        }
        r += 1;
    }
    t
}

/// Page-table entry bits.
pub mod pte {
    pub const PRESENT: u64 = 1 << 0;
    pub const WRITABLE: u64 = 1 << 1;
    pub const USER: u64 = 1 << 2;
    pub const ACCESSED: u64 = 1 << 5;
    pub const DIRTY: u64 = 1 << 6;
    /// 2 MiB page in a page directory.
    pub const HUGE: u64 = 1 << 7;
    pub const NO_EXECUTE: u64 = 1 << 63;
    /// Mask of the physical address in an entry.
    pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
}

/// Control-register and EFER bits used at entry.
pub mod cr {
    pub const CR0_PE: u64 = 1 << 0;
    pub const CR0_MP: u64 = 1 << 1;
    pub const CR0_ET: u64 = 1 << 4;
    pub const CR0_NE: u64 = 1 << 5;
    pub const CR0_WP: u64 = 1 << 16;
    pub const CR0_PG: u64 = 1 << 31;
    pub const CR4_PAE: u64 = 1 << 5;
    pub const CR4_OSFXSR: u64 = 1 << 9;
    pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
    pub const EFER_SCE: u64 = 1 << 0;
    pub const EFER_LME: u64 = 1 << 8;
    pub const EFER_LMA: u64 = 1 << 10;
    pub const EFER_NXE: u64 = 1 << 11;
    /// CR0 at entry to CPL3.
    pub const CR0: u64 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    /// CR4 at entry: PAE for long mode, SSE enabled.
    pub const CR4: u64 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    /// EFER at entry: long mode active, NX honoured.
    pub const EFER: u64 = EFER_LME | EFER_LMA | EFER_NXE;
}

/// Number of exception vectors the IDT covers.
pub const EXCEPTION_VECTORS: usize = 32;

/// An IDT entry: a DPL3 64-bit trap gate (type 0xF, so IF is never cleared;
/// see pvm-costs.md) to `handler` in the user code segment on IST1.
pub const fn trap_gate(handler: u64) -> [u64; 2] {
    gate(handler, USER_CS, 3, 1, true)
}

/// A 64-bit IDT entry to `handler` in code segment `selector`, callable by
/// `int` from privilege `dpl`, on IST stack `ist` (0: none); a trap gate
/// leaves IF alone, an interrupt gate clears it.
pub const fn gate(handler: u64, selector: u16, dpl: u8, ist: u8, trap: bool) -> [u64; 2] {
    let kind: u64 = if trap { 0xf } else { 0xe };
    let low = (handler & 0xffff)
        | ((selector as u64) << 16)
        | (((ist & 7) as u64) << 32)
        | ((0x80 | (((dpl & 3) as u64) << 5) | kind) << 40)
        | (((handler >> 16) & 0xffff) << 48);
    [low, handler >> 32]
}

/// What a page-fault error code says: the access and why it failed, in the
/// words both monitors' crash reports use.
pub fn page_fault_cause(error_code: u64) -> (&'static str, &'static str) {
    let access = if error_code & 0x2 != 0 {
        "write"
    } else if error_code & 0x10 != 0 {
        "instruction fetch"
    } else {
        "read"
    };
    let why = if error_code & 0x1 != 0 {
        "protection violation"
    } else {
        "page not mapped"
    };
    (access, why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_bitmap_allows_only_listed_ports() {
        let t = tss_bytes(0x1234, WISP_PORTS);
        let allowed = |p: u16| t[TSS_HEADER + p as usize / 8] & (1 << (p % 8)) == 0;
        // Every hypercall port, with the 3 ports a 4-byte access also covers.
        assert!((0x500..=0x507).all(allowed));
        assert!(!allowed(0x508) && !allowed(0x3f8) && !allowed(0x4ff));
        assert_eq!(t[TSS_SIZE - 1], 0xff);
        assert_eq!(u64::from_le_bytes(t[36..44].try_into().unwrap()), 0x1234);
    }

    #[test]
    fn gate_and_descriptor_encode_addresses() {
        let g = trap_gate(0x1234_5678_9abc_def0);
        assert_eq!(g[0] & 0xffff, 0xdef0);
        assert_eq!(g[0] >> 48, 0x9abc);
        assert_eq!(g[1], 0x1234_5678);
        assert_eq!(
            gate(0x1234_5678, KERNEL_CS, 3, 0, false),
            [0x1234_ee00_0010_5678, 0]
        );
        let d = tss_descriptor(0xdead_beef_1234, 0x1ff);
        assert_eq!(d[0] & 0xffff, 0x1ff);
        assert_eq!((d[0] >> 16) & 0xff_ffff, 0xef_1234);
        assert_eq!(d[0] >> 56, 0xbe);
        assert_eq!(d[1], 0xdead);
    }
}

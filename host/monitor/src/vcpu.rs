//! The vCPU's state at entry: long mode, paging on, CPL3 in the user code
//! segment, at the image's 64-bit entry with `rdi` = boot page. No CPL0
//! instruction ever runs on the Wisp monitor.

use kvm_bindings::{kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use wisp_abi::x86::{self, cr};

use crate::layout::Layout;

const MSR_IA32_TSC: u32 = 0x10;

fn segment(selector: u16, type_: u8, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db: if code { 0 } else { 1 },
        s: 1,
        l: if code { 1 } else { 0 },
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Sets the special registers (segments, descriptor tables, control
/// registers) for CPL3 long mode.
pub fn setup_sregs(vcpu: &VcpuFd, layout: &Layout) -> Result<(), kvm_ioctls::Error> {
    let sregs = sregs_for(vcpu.get_sregs()?, &SystemTables::of(layout));
    vcpu.set_sregs(&sregs)
}

/// Where the CPU's system structures are: what the special registers
/// depend on besides constants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SystemTables {
    pub pml4: u64,
    pub gdt: u64,
    pub idt: u64,
    pub tss: u64,
}

impl SystemTables {
    pub fn of(layout: &Layout) -> SystemTables {
        SystemTables {
            pml4: layout.pml4,
            gdt: layout.gdt,
            idt: layout.idt,
            tss: layout.tss,
        }
    }
}

/// `sregs` (the vCPU's own) set for CPL3 long mode with `t`.
pub fn sregs_for(mut sregs: kvm_sregs, t: &SystemTables) -> kvm_sregs {
    sregs.cs = segment(x86::USER_CS, 0xb, true);
    let data = segment(x86::USER_DS, 0x3, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: t.tss,
        limit: x86::TSS_SIZE as u32 - 1,
        selector: x86::TSS_SEL,
        type_: 0xb, // busy 64-bit TSS
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.ldt = kvm_segment {
        type_: 0x2,
        present: 1,
        unusable: 1,
        ..Default::default()
    };
    sregs.gdt.base = t.gdt;
    sregs.gdt.limit = (x86::GDT_ENTRIES * 8 - 1) as u16;
    sregs.idt.base = t.idt;
    sregs.idt.limit = (x86::EXCEPTION_VECTORS * 16 - 1) as u16;
    sregs.cr0 = cr::CR0;
    sregs.cr3 = t.pml4;
    sregs.cr4 = cr::CR4;
    sregs.efer = cr::EFER;
    sregs
}

/// Sets the general registers: entry point, stack, boot page.
pub fn setup_regs(
    vcpu: &VcpuFd,
    entry: u64,
    stack_top: u64,
    boot_page: u64,
) -> Result<(), kvm_ioctls::Error> {
    let regs = kvm_regs {
        rip: entry,
        rsp: stack_top,
        rdi: boot_page,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
}

/// The guest's TSC now (read through KVM, no guest exit), for the boot
/// page's clock reference.
pub fn guest_tsc(vcpu: &VcpuFd) -> Result<u64, kvm_ioctls::Error> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_TSC,
        ..Default::default()
    }])
    .map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?;
    vcpu.get_msrs(&mut msrs)?;
    Ok(msrs.as_slice()[0].data)
}

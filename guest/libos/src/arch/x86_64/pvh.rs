//! The PVH entry (QEMU microvm, Firecracker) and the little CPL0 code the
//! guest keeps on that path.
//!
//! A PVH loader enters `wisp_pvh_entry` in 32-bit protected mode at CPL0
//! with `ebx` = `hvm_start_info`, flat segments, paging off, and nothing
//! else promised (Firecracker enters with `rsp` = 0). CPL0 code is emulated
//! on KVM PVM (~0.36 µs an instruction, no SSE), so everything here is
//! short hand-written assembly that decides nothing: the policy (the memory
//! map, which interrupts, which clock) is chosen by Rust at CPL3 in
//! `platform::pvh` and carried out here.
//!
//! 1. **Entry** (32-bit): its own stack before the first push, known
//!    flags, the platform marked PVH (so every crash report goes to COM1),
//!    its own GDT and segments, then a 32-bit IDT whose every exception
//!    prints the vector on COM1 and exits: from here on no fault is silent.
//!    Then a *bootstrap* map (the first 2 MiB as one user page), the IDT
//!    (DPL3 trap gates to the CPL3 exception stubs on IST1), the TSS (I/O
//!    bitmap, IST1, RSP0), long mode, TPR 15 (no interrupt while at CPL3),
//!    and `iretq` to `wisp_start_pvh` at CPL3.
//! 2. **Services**, reached from CPL3 through `int3` at one known address
//!    (`wisp_pvh_call`) and a DPL3 interrupt gate into CPL0. Any other
//!    `int3` is passed on to the CPL3 breakpoint handler. The ways down
//!    from CPL3, measured here under QEMU on KVM PVM (200 round trips each,
//!    with a handler of a few instructions that `iretq`s back):
//!
//!    | way down | result |
//!    |---|---|
//!    | `int3` through a CPL0 gate | works, 15–20 µs |
//!    | `hlt` (#GP) through a CPL0 gate | works, 11–14 µs (but #GP is also how crashes look) |
//!    | `ud2` (#UD) through a CPL0 gate | works, ~21 µs |
//!    | far `call` through a DPL3 call gate | not delivered: #UD at the call |
//!    | `syscall` with LSTAR | lands at LSTAR still at CPL3 (CS 0x33), 0.5–8 ms |
//!    | `int N` | not delivered: #UD at the `int` |
//!    * `SETUP` (before `LOCKDOWN` only): applies the MSR writes the Rust
//!      start code listed in [`Lockdown`] (kvmclock, the x2APIC), so it can
//!      read the clock while it may still write its boot page.
//!    * `LOCKDOWN` (once): the Rust start code has built the final page
//!      tables (with `wisp_abi::memmap`, the code the Wisp monitor uses)
//!      and listed MMIO writes (the IOAPIC); this applies them and loads
//!      the tables. The bootstrap map, where the tables and this structure
//!      were writable, is gone; in the final map they are supervisor-only,
//!      and `SETUP` and `LOCKDOWN` are refused from then on.
//!    * `IDLE`: arms the LAPIC timer (a TSC deadline, or a one-shot count
//!      where KVM offers no deadline mode), `sti; hlt` until an interrupt,
//!      then back to CPL3: an idle guest costs no host CPU.
//!    * `HALT`: halts for good (the last resort of an exit).
//!    * `CPUID`: the hypervisor's answer. At CPL3 `cpuid` on KVM PVM is
//!      answered by the outer hypervisor, not by the VM's KVM (it reports a
//!      TSC-deadline timer this VM's LAPIC does not have); the emulated
//!      CPL0 `cpuid` gives the VM's own table.
//! 3. **Interrupts** (CPL0 interrupt gates): the timer and one vector per
//!    virtio device, which acknowledges the device's interrupt status (so
//!    its line can fire again) and the LAPIC (x2APIC EOI).
//! 4. **Page faults** go through a CPL0 gate that saves CR2 (a CPL3 handler
//!    cannot read it) and passes the fault on to the CPL3 handler, so crash
//!    reports under QEMU name the faulting address as on the Wisp monitor.

use wisp_abi::x86::{self, cr, pte};

/// `wisp_pvh_call` operations.
pub const SERVICE_LOCKDOWN: u64 = 1;
pub const SERVICE_IDLE: u64 = 2;
pub const SERVICE_HALT: u64 = 3;
pub const SERVICE_CPUID: u64 = 4;
pub const SERVICE_SETUP: u64 = 5;

/// Most MSR writes a [`Lockdown`] can carry.
pub const MAX_MSRS: usize = 12;
/// Most 32-bit MMIO writes a [`Lockdown`] can carry.
pub const MAX_MMIO_WRITES: usize = 40;
/// Most devices with an interrupt vector.
pub const MAX_IRQS: usize = 8;
/// Pages reserved for the final page tables.
pub const TABLE_PAGES: usize = 16;
/// Vector of the LAPIC timer.
pub const TIMER_VECTOR: u8 = 0x20;
/// Vector of the first device; device `i` has `IRQ_VECTOR_BASE + i`.
pub const IRQ_VECTOR_BASE: u8 = 0x30;
/// The LAPIC's spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// [`Lockdown::flags`]: the timer and interrupts are set up; `IDLE` halts.
pub const FLAG_IDLE: u64 = 1;
/// [`Lockdown::flags`]: the LAPIC timer is in TSC-deadline mode (`IDLE`'s
/// argument is a TSC value), else one-shot (a count of timer ticks).
pub const FLAG_TSC_DEADLINE: u64 = 2;

/// What `LOCKDOWN` applies, filled by the CPL3 start code while the
/// bootstrap map lets it (supervisor-only afterwards).
#[repr(C)]
pub struct Lockdown {
    /// Guest-physical address of the final PML4.
    pub cr3: u64,
    /// `FLAG_*`.
    pub flags: u64,
    pub msr_count: u64,
    /// (MSR index, value), written in order before CR3 is loaded.
    pub msrs: [[u64; 2]; MAX_MSRS],
    pub mmio_count: u64,
    /// (address, 32-bit value), written in order after CR3 is loaded.
    pub mmio: [[u64; 2]; MAX_MMIO_WRITES],
    /// Register window of the device on vector `IRQ_VECTOR_BASE + i` (0:
    /// none), whose interrupt status the handler acknowledges.
    pub irq_windows: [u64; MAX_IRQS],
}

extern "C" {
    /// The final page tables (`TABLE_PAGES` pages, in the image's system
    /// segment).
    pub static mut wisp_pvh_tables: [[u64; 512]; TABLE_PAGES];
    /// The IDT (256 gates).
    pub static mut wisp_pvh_idt: [[u64; 2]; 256];
    /// What `LOCKDOWN` applies.
    pub static mut wisp_pvh_lockdown: Lockdown;
    /// CR2 at the last page fault.
    pub static wisp_pvh_cr2: u64;
    /// Handlers of the timer, devices 0..8 and the spurious vector.
    pub static wisp_pvh_irq_handlers: [u64; 2 + MAX_IRQS];
    /// Bounds of the system segment (GDT, TSS, IDT, tables, CPL0 stack,
    /// then the boot page and arguments).
    pub static __data_end: u8;
    pub static __pvh_boot_start: u8;
    pub static __pvh_sys_end: u8;
    /// One service call: `int3` at a known address.
    fn wisp_pvh_call(op: u64, arg: u64) -> u128;
}

/// Calls the CPL0 service `op` with `arg`; returns 0 on success, `u64::MAX`
/// if refused.
pub fn call(op: u64, arg: u64) -> u64 {
    // SAFETY: `wisp_pvh_call` follows the C ABI: it clobbers only
    // caller-saved registers (the CPL0 handler uses rax, rcx, rdx, r8-r11)
    // and touches no memory Rust owns except what `op` documents.
    unsafe { wisp_pvh_call(op, arg) as u64 }
}

/// `cpuid` as the VM's KVM answers it: (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    // SAFETY: as for `call`; CPUID returns eax | ebx << 32 in rax and
    // ecx | edx << 32 in rdx.
    let v = unsafe { wisp_pvh_call(SERVICE_CPUID, leaf as u64) };
    let (lo, hi) = (v as u64, (v >> 64) as u64);
    (lo as u32, (lo >> 32) as u32, hi as u32, (hi >> 32) as u32)
}

/// GDT used on the PVH path; the TSS descriptor (entries 8 and 9) is filled
/// by the stub. Supervisor-only once locked down.
#[no_mangle]
#[link_section = ".pvh_data"]
static mut WISP_PVH_GDT: [u64; x86::GDT_ENTRIES] = {
    let mut g = [0u64; x86::GDT_ENTRIES];
    let mut i = 0;
    while i < x86::GDT_FIXED.len() {
        g[i] = x86::GDT_FIXED[i];
        i += 1;
    }
    g
};

/// TSS (with the PVH ports' I/O bitmap) used on the PVH path; IST1 and
/// RSP0 are filled by the stub.
#[no_mangle]
#[link_section = ".pvh_data"]
static mut WISP_PVH_TSS: [u8; x86::TSS_SIZE] = x86::tss_bytes(0, x86::PVH_PORTS);

core::arch::global_asm!(
    r#"
    .section .text.wisp_pvh, "ax"
    .code32
    .global wisp_pvh_entry
    .type wisp_pvh_entry, @function
wisp_pvh_entry:
    cli
    mov $.Lpvh_kstack_top, %esp
    pushl $2
    popfl
    movl ${PLATFORM_PVH}, WISP_PLATFORM
    lgdt .Lpvh_gdt_ptr
    ljmp ${KERNEL32_CS}, $1f
1:  mov ${KERNEL_DS}, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs

    /* Early IDT: vector v -> the 8-byte stub at .Lpvh_early_stubs + 8v. */
    mov $.Lpvh_early_stubs, %eax
    xor %ecx, %ecx
2:  mov %eax, %edx
    and $0xffff, %edx
    or $({KERNEL32_CS} << 16), %edx
    mov %edx, .Lpvh_early_idt(,%ecx,8)
    mov %eax, %edx
    and $0xffff0000, %edx
    or $0x8e00, %edx
    mov %edx, .Lpvh_early_idt+4(,%ecx,8)
    add $8, %eax
    inc %ecx
    cmp $32, %ecx
    jne 2b
    lidt .Lpvh_early_idt_ptr

    /* Mask the legacy PIC: its interrupts (ExtINT) ignore the TPR. */
    mov $0xff, %al
    out %al, $0x21
    out %al, $0xa1

    /* Bootstrap map: 0-2 MiB as one user read-write-execute page, where
       the CPL3 start code builds the final tables. */
    movl $(.Lpvh_boot_pdpt + {TABLE}), .Lpvh_boot_pml4
    movl $(.Lpvh_boot_pd + {TABLE}), .Lpvh_boot_pdpt
    movl ${BOOT_PAGE}, .Lpvh_boot_pd

    /* IDT: a DPL3 trap gate on IST1 to each CPL3 exception stub ... */
    xor %ecx, %ecx
    mov $wisp_pvh_idt, %edi
3:  mov wisp_exception_vectors(,%ecx,8), %eax
    mov %eax, %edx
    and $0xffff, %edx
    or $({USER_CS} << 16), %edx
    mov %edx, (%edi)
    mov %eax, %edx
    and $0xffff0000, %edx
    or $0xef01, %edx
    mov %edx, 4(%edi)
    add $16, %edi
    inc %ecx
    cmp $32, %ecx
    jne 3b
    /* ... but #BP (the services) and #PF (to save CR2) enter CPL0 first:
       DPL3 interrupt gates in the kernel code segment, on RSP0. */
    mov $.Lpvh_service, %eax
    mov %eax, %edx
    and $0xffff, %edx
    or $({KERNEL_CS} << 16), %edx
    mov %edx, wisp_pvh_idt+3*16
    and $0xffff0000, %eax
    or $0xee00, %eax
    mov %eax, wisp_pvh_idt+3*16+4
    mov $.Lpvh_page_fault, %eax
    mov %eax, %edx
    and $0xffff, %edx
    or $({KERNEL_CS} << 16), %edx
    mov %edx, wisp_pvh_idt+14*16
    and $0xffff0000, %eax
    or $0xee00, %eax
    mov %eax, wisp_pvh_idt+14*16+4

    /* TSS descriptor (GDT entries 8, 9), IST1 and RSP0. */
    mov $WISP_PVH_TSS, %eax
    mov %eax, %edx
    shl $16, %edx
    or ${TSS_LIMIT}, %edx
    mov %edx, WISP_PVH_GDT+64
    mov %eax, %edx
    shr $16, %edx
    and $0xff, %edx
    or $0x8900, %edx
    mov %eax, %ecx
    and $0xff000000, %ecx
    or %ecx, %edx
    mov %edx, WISP_PVH_GDT+68
    movl $__ist_top, WISP_PVH_TSS+{IST1}
    movl $.Lpvh_kstack_top, WISP_PVH_TSS+{RSP0}

    /* Long mode, every control register written whole. */
    mov ${CR4}, %eax
    mov %eax, %cr4
    mov $.Lpvh_boot_pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx
    mov ${EFER}, %eax
    xor %edx, %edx
    wrmsr
    mov ${CR0_NOWP}, %eax
    mov %eax, %cr0
    ljmp ${KERNEL_CS}, $4f

    .code64
4:  mov ${KERNEL_DS}, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov ${TSS_SEL}, %eax
    ltr %ax
    lidt .Lpvh_idt_ptr
    /* TPR 15: no maskable interrupt reaches CPL3; IDLE lowers it. */
    mov $15, %eax
    mov %rax, %cr8
    /* Write-protect from here on; the TSS busy bit is already set. */
    mov %cr0, %rax
    or ${CR0_WP}, %eax
    mov %rax, %cr0
    mov %ebx, %edi
    pushq ${USER_DS}
    pushq $__stack_top
    pushq $2
    pushq ${USER_CS}
    pushq $.Lpvh_user
    iretq

.Lpvh_user:
    mov ${USER_DS}, %eax
    mov %eax, %ds
    mov %eax, %es
    xor %ebp, %ebp
    call wisp_start_pvh
    ud2

    /* A service call from CPL3: op in rdi, argument in rsi, result in rax. */
    .global wisp_pvh_call
    .type wisp_pvh_call, @function
wisp_pvh_call:
    int3
.Lpvh_call_return:
    ret

    /* CPL0, IF clear, on the CPL0 stack: rip, cs, rflags, rsp, ss. */
.Lpvh_service:
    cmpq $.Lpvh_call_return, (%rsp)
    jne .Lpvh_breakpoint
    cmp ${IDLE}, %rdi
    je 20f
    cmp ${LOCKDOWN}, %rdi
    je 30f
    cmp ${HALT}, %rdi
    je .Lpvh_halt
    cmp ${CPUID}, %rdi
    je 40f
    cmp ${SETUP}, %rdi
    je 50f
29: mov $-1, %rax
    iretq

    /* IDLE: halt until an interrupt or the timer (rsi: a TSC deadline,
       or a one-shot count). */
20: testb ${FLAG_IDLE}, wisp_pvh_lockdown+{FLAGS}
    jz 29b
    mov $0x6e0, %r8d
    testb ${FLAG_TSC_DEADLINE}, wisp_pvh_lockdown+{FLAGS}
    jnz 21f
    mov $0x838, %r8d
21: mov %r8d, %ecx
    mov %esi, %eax
    mov %rsi, %rdx
    shr $32, %rdx
    wrmsr
    xor %eax, %eax
    mov %rax, %cr8
    sti
    hlt
    cli
    mov $15, %eax
    mov %rax, %cr8
    mov %r8d, %ecx
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
    iretq

    /* CPUID: leaf esi, subleaf 0. */
40: push %rbx
    mov %esi, %eax
    xor %ecx, %ecx
    cpuid
    shl $32, %rbx
    or %rbx, %rax
    shl $32, %rdx
    or %rcx, %rdx
    pop %rbx
    iretq

    /* SETUP, before LOCKDOWN only: the MSR writes listed so far. */
50: cmpb $0, .Lpvh_locked
    jne 29b
    call .Lpvh_apply_msrs
    xor %eax, %eax
    iretq

    /* LOCKDOWN, once: MSR writes, the final tables, MMIO writes. */
30: cmpb $0, .Lpvh_locked
    jne 29b
    movb $1, .Lpvh_locked
    call .Lpvh_apply_msrs
    mov $wisp_pvh_lockdown, %r8d
    mov {CR3}(%r8), %rax
    mov %rax, %cr3
    mov {MMIO_COUNT}(%r8), %r9
    cmp ${MAX_MMIO}, %r9
    jbe 34f
    mov ${MAX_MMIO}, %r9d
34: lea {MMIO}(%r8), %r10
35: test %r9, %r9
    jz 36f
    mov (%r10), %r11
    mov 8(%r10), %eax
    movl %eax, (%r11)
    add $16, %r10
    dec %r9
    jmp 35b
36: xor %eax, %eax
    iretq

    /* The listed MSR writes, in order; the list is emptied. */
.Lpvh_apply_msrs:
    mov $wisp_pvh_lockdown, %r8d
    mov {MSR_COUNT}(%r8), %r9
    movq $0, {MSR_COUNT}(%r8)
    cmp ${MAX_MSRS}, %r9
    jbe 31f
    mov ${MAX_MSRS}, %r9d
31: lea {MSRS}(%r8), %r10
32: test %r9, %r9
    jz 33f
    mov (%r10), %ecx
    mov 8(%r10), %eax
    mov 12(%r10), %edx
    wrmsr
    add $16, %r10
    dec %r9
    jmp 32b
33: ret

    /* HALT: for good, at no host CPU cost. */
.Lpvh_halt:
    cli
1:  hlt
    jmp 1b

    /* Any other int3: pass it on to the CPL3 handler as the CPU would
       through a DPL3 trap gate on IST1. */
.Lpvh_breakpoint:
    push %rax
    push %rcx
    mov $(__ist_top - 40), %rcx
    mov 16(%rsp), %rax
    mov %rax, (%rcx)
    mov 24(%rsp), %rax
    mov %rax, 8(%rcx)
    mov 32(%rsp), %rax
    mov %rax, 16(%rcx)
    mov 40(%rsp), %rax
    mov %rax, 24(%rcx)
    mov 48(%rsp), %rax
    mov %rax, 32(%rcx)
    mov wisp_exception_vectors+3*8, %rax
    mov %rax, 16(%rsp)
    movq ${USER_CS}, 24(%rsp)
    movq $2, 32(%rsp)
    mov %rcx, 40(%rsp)
    movq ${USER_DS}, 48(%rsp)
    pop %rcx
    pop %rax
    iretq

    /* #PF: save CR2, then pass the fault (error code first) on to the CPL3
       handler the same way. */
.Lpvh_page_fault:
    push %rax
    push %rcx
    mov %cr2, %rax
    mov %rax, wisp_pvh_cr2
    mov $(__ist_top - 48), %rcx
    mov 16(%rsp), %rax
    mov %rax, (%rcx)
    mov 24(%rsp), %rax
    mov %rax, 8(%rcx)
    mov 32(%rsp), %rax
    mov %rax, 16(%rcx)
    mov 40(%rsp), %rax
    mov %rax, 24(%rcx)
    mov 48(%rsp), %rax
    mov %rax, 32(%rcx)
    mov 56(%rsp), %rax
    mov %rax, 40(%rcx)
    mov wisp_exception_vectors+14*8, %rax
    mov %rax, 24(%rsp)
    movq ${USER_CS}, 32(%rsp)
    movq $2, 40(%rsp)
    mov %rcx, 48(%rsp)
    movq ${USER_DS}, 56(%rsp)
    pop %rcx
    pop %rax
    add $8, %rsp
    iretq

    /* Interrupts: acknowledge the device (its line may fire again), then
       the LAPIC. */
.Lpvh_irq_timer:
    push %rax
    push %rcx
    push %rdx
    jmp .Lpvh_eoi
    .irp i, 0,1,2,3,4,5,6,7
.Lpvh_irq_\i:
    push %rax
    push %rcx
    push %rdx
    mov wisp_pvh_lockdown+{IRQ_WINDOWS}+8*\i, %rdx
    jmp .Lpvh_irq_ack
    .endr
.Lpvh_irq_ack:
    test %rdx, %rdx
    jz .Lpvh_eoi
    movl 0x60(%rdx), %eax
    movl %eax, 0x64(%rdx)
.Lpvh_eoi:
    mov $0x80b, %ecx
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
    pop %rdx
    pop %rcx
    pop %rax
    iretq
.Lpvh_irq_spurious:
    iretq

    /* Early faults (32-bit, before long mode): vector v's stub pushes v. */
    .code32
    .balign 8
.Lpvh_early_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 8
    push $\v
    jmp .Lpvh_early_fault
    .endr
.Lpvh_early_fault:
    mov $.Lpvh_early_msg, %esi
    call .Lpvh_puts
    pop %ebx
    mov %ebx, %eax
    shr $4, %eax
    call .Lpvh_hex
    mov %ebx, %eax
    call .Lpvh_hex
    mov $.Lpvh_early_msg_end, %esi
    call .Lpvh_puts
    mov ${CRASH}, %eax
    mov $0xf4, %dx
    out %eax, %dx
    mov $0xfe, %al
    out %al, $0x64
5:  cli
    hlt
    jmp 5b
.Lpvh_puts:
    mov $0x3f8, %dx
6:  lodsb
    test %al, %al
    jz 7f
    out %al, %dx
    jmp 6b
7:  ret
.Lpvh_hex:
    and $0xf, %eax
    add $0x30, %al
    cmp $0x3a, %al
    jb 8f
    add $0x27, %al
8:  mov $0x3f8, %dx
    out %al, %dx
    ret
    .code64

    .section .rodata.wisp_pvh, "a"
    .balign 8
.Lpvh_gdt_ptr:
    .word {GDT_LIMIT}
    .quad WISP_PVH_GDT
    .balign 8
.Lpvh_idt_ptr:
    .word 256 * 16 - 1
    .quad wisp_pvh_idt
    .balign 8
.Lpvh_early_idt_ptr:
    .word 32 * 8 - 1
    .quad .Lpvh_early_idt
    .balign 8
    .global wisp_pvh_irq_handlers
wisp_pvh_irq_handlers:
    .quad .Lpvh_irq_timer
    .quad .Lpvh_irq_0, .Lpvh_irq_1, .Lpvh_irq_2, .Lpvh_irq_3
    .quad .Lpvh_irq_4, .Lpvh_irq_5, .Lpvh_irq_6, .Lpvh_irq_7
    .quad .Lpvh_irq_spurious
.Lpvh_early_msg:
    .asciz "\nwisp: guest crashed in the PVH entry: exception vector 0x"
.Lpvh_early_msg_end:
    .asciz "\nwisp: exit status 139\n"

    .section .bss.wisp_pvh, "aw", @nobits
    .balign 8
    .global wisp_pvh_cr2
wisp_pvh_cr2: .skip 8

    /* The system segment: supervisor-only in the final map. */
    .section .pvh_bss, "aw", @nobits
    .balign 4096
.Lpvh_boot_pml4: .skip 4096
.Lpvh_boot_pdpt: .skip 4096
.Lpvh_boot_pd:   .skip 4096
    .global wisp_pvh_tables
wisp_pvh_tables:    .skip {TABLE_PAGES} * 4096
    .global wisp_pvh_idt
wisp_pvh_idt:       .skip 256 * 16
.Lpvh_kstack:    .skip 4096
.Lpvh_kstack_top:
    .balign 8
    .global wisp_pvh_lockdown
wisp_pvh_lockdown:  .skip {LOCKDOWN_SIZE}
.Lpvh_locked:    .skip 8
.Lpvh_early_idt: .skip 32 * 8

    /* PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY = 18). */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad wisp_pvh_entry
    .balign 4
    .text
"#,
    PLATFORM_PVH = const wisp_abi::boot::PLATFORM_PVH,
    CRASH = const wisp_abi::exit::CRASH as u32,
    TABLE = const pte::PRESENT | pte::WRITABLE | pte::USER,
    BOOT_PAGE = const pte::PRESENT | pte::WRITABLE | pte::USER | pte::HUGE,
    TSS_LIMIT = const x86::TSS_SIZE - 1,
    IST1 = const x86::TSS_IST1_OFFSET,
    RSP0 = const x86::TSS_RSP0_OFFSET,
    USER_CS = const x86::USER_CS,
    USER_DS = const x86::USER_DS,
    KERNEL32_CS = const x86::KERNEL32_CS,
    KERNEL_CS = const x86::KERNEL_CS,
    KERNEL_DS = const x86::KERNEL_DS,
    TSS_SEL = const x86::TSS_SEL,
    GDT_LIMIT = const x86::GDT_ENTRIES * 8 - 1,
    CR4 = const cr::CR4,
    EFER = const cr::EFER_LME | cr::EFER_NXE,
    CR0_NOWP = const cr::CR0 & !cr::CR0_WP,
    CR0_WP = const cr::CR0_WP,
    IDLE = const SERVICE_IDLE,
    LOCKDOWN = const SERVICE_LOCKDOWN,
    HALT = const SERVICE_HALT,
    FLAG_IDLE = const FLAG_IDLE,
    FLAG_TSC_DEADLINE = const FLAG_TSC_DEADLINE,
    CPUID = const SERVICE_CPUID,
    SETUP = const SERVICE_SETUP,
    FLAGS = const core::mem::offset_of!(Lockdown, flags),
    CR3 = const core::mem::offset_of!(Lockdown, cr3),
    MSR_COUNT = const core::mem::offset_of!(Lockdown, msr_count),
    MSRS = const core::mem::offset_of!(Lockdown, msrs),
    MAX_MSRS = const MAX_MSRS,
    MMIO_COUNT = const core::mem::offset_of!(Lockdown, mmio_count),
    MMIO = const core::mem::offset_of!(Lockdown, mmio),
    MAX_MMIO = const MAX_MMIO_WRITES,
    IRQ_WINDOWS = const core::mem::offset_of!(Lockdown, irq_windows),
    LOCKDOWN_SIZE = const core::mem::size_of::<Lockdown>(),
    TABLE_PAGES = const TABLE_PAGES,
    options(att_syntax),
);

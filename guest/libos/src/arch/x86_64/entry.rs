//! The two entry points of every Wisp image, the exception stubs and the
//! structures the PVH stub needs.
//!
//! * `wisp_entry64` (the ELF entry): the Wisp monitor enters it directly in
//!   long mode at CPL3, with `rdi` = boot page and `rsp` = top of the main
//!   stack; page tables, GDT, IDT and TSS were built by the monitor.
//! * `wisp_pvh_entry` (the Xen PVH note): QEMU microvm and Firecracker enter
//!   it in 32-bit protected mode at CPL0 with `ebx` = `hvm_start_info`. This
//!   is the only CPL0 code (emulated on KVM PVM, ~0.36 µs per instruction, no
//!   SSE), so it is short hand-written assembly: it builds 4 KiB-granular
//!   page tables for the first 2 MiB (text RX, rodata R, data RW+NX, guard
//!   pages unmapped, its own tables and GDT/IDT/TSS supervisor-only) and
//!   2 MiB pages up to 1 GiB, fills the IDT from the same vector table the
//!   Wisp monitor uses, enters long mode, loads TR and IDT, and `iretq`s to
//!   CPL3, where Rust reads the start info (`platform::pvh`).

use wisp_abi::x86::{self, cr, pte};

/// Bytes of `hvm_start_info` (version 1) the stub copies.
pub const START_INFO_SIZE: usize = 56;
/// Most PVH memory-map entries the stub copies.
pub const MEMMAP_MAX: usize = 32;

/// GDT used on the PVH path; the TSS descriptor (entries 8 and 9) is filled
/// by the stub. Supervisor-only once paging is on.
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

/// TSS (with I/O bitmap for COM1, isa-debug-exit, PIT and CMOS) used on the
/// PVH path; IST1 is filled by the stub.
#[no_mangle]
#[link_section = ".pvh_data"]
static mut WISP_PVH_TSS: [u8; x86::TSS_SIZE] = x86::tss_bytes(0, x86::PVH_PORTS);

core::arch::global_asm!(
    r#"
    .section .text.wisp_entry, "ax"
    .global wisp_entry64
    .type wisp_entry64, @function
wisp_entry64:
    xor %ebp, %ebp
    call wisp_start_wisp
    ud2

    .code32
    .global wisp_pvh_entry
    .type wisp_pvh_entry, @function
wisp_pvh_entry:
    cli
    cld

    /* Copy the start info and its memory map into the image while paging
       is off: loaders put them anywhere in low memory, page 0 included,
       which stays unmapped once paging is on. */
    mov %ebx, %esi
    mov $wisp_pvh_start_info, %edi
    mov ${START_INFO_WORDS}, %ecx
    rep movsl
    mov 48(%ebx), %ecx
    cmp ${MEMMAP_MAX}, %ecx
    jbe 10f
    mov ${MEMMAP_MAX}, %ecx
10: imul $6, %ecx
    mov 40(%ebx), %esi
    mov $wisp_pvh_memmap, %edi
    rep movsl
    mov $wisp_pvh_start_info, %esi

    /* Mask the legacy PIC: at CPL3 IF is always 1. */
    mov $0xff, %al
    out %al, $0x21
    out %al, $0xa1

    /* PML4[0] -> PDPT -> PD; PD[0] -> PT0. */
    movl $(wisp_pvh_pdpt + {TABLE}), wisp_pvh_pml4
    movl $(wisp_pvh_pd + {TABLE}), wisp_pvh_pdpt
    movl $(wisp_pvh_pt0 + {TABLE}), wisp_pvh_pd

    /* PDPT[3] -> PD3: the 3-4 GiB device window (virtio-mmio), 2 MiB
       user RW NX uncached pages. */
    movl $(wisp_pvh_pd3 + {TABLE}), wisp_pvh_pdpt + 24
    xor %ecx, %ecx
11: mov %ecx, %eax
    shl $21, %eax
    add $0xc0000000, %eax
    or ${MMIO}, %eax
    mov %eax, wisp_pvh_pd3(,%ecx,8)
    movl ${NX_HI}, wisp_pvh_pd3+4(,%ecx,8)
    inc %ecx
    cmp $512, %ecx
    jne 11b

    /* PD[1..512]: 2 MiB user RW NX pages (1 GiB identity map). */
    mov $1, %ecx
1:  mov %ecx, %eax
    shl $21, %eax
    or ${HUGE}, %eax
    mov %eax, wisp_pvh_pd(,%ecx,8)
    movl ${NX_HI}, wisp_pvh_pd+4(,%ecx,8)
    inc %ecx
    cmp $512, %ecx
    jne 1b

    /* PT0: 4 KiB pages for 0..2 MiB, permissions from the image layout. */
    xor %ecx, %ecx
2:  mov %ecx, %eax
    shl $12, %eax
    mov ${NX_HI}, %ebp
    mov ${DATA}, %edx
    test %ecx, %ecx
    jz 8f
    cmp $__image_start, %eax
    jb 9f
    cmp $__image_end, %eax
    jae 9f
    cmp $__text_end, %eax
    jb 5f
    cmp $__rodata_end, %eax
    jb 6f
    cmp $__data_end, %eax
    jb 9f
    cmp $__pvh_sys_end, %eax
    jb 7f
    cmp $__stack_bottom, %eax
    jb 8f
    cmp $__stack_top, %eax
    jb 9f
    cmp $__ist_bottom, %eax
    jb 8f
    jmp 9f
5:  mov ${TEXT}, %edx
    xor %ebp, %ebp
    jmp 9f
6:  mov ${RODATA}, %edx
    jmp 9f
7:  mov ${SYS}, %edx
    jmp 9f
8:  xor %eax, %eax
    xor %edx, %edx
    xor %ebp, %ebp
9:  or %edx, %eax
    mov %eax, wisp_pvh_pt0(,%ecx,8)
    mov %ebp, wisp_pvh_pt0+4(,%ecx,8)
    inc %ecx
    cmp $512, %ecx
    jne 2b

    /* TSS descriptor (GDT entries 8, 9) and IST1. */
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

    /* IDT: a DPL3 trap gate on IST1 to each CPL3 exception stub. */
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
    mov wisp_exception_vectors+4(,%ecx,8), %eax
    mov %eax, 8(%edi)
    add $16, %edi
    inc %ecx
    cmp $32, %ecx
    jne 3b

    lgdt wisp_pvh_gdt_ptr
    mov ${CR4}, %eax
    mov %eax, %cr4
    mov $wisp_pvh_pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx
    rdmsr
    or ${EFER}, %eax
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
    lidt wisp_pvh_idt_ptr
    /* Write-protect from here on; the TSS busy bit is already set. */
    mov %cr0, %rax
    or ${CR0_WP}, %eax
    mov %rax, %cr0
    mov %esi, %edi
    pushq ${USER_DS}
    pushq $__stack_top
    pushq $2
    pushq ${USER_CS}
    pushq $wisp_pvh_user
    iretq

wisp_pvh_user:
    mov ${USER_DS}, %eax
    mov %eax, %ds
    mov %eax, %es
    xor %ebp, %ebp
    call wisp_start_pvh
    ud2

    .section .rodata.wisp_pvh, "a"
    .balign 8
wisp_pvh_gdt_ptr:
    .word {GDT_LIMIT}
    .quad WISP_PVH_GDT
    .balign 8
wisp_pvh_idt_ptr:
    .word 32 * 16 - 1
    .quad wisp_pvh_idt

    .section .bss.wisp_pvh, "aw", @nobits
    .balign 8
    .global wisp_pvh_start_info
wisp_pvh_start_info: .skip {START_INFO_WORDS} * 4
    .global wisp_pvh_memmap
wisp_pvh_memmap: .skip {MEMMAP_MAX} * 24

    .section .pvh_bss, "aw", @nobits
    .balign 4096
wisp_pvh_pml4: .skip 4096
wisp_pvh_pdpt: .skip 4096
wisp_pvh_pd:   .skip 4096
wisp_pvh_pt0:  .skip 4096
wisp_pvh_pd3:  .skip 4096
wisp_pvh_idt:  .skip 32 * 16

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

    /* Exception stubs: push a zero error code where the CPU pushes none,
       then the vector, and join the common path. */
    .section .text.wisp_exceptions, "ax"
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
wisp_exc_\v:
    .if (\v == 8) || (\v == 10) || (\v == 11) || (\v == 12) || (\v == 13) || (\v == 14) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
    .else
    pushq $0
    .endif
    pushq $\v
    jmp wisp_exc_common
    .endr

wisp_exc_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    cld
    call wisp_exception
    ud2

    .section .rodata.wisp_vectors, "a"
    .balign 8
    .global wisp_exception_vectors
wisp_exception_vectors:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad wisp_exc_\v
    .endr
    .text
"#,
    START_INFO_WORDS = const START_INFO_SIZE / 4,
    MEMMAP_MAX = const MEMMAP_MAX,
    TABLE = const pte::PRESENT | pte::WRITABLE | pte::USER,
    HUGE = const pte::PRESENT | pte::WRITABLE | pte::USER | pte::HUGE,
    MMIO = const pte::PRESENT | pte::WRITABLE | pte::USER | pte::HUGE | (1 << 3) | (1 << 4),
    NX_HI = const (pte::NO_EXECUTE >> 32),
    DATA = const pte::PRESENT | pte::WRITABLE | pte::USER,
    TEXT = const pte::PRESENT | pte::USER,
    RODATA = const pte::PRESENT | pte::USER,
    SYS = const pte::PRESENT | pte::WRITABLE,
    TSS_LIMIT = const x86::TSS_SIZE - 1,
    IST1 = const x86::TSS_IST1_OFFSET,
    USER_CS = const x86::USER_CS,
    USER_DS = const x86::USER_DS,
    KERNEL_CS = const x86::KERNEL_CS,
    KERNEL_DS = const x86::KERNEL_DS,
    TSS_SEL = const x86::TSS_SEL,
    GDT_LIMIT = const x86::GDT_ENTRIES * 8 - 1,
    CR4 = const cr::CR4,
    EFER = const cr::EFER_LME | cr::EFER_NXE,
    CR0_NOWP = const cr::CR0 & !cr::CR0_WP,
    CR0_WP = const cr::CR0_WP,
    options(att_syntax),
);

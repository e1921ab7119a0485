//! The Wisp monitor's entry point and the exception stubs every platform
//! uses.
//!
//! * `wisp_entry64` (the ELF entry): the Wisp monitor enters it directly in
//!   long mode at CPL3, with `rdi` = boot page and `rsp` = top of the main
//!   stack; page tables, GDT, IDT and TSS were built by the monitor.
//! * The PVH entry (QEMU microvm, Firecracker) is in [`super::pvh`].
//!
//! The exception stubs run at CPL3 on the IST1 stack (DPL3 trap gates) and
//! hand a uniform frame to [`super::exceptions`].

core::arch::global_asm!(
    r#"
    .section .text.wisp_entry, "ax"
    .global wisp_entry64
    .type wisp_entry64, @function
wisp_entry64:
    xor %ebp, %ebp
    call wisp_start_wisp
    ud2

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
    options(att_syntax),
);

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Multiboot v1 entry for the test guests: 32-bit protected mode -> long mode.
 *
 * The BSP (EAX = 0x2BADB002) identity-maps the first 4 GiB with 2 MiB pages
 * using plain stores in a loop (never rep stos: bulk ring-0 stores jam KVM's
 * dirty ring on PVM hosts) and calls kmain(0), which maps the rest of RAM and
 * then sets boot_ready. APs (EAX = 0x44524150, EBX = index, dirtyrep-vmm only)
 * spin until boot_ready, then take the same path on their own stack.
 */
#include "layout.h"

#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003 /* page-align modules, memory info */

        .section .multiboot, "a"
        .align 4
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)

        .section .text.boot, "ax"
        .code32
        .globl _start
_start:
        cli
        cld
        cmpl $DIRTYREP_AP_MAGIC, %eax
        je ap_entry
        movl %eax, mb_magic
        movl %ebx, mb_info

        /* PD entries for 0..4 GiB: 2048 x (addr | PS | US | RW | P) */
        movl $pd_tables, %edi
        xorl %ecx, %ecx
1:      movl %ecx, %eax
        shll $21, %eax
        orl $0x87, %eax
        movl %eax, (%edi,%ecx,8)
        movl $0, 4(%edi,%ecx,8)
        incl %ecx
        cmpl $2048, %ecx
        jb 1b
        /* PDPT[0..3] -> the first four PDs */
        xorl %ecx, %ecx
2:      movl %ecx, %eax
        shll $12, %eax
        addl $pd_tables, %eax
        orl $0x7, %eax
        movl %eax, pdpt(,%ecx,8)
        movl $0, pdpt+4(,%ecx,8)
        incl %ecx
        cmpl $4, %ecx
        jb 2b
        movl $pdpt, %eax
        orl $0x7, %eax
        movl %eax, pml4
        movl $0, pml4+4

        xorl %edi, %edi                 /* cpu index 0 */
        movl $(kstacks + GUEST_KSTACK_SIZE), %esp
        jmp enter_long_mode

ap_entry:
        movl %ebx, %edi
        testl %edi, %edi
        jz park                         /* vCPU 0 never arrives as an AP */
        cmpl $GUEST_MAX_CPUS, %edi
        jae park
        /* Acquire: pairs with the BSP's store of boot_ready after it wrote
         * the page tables, GDT and IDT (x86 loads are not reordered with
         * older loads). */
3:      pause
        cmpl $0, boot_ready
        je 3b
        movl %edi, %eax
        incl %eax
        imull $GUEST_KSTACK_SIZE, %eax
        addl $kstacks, %eax
        movl %eax, %esp

enter_long_mode:
        movl $pml4, %eax
        movl %eax, %cr3
        movl %cr4, %eax
        orl $0x20, %eax                 /* PAE */
        movl %eax, %cr4
        movl $0xC0000080, %ecx          /* EFER */
        rdmsr
        orl $0x100, %eax                /* LME */
        wrmsr
        movl %cr0, %eax
        orl $0x80000001, %eax           /* PG | PE */
        movl %eax, %cr0
        lgdt gdt_ptr
        ljmp $SEL_KCODE, $long_mode

park:
        cli
        hlt
        jmp park

        .code64
long_mode:
        lgdt gdt_ptr
        movw $SEL_KDATA, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        xorw %ax, %ax
        movw %ax, %fs
        movw %ax, %gs
        movl %esp, %esp                 /* zero-extend */
        movl %edi, %edi
        xorl %ebp, %ebp
        call kmain
4:      cli
        hlt
        jmp 4b

/* enter_user(rip, rsp, arg): iretq to CPL3 with IOPL=3, IF=0 */
        .globl enter_user
enter_user:
        movq %rdi, %rax
        movq %rdx, %rdi
        pushq $SEL_UDATA
        pushq %rsi
        pushq $0x3002
        pushq $SEL_UCODE
        pushq %rax
        movw $SEL_UDATA, %ax
        movw %ax, %ds
        movw %ax, %es
        xorl %eax, %eax
        xorl %ebx, %ebx
        xorl %ecx, %ecx
        xorl %edx, %edx
        xorl %esi, %esi
        xorl %ebp, %ebp
        xorl %r8d, %r8d
        xorl %r9d, %r9d
        xorl %r10d, %r10d
        xorl %r11d, %r11d
        iretq

/* Trap stubs: vector and error code (0 if the CPU pushes none), then GPRs. */
.macro ISR_NOERR n
isr\n:
        pushq $0
        pushq $\n
        jmp isr_common
.endm
.macro ISR_ERR n
isr\n:
        pushq $\n
        jmp isr_common
.endm

ISR_NOERR 0
ISR_NOERR 1
ISR_NOERR 2
ISR_NOERR 3
ISR_NOERR 4
ISR_NOERR 5
ISR_NOERR 6
ISR_NOERR 7
ISR_ERR   8
ISR_NOERR 9
ISR_ERR   10
ISR_ERR   11
ISR_ERR   12
ISR_ERR   13
ISR_ERR   14
ISR_NOERR 15
ISR_NOERR 16
ISR_ERR   17
ISR_NOERR 18
ISR_NOERR 19
ISR_NOERR 20
ISR_ERR   21
ISR_NOERR 22
ISR_NOERR 23
ISR_NOERR 24
ISR_NOERR 25
ISR_NOERR 26
ISR_NOERR 27
ISR_NOERR 28
ISR_ERR   29
ISR_ERR   30
ISR_NOERR 31
.irp n, 32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47
ISR_NOERR \n
.endr

isr_common:
        cld
        pushq %r15
        pushq %r14
        pushq %r13
        pushq %r12
        pushq %r11
        pushq %r10
        pushq %r9
        pushq %r8
        pushq %rbp
        pushq %rdi
        pushq %rsi
        pushq %rdx
        pushq %rcx
        pushq %rbx
        pushq %rax
        movq %rsp, %rdi                 /* struct trap_frame *, 16-byte aligned */
        call trap
        popq %rax
        popq %rbx
        popq %rcx
        popq %rdx
        popq %rsi
        popq %rdi
        popq %rbp
        popq %r8
        popq %r9
        popq %r10
        popq %r11
        popq %r12
        popq %r13
        popq %r14
        popq %r15
        addq $16, %rsp
        iretq

        .section .rodata
        .align 8
        .globl isr_table
isr_table:
.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47
        .quad isr\n
.endr

        .data
        .align 16
        .globl gdt
gdt:
        .quad 0
        .quad 0x00209A0000000000        /* 0x08 kernel code, 64-bit */
        .quad 0x00CF92000000FFFF        /* 0x10 kernel data */
        .quad 0x00CFF2000000FFFF        /* 0x18 user data */
        .quad 0x0020FA0000000000        /* 0x20 user code, 64-bit */
        .fill GUEST_MAX_CPUS * 2, 8, 0  /* 0x28 + 16*cpu: TSS descriptors (kmain) */
gdt_end:
        .align 8
        .word 0, 0, 0
gdt_ptr:
        .word gdt_end - gdt - 1
        .quad gdt

        .globl boot_ready, mb_magic, mb_info
        .align 8
boot_ready: .long 0
mb_magic:   .long 0
mb_info:    .long 0

        .bss
        .align 4096
        .globl pml4, pdpt, pd_tables, kstacks, ustacks
pml4:      .skip 4096
pdpt:      .skip 4096
pd_tables: .skip 4096 * GUEST_MAX_PDS
kstacks:   .skip GUEST_KSTACK_SIZE * GUEST_MAX_CPUS
ustacks:   .skip GUEST_USTACK_SIZE * GUEST_MAX_CPUS
        .section .note.GNU-stack, "", @progbits

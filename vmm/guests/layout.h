/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * Fixed guest-physical layout shared by the test guests, their assembly
 * entry code and the host-side checkers. Documented in README.md; change both
 * together.
 */

#define GUEST_LOAD_ADDR     0x100000UL  /* the image is linked here (1 MiB) */
#define GUEST_IMAGE_LIMIT   0x800000UL  /* image incl. bss must end below 8 MiB */
#define GUEST_JAM_BASE      0x800000UL  /* scratch area of the jam syscall */
#define GUEST_JAM_MAX_PAGES 2048        /* 8 MiB .. 16 MiB */
#define GUEST_WORK_BASE     0x1000000UL /* workload RAM starts here (16 MiB) */

#define GUEST_MAX_CPUS    32
#define GUEST_KSTACK_SIZE 16384
#define GUEST_USTACK_SIZE 65536
#define GUEST_MAX_PDS     64 /* 2 MiB pages: up to 64 GiB mapped */
#define GUEST_CMDLINE_MAX 1024

/* GDT selectors */
#define SEL_KCODE 0x08
#define SEL_KDATA 0x10
#define SEL_UDATA 0x1b /* 0x18 | RPL 3 */
#define SEL_UCODE 0x23 /* 0x20 | RPL 3 */
#define SEL_TSS0  0x28 /* + 16 * cpu */

/* EAX values at entry (docs/guest-abi.md) */
#define MULTIBOOT_BOOT_MAGIC 0x2BADB002
#define DIRTYREP_AP_MAGIC    0x44524150 /* "DRAP" */

/* ud2 syscalls: code in rax, arguments in rdi, rsi, rdx, result in rax */
#define SYS_WAIT        1    /* sti; hlt; cli: wait for one interrupt */
#define SYS_EXIT        2    /* out 0x501, rdi & 0xff; never returns */
#define SYS_JAM         3    /* ring-0 rep stosb over rdi pages at GUEST_JAM_BASE */
#define SYS_UART_WRITE  4    /* 16550 at port rdi: send rsi[0..rdx) while THRE; returns bytes sent */
#define SYS_UART_READ   5    /* 16550 at port rdi: read into rsi[0..rdx) while LSR.DR; returns bytes read */
#define SYS_UART_RXWAIT 6    /* 16550 at port rdi: IER=RX, hlt unless LSR.DR, IER=0 */
#define SYS_UART_MAX    4096 /* longest buffer a UART call takes */

#define GUEST_EXIT_PORT  0x501
#define GUEST_EXIT_FATAL 3

/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * Runtime of the freestanding test guests. Ring 0 (kernel.c) only boots,
 * handles traps and serves the three ud2 syscalls; everything else runs in
 * CPL3 with IOPL=3 (lib.c and the guest programs).
 */

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "layout.h"

#define COM1 0x3f8
#define COM2 0x2f8

#define barrier()        __asm__ __volatile__("" ::: "memory")
#define READ_ONCE(x)     (*(const volatile __typeof__(x) *) &(x))
#define WRITE_ONCE(x, v) (*(volatile __typeof__(x) *) &(x) = (v))
#define ARRAY_SIZE(a)    (sizeof(a) / sizeof((a)[0]))
#define noreturn         __attribute__((noreturn))
#define printf_fmt(a, b) __attribute__((format(printf, a, b)))

/* Filled by ring 0 before any CPU enters CPL3; read-only afterwards. */
struct boot_info {
        uint64_t ram_top;  /* end of the highest RAM range (mapped up to here) */
        uint64_t work_end; /* end of the RAM range that holds GUEST_WORK_BASE */
        char cmdline[GUEST_CMDLINE_MAX];
};
extern struct boot_info boot_info;

static inline uint8_t inb(uint16_t port)
{
        uint8_t v;
        __asm__ __volatile__("inb %1, %0" : "=a"(v) : "Nd"(port));
        return v;
}

static inline void outb(uint16_t port, uint8_t v)
{
        __asm__ __volatile__("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint64_t rdtsc(void)
{
        uint32_t lo, hi;
        __asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
        return ((uint64_t) hi << 32) | lo;
}

static inline void cpu_relax(void)
{
        __asm__ __volatile__("pause" ::: "memory");
}

/* ---- lib.c: usable from CPL3 (and, slowly, from ring 0) ---- */
void *memset(void *s, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

/*
 * UART access. CPL3 in/out needs IOPL=3, which PVM hosts do not honour (the
 * instruction raises #GP; ring 0 then emulates it, slowly). io_direct says
 * which of the two the probe at start-up found; when false the helpers below
 * batch through the SYS_UART_* calls instead of one trap per in/out.
 */
extern bool io_direct;
void io_probe(void);
void uart_init(uint16_t port);
void uart_putc(uint16_t port, char c);
void uart_write(uint16_t port, const char *s, size_t n);
size_t uart_read(uint16_t port, uint8_t *buf, size_t max); /* what is there now, up to max */
void uart_rx_wait(uint16_t port); /* sleep until the UART has input (or another interrupt) */

int vsnprintf_lite(char *buf, size_t size, const char *fmt, va_list ap);
int snprintf_lite(char *buf, size_t size, const char *fmt, ...) printf_fmt(3, 4);
/* One line on COM1, atomically with respect to other CPUs. */
void pr(const char *fmt, ...) printf_fmt(1, 2);
/* Same, but gives up on the lock after a bounded spin (fatal paths). */
void pr_nolock(const char *fmt, ...) printf_fmt(1, 2);

/* Command line: "key=value" words of boot_info.cmdline. */
bool cfg_str(const char *key, char *buf, size_t size);
uint64_t cfg_u64(const char *key, uint64_t dflt);
uint64_t cfg_size(const char *key, uint64_t dflt); /* K/M/G suffixes */
int parse_size_lite(const char *s, uint64_t *ret);

extern uint64_t tsc_khz; /* cmdline tsc_khz=, default 2,000,000 */
extern unsigned ncpus;   /* cmdline ncpus=, clamped to 1..GUEST_MAX_CPUS */
uint64_t ms_to_tsc(uint64_t ms);
uint64_t tsc_to_ms(uint64_t ticks);

static inline uint64_t xorshift64(uint64_t *s)
{
        uint64_t x = *s;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        return *s = x;
}

/* ud2 syscalls (layout.h SYS_*) */
static inline uint64_t syscall3(uint64_t code, uint64_t a0, uint64_t a1, uint64_t a2)
{
        uint64_t ret;
        __asm__ __volatile__("ud2" : "=a"(ret) : "a"(code), "D"(a0), "S"(a1), "d"(a2) : "memory");
        return ret;
}
static inline uint64_t syscall1(uint64_t code, uint64_t arg)
{
        return syscall3(code, arg, 0, 0);
}
static inline void sys_wait(void)
{
        syscall1(SYS_WAIT, 0);
}
static inline void sys_jam(uint64_t pages)
{
        syscall1(SYS_JAM, pages);
}
noreturn void sys_exit(int code);

/* Provided by each guest program; runs in CPL3 on every CPU. */
void guest_main(unsigned cpu);

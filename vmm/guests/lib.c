/* SPDX-License-Identifier: GPL-2.0-or-later */
/* CPL3 runtime of the test guests: UART, printf-lite, command line, time. */
#include "guest.h"

uint64_t tsc_khz = 2000000;
unsigned ncpus = 1;

void *memset(void *s, int c, size_t n)
{
        uint8_t *p = s;
        while (n--)
                *p++ = (uint8_t) c;
        return s;
}

void *memcpy(void *d, const void *s, size_t n)
{
        uint8_t *dp = d;
        const uint8_t *sp = s;
        while (n--)
                *dp++ = *sp++;
        return d;
}

void *memmove(void *d, const void *s, size_t n)
{
        uint8_t *dp = d;
        const uint8_t *sp = s;
        if (dp < sp)
                return memcpy(d, s, n);
        while (n--)
                dp[n] = sp[n];
        return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
        const uint8_t *x = a, *y = b;
        for (size_t i = 0; i < n; i++)
                if (x[i] != y[i])
                        return x[i] < y[i] ? -1 : 1;
        return 0;
}

size_t strlen(const char *s)
{
        size_t n = 0;
        while (s[n])
                n++;
        return n;
}

void uart_init(uint16_t port)
{
        outb(port + 1, 0x00); /* IER: no interrupts */
        outb(port + 3, 0x80); /* DLAB */
        outb(port + 0, 0x01); /* 115200 */
        outb(port + 1, 0x00);
        outb(port + 3, 0x03); /* 8N1 */
        /* FIFO off: with it on, QEMU under KVM (PVM) lost the first byte
         * received on COM2; without it QEMU hands over one byte at a time
         * and cannot overrun. */
        outb(port + 2, 0x00);
        outb(port + 4, 0x0b); /* DTR RTS OUT2 (OUT2 gates the IRQ line) */
}

bool io_direct = true;
extern volatile uint64_t io_emulated; /* kernel.c: CPL3 in/out emulated after #GP */

static bool at_cpl0(void)
{
        uint16_t cs;
        __asm__ __volatile__("mov %%cs, %0" : "=r"(cs));
        return (cs & 3) == 0;
}

void io_probe(void)
{
        uint64_t before = READ_ONCE(io_emulated);
        (void) inb(COM1 + 5);
        io_direct = READ_ONCE(io_emulated) == before;
}

static bool use_direct(void)
{
        return io_direct || at_cpl0();
}

void uart_putc(uint16_t port, char c)
{
        uart_write(port, &c, 1);
}

void uart_write(uint16_t port, const char *s, size_t n)
{
        if (use_direct()) {
                for (size_t i = 0; i < n; i++) {
                        /* THRE is the VMM's output back pressure: never write THR without it. */
                        while (!(inb(port + 5) & 0x20))
                                cpu_relax();
                        outb(port, (uint8_t) s[i]);
                }
                return;
        }
        while (n > 0) {
                size_t chunk = n < SYS_UART_MAX ? n : SYS_UART_MAX;
                uint64_t done = syscall3(SYS_UART_WRITE, port, (uint64_t) (uintptr_t) s, chunk);
                if (done > chunk)
                        done = chunk;
                if (done == 0)
                        cpu_relax(); /* back pressure: THRE stayed clear */
                s += done;
                n -= done;
        }
}

size_t uart_read(uint16_t port, uint8_t *buf, size_t max)
{
        size_t n = 0;

        if (max > SYS_UART_MAX)
                max = SYS_UART_MAX;
        if (!use_direct()) {
                n = syscall3(SYS_UART_READ, port, (uint64_t) (uintptr_t) buf, max);
                return n > max ? max : n;
        }
        while (n < max && (inb(port + 5) & 0x01))
                buf[n++] = inb(port);
        return n;
}

void uart_rx_wait(uint16_t port)
{
        if (!use_direct()) {
                syscall1(SYS_UART_RXWAIT, port);
                return;
        }
        /* Enable the RX interrupt first, then look again: data that came in
         * between raises the IRQ, which stays pending and ends the hlt. */
        outb(port + 1, 0x01);
        if (!(inb(port + 5) & 0x01))
                sys_wait();
        outb(port + 1, 0x00);
}

/* ---- printf-lite: %d %u %x %lx %ld %lu %s %c %%, optional 0/width ---- */
struct outbuf {
        char *buf;
        size_t size, len;
};

static void ob_putc(struct outbuf *o, char c)
{
        if (o->len + 1 < o->size)
                o->buf[o->len] = c;
        o->len++;
}

static void ob_num(struct outbuf *o, uint64_t v, unsigned base, bool neg, unsigned width, char pad)
{
        char tmp[24];
        unsigned n = 0;
        do {
                tmp[n++] = "0123456789abcdef"[v % base];
                v /= base;
        } while (v);
        if (neg)
                tmp[n++] = '-';
        while (width > n && width--)
                ob_putc(o, pad);
        while (n)
                ob_putc(o, tmp[--n]);
}

int vsnprintf_lite(char *buf, size_t size, const char *fmt, va_list ap)
{
        struct outbuf o = {buf, size, 0};

        for (; *fmt; fmt++) {
                if (*fmt != '%') {
                        ob_putc(&o, *fmt);
                        continue;
                }
                fmt++;
                char pad = ' ';
                unsigned width = 0;
                if (*fmt == '0')
                        pad = '0', fmt++;
                while (*fmt >= '0' && *fmt <= '9')
                        width = width * 10 + (unsigned) (*fmt++ - '0');
                bool l = false;
                while (*fmt == 'l')
                        l = true, fmt++;
                switch (*fmt) {
                case 'd': {
                        int64_t v = l ? va_arg(ap, int64_t) : va_arg(ap, int);
                        ob_num(&o, v < 0 ? -(uint64_t) v : (uint64_t) v, 10, v < 0, width, pad);
                        break;
                }
                case 'u':
                        ob_num(&o, l ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 10, false, width, pad);
                        break;
                case 'x':
                        ob_num(&o, l ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 16, false, width, pad);
                        break;
                case 's': {
                        const char *s = va_arg(ap, const char *);
                        for (s = s ? s : "(null)"; *s; s++)
                                ob_putc(&o, *s);
                        break;
                }
                case 'c':
                        ob_putc(&o, (char) va_arg(ap, int));
                        break;
                case '%':
                        ob_putc(&o, '%');
                        break;
                case 0:
                        fmt--;
                        break;
                default:
                        ob_putc(&o, '?');
                }
        }
        if (size)
                buf[o.len < size ? o.len : size - 1] = 0;
        return (int) o.len;
}

int snprintf_lite(char *buf, size_t size, const char *fmt, ...)
{
        va_list ap;
        va_start(ap, fmt);
        int r = vsnprintf_lite(buf, size, fmt, ap);
        va_end(ap);
        return r;
}

static volatile uint32_t com1_lock;

static bool lock_take(unsigned spins)
{
        for (unsigned i = 0; spins == 0 || i < spins; i++) {
                if (__atomic_exchange_n(&com1_lock, 1, __ATOMIC_ACQUIRE) == 0)
                        return true;
                cpu_relax();
        }
        return false;
}

static void vpr(unsigned spins, const char *fmt, va_list ap)
{
        char line[256];
        int n = vsnprintf_lite(line, sizeof(line) - 1, fmt, ap);
        if (n > (int) sizeof(line) - 2)
                n = sizeof(line) - 2;
        line[n++] = '\n';
        bool locked = lock_take(spins);
        uart_write(COM1, line, (size_t) n);
        if (locked) /* release: pairs with the acquire in lock_take() */
                __atomic_store_n(&com1_lock, 0, __ATOMIC_RELEASE);
}

void pr(const char *fmt, ...)
{
        va_list ap;
        va_start(ap, fmt);
        vpr(0, fmt, ap);
        va_end(ap);
}

void pr_nolock(const char *fmt, ...)
{
        va_list ap;
        va_start(ap, fmt);
        vpr(1000, fmt, ap);
        va_end(ap);
}

/* ---- command line ---- */
static const char *cfg_find(const char *key, size_t *ret_len)
{
        const char *s = boot_info.cmdline;
        size_t klen = strlen(key);

        while (*s) {
                while (*s == ' ')
                        s++;
                const char *w = s;
                while (*s && *s != ' ')
                        s++;
                if ((size_t) (s - w) > klen && memcmp(w, key, klen) == 0 && w[klen] == '=') {
                        *ret_len = (size_t) (s - w) - klen - 1;
                        return w + klen + 1;
                }
        }
        return NULL;
}

bool cfg_str(const char *key, char *buf, size_t size)
{
        size_t len;
        const char *v = cfg_find(key, &len);
        if (!v || size == 0)
                return false;
        if (len >= size)
                len = size - 1;
        memcpy(buf, v, len);
        buf[len] = 0;
        return true;
}

int parse_size_lite(const char *s, uint64_t *ret)
{
        uint64_t v = 0, mul = 1;
        bool any = false;

        for (; *s >= '0' && *s <= '9'; s++) {
                if (v > (UINT64_MAX - 9) / 10)
                        return -1;
                v = v * 10 + (uint64_t) (*s - '0');
                any = true;
        }
        switch (*s) {
        case 'k':
        case 'K':
                mul = 1ULL << 10;
                s++;
                break;
        case 'm':
        case 'M':
                mul = 1ULL << 20;
                s++;
                break;
        case 'g':
        case 'G':
                mul = 1ULL << 30;
                s++;
                break;
        }
        if (!any || *s || (v && mul > UINT64_MAX / v))
                return -1;
        *ret = v * mul;
        return 0;
}

uint64_t cfg_size(const char *key, uint64_t dflt)
{
        char buf[32];
        uint64_t v;
        if (!cfg_str(key, buf, sizeof(buf)) || parse_size_lite(buf, &v) < 0)
                return dflt;
        return v;
}

uint64_t cfg_u64(const char *key, uint64_t dflt)
{
        return cfg_size(key, dflt);
}

uint64_t ms_to_tsc(uint64_t ms)
{
        return ms * tsc_khz;
}

uint64_t tsc_to_ms(uint64_t ticks)
{
        return ticks / tsc_khz;
}

/* First CPL3 code on every CPU (kernel.c enter_user). */
void user_start(unsigned cpu);
void user_start(unsigned cpu)
{
        io_probe();
        char io[16];
        if (cfg_str("io", io, sizeof(io)) && memcmp(io, "syscall", 8) == 0)
                io_direct = false; /* test the PVM path anywhere */
        tsc_khz = cfg_u64("tsc_khz", 2000000);
        if (tsc_khz == 0)
                tsc_khz = 2000000;
        uint64_t n = cfg_u64("ncpus", 1);
        ncpus = n < 1 ? 1 : n > GUEST_MAX_CPUS ? GUEST_MAX_CPUS : (unsigned) n;
        guest_main(cpu);
        sys_exit(0);
}

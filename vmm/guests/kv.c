/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * kv: a small RESP2 key-value server on COM2 (redis-cli, redis-benchmark).
 * Everything runs in CPL3 on CPU 0: the parser is a byte-at-a-time state
 * machine (input may be split anywhere, commands may be pipelined), every
 * length is bounded, and garbage gets an -ERR reply, never a crash.
 *
 * Multiplexing (docs/guest-abi.md): after answering everything it has read
 * and with no partial command left, kv writes the turnaround marker 0xD5
 * to COM2's scratch register, so dirtyrep-vmm may hand the line to another
 * client. When the line's carrier drops (MSR.DCD = 0: the client left in
 * the middle of a command) kv discards the partial command and writes the
 * marker to acknowledge. Under QEMU the scratch write is harmless and DCD
 * stays up.
 */
#include "guest.h"

#define KEY_MAX     512
#define VALUE_MAX   (64 * 1024)
#define ARGS_MAX    64
#define ARGBUF_SIZE (VALUE_MAX + KEY_MAX + 8 * 1024)
#define HDR_MAX     24           /* "*N" / "$L" line */
#define BULK_LIMIT  (512u << 20) /* larger lengths are protocol errors */
#define BUCKETS     65536

/* ---------------------------------------------------------------- output */

static void out_raw(const char *s, size_t n)
{
        uart_write(COM2, s, n);
}

static void out_str(const char *s)
{
        out_raw(s, strlen(s));
}

static void out_int(int64_t v)
{
        char b[32];
        int n = snprintf_lite(b, sizeof(b), ":%ld\r\n", v);
        out_raw(b, (size_t) n);
}

static void out_bulk(const uint8_t *p, size_t n)
{
        char b[32];
        int k = snprintf_lite(b, sizeof(b), "$%lu\r\n", (uint64_t) n);
        out_raw(b, (size_t) k);
        out_raw((const char *) p, n);
        out_raw("\r\n", 2);
}

/* ------------------------------------------------------------------ heap */

/* Power-of-two size classes 2^6 .. 2^17 carved from RAM above the bucket array. */
#define CLASS_MIN 6
#define CLASS_MAX 17

struct free_block {
        struct free_block *next;
};

static uint8_t *heap_next, *heap_end;
static struct free_block *free_lists[CLASS_MAX + 1];

static int size_class(size_t n)
{
        for (int c = CLASS_MIN; c <= CLASS_MAX; c++)
                if (n <= (1ul << c))
                        return c;
        return -1;
}

static void *heap_alloc(size_t n, int *ret_class)
{
        int c = size_class(n);
        if (c < 0)
                return NULL;
        *ret_class = c;
        if (free_lists[c]) {
                struct free_block *b = free_lists[c];
                free_lists[c] = b->next;
                return b;
        }
        if ((size_t) (heap_end - heap_next) < (1ul << c))
                return NULL;
        void *p = heap_next;
        heap_next += 1ul << c;
        return p;
}

static void heap_free(void *p, int c)
{
        struct free_block *b = p;
        b->next = free_lists[c];
        free_lists[c] = b;
}

/* ----------------------------------------------------------------- table */

struct entry {
        struct entry *next;
        uint32_t klen, vlen;
        int32_t cls;
        uint32_t pad;
        uint8_t data[]; /* key, then value */
};

static struct entry **buckets;
static uint64_t nkeys, ncmds;

static uint32_t hash(const uint8_t *k, size_t n)
{
        uint64_t h = 0xcbf29ce484222325ULL;
        for (size_t i = 0; i < n; i++)
                h = (h ^ k[i]) * 0x100000001b3ULL;
        return (uint32_t) (h ^ (h >> 32)) & (BUCKETS - 1);
}

static struct entry **table_find(const uint8_t *k, size_t n)
{
        struct entry **pp = &buckets[hash(k, n)];
        for (; *pp; pp = &(*pp)->next)
                if ((*pp)->klen == n && memcmp((*pp)->data, k, n) == 0)
                        return pp;
        return pp; /* where a new entry would go: *pp == NULL */
}

/* Returns false when out of memory (the old value, if any, is kept). */
static bool table_set(const uint8_t *k, size_t kn, const uint8_t *v, size_t vn)
{
        struct entry **pp = table_find(k, kn), *old = *pp, *e;
        int cls;

        if (old && sizeof(*old) + kn + vn <= (1ul << old->cls)) {
                memcpy(old->data + kn, v, vn);
                old->vlen = (uint32_t) vn;
                return true;
        }
        e = heap_alloc(sizeof(*e) + kn + vn, &cls);
        if (!e)
                return false;
        e->klen = (uint32_t) kn;
        e->vlen = (uint32_t) vn;
        e->cls = cls;
        memcpy(e->data, k, kn);
        memcpy(e->data + kn, v, vn);
        if (old) {
                e->next = old->next;
                *pp = e;
                heap_free(old, old->cls);
        } else {
                e->next = NULL;
                *pp = e;
                nkeys++;
        }
        return true;
}

static bool table_del(const uint8_t *k, size_t n)
{
        struct entry **pp = table_find(k, n), *e = *pp;
        if (!e)
                return false;
        *pp = e->next;
        heap_free(e, e->cls);
        nkeys--;
        return true;
}

/* -------------------------------------------------------------- commands */

struct arg {
        const uint8_t *p;
        size_t n;
};

static bool arg_is(const struct arg *a, const char *name)
{
        size_t n = strlen(name);
        if (a->n != n)
                return false;
        for (size_t i = 0; i < n; i++) {
                uint8_t c = a->p[i];
                if (c >= 'a' && c <= 'z')
                        c = (uint8_t) (c - 'a' + 'A');
                if (c != (uint8_t) name[i])
                        return false;
        }
        return true;
}

static void err_args(const struct arg *cmd)
{
        char b[96];
        size_t n = cmd->n < 32 ? cmd->n : 32;
        char name[33];
        for (size_t i = 0; i < n; i++) {
                uint8_t c = cmd->p[i];
                name[i] = (char) ((c >= 'A' && c <= 'Z')    ? c - 'A' + 'a'
                                  : (c >= 0x20 && c < 0x7f) ? c
                                                            : '?');
        }
        name[n] = 0;
        snprintf_lite(b, sizeof(b), "-ERR wrong number of arguments for '%s' command\r\n", name);
        out_str(b);
}

static bool parse_i64(const uint8_t *p, size_t n, int64_t *ret)
{
        bool neg = false;
        uint64_t v = 0;
        size_t i = 0;

        if (n == 0 || n > 20)
                return false;
        if (p[0] == '-') {
                neg = true;
                i = 1;
                if (n == 1)
                        return false;
        }
        if (p[i] == '0' && n > i + 1)
                return false; /* Redis rejects leading zeros */
        for (; i < n; i++) {
                if (p[i] < '0' || p[i] > '9')
                        return false;
                if (v > (UINT64_MAX - 9) / 10)
                        return false;
                v = v * 10 + (uint64_t) (p[i] - '0');
        }
        if (neg ? v > (uint64_t) INT64_MAX + 1 : v > (uint64_t) INT64_MAX)
                return false;
        if (neg && v == 0)
                return false;
        *ret = neg ? (int64_t) (0 - v) : (int64_t) v;
        return true;
}

static bool key_ok(const struct arg *k)
{
        if (k->n <= KEY_MAX)
                return true;
        out_str("-ERR key too long (max 512 bytes)\r\n");
        return false;
}

static void execute(struct arg *a, unsigned argc)
{
        const struct arg *cmd = &a[0];

        ncmds++;
        if (arg_is(cmd, "PING")) {
                if (argc == 1)
                        out_str("+PONG\r\n");
                else if (argc == 2)
                        out_bulk(a[1].p, a[1].n);
                else
                        err_args(cmd);
        } else if (arg_is(cmd, "ECHO")) {
                if (argc != 2)
                        return err_args(cmd);
                out_bulk(a[1].p, a[1].n);
        } else if (arg_is(cmd, "SET")) {
                if (argc < 3)
                        return err_args(cmd);
                if (argc > 3)
                        return out_str("-ERR syntax error (SET options are not supported)\r\n");
                if (!key_ok(&a[1]))
                        return;
                if (a[2].n > VALUE_MAX)
                        return out_str("-ERR value too long (max 65536 bytes)\r\n");
                if (!table_set(a[1].p, a[1].n, a[2].p, a[2].n))
                        return out_str("-ERR out of memory\r\n");
                out_str("+OK\r\n");
        } else if (arg_is(cmd, "GET")) {
                if (argc != 2)
                        return err_args(cmd);
                if (!key_ok(&a[1]))
                        return;
                struct entry *e = *table_find(a[1].p, a[1].n);
                if (!e)
                        return out_str("$-1\r\n");
                out_bulk(e->data + e->klen, e->vlen);
        } else if (arg_is(cmd, "INCR")) {
                int64_t v = 0;
                char b[24];
                if (argc != 2)
                        return err_args(cmd);
                if (!key_ok(&a[1]))
                        return;
                struct entry *e = *table_find(a[1].p, a[1].n);
                if (e && !parse_i64(e->data + e->klen, e->vlen, &v))
                        return out_str("-ERR value is not an integer or out of range\r\n");
                if (v == INT64_MAX)
                        return out_str("-ERR increment or decrement would overflow\r\n");
                v++;
                int n = snprintf_lite(b, sizeof(b), "%ld", v);
                if (!table_set(a[1].p, a[1].n, (const uint8_t *) b, (size_t) n))
                        return out_str("-ERR out of memory\r\n");
                out_int(v);
        } else if (arg_is(cmd, "DEL") || arg_is(cmd, "EXISTS")) {
                bool del = arg_is(cmd, "DEL");
                int64_t n = 0;
                if (argc < 2)
                        return err_args(cmd);
                for (unsigned i = 1; i < argc; i++) {
                        if (a[i].n > KEY_MAX)
                                continue; /* cannot exist */
                        if (del)
                                n += table_del(a[i].p, a[i].n);
                        else
                                n += *table_find(a[i].p, a[i].n) != NULL;
                }
                out_int(n);
        } else if (arg_is(cmd, "DBSIZE")) {
                if (argc != 1)
                        return err_args(cmd);
                out_int((int64_t) nkeys);
        } else if (arg_is(cmd, "QUIT")) {
                out_str("+OK\r\n");
        } else if (arg_is(cmd, "COMMAND")) {
                out_str("*0\r\n");
        } else if (arg_is(cmd, "CONFIG")) {
                /* CONFIG GET name: the name with an empty value, so that redis-benchmark
                 * reads both its CONFIG GETs' replies before it closes the connection (a
                 * reply it left unread would reach the next client on a serial line). */
                if (argc == 3 && arg_is(&a[1], "GET")) {
                        out_str("*2\r\n");
                        out_bulk(a[2].p, a[2].n);
                        out_bulk(a[2].p, 0);
                } else if (argc >= 2 && arg_is(&a[1], "GET"))
                        out_str("*0\r\n");
                else
                        out_str("-ERR only CONFIG GET is supported\r\n");
        } else {
                char b[96], name[33];
                size_t n = cmd->n < 32 ? cmd->n : 32;
                for (size_t i = 0; i < n; i++)
                        name[i] = (cmd->p[i] >= 0x20 && cmd->p[i] < 0x7f && cmd->p[i] != '\'')
                                          ? (char) cmd->p[i]
                                          : '?';
                name[n] = 0;
                snprintf_lite(b, sizeof(b), "-ERR unknown command '%s'\r\n", name);
                out_str(b);
        }
}

/* ---------------------------------------------------------------- parser */

enum pstate {
        P_START,     /* first byte of a command */
        P_INLINE,    /* inline command, up to '\n' */
        P_MB_COUNT,  /* "*N" line */
        P_BULK_HDR,  /* expect '$' */
        P_BULK_LEN,  /* "$L" line */
        P_BULK_DATA, /* L bytes */
        P_BULK_CR,
        P_BULK_LF,
        P_DISCARD, /* after a protocol error: skip to '\n' */
};

static struct {
        enum pstate st;
        char hdr[HDR_MAX];
        unsigned hdr_len;
        bool hdr_cr;
        uint64_t nargs, argi, bulk_len, bulk_got;
        bool too_big, storing;
        unsigned argc;
        uint32_t arg_off[ARGS_MAX], arg_len[ARGS_MAX];
        uint32_t buf_len;
        uint8_t buf[ARGBUF_SIZE];
} ps;

static void parser_reset(enum pstate st)
{
        ps.st = st;
        ps.hdr_len = 0;
        ps.argc = 0;
        ps.buf_len = 0;
        ps.too_big = false;
        ps.nargs = ps.argi = 0;
}

static void proto_error(const char *what, bool discard_line)
{
        char b[96];
        snprintf_lite(b, sizeof(b), "-ERR Protocol error: %s\r\n", what);
        out_str(b);
        parser_reset(discard_line ? P_DISCARD : P_START);
}

static void run_command(void)
{
        struct arg a[ARGS_MAX];

        if (ps.too_big) {
                ncmds++;
                out_str("-ERR command too large (max 64 args, key 512 bytes, value 65536 bytes)\r\n");
        } else if (ps.argc > 0) {
                for (unsigned i = 0; i < ps.argc; i++) {
                        a[i].p = ps.buf + ps.arg_off[i];
                        a[i].n = ps.arg_len[i];
                }
                execute(a, ps.argc);
        }
        parser_reset(P_START);
}

/* Header lines "*N" / "$L": collect digits up to "\r\n" (or a bare "\n"). */
static bool hdr_byte(uint8_t c, int64_t *ret, bool *ret_bad)
{
        *ret_bad = false;
        if (c == '\n') {
                if (!parse_i64((const uint8_t *) ps.hdr, ps.hdr_len, ret))
                        *ret_bad = true;
                ps.hdr_len = 0;
                return true;
        }
        if (c == '\r')
                return false; /* tolerated anywhere before '\n' */
        if (ps.hdr_len >= HDR_MAX) {
                *ret_bad = true;
                return false;
        }
        ps.hdr[ps.hdr_len++] = (char) c;
        return false;
}

static void inline_split(void)
{
        uint32_t n = ps.buf_len, i = 0;
        ps.argc = 0;
        while (i < n) {
                while (i < n && (ps.buf[i] == ' ' || ps.buf[i] == '\t' || ps.buf[i] == '\r'))
                        i++;
                if (i == n)
                        break;
                uint32_t s = i;
                while (i < n && ps.buf[i] != ' ' && ps.buf[i] != '\t' && ps.buf[i] != '\r')
                        i++;
                if (ps.argc == ARGS_MAX) {
                        ps.too_big = true;
                        return;
                }
                ps.arg_off[ps.argc] = s;
                ps.arg_len[ps.argc] = i - s;
                ps.argc++;
        }
}

static void parser_feed(uint8_t c)
{
        int64_t v;
        bool bad;

        switch (ps.st) {
        case P_START:
                if (c == '*') {
                        ps.st = P_MB_COUNT;
                        ps.hdr_len = 0;
                        return;
                }
                ps.st = P_INLINE;
                __attribute__((fallthrough));
        case P_INLINE:
                if (c == '\n') {
                        if (!ps.too_big)
                                inline_split();
                        run_command();
                } else if (ps.buf_len < ARGBUF_SIZE) {
                        ps.buf[ps.buf_len++] = c;
                } else {
                        ps.too_big = true;
                }
                return;
        case P_MB_COUNT:
                if (!hdr_byte(c, &v, &bad)) {
                        if (bad)
                                proto_error("invalid multibulk length", true);
                        return;
                }
                if (bad || v > 1024 * 1024)
                        return proto_error("invalid multibulk length", false);
                if (v <= 0) /* "*0" / "*-1": no command */
                        return parser_reset(P_START);
                ps.nargs = (uint64_t) v;
                ps.argi = 0;
                ps.too_big = ps.nargs > ARGS_MAX;
                ps.st = P_BULK_HDR;
                return;
        case P_BULK_HDR:
                if (c != '$')
                        return proto_error("expected '$'", c != '\n');
                ps.st = P_BULK_LEN;
                ps.hdr_len = 0;
                return;
        case P_BULK_LEN:
                if (!hdr_byte(c, &v, &bad)) {
                        if (bad)
                                proto_error("invalid bulk length", true);
                        return;
                }
                if (bad || v < 0 || v > BULK_LIMIT)
                        return proto_error("invalid bulk length", false);
                ps.bulk_len = (uint64_t) v;
                ps.bulk_got = 0;
                ps.storing = !ps.too_big && ps.bulk_len <= VALUE_MAX && ps.argc < ARGS_MAX &&
                             ps.bulk_len <= ARGBUF_SIZE - ps.buf_len;
                if (!ps.storing)
                        ps.too_big = true;
                else {
                        ps.arg_off[ps.argc] = ps.buf_len;
                        ps.arg_len[ps.argc] = (uint32_t) ps.bulk_len;
                }
                ps.st = ps.bulk_len ? P_BULK_DATA : P_BULK_CR;
                return;
        case P_BULK_DATA:
                if (ps.storing)
                        ps.buf[ps.buf_len++] = c;
                if (++ps.bulk_got == ps.bulk_len)
                        ps.st = P_BULK_CR;
                return;
        case P_BULK_CR:
                if (c != '\r')
                        return proto_error("expected CRLF after bulk", c != '\n');
                ps.st = P_BULK_LF;
                return;
        case P_BULK_LF:
                if (c != '\n')
                        return proto_error("expected CRLF after bulk", true);
                if (ps.storing)
                        ps.argc++;
                if (++ps.argi == ps.nargs)
                        return run_command();
                ps.st = P_BULK_HDR;
                return;
        case P_DISCARD:
                if (c == '\n')
                        parser_reset(P_START);
                return;
        }
}

/* ------------------------------------------------------------------ main */

#define UART_IER   1
#define UART_LSR   5
#define UART_MSR   6
#define UART_SCR   7
#define IER_RDI    0x01
#define IER_MSI    0x08
#define LSR_DR     0x01
#define MSR_DCD    0x80
#define TURNAROUND 0xD5

/* One emulated `out` on PVM hosts (a trap), a plain one elsewhere: once per transaction. */
static void turnaround(void)
{
        outb(COM2 + UART_SCR, TURNAROUND);
}

/*
 * Idle in the middle of a command: sleep until input or a modem-status
 * change. Returns false when the carrier is down: the client that sent the
 * partial command has gone.
 */
static bool wait_mid_command(void)
{
        bool up;

        /* Enable first, then look: a change that comes in between keeps the IRQ pending and ends the hlt. */
        outb(COM2 + UART_IER, IER_RDI | IER_MSI);
        up = inb(COM2 + UART_MSR) & MSR_DCD; /* the read also clears the deltas (the IRQ cause) */
        if (up && !(inb(COM2 + UART_LSR) & LSR_DR))
                sys_wait();
        outb(COM2 + UART_IER, 0);
        return up && (inb(COM2 + UART_MSR) & MSR_DCD);
}

void guest_main(unsigned cpu)
{
        if (cpu != 0) /* kv serves from CPU 0 only */
                for (;;)
                        sys_wait();

        uint64_t report_ms = cfg_u64("report_ms", 1000), run_ms = cfg_u64("run_ms", 0);
        bool mux = cfg_u64("turnaround", 1) != 0; /* 0: never mark turnarounds (one client at a time) */
        uint8_t *heap = (uint8_t *) (uintptr_t) GUEST_WORK_BASE;
        uint64_t bucket_bytes = BUCKETS * sizeof(struct entry *);

        if (report_ms == 0)
                report_ms = 1000;
        if (boot_info.work_end < GUEST_WORK_BASE + bucket_bytes + (1 << 20)) {
                pr("kv: fatal: needs RAM up to 0x%lx", GUEST_WORK_BASE + bucket_bytes + (1 << 20));
                sys_exit(1);
        }
        buckets = (struct entry **) heap;
        memset(buckets, 0, bucket_bytes);
        heap_next = heap + bucket_bytes;
        heap_end = (uint8_t *) (uintptr_t) boot_info.work_end;
        parser_reset(P_START);

        /* COM2 was set up by ring 0 (kmain) */
        pr("kv: ready heap=%lu turnaround=%u", (uint64_t) (heap_end - heap_next), mux ? 1 : 0);

        uint64_t report_ticks = ms_to_tsc(report_ms), idle_ticks = ms_to_tsc(2);
        uint64_t t_start = rdtsc(), t_report = t_start, last_rx = t_start;
        uint64_t rep_cmds = 0, rep_keys = 0;
        unsigned spin = 0;
        bool debug_rx = cfg_u64("debug_rx", 0) != 0;
        bool answered = false; /* input consumed since the last turnaround marker */

        for (;;) {
                uint8_t rx[512];
                size_t n = uart_read(COM2, rx, sizeof(rx));
                if (n > 0) {
                        if (debug_rx)
                                for (size_t i = 0; i < n; i++)
                                        pr("kv: rx %u", rx[i]);
                        for (size_t i = 0; i < n; i++)
                                parser_feed(rx[i]);
                        spin = 0;
                        last_rx = 0; /* "recently": re-read below */
                        answered = true;
                } else if (mux && answered && ps.st == P_START) {
                        /* Every reply is written and nothing is buffered: a transaction boundary. */
                        turnaround();
                        answered = false;
                }
                /* rdtsc only every few empty polls when busy */
                if (n == 0 && ++spin < 16)
                        continue;
                spin = 0;
                uint64_t now = rdtsc();
                if (last_rx == 0)
                        last_rx = now;
                bool changed = ncmds != rep_cmds || nkeys != rep_keys;
                bool idle = now - last_rx >= idle_ticks;
                if (changed && (now - t_report >= report_ticks || idle)) {
                        pr("kv: cmds=%lu keys=%lu", ncmds, nkeys);
                        rep_cmds = ncmds;
                        rep_keys = nkeys;
                        t_report = now;
                }
                if (run_ms && now - t_start >= ms_to_tsc(run_ms)) {
                        pr("kv: done cmds=%lu keys=%lu", ncmds, nkeys);
                        sys_exit(0);
                }
                if (!idle || run_ms)
                        continue;
                /* Idle: sleep until COM2 has data (IRQ3), do not spin a host core. */
                if (ps.st == P_START || !mux) {
                        uart_rx_wait(COM2);
                } else if (!wait_mid_command()) {
                        pr("kv: hangup mid-command, partial command discarded");
                        parser_reset(P_START);
                        turnaround();
                        answered = false;
                }
                last_rx = rdtsc();
        }
}

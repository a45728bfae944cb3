/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The standby half of role.h: listens for the primary, authenticates it
 * (daemon/link.c), receives epochs into staging and commits each complete
 * one atomically to the replica, then acks it.
 *
 * Replica: one memfd laid out exactly like the primary VM's RAM memfd
 * (region i lives at its memfd_offset), mapped MAP_SHARED, plus the VmState
 * bytes of the same epoch, the epoch number and the primary session it came
 * from. It is what the VMM starts on at failover (--ram-fd), so its layout
 * is the primary's, not a packed copy.
 *
 * Epoch state machine, per connection, strictly in order:
 *
 *   idle --EPOCH_BEGIN--> open --PAGES*, STATE--> open --EPOCH_END--> commit, ACK, idle
 *
 * Anything else (a second BEGIN, PAGES or STATE or END while idle, a second
 * STATE, counts that do not match, a page outside the layout, a base that
 * is not the replica's epoch) fails the link with a message naming what was
 * wrong. Pages never go into the replica directly:
 *   - full epoch: a fresh memfd of the replica's size (zero-filled by the
 *     kernel, so pages not sent stay zero) is the staging area; the commit
 *     makes it the replica and drops the old one. A full sync therefore
 *     holds up to twice the guest RAM until it commits.
 *   - incremental epoch: pages go to a sparse staging memfd of the same
 *     layout plus a bitmap and a list of the pages staged; the commit copies
 *     each staged page into the replica and punches the staging memfd empty.
 *     Bounded by MaxStagingMB=: an incremental epoch staging more distinct
 *     pages than that fails the link (the primary keeps its epochs below
 *     its own MaxStagingMB=; configure the standby's at least as large, or
 *     the pair never gets past that epoch: the status says why).
 * A failed or partial epoch (link lost before EPOCH_END, a newer
 * authenticated connection replacing this one) is discarded with its
 * staging; the replica keeps the last committed epoch.
 *
 * Connections: any number may be in handshake (bounded by the listener),
 * one is active. A connection becomes active when it authenticated
 * (on_up); the previous active one is then freed with its partial epoch.
 * Links that went down are freed from a timer, DEAD_GRACE_USEC later:
 * never inside their own callbacks, and late enough that the ERROR frame
 * telling the primary why has left (link_free() would drop it).
 */

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <inttypes.h>
#include <linux/falloc.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.h"
#include "crc32c.h"
#include "frame.h"
#include "layout.h"
#include "link.h"
#include "log.h"
#include "pages.h"
#include "role.h"
#include "standby-internal.h"
#include "util.h"

#define STANDBY_MAX_PENDING 16u /* connections in handshake at once (link.h: 2 per source address) */
#define HASH_CHUNK_PAGES    16384u
/* A link that went down is kept this long before it is freed, so its final
 * ERROR frame (queued by link_fail) is written before the socket closes:
 * link_free() stops the writer at once. At most DEAD_MAX wait at a time. */
#define DEAD_GRACE_USEC (500 * USEC_PER_MSEC)
#define DEAD_MAX        16u

/* The open epoch of the active connection. */
typedef struct Staging {
        bool open;
        bool full;
        uint64_t epoch;
        Layout layout; /* full: the session's; incremental: the replica's (equal) */
        int full_fd;   /* full: the memfd that becomes the replica */
        uint8_t *map;  /* full: full_fd's mapping; incremental: the standby's inc_map */
        uint64_t records, distinct;
        uint64_t *list; /* incremental: the distinct pages staged, in arrival order */
        size_t n_list, cap_list;
        uint8_t *state;
        size_t state_len;
        bool have_state;
        uint64_t page_bytes, wire_bytes; /* page bytes represented / PAGES payload bytes */
} Staging;

typedef struct Conn {
        Standby *s;
        Link *link;
        struct Conn *next;
        bool dead; /* link down; freed by the gc timer after DEAD_GRACE_USEC */
        uint64_t dead_usec;
        bool have_hello;
        Layout layout; /* from the Hello */
        uint8_t vm_uuid[UUID_BYTES];
        uint8_t session[SESSION_BYTES];
        char peer[80];
        char reason[256];    /* on_hello's refusal, must outlive the callback */
        uint64_t last_begun; /* highest epoch begun on this connection */
        uint64_t commits;
} Conn;

struct Standby {
        sd_event *event;
        const DaemonConfig *d;
        const VmConfig *vm;
        uint8_t *secret;
        size_t secret_len;
        SSL_CTX *tls; /* or NULL: plaintext */

        LinkListener *listener;
        sd_event_source *gc_source; /* timer: frees dead connections */
        Conn *conns;                /* every connection, handshaking or up */
        Conn *active;               /* the authenticated one, or NULL */

        Replica replica;
        Staging st;
        uint64_t *bitmap;      /* pages staged in the open epoch */
        uint64_t bitmap_pages; /* bits allocated */
        int inc_fd;            /* incremental staging memfd (sparse), replica-sized */
        uint8_t *inc_map;
        uint64_t inc_size;

        /* A primary that reported its own link failure (its ERROR frame: heartbeats
         * missed, connection reset) is alive: it gets until reported_due to reconnect
         * before it counts as lost. 0: not waiting. */
        uint64_t reported_due;
        int reported_error;
        char reported_reason[256];

        /* Status. failed: replication ended and this side does not fail over (also the lost
         * callback's guard); stopped: because the primary said it stops on purpose
         * (-ECANCELED: its daemon stopping, a detach), shown as listening, not failed. */
        bool failed, stopped;
        char detail[256];
        uint64_t epochs_committed, full_syncs, incremental_syncs, pages_last_epoch;
        double dirty_pages_per_s;
        uint64_t last_commit_usec;
        uint64_t closed_bytes_sent, closed_bytes_received; /* of links already freed */
        uint64_t page_bytes_total, wire_bytes_total;

        /* Failover (main.c sequences it). */
        StandbyLostFn lost_cb;
        void *lost_userdata;
        const char *note_state; /* overrides the state word while a promotion runs, or NULL */
        char note[256];
};

/* ---- layout --------------------------------------------------------------------------- */

/* The Hello's layout, validated (ram_layout_validate(), the standby's bounds). On error writes a reason. */
static int layout_from_hello(const Dr__Repl__Hello *h, Layout *ret, char *reason, size_t size)
{
        Layout L = {.page_size = h->page_size, .n_regions = h->n_regions};
        int r;

        if (h->n_regions == 0 || h->n_regions > RAM_MAX_REGIONS) {
                snprintf(reason, size, "%zu memory regions (1..%u allowed)", h->n_regions, RAM_MAX_REGIONS);
                return -EINVAL;
        }
        for (size_t i = 0; i < h->n_regions; i++)
                L.regions[i] = (Region){
                        .slot = h->regions[i]->slot,
                        .guest_phys = h->regions[i]->guest_phys,
                        .size = h->regions[i]->size,
                        .fd_offset = h->regions[i]->memfd_offset,
                };
        r = ram_layout_validate(&L, reason, size);
        if (r < 0)
                return r;
        *ret = L;
        return 0;
}

/* ---- memfds ---------------------------------------------------------------------------- */

int memfd_map_new(const char *name, uint64_t size, int *ret_fd, uint8_t **ret_map)
{
        _cleanup_close_ int fd = -EBADF;
        void *m;

        fd = memfd_new_sized(name, size);
        if (fd < 0)
                return fd;
        m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED)
                return -errno;
        *ret_fd = TAKE_FD(fd);
        *ret_map = m;
        return 0;
}

static void memfd_unmap(int *fd, uint8_t **map, uint64_t size)
{
        if (*map)
                (void) munmap(*map, size);
        *map = NULL;
        *fd = safe_close(*fd);
}

static void replica_clear(Replica *r)
{
        memfd_unmap(&r->fd, &r->map, r->layout.memfd_size);
        free(r->state);
        r->state = NULL;
        r->state_len = 0;
        r->valid = false;
}

static void inc_staging_free(Standby *s)
{
        memfd_unmap(&s->inc_fd, &s->inc_map, s->inc_size);
        s->inc_size = 0;
}

static bool bit_test_and_set(uint64_t *b, uint64_t i)
{
        uint64_t m = UINT64_C(1) << (i % 64);
        bool was = b[i / 64] & m;
        b[i / 64] |= m;
        return was;
}

/* ---- epochs ---------------------------------------------------------------------------- */

/* Drops the open epoch, if any: staging released, the replica untouched. */
static void epoch_discard(Standby *s)
{
        Staging *st = &s->st;

        if (!st->open)
                return;
        if (st->full) {
                memfd_unmap(&st->full_fd, &st->map, st->layout.memfd_size);
                if (s->bitmap)
                        memset(s->bitmap, 0, DIV_ROUND_UP(s->bitmap_pages, 64) * sizeof(uint64_t));
        } else {
                for (size_t i = 0; i < st->n_list; i++)
                        s->bitmap[st->list[i] / 64] &= ~(UINT64_C(1) << (st->list[i] % 64));
                if (s->inc_fd >= 0)
                        (void) fallocate(s->inc_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
                                         (off_t) s->inc_size);
        }
        free(st->state);
        free(st->list);
        *st = (Staging){.full_fd = -EBADF};
}

static int fail(Conn *c, int code, const char *fmt, ...) _printf_(3, 4);
/* Fails the connection's link with a message; on_down runs before this returns. */
static int fail(Conn *c, int code, const char *fmt, ...)
{
        char msg[256];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
        c->s->failed = true; /* the standby decided: "failed", not merely "lost" */
        c->s->stopped = false;
        link_fail(c->link, code, "%s", msg);
        return code;
}

static int handle_epoch_begin(Conn *c, const uint8_t *payload, size_t len)
{
        Standby *s = c->s;
        Staging *st = &s->st;
        const Replica *rep = &s->replica;
        Dr__Repl__EpochBegin *b;
        bool same_session;
        uint64_t epoch;
        int r;

        b = dr__repl__epoch_begin__unpack(NULL, len, payload);
        if (!b)
                return fail(c, -EBADMSG, "undecodable EPOCH_BEGIN");
        epoch = b->epoch;
        Staging n = {
                .open = true,
                .full = b->full,
                .epoch = b->epoch,
                .full_fd = -EBADF,
        };
        bool has_base = b->has_base_epoch;
        uint64_t base = b->base_epoch;
        dr__repl__epoch_begin__free_unpacked(b, NULL);

        if (st->open)
                return fail(c, -EPROTO, "epoch %" PRIu64 " begins while epoch %" PRIu64 " is open", epoch,
                            st->epoch);
        same_session = rep->valid && memcmp(rep->session, c->session, SESSION_BYTES) == 0;
        /* Numbers are only comparable within one primary session: a new
         * session (a restarted primary) starts with a full epoch of any number. */
        if (same_session && epoch <= rep->epoch)
                return fail(c, -EPROTO, "epoch %" PRIu64 " is not after the committed epoch %" PRIu64, epoch,
                            rep->epoch);
        if (epoch == 0 || epoch <= c->last_begun)
                return fail(c, -EPROTO,
                            "epoch %" PRIu64 " is not after epoch %" PRIu64
                            ", the last one begun on this connection",
                            epoch, c->last_begun);

        if (n.full) {
                n.layout = c->layout;
                r = memfd_map_new("dirtyrep-replica", n.layout.memfd_size, &n.full_fd, &n.map);
                if (r < 0)
                        return fail(c, r,
                                    "cannot allocate a %" PRIu64 " MiB staging memfd for full epoch %" PRIu64
                                    ": %s",
                                    n.layout.memfd_size >> 20, epoch, strerror(-r));
        } else {
                if (!has_base)
                        return fail(c, -EPROTO, "incremental epoch %" PRIu64 " names no base epoch", epoch);
                if (!rep->valid)
                        return fail(c, -EPROTO,
                                    "incremental epoch %" PRIu64 " is based on %" PRIu64
                                    " but the standby holds no replica (a full epoch is needed)",
                                    epoch, base);
                if (!same_session)
                        return fail(c, -EPROTO,
                                    "incremental epoch %" PRIu64 " is based on %" PRIu64
                                    " of this primary session, but the replica is from another session",
                                    epoch, base);
                if (!ram_layout_equal(&c->layout, &rep->layout) ||
                    memcmp(c->vm_uuid, rep->vm_uuid, UUID_BYTES))
                        return fail(c, -EPROTO,
                                    "incremental epoch %" PRIu64
                                    " for a RAM layout or VM UUID other than the "
                                    "replica's (a full epoch is needed)",
                                    epoch);
                if (base != rep->epoch)
                        return fail(c, -EPROTO,
                                    "incremental epoch %" PRIu64 " is based on %" PRIu64
                                    " but the replica holds %" PRIu64,
                                    epoch, base, rep->epoch);
                n.layout = rep->layout;
                if (s->inc_fd >= 0 && s->inc_size != n.layout.memfd_size)
                        inc_staging_free(s);
                if (s->inc_fd < 0) {
                        r = memfd_map_new("dirtyrep-staging", n.layout.memfd_size, &s->inc_fd, &s->inc_map);
                        if (r < 0)
                                return fail(c, r, "cannot allocate the staging memfd: %s", strerror(-r));
                        s->inc_size = n.layout.memfd_size;
                }
                n.map = s->inc_map;
        }

        if (s->bitmap_pages != n.layout.total_pages) {
                free(s->bitmap);
                s->bitmap_pages = 0;
                s->bitmap = calloc(DIV_ROUND_UP(n.layout.total_pages, 64), sizeof(uint64_t));
                if (!s->bitmap) {
                        memfd_unmap(&n.full_fd, &n.map, n.layout.memfd_size);
                        return fail(c, -ENOMEM, "out of memory for the page bitmap of epoch %" PRIu64,
                                    epoch);
                }
                s->bitmap_pages = n.layout.total_pages;
        }

        c->last_begun = epoch;
        *st = n;
        return 0;
}

typedef struct PagesCtx {
        Conn *c;
        uint64_t delivered;
        int error;
        char msg[200];
} PagesCtx;

static int stage_page(void *userdata, uint64_t page, const uint8_t *data)
{
        PagesCtx *x = userdata;
        Standby *s = x->c->s;
        Staging *st = &s->st;
        uint8_t *dst = st->map + ram_layout_page_offset(&st->layout, page);
        bool seen;

        x->delivered++;
        seen = bit_test_and_set(s->bitmap, page);
        if (!seen) {
                if (!st->full) {
                        uint64_t limit = (uint64_t) s->vm->max_staging_mb << 20;
                        if ((uint64_t) (st->n_list + 1) * PAGE_BYTES > limit) {
                                s->bitmap[page / 64] &= ~(UINT64_C(1) << (page % 64));
                                snprintf(x->msg, sizeof(x->msg),
                                         "incremental epoch %" PRIu64
                                         " stages more than MaxStagingMB=%" PRIu32
                                         " MiB (%zu distinct pages)",
                                         st->epoch, s->vm->max_staging_mb, st->n_list + 1);
                                return x->error = -ENOBUFS;
                        }
                        if (st->n_list == st->cap_list) {
                                size_t cap = MAX(st->cap_list * 2, (size_t) 1024);
                                uint64_t *l = reallocarray(st->list, cap, sizeof(uint64_t));
                                if (!l) {
                                        s->bitmap[page / 64] &= ~(UINT64_C(1) << (page % 64));
                                        snprintf(x->msg, sizeof(x->msg),
                                                 "out of memory staging epoch %" PRIu64, st->epoch);
                                        return x->error = -ENOMEM;
                                }
                                st->list = l;
                                st->cap_list = cap;
                        }
                        st->list[st->n_list++] = page;
                }
                st->distinct++;
        }
        st->records++;

        if (data)
                memcpy(dst, data, PAGE_BYTES);
        else if (seen || !st->full)
                /* A full epoch's staging starts zeroed: touching a page never
                 * written would only allocate it. Otherwise the zero record is
                 * the last copy and wins. */
                memset(dst, 0, PAGE_BYTES);
        return 0;
}

/* After page_batch_decode() refused record `index`: say what was wrong with it. */
static void describe_bad_record(const uint8_t *p, size_t len, uint64_t index, uint64_t n_pages, char *buf,
                                size_t size)
{
        size_t off = PAGE_BATCH_HEADER;

        if (len < PAGE_BATCH_HEADER) {
                snprintf(buf, size, "page batch of %zu bytes is shorter than its header", len);
                return;
        }
        for (uint64_t i = 0; i < index; i++) {
                /* Records before `index` were delivered, so their headers are sound. */
                off += PAGE_RECORD_HEADER + get_le32(p + off + 8);
        }
        if (index == 0 && (get_le32(p + 8) == 0 || get_le32(p + 12) != 0 ||
                           (uint64_t) get_le32(p + 8) * PAGE_RECORD_HEADER > len - PAGE_BATCH_HEADER)) {
                snprintf(buf, size,
                         "malformed page batch header (%" PRIu32 " records in %zu bytes, flags 0x%" PRIx32
                         ")",
                         get_le32(p + 8), len, get_le32(p + 12));
                return;
        }
        if (index >= get_le32(p + 8)) {
                snprintf(buf, size, "%zu trailing bytes after the last of %" PRIu64 " records", len - off,
                         index);
                return;
        }
        if (off >= len || len - off < PAGE_RECORD_HEADER) {
                snprintf(buf, size, "page batch truncated in record %" PRIu64, index);
                return;
        }
        if (get_le64(p + off) >= n_pages) {
                snprintf(buf, size, "page %" PRIu64 " outside the %" PRIu64 "-page layout",
                         get_le64(p + off), n_pages);
                return;
        }
        snprintf(buf, size,
                 "malformed record %" PRIu64 " for page %" PRIu64 " (encoding %u, %" PRIu32 " data bytes)",
                 index, get_le64(p + off), get_le16(p + off + 12), get_le32(p + off + 8));
}

static int handle_pages(Conn *c, const uint8_t *payload, size_t len)
{
        Standby *s = c->s;
        Staging *st = &s->st;
        PagesCtx x = {.c = c};
        uint64_t batch_epoch;
        int64_t n;

        if (!st->open)
                return fail(c, -EPROTO, "PAGES before EPOCH_BEGIN");
        if (len >= PAGE_BATCH_HEADER && get_le64(payload) != st->epoch)
                return fail(c, -EPROTO, "PAGES of epoch %" PRIu64 " while epoch %" PRIu64 " is open",
                            get_le64(payload), st->epoch);

        n = page_batch_decode(payload, len, st->layout.total_pages, &batch_epoch, stage_page, &x);
        if (n < 0) {
                if (x.error < 0)
                        return fail(c, x.error, "%s", x.msg);
                describe_bad_record(payload, len, x.delivered, st->layout.total_pages, x.msg, sizeof(x.msg));
                return fail(c, (int) n, "bad PAGES in epoch %" PRIu64 ": %s", st->epoch, x.msg);
        }
        st->page_bytes += (uint64_t) n * PAGE_BYTES;
        st->wire_bytes += len;
        return 0;
}

static int handle_state(Conn *c, const uint8_t *payload, size_t len)
{
        Standby *s = c->s;
        Staging *st = &s->st;
        Dr__Repl__EpochState *m;
        uint64_t epoch;
        size_t n;

        if (!st->open)
                return fail(c, -EPROTO, "STATE before EPOCH_BEGIN");
        if (st->have_state)
                return fail(c, -EPROTO, "second STATE in epoch %" PRIu64, st->epoch);
        m = dr__repl__epoch_state__unpack(NULL, len, payload);
        if (!m)
                return fail(c, -EBADMSG, "undecodable STATE in epoch %" PRIu64, st->epoch);
        epoch = m->epoch;
        n = m->vmstate.len;
        if (epoch != st->epoch || n == 0 || n > STANDBY_MAX_STATE_BYTES) {
                dr__repl__epoch_state__free_unpacked(m, NULL);
                if (epoch != st->epoch)
                        return fail(c, -EPROTO, "STATE of epoch %" PRIu64 " while epoch %" PRIu64 " is open",
                                    epoch, st->epoch);
                return fail(c, -EBADMSG,
                            "STATE of epoch %" PRIu64 " carries %zu bytes of VmState (1..%zu allowed)",
                            epoch, n, STANDBY_MAX_STATE_BYTES);
        }
        st->state = malloc(n);
        if (st->state)
                memcpy(st->state, m->vmstate.data, n);
        dr__repl__epoch_state__free_unpacked(m, NULL);
        if (!st->state)
                return fail(c, -ENOMEM, "out of memory for the state of epoch %" PRIu64, epoch);
        st->state_len = n;
        st->have_state = true;
        return 0;
}

/*
 * Makes the complete open epoch the replica. INVARIANT: this runs from start
 * to ACK inside one sd-event callback (the EPOCH_END frame's dispatch) and
 * cannot fail half-way (everything it needs was allocated and checked
 * before), so nothing on the loop (status, the hash/dump hooks, failover,
 * another connection) ever sees a half-applied epoch: it sees the replica
 * before or after.
 */
static void epoch_commit(Standby *s, Conn *c)
{
        Staging *st = &s->st;
        Replica *rep = &s->replica;
        uint64_t now = now_usec();

        if (st->full) {
                replica_clear(rep);
                rep->layout = st->layout;
                rep->fd = TAKE_FD(st->full_fd);
                rep->map = TAKE_PTR(st->map);
                memcpy(rep->vm_uuid, c->vm_uuid, UUID_BYTES);
                /* The old replica's incremental staging may not fit the new one. */
                if (s->inc_fd >= 0 && s->inc_size != rep->layout.memfd_size)
                        inc_staging_free(s);
                memset(s->bitmap, 0, DIV_ROUND_UP(s->bitmap_pages, 64) * sizeof(uint64_t));
                s->full_syncs++;
        } else {
                for (size_t i = 0; i < st->n_list; i++) {
                        uint64_t page = st->list[i];
                        uint64_t off = ram_layout_page_offset(&rep->layout, page);
                        memcpy(rep->map + off, s->inc_map + off, PAGE_BYTES);
                        s->bitmap[page / 64] &= ~(UINT64_C(1) << (page % 64));
                }
                /* Release the staging memory; the file keeps its size. Stale
                 * bytes would be harmless (a page is always written before its
                 * bit is set), so a failure only costs memory. */
                if (fallocate(s->inc_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
                              (off_t) s->inc_size) < 0)
                        log_debug_errno(-errno, "Failed to punch the staging memfd of VM %s: %m",
                                        s->vm->name);
                if (s->last_commit_usec > 0 && now > s->last_commit_usec) {
                        double rate = (double) st->distinct * 1e6 / (double) (now - s->last_commit_usec);
                        s->dirty_pages_per_s =
                                s->dirty_pages_per_s > 0 ? 0.8 * s->dirty_pages_per_s + 0.2 * rate : rate;
                }
                s->incremental_syncs++;
        }
        free(rep->state);
        rep->state = TAKE_PTR(st->state);
        rep->state_len = st->state_len;
        rep->epoch = st->epoch;
        memcpy(rep->session, c->session, SESSION_BYTES);
        rep->valid = true;
        rep->stale = false;

        s->epochs_committed++;
        s->pages_last_epoch = st->distinct;
        s->page_bytes_total += st->page_bytes;
        s->wire_bytes_total += st->wire_bytes;
        s->last_commit_usec = now;
        c->commits++;
        link_set_patience(c->link, 0); /* a replica now: failover needs the short window */

        free(st->list);
        *st = (Staging){.full_fd = -EBADF};
}

static int handle_epoch_end(Conn *c, const uint8_t *payload, size_t len)
{
        Standby *s = c->s;
        Staging *st = &s->st;
        Dr__Repl__Ack ack = DR__REPL__ACK__INIT;
        Dr__Repl__EpochEnd *m;
        uint64_t epoch, records, distinct;
        int r;

        if (!st->open)
                return fail(c, -EPROTO, "EPOCH_END before EPOCH_BEGIN");
        m = dr__repl__epoch_end__unpack(NULL, len, payload);
        if (!m)
                return fail(c, -EBADMSG, "undecodable EPOCH_END in epoch %" PRIu64, st->epoch);
        epoch = m->epoch;
        records = m->page_records;
        distinct = m->distinct_pages;
        dr__repl__epoch_end__free_unpacked(m, NULL);

        if (epoch != st->epoch)
                return fail(c, -EPROTO, "EPOCH_END of epoch %" PRIu64 " while epoch %" PRIu64 " is open",
                            epoch, st->epoch);
        if (records != st->records || distinct != st->distinct)
                return fail(c, -EPROTO,
                            "epoch %" PRIu64 " ends with %" PRIu64 " page records and %" PRIu64
                            " distinct pages announced, but %" PRIu64 " and %" PRIu64 " arrived",
                            epoch, records, distinct, st->records, st->distinct);
        if (!st->have_state)
                return fail(c, -EPROTO, "epoch %" PRIu64 " ends without STATE", epoch);

        epoch_commit(s, c);

        ack.epoch = epoch;
        r = link_send_message(c->link, DR__REPL__FRAME_TYPE__FRAME_ACK, &ack.base, false);
        if (r == -ENOTCONN)
                /* The link is already going down (its writer saw the connection reset): on_down
                 * says why. Failing here would mark the standby "failed" first, and a primary
                 * that died would then not be failed over from (found by the fault campaign:
                 * a killed primary VMM whose last epoch the standby was committing). */
                return 0;
        if (r < 0)
                return fail(c, r, "epoch %" PRIu64 " committed, but its ACK could not be queued: %s", epoch,
                            strerror(-r));
        return 0;
}

/* ---- link callbacks -------------------------------------------------------------------- */

static int on_hello(Link *l, const Dr__Repl__Hello *h, const char **ret_reason, void *userdata)
{
        Conn *c = userdata;
        Standby *s = c->s;
        int r;

        if (!streq(h->vm_name, s->vm->name)) {
                /* The name is the peer's, unauthenticated: printable ASCII only in the message. */
                char name[CONFIG_VM_NAME_MAX + 1];
                size_t i = 0;
                for (; h->vm_name[i] && i + 1 < sizeof(name); i++)
                        name[i] = h->vm_name[i] >= 0x20 && h->vm_name[i] < 0x7f ? h->vm_name[i] : '?';
                name[i] = 0;
                snprintf(c->reason, sizeof(c->reason),
                         "the primary replicates VM '%s' but this standby listener is for VM '%s'", name,
                         s->vm->name);
                *ret_reason = c->reason;
                return -EPERM;
        }
        r = layout_from_hello(h, &c->layout, c->reason, sizeof(c->reason));
        if (r < 0) {
                *ret_reason = c->reason;
                return r;
        }
        memcpy(c->vm_uuid, h->vm_uuid.data, UUID_BYTES);    /* length checked by the Link */
        memcpy(c->session, h->session.data, SESSION_BYTES); /* likewise */
        c->have_hello = true;
        return 0;
}

/* Whether the replica may serve as the base for this connection's primary. */
static bool replica_usable(const Standby *s, const Conn *c)
{
        const Replica *rep = &s->replica;
        /* A different layout or VM UUID means the replica is for another VM
         * (shape): accept the primary, but report no replica, so it sends a
         * full epoch that creates a fresh one. */
        return rep->valid && ram_layout_equal(&rep->layout, &c->layout) &&
               memcmp(rep->vm_uuid, c->vm_uuid, UUID_BYTES) == 0;
}

static void fill_welcome(Link *l, Dr__Repl__Welcome *w, void *userdata)
{
        Conn *c = userdata;
        Standby *s = c->s;

        if (!replica_usable(s, c))
                return;
        w->has_last_committed = true;
        w->last_committed = s->replica.epoch;
        w->has_session = true;
        w->session = (ProtobufCBinaryData){SESSION_BYTES, s->replica.session};
}

/* How long a primary that reported a broken link has to reconnect: the longest
 * reconnect backoff of a primary (2 s) plus one heartbeat timeout. */
static uint64_t reconnect_grace_usec(const Standby *s)
{
        uint64_t hb = s->d ? (uint64_t) s->d->heartbeat_interval_ms * s->d->heartbeat_misses : 1000;

        return (2000 + hb) * USEC_PER_MSEC;
}

static void schedule_gc(Standby *s, uint64_t when)
{
        uint64_t cur;

        if (!s->gc_source)
                return;
        if (sd_event_source_get_enabled(s->gc_source, NULL) > 0 &&
            sd_event_source_get_time(s->gc_source, &cur) >= 0 && cur <= when)
                return;
        (void) sd_event_source_set_time(s->gc_source, when);
        (void) sd_event_source_set_enabled(s->gc_source, SD_EVENT_ONESHOT);
}

static void conn_account(Standby *s, Conn *c)
{
        LinkStats ls;

        link_get_stats(c->link, &ls);
        s->closed_bytes_sent += ls.bytes_sent;
        s->closed_bytes_received += ls.bytes_received;
}

/* Unlinks and frees a connection (its Link without callbacks). */
static void conn_free(Standby *s, Conn *c)
{
        for (Conn **p = &s->conns; *p; p = &(*p)->next)
                if (*p == c) {
                        *p = c->next;
                        break;
                }
        if (s->active == c) {
                epoch_discard(s);
                s->active = NULL;
        }
        conn_account(s, c);
        link_free(c->link);
        free(c);
}

static int on_up(Link *l, const Dr__Repl__Welcome *w, void *userdata)
{
        Conn *c = userdata;
        Standby *s = c->s;

        if (s->active && s->active != c) {
                /* Only an authenticated primary may displace the current one. */
                log_info("VM %s: primary %s replaces %s%s", s->vm->name, c->peer, s->active->peer,
                         s->st.open ? ", discarding its partial epoch" : "");
                conn_free(s, s->active);
        }
        s->active = c;
        s->failed = s->stopped = false;
        s->reported_due = 0;
        /* A primary is back: whatever a lost one left in the status is over. */
        if (!s->note_state)
                s->note[0] = 0;
        if (replica_usable(s, c))
                snprintf(s->detail, sizeof(s->detail), "resyncing from epoch %" PRIu64, s->replica.epoch);
        else
                snprintf(s->detail, sizeof(s->detail), "full sync");
        log_info("VM %s: primary %s authenticated, %s", s->vm->name, c->peer, s->detail);
        /* Without a replica there is nothing to fail over to: a primary busy
         * with the full sync may be silent longer before it counts as lost. */
        link_set_patience(l, s->replica.valid ? 0 : SYNC_PATIENCE_USEC);
        return 0;
}

static int on_frame(Link *l, uint16_t type, const uint8_t *payload, size_t len, void *userdata)
{
        Conn *c = userdata;

        if (c->s->active != c)
                return fail(c, -EPROTO, "frame on a connection that is not the active one");
        switch (type) {
        case DR__REPL__FRAME_TYPE__FRAME_EPOCH_BEGIN:
                return handle_epoch_begin(c, payload, len);
        case DR__REPL__FRAME_TYPE__FRAME_PAGES:
                return handle_pages(c, payload, len);
        case DR__REPL__FRAME_TYPE__FRAME_STATE:
                return handle_state(c, payload, len);
        case DR__REPL__FRAME_TYPE__FRAME_EPOCH_END:
                return handle_epoch_end(c, payload, len);
        default:
                return fail(c, -EPROTO, "unexpected frame type %u", type);
        }
}

static void fill_heartbeat(Link *l, Dr__Repl__Heartbeat *hb, void *userdata)
{
        Conn *c = userdata;

        if (c->s->replica.valid) {
                hb->has_last_committed = true;
                hb->last_committed = c->s->replica.epoch;
        }
}

/* A peer that went away (or timed out) is "lost"; the rest (bad input, refusal) is a failure. */
static bool error_is_loss(int error)
{
        switch (-error) {
        case ETIMEDOUT:
        case ECONNRESET:
        case ECONNABORTED:
        case ECONNREFUSED:
        case EPIPE:
        case ESHUTDOWN:
        case ENOTCONN:
        case EHOSTUNREACH:
        case EHOSTDOWN: /* the primary reported its VM gone (its VMM died) */
        case ENETUNREACH:
        case ENETDOWN:
                return true;
        default:
                return false;
        }
}

static void on_down(Link *l, int error, const char *reason, void *userdata)
{
        Conn *c = userdata;
        Standby *s = c->s;
        char kept[64];

        c->dead = true;
        c->dead_usec = now_usec();
        schedule_gc(s, c->dead_usec + DEAD_GRACE_USEC);

        if (s->active != c) {
                /* Never authenticated: it does not change what the standby is doing. Dropped by the
                 * listener's pre-authentication limits: already in its rate-limited warning. */
                if (link_preauth_dropped(l))
                        return;
                log_warning_errno(error, "VM %s: replication connection from %s refused: %s", s->vm->name,
                                  c->peer, reason);
                if (!s->active)
                        snprintf(s->detail, sizeof(s->detail), "last connection refused: %s", reason);
                return;
        }

        /* The partial epoch, if any, is discarded: the replica stays at the last commit. */
        epoch_discard(s);
        s->active = NULL;
        if (link_down_by_peer(l) && error != -EHOSTDOWN && error_is_loss(error)) {
                /* The primary says its side of the link broke (it missed our heartbeats, its
                 * connection was reset): it is alive and will reconnect. Failing over now
                 * would fence a running primary (found by the fault campaign: a stalled link
                 * made the primary time out first, and its report promoted the standby).
                 * Only if it does not come back in time is it lost. */
                s->reported_due = now_usec() + reconnect_grace_usec(s);
                s->reported_error = error;
                snprintf(s->reported_reason, sizeof(s->reported_reason), "%s", reason);
                snprintf(s->detail, sizeof(s->detail), "primary reported a broken link, waiting for it: %s",
                         reason);
                log_warning_errno(error,
                                  "VM %s: primary %s reported its link down (%s); waiting %" PRIu64
                                  " ms for it to reconnect before declaring it lost",
                                  s->vm->name, c->peer, reason,
                                  (uint64_t) (reconnect_grace_usec(s) / USEC_PER_MSEC));
                schedule_gc(s, s->reported_due);
                return;
        }
        if (!s->failed && !error_is_loss(error)) {
                s->failed = true;
                s->stopped = error == -ECANCELED;
        }
        snprintf(s->detail, sizeof(s->detail), "%s: %s",
                 s->stopped  ? "primary stopped replicating"
                 : s->failed ? "replication failed"
                             : "primary lost",
                 reason);
        if (s->replica.valid)
                snprintf(kept, sizeof(kept), "replica stays at epoch %" PRIu64, s->replica.epoch);
        else
                snprintf(kept, sizeof(kept), "no replica yet");
        if (s->stopped)
                log_notice("VM %s: primary %s stopped replicating on purpose, %s: %s", s->vm->name, c->peer,
                           kept, reason);
        else if (s->failed)
                log_error_errno(error, "VM %s: replication from %s failed, %s: %s", s->vm->name, c->peer,
                                kept, reason);
        else
                log_warning_errno(error, "VM %s: primary %s lost, %s: %s", s->vm->name, c->peer, kept,
                                  reason);
        /* Only a primary that went away (silence, a reset connection) or reported its VM
         * gone (-EHOSTDOWN: its VMM died) is a reason to fail over; one that said it
         * stopped otherwise (ERROR frame: shutdown, a tracking error, bad input: the VM
         * may run on there) or that this side refused is not. The callback must not free s: it runs
         * inside the Link's callback. */
        if (!s->failed && s->lost_cb)
                s->lost_cb(s, error, reason, s->lost_userdata);
}

static const LinkCallbacks standby_link_cb = {
        .on_hello = on_hello,
        .fill_welcome = fill_welcome,
        .on_up = on_up,
        .on_frame = on_frame,
        .fill_heartbeat = fill_heartbeat,
        .on_down = on_down,
};

/* Frees dead connections: all of them (force), or those past their grace period. */
static void gc_run(Standby *s, bool force)
{
        uint64_t now = now_usec(), next_due = UINT64_MAX;

        for (Conn *c = s->conns, *next; c; c = next) {
                next = c->next;
                if (!c->dead)
                        continue;
                if (force || now >= c->dead_usec + DEAD_GRACE_USEC)
                        conn_free(s, c);
                else
                        next_due = MIN(next_due, c->dead_usec + DEAD_GRACE_USEC);
        }
        if (!force && s->reported_due) {
                if (s->active || s->failed)
                        s->reported_due = 0;
                else if (now >= s->reported_due) {
                        s->reported_due = 0;
                        snprintf(s->detail, sizeof(s->detail),
                                 "primary lost: did not reconnect after: %.200s", s->reported_reason);
                        log_warning_errno(
                                s->reported_error,
                                "VM %s: the primary did not reconnect after reporting its link down: "
                                "lost, replica stays at epoch %" PRIu64,
                                s->vm->name, s->replica.epoch);
                        if (s->lost_cb)
                                s->lost_cb(s, s->reported_error, s->reported_reason, s->lost_userdata);
                        return; /* the callback may have taken the replica and closed everything */
                } else
                        next_due = MIN(next_due, s->reported_due);
        }
        if (next_due != UINT64_MAX)
                schedule_gc(s, next_due);
}

static int on_gc(sd_event_source *src, uint64_t usec, void *userdata)
{
        gc_run(userdata, false);
        return 0;
}

static int on_accept(LinkListener *ll, int fd, const char *peer, void *userdata)
{
        Standby *s = userdata;
        unsigned n_dead = 0;
        Conn *c;
        int r;

        /* Bounded: a peer that keeps connecting and failing does not pile up dead links. */
        for (c = s->conns; c; c = c->next)
                n_dead += c->dead;
        if (n_dead >= DEAD_MAX)
                gc_run(s, true);

        c = calloc(1, sizeof(*c));
        if (!c) {
                safe_close(fd);
                return log_oom();
        }
        c->s = s;
        snprintf(c->peer, sizeof(c->peer), "%s", peer ?: "peer");

        LinkParams p = {
                .side = LINK_STANDBY,
                .secret = s->secret,
                .secret_len = s->secret_len,
                .heartbeat_ms = s->d ? s->d->heartbeat_interval_ms : 0,
                .heartbeat_misses = s->d ? s->d->heartbeat_misses : 0,
                .peer_name = c->peer,
                .listener = ll,
                .tls = s->tls,
        };
        r = link_accept(s->event, fd, &p, &standby_link_cb, c, &c->link);
        if (r < 0) {
                free(c);
                return log_warning_errno(r, "VM %s: cannot take the connection from %s: %m", s->vm->name,
                                         peer);
        }
        c->next = s->conns;
        s->conns = c;
        return 0;
}

/* ---- public API ------------------------------------------------------------------------ */

int standby_accept_fd(Standby *s, int fd)
{
        return on_accept(NULL, fd, NULL, s);
}

int standby_new(sd_event *e, const DaemonConfig *d, const VmConfig *vm, const uint8_t *secret,
                size_t secret_len, Standby **ret)
{
        _cleanup_(standby_freep) Standby *s = NULL;
        int r;

        if (!e || !vm || !vm->name || !secret || secret_len == 0 || !ret)
                return -EINVAL;
        s = calloc(1, sizeof(*s));
        if (!s)
                return -ENOMEM;
        s->event = sd_event_ref(e);
        s->d = d;
        s->vm = vm;
        s->replica.fd = -EBADF;
        s->st.full_fd = -EBADF;
        s->inc_fd = -EBADF;
        s->secret = malloc(secret_len);
        if (!s->secret)
                return -ENOMEM;
        memcpy(s->secret, secret, secret_len);
        s->secret_len = secret_len;

        r = sd_event_add_time(e, &s->gc_source, CLOCK_MONOTONIC, 0, 10 * USEC_PER_MSEC, on_gc, s);
        if (r < 0)
                return r;
        r = sd_event_source_set_enabled(s->gc_source, SD_EVENT_OFF);
        if (r < 0)
                return r;
        snprintf(s->detail, sizeof(s->detail), "not started");
        *ret = TAKE_PTR(s);
        return 0;
}

int standby_set_tls(Standby *s, SSL_CTX *tls)
{
        if (!s || s->listener)
                return -EINVAL;
        if (tls && SSL_CTX_up_ref(tls) != 1)
                return -EIO;
        SSL_CTX_free(s->tls);
        s->tls = tls;
        return 0;
}

int standby_start(Standby *s)
{
        int r;

        if (!s)
                return -EINVAL;
        if (s->listener)
                return -EBUSY;
        if (s->vm->listen.len == 0) {
                s->failed = true;
                snprintf(s->detail, sizeof(s->detail), "no Listen= address configured");
                return -EDESTADDRREQ;
        }
        r = link_listener_new(s->event, (const struct sockaddr *) &s->vm->listen.sa, s->vm->listen.len,
                              STANDBY_MAX_PENDING, on_accept, s, &s->listener);
        if (r < 0) {
                s->failed = true;
                snprintf(s->detail, sizeof(s->detail), "cannot listen on %s: %s", s->vm->listen.text,
                         strerror(-r));
                return r;
        }
        s->failed = s->stopped = false;
        snprintf(s->detail, sizeof(s->detail), "waiting for the primary");
        return 0;
}

Standby *standby_free(Standby *s)
{
        if (!s)
                return NULL;
        while (s->conns)
                conn_free(s, s->conns);
        epoch_discard(s);
        s->listener = link_listener_free(s->listener);
        s->gc_source = sd_event_source_disable_unref(s->gc_source);
        replica_clear(&s->replica);
        inc_staging_free(s);
        free(s->bitmap);
        SSL_CTX_free(s->tls);
        if (s->secret) {
                explicit_bzero(s->secret, s->secret_len);
                free(s->secret);
        }
        sd_event_unref(s->event);
        free(s);
        return NULL;
}

void standby_get_status(Standby *s, ReplStatus *ret)
{
        uint64_t sent = s->closed_bytes_sent, received = s->closed_bytes_received;

        *ret = (ReplStatus){.role = "standby"};
        for (Conn *c = s->conns; c; c = c->next) {
                LinkStats ls;
                link_get_stats(c->link, &ls);
                sent += ls.bytes_sent;
                received += ls.bytes_received;
        }
        if (s->note_state)
                ret->state = s->note_state;
        else if (s->active)
                ret->state = s->active->commits > 0 ? "protected" : "syncing";
        else
                ret->state = s->failed && !s->stopped ? "failed" : "listening";
        if (s->note[0])
                snprintf(ret->detail, sizeof(ret->detail), "%s", s->note);
        else if (s->active && s->active->commits > 0 && s->replica.valid)
                /* s->detail says how this session began ("full sync", "resyncing from ..."). */
                snprintf(ret->detail, sizeof(ret->detail), "replica of epoch %" PRIu64 " from %s",
                         s->replica.epoch, s->active->peer);
        else
                snprintf(ret->detail, sizeof(ret->detail), "%s", s->detail);
        if (s->active) {
                ret->link_up = link_state(s->active->link) == LINK_UP;
                snprintf(ret->peer, sizeof(ret->peer), "%s", s->active->peer);
        }
        ret->last_committed = s->replica.valid ? s->replica.epoch : 0;
        ret->epochs_committed = s->epochs_committed;
        ret->full_syncs = s->full_syncs;
        ret->incremental_syncs = s->incremental_syncs;
        ret->pages_last_epoch = s->pages_last_epoch;
        ret->dirty_pages_per_s = s->dirty_pages_per_s;
        ret->bytes_sent = sent;
        ret->bytes_received = received;
        ret->inflight = s->st.open ? 1 : 0;
        ret->compression_ratio =
                s->wire_bytes_total > 0 ? (double) s->page_bytes_total / (double) s->wire_bytes_total : 0.0;
        ret->staging_bytes = s->st.open ? s->st.distinct * PAGE_BYTES : 0;
}

static int open_output(const char *path, mode_t mode)
{
        return RET_NERRNO(open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOCTTY, mode));
}

int standby_hash_replica(Standby *s, const char *path, uint64_t *ret_epoch)
{
        _cleanup_free_ uint8_t *buf = NULL;
        _cleanup_close_ int fd = -EBADF;
        const Replica *rep;
        size_t n = 0;
        int r;

        if (!s || !path)
                return -EINVAL;
        rep = &s->replica;
        if (!rep->valid)
                return -ENODATA;
        buf = malloc(HASH_CHUNK_PAGES * 4);
        if (!buf)
                return -ENOMEM;
        fd = open_output(path, 0644);
        if (fd < 0)
                return fd;
        /* Page order is VM-wide page order: regions in layout order. */
        for (size_t i = 0; i < rep->layout.n_regions; i++) {
                const Region *reg = &rep->layout.regions[i];
                for (uint64_t off = 0; off < reg->size; off += PAGE_BYTES) {
                        put_le32(buf + n * 4, crc32c(0, rep->map + reg->fd_offset + off, PAGE_BYTES));
                        if (++n == HASH_CHUNK_PAGES) {
                                r = loop_write(fd, buf, n * 4);
                                if (r < 0)
                                        return r;
                                n = 0;
                        }
                }
        }
        r = loop_write(fd, buf, n * 4);
        if (r < 0)
                return r;
        if (ret_epoch)
                *ret_epoch = rep->epoch;
        return 0;
}

int standby_dump_replica(Standby *s, const char *ram_path, const char *state_path, uint64_t *ret_epoch)
{
        _cleanup_close_ int ram = -EBADF, state = -EBADF;
        const Replica *rep;
        int r;

        if (!s || !ram_path || !state_path)
                return -EINVAL;
        rep = &s->replica;
        if (!rep->valid)
                return -ENODATA;
        /* Guest memory and state: readable by the owner only. */
        ram = open_output(ram_path, 0600);
        if (ram < 0)
                return ram;
        /* Zero pages are left as holes: the file is as sparse as the replica. */
        for (uint64_t off = 0; off < rep->layout.memfd_size; off += PAGE_BYTES) {
                if (page_is_zero(rep->map + off))
                        continue;
                if (lseek(ram, (off_t) off, SEEK_SET) < 0)
                        return -errno;
                r = loop_write(ram, rep->map + off, PAGE_BYTES);
                if (r < 0)
                        return r;
        }
        if (ftruncate(ram, (off_t) rep->layout.memfd_size) < 0)
                return -errno;

        state = open_output(state_path, 0600);
        if (state < 0)
                return state;
        r = loop_write(state, rep->state, rep->state_len);
        if (r < 0)
                return r;
        if (ret_epoch)
                *ret_epoch = rep->epoch;
        return 0;
}

void standby_set_lost_callback(Standby *s, StandbyLostFn fn, void *userdata)
{
        s->lost_cb = fn;
        s->lost_userdata = userdata;
}

void standby_set_note(Standby *s, const char *state, const char *note)
{
        s->note_state = state;
        snprintf(s->note, sizeof(s->note), "%s", note ? note : "");
}

bool standby_primary_connected(Standby *s)
{
        return s && s->active && !s->active->dead;
}

bool standby_replica_epoch(Standby *s, uint64_t *ret_epoch)
{
        if (!s || !s->replica.valid)
                return false;
        if (ret_epoch)
                *ret_epoch = s->replica.epoch;
        return true;
}

int standby_listen_address(Standby *s, char *buf, size_t len)
{
        struct sockaddr_storage ss;
        socklen_t sl;
        int r;

        if (!s || !buf)
                return -EINVAL;
        if (!s->listener)
                return -ENOTCONN;
        r = link_listener_address(s->listener, &ss, &sl);
        if (r < 0)
                return r;
        return format_socket_address(&ss, sl, buf, len);
}

/* ---- the replica outside a Standby ------------------------------------------------------ */

static void close_everything(Standby *s, int code, const char *reason)
{
        if (code != 0 && s->active && !s->active->dead) {
                Link *l = s->active->link;

                /* on_down runs inside; code is not a loss, so no lost callback. */
                link_fail(l, code, "%s", reason);
                /* link_free() drops what is still queued: let the ERROR leave (bounded; the
                 * writer signals each frame that leaves, no polling). */
                (void) link_wait_sent(l, 200 * USEC_PER_MSEC);
        }
        while (s->conns)
                conn_free(s, s->conns);
        epoch_discard(s);
        s->listener = link_listener_free(s->listener);
}

int standby_release_replica(Standby *s, int code, const char *reason, StandbyReplica **ret)
{
        StandbyReplica *rep;

        if (!s || !ret)
                return -EINVAL;
        if (!s->replica.valid)
                return -ENODATA;
        rep = calloc(1, sizeof(*rep));
        if (!rep)
                return -ENOMEM;
        close_everything(s, code, reason ? reason : "standby stopping");
        rep->r = s->replica;
        s->replica = (Replica){.fd = -EBADF};
        *ret = rep;
        return 0;
}

int standby_adopt_replica(Standby *s, StandbyReplica *rep)
{
        if (!s || !rep)
                return -EINVAL;
        if (s->listener || s->replica.valid || s->conns)
                return -EBUSY;
        replica_clear(&s->replica);
        s->replica = rep->r;
        free(rep);
        return 0;
}

StandbyReplica *standby_replica_free(StandbyReplica *rep)
{
        if (!rep)
                return NULL;
        replica_clear(&rep->r);
        free(rep);
        return NULL;
}

uint64_t standby_replica_get_epoch(const StandbyReplica *rep)
{
        return rep ? rep->r.epoch : 0;
}

bool standby_replica_is_stale(const StandbyReplica *rep)
{
        return rep && rep->r.stale;
}

void standby_replica_set_stale(StandbyReplica *rep, bool stale)
{
        if (rep)
                rep->r.stale = stale;
}

bool standby_replica_stale(Standby *s)
{
        return s && s->replica.valid && s->replica.stale;
}

int standby_replica_activation(const StandbyReplica *rep, int *ret_fd, const uint8_t **ret_state,
                               size_t *ret_state_len)
{
        int fd;

        if (!rep || !rep->r.valid || !ret_fd || !ret_state || !ret_state_len)
                return -EINVAL;
        fd = fcntl(rep->r.fd, F_DUPFD_CLOEXEC, 3);
        if (fd < 0)
                return -errno;
        *ret_fd = fd;
        *ret_state = rep->r.state;
        *ret_state_len = rep->r.state_len;
        return 0;
}

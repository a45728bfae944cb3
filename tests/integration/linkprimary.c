/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * dr-linkprimary: the primary's side of the replication protocol over the
 * real Link (daemon/link.c), on synthetic RAM instead of a VM, so a real
 * standby dirtyrepd can be driven through its whole life (reload, stop and
 * start, detach, maintenance) on a machine without /dev/kvm. It is not a
 * stand-in for the primary dirtyrepd (the operator-* tests use that): it
 * checks the standby's side, and whether the standby kept its replica.
 *
 *   dr-linkprimary --connect ADDR:PORT --secret FILE --name VM --pages N
 *                  [--interval-ms MS] [--hash FILE]
 *
 * One session (a random id) for the process's life. Epoch 1 is full; every
 * interval one epoch changes 16 pages of the model RAM and is sent once the
 * previous one is acknowledged (one epoch in flight). A lost link is retried
 * every 100 ms; the Welcome decides the resync as the real primary does:
 * this session's epoch still covered (the last acked, or the one in flight)
 * means an incremental epoch on it, anything else a full one. SIGUSR1 stops
 * sending new epochs (the model is frozen at the last one sent), SIGUSR2
 * resumes; each says so on stdout ("paused at N", "resumed"). After every ACK the model's page hash file
 * (one LE CRC32C per page, as `hash` on the debug socket writes it) goes to --hash.
 *
 * stdout, one event per line: "up lc=N session=ours|other|none",
 * "ack N full|inc", "down CODE REASON".
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "crc32c.h"
#include "link.h"
#include "log.h"
#include "pages.h"
#include "replication.pb-c.h"
#include "util.h"

#define CHANGED_PER_EPOCH 16u

typedef struct P {
        sd_event *e;
        struct sockaddr_storage sa;
        socklen_t salen;
        char peer[128];
        uint8_t *secret;
        size_t secret_len;
        Dr__Repl__Hello hello;
        Dr__Repl__MemRegion region, *regions[1];
        uint8_t session[16], uuid[16];
        Link *link;
        bool up, paused;
        uint64_t n_pages;
        uint8_t *ram;
        uint64_t sealed, acked; /* last sent, last acknowledged (0: none) */
        bool inflight, need_full;
        uint64_t inflight_base; /* 0: full */
        uint64_t *dirty;        /* pages changed in the epoch in flight */
        size_t n_dirty;
        const char *hash_path;
        uint32_t interval_ms;
        sd_event_source *timer, *retry;
} P;

static void fill(uint8_t *b, size_t len, uint32_t seed)
{
        seed |= 1;
        for (size_t i = 0; i < len; i++) {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                b[i] = (uint8_t) seed;
        }
}

static int send_pages(P *p, uint64_t epoch, const uint64_t *pages, size_t n)
{
        static uint8_t buf[PAGE_BATCH_HEADER + 256 * PAGE_RECORD_MAX];
        PageBatch b;
        size_t i = 0;
        int r;

        while (i < n) {
                r = page_batch_init(&b, epoch, buf, sizeof(buf), 256, true, NULL);
                if (r < 0)
                        return r;
                for (; i < n; i++) {
                        const uint8_t *d = p->ram + pages[i] * PAGE_BYTES;
                        r = page_is_zero(d) ? page_batch_add_zero(&b, pages[i])
                                            : page_batch_add(&b, pages[i], d);
                        if (r == -ENOSPC)
                                break;
                        if (r < 0)
                                return r;
                }
                r = link_send(p->link, DR__REPL__FRAME_TYPE__FRAME_PAGES, buf, page_batch_finish(&b), true);
                if (r < 0)
                        return r;
        }
        return 0;
}

/* Sends epoch p->sealed + 1: full (every page), or incremental on base with pages[]. */
static int send_epoch(P *p, bool full, uint64_t base, const uint64_t *pages, size_t n)
{
        Dr__Repl__EpochBegin b = DR__REPL__EPOCH_BEGIN__INIT;
        Dr__Repl__EpochState s = DR__REPL__EPOCH_STATE__INIT;
        Dr__Repl__EpochEnd end = DR__REPL__EPOCH_END__INIT;
        _cleanup_free_ uint64_t *all = NULL;
        uint64_t epoch = p->sealed + 1;
        char state[64];
        int r;

        if (full) {
                all = malloc(p->n_pages * sizeof(uint64_t));
                if (!all)
                        return -ENOMEM;
                for (uint64_t i = 0; i < p->n_pages; i++)
                        all[i] = i;
                pages = all;
                n = p->n_pages;
        }
        b.epoch = epoch;
        b.full = full;
        b.has_base_epoch = !full;
        b.base_epoch = base;
        r = link_send_message(p->link, DR__REPL__FRAME_TYPE__FRAME_EPOCH_BEGIN, &b.base, true);
        if (r >= 0)
                r = send_pages(p, epoch, pages, n);
        snprintf(state, sizeof(state), "linkprimary-state-%" PRIu64, epoch);
        s.epoch = epoch;
        s.vmstate = (ProtobufCBinaryData){strlen(state), (uint8_t *) state};
        if (r >= 0)
                r = link_send_message(p->link, DR__REPL__FRAME_TYPE__FRAME_STATE, &s.base, true);
        end.epoch = epoch;
        end.page_records = n;
        end.distinct_pages = n; /* pages[] never repeats */
        if (r >= 0)
                r = link_send_message(p->link, DR__REPL__FRAME_TYPE__FRAME_EPOCH_END, &end.base, true);
        if (r < 0)
                return r;
        p->sealed = epoch;
        p->inflight = true;
        p->inflight_base = full ? 0 : base;
        return 0;
}

/* A new epoch: 16 distinct pages of the model change. */
static void next_epoch(P *p)
{
        if (!p->up || p->inflight || p->paused)
                return;
        if (p->need_full) {
                if (send_epoch(p, true, 0, NULL, 0) >= 0)
                        p->need_full = false;
                return;
        }
        p->n_dirty = 0;
        for (uint32_t i = 0; i < CHANGED_PER_EPOCH && i < p->n_pages; i++) {
                uint64_t pg = ((p->sealed + 1) * 7919u + i * 104729u) % p->n_pages;
                bool dup = false;
                for (size_t j = 0; j < p->n_dirty; j++)
                        dup |= p->dirty[j] == pg;
                if (dup)
                        continue;
                p->dirty[p->n_dirty++] = pg;
                if (i % 5 == 4)
                        memset(p->ram + pg * PAGE_BYTES, 0, PAGE_BYTES);
                else
                        fill(p->ram + pg * PAGE_BYTES, PAGE_BYTES, (uint32_t) (p->sealed * 31 + i + 1));
        }
        (void) send_epoch(p, false, p->acked, p->dirty, p->n_dirty);
}

static void write_hash(P *p)
{
        _cleanup_free_ uint8_t *h = NULL;
        char tmp[4096];
        int fd;

        if (!p->hash_path)
                return;
        h = malloc(p->n_pages * 4);
        if (!h)
                return;
        for (uint64_t i = 0; i < p->n_pages; i++) {
                uint32_t c = crc32c(0, p->ram + i * PAGE_BYTES, PAGE_BYTES);
                for (int k = 0; k < 4; k++)
                        h[i * 4 + k] = (uint8_t) (c >> (8 * k));
        }
        snprintf(tmp, sizeof(tmp), "%s.tmp", p->hash_path);
        fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd < 0)
                return;
        if (loop_write(fd, h, p->n_pages * 4) >= 0)
                (void) rename(tmp, p->hash_path);
        close(fd);
}

static int on_up(Link *l, const Dr__Repl__Welcome *w, void *userdata)
{
        P *p = userdata;
        bool ours = w->has_session && w->session.len == 16 && memcmp(w->session.data, p->session, 16) == 0;
        uint64_t lc = w->has_last_committed ? w->last_committed : 0;

        printf("up lc=%" PRIu64 " session=%s\n", lc, !w->has_session ? "none" : ours ? "ours" : "other");
        p->up = true;
        if (ours && p->inflight && lc == p->sealed) { /* committed, its ACK lost with the old link */
                p->acked = lc;
                p->inflight = false;
        }
        if (ours && lc == p->acked && p->acked > 0) {
                if (p->inflight) /* the epoch in flight again, under a new number, on the same base */
                        (void) send_epoch(p, false, p->acked, p->dirty, p->n_dirty);
                else
                        next_epoch(p);
        } else {
                p->inflight = false;
                p->need_full = true;
                next_epoch(p);
        }
        return 0;
}

static int on_frame(Link *l, uint16_t type, const uint8_t *payload, size_t len, void *userdata)
{
        P *p = userdata;
        Dr__Repl__Ack *a;

        if (type != DR__REPL__FRAME_TYPE__FRAME_ACK)
                return -EBADMSG;
        a = dr__repl__ack__unpack(NULL, len, payload);
        if (!a)
                return -EBADMSG;
        if (p->inflight && a->epoch == p->sealed) {
                printf("ack %" PRIu64 " %s\n", a->epoch, p->inflight_base ? "inc" : "full");
                p->acked = a->epoch;
                p->inflight = false;
                write_hash(p);
        }
        dr__repl__ack__free_unpacked(a, NULL);
        return 0;
}

static int on_retry(sd_event_source *s, uint64_t usec, void *userdata);

static void on_down(Link *l, int error, const char *reason, void *userdata)
{
        P *p = userdata;

        printf("down %d %s\n", error, reason);
        p->up = false;
        /* Freed from the retry timer: never inside its own callback. */
        (void) sd_event_source_set_time_relative(p->retry, 100 * USEC_PER_MSEC);
        (void) sd_event_source_set_enabled(p->retry, SD_EVENT_ONESHOT);
}

static void fill_heartbeat(Link *l, Dr__Repl__Heartbeat *hb, void *userdata)
{
        P *p = userdata;
        hb->has_last_sealed = true;
        hb->last_sealed = p->sealed;
}

static const LinkCallbacks callbacks = {
        .on_up = on_up,
        .on_frame = on_frame,
        .on_down = on_down,
        .fill_heartbeat = fill_heartbeat,
};

static int on_retry(sd_event_source *s, uint64_t usec, void *userdata)
{
        P *p = userdata;
        LinkParams lp = {
                .side = LINK_PRIMARY,
                .secret = p->secret,
                .secret_len = p->secret_len,
                .heartbeat_ms = 50,
                .heartbeat_misses = 20,
                .hello = &p->hello,
                .peer_name = p->peer,
        };
        int r;

        p->link = link_free(p->link);
        r = link_connect(p->e, (struct sockaddr *) &p->sa, p->salen, &lp, &callbacks, p, &p->link);
        if (r < 0) {
                (void) sd_event_source_set_time_relative(p->retry, 100 * USEC_PER_MSEC);
                (void) sd_event_source_set_enabled(p->retry, SD_EVENT_ONESHOT);
        }
        return 0;
}

static int on_timer(sd_event_source *s, uint64_t usec, void *userdata)
{
        P *p = userdata;
        next_epoch(p);
        (void) sd_event_source_set_time(s, usec + (uint64_t) p->interval_ms * USEC_PER_MSEC);
        return 0;
}

static int on_signal(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata)
{
        P *p = userdata;

        if (si->ssi_signo == SIGUSR1) {
                p->paused = true;
                printf("paused at %" PRIu64 "\n", p->sealed);
        } else if (si->ssi_signo == SIGUSR2) {
                p->paused = false;
                printf("resumed\n");
        } else
                return sd_event_exit(sd_event_source_get_event(s), 0);
        return 0;
}

int main(int argc, char *argv[])
{
        static const struct option opts[] = {
                {"connect", required_argument, NULL, 'c'},
                {"secret", required_argument, NULL, 's'},
                {"name", required_argument, NULL, 'n'},
                {"pages", required_argument, NULL, 'p'},
                {"interval-ms", required_argument, NULL, 'i'},
                {"hash", required_argument, NULL, 'h'},
                {},
        };
        static const char label[] = "dirtyrep-vm-uuid:";
        const char *connect_to = NULL, *secret_file = NULL, *name = NULL;
        uint8_t digest[EVP_MAX_MD_SIZE];
        unsigned dlen = 0;
        uint64_t pages = 1024, now;
        sigset_t mask;
        P p = {.interval_ms = 50};
        int c, r, fd;

        setvbuf(stdout, NULL, _IOLBF, 0);
        while ((c = getopt_long(argc, argv, "", opts, NULL)) >= 0)
                switch (c) {
                case 'c':
                        connect_to = optarg;
                        break;
                case 's':
                        secret_file = optarg;
                        break;
                case 'n':
                        name = optarg;
                        break;
                case 'p':
                        if (parse_u64(optarg, &pages) < 0 || pages == 0 || pages > (1u << 20))
                                return fprintf(stderr, "--pages: 1..1048576\n"), 2;
                        break;
                case 'i':
                        if (parse_u32(optarg, &p.interval_ms) < 0 || p.interval_ms == 0)
                                return fprintf(stderr, "--interval-ms: a positive number\n"), 2;
                        break;
                case 'h':
                        p.hash_path = optarg;
                        break;
                default:
                        return 2;
                }
        if (!connect_to || !secret_file || !name)
                return fprintf(stderr, "usage: dr-linkprimary --connect ADDR:PORT --secret FILE --name VM "
                                       "[--pages N] [--interval-ms MS] [--hash FILE]\n"),
                       2;
        if (parse_socket_address(connect_to, &p.sa, &p.salen, false) < 0)
                return fprintf(stderr, "bad --connect %s\n", connect_to), 2;
        snprintf(p.peer, sizeof(p.peer), "%s", connect_to);
        p.secret = malloc(4096);
        fd = open(secret_file, O_RDONLY | O_CLOEXEC);
        if (!p.secret || fd < 0)
                return fprintf(stderr, "cannot read %s\n", secret_file), 1;
        r = (int) loop_read_upto(fd, p.secret, 4096);
        close(fd);
        if (r <= 0)
                return fprintf(stderr, "cannot read %s\n", secret_file), 1;
        p.secret_len = (size_t) r;

        if (EVP_Digest(label, strlen(label), digest, &dlen, EVP_sha256(), NULL) != 1)
                return 1;
        {
                EVP_MD_CTX *md = EVP_MD_CTX_new();
                if (!md || EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1 ||
                    EVP_DigestUpdate(md, label, strlen(label)) != 1 ||
                    EVP_DigestUpdate(md, name, strlen(name)) != 1 ||
                    EVP_DigestFinal_ex(md, digest, &dlen) != 1)
                        return 1;
                EVP_MD_CTX_free(md);
        }
        memcpy(p.uuid, digest, 16);
        if (RAND_bytes(p.session, sizeof(p.session)) != 1)
                return 1;
        p.n_pages = pages;
        p.ram = calloc(pages, PAGE_BYTES);
        p.dirty = calloc(CHANGED_PER_EPOCH, sizeof(uint64_t));
        if (!p.ram || !p.dirty)
                return 1;
        fill(p.ram, pages * PAGE_BYTES / 2, 77); /* the upper half stays zero */

        p.region = (Dr__Repl__MemRegion) DR__REPL__MEM_REGION__INIT;
        p.region.size = pages * PAGE_BYTES;
        p.regions[0] = &p.region;
        p.hello = (Dr__Repl__Hello) DR__REPL__HELLO__INIT;
        p.hello.vm_name = (char *) name;
        p.hello.vm_uuid = (ProtobufCBinaryData){16, p.uuid};
        p.hello.session = (ProtobufCBinaryData){16, p.session};
        p.hello.page_size = PAGE_BYTES;
        p.hello.n_regions = 1;
        p.hello.regions = p.regions;

        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigaddset(&mask, SIGUSR1);
        sigaddset(&mask, SIGUSR2);
        sigprocmask(SIG_BLOCK, &mask, NULL);
        signal(SIGPIPE, SIG_IGN);
        if (sd_event_default(&p.e) < 0)
                return 1;
        for (int sig = 0; sig < 4; sig++)
                (void) sd_event_add_signal(p.e, NULL, (int[]){SIGTERM, SIGINT, SIGUSR1, SIGUSR2}[sig],
                                           on_signal, &p);
        now = now_usec();
        r = sd_event_add_time(p.e, &p.retry, CLOCK_MONOTONIC, now, 1000, on_retry, &p);
        if (r >= 0)
                r = sd_event_source_set_enabled(p.retry, SD_EVENT_ONESHOT);
        if (r >= 0)
                r = sd_event_add_time(p.e, &p.timer, CLOCK_MONOTONIC, now + 1000, 1000, on_timer, &p);
        if (r >= 0)
                r = sd_event_source_set_enabled(p.timer, SD_EVENT_ON);
        if (r < 0)
                return 1;
        r = sd_event_loop(p.e);
        p.link = link_free(p.link);
        sd_event_source_disable_unref(p.timer);
        sd_event_source_disable_unref(p.retry);
        sd_event_unref(p.e);
        free(p.ram);
        free(p.dirty);
        free(p.secret);
        return r < 0 ? 1 : 0;
}

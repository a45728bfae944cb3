/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The standby role (daemon/standby.c) against a fake primary in the same
 * process: one sd-event loop, a Standby listening on 127.0.0.1:0, and a
 * primary-side Link (link_connect) that sends epochs built with
 * page_batch_*(). The test keeps its own model of guest RAM and compares
 * the standby's page hash file (standby_hash_replica) with the model's
 * hashes: that is the check a user makes (replica == primary RAM at seal).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <sys/stat.h>
#include <systemd/sd-event.h>

#include "config.h"
#include "crc32c.h"
#include "frame.h"
#include "link.h"
#include "macros.h"
#include "pages.h"
#include "role.h"
#include "tests.h"
#include "util.h"

#define RUN_UNTIL(e, cond, ms)                                                                              \
        ({                                                                                                  \
                uint64_t _end = now_usec() + (uint64_t) (ms) *1000u;                                        \
                while (!(cond) && now_usec() < _end)                                                        \
                        ASSERT_TRUE(sd_event_run((e), 5000) >= 0);                                          \
                (cond);                                                                                     \
        })

#define ASSERT_CONTAINS(hay, needle)                                                                        \
        do {                                                                                                \
                if (!strstr((hay), (needle))) {                                                             \
                        fprintf(stderr, "%s:%d: \"%s\" does not contain \"%s\"\n", __FILE__, __LINE__,      \
                                (hay), (needle));                                                           \
                        exit(1);                                                                            \
                }                                                                                           \
        } while (0)

static const uint8_t SECRET[] = "correct horse battery staple";
static const uint8_t UUID[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};

/* Two regions with a gap in the memfd between them, so memfd layout != page order. */
#define R0_PAGES      64u
#define R1_PAGES      32u
#define R1_MEMFD_PAGE 128u
#define N_PAGES       (R0_PAGES + R1_PAGES)

typedef struct Prim {
        Link *link;
        unsigned ups, downs;
        bool welcome_has_lc;
        uint64_t welcome_lc;
        uint8_t welcome_session[16];
        size_t welcome_session_len;
        uint64_t acks, last_ack;
        int down_error;
        char down_reason[512];
} Prim;

typedef struct Fixture {
        sd_event *e;
        DaemonConfig d;
        VmConfig vm;
        Standby *s;
        struct sockaddr_storage addr;
        socklen_t addr_len;
        uint8_t session[16];
        Dr__Repl__MemRegion regions[2];
        Dr__Repl__MemRegion *region_ptrs[2];
        size_t n_regions;
        uint64_t n_pages;
        uint8_t *ram; /* the model: n_pages pages in VM-wide page order */
        char dir[64];
} Fixture;

static void fill_random(uint8_t *buf, size_t len, uint32_t seed)
{
        seed |= 1;
        for (size_t i = 0; i < len; i++) {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                buf[i] = (uint8_t) seed;
        }
}

static void fixture_init_layout(Fixture *f, uint64_t r0_pages, uint64_t r1_pages, uint32_t max_staging_mb)
{
        char addr[64];

        memset(f, 0, sizeof(*f));
        ASSERT_OK(sd_event_new(&f->e));
        f->d = (DaemonConfig){.heartbeat_interval_ms = 50, .heartbeat_misses = 40};
        f->vm = (VmConfig){.name = (char *) "vm0", .max_staging_mb = max_staging_mb};
        ASSERT_OK(parse_socket_address("127.0.0.1:0", &f->vm.listen.sa, &f->vm.listen.len, true));
        snprintf(f->vm.listen.text, sizeof(f->vm.listen.text), "127.0.0.1:0");

        f->n_regions = 2;
        f->regions[0] = (Dr__Repl__MemRegion) DR__REPL__MEM_REGION__INIT;
        f->regions[0].slot = 0;
        f->regions[0].guest_phys = 0;
        f->regions[0].size = r0_pages * 4096;
        f->regions[0].memfd_offset = 0;
        f->regions[1] = (Dr__Repl__MemRegion) DR__REPL__MEM_REGION__INIT;
        f->regions[1].slot = 1;
        f->regions[1].guest_phys = UINT64_C(1) << 32;
        f->regions[1].size = r1_pages * 4096;
        f->regions[1].memfd_offset = (r0_pages + R1_MEMFD_PAGE - R0_PAGES) * 4096;
        f->region_ptrs[0] = &f->regions[0];
        f->region_ptrs[1] = &f->regions[1];
        f->n_pages = r0_pages + r1_pages;
        f->ram = calloc(f->n_pages, 4096);
        ASSERT_TRUE(f->ram);
        fill_random(f->session, sizeof(f->session), 4242);

        ASSERT_OK(standby_new(f->e, &f->d, &f->vm, SECRET, sizeof(SECRET), &f->s));
        ASSERT_OK(standby_start(f->s));
        ASSERT_OK(standby_listen_address(f->s, addr, sizeof(addr)));
        ASSERT_OK(parse_socket_address(addr, &f->addr, &f->addr_len, false));

        snprintf(f->dir, sizeof(f->dir), "/tmp/test-standby-XXXXXX");
        ASSERT_TRUE(mkdtemp(f->dir));
}

static void fixture_init(Fixture *f)
{
        fixture_init_layout(f, R0_PAGES, R1_PAGES, 256);
}

static void prim_free(Prim *p)
{
        p->link = link_free(p->link);
}

static void fixture_done(Fixture *f)
{
        char cmd[128];

        f->s = standby_free(f->s);
        /* Let the loop settle what the freed links left behind. */
        (void) sd_event_run(f->e, 0);
        f->e = sd_event_unref(f->e);
        free(f->ram);
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", f->dir);
        ASSERT_EQ(system(cmd), 0);
}

/* ---- the fake primary ---- */

static int p_on_up(Link *l, const Dr__Repl__Welcome *w, void *userdata)
{
        Prim *p = userdata;
        p->ups++;
        p->welcome_has_lc = w->has_last_committed;
        p->welcome_lc = w->last_committed;
        p->welcome_session_len = w->has_session ? w->session.len : 0;
        if (p->welcome_session_len == 16)
                memcpy(p->welcome_session, w->session.data, 16);
        return 0;
}

static int p_on_frame(Link *l, uint16_t type, const uint8_t *payload, size_t len, void *userdata)
{
        Prim *p = userdata;
        Dr__Repl__Ack *a;

        ASSERT_EQ(type, DR__REPL__FRAME_TYPE__FRAME_ACK);
        a = dr__repl__ack__unpack(NULL, len, payload);
        ASSERT_TRUE(a);
        p->acks++;
        p->last_ack = a->epoch;
        dr__repl__ack__free_unpacked(a, NULL);
        return 0;
}

static void p_on_down(Link *l, int error, const char *reason, void *userdata)
{
        Prim *p = userdata;
        p->downs++;
        p->down_error = error;
        snprintf(p->down_reason, sizeof(p->down_reason), "%s", reason);
        fprintf(stderr, "  primary down (%d): %s\n", error, reason);
}

static const LinkCallbacks primary_cb = {
        .on_up = p_on_up,
        .on_frame = p_on_frame,
        .on_down = p_on_down,
};

static void prim_connect_as(Fixture *f, Prim *p, const char *vm_name)
{
        Dr__Repl__Hello h = DR__REPL__HELLO__INIT;
        LinkParams lp = {
                .side = LINK_PRIMARY,
                .secret = SECRET,
                .secret_len = sizeof(SECRET),
                .heartbeat_ms = 50,
                .heartbeat_misses = 40,
                .handshake_timeout_ms = 5000,
                .hello = &h,
        };

        memset(p, 0, sizeof(*p));
        h.vm_name = (char *) vm_name;
        h.vm_uuid = (ProtobufCBinaryData){16, (uint8_t *) UUID};
        h.session = (ProtobufCBinaryData){16, f->session};
        h.page_size = 4096;
        h.n_regions = f->n_regions;
        h.regions = f->region_ptrs;
        ASSERT_OK(link_connect(f->e, (struct sockaddr *) &f->addr, f->addr_len, &lp, &primary_cb, p,
                               &p->link));
}

/* Connects and waits until the standby made it the active primary. */
static void prim_connect(Fixture *f, Prim *p)
{
        ReplStatus st;

        prim_connect_as(f, p, "vm0");
        ASSERT_TRUE(RUN_UNTIL(f->e, p->ups == 1 || p->downs > 0, 5000));
        ASSERT_EQ(p->ups, 1);
        standby_get_status(f->s, &st);
        ASSERT_TRUE(streq(st.state, "syncing") || streq(st.state, "protected"));
}

static void send_frame(Prim *p, uint16_t type, const void *payload, size_t len)
{
        ASSERT_OK(link_send(p->link, type, payload, len, false));
}

static void send_begin(Prim *p, uint64_t epoch, bool full, uint64_t base)
{
        Dr__Repl__EpochBegin b = DR__REPL__EPOCH_BEGIN__INIT;
        b.epoch = epoch;
        b.full = full;
        b.has_base_epoch = !full;
        b.base_epoch = base;
        ASSERT_OK(link_send_message(p->link, DR__REPL__FRAME_TYPE__FRAME_EPOCH_BEGIN, &b.base, false));
}

static void send_state(Prim *p, uint64_t epoch, const char *state)
{
        Dr__Repl__EpochState s = DR__REPL__EPOCH_STATE__INIT;
        s.epoch = epoch;
        s.vmstate = (ProtobufCBinaryData){strlen(state), (uint8_t *) state};
        ASSERT_OK(link_send_message(p->link, DR__REPL__FRAME_TYPE__FRAME_STATE, &s.base, false));
}

static void send_end(Prim *p, uint64_t epoch, uint64_t records, uint64_t distinct)
{
        Dr__Repl__EpochEnd m = DR__REPL__EPOCH_END__INIT;
        m.epoch = epoch;
        m.page_records = records;
        m.distinct_pages = distinct;
        ASSERT_OK(link_send_message(p->link, DR__REPL__FRAME_TYPE__FRAME_EPOCH_END, &m.base, false));
}

/*
 * Sends pages[] (VM-wide numbers, repeats allowed) of epoch from `data`
 * (n_pages pages in page order) in batches of at most `per_batch` records;
 * all-zero pages go as zero records. Returns the number of records.
 */
static uint64_t send_pages(Prim *p, uint64_t epoch, const uint8_t *data, const uint64_t *pages, size_t n,
                           uint32_t per_batch)
{
        static uint8_t buf[PAGE_BATCH_HEADER + 512 * PAGE_RECORD_MAX];
        PageBatch b;
        size_t i = 0;

        while (i < n) {
                ASSERT_OK(page_batch_init(&b, epoch, buf, sizeof(buf), per_batch, i % 2 == 0, NULL));
                for (; i < n; i++) {
                        const uint8_t *d = data + pages[i] * 4096;
                        int r = page_is_zero(d) ? page_batch_add_zero(&b, pages[i])
                                                : page_batch_add(&b, pages[i], d);
                        if (r == -ENOSPC)
                                break;
                        ASSERT_OK(r);
                }
                size_t len = page_batch_finish(&b);
                ASSERT_TRUE(len > 0);
                send_frame(p, DR__REPL__FRAME_TYPE__FRAME_PAGES, buf, len);
        }
        return n;
}

static uint64_t count_distinct(const uint64_t *pages, size_t n)
{
        uint64_t d = 0;
        for (size_t i = 0; i < n; i++) {
                bool dup = false;
                for (size_t j = 0; j < i && !dup; j++)
                        dup = pages[j] == pages[i];
                d += !dup;
        }
        return d;
}

/* One complete epoch: the model is already updated; waits for its ACK. */
static void epoch_send(Fixture *f, Prim *p, uint64_t epoch, bool full, uint64_t base, const uint64_t *pages,
                       size_t n, const char *state)
{
        uint64_t acks = p->acks;

        send_begin(p, epoch, full, base);
        if (n > 0)
                send_pages(p, epoch, f->ram, pages, n, 7);
        send_state(p, epoch, state);
        send_end(p, epoch, n, count_distinct(pages, n));
        ASSERT_TRUE(RUN_UNTIL(f->e, p->acks > acks || p->downs > 0, 5000));
        ASSERT_EQ(p->downs, 0);
        ASSERT_EQ(p->last_ack, epoch);
}

/* Full sync of the model: non-zero pages, plus every zero page as a zero record. */
static void epoch_full(Fixture *f, Prim *p, uint64_t epoch)
{
        _cleanup_free_ uint64_t *pages = calloc(f->n_pages, sizeof(uint64_t));
        ASSERT_TRUE(pages);
        for (uint64_t i = 0; i < f->n_pages; i++)
                pages[i] = f->n_pages - 1 - i; /* any order */
        epoch_send(f, p, epoch, true, 0, pages, f->n_pages, "state-full");
}

/* Dirties `n` pages of the model (some zeroed, some twice) and returns their numbers. */
static size_t model_dirty(Fixture *f, uint32_t seed, uint64_t *pages, size_t n)
{
        for (size_t i = 0; i < n; i++) {
                uint32_t x = seed * 2654435761u + (uint32_t) i * 40503u;
                pages[i] = (x >> 7) % f->n_pages;
                if (i % 5 == 4)
                        memset(f->ram + pages[i] * 4096, 0, 4096);
                else
                        fill_random(f->ram + pages[i] * 4096, 4096, x);
        }
        return n;
}

static void assert_replica(Fixture *f, uint64_t want_epoch)
{
        _cleanup_free_ uint8_t *got = NULL;
        char path[128];
        uint64_t epoch = 0;
        struct stat stb;
        int fd;

        snprintf(path, sizeof(path), "%s/hash", f->dir);
        ASSERT_OK(standby_hash_replica(f->s, path, &epoch));
        ASSERT_EQ(epoch, want_epoch);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        ASSERT_TRUE(fd >= 0);
        ASSERT_OK(fstat(fd, &stb));
        ASSERT_EQ(stb.st_size, f->n_pages * 4);
        got = malloc(f->n_pages * 4);
        ASSERT_TRUE(got);
        ASSERT_OK(loop_read_exact(fd, got, f->n_pages * 4));
        close(fd);
        for (uint64_t i = 0; i < f->n_pages; i++) {
                uint32_t want = crc32c(0, f->ram + i * 4096, 4096);
                if (get_le32(got + i * 4) != want) {
                        fprintf(stderr, "page %" PRIu64 ": replica crc %08x, model %08x\n", i,
                                get_le32(got + i * 4), want);
                        ASSERT_TRUE(false);
                }
        }
}

static void assert_status(Fixture *f, const char *state, const char *detail_part)
{
        ReplStatus st;

        standby_get_status(f->s, &st);
        if (!streq(st.state, state))
                fprintf(stderr, "state %s (detail: %s), want %s\n", st.state, st.detail, state);
        ASSERT_TRUE(streq(st.state, state));
        ASSERT_TRUE(streq(st.role, "standby"));
        if (detail_part)
                ASSERT_CONTAINS(st.detail, detail_part);
}

/* ---- tests ---- */

TEST(full_then_incremental)
{
        uint64_t pages[40];
        ReplStatus st;
        Fixture f;
        Prim p;

        fixture_init(&f);
        assert_status(&f, "listening", NULL);
        ASSERT_EQ(standby_hash_replica(f.s, "/nonexistent/x", NULL), -ENODATA);

        /* Model: region 0 random, region 1 mostly zero. */
        fill_random(f.ram, R0_PAGES * 4096, 7);
        fill_random(f.ram + (R0_PAGES + 3) * 4096, 4096, 9);

        prim_connect(&f, &p);
        ASSERT_TRUE(!p.welcome_has_lc);
        ASSERT_EQ(p.welcome_session_len, 0);
        assert_status(&f, "syncing", NULL);

        epoch_full(&f, &p, 1);
        assert_replica(&f, 1);
        assert_status(&f, "protected", "replica of epoch ");

        for (uint64_t e = 2; e <= 6; e++) {
                size_t n = model_dirty(&f, (uint32_t) e, pages, ELEMENTSOF(pages));
                epoch_send(&f, &p, e, false, e - 1, pages, n, "state-inc");
                assert_replica(&f, e);
        }
        /* An empty incremental epoch (nothing dirtied) is fine too. */
        epoch_send(&f, &p, 7, false, 6, pages, 0, "state-7");
        assert_replica(&f, 7);

        standby_get_status(f.s, &st);
        ASSERT_EQ(st.last_committed, 7);
        ASSERT_EQ(st.epochs_committed, 7);
        ASSERT_EQ(st.full_syncs, 1);
        ASSERT_EQ(st.incremental_syncs, 6);
        ASSERT_TRUE(st.link_up);
        ASSERT_CONTAINS(st.peer, "127.0.0.1:");
        ASSERT_TRUE(st.bytes_received > N_PAGES * 4096 / 2);
        ASSERT_EQ(st.inflight, 0);
        ASSERT_EQ(st.staging_bytes, 0);

        /* Dump: RAM in memfd layout (region 1 after a gap), state bytes. */
        {
                char ram[128], state[128], sbuf[32] = {};
                _cleanup_free_ uint8_t *buf = malloc(4096);
                uint64_t epoch = 0;
                struct stat stb;
                int fd;

                snprintf(ram, sizeof(ram), "%s/ram", f.dir);
                snprintf(state, sizeof(state), "%s/state", f.dir);
                ASSERT_OK(standby_dump_replica(f.s, ram, state, &epoch));
                ASSERT_EQ(epoch, 7);
                fd = open(ram, O_RDONLY | O_CLOEXEC);
                ASSERT_TRUE(fd >= 0);
                ASSERT_OK(fstat(fd, &stb));
                ASSERT_EQ(stb.st_size, (R1_MEMFD_PAGE + R1_PAGES) * 4096);
                for (uint64_t i = 0; i < N_PAGES; i++) {
                        uint64_t off = i < R0_PAGES ? i : R1_MEMFD_PAGE + (i - R0_PAGES);
                        ASSERT_EQ(pread(fd, buf, 4096, (off_t) (off * 4096)), 4096);
                        ASSERT_TRUE(memcmp(buf, f.ram + i * 4096, 4096) == 0);
                }
                close(fd);
                fd = open(state, O_RDONLY | O_CLOEXEC);
                ASSERT_TRUE(fd >= 0);
                ASSERT_EQ(read(fd, sbuf, sizeof(sbuf) - 1), 7);
                ASSERT_TRUE(streq(sbuf, "state-7"));
                close(fd);
        }

        prim_free(&p);
        ASSERT_TRUE(RUN_UNTIL(f.e, ({
                                      standby_get_status(f.s, &st);
                                      streq(st.state, "listening");
                              }),
                              5000));
        ASSERT_CONTAINS(st.detail, "primary lost");
        ASSERT_EQ(st.last_committed, 7);
        fixture_done(&f);
}

TEST(last_copy_wins)
{
        /* A page sent three times in one epoch (pre-copy, then re-copies): the last copy counts,
         * including a zero record after data, in both a full and an incremental epoch. */
        uint64_t pages[] = {5, 5, 70, 70, 5, 70};
        _cleanup_free_ uint8_t *first = malloc(4096), *second = malloc(4096);
        uint64_t acks;
        Fixture f;
        Prim p;

        fixture_init(&f);
        fill_random(f.ram, N_PAGES * 4096, 3);
        prim_connect(&f, &p);

        for (int round = 0; round < 2; round++) {
                bool full = round == 0;
                uint64_t epoch = 1 + round;
                fill_random(first, 4096, 100 + round);
                fill_random(second, 4096, 200 + round);

                acks = p.acks;
                send_begin(&p, epoch, full, epoch - 1);
                if (full)
                        send_pages(&p, epoch, f.ram, (uint64_t[]){0, 1, 2, 3, 4, 6, 7}, 7, 512);
                /* 5: first, second, then zero.  70: zero, first, then second. */
                memcpy(f.ram + 5 * 4096, first, 4096);
                memset(f.ram + 70 * 4096, 0, 4096);
                send_pages(&p, epoch, f.ram, pages, 2, 512);
                memcpy(f.ram + 5 * 4096, second, 4096);
                memcpy(f.ram + 70 * 4096, first, 4096);
                send_pages(&p, epoch, f.ram, pages + 2, 2, 512);
                memset(f.ram + 5 * 4096, 0, 4096);
                memcpy(f.ram + 70 * 4096, second, 4096);
                send_pages(&p, epoch, f.ram, pages + 4, 2, 512);
                send_state(&p, epoch, "s");
                send_end(&p, epoch, 6 + (full ? 7 : 0), 2 + (full ? 7 : 0));
                ASSERT_TRUE(RUN_UNTIL(f.e, p.acks > acks || p.downs, 5000));
                ASSERT_EQ(p.downs, 0);
                if (full) /* pages never sent in a full epoch are zero */
                        for (uint64_t i = 8; i < N_PAGES; i++)
                                if (i != 70)
                                        memset(f.ram + i * 4096, 0, 4096);
                assert_replica(&f, epoch);
        }
        prim_free(&p);
        fixture_done(&f);
}

TEST(partial_epoch_then_reconnect)
{
        _cleanup_free_ uint8_t *before = NULL;
        uint64_t pages[30];
        Fixture f;
        Prim p;

        fixture_init(&f);
        fill_random(f.ram, N_PAGES * 4096, 11);
        prim_connect(&f, &p);
        epoch_full(&f, &p, 1);
        epoch_send(&f, &p, 2, false, 1, pages, model_dirty(&f, 2, pages, 20), "s2");
        assert_replica(&f, 2);

        /* Epoch 3: pages and state arrive, the link drops before EPOCH_END. */
        before = malloc(N_PAGES * 4096);
        ASSERT_TRUE(before);
        memcpy(before, f.ram, N_PAGES * 4096);
        model_dirty(&f, 3, pages, ELEMENTSOF(pages));
        send_begin(&p, 3, false, 2);
        send_pages(&p, 3, f.ram, pages, ELEMENTSOF(pages), 512);
        send_state(&p, 3, "s3");
        /* Let the standby stage all of it before the cut. */
        ASSERT_TRUE(RUN_UNTIL(f.e, ({
                                      ReplStatus st;
                                      standby_get_status(f.s, &st);
                                      st.staging_bytes > 0;
                              }),
                              5000));
        {
                /* Mid-epoch, the hooks see the committed epoch 2, nothing staged. */
                uint8_t *dirty = f.ram;
                f.ram = before;
                assert_replica(&f, 2);
                f.ram = dirty;
        }
        prim_free(&p);
        ASSERT_TRUE(RUN_UNTIL(f.e, ({
                                      ReplStatus st;
                                      standby_get_status(f.s, &st);
                                      streq(st.state, "listening");
                              }),
                              5000));
        memcpy(f.ram, before, N_PAGES * 4096); /* the primary's RAM at seal 2 */
        assert_replica(&f, 2);

        /* Same primary session reconnects: Welcome says where the replica is. */
        prim_connect(&f, &p);
        ASSERT_TRUE(p.welcome_has_lc);
        ASSERT_EQ(p.welcome_lc, 2);
        ASSERT_EQ(p.welcome_session_len, 16);
        ASSERT_TRUE(memcmp(p.welcome_session, f.session, 16) == 0);
        assert_status(&f, "syncing", "resyncing from epoch 2");

        /* Resync: one incremental epoch on base 2 covering everything dirtied since. */
        model_dirty(&f, 3, pages, ELEMENTSOF(pages));
        epoch_send(&f, &p, 3, false, 2, pages, ELEMENTSOF(pages), "s3");
        assert_replica(&f, 3);
        assert_status(&f, "protected", "replica of epoch ");
        prim_free(&p);
        fixture_done(&f);
}

static unsigned lost_calls;
static int lost_error;

static void on_lost(Standby *s, int error, const char *reason, void *userdata)
{
        lost_calls++;
        lost_error = error;
}

static bool detail_has(Fixture *f, const char *part)
{
        ReplStatus st;

        standby_get_status(f->s, &st);
        return strstr(st.detail, part) != NULL;
}

TEST(reported_link_loss_waits_for_reconnect)
{
        /* A primary that reports its own side of the link broken (it missed heartbeats) is
         * alive: no failover while it reconnects in time; lost only if it does not. */
        uint64_t t0;
        Fixture f;
        Prim p;

        fixture_init(&f);
        lost_calls = 0;
        standby_set_lost_callback(f.s, on_lost, NULL);
        fill_random(f.ram, N_PAGES * 4096, 21);
        prim_connect(&f, &p);
        epoch_full(&f, &p, 1);
        assert_replica(&f, 1);

        link_fail(p.link, -ETIMEDOUT, "peer lost: nothing received for 400 ms");
        ASSERT_TRUE(RUN_UNTIL(f.e, detail_has(&f, "reported a broken link"), 5000));
        ASSERT_EQ(lost_calls, 0);
        prim_free(&p);
        prim_connect(&f, &p);
        /* Past the grace (2 s + 40 x 50 ms): still no loss, the primary came back. */
        (void) RUN_UNTIL(f.e, lost_calls > 0, 4500);
        ASSERT_EQ(lost_calls, 0);
        assert_replica(&f, 1);

        t0 = now_usec();
        link_fail(p.link, -ECONNRESET, "connection reset");
        ASSERT_TRUE(RUN_UNTIL(f.e, detail_has(&f, "reported a broken link"), 5000));
        ASSERT_EQ(lost_calls, 0);
        prim_free(&p);
        ASSERT_TRUE(RUN_UNTIL(f.e, lost_calls > 0, 10000));
        ASSERT_EQ(lost_calls, 1);
        ASSERT_EQ(lost_error, -ECONNRESET);
        ASSERT_TRUE(now_usec() - t0 >= 4000 * USEC_PER_MSEC);
        ASSERT_TRUE(detail_has(&f, "did not reconnect"));
        assert_replica(&f, 1);
        fixture_done(&f);
}

/* ---- bad input: each case fails the link with its message; the replica stays at epoch 1 ---- */

typedef void (*BadCase)(Fixture *f, Prim *p);

static void bad_out_of_order(Fixture *f, Prim *p)
{
        send_begin(p, 2, false, 1);
        send_begin(p, 3, false, 1);
}

static void bad_not_after_committed(Fixture *f, Prim *p)
{
        send_begin(p, 1, true, 0);
}

static void bad_wrong_base(Fixture *f, Prim *p)
{
        send_begin(p, 7, false, 5);
}

static void bad_page_out_of_range(Fixture *f, Prim *p)
{
        static uint8_t buf[PAGE_BATCH_HEADER + 4 * PAGE_RECORD_MAX];
        uint8_t page[4096];
        PageBatch b;

        fill_random(page, sizeof(page), 77);
        send_begin(p, 2, false, 1);
        ASSERT_OK(page_batch_init(&b, 2, buf, sizeof(buf), 4, false, NULL));
        ASSERT_OK(page_batch_add(&b, 3, page)); /* staged, then discarded */
        ASSERT_OK(page_batch_add(&b, 123456, page));
        send_frame(p, DR__REPL__FRAME_TYPE__FRAME_PAGES, buf, page_batch_finish(&b));
}

static void bad_count_mismatch(Fixture *f, Prim *p)
{
        uint64_t pages[] = {1, 2, 2};
        uint8_t *ram = calloc(N_PAGES, 4096);

        ASSERT_TRUE(ram);
        fill_random(ram, N_PAGES * 4096, 5);
        send_begin(p, 2, false, 1);
        send_pages(p, 2, ram, pages, 3, 512);
        send_state(p, 2, "s");
        send_end(p, 2, 4, 2);
        free(ram);
}

static void bad_distinct_mismatch(Fixture *f, Prim *p)
{
        uint64_t pages[] = {1, 2, 2};
        uint8_t *ram = calloc(N_PAGES, 4096);

        ASSERT_TRUE(ram);
        fill_random(ram, N_PAGES * 4096, 5);
        send_begin(p, 2, false, 1);
        send_pages(p, 2, ram, pages, 3, 512);
        send_state(p, 2, "s");
        send_end(p, 2, 3, 3);
        free(ram);
}

static void bad_second_state(Fixture *f, Prim *p)
{
        send_begin(p, 2, false, 1);
        send_state(p, 2, "s");
        send_state(p, 2, "t");
}

static void bad_no_state(Fixture *f, Prim *p)
{
        send_begin(p, 2, false, 1);
        send_end(p, 2, 0, 0);
}

static void bad_pages_before_begin(Fixture *f, Prim *p)
{
        uint64_t pages[] = {1};
        send_pages(p, 2, f->ram, pages, 1, 512);
}

static void bad_pages_other_epoch(Fixture *f, Prim *p)
{
        uint64_t pages[] = {1};
        send_begin(p, 2, false, 1);
        send_pages(p, 3, f->ram, pages, 1, 512);
}

static void bad_end_before_begin(Fixture *f, Prim *p)
{
        send_end(p, 2, 0, 0);
}

static void bad_undecodable_begin(Fixture *f, Prim *p)
{
        send_frame(p, DR__REPL__FRAME_TYPE__FRAME_EPOCH_BEGIN, "\xff\xff\xff", 3);
}

static void bad_malformed_batch(Fixture *f, Prim *p)
{
        static uint8_t buf[PAGE_BATCH_HEADER + PAGE_RECORD_MAX];
        PageBatch b;
        size_t len;

        send_begin(p, 2, false, 1);
        ASSERT_OK(page_batch_init(&b, 2, buf, sizeof(buf), 1, false, NULL));
        ASSERT_OK(page_batch_add(&b, 3, f->ram + 3 * 4096));
        len = page_batch_finish(&b);
        put_le16(buf + PAGE_BATCH_HEADER + 12, 9); /* unknown encoding */
        send_frame(p, DR__REPL__FRAME_TYPE__FRAME_PAGES, buf, len);
}

static void bad_trailing_bytes(Fixture *f, Prim *p)
{
        static uint8_t buf[PAGE_BATCH_HEADER + PAGE_RECORD_MAX + 20];
        PageBatch b;
        size_t len;

        send_begin(p, 2, false, 1);
        ASSERT_OK(page_batch_init(&b, 2, buf, PAGE_BATCH_HEADER + PAGE_RECORD_MAX, 1, false, NULL));
        ASSERT_OK(page_batch_add(&b, 3, f->ram + 3 * 4096));
        len = page_batch_finish(&b);
        memset(buf + len, 0, 20);
        send_frame(p, DR__REPL__FRAME_TYPE__FRAME_PAGES, buf, len + 20);
}

static const struct {
        const char *name;
        BadCase fn;
        const char *message;
} bad_cases[] = {
        {"out of order", bad_out_of_order, "epoch 3 begins while epoch 2 is open"},
        {"not after committed", bad_not_after_committed, "epoch 1 is not after the committed epoch 1"},
        {"wrong base", bad_wrong_base, "incremental epoch 7 is based on 5 but the replica holds 1"},
        {"page out of range", bad_page_out_of_range, "page 123456 outside the 96-page layout"},
        {"record count", bad_count_mismatch,
         "epoch 2 ends with 4 page records and 2 distinct pages announced, but 3 and 2 arrived"},
        {"distinct count", bad_distinct_mismatch, "but 3 and 2 arrived"},
        {"second state", bad_second_state, "second STATE in epoch 2"},
        {"no state", bad_no_state, "epoch 2 ends without STATE"},
        {"pages before begin", bad_pages_before_begin, "PAGES before EPOCH_BEGIN"},
        {"pages of another epoch", bad_pages_other_epoch, "PAGES of epoch 3 while epoch 2 is open"},
        {"end before begin", bad_end_before_begin, "EPOCH_END before EPOCH_BEGIN"},
        {"undecodable begin", bad_undecodable_begin, "undecodable EPOCH_BEGIN"},
        {"malformed batch", bad_malformed_batch, "malformed record 0 for page 3 (encoding 9"},
        {"trailing bytes", bad_trailing_bytes,
         "bad PAGES in epoch 2: 20 trailing bytes after the last of 1 records"},
};

TEST(bad_input_fails_link_replica_untouched)
{
        for (size_t i = 0; i < ELEMENTSOF(bad_cases); i++) {
                Fixture f;
                Prim p;

                fprintf(stderr, "  case: %s\n", bad_cases[i].name);
                fixture_init(&f);
                fill_random(f.ram, N_PAGES * 4096, 1000 + (uint32_t) i);
                prim_connect(&f, &p);
                epoch_full(&f, &p, 1);
                assert_replica(&f, 1);

                bad_cases[i].fn(&f, &p);
                ASSERT_TRUE(RUN_UNTIL(f.e, p.downs > 0, 5000));
                /* The primary hears why, from the standby's ERROR frame. */
                ASSERT_CONTAINS(p.down_reason, bad_cases[i].message);
                assert_status(&f, "failed", bad_cases[i].message);
                assert_replica(&f, 1);

                /* The standby lives on: the next connection resyncs from epoch 1. */
                prim_free(&p);
                prim_connect(&f, &p);
                ASSERT_TRUE(p.welcome_has_lc);
                ASSERT_EQ(p.welcome_lc, 1);
                uint64_t pages[8];
                epoch_send(&f, &p, 2, false, 1, pages, model_dirty(&f, 9, pages, 8), "s2");
                assert_replica(&f, 2);
                prim_free(&p);
                fixture_done(&f);
        }
}

TEST(incremental_without_replica)
{
        Fixture f;
        Prim p;

        fixture_init(&f);
        prim_connect(&f, &p);
        send_begin(&p, 5, false, 4);
        ASSERT_TRUE(RUN_UNTIL(f.e, p.downs > 0, 5000));
        ASSERT_CONTAINS(p.down_reason, "incremental epoch 5 is based on 4 but the standby holds no replica");
        assert_status(&f, "failed", "holds no replica");
        ASSERT_EQ(standby_hash_replica(f.s, "/nonexistent/x", NULL), -ENODATA);
        prim_free(&p);
        fixture_done(&f);
}

TEST(wrong_vm_name_refused)
{
        Fixture f;
        Prim p;

        fixture_init(&f);
        prim_connect_as(&f, &p, "vm1");
        ASSERT_TRUE(RUN_UNTIL(f.e, p.downs > 0, 5000));
        ASSERT_EQ(p.ups, 0);
        ASSERT_CONTAINS(p.down_reason, "VM 'vm1'");
        ASSERT_CONTAINS(p.down_reason, "VM 'vm0'");
        /* An unauthenticated stranger does not make the standby "failed". */
        assert_status(&f, "listening", "refused");
        prim_free(&p);
        fixture_done(&f);
}

TEST(bad_layout_refused)
{
        Fixture f;
        Prim p;

        fixture_init(&f);
        f.regions[1].memfd_offset = 4096; /* overlaps region 0 in the memfd */
        prim_connect_as(&f, &p, "vm0");
        ASSERT_TRUE(RUN_UNTIL(f.e, p.downs > 0, 5000));
        ASSERT_EQ(p.ups, 0);
        ASSERT_CONTAINS(p.down_reason, "overlap");
        prim_free(&p);

        f.regions[1].memfd_offset = 128 * 4096;
        f.regions[1].size = 4097; /* not page aligned */
        prim_connect_as(&f, &p, "vm0");
        ASSERT_TRUE(RUN_UNTIL(f.e, p.downs > 0, 5000));
        ASSERT_CONTAINS(p.down_reason, "not page aligned");
        prim_free(&p);

        f.regions[1].size = UINT64_C(2) << 40; /* over 1 TiB */
        prim_connect_as(&f, &p, "vm0");
        ASSERT_TRUE(RUN_UNTIL(f.e, p.downs > 0, 5000));
        ASSERT_CONTAINS(p.down_reason, "limit");
        prim_free(&p);
        fixture_done(&f);
}

TEST(new_connection_replaces_old)
{
        uint64_t pages[16];
        Fixture f;
        Prim a, b;

        fixture_init(&f);
        fill_random(f.ram, N_PAGES * 4096, 21);
        prim_connect(&f, &a);
        epoch_full(&f, &a, 1);

        /* a is mid-epoch when b authenticates: a's link goes, its partial epoch with it. */
        send_begin(&a, 2, false, 1);
        {
                _cleanup_free_ uint8_t *junk = malloc(N_PAGES * 4096);
                ASSERT_TRUE(junk);
                fill_random(junk, N_PAGES * 4096, 99);
                send_pages(&a, 2, junk, (uint64_t[]){1, 2, 3}, 3, 512);
        }
        prim_connect(&f, &b);
        ASSERT_TRUE(b.welcome_has_lc);
        ASSERT_EQ(b.welcome_lc, 1);
        ASSERT_TRUE(RUN_UNTIL(f.e, a.downs > 0, 5000));
        assert_replica(&f, 1);

        epoch_send(&f, &b, 2, false, 1, pages, model_dirty(&f, 2, pages, 16), "b2");
        assert_replica(&f, 2);
        assert_status(&f, "protected", "replica of epoch ");
        prim_free(&a);
        prim_free(&b);
        fixture_done(&f);
}

TEST(layout_change_means_full_resync)
{
        uint64_t pages[8];
        Fixture f;
        Prim p;

        fixture_init(&f);
        fill_random(f.ram, N_PAGES * 4096, 31);
        prim_connect(&f, &p);
        epoch_full(&f, &p, 1);
        epoch_send(&f, &p, 2, false, 1, pages, model_dirty(&f, 2, pages, 8), "s2");
        prim_free(&p);

        /* A new primary run (new session) with more RAM in region 1. */
        f.regions[1].size = (R1_PAGES + 16) * 4096;
        f.n_pages = N_PAGES + 16;
        f.ram = realloc(f.ram, f.n_pages * 4096);
        ASSERT_TRUE(f.ram);
        fill_random(f.ram, f.n_pages * 4096, 32);
        f.session[0] ^= 0xff;
        prim_connect(&f, &p);
        ASSERT_TRUE(!p.welcome_has_lc); /* no usable replica: full sync */

        /* An incremental epoch on the old replica is refused... */
        send_begin(&p, 3, false, 2);
        ASSERT_TRUE(RUN_UNTIL(f.e, p.downs > 0, 5000));
        ASSERT_CONTAINS(p.down_reason, "from another session");
        prim_free(&p);
        prim_connect(&f, &p);

        /* ...and the old replica serves until a full epoch of the new layout commits.
         * A new session may number from 1 again. */
        epoch_full(&f, &p, 1);
        assert_replica(&f, 1);
        epoch_send(&f, &p, 2, false, 1, pages, model_dirty(&f, 3, pages, 8), "n2");
        assert_replica(&f, 2);
        prim_free(&p);
        fixture_done(&f);
}

TEST(staging_bound)
{
        /* MaxStagingMB=16 is 4096 pages; an incremental epoch of 4097 distinct pages fails. */
        _cleanup_free_ uint64_t *pages = calloc(4097, sizeof(uint64_t));
        ReplStatus st;
        Fixture f;
        Prim p;

        ASSERT_TRUE(pages);
        fixture_init_layout(&f, 4096, 64, 16);
        fill_random(f.ram, 200 * 4096, 41);
        prim_connect(&f, &p);
        epoch_full(&f, &p, 1);
        assert_replica(&f, 1);

        for (uint64_t i = 0; i < 4097; i++)
                pages[i] = i;
        send_begin(&p, 2, false, 1);
        {
                _cleanup_free_ uint8_t *junk = malloc(f.n_pages * 4096);
                ASSERT_TRUE(junk);
                fill_random(junk, f.n_pages * 4096, 43);
                send_pages(&p, 2, junk, pages, 4097, 512);
        }
        ASSERT_TRUE(RUN_UNTIL(f.e, p.downs > 0, 10000));
        ASSERT_CONTAINS(p.down_reason, "incremental epoch 2 stages more than MaxStagingMB=16 MiB");
        standby_get_status(f.s, &st);
        ASSERT_EQ(st.staging_bytes, 0);
        assert_replica(&f, 1);

        /* 4096 pages fit. */
        prim_free(&p);
        prim_connect(&f, &p);
        for (uint64_t i = 0; i < 4096; i++)
                fill_random(f.ram + i * 4096, 64, (uint32_t) i + 5);
        epoch_send(&f, &p, 2, false, 1, pages, 4096, "big");
        assert_replica(&f, 2);
        prim_free(&p);
        fixture_done(&f);
}

/* Flips one byte of src's copy at off and checks that loading it fails with -EBADMSG. */
static void assert_corrupt_refused(Fixture *f, const char *name, off_t off, bool truncate_instead)
{
        char cmd[512], why[256] = "";
        StandbyReplica *rep = NULL;
        int fd;

        snprintf(cmd, sizeof(cmd), "cp --sparse=always '%s/vm0.replica' '%s/%s.replica'", f->dir, f->dir,
                 name);
        ASSERT_EQ(system(cmd), 0);
        snprintf(cmd, sizeof(cmd), "%s/%s.replica", f->dir, name);
        fd = open(cmd, O_RDWR | O_CLOEXEC);
        ASSERT_TRUE(fd >= 0);
        if (truncate_instead)
                ASSERT_OK(ftruncate(fd, off));
        else {
                uint8_t b;
                ASSERT_EQ(pread(fd, &b, 1, off), 1);
                b ^= 0x20;
                ASSERT_EQ(pwrite(fd, &b, 1, off), 1);
        }
        close(fd);
        ASSERT_EQ(standby_replica_load(f->dir, name, &rep, why, sizeof(why)), -EBADMSG);
        ASSERT_TRUE(rep == NULL);
        fprintf(stderr, "  %s refused: %s\n", name, why);
        ASSERT_TRUE(why[0] != 0);
}

/*
 * The replica outside a Standby (issue 19): released from a Standby with an
 * ERROR to its primary, saved to a file, every kind of damage to the file
 * refused, restored into a new Standby that the same primary session resyncs
 * incrementally; the stale mark (maintenance) holds until the next commit.
 */
TEST(replica_release_save_restore)
{
        _cleanup_free_ uint8_t *model = NULL;
        StandbyReplica *rep = NULL;
        uint64_t pages[40], epoch = 0;
        char why[256], addr[64];
        struct stat stb;
        Fixture f;
        Prim p;

        fixture_init(&f);
        fill_random(f.ram, R0_PAGES * 4096, 21); /* region 1 stays zero: holes in the file */
        prim_connect(&f, &p);
        epoch_full(&f, &p, 1);
        for (uint64_t e = 2; e <= 4; e++)
                epoch_send(&f, &p, e, false, e - 1, pages, model_dirty(&f, (uint32_t) e, pages, 40),
                           "state-r");
        assert_replica(&f, 4);

        /* Released while the primary is connected: it is told why (maintenance), the replica moves out. */
        ASSERT_OK(
                standby_release_replica(f.s, STANDBY_MAINTENANCE_CODE, "going down for maintenance", &rep));
        ASSERT_TRUE(RUN_UNTIL(f.e, p.downs > 0, 5000));
        ASSERT_EQ(p.down_error, STANDBY_MAINTENANCE_CODE);
        ASSERT_CONTAINS(p.down_reason, "maintenance");
        ASSERT_TRUE(!standby_replica_epoch(f.s, NULL));
        ASSERT_EQ(standby_release_replica(f.s, 0, NULL, &rep), -ENODATA);
        ASSERT_EQ(standby_replica_get_epoch(rep), 4);
        prim_free(&p);

        /* Saved: sparse (region 1 and the gap before it are holes), atomically named. */
        standby_replica_set_stale(rep, true);
        ASSERT_OK(standby_replica_save(rep, f.dir, "vm0"));
        rep = standby_replica_free(rep);
        {
                char path[128];
                snprintf(path, sizeof(path), "%s/vm0.replica", f.dir);
                ASSERT_OK(stat(path, &stb));
                snprintf(path, sizeof(path), "%s/vm0.replica.tmp", f.dir);
                ASSERT_TRUE(access(path, F_OK) < 0);
        }
        fprintf(stderr, "  saved: %lld bytes, %lld allocated\n", (long long) stb.st_size,
                (long long) stb.st_blocks * 512);
        ASSERT_TRUE((uint64_t) stb.st_blocks * 512 < (uint64_t) stb.st_size);

        /* Damage anywhere is refused with a reason, never half loaded. */
        assert_corrupt_refused(&f, "hdr", 20, false);                    /* epoch */
        assert_corrupt_refused(&f, "state", 4096 + 2, false);            /* state bytes */
        assert_corrupt_refused(&f, "ram", 8192 + 4096 * 7 + 100, false); /* a RAM page */
        assert_corrupt_refused(&f, "short", stb.st_size - 4096, true);
        ASSERT_EQ(standby_replica_load(f.dir, "missing", &rep, why, sizeof(why)), -ENOENT);

        /* A new Standby (a restarted daemon) adopts it and listens. */
        f.s = standby_free(f.s);
        (void) sd_event_run(f.e, 0);
        ASSERT_OK(standby_replica_load(f.dir, "vm0", &rep, why, sizeof(why)));
        ASSERT_TRUE(standby_replica_is_stale(rep));
        ASSERT_OK(standby_new(f.e, &f.d, &f.vm, SECRET, sizeof(SECRET), &f.s));
        ASSERT_OK(standby_adopt_replica(f.s, rep));
        rep = NULL;
        ASSERT_OK(standby_start(f.s));
        ASSERT_OK(standby_listen_address(f.s, addr, sizeof(addr)));
        ASSERT_OK(parse_socket_address(addr, &f.addr, &f.addr_len, false));
        ASSERT_TRUE(standby_replica_epoch(f.s, &epoch));
        ASSERT_EQ(epoch, 4);
        ASSERT_TRUE(standby_replica_stale(f.s));
        assert_replica(&f, 4);

        /* The same primary session resyncs incrementally from it; the commit clears stale. */
        prim_connect(&f, &p);
        ASSERT_TRUE(p.welcome_has_lc);
        ASSERT_EQ(p.welcome_lc, 4);
        ASSERT_EQ(p.welcome_session_len, 16);
        epoch_send(&f, &p, 5, false, 4, pages, model_dirty(&f, 5, pages, 40), "state-5");
        assert_replica(&f, 5);
        ASSERT_TRUE(!standby_replica_stale(f.s));

        /* Activation hands out a new fd of the same memfd and the state. */
        {
                const uint8_t *state = NULL;
                size_t state_len = 0;
                int fd = -EBADF;

                ASSERT_OK(standby_release_replica(f.s, 0, NULL, &rep));
                ASSERT_OK(standby_replica_activation(rep, &fd, &state, &state_len));
                ASSERT_EQ(state_len, 7);
                ASSERT_TRUE(memcmp(state, "state-5", 7) == 0);
                ASSERT_OK(fstat(fd, &stb));
                ASSERT_EQ(stb.st_size, (R1_MEMFD_PAGE + R1_PAGES) * 4096);
                model = malloc(4096);
                ASSERT_TRUE(model);
                ASSERT_EQ(pread(fd, model, 4096, 4096 * 3), 4096);
                ASSERT_TRUE(memcmp(model, f.ram + 3 * 4096, 4096) == 0);
                close(fd);
                rep = standby_replica_free(rep);
        }
        prim_free(&p);
        fixture_done(&f);
}

DEFINE_TEST_MAIN

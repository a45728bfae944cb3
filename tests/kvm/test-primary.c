/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The Primary half (daemon/primary.c) against a real dirtyrep-vmm running the
 * dirtier guest, and a tiny standby of the test's own (its own thread and
 * sd-event loop, as a remote host would be): it decodes PAGES into its own
 * RAM copy, applies an epoch only at EPOCH_END (after checking the counts)
 * and ACKs, optionally late. The test freezes the primary at several epochs,
 * waits for the ACK and compares primary_hash_ram() with the replica's page
 * hashes: they must be identical. It also checks pause times and that the
 * in-flight epochs never exceed MaxInflightEpochs.
 *
 *   test-primary MODE [ACK_DELAY_MS [EPOCH_MS [RATE]]]     MODE = ring | bitmap
 *
 * Exit 0 pass, 1 fail, 77 skip (no /dev/kvm or no VMM built).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <systemd/sd-event.h>
#include <unistd.h>

#include "config.h"
#include "crc32c.h"
#include "link.h"
#include "log.h"
#include "macros.h"
#include "pages.h"
#include "role.h"
#include "util.h"

#define MAX_INFLIGHT 3
#define FAIL(...)                                                                                           \
        do {                                                                                                \
                fprintf(stderr, "FAIL: " __VA_ARGS__);                                                      \
                fputc('\n', stderr);                                                                        \
                cleanup_vmm();                                                                              \
                exit(1);                                                                                    \
        } while (0)
#define CHECK(x)                                                                                            \
        do {                                                                                                \
                if (!(x))                                                                                   \
                        FAIL("%s:%d: %s", __FILE__, __LINE__, #x);                                          \
        } while (0)

static const uint8_t SECRET[] = "test-primary shared secret, 32+b";
static pid_t vmm_pid = -1;

static void cleanup_vmm(void)
{
        int status;

        if (vmm_pid <= 0)
                return;
        kill(vmm_pid, SIGTERM);
        for (int i = 0; i < 100 && waitpid(vmm_pid, &status, WNOHANG) == 0; i++)
                usleep(50000);
        if (waitpid(vmm_pid, &status, WNOHANG) == 0) {
                kill(vmm_pid, SIGKILL);
                waitpid(vmm_pid, &status, 0);
        }
        vmm_pid = -1;
}

/* ---- the in-test standby --------------------------------------------------------------- */

typedef struct Staged {
        uint64_t page;
        bool zero;
        uint8_t data[PAGE_BYTES];
} Staged;

typedef struct Standby {
        sd_event *e;
        LinkListener *ll;
        Link *link;
        struct sockaddr_storage addr;
        socklen_t addr_len;
        unsigned ack_delay_ms;
        uint64_t n_pages;
        pthread_t thread;
        int quit_fd, cut_fd;
        uint64_t pending_epoch[256], pending_due[256];
        size_t n_pending;

        /* epoch being received */
        bool in_epoch, full;
        bool first_begin; /* the next EPOCH_BEGIN is the first on this link */
        uint64_t epoch, records;
        Staged *staged;
        size_t n_staged, cap_staged;
        bool have_state;

        pthread_mutex_t mutex; /* guards the fields below (the test thread reads them) */
        uint8_t *ram;          /* committed replica */
        uint64_t committed;    /* last applied epoch */
        uint8_t session[16];
        bool have_session;
        uint64_t max_unacked; /* highest (ended - acked) seen */
        uint64_t ended, acked_sent;
        unsigned full_syncs, incrementals;
        char error[256];
} Standby;

static void sb_error(Standby *s, const char *msg)
{
        pthread_mutex_lock(&s->mutex);
        if (!s->error[0])
                snprintf(s->error, sizeof(s->error), "%s", msg);
        pthread_mutex_unlock(&s->mutex);
}

static int sb_on_hello(Link *l, const Dr__Repl__Hello *h, const char **ret_reason, void *userdata)
{
        Standby *s = userdata;
        uint64_t pages = 0;

        for (size_t i = 0; i < h->n_regions; i++)
                pages += h->regions[i]->size / 4096;
        if (h->page_size != 4096 || pages == 0 || h->vm_uuid.len != 16 || !streq(h->vm_name, "t-primary")) {
                *ret_reason = "bad hello";
                return -EINVAL;
        }
        pthread_mutex_lock(&s->mutex);
        if (!s->ram) {
                s->ram = calloc(pages, 4096);
                s->n_pages = pages;
        }
        pthread_mutex_unlock(&s->mutex);
        if (!s->ram || pages != s->n_pages) {
                *ret_reason = "layout changed";
                return -EINVAL;
        }
        return 0;
}

static void sb_fill_welcome(Link *l, Dr__Repl__Welcome *w, void *userdata)
{
        Standby *s = userdata;

        pthread_mutex_lock(&s->mutex);
        if (s->have_session) {
                w->has_last_committed = true;
                w->last_committed = s->committed;
                w->has_session = true;
                w->session.data = s->session;
                w->session.len = 16;
        }
        pthread_mutex_unlock(&s->mutex);
}

static int sb_on_up(Link *l, const Dr__Repl__Welcome *w, void *userdata)
{
        Standby *s = userdata;

        s->first_begin = true;
        return 0;
}

static int sb_page(void *userdata, uint64_t page, const uint8_t *data)
{
        Standby *s = userdata;
        Staged *st;

        if (s->n_staged == s->cap_staged) {
                size_t cap = MAX(s->cap_staged * 2, 1024u);
                Staged *n = realloc(s->staged, cap * sizeof(Staged));
                if (!n)
                        return -ENOMEM;
                s->staged = n;
                s->cap_staged = cap;
        }
        st = &s->staged[s->n_staged++];
        st->page = page;
        st->zero = !data;
        if (data)
                memcpy(st->data, data, PAGE_BYTES);
        return 0;
}

static void sb_send_ack(Standby *s, uint64_t epoch)
{
        Dr__Repl__Ack a = DR__REPL__ACK__INIT;

        a.epoch = epoch;
        if (s->link && link_send_message(s->link, DR__REPL__FRAME_TYPE__FRAME_ACK, &a.base, false) == 0) {
                pthread_mutex_lock(&s->mutex);
                s->acked_sent = MAX(s->acked_sent, epoch);
                pthread_mutex_unlock(&s->mutex);
        }
}

/* Delayed ACKs leave in commit order: one FIFO and a 5 ms tick (separate timers that
 * elapse in the same loop iteration are dispatched in no particular order). */
static int sb_ack_tick(sd_event_source *src, uint64_t usec, void *userdata)
{
        Standby *s = userdata;
        uint64_t now = now_usec();

        while (s->n_pending > 0 && s->pending_due[0] <= now) {
                sb_send_ack(s, s->pending_epoch[0]);
                s->n_pending--;
                memmove(s->pending_epoch, s->pending_epoch + 1, s->n_pending * sizeof(uint64_t));
                memmove(s->pending_due, s->pending_due + 1, s->n_pending * sizeof(uint64_t));
        }
        (void) sd_event_source_set_time(src, now + 5000);
        (void) sd_event_source_set_enabled(src, SD_EVENT_ONESHOT);
        return 0;
}

static int sb_on_frame(Link *l, uint16_t type, const uint8_t *payload, size_t len, void *userdata)
{
        Standby *s = userdata;
        uint64_t epoch;
        int64_t n;

        switch (type) {
        case DR__REPL__FRAME_TYPE__FRAME_EPOCH_BEGIN: {
                Dr__Repl__EpochBegin *b = dr__repl__epoch_begin__unpack(NULL, len, payload);
                if (!b || s->in_epoch) {
                        sb_error(s, "bad EPOCH_BEGIN");
                        link_fail(l, -EPROTO, "bad EPOCH_BEGIN");
                        return -EPROTO;
                }
                pthread_mutex_lock(&s->mutex);
                if (!b->full &&
                    (!b->has_base_epoch || b->base_epoch != s->committed || b->epoch <= s->committed)) {
                        snprintf(s->error, sizeof(s->error),
                                 "incremental epoch %" PRIu64 " on base %" PRIu64 " but we hold %" PRIu64,
                                 b->epoch, b->base_epoch, s->committed);
                        pthread_mutex_unlock(&s->mutex);
                        link_fail(l, -EPROTO, "bad base");
                        dr__repl__epoch_begin__free_unpacked(b, NULL);
                        return -EPROTO;
                }
                if (b->full)
                        s->full_syncs++;
                else if (s->first_begin)
                        s->incrementals++;
                s->first_begin = false;
                pthread_mutex_unlock(&s->mutex);
                s->in_epoch = true;
                s->full = b->full;
                s->epoch = b->epoch;
                s->records = 0;
                s->n_staged = 0;
                s->have_state = false;
                dr__repl__epoch_begin__free_unpacked(b, NULL);
                return 0;
        }
        case DR__REPL__FRAME_TYPE__FRAME_PAGES:
                if (!s->in_epoch)
                        goto bad;
                n = page_batch_decode(payload, len, s->n_pages, &epoch, sb_page, s);
                if (n < 0 || epoch != s->epoch) {
                        fprintf(stderr,
                                "standby: PAGES of %zu bytes: decode %" PRId64 ", epoch %" PRIu64
                                " (in epoch %" PRIu64 ")\n",
                                len, n, epoch, s->epoch);
                        goto bad;
                }
                s->records += (uint64_t) n;
                return 0;
        case DR__REPL__FRAME_TYPE__FRAME_STATE: {
                Dr__Repl__EpochState *st = dr__repl__epoch_state__unpack(NULL, len, payload);
                if (!st || !s->in_epoch || st->epoch != s->epoch || st->vmstate.len == 0) {
                        if (st)
                                dr__repl__epoch_state__free_unpacked(st, NULL);
                        goto bad;
                }
                s->have_state = true;
                dr__repl__epoch_state__free_unpacked(st, NULL);
                return 0;
        }
        case DR__REPL__FRAME_TYPE__FRAME_EPOCH_END: {
                Dr__Repl__EpochEnd *end = dr__repl__epoch_end__unpack(NULL, len, payload);
                bool ok = end && s->in_epoch && end->epoch == s->epoch && s->have_state &&
                          end->page_records == s->records;
                if (end)
                        dr__repl__epoch_end__free_unpacked(end, NULL);
                if (!ok)
                        goto bad;
                /* Atomic apply: everything of the epoch arrived; last copy of a page wins. */
                pthread_mutex_lock(&s->mutex);
                if (s->full)
                        memset(s->ram, 0, s->n_pages * 4096);
                for (size_t i = 0; i < s->n_staged; i++) {
                        uint8_t *dst = s->ram + s->staged[i].page * 4096;
                        if (s->staged[i].zero)
                                memset(dst, 0, 4096);
                        else
                                memcpy(dst, s->staged[i].data, 4096);
                }
                s->committed = s->epoch;
                memcpy(s->session, link_peer_session(l), 16);
                s->have_session = true;
                s->ended = s->epoch;
                s->max_unacked = MAX(s->max_unacked, s->ended - MIN(s->acked_sent, s->ended));
                pthread_mutex_unlock(&s->mutex);
                s->in_epoch = false;
                if (s->ack_delay_ms == 0)
                        sb_send_ack(s, s->epoch);
                else {
                        CHECK(s->n_pending < ELEMENTSOF(s->pending_epoch));
                        s->pending_epoch[s->n_pending] = s->epoch;
                        s->pending_due[s->n_pending++] = now_usec() + (uint64_t) s->ack_delay_ms * 1000;
                }
                return 0;
        }
        default:
                return 0;
        }
bad:
        sb_error(s, "bad epoch frame");
        link_fail(l, -EPROTO, "bad epoch frame (type %u)", type);
        return -EPROTO;
}

static void sb_on_down(Link *l, int error, const char *reason, void *userdata)
{
        Standby *s = userdata;

        fprintf(stderr, "standby: link down: %s\n", reason);
        s->in_epoch = false;
        s->n_pending = 0; /* ACKs belong to the link they were earned on */
        if (s->link == l)
                s->link = link_free(l);
}

static const LinkCallbacks sb_callbacks = {
        .on_hello = sb_on_hello,
        .fill_welcome = sb_fill_welcome,
        .on_up = sb_on_up,
        .on_frame = sb_on_frame,
        .on_down = sb_on_down,
};

static int sb_on_accept(LinkListener *ll, int fd, const char *peer, void *userdata)
{
        Standby *s = userdata;
        LinkParams p = {
                .side = LINK_STANDBY,
                .secret = SECRET,
                .secret_len = sizeof(SECRET) - 1,
                .peer_name = peer,
                .listener = ll,
                /* Tolerant: the test's freeze/hash hooks block the primary's loop (and its heartbeats). */
                .heartbeat_ms = 50,
                .heartbeat_misses = 40,
        };

        if (s->link)
                s->link = link_free(s->link);
        return link_accept(s->e, fd, &p, &sb_callbacks, s, &s->link);
}

static int sb_quit(sd_event_source *src, int fd, uint32_t revents, void *userdata)
{
        Standby *s = userdata;
        return sd_event_exit(s->e, 0);
}

/* Cuts the link from the standby's side (a lost connection): the pair must resync incrementally. */
static int sb_cut(sd_event_source *src, int fd, uint32_t revents, void *userdata)
{
        Standby *s = userdata;
        eventfd_t v;

        (void) eventfd_read(fd, &v);
        if (s->link)
                link_fail(s->link, -ECONNRESET, "test: cutting the link");
        return 0;
}

static void *sb_thread(void *userdata)
{
        Standby *s = userdata;

        (void) sd_event_loop(s->e);
        s->link = link_free(s->link);
        s->ll = link_listener_free(s->ll);
        /* The in-test standby's own memory: LeakSanitizer checks tests too. */
        free(s->staged);
        s->staged = NULL;
        free(s->ram);
        s->ram = NULL;
        /* Its floating sources (quit, cut, ack timer) go with the loop. */
        s->e = sd_event_unref(s->e);
        return NULL;
}

static void sb_start(Standby *s, unsigned ack_delay_ms)
{
        struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};

        s->ack_delay_ms = ack_delay_ms;
        pthread_mutex_init(&s->mutex, NULL);
        CHECK(sd_event_new(&s->e) >= 0);
        CHECK(link_listener_new(s->e, (struct sockaddr *) &sin, sizeof(sin), 4, sb_on_accept, s, &s->ll) >=
              0);
        CHECK(link_listener_address(s->ll, &s->addr, &s->addr_len) >= 0);
        s->quit_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        CHECK(s->quit_fd >= 0);
        CHECK(sd_event_add_io(s->e, NULL, s->quit_fd, EPOLLIN, sb_quit, s) >= 0);
        s->cut_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        CHECK(s->cut_fd >= 0);
        CHECK(sd_event_add_io(s->e, NULL, s->cut_fd, EPOLLIN, sb_cut, s) >= 0);
        CHECK(sd_event_add_time_relative(s->e, NULL, CLOCK_MONOTONIC, 5000, 1, sb_ack_tick, s) >= 0);
        CHECK(pthread_create(&s->thread, NULL, sb_thread, s) == 0);
}

/* ---- the test -------------------------------------------------------------------------- */

/* Runs the primary's loop until cond holds or ms pass. */
#define RUN_UNTIL(e, cond, ms)                                                                              \
        ({                                                                                                  \
                uint64_t _end = now_usec() + (uint64_t) (ms) *1000u;                                        \
                while (!(cond) && now_usec() < _end)                                                        \
                        CHECK(sd_event_run((e), 10000) >= 0);                                               \
                (cond);                                                                                     \
        })

static uint64_t sb_committed(Standby *s)
{
        uint64_t c;
        pthread_mutex_lock(&s->mutex);
        c = s->committed;
        pthread_mutex_unlock(&s->mutex);
        return c;
}

static void compare_hashes(Standby *s, const char *path, uint64_t epoch)
{
        _cleanup_free_ uint8_t *file = NULL;
        size_t diff = 0, first = SIZE_MAX, nonzero = 0;
        struct stat st;
        int fd;

        fd = open(path, O_RDONLY | O_CLOEXEC);
        CHECK(fd >= 0);
        CHECK(fstat(fd, &st) == 0);
        CHECK((uint64_t) st.st_size == s->n_pages * 4);
        file = malloc((size_t) st.st_size);
        CHECK(file);
        CHECK(loop_read_exact(fd, file, (size_t) st.st_size) == 0);
        close(fd);
        pthread_mutex_lock(&s->mutex);
        CHECK(s->committed == epoch);
        for (uint64_t p = 0; p < s->n_pages; p++) {
                uint32_t c = crc32c(0, s->ram + p * 4096, 4096), f;
                memcpy(&f, file + p * 4, 4); /* little-endian host */
                if (!page_is_zero(s->ram + p * 4096))
                        nonzero++;
                if (c != f) {
                        if (first == SIZE_MAX)
                                first = p;
                        diff++;
                }
        }
        pthread_mutex_unlock(&s->mutex);
        if (diff)
                FAIL("epoch %" PRIu64 ": %zu pages differ between primary and replica (first: page %zu)",
                     epoch, diff, first);
        printf("epoch %" PRIu64 ": replica identical (%" PRIu64 " pages, %zu non-zero)\n", epoch, s->n_pages,
               nonzero);
}

int main(int argc, char **argv)
{
        const char *vmm = getenv("DR_VMM"), *guest = getenv("DR_GUEST_DIRTIER");
        const char *mode = argc > 1 ? argv[1] : "ring";
        unsigned ack_delay = argc > 2 ? (unsigned) atoi(argv[2]) : 0;
        unsigned epoch_ms = argc > 3 ? (unsigned) atoi(argv[3]) : 20;
        unsigned rate = argc > 4 ? (unsigned) atoi(argv[4]) : 25000;
        char tmp[] = "/tmp/test-primary-XXXXXX", ctl[256], console[256], hashp[256], append[128];
        _cleanup_(daemon_config_freep) DaemonConfig *dcfg = NULL;
        _cleanup_(sd_event_unrefp) sd_event *e = NULL;
        VmConfig vm = {};
        Standby sb = {};
        Primary *p = NULL;
        ReplStatus st;
        uint64_t max_inflight_seen = 0;

        log_set_ident("test-primary");
        if (access("/dev/kvm", R_OK | W_OK) < 0 || !vmm || !guest) {
                printf("skip: no /dev/kvm or DR_VMM/DR_GUEST_DIRTIER unset\n");
                return 77;
        }
        CHECK(mkdtemp(tmp));
        snprintf(ctl, sizeof(ctl), "%s/ctl.sock", tmp);
        snprintf(console, sizeof(console), "%s/console.log", tmp);
        snprintf(hashp, sizeof(hashp), "%s/hash", tmp);
        snprintf(append, sizeof(append), "ws=16M pattern=random rate=%u report_ms=1000", rate);

        sb_start(&sb, ack_delay);

        dcfg = daemon_config_new_default();
        CHECK(dcfg);
        dcfg->heartbeat_misses = 40; /* see sb_on_accept() */
        vm.name = (char *) "t-primary";
        vm.control_socket = ctl;
        memcpy(&vm.peer.sa, &sb.addr, sb.addr_len);
        vm.peer.len = sb.addr_len;
        snprintf(vm.peer.text, sizeof(vm.peer.text), "standby");
        vm.epoch_ms = epoch_ms;
        vm.tracking = streq(mode, "ring") ? CONFIG_TRACKING_RING : CONFIG_TRACKING_BITMAP;
        vm.max_inflight_epochs = MAX_INFLIGHT;
        vm.compression = CONFIG_COMPRESSION_LZ4;
        vm.pre_copy = true;
        vm.max_staging_mb = 64;
        vm.output_commit = true;

        CHECK(sd_event_default(&e) >= 0);
        CHECK(primary_new(e, dcfg, &vm, SECRET, sizeof(SECRET) - 1, &p) >= 0);
        /* Started before the VMM: it must wait ("attaching") and attach once the socket appears. */
        CHECK(primary_start(p) >= 0);
        primary_get_status(p, &st);
        CHECK(streq(st.state, "attaching"));
        printf("before the VMM: %s (%s)\n", st.state, st.detail);

        vmm_pid = fork();
        CHECK(vmm_pid >= 0);
        if (vmm_pid == 0) {
                int fd = open(console, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
                if (fd >= 0)
                        dup2(fd, STDOUT_FILENO);
                execl(vmm, vmm, "--name", "t-primary", "--control", ctl, "--console", console, "--kernel",
                      guest, "--cpus", "1", "--memory", "256M", "--tracking", mode, "--append", append,
                      (char *) NULL);
                _exit(127);
        }

        primary_get_status(p, &st);
        CHECK(RUN_UNTIL(
                e, (primary_get_status(p, &st), streq(st.state, "protected") || streq(st.state, "failed")),
                30000));
        if (streq(st.state, "failed"))
                FAIL("primary failed: %s", st.detail);
        printf("protected after full sync: last_committed=%" PRIu64 " detail=%s\n", st.last_committed,
               st.detail);

        for (unsigned round = 0; round < 4; round++) {
                uint64_t epoch = 0, t_end = now_usec() + 1500 * 1000;

                /* Let it run; watch in-flight while it does. */
                while (now_usec() < t_end) {
                        CHECK(sd_event_run(e, 10000) >= 0);
                        primary_get_status(p, &st);
                        max_inflight_seen = MAX(max_inflight_seen, st.inflight);
                        if (streq(st.state, "failed"))
                                FAIL("primary failed: %s", st.detail);
                }
                {
                        int r;
                        for (int i = 0; (r = primary_freeze(p, &epoch)) == -EBUSY || r == -ENOTCONN; i++) {
                                CHECK(i < 500);
                                CHECK(sd_event_run(e, 10000) >= 0);
                        }
                        CHECK(r >= 0);
                }
                CHECK(RUN_UNTIL(e, sb_committed(&sb) >= epoch, 10000));
                CHECK(primary_hash_ram(p, hashp) >= 0);
                compare_hashes(&sb, hashp, epoch);
                CHECK(primary_thaw(p) >= 0);
                if (round == 1) {
                        /* Cut the link: the primary reconnects and sends one incremental epoch
                         * on the standby's last committed one (the standby checks the base). */
                        CHECK(eventfd_write(sb.cut_fd, 1) == 0);
                        CHECK(RUN_UNTIL(e, (primary_get_status(p, &st), !st.link_up), 5000));
                        CHECK(RUN_UNTIL(e,
                                        (primary_get_status(p, &st),
                                         st.incremental_syncs == 1 && streq(st.state, "protected")),
                                        15000));
                        printf("resynced incrementally after a cut: last_committed=%" PRIu64 "\n",
                               st.last_committed);
                }
        }
        /* A checkpoint seals at once and names its epoch. */
        {
                uint64_t ck = 0, before;
                primary_get_status(p, &st);
                before = st.last_sealed;
                int r;
                /* -EBUSY/-ENOTCONN: the loop still has ACKs or a link change to deliver; let it run. */
                for (int i = 0; (r = primary_checkpoint(p, &ck)) == -EBUSY || r == -ENOTCONN; i++) {
                        CHECK(i < 500);
                        CHECK(sd_event_run(e, 10000) >= 0);
                }
                CHECK(r >= 0);
                CHECK(ck > before);
        }

        primary_get_status(p, &st);
        pthread_mutex_lock(&sb.mutex);
        printf("mode=%s epoch_ms=%u rate=%u ack_delay_ms=%u: sealed=%" PRIu64 " committed=%" PRIu64
               " pause p50=%.3f ms p99=%.3f ms max=%.3f ms pages_last_epoch=%" PRIu64 " dirty=%.0f/s "
               "compression=%.2f bytes_sent=%" PRIu64 " max_inflight(primary)=%" PRIu64
               " max_unacked(standby)=%" PRIu64 " full_syncs=%" PRIu64 "\n",
               mode, epoch_ms, rate, ack_delay, st.last_sealed, st.last_committed, st.pause_ns_p50 / 1e6,
               st.pause_ns_p99 / 1e6, st.pause_ns_max / 1e6, st.pages_last_epoch, st.dirty_pages_per_s,
               st.compression_ratio, st.bytes_sent, max_inflight_seen, sb.max_unacked, st.full_syncs);
        if (sb.error[0])
                FAIL("standby: %s", sb.error);
        /* +1: a freeze or checkpoint may seal one epoch past the limit (primary.c, should_seal). */
        CHECK(max_inflight_seen <= MAX_INFLIGHT + 1);
        CHECK(sb.max_unacked <= MAX_INFLIGHT + 1);
        if (ack_delay > 0)
                CHECK(sb.max_unacked >= 2); /* delayed acks did fill the pipeline */
        CHECK(st.full_syncs == 1);
        CHECK(st.incremental_syncs == 1);
        CHECK(sb.incrementals == 1);
        pthread_mutex_unlock(&sb.mutex);
        CHECK(st.last_sealed > 20);
        if (ack_delay == 0 && epoch_ms >= 20) {
                /* generous: shared CI cores; DR_TEST_SLOWDOWN (sanitized stage) stretches it */
                const char *slow = getenv("DR_TEST_SLOWDOWN");
                unsigned factor = slow && atoi(slow) > 1 ? (unsigned) atoi(slow) : 1;
                CHECK(st.pause_ns_p99 < factor * 50 * 1000 * 1000ULL);
        }

        p = primary_free(p);
        CHECK(eventfd_write(sb.quit_fd, 1) == 0);
        pthread_join(sb.thread, NULL);
        cleanup_vmm();
        unlink(hashp);
        unlink(ctl);
        unlink(console);
        rmdir(tmp);
        printf("PASS\n");
        return 0;
}

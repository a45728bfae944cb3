/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * dr-harvester: plays the daemon's part from a second process, through the
 * real control socket, with the daemon's own tracking code (daemon/track*).
 *
 *   check     KVM selftests' dirty_log_test invariant against the dirtier
 *             guest: every page written since the last reset is reported,
 *             reported pages hold the stamp the guest wrote, and the reset
 *             count equals the harvested count.
 *   wedge     expects the dirty-ring jam (dirtier jam=...): succeeds when it
 *             is reported as an error, fails on a timeout.
 *   snapshot  pause, SaveState to a file and RAM (memfd layout) to a file.
 *   epochs    the output-commit cycle: pause, resume as epoch n+1, release n.
 *   bench-pause / bench-harvest   measurements (used by bench/, not tests).
 *
 * Exit codes: 0 pass, 1 invariant violated or expectation not met, 2 usage
 * or setup error.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "macros.h"
#include "track.h"
#include "util.h"
#include "vmm-link.h"

#define DIRT_MAGIC 0x54524944u
#define MAX_WS     16

typedef struct Stamp {
        uint32_t magic, cpu;
        uint64_t seq, gpa;
} Stamp;

typedef struct WsRange {
        uint64_t base, pages;
} WsRange;

static const char *arg_control;
static unsigned arg_rounds = 10;
static unsigned arg_interval_ms = 200;
static unsigned arg_count = 1000;
static unsigned arg_seconds = 3;
static unsigned arg_timeout_ms = 20000;
static bool arg_ring_full_only;
static bool arg_expect_ring_full;
static bool arg_resume;
static const char *arg_state_out;
static const char *arg_ram_out;
static WsRange arg_ws[MAX_WS];
static size_t arg_n_ws;

/* Time spent inside collect(), for the drain-rate figure of bench-harvest. */
static uint64_t collect_ns;

static int cmp_u64(const void *a, const void *b)
{
        uint64_t x = *(const uint64_t *) a, y = *(const uint64_t *) b;
        return x < y ? -1 : x > y;
}

static uint64_t percentile(uint64_t *v, size_t n, double p)
{
        size_t i;

        if (n == 0)
                return 0;
        qsort(v, n, sizeof(*v), cmp_u64);
        i = (size_t) (p * (double) (n - 1) + 0.5);
        return v[MIN(i, n - 1)];
}

static int open_link(VmmLink **ret)
{
        int r = vmm_link_open(arg_control, "dr-harvester", ret);
        if (r < 0)
                return log_error_errno(r, "Failed to attach to %s: %m", arg_control);
        return 0;
}

/*
 * Attaches, picks the tracking backend, allocates an empty dirty set and
 * switches dirty logging on: what every tracking command starts with.
 */
static int attach_tracking(VmmLink **ret_link, Tracker *t, DirtySet **ret_dirty)
{
        _cleanup_(vmm_link_freep) VmmLink *link = NULL;
        DirtySet *dirty;
        int r;

        r = open_link(&link);
        if (r < 0)
                return r;
        r = tracker_init(t, link);
        if (r < 0)
                return log_error_errno(r, "Unknown tracking mode");
        dirty = dirtyset_new(t->lay->total_pages);
        if (!dirty)
                return log_oom();
        r = vmm_link_start_tracking(link);
        if (r < 0) {
                dirtyset_free(dirty);
                return log_error_errno(r, "StartTracking failed: %s", vmm_link_last_error(link));
        }
        *ret_link = TAKE_PTR(link);
        *ret_dirty = dirty;
        return 0;
}

/* VM-wide page numbers of the working-set ranges, validated against the layout. */
static int ws_pages(const VmmLayout *lay, uint64_t **ret, size_t *ret_n)
{
        _cleanup_free_ uint64_t *pages = NULL;
        size_t n = 0, cap = 0;

        for (size_t w = 0; w < arg_n_ws; w++)
                cap += arg_ws[w].pages;
        pages = calloc(cap ? cap : 1, sizeof(uint64_t));
        if (!pages)
                return log_oom();
        for (size_t w = 0; w < arg_n_ws; w++)
                for (uint64_t k = 0; k < arg_ws[w].pages; k++) {
                        uint64_t gpa = arg_ws[w].base + k * lay->page_size, page = UINT64_MAX;
                        for (size_t i = 0; i < lay->n_regions; i++) {
                                const VmmRegion *r = &lay->regions[i];
                                if (gpa >= r->guest_phys && gpa < r->guest_phys + r->size)
                                        page = r->first_page + (gpa - r->guest_phys) / lay->page_size;
                        }
                        if (page == UINT64_MAX)
                                return log_error_errno(
                                        -ERANGE, "Working set page 0x%" PRIx64 " is outside guest RAM", gpa);
                        pages[n++] = page;
                }
        *ret = TAKE_PTR(pages);
        *ret_n = n;
        return 0;
}

static void snapshot_stamps(const VmmLayout *lay, const uint64_t *pages, size_t n, Stamp *out)
{
        for (size_t i = 0; i < n; i++)
                memcpy(&out[i], vmm_layout_page_ptr(lay, pages[i]), sizeof(Stamp));
}

/* Harvests while the guest runs for interval_ms: continuously, or only on ring-full. */
static int harvest_for(Tracker *t, DirtySet *dirty, unsigned ms)
{
        const VmmLayout *lay = t->lay;
        uint64_t end = now_usec() + (uint64_t) ms * USEC_PER_MSEC;
        int64_t n;

        while (now_usec() < end) {
                struct pollfd p = {.fd = lay->ring_full_fd, .events = POLLIN};
                int timeout = (int) MIN((end - now_usec()) / 1000 + 1, 1u);

                if (lay->ring_full_fd >= 0 && poll(&p, 1, timeout) > 0 && (p.revents & POLLIN)) {
                        n = tracker_ring_full(t, dirty);
                        if (n < 0)
                                return log_error_errno((int) n, "Harvest on ring-full failed: %s", t->error);
                        continue;
                }
                if (lay->ring_full_fd < 0)
                        usleep(1000);
                if (arg_ring_full_only)
                        continue;
                {
                        uint64_t c0 = now_nsec();
                        n = t->ops->collect(t, dirty);
                        collect_ns += now_nsec() - c0;
                }
                if (n < 0)
                        return log_error_errno((int) n, "Collect failed: %s", t->error);
                /* Reset in batches, well before rings fill: a quarter ring per vCPU. */
                if (t->pending_reset >= (uint64_t) lay->ring_entries / 4 * lay->n_vcpus) {
                        int r = t->ops->reset(t);
                        if (r < 0)
                                return log_error_errno(r, "Reset failed: %s", t->error);
                }
        }
        return 0;
}

static int cmd_check(void)
{
        _cleanup_(vmm_link_freep) VmmLink *link = NULL;
        _cleanup_free_ uint64_t *pages = NULL;
        _cleanup_(dirtyset_freep) DirtySet *dirty = NULL;
        _cleanup_free_ Stamp *s0 = NULL, *s1 = NULL;
        uint64_t written_total = 0, reported_total = 0, pause_ns;
        unsigned empty_rounds = 0;
        size_t n_pages = 0;
        Tracker t;
        int64_t n;
        int r;

        r = attach_tracking(&link, &t, &dirty);
        if (r < 0)
                return r;
        r = ws_pages(t.lay, &pages, &n_pages);
        if (r < 0)
                return r;
        if (n_pages == 0)
                return log_error_errno(-EINVAL, "No working set given (--ws BASE:PAGES)");
        s0 = calloc(n_pages, sizeof(Stamp));
        s1 = calloc(n_pages, sizeof(Stamp));
        if (!s0 || !s1)
                return log_oom();

        /* Baseline: everything dirtied so far is collected and re-protected, then stamps read. */
        r = vmm_link_pause(link, 2000, &pause_ns);
        if (r < 0)
                return log_error_errno(r, "Pause failed: %s", vmm_link_last_error(link));
        n = tracker_sync(&t, dirty);
        if (n < 0)
                return log_error_errno((int) n, "Baseline harvest failed: %s", t.error);
        snapshot_stamps(t.lay, pages, n_pages, s0);
        r = vmm_link_resume(link, 1);
        if (r < 0)
                return log_error_errno(r, "Resume failed: %s", vmm_link_last_error(link));

        for (unsigned round = 1; round <= arg_rounds; round++) {
                uint64_t written = 0, reported = 0, missed = 0, bad = 0, torn = 0, spurious = 0;

                dirtyset_clear(dirty);
                r = harvest_for(&t, dirty, arg_interval_ms);
                if (r < 0)
                        return r;
                r = vmm_link_pause(link, 2000, &pause_ns);
                if (r < 0)
                        return log_error_errno(r, "Pause failed: %s", vmm_link_last_error(link));
                /* Ordering rule: collect, reset, only then read contents. */
                n = tracker_sync(&t, dirty);
                if (n < 0)
                        return log_error_errno((int) n, "Final harvest of round %u failed: %s", round,
                                               t.error);
                snapshot_stamps(t.lay, pages, n_pages, s1);

                for (size_t i = 0; i < n_pages; i++) {
                        bool changed = memcmp(&s0[i], &s1[i], sizeof(Stamp)) != 0;
                        bool in_set = dirtyset_test(dirty, pages[i]);
                        uint64_t gpa = vmm_layout_page_gpa(t.lay, pages[i]);

                        written += changed;
                        reported += in_set;
                        if (changed && !in_set) {
                                /* The invariant: a page written since the last reset must be reported. */
                                if (missed < 5)
                                        log_error("round %u: page 0x%" PRIx64 " was written (seq %" PRIu64
                                                  " -> %" PRIu64 ") but not reported",
                                                  round, gpa, s0[i].seq, s1[i].seq);
                                missed++;
                        } else if (changed) {
                                /* Reported and written: it must hold a complete stamp the guest
                                 * wrote after the previous snapshot, except a page a vCPU was in
                                 * the middle of stamping when it was paused (one per vCPU). */
                                bool ok = s1[i].magic == DIRT_MAGIC && s1[i].gpa == gpa &&
                                          s1[i].cpu < t.lay->n_vcpus && s1[i].seq > s0[i].seq;
                                if (!ok && ++torn > t.lay->n_vcpus) {
                                        if (bad < 5)
                                                log_error("round %u: reported page 0x%" PRIx64
                                                          " holds no valid dirtier stamp (magic %08x cpu %u "
                                                          "seq %" PRIu64 " gpa 0x%" PRIx64 ")",
                                                          round, gpa, s1[i].magic, s1[i].cpu, s1[i].seq,
                                                          s1[i].gpa);
                                        bad++;
                                }
                        } else if (in_set)
                                /* KVM logs a page when it handles the write fault; a pause can
                                 * land before the store retires. Reported, not yet written: the
                                 * write faults and is logged again next round. */
                                spurious++;
                }
                log_info("round %u: written=%" PRIu64 " reported=%" PRIu64 " missed=%" PRIu64 " bad=%" PRIu64
                         " torn=%" PRIu64 " spurious=%" PRIu64 " pause_us=%" PRIu64,
                         round, written, reported, missed, bad, torn, spurious, pause_ns / 1000);
                if (missed || bad)
                        return 1;
                /* A round on a starved host can see no guest writes; a run where most
                 * rounds saw none checked nothing. */
                empty_rounds += written == 0;
                written_total += written;
                reported_total += reported;
                memcpy(s0, s1, n_pages * sizeof(Stamp));
                r = vmm_link_resume(link, round + 1);
                if (r < 0)
                        return log_error_errno(r, "Resume failed: %s", vmm_link_last_error(link));
        }

        if (empty_rounds > arg_rounds / 2)
                return log_error_errno(-ENODATA, "%u of %u rounds saw no guest writes; is dirtier running?",
                                       empty_rounds, arg_rounds),
                       1;
        if (t.ops == &tracker_ring_ops && t.stats.marked != t.stats.resets)
                return log_error_errno(-EUCLEAN, "harvested %" PRIu64 " ring entries but KVM reset %" PRIu64,
                                       t.stats.marked, t.stats.resets),
                       1;
        if (arg_expect_ring_full) {
                Dr__Control__StatusReply *st = NULL;
                uint64_t full = 0;

                r = vmm_link_get_status(link, &st);
                if (r < 0)
                        return log_error_errno(r, "GetStatus failed: %s", vmm_link_last_error(link));
                for (size_t i = 0; i < st->n_vcpus; i++)
                        full += st->vcpus[i]->ring_full_exits;
                dr__control__status_reply__free_unpacked(st, NULL);
                log_info("ring-full exits=%" PRIu64 " ring-full events=%" PRIu64, full,
                         t.stats.ring_full_events);
                if (full == 0 || t.stats.ring_full_events == 0)
                        return log_error_errno(-ENODATA,
                                               "expected the vCPUs to stop on ring-full, none did"),
                               1;
        }
        printf("harvester: mode=%s rounds=%u written=%" PRIu64 " reported=%" PRIu64 " entries=%" PRIu64
               " marked=%" PRIu64 " resets=%" PRIu64 " ring_full_events=%" PRIu64 " missed=0\n",
               t.ops->name, arg_rounds, written_total, reported_total, t.stats.entries, t.stats.marked,
               t.stats.resets, t.stats.ring_full_events);
        return 0;
}

static int cmd_wedge(void)
{
        _cleanup_(vmm_link_freep) VmmLink *link = NULL;
        _cleanup_(dirtyset_freep) DirtySet *dirty = NULL;
        uint64_t end;
        Tracker t;
        int r;

        r = attach_tracking(&link, &t, &dirty);
        if (r < 0)
                return r;
        if (t.ops != &tracker_ring_ops)
                return log_error_errno(-EINVAL, "wedge needs ring tracking");

        end = now_usec() + (uint64_t) arg_timeout_ms * USEC_PER_MSEC;
        while (now_usec() < end) {
                struct pollfd p = {.fd = t.lay->ring_full_fd, .events = POLLIN};
                Dr__Control__StatusReply *st = NULL;
                bool agent_wedged = false;
                int64_t n;

                if (poll(&p, 1, 20) > 0) {
                        n = tracker_ring_full(&t, dirty);
                        if (n == -EDEADLK || n == -EUCLEAN) {
                                /* A jam shows either as ring-full with nothing to harvest or
                                 * as an overflowed ring (reset count != harvested count). */
                                printf("harvester: wedge detected by harvester: %s\n", t.error);
                                return 0;
                        }
                        if (n < 0)
                                return log_error_errno((int) n, "Harvest failed: %s", t.error), 1;
                } else {
                        n = tracker_sync(&t, dirty);
                        if (n == -EUCLEAN) {
                                printf("harvester: wedge detected by harvester: %s\n", t.error);
                                return 0;
                        }
                        if (n < 0)
                                return log_error_errno((int) n, "Harvest failed: %s", t.error), 1;
                }
                r = vmm_link_get_status(link, &st);
                if (r < 0)
                        return log_error_errno(r, "GetStatus failed: %s", vmm_link_last_error(link)), 1;
                for (size_t i = 0; i < st->n_vcpus; i++)
                        if (st->vcpus[i]->state == DR__CONTROL__VCPU_RUN_STATE__VCPU_RUN_STATE_WEDGED) {
                                printf("harvester: wedge detected by agent: vCPU %u wedged after %" PRIu64
                                       " ring-full exits\n",
                                       st->vcpus[i]->index, st->vcpus[i]->ring_full_exits);
                                agent_wedged = true;
                        }
                dr__control__status_reply__free_unpacked(st, NULL);
                if (agent_wedged)
                        return 0;
        }
        log_error("No wedge reported within %u ms", arg_timeout_ms);
        return 1;
}

static int write_file(const char *path, const void *buf, size_t len)
{
        _cleanup_close_ int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd < 0)
                return -errno;
        return loop_write(fd, buf, len);
}

static int cmd_snapshot(void)
{
        _cleanup_(vmm_link_freep) VmmLink *link = NULL;
        _cleanup_free_ uint8_t *state = NULL;
        _cleanup_close_ int ram_fd = -EBADF;
        const VmmLayout *lay;
        size_t state_len = 0;
        uint64_t pause_ns;
        int r;

        if (!arg_state_out || !arg_ram_out)
                return log_error_errno(-EINVAL, "snapshot needs --state FILE and --ram FILE");
        r = open_link(&link);
        if (r < 0)
                return r;
        lay = vmm_link_layout(link);
        r = vmm_link_pause(link, 2000, &pause_ns);
        if (r < 0)
                return log_error_errno(r, "Pause failed: %s", vmm_link_last_error(link));
        r = vmm_link_save_state(link, &state, &state_len);
        if (r < 0)
                return log_error_errno(r, "SaveState failed: %s", vmm_link_last_error(link));
        r = write_file(arg_state_out, state, state_len);
        if (r < 0)
                return log_error_errno(r, "Failed to write %s: %m", arg_state_out);

        /* RAM in the memfd's own layout: each region at its memfd offset. */
        ram_fd = open(arg_ram_out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (ram_fd < 0)
                return log_error_errno(-errno, "Failed to create %s: %m", arg_ram_out);
        for (size_t i = 0; i < lay->n_regions; i++) {
                const VmmRegion *reg = &lay->regions[i];
                for (uint64_t off = 0; off < reg->size; off += 1 << 20) {
                        size_t chunk = (size_t) MIN(reg->size - off, 1ULL << 20);
                        ssize_t w = pwrite(ram_fd, reg->ram + off, chunk, (off_t) (reg->fd_offset + off));
                        if (w != (ssize_t) chunk)
                                return log_error_errno(w < 0 ? -errno : -EIO, "Failed to write %s: %m",
                                                       arg_ram_out);
                }
        }
        if (fsync(ram_fd) < 0)
                return log_error_errno(-errno, "fsync(%s): %m", arg_ram_out);
        if (arg_resume) {
                r = vmm_link_resume(link, 0);
                if (r < 0)
                        return log_error_errno(r, "Resume failed: %s", vmm_link_last_error(link));
        }
        printf("harvester: snapshot state_bytes=%zu ram_bytes=%" PRIu64 " pause_us=%" PRIu64 " resumed=%d\n",
               state_len, lay->total_pages * lay->page_size, pause_ns / 1000, arg_resume);
        return 0;
}

static int cmd_bench_pause(void)
{
        _cleanup_(vmm_link_freep) VmmLink *link = NULL;
        _cleanup_free_ uint64_t *rtt = NULL, *agent = NULL;
        int r;

        r = open_link(&link);
        if (r < 0)
                return r;
        rtt = calloc(arg_count, sizeof(uint64_t));
        agent = calloc(arg_count, sizeof(uint64_t));
        if (!rtt || !agent)
                return log_oom();
        for (unsigned i = 0; i < arg_count; i++) {
                uint64_t t0 = now_nsec(), ns;
                r = vmm_link_pause(link, 2000, &ns);
                if (r < 0)
                        return log_error_errno(r, "Pause failed: %s", vmm_link_last_error(link));
                r = vmm_link_resume(link, i + 1);
                if (r < 0)
                        return log_error_errno(r, "Resume failed: %s", vmm_link_last_error(link));
                rtt[i] = now_nsec() - t0;
                agent[i] = ns;
                usleep(2000); /* let the vCPUs get back into the guest */
        }
        printf("{\"pause_resume_rtt_us_p50\": %.1f, \"pause_resume_rtt_us_p99\": %.1f, "
               "\"pause_only_us_p50\": %.1f, \"pause_only_us_p99\": %.1f, \"vcpus\": %zu, \"count\": %u}\n",
               percentile(rtt, arg_count, 0.5) / 1e3, percentile(rtt, arg_count, 0.99) / 1e3,
               percentile(agent, arg_count, 0.5) / 1e3, percentile(agent, arg_count, 0.99) / 1e3,
               vmm_link_layout(link)->n_vcpus, arg_count);
        return 0;
}

static int cmd_bench_harvest(void)
{
        _cleanup_(vmm_link_freep) VmmLink *link = NULL;
        _cleanup_(dirtyset_freep) DirtySet *dirty = NULL;
        uint64_t t0, t1;
        Tracker t;
        int r;

        r = attach_tracking(&link, &t, &dirty);
        if (r < 0)
                return r;
        usleep(200 * 1000);
        (void) tracker_sync(&t, dirty);
        memset(&t.stats, 0, sizeof(t.stats));
        collect_ns = 0;
        t0 = now_usec();
        while (now_usec() - t0 < (uint64_t) arg_seconds * USEC_PER_SEC) {
                r = harvest_for(&t, dirty, 100);
                if (r < 0)
                        return r;
                dirtyset_clear(dirty);
        }
        r = t.ops->reset(&t);
        if (r < 0)
                return log_error_errno(r, "Reset failed: %s", t.error);
        t1 = now_usec();
        /* entries_per_s is what the guest produced and we kept up with;
         * collect_entries_per_s is how fast the harvest loop itself goes. */
        printf("{\"mode\": \"%s\", \"entries_per_s\": %.0f, \"collect_entries_per_s\": %.0f, "
               "\"ring_full_events\": %" PRIu64 ", \"marked\": %" PRIu64 ", \"resets\": %" PRIu64
               ", \"seconds\": %.2f}\n",
               t.ops->name, (double) t.stats.entries * 1e6 / (double) (t1 - t0),
               collect_ns ? (double) t.stats.entries * 1e9 / (double) collect_ns : 0.0,
               t.stats.ring_full_events, t.stats.marked, t.stats.resets, (double) (t1 - t0) / 1e6);
        return 0;
}

static volatile sig_atomic_t epochs_stop;

static void on_epochs_sigterm(int sig)
{
        epochs_stop = 1;
}

/*
 * The daemon's output-commit cycle without replication: every interval,
 * pause, resume as epoch n+1, then release epoch n's held output (as if the
 * standby had just committed n). Guest output is held for up to an interval.
 * SIGTERM ends it the way a clean dirtyrepd stop does: STOP_TRACKING, so the
 * agent releases what is held (a client that just vanished leaves it held).
 */
static int cmd_epochs(void)
{
        _cleanup_(vmm_link_freep) VmmLink *link = NULL;
        struct sigaction sa = {.sa_handler = on_epochs_sigterm, .sa_flags = SA_RESTART};
        uint64_t epoch = 1, released = 0, end;
        int r;

        (void) sigaction(SIGTERM, &sa, NULL);
        r = open_link(&link);
        if (r < 0)
                return r;
        r = vmm_link_resume(link, epoch);
        if (r < 0)
                return log_error_errno(r, "Resume failed: %s", vmm_link_last_error(link));
        end = now_usec() + (uint64_t) arg_seconds * USEC_PER_SEC;
        while (!epochs_stop && now_usec() < end) {
                uint64_t bytes = 0;

                usleep(arg_interval_ms * 1000);
                r = vmm_link_pause(link, 2000, NULL);
                if (r < 0)
                        return log_error_errno(r, "Pause failed: %s", vmm_link_last_error(link));
                r = vmm_link_resume(link, epoch + 1);
                if (r < 0)
                        return log_error_errno(r, "Resume failed: %s", vmm_link_last_error(link));
                r = vmm_link_release_output(link, epoch, &bytes);
                if (r < 0)
                        return log_error_errno(r, "ReleaseOutput failed: %s", vmm_link_last_error(link));
                released += bytes;
                epoch++;
        }
        r = vmm_link_stop_tracking(link);
        if (r < 0)
                return log_error_errno(r, "StopTracking failed: %s", vmm_link_last_error(link));
        printf("harvester: epochs=%" PRIu64 " released_bytes=%" PRIu64 "\n", epoch - 1, released);
        return 0;
}

static int parse_ws(const char *s)
{
        char *colon = strchr(s, ':');
        _cleanup_free_ char *base = NULL;
        WsRange w;

        if (!colon || arg_n_ws >= MAX_WS)
                return -EINVAL;
        base = strndup(s, (size_t) (colon - s));
        if (!base || parse_u64(base, &w.base) < 0 || parse_u64(colon + 1, &w.pages) < 0 || w.base % 4096 ||
            w.pages > (1ULL << 24))
                return -EINVAL;
        arg_ws[arg_n_ws++] = w;
        return 0;
}

static void help(void)
{
        printf("Usage: dr-harvester COMMAND --control PATH [OPTIONS]\n"
               "Commands: check, wedge, snapshot, epochs, bench-pause, bench-harvest\n"
               "  --ws BASE:PAGES      working-set range to check (repeatable)\n"
               "  --rounds N --interval-ms MS --ring-full-only --expect-ring-full\n"
               "  --state FILE --ram FILE --resume   (snapshot)\n"
               "  --count N (bench-pause) --seconds S (bench-harvest, epochs) --timeout-ms MS (wedge)\n"
               "  --interval-ms MS (check, epochs)\n");
}

int main(int argc, char **argv)
{
        static const struct option opts[] = {
                {"control", required_argument, NULL, 'c'},  {"ws", required_argument, NULL, 'w'},
                {"rounds", required_argument, NULL, 'r'},   {"interval-ms", required_argument, NULL, 'i'},
                {"ring-full-only", no_argument, NULL, 'F'}, {"expect-ring-full", no_argument, NULL, 'E'},
                {"state", required_argument, NULL, 's'},    {"ram", required_argument, NULL, 'm'},
                {"resume", no_argument, NULL, 'R'},         {"count", required_argument, NULL, 'n'},
                {"seconds", required_argument, NULL, 'S'},  {"timeout-ms", required_argument, NULL, 't'},
                {"help", no_argument, NULL, 'h'},           {}};
        const char *cmd;
        int c, r;

        log_set_ident("dr-harvester");
        if (argc < 2 || argv[1][0] == '-') {
                help();
                return 2;
        }
        cmd = argv[1];
        optind = 2;
        while ((c = getopt_long(argc, argv, "h", opts, NULL)) >= 0) {
                switch (c) {
                case 'c':
                        arg_control = optarg;
                        break;
                case 'w':
                        if (parse_ws(optarg) < 0) {
                                log_error("Bad --ws '%s' (want BASE:PAGES)", optarg);
                                return 2;
                        }
                        break;
                case 'r':
                        r = parse_u32(optarg, &arg_rounds);
                        goto check;
                case 'i':
                        r = parse_u32(optarg, &arg_interval_ms);
                        goto check;
                case 'n':
                        r = parse_u32(optarg, &arg_count);
                        goto check;
                case 'S':
                        r = parse_u32(optarg, &arg_seconds);
                        goto check;
                case 't':
                        r = parse_u32(optarg, &arg_timeout_ms);
                check:
                        if (r < 0 || !*optarg) {
                                log_error("Bad number '%s'", optarg);
                                return 2;
                        }
                        break;
                case 'F':
                        arg_ring_full_only = true;
                        break;
                case 'E':
                        arg_expect_ring_full = true;
                        break;
                case 's':
                        arg_state_out = optarg;
                        break;
                case 'm':
                        arg_ram_out = optarg;
                        break;
                case 'R':
                        arg_resume = true;
                        break;
                case 'h':
                        help();
                        return 0;
                default:
                        return 2;
                }
        }
        if (!arg_control || arg_count == 0 || arg_rounds == 0) {
                help();
                return 2;
        }

        if (streq(cmd, "check"))
                r = cmd_check();
        else if (streq(cmd, "wedge"))
                r = cmd_wedge();
        else if (streq(cmd, "snapshot"))
                r = cmd_snapshot();
        else if (streq(cmd, "epochs"))
                r = cmd_epochs();
        else if (streq(cmd, "bench-pause"))
                r = cmd_bench_pause();
        else if (streq(cmd, "bench-harvest"))
                r = cmd_bench_harvest();
        else {
                log_error("Unknown command '%s'", cmd);
                return 2;
        }
        if (r < 0)
                return 2;
        return r;
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The primary half of role.h: attach to the local VMM, connect to the
 * standby, and run the epoch pipeline (docs/architecture.md, "Design invariants" and "dirtyrepd").
 *
 * Threads. The sd-event loop (the caller's) owns the replication Link, the
 * attach and reconnect timers and the status. One epoch thread per VM owns
 * the VmmLink and the Tracker (VmmLink is not thread-safe) and does all the
 * work that touches the VM: harvest, pre-copy, seal, ship. They share the
 * fields marked "under mutex" in struct Primary; the loop wakes the thread
 * with an eventfd (wake_fd), the thread wakes the loop with another
 * (notify_fd). The loop never calls into the VmmLink.
 *
 * Sending from the epoch thread. link_send() may be called from any thread,
 * but the Link is freed on the loop thread when it goes down. The thread
 * takes the pointer under the mutex and counts itself in link_users; the
 * loop, before link_free(), clears p->link and waits until link_users is 0.
 * That wait is short: a Link that is down refuses every send at once
 * (-ENOTCONN), and the thread only ever sends non-blocking (-EAGAIN: it
 * keeps harvesting for a millisecond and tries again), so nothing the
 * thread does waits for the loop while it holds a use.
 *
 * Epochs. The running epoch `cur` collects its dirty pages in `col`
 * (collected, ring entries not yet reset), then `fresh` (reset: safe to
 * copy), and everything it sent or will send in `run`. Sealed epochs that
 * are not acked keep their `run` bitmap in the history, so after a lost
 * link the pages dirtied since the standby's last committed epoch are
 * known (incremental resync) without a full copy.
 */
#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <fcntl.h>
#include <unistd.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>

#include "crc32c.h"
#include "image-take.h"
#include "imagefile.h"
#include "link.h"
#include "log.h"
#include "macros.h"
#include "pages.h"
#include "role.h"
#include "track.h"
#include "util.h"
#include "vmm-link.h"

#define ATTACH_RETRY_USEC    (1 * USEC_PER_SEC)
#define GONE_CHECK_USEC      (50 * 1000ULL) /* report_stop(): is a VMM that still answers dying? */
#define GONE_CHECKS          20u
#define BACKOFF_MIN_MS       100u
#define BACKOFF_MAX_MS       2000u
#define RING_HARVEST_USEC    1000u /* ring: collect every millisecond */
#define PRECOPY_RESET_USEC   2000u /* pre-copy: re-protect at least this often so pages become copyable */
#define PAUSE_TIMEOUT_MS     2000u
#define PAUSE_TIMEOUTS_MAX   5u    /* in a row, each followed by RESUME, before protection ends */
#define PAUSE_WINDOW         1024u /* seals the pause percentiles are computed over */
#define BATCH_RECORDS        256u  /* per PAGES frame: ~1 MiB raw, well under REPL_MAX_FRAME */
#define BATCH_CAP            (PAGE_BATCH_HEADER + BATCH_RECORDS * PAGE_RECORD_MAX)
#define PRECOPY_BATCHES      4u /* per harvest tick, so seals and requests are not starved */
#define REQUEST_TIMEOUT_USEC (30 * USEC_PER_SEC)

/*
 * Split-brain guard (output side). Once a standby has committed an epoch of
 * this primary, losing it means the standby may promote itself: from then on
 * no output is released (nothing is acked) until SplitBrainTimeoutMs= has
 * passed; then SplitBrainPolicy= decides: continue unprotected (held output
 * goes out, and new output at once) or suspend the VM. A standby that
 * connects again ends either (the resync is protected again: output waits
 * for its ACK).
 */
typedef enum Guard {
        GUARD_NONE,        /* output follows ACKs */
        GUARD_HOLDING,     /* standby lost: output held, timer running */
        GUARD_UNPROTECTED, /* output released at once (policy continue, or promoted) */
        GUARD_SUSPENDED,   /* VM paused (policy suspend) */
} Guard;

typedef struct History {
        uint64_t epoch;
        bool full;      /* a full epoch: the standby's content before it is unknown */
        DirtySet *bits; /* pages sent in that epoch */
} History;

struct Primary {
        sd_event *event;
        const DaemonConfig *dcfg;
        const VmConfig *vm;
        uint8_t *secret;
        size_t secret_len;
        SSL_CTX *tls; /* or NULL: plaintext */
        uint8_t session[16];
        uint8_t uuid[16];
        char host[64];

        /* Loop thread only. */
        sd_event_source *attach_timer, *reconnect_timer, *notify_source, *split_timer, *gone_timer;
        unsigned gone_checks; /* vmm_link_listening() re-checks after the epoch thread stopped */
        unsigned backoff_ms;
        bool started;
        Dr__Repl__Hello hello;
        Dr__Repl__MemRegion *regions;
        Dr__Repl__MemRegion **region_ptrs;
        uint64_t total_pages;
        bool fail_reported;
        primary_image_done_t image_cb; /* loop only */
        void *image_userdata;

        pthread_t thread;
        bool thread_started;
        int wake_fd;   /* loop -> epoch thread */
        int notify_fd; /* epoch thread -> loop */

        pthread_mutex_t mutex;
        pthread_cond_t cond; /* requests done, link_users dropped */

        /* --- under mutex --- */
        bool stop;
        Link *link;          /* NULL when no Link is up or connecting */
        unsigned link_users; /* epoch-thread sends in progress on link */
        uint64_t link_gen;   /* bumped at every up and down */
        bool link_up;
        bool welcome_ours;
        uint64_t welcome_last;
        char peer[80];
        bool attached, failed;
        char detail[256];
        uint64_t sync_epoch; /* epoch of the running resync; protected once acked */
        bool syncing;
        bool sync_full;             /* the running resync is a full one */
        uint64_t sync_start_usec;   /* when it began */
        uint64_t sync_walked_pages; /* full sync: pages of RAM walked and handed to the link */
        uint64_t last_sync_usec;    /* how long the last completed one took, to its ACK */
        bool last_sync_full;
        uint64_t last_sealed, epochs_committed, full_syncs, incremental_syncs;
        uint64_t pauses[PAUSE_WINDOW];
        uint64_t vm_pauses[PAUSE_WINDOW]; /* the agent's view of the same seals; 0: not reported */
        uint64_t n_pauses;
        uint64_t pages_last_epoch;
        double dirty_rate;
        uint64_t inflight, staging_bytes;
        uint64_t page_bytes_in, page_bytes_out;
        uint64_t checkpoint_req, checkpoint_done, checkpoint_epoch;
        bool freeze_req, frozen, thaw_req;
        uint64_t frozen_epoch;
        /* Checkpoint images: one at a time. The loop sets image_req; the epoch
         * thread pre-copies, takes the image at its next seal, and a writer
         * thread writes it; the result goes back to the loop (image_ready). */
        bool image_busy, image_req, image_ready;
        char *image_dir, *image_parent; /* handed to the epoch thread */
        char *image_req_dir;            /* kept for the result */
        bool image_compress;
        int image_result;
        uint64_t image_epoch;
        ImageWriteStats image_stats;
        uint64_t image_pause_ns;
        char image_err[256];
        Guard guard;
        bool suspended; /* the epoch thread paused the VM for GUARD_SUSPENDED */
        /* Under mutex. attach_now() found the VM suspended (HelloReply.suspended); taken by the manager,
         * which keeps the service address away meanwhile (primary_take_attach_suspended()). */
        bool attach_suspended;
        bool had_standby;          /* a standby committed an epoch of this primary */
        uint64_t last_commit_usec; /* when an ACK last advanced the committed epoch */
        uint64_t commit_gap_max_usec;
        uint64_t commit_gaps[COMMIT_GAP_BUCKETS];
        bool promoted;
        uint64_t promoted_from;
        char *hash_path;
        bool hash_req;
        int hash_result;
        uint64_t hash_seq, hash_done;

        /* Written by the loop on ACK, read by the epoch thread: the standby
         * committed every epoch <= acked. Release/acquire pairs the two. */
        _Atomic uint64_t acked;
        /* primary_drain(): the daemon is stopping; no new seals (only a hint, relaxed). */
        _Atomic bool draining;
        uint64_t drain_target; /* loop only: the last epoch sealed when the drain began */
};

/* The epoch thread's own state. */
typedef struct Epoch {
        Primary *p;
        VmmLink *vmm;
        Tracker t;
        const VmmLayout *lay;
        /* Dirty sets cost what is in them, not what RAM is (dirtyset.h): nothing
         * below walks a RAM-sized bitmap between two seals. */
        DirtySet col;   /* collected, ring entries not yet reset */
        DirtySet fresh; /* collected and re-protected: may be copied */
        DirtySet *run;  /* sent (or to be sent) in the running epoch */
        History *hist;  /* sealed, not acked, oldest first */
        size_t n_hist;
        DirtySet **pool; /* spare sets */
        size_t n_pool;
        uint64_t cur;            /* the running epoch */
        unsigned pause_timeouts; /* PAUSEs in a row that timed out (seal postponed) */
        bool cur_full;
        uint64_t last_sealed;
        uint64_t released;   /* output released up to here */
        uint64_t acked_seen; /* history pruned up to here */
        uint64_t epoch_start_us, last_collect_us, last_reset_us;
        /* The link session the running epoch is being sent on. */
        uint64_t gen;
        bool session; /* EPOCH_BEGIN(cur) went out on link generation gen */
        uint64_t page_records;
        /* Staging: page contents copied in the pause, shipped after resume. */
        uint64_t *stage_pages;
        uint8_t *stage_data;
        size_t stage_cap, stage_n;
        uint8_t *batch_buf;
        PageBatchStats pstats;
        uint64_t dirty_since_seal;
        uint64_t seals_handled_ckpt;
        /* Checkpoint images. since_image: pages dirtied in the epochs sealed since
         * the last image (or since attach); an incremental image stores those plus
         * its own epoch's. The first image after attach must be full: pages written
         * before tracking started are in no set. */
        DirtySet since_image;
        bool image_chain; /* an image was written since attach */
        uint8_t last_image_id[16];
        ImageCapture *image_cap; /* pre-copied, taken at the next seal */
        char *image_dir, *image_parent;
        bool image_compress;
        /* The writer thread of the last image; joined before the next one and at exit. */
        pthread_t image_thread;
        bool image_thread_started;
        _Atomic bool image_written; /* the writer finished; the epoch thread collects it */
        struct ImageJob *image_job;
        bool suspended; /* paused by the split-brain guard */
} Epoch;

typedef struct ImageJob {
        Epoch *e;
        ImageCapture *cap;
        DirtySet *covered; /* NULL: full image */
        uint8_t *state;
        size_t state_len;
        char *dir, *parent;
        bool compress, has_parent_id;
        uint8_t parent_id[16];
        uint64_t epoch, pause_ns;
        int result;
        ImageWriteStats stats;
        char err[256];
} ImageJob;

static void image_job_free(ImageJob *j);
DEFINE_TRIVIAL_CLEANUP_FUNC_VOID(ImageJob *, image_job_free);
static void image_seal_done(Epoch *e, uint64_t sealed, uint64_t pause_ns, const uint8_t *state,
                            size_t state_len, int copy_result);
static int seal_request_possible_locked(Primary *p);

/* ---- small helpers ---------------------------------------------------------------------- */

static void wake(int fd)
{
        (void) eventfd_write(fd, 1);
}

static void set_failed_locked(Primary *p, const char *fmt, ...) _printf_(2, 3);
static void set_failed_locked(Primary *p, const char *fmt, ...)
{
        va_list ap;

        p->failed = true;
        va_start(ap, fmt);
        vsnprintf(p->detail, sizeof(p->detail), fmt, ap);
        va_end(ap);
}

/* ---- sending from the epoch thread ------------------------------------------------------ */

static int harvest_wait(Epoch *e, int timeout_ms);

/*
 * Sends one frame on the current link session. Never blocks on the link:
 * while its queue is full (a slow or stalled link), keeps harvesting and
 * retries, so ring-full stops are answered and memory stays bounded by the
 * Link's queue limit. Returns 0, -ENOTCONN (session gone), -ECANCELED
 * (stopping), or a tracking error from harvesting.
 */
static int ep_send(Epoch *e, uint16_t type, const void *buf, size_t len, const ProtobufCMessage *m,
                   bool may_wait)
{
        Primary *p = e->p;
        int r;

        for (;;) {
                Link *l = NULL;

                pthread_mutex_lock(&p->mutex);
                if (p->stop)
                        r = -ECANCELED;
                else if (!p->link || !p->link_up || p->link_gen != e->gen || !e->session)
                        r = -ENOTCONN;
                else {
                        l = p->link;
                        p->link_users++;
                        r = 0;
                }
                pthread_mutex_unlock(&p->mutex);
                if (r < 0)
                        return r;

                r = m ? link_send_message(l, type, m, false) : link_send(l, type, buf, len, false);

                pthread_mutex_lock(&p->mutex);
                if (--p->link_users == 0)
                        pthread_cond_broadcast(&p->cond); /* the loop may wait to free the Link */
                pthread_mutex_unlock(&p->mutex);

                if (r == -EAGAIN && may_wait) {
                        r = harvest_wait(e, 1);
                        if (r < 0)
                                return r;
                        continue;
                }
                if (r == -EAGAIN)
                        return r;
                if (r < 0 && r != -ENOTCONN) {
                        log_error_errno(r, "VM %s: sending frame type %u failed: %m", p->vm->name, type);
                        return r;
                }
                return r;
        }
}

/* Ships a finished batch (if not empty) and starts the next. */
static int batch_flush(Epoch *e, PageBatch *b, uint64_t epoch, bool may_wait)
{
        size_t len = page_batch_finish(b);
        uint32_t n = b->n;
        int r;

        if (len > 0) {
                r = ep_send(e, DR__REPL__FRAME_TYPE__FRAME_PAGES, e->batch_buf, len, NULL, may_wait);
                if (r < 0)
                        return r;
                e->page_records += n;
        }
        return page_batch_init(b, epoch, e->batch_buf, BATCH_CAP, BATCH_RECORDS,
                               e->p->vm->compression == CONFIG_COMPRESSION_LZ4, &e->pstats);
}

/* ---- harvesting ------------------------------------------------------------------------- */

static int tracking_failed(Epoch *e, int r, const char *what)
{
        Primary *p = e->p;

        pthread_mutex_lock(&p->mutex);
        set_failed_locked(p, "%s: %s", what, e->t.error[0] ? e->t.error : strerror(-r));
        pthread_mutex_unlock(&p->mutex);
        log_error_errno(r, "VM %s: %s: %s; replication stopped", p->vm->name, what,
                        e->t.error[0] ? e->t.error : "error");
        wake(p->notify_fd);
        return r;
}

/* Moves what was collected into `fresh` once its entries are reset (ordering rule). */
static void col_to_fresh(Epoch *e)
{
        (void) dirtyset_move(&e->fresh, &e->col);
}

static int do_reset(Epoch *e)
{
        int r = e->t.ops->reset(&e->t);
        if (r < 0)
                return tracking_failed(e, r, "dirty ring reset failed");
        e->last_reset_us = now_usec();
        col_to_fresh(e);
        return 0;
}

/* One harvest step: collect if due, reset if due. */
static int harvest_tick(Epoch *e, bool force)
{
        Primary *p = e->p;
        uint64_t now = now_usec();
        bool ring = e->t.ops == &tracker_ring_ops;
        uint64_t interval =
                ring ? RING_HARVEST_USEC : MAX((uint64_t) p->vm->epoch_ms * USEC_PER_MSEC / 4, 1000u);
        int64_t n;

        if (!force && now - e->last_collect_us < interval)
                return 0;
        n = e->t.ops->collect(&e->t, &e->col);
        e->last_collect_us = now;
        if (n < 0)
                return tracking_failed(e, (int) n, "collecting dirty pages failed");
        e->dirty_since_seal += (uint64_t) n;
        /* Ring: reset in batches (one RESET_RINGS per agent round trip), well before a
         * ring fills; with pre-copy also every few ms, since only reset pages may be
         * copied. Bitmap: collect already re-protected, reset is free. */
        if (!ring || e->t.pending_reset >= (uint64_t) e->lay->ring_entries / 4 * e->lay->n_vcpus ||
            (p->vm->pre_copy && e->t.pending_reset > 0 && now - e->last_reset_us >= PRECOPY_RESET_USEC))
                return do_reset(e);
        return 0;
}

/* Waits up to timeout_ms for the wake eventfd or a ring-full, then harvests what is due. */
static int harvest_wait(Epoch *e, int timeout_ms)
{
        struct pollfd pf[2] = {
                {.fd = e->p->wake_fd, .events = POLLIN},
                {.fd = e->lay->ring_full_fd, .events = POLLIN},
        };
        int n = e->lay->ring_full_fd >= 0 && e->t.ops == &tracker_ring_ops ? 2 : 1;

        if (poll(pf, (nfds_t) n, timeout_ms) < 0 && errno != EINTR)
                return -errno;
        if (pf[0].revents & POLLIN) {
                eventfd_t v;
                (void) eventfd_read(e->p->wake_fd, &v);
        }
        if (n == 2 && (pf[1].revents & POLLIN)) {
                /* A vCPU stopped on a full ring and waits for RESET_RINGS: collect + reset now. */
                int64_t r = tracker_ring_full(&e->t, &e->col);
                if (r < 0)
                        return tracking_failed(e, (int) r, "dirty ring full");
                e->dirty_since_seal += (uint64_t) r;
                e->last_reset_us = e->last_collect_us = now_usec();
                col_to_fresh(e);
                return 0;
        }
        return harvest_tick(e, false);
}

/* ---- history of sealed, unacked epochs -------------------------------------------------- */

static DirtySet *pool_get(Epoch *e)
{
        DirtySet *b;

        assert(e->n_pool > 0);
        b = e->pool[--e->n_pool];
        dirtyset_clear(b);
        return b;
}

static void pool_put(Epoch *e, DirtySet *b)
{
        e->pool[e->n_pool++] = b;
}

static void hist_drop_upto(Epoch *e, uint64_t epoch)
{
        size_t k = 0;

        while (k < e->n_hist && e->hist[k].epoch <= epoch)
                pool_put(e, e->hist[k++].bits);
        if (k > 0) {
                memmove(e->hist, e->hist + k, (e->n_hist - k) * sizeof(History));
                e->n_hist -= k;
        }
}

/* Acks arrived: release held output (output commit) and forget committed epochs. */
static int handle_acks(Epoch *e)
{
        Primary *p = e->p;
        /* Acquire pairs with the release store in on_frame(): the ack is for an epoch we sealed. */
        uint64_t acked = atomic_load_explicit(&p->acked, memory_order_acquire);
        int r;

        if (acked <= e->acked_seen)
                return 0;
        e->acked_seen = acked;
        hist_drop_upto(e, acked);
        if (p->vm->output_commit && acked > e->released) {
                uint64_t bytes = 0;
                /* Output of epoch n is released only now that the standby committed n. */
                r = vmm_link_release_output(e->vmm, acked, &bytes);
                if (r < 0)
                        return log_error_errno(r, "VM %s: ReleaseOutput(%" PRIu64 ") failed: %s",
                                               p->vm->name, acked, vmm_link_last_error(e->vmm));
        }
        e->released = acked;
        pthread_mutex_lock(&p->mutex);
        p->inflight = e->n_hist;
        pthread_mutex_unlock(&p->mutex);
        return 0;
}

/* ---- link sessions: full and incremental resync ----------------------------------------- */

static int send_begin(Epoch *e, bool full, uint64_t base)
{
        Dr__Repl__EpochBegin b = DR__REPL__EPOCH_BEGIN__INIT;

        b.epoch = e->cur;
        b.full = full;
        if (!full) {
                b.has_base_epoch = true;
                b.base_epoch = base;
        }
        return ep_send(e, DR__REPL__FRAME_TYPE__FRAME_EPOCH_BEGIN, NULL, 0, &b.base, true);
}

/*
 * Full sync of the running epoch: every non-zero page of RAM, copied while
 * the VM runs. Tracking is on and was just reset, so any page written after
 * its copy is logged again and re-sent (pre-copy or at the seal).
 */
static int full_walk(Epoch *e)
{
        uint64_t epoch = e->cur;
        PageBatch b;
        int r;

        r = page_batch_init(&b, e->cur, e->batch_buf, BATCH_CAP, BATCH_RECORDS,
                            e->p->vm->compression == CONFIG_COMPRESSION_LZ4, &e->pstats);
        if (r < 0)
                return r;
        for (uint64_t page = 0; page < e->lay->total_pages; page++) {
                const uint8_t *data = vmm_layout_page_ptr(e->lay, page);

                if (page_is_zero(data))
                        continue; /* the standby starts from zero */
                if (page_batch_add(&b, page, data) == -ENOSPC) {
                        r = batch_flush(e, &b, epoch, true);
                        if (r < 0)
                                return r;
                        pthread_mutex_lock(&e->p->mutex);
                        e->p->sync_walked_pages = page;
                        pthread_mutex_unlock(&e->p->mutex);
                        r = harvest_tick(e, false);
                        if (r < 0)
                                return r;
                        r = page_batch_add(&b, page, data);
                        if (r < 0)
                                return r;
                }
                dirtyset_add(e->run, page);
        }
        r = batch_flush(e, &b, epoch, true);
        if (r < 0)
                return r;
        pthread_mutex_lock(&e->p->mutex);
        e->p->sync_walked_pages = e->lay->total_pages;
        pthread_mutex_unlock(&e->p->mutex);
        return 0;
}

/* Whether the standby's replica (epoch L of our session) plus what we remember is enough. */
static bool can_resume_from(Epoch *e, bool ours, uint64_t L)
{
        if (!ours || L == 0 || L > e->last_sealed || e->cur_full)
                return false;
        /* Committed epochs are forgotten: we know the pages of (released, last_sealed]. */
        if (L < e->released)
                return false;
        if (e->n_hist > 0 && L < e->hist[0].epoch - 1)
                return false;
        for (size_t i = 0; i < e->n_hist; i++)
                if (e->hist[i].epoch > L && e->hist[i].full)
                        return false;
        return true;
}

static int session_start(Epoch *e, bool ours, uint64_t L)
{
        Primary *p = e->p;
        bool full = !can_resume_from(e, ours, L);
        int64_t n;
        int r;

        e->session = true;
        e->page_records = 0;
        e->stage_n = 0;
        if (!full) {
                /* Everything dirtied since L: the sealed epochs the dead link carried, the
                 * running epoch so far, and what is waiting to be copied. */
                for (size_t i = 0; i < e->n_hist; i++)
                        if (e->hist[i].epoch > L)
                                (void) dirtyset_merge(&e->fresh, e->hist[i].bits);
                (void) dirtyset_move(&e->fresh, e->run);
                hist_drop_upto(e, UINT64_MAX);
                e->cur_full = false;
                log_info("VM %s: incremental resync: epoch %" PRIu64 " on base %" PRIu64 ", %" PRIu64
                         " pages",
                         p->vm->name, e->cur, L, e->fresh.n);
                pthread_mutex_lock(&p->mutex);
                p->incremental_syncs++;
                p->sync_epoch = e->cur;
                p->syncing = true;
                p->sync_full = false;
                p->sync_start_usec = now_usec();
                p->inflight = 0;
                pthread_mutex_unlock(&p->mutex);
                return send_begin(e, false, L);
        }

        log_info("VM %s: full sync in epoch %" PRIu64 " (standby holds %s)", p->vm->name, e->cur,
                 ours ? "an epoch we cannot resume from" : "no replica of this session");
        hist_drop_upto(e, UINT64_MAX);
        e->cur_full = true;
        pthread_mutex_lock(&p->mutex);
        p->full_syncs++;
        p->sync_epoch = e->cur;
        p->syncing = true;
        p->sync_full = true;
        p->sync_start_usec = now_usec();
        p->sync_walked_pages = 0;
        p->inflight = 0;
        /* The standby is busy applying it (and has nothing to fail over to
         * meanwhile): tolerate a longer silence than the heartbeat window, so
         * a loaded host does not restart the full sync again and again.
         * p->link stays alive while p->mutex is held. */
        if (p->link && p->link_gen == e->gen)
                link_set_patience(p->link, SYNC_PATIENCE_USEC);
        pthread_mutex_unlock(&p->mutex);
        r = send_begin(e, true, 0);
        if (r < 0)
                return r;
        /* Ordering rule: collect -> reset -> copy. After this sync every later write is
         * logged again, so the walk may copy pages that are being written. */
        n = tracker_sync(&e->t, &e->col);
        if (n < 0)
                return tracking_failed(e, (int) n, "collecting dirty pages failed");
        e->last_reset_us = e->last_collect_us = now_usec();
        dirtyset_clear(&e->col);
        dirtyset_clear(&e->fresh);
        dirtyset_clear(e->run);
        return full_walk(e);
}

/* ---- pre-copy, seal, ship ------------------------------------------------------------- */

/* Sends pages that were collected and reset while the VM runs, as PAGES of the running epoch. */
static int precopy(Epoch *e)
{
        for (unsigned k = 0; k < PRECOPY_BATCHES && e->fresh.n > 0; k++) {
                uint64_t taken[BATCH_RECORDS];
                uint32_t n_taken = 0;
                PageBatch b;
                size_t len;
                int r;

                r = page_batch_init(&b, e->cur, e->batch_buf, BATCH_CAP, BATCH_RECORDS,
                                    e->p->vm->compression == CONFIG_COMPRESSION_LZ4, &e->pstats);
                if (r < 0)
                        return r;
                for (uint64_t w = dirtyset_next_word(&e->fresh, 0);
                     w < e->fresh.words && n_taken < BATCH_RECORDS; w = dirtyset_next_word(&e->fresh, w + 1))
                        for (uint64_t v = e->fresh.w[w]; v && n_taken < BATCH_RECORDS; v &= v - 1) {
                                uint64_t page = w * 64 + (uint64_t) __builtin_ctzll(v);
                                /* The page's ring entry was reset before we got here (fresh
                                 * only holds reset pages): a write racing this copy is logged
                                 * again and the page re-sent, so a torn copy never stays. */
                                if (page_batch_add(&b, page, vmm_layout_page_ptr(e->lay, page)) < 0)
                                        break;
                                taken[n_taken++] = page;
                        }
                len = page_batch_finish(&b);
                if (len == 0)
                        return 0;
                r = ep_send(e, DR__REPL__FRAME_TYPE__FRAME_PAGES, e->batch_buf, len, NULL, false);
                if (r == -EAGAIN)
                        return 0; /* link busy: leave them for later or for the seal */
                if (r < 0)
                        return r;
                e->page_records += n_taken;
                for (uint32_t i = 0; i < n_taken; i++) {
                        dirtyset_del(&e->fresh, taken[i]);
                        dirtyset_add(e->run, taken[i]);
                }
        }
        return 0;
}

/* Ships the staged pages as PAGES of `epoch` (the sealed one; cur may have moved on). */
static int ship_staging(Epoch *e, uint64_t epoch)
{
        PageBatch b;
        int r;

        r = page_batch_init(&b, epoch, e->batch_buf, BATCH_CAP, BATCH_RECORDS,
                            e->p->vm->compression == CONFIG_COMPRESSION_LZ4, &e->pstats);
        if (r < 0)
                return r;
        for (size_t i = 0; i < e->stage_n; i++) {
                const uint8_t *data = e->stage_data + i * PAGE_BYTES;
                if (page_batch_add(&b, e->stage_pages[i], data) == -ENOSPC) {
                        r = batch_flush(e, &b, epoch, true);
                        if (r < 0)
                                return r;
                        r = page_batch_add(&b, e->stage_pages[i], data);
                        if (r < 0)
                                return r;
                }
        }
        r = batch_flush(e, &b, epoch, true);
        if (r < 0)
                return r;
        e->stage_n = 0;
        return 0;
}

static void record_pause(Primary *p, uint64_t ns, uint64_t vm_ns)
{
        p->pauses[p->n_pauses % PAUSE_WINDOW] = ns;
        p->vm_pauses[p->n_pauses % PAUSE_WINDOW] = vm_ns;
        p->n_pauses++;
}

/*
 * Seals the running epoch: PAUSE -> final collect + reset -> VMM-written
 * pages -> copy the remaining dirty pages into staging -> SAVE_STATE ->
 * RESUME(cur + 1) (unless freezing) -> ship staging, STATE, EPOCH_END.
 *
 * Staging is bounded by MaxStagingMB. When an epoch's remaining dirty set is
 * larger, the VM stays paused while each full staging buffer is shipped
 * (queued on the link) and the copy continues: memory stays bounded and the
 * replica stays exact, at the price of a longer pause for that one epoch.
 * With pre-copy that only happens when the link cannot keep up at all.
 */
static int seal(Epoch *e, bool freeze)
{
        Primary *p = e->p;
        Dr__Repl__EpochState st = DR__REPL__EPOCH_STATE__INIT;
        Dr__Repl__EpochEnd end = DR__REPL__EPOCH_END__INIT;
        _cleanup_free_ uint8_t *state = NULL;
        size_t state_len = 0;
        uint64_t t0, pause_ns, vm_pause_ns, sealed = e->cur, distinct, dirty_pages, span_us;
        /* Round trips to the agent are where a loaded host stretches a pause (each
         * one waits for a thread to be scheduled): with the agent's features a seal
         * is two, PAUSE+SAVE_STATE and RESET_RINGS+RESUME, instead of four. */
        bool state_in_pause = vmm_link_has_feature(e->vmm, DR__CONTROL__FEATURE__FEATURE_PAUSE_SAVES_STATE);
        bool reset_in_resume = !freeze && tracker_resume_resets(&e->t);
        int image_copy_r = 0;
        int64_t n;
        int r;

        t0 = now_nsec();
        if (state_in_pause)
                r = vmm_link_pause_save(e->vmm, PAUSE_TIMEOUT_MS, NULL, &state, &state_len);
        else
                r = vmm_link_pause(e->vmm, PAUSE_TIMEOUT_MS, NULL);
        if (r == -ETIMEDOUT && e->pause_timeouts + 1 < PAUSE_TIMEOUTS_MAX) {
                /* A vCPU the host did not run for PAUSE_TIMEOUT_MS (a loaded
                 * machine) is no reason to end protection: the agent keeps the
                 * VM paused, so resume it in the same epoch and seal later. */
                char why[256];
                snprintf(why, sizeof(why), "%s", vmm_link_last_error(e->vmm));
                if (vmm_link_resume(e->vmm, e->cur) >= 0) {
                        e->pause_timeouts++;
                        log_warning("VM %s: PAUSE timed out (%s); resumed, epoch %" PRIu64
                                    " goes on and is sealed later (%u in a row, %u end protection)",
                                    p->vm->name, why, e->cur, e->pause_timeouts, PAUSE_TIMEOUTS_MAX);
                        return 1;
                }
        }
        if (r < 0) {
                pthread_mutex_lock(&p->mutex);
                set_failed_locked(p, "PAUSE failed: %s", vmm_link_last_error(e->vmm));
                pthread_mutex_unlock(&p->mutex);
                wake(p->notify_fd);
                return log_error_errno(r, "VM %s: PAUSE failed: %s", p->vm->name,
                                       vmm_link_last_error(e->vmm));
        }
        e->pause_timeouts = 0;
        /* Ordering rule: collect, reset, and only then copy. With the reset folded
         * into RESUME the copy comes before the reset, which is the same thing here:
         * every vCPU is parked from the collect to the reset, so no write can land
         * between the copy and the re-protection. */
        n = reset_in_resume ? e->t.ops->collect(&e->t, &e->col) : tracker_sync(&e->t, &e->col);
        if (n < 0) {
                (void) vmm_link_resume(e->vmm, e->cur);
                return tracking_failed(e, (int) n, "final harvest failed");
        }
        e->dirty_since_seal += (uint64_t) n;
        /* (With reset_in_resume the reset is "now" too: nothing runs until it.) */
        e->last_collect_us = e->last_reset_us = now_usec();
        col_to_fresh(e);
        /* Pages the VMM wrote itself (device emulation): KVM did not log them. */
        (void) vmm_link_take_vmm_dirty(e->vmm, &e->fresh);

        e->stage_n = 0;
        for (uint64_t w = dirtyset_next_word(&e->fresh, 0); w < e->fresh.words;
             w = dirtyset_next_word(&e->fresh, w + 1)) {
                /* Take the word first: shipping a full staging buffer may harvest into
                 * `fresh` (ring-full while waiting for the link), never into this word's
                 * bits we are copying now. */
                uint64_t bits = dirtyset_take_word(&e->fresh, w);

                for (uint64_t v = bits; v; v &= v - 1) {
                        uint64_t page = w * 64 + (uint64_t) __builtin_ctzll(v);
                        if (e->stage_n == e->stage_cap) {
                                r = ship_staging(e, sealed);
                                if (r < 0 && r != -ENOTCONN)
                                        goto fail_resume;
                                e->stage_n = 0;
                        }
                        memcpy(e->stage_data + e->stage_n * PAGE_BYTES, vmm_layout_page_ptr(e->lay, page),
                               PAGE_BYTES);
                        e->stage_pages[e->stage_n++] = page;
                }
                (void) dirtyset_add_word(e->run, w, bits);
        }
        if (e->image_cap) {
                /* An image at this seal: the epoch's own pages, from paused RAM. */
                int64_t k = image_capture_copy(e->image_cap, e->run->w);
                image_copy_r = k < 0 ? (int) k : 0;
        }

        r = state_in_pause ? 0 : vmm_link_save_state(e->vmm, &state, &state_len);
        if (r < 0) {
                log_error_errno(r, "VM %s: SAVE_STATE failed: %s", p->vm->name, vmm_link_last_error(e->vmm));
                pthread_mutex_lock(&p->mutex);
                set_failed_locked(p, "SAVE_STATE failed: %s", vmm_link_last_error(e->vmm));
                pthread_mutex_unlock(&p->mutex);
                goto fail_resume;
        }
        if (!freeze) {
                r = reset_in_resume ? tracker_reset_and_resume(&e->t, e->cur + 1)
                                    : vmm_link_resume(e->vmm, e->cur + 1);
                if (r == -EUCLEAN)
                        return tracking_failed(e, r, "dirty ring reset at resume");
                if (r < 0) {
                        const char *why = reset_in_resume ? e->t.error : vmm_link_last_error(e->vmm);
                        pthread_mutex_lock(&p->mutex);
                        set_failed_locked(p, "RESUME failed: %s", why);
                        pthread_mutex_unlock(&p->mutex);
                        wake(p->notify_fd);
                        return log_error_errno(r, "VM %s: RESUME failed: %s", p->vm->name, why);
                }
        }
        pause_ns = now_nsec() - t0;
        /* What the guest saw: the agent's Pause arrival to vCPU release, without
         * the two requests' trips between the processes (0 when freezing). */
        vm_pause_ns = freeze ? 0 : vmm_link_last_paused_ns(e->vmm);

        distinct = e->run->n;
        dirty_pages = e->dirty_since_seal;
        span_us = MAX(now_usec() - e->epoch_start_us, 1u);
        e->dirty_since_seal = 0;
        e->epoch_start_us = now_usec();
        e->last_sealed = sealed;
        image_seal_done(e, sealed, pause_ns, state, state_len, image_copy_r);
        e->hist[e->n_hist++] = (History){.epoch = sealed, .full = e->cur_full, .bits = e->run};
        e->run = pool_get(e);
        e->cur++;
        e->cur_full = false;
        if (!p->vm->output_commit) {
                /* OutputCommit=no: output flows as soon as its epoch is sealed. */
                (void) vmm_link_release_output(e->vmm, sealed, NULL);
                e->released = MAX(e->released, sealed);
        }

        pthread_mutex_lock(&p->mutex);
        /* A freezing seal counts up to where RESUME would have been. */
        record_pause(p, pause_ns, vm_pause_ns);
        p->page_bytes_in = e->pstats.bytes_in;
        p->page_bytes_out = e->pstats.bytes_out;
        p->last_sealed = sealed;
        p->pages_last_epoch = distinct;
        p->dirty_rate = (double) dirty_pages * 1e6 / (double) span_us;
        p->inflight = e->n_hist;
        p->staging_bytes = (uint64_t) e->stage_n * PAGE_BYTES;
        pthread_mutex_unlock(&p->mutex);

        /* Ship while the next epoch runs. A lost link drops the rest: the pages are in
         * the history bitmap and go out again in the resync. */
        r = ship_staging(e, sealed);
        if (r == 0) {
                st.epoch = sealed;
                st.vmstate.data = state;
                st.vmstate.len = state_len;
                r = ep_send(e, DR__REPL__FRAME_TYPE__FRAME_STATE, NULL, 0, &st.base, true);
        }
        if (r == 0) {
                end.epoch = sealed;
                end.page_records = e->page_records;
                end.distinct_pages = distinct;
                end.has_seal_pause_ns = true;
                end.seal_pause_ns = pause_ns;
                r = ep_send(e, DR__REPL__FRAME_TYPE__FRAME_EPOCH_END, NULL, 0, &end.base, true);
        }
        e->page_records = 0;
        e->stage_n = 0;
        if (r == 0)
                r = send_begin(e, false, sealed);
        pthread_mutex_lock(&p->mutex);
        p->staging_bytes = 0;
        pthread_mutex_unlock(&p->mutex);
        if (r == -ENOTCONN)
                return 0;
        return r;

fail_resume:
        (void) vmm_link_resume(e->vmm, e->cur);
        wake(p->notify_fd);
        return r < 0 ? r : -EIO;
}

/* ---- checkpoint images ---------------------------------------------------------------------- */

static void image_job_free(ImageJob *j)
{
        if (!j)
                return;
        image_capture_free(j->cap);
        dirtyset_free(j->covered);
        free(j->state);
        free(j->dir);
        free(j->parent);
        free(j);
}

/* Epoch thread: hands an image result to the loop (primary_checkpoint_image's callback). */
static void image_post(Epoch *e, int r, uint64_t epoch, uint64_t pause_ns, const ImageWriteStats *st,
                       const char *err)
{
        Primary *p = e->p;

        pthread_mutex_lock(&p->mutex);
        p->image_result = r;
        p->image_epoch = epoch;
        p->image_pause_ns = pause_ns;
        p->image_stats = st ? *st : (ImageWriteStats){};
        snprintf(p->image_err, sizeof(p->image_err), "%s", r < 0 ? (err && *err ? err : strerror(-r)) : "");
        p->image_ready = true;
        pthread_mutex_unlock(&p->mutex);
        wake(p->notify_fd);
}

/* The writer: fsyncs can take a while, so not on the epoch thread (harvesting goes on). */
static void *image_writer(void *userdata)
{
        ImageJob *j = userdata;
        ImageWriteOptions o = {
                .vm_name = j->e->p->vm->name,
                .vm_uuid = j->e->p->uuid,
                .state = j->state,
                .state_len = j->state_len,
                .covered = j->parent ? j->covered->w : NULL,
                .parent = j->parent,
                .parent_id = j->has_parent_id ? j->parent_id : NULL,
                .compress = j->compress,
                .epoch = j->epoch,
        };

        j->result = image_capture_write(j->cap, j->dir, &o, &j->stats, j->err, sizeof(j->err));
        atomic_store(&j->e->image_written, true);
        wake(j->e->p->wake_fd);
        return NULL;
}

/* Epoch thread: collects a finished writer (waits for it when `wait`). */
static void image_collect(Epoch *e, bool wait)
{
        ImageJob *j;

        if (!e->image_thread_started || (!wait && !atomic_load(&e->image_written)))
                return;
        pthread_join(e->image_thread, NULL);
        e->image_thread_started = false;
        atomic_store(&e->image_written, false);
        j = TAKE_PTR(e->image_job);
        if (j->result >= 0) {
                memcpy(e->last_image_id, j->stats.image_id, sizeof(e->last_image_id));
                e->image_chain = true;
                log_info("VM %s: image %s written at epoch %" PRIu64 ": %" PRIu64 " pages stored, %" PRIu64
                         " bytes, seal pause %.3f ms",
                         e->p->vm->name, j->dir, j->epoch, j->stats.present_pages, j->stats.total_bytes,
                         (double) j->pause_ns / 1e6);
        } else {
                /* Nothing is lost for the next image: its pages count from the last good one. */
                (void) dirtyset_merge(&e->since_image, j->covered);
                log_error_errno(j->result, "VM %s: writing image %s failed: %s", e->p->vm->name, j->dir,
                                j->err);
        }
        image_post(e, j->result, j->epoch, j->pause_ns, &j->stats, j->err);
        image_job_free(j);
}

/* Epoch thread: takes up a request: pre-copies now (VM running), the rest at the next seal. */
static void image_start(Epoch *e)
{
        Primary *p = e->p;
        _cleanup_free_ char *dir = NULL, *parent = NULL;
        _cleanup_(image_capture_freep) ImageCapture *cap = NULL;
        const uint8_t *ram[IMAGE_MAX_REGIONS];
        ImageLayout il;
        bool compress;
        int64_t n;
        int r;

        if (e->image_cap || e->image_thread_started)
                return;
        pthread_mutex_lock(&p->mutex);
        if (!p->image_req) {
                pthread_mutex_unlock(&p->mutex);
                return;
        }
        p->image_req = false;
        dir = TAKE_PTR(p->image_dir);
        parent = TAKE_PTR(p->image_parent);
        compress = p->image_compress;
        pthread_mutex_unlock(&p->mutex);

        if (parent && !e->image_chain)
                return image_post(
                        e, -ESTALE, 0, 0, NULL,
                        "no image was taken since dirtyrepd attached to this VMM: take a full one first "
                        "(without a parent)");
        r = image_layout_from_vmm(e->lay, &il, ram);
        if (r >= 0)
                r = image_capture_new(&il, ram, &cap);
        if (r < 0)
                return image_post(e, r, 0, 0, NULL, "cannot set up image staging for this VM's layout");
        /* Pages of since_image were reset at their seals (collect -> reset -> copy); a
         * full image copies all of RAM. Either way, a page written after its copy is
         * logged in the running epoch and copied again at its seal, paused. */
        n = image_capture_copy(cap, parent ? e->since_image.w : NULL);
        if (n < 0)
                return image_post(e, (int) n, 0, 0, NULL, "copying pages into image staging failed");
        e->image_cap = TAKE_PTR(cap);
        e->image_dir = TAKE_PTR(dir);
        e->image_parent = TAKE_PTR(parent);
        e->image_compress = compress;
}

/*
 * At the seal, RESUME done: the epoch's pages are in the capture (copied in
 * the pause); hand it to a writer thread. since_image restarts empty: the
 * next image counts from this one. Otherwise the epoch's pages join it.
 */
static void image_seal_done(Epoch *e, uint64_t sealed, uint64_t pause_ns, const uint8_t *state,
                            size_t state_len, int copy_result)
{
        _cleanup_(image_job_freep) ImageJob *j = NULL;
        int r;

        if (!e->image_cap) {
                (void) dirtyset_merge(&e->since_image, e->run);
                return;
        }
        j = calloc(1, sizeof(*j));
        if (j)
                j->covered = dirtyset_new(e->lay->total_pages);
        if (j && j->covered && state_len > 0)
                j->state = memdup(state, state_len);
        if (!j || !j->covered || !j->state || copy_result < 0) {
                r = copy_result < 0 ? copy_result : -ENOMEM;
                (void) dirtyset_merge(&e->since_image, e->run);
                e->image_cap = image_capture_free(e->image_cap);
                e->image_dir = mfree(e->image_dir);
                e->image_parent = mfree(e->image_parent);
                return image_post(e, r, sealed, pause_ns, NULL, "taking the image at the seal failed");
        }
        (void) dirtyset_merge(j->covered, &e->since_image);
        (void) dirtyset_merge(j->covered, e->run);
        dirtyset_clear(&e->since_image);
        j->e = e;
        j->cap = TAKE_PTR(e->image_cap);
        j->dir = TAKE_PTR(e->image_dir);
        j->parent = TAKE_PTR(e->image_parent);
        j->compress = e->image_compress;
        j->state_len = state_len;
        j->epoch = sealed;
        j->pause_ns = pause_ns;
        if (j->parent) {
                j->has_parent_id = true;
                memcpy(j->parent_id, e->last_image_id, sizeof(j->parent_id));
        }
        atomic_store(&e->image_written, false);
        r = -pthread_create(&e->image_thread, NULL, image_writer, j);
        if (r < 0) {
                (void) dirtyset_merge(&e->since_image, j->covered);
                return image_post(e, r, sealed, pause_ns, NULL, "cannot start the image writer thread");
        }
        e->image_thread_started = true;
        e->image_job = TAKE_PTR(j);
}

/* Epoch thread exiting: finish or fail what is pending, so every request is answered. */
static void image_shutdown(Epoch *e)
{
        Primary *p = e->p;
        bool req;

        image_collect(e, true);
        if (e->image_cap) {
                e->image_cap = image_capture_free(e->image_cap);
                e->image_dir = mfree(e->image_dir);
                e->image_parent = mfree(e->image_parent);
                image_post(e, -ESTALE, 0, 0, NULL,
                           "replication stopped before the image's epoch was sealed");
        }
        pthread_mutex_lock(&p->mutex);
        req = p->image_req;
        p->image_req = false;
        pthread_mutex_unlock(&p->mutex);
        if (req)
                image_post(e, -ESTALE, 0, 0, NULL, "replication stopped before the image was taken");
}

/* ---- test hook: page hashes ------------------------------------------------------------- */

static int hash_ram(Epoch *e, const char *path)
{
        _cleanup_close_ int fd = -EBADF;
        _cleanup_free_ uint8_t *buf = NULL;
        const size_t chunk = 4096;
        size_t used = 0;
        int r;

        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd < 0)
                return -errno;
        buf = malloc(chunk * 4);
        if (!buf)
                return -ENOMEM;
        for (uint64_t page = 0; page < e->lay->total_pages; page++) {
                uint32_t c = crc32c(0, vmm_layout_page_ptr(e->lay, page), PAGE_BYTES);
                buf[used++] = (uint8_t) c;
                buf[used++] = (uint8_t) (c >> 8);
                buf[used++] = (uint8_t) (c >> 16);
                buf[used++] = (uint8_t) (c >> 24);
                if (used == chunk * 4) {
                        r = loop_write(fd, buf, used);
                        if (r < 0)
                                return r;
                        used = 0;
                }
        }
        if (used > 0) {
                r = loop_write(fd, buf, used);
                if (r < 0)
                        return r;
        }
        return 0;
}

/* ---- the epoch thread ------------------------------------------------------------------- */

static void epoch_free(Epoch *e)
{
        image_shutdown(e);
        dirtyset_done(&e->since_image);
        dirtyset_done(&e->col);
        dirtyset_done(&e->fresh);
        dirtyset_free(e->run);
        for (size_t i = 0; i < e->n_hist; i++)
                dirtyset_free(e->hist[i].bits);
        for (size_t i = 0; i < e->n_pool; i++)
                dirtyset_free(e->pool[i]);
        free(e->hist);
        free(e->pool);
        free(e->stage_pages);
        free(e->stage_data);
        free(e->batch_buf);
        vmm_link_free(e->vmm);
}

static void stop_tracking_logged(Epoch *e, bool hold)
{
        int r = hold ? vmm_link_stop_tracking_hold(e->vmm) : vmm_link_stop_tracking(e->vmm);

        /* A VMM that is gone needs no StopTracking (and its agent holds, were it alive). */
        if (r < 0 && r != -ECONNRESET && r != -EPIPE && r != -ENOTCONN && r != -ESHUTDOWN)
                log_error_errno(r, "VM %s: StopTracking failed: %s", e->p->vm->name,
                                vmm_link_last_error(e->vmm));
}

/*
 * Every way this primary stops (daemon stop or restart, a reload that changes
 * or removes the VM, Detach, an error of the epoch thread) ends here, on the
 * epoch thread, which owns the VmmLink. What the standby acknowledged is
 * released; nothing else is: held output of unacknowledged epochs (and of the
 * running one) stays held in the agent, and so does what the VM sends until
 * the next dirtyrepd's first release, because the standby may fail over from
 * its last committed epoch at any time (even during the next session's full
 * sync). A VM suspended by the split-brain guard stays suspended: another
 * host may be serving it. Only a VM whose output already flows by decision
 * (SplitBrainPolicy=continue, `dirtyrepctl resume`, OutputCommit=no) gives
 * its held output up. A crash does the same without us: the agent keeps
 * output held and a suspended VM paused.
 */
static void epoch_stop_vmm(Epoch *e, int loop_result)
{
        Primary *p = e->p;
        uint64_t acked;
        Guard g;
        int r;

        if (!e->vmm)
                return;
        /* Release what the standby committed, including ACKs that arrived while stopping.
         * Not after an error: the VmmLink may be what failed, and whatever stays held
         * is released by the next session's first commit anyway. */
        if (loop_result >= 0 || loop_result == -ECANCELED)
                (void) handle_acks(e);
        pthread_mutex_lock(&p->mutex);
        g = p->guard;
        pthread_mutex_unlock(&p->mutex);
        acked = e->released;

        if (g == GUARD_SUSPENDED && !e->suspended) {
                r = vmm_link_suspend(e->vmm, PAUSE_TIMEOUT_MS);
                if (r < 0 && r != -ETIMEDOUT)
                        log_error_errno(r, "VM %s: suspending the VM before stopping failed: %s",
                                        p->vm->name, vmm_link_last_error(e->vmm));
                else
                        e->suspended = true;
        }
        if (e->suspended || g == GUARD_SUSPENDED) {
                stop_tracking_logged(e, true);
                log_warning("VM %s: stopping replication of a SUSPENDED VM: it stays paused with its output "
                            "held "
                            "until a dirtyrepd resyncs it with a standby or `dirtyrepctl resume %s` runs it "
                            "unprotected",
                            p->vm->name, p->vm->name);
                return;
        }
        if (g == GUARD_UNPROTECTED || !p->vm->output_commit) {
                /* Output flows already: nothing held is waiting for the standby. */
                stop_tracking_logged(e, false);
                return;
        }
        /* On failure too the agent keeps output held (as for a client that vanished). */
        stop_tracking_logged(e, true);
        if (loop_result < 0 && loop_result != -ECANCELED)
                log_error("VM %s: replication stopped on an error; the VM runs on, its output after epoch "
                          "%" PRIu64 " stays held in the VMM until a new session's standby commits: "
                          "`dirtyrepctl detach %s` "
                          "and `dirtyrepctl attach %s` start one",
                          p->vm->name, acked, p->vm->name, p->vm->name);
        else
                log_notice("VM %s: replication stopped with the standby at epoch %" PRIu64 " of %" PRIu64
                           ": the VM runs on, its output from later epochs stays held in the VMM until "
                           "dirtyrepd "
                           "attaches and a standby commits (to run it unprotected instead: `dirtyrepctl "
                           "resume %s` before a "
                           "stop)",
                           p->vm->name, acked, e->cur, p->vm->name);
}

static int epoch_init(Epoch *e)
{
        Primary *p = e->p;
        uint32_t inflight = MAX(p->vm->max_inflight_epochs, 1u);
        uint64_t stage;

        e->lay = vmm_link_layout(e->vmm);
        if (tracker_dirtyset_init(e->lay, &e->col) < 0 || tracker_dirtyset_init(e->lay, &e->fresh) < 0 ||
            tracker_dirtyset_init(e->lay, &e->since_image) < 0)
                return -ENOMEM;
        e->run = dirtyset_new(e->lay->total_pages);
        /* History: up to the in-flight limit, plus one epoch sealed for a request. */
        e->hist = calloc(inflight + 2, sizeof(History));
        e->pool = calloc(inflight + 2, sizeof(DirtySet *));
        e->batch_buf = malloc(BATCH_CAP);
        if (!e->run || !e->hist || !e->pool || !e->batch_buf)
                return -ENOMEM;
        for (uint32_t i = 0; i < inflight + 1; i++) {
                e->pool[i] = dirtyset_new(e->lay->total_pages);
                if (!e->pool[i])
                        return -ENOMEM;
                e->n_pool++;
        }
        stage = (uint64_t) p->vm->max_staging_mb * 1024 * 1024 / PAGE_BYTES;
        e->stage_cap = (size_t) MIN(MAX(stage, 1u), e->lay->total_pages);
        e->stage_pages = calloc(e->stage_cap, sizeof(uint64_t));
        /* Large: malloc maps it lazily, so only the pages an epoch really stages cost memory. */
        e->stage_data = malloc(e->stage_cap * PAGE_BYTES);
        if (!e->stage_pages || !e->stage_data)
                return -ENOMEM;
        e->cur = 1;
        return 0;
}

static bool should_seal(Epoch *e, bool *ret_freeze, bool *ret_ckpt)
{
        Primary *p = e->p;
        bool freeze, ckpt, due, image = e->image_cap != NULL;

        if (!e->session)
                return false;
        pthread_mutex_lock(&p->mutex);
        freeze = p->freeze_req && !p->frozen;
        ckpt = p->checkpoint_req > p->checkpoint_done;
        pthread_mutex_unlock(&p->mutex);
        /* Bounded in-flight: at the limit the epoch stretches. A checkpoint or freeze
         * request may take one epoch more: its caller blocks the loop thread, which is
         * the one that would receive the ACKs that make room (requests are synchronous,
         * so there is never more than one such extra epoch). */
        if (e->n_hist >= MAX(p->vm->max_inflight_epochs, 1u) + ((freeze || ckpt || image) ? 1u : 0u))
                return false;
        /* Stopping (primary_drain()): let the standby catch up instead of adding epochs. */
        if (atomic_load_explicit(&p->draining, memory_order_relaxed) && !freeze && !ckpt && !image)
                return false;
        due = now_usec() - e->epoch_start_us >= (uint64_t) p->vm->epoch_ms * USEC_PER_MSEC;
        *ret_freeze = freeze;
        *ret_ckpt = ckpt;
        return freeze || ckpt || image || due;
}

static int epoch_next_timeout_ms(Epoch *e)
{
        uint64_t now = now_usec(), next = e->epoch_start_us + (uint64_t) e->p->vm->epoch_ms * USEC_PER_MSEC;
        uint64_t ms = next > now ? DIV_ROUND_UP(next - now, 1000u) : 0;

        if (e->t.ops == &tracker_ring_ops || (e->p->vm->pre_copy && e->fresh.n > 0) ||
            !e->p->vm->output_commit || e->p->guard == GUARD_UNPROTECTED) /* racy read: only a timeout */
                ms = MIN(ms, 1u);
        else
                ms = MIN(ms, MAX(e->p->vm->epoch_ms / 4, 1u));
        return (int) MAX(ms, 1u);
}

/*
 * The split-brain guard and OutputCommit=no, on the epoch thread (it owns
 * the VmmLink). Unprotected: release everything held, every pass of the
 * loop (at most a millisecond apart, see epoch_next_timeout_ms()), so
 * output is not delayed by more than that. Suspended: the VM stays paused
 * until the guard lifts; *frozen makes the loop skip seals meanwhile.
 */
static int guard_apply(Epoch *e, bool *frozen)
{
        Primary *p = e->p;
        Guard g;
        int r;

        pthread_mutex_lock(&p->mutex);
        g = p->guard;
        pthread_mutex_unlock(&p->mutex);

        if (g == GUARD_SUSPENDED && !e->suspended && !*frozen) {
                /* Pause{suspend}: the agent keeps the VM paused even if this daemon
                 * stops or dies, and tells the next one (HelloReply.suspended). */
                r = vmm_link_suspend(e->vmm, PAUSE_TIMEOUT_MS);
                if (r < 0)
                        return log_error_errno(r, "VM %s: PAUSE for the split-brain policy failed: %s",
                                               p->vm->name, vmm_link_last_error(e->vmm));
                e->suspended = true;
                pthread_mutex_lock(&p->mutex);
                p->suspended = true;
                pthread_mutex_unlock(&p->mutex);
                log_error("VM %s: VM suspended (SplitBrainPolicy=suspend): its output stays held until a "
                          "standby resyncs",
                          p->vm->name);
        } else if (g != GUARD_SUSPENDED && e->suspended) {
                r = vmm_link_unsuspend(e->vmm, e->cur);
                if (r < 0)
                        return log_error_errno(r, "VM %s: RESUME after suspension failed: %s", p->vm->name,
                                               vmm_link_last_error(e->vmm));
                e->suspended = false;
                e->epoch_start_us = now_usec();
                pthread_mutex_lock(&p->mutex);
                p->suspended = false;
                pthread_mutex_unlock(&p->mutex);
                if (g == GUARD_UNPROTECTED)
                        log_warning("VM %s: VM resumed by the operator: it runs UNPROTECTED", p->vm->name);
                else
                        log_notice("VM %s: VM resumed: a standby is connected", p->vm->name);
        }
        if (e->suspended)
                *frozen = true;

        if (g == GUARD_UNPROTECTED || !p->vm->output_commit) {
                r = vmm_link_release_output(e->vmm, e->cur, NULL);
                if (r < 0)
                        return log_error_errno(r, "VM %s: ReleaseOutput(%" PRIu64 ") failed: %s",
                                               p->vm->name, e->cur, vmm_link_last_error(e->vmm));
                e->released = MAX(e->released, e->cur);
        }
        return 0;
}

static int epoch_loop(Epoch *e)
{
        Primary *p = e->p;
        int r;

        for (;;) {
                bool stop, up, ours, frozen, thaw, hash, freeze = false, ckpt = false;
                uint64_t gen, L;
                _cleanup_free_ char *path = NULL;

                pthread_mutex_lock(&p->mutex);
                stop = p->stop;
                gen = p->link_gen;
                up = p->link_up;
                ours = p->welcome_ours;
                L = p->welcome_last;
                frozen = p->frozen;
                thaw = p->thaw_req;
                hash = p->hash_req;
                if (hash)
                        path = TAKE_PTR(p->hash_path);
                pthread_mutex_unlock(&p->mutex);
                if (stop)
                        return 0;

                if (hash) {
                        r = frozen ? hash_ram(e, path) : -EBUSY;
                        pthread_mutex_lock(&p->mutex);
                        p->hash_req = false;
                        p->hash_result = r;
                        p->hash_done++;
                        pthread_cond_broadcast(&p->cond);
                        pthread_mutex_unlock(&p->mutex);
                }
                if (frozen && thaw) {
                        r = vmm_link_resume(e->vmm, e->cur);
                        pthread_mutex_lock(&p->mutex);
                        p->frozen = p->thaw_req = p->freeze_req = false;
                        if (r < 0)
                                set_failed_locked(p, "RESUME after thaw failed: %s",
                                                  vmm_link_last_error(e->vmm));
                        pthread_cond_broadcast(&p->cond);
                        pthread_mutex_unlock(&p->mutex);
                        if (r < 0)
                                return r;
                        e->epoch_start_us = now_usec();
                        frozen = false;
                }

                r = handle_acks(e);
                if (r < 0)
                        return r;
                image_collect(e, false);
                if (!frozen)
                        image_start(e);

                r = guard_apply(e, &frozen);
                if (r < 0)
                        return r;

                if (gen != e->gen) {
                        /* The link went down or came up: what was in flight on the old one is
                         * discarded (its pages are in the history and the running set). */
                        e->gen = gen;
                        e->session = false;
                        e->stage_n = 0;
                        if (up) {
                                r = session_start(e, ours, L);
                                if (r < 0 && r != -ENOTCONN)
                                        return r;
                                if (r == -ENOTCONN)
                                        e->session = false;
                        }
                        continue;
                }

                if (!frozen && should_seal(e, &freeze, &ckpt)) {
                        uint64_t sealed = e->cur;

                        r = seal(e, freeze);
                        if (r < 0)
                                return r;
                        if (r > 0) {
                                /* Postponed (PAUSE timed out): the epoch runs one interval more. */
                                r = harvest_wait(e, (int) p->vm->epoch_ms);
                                if (r < 0)
                                        return r;
                                continue;
                        }
                        pthread_mutex_lock(&p->mutex);
                        if (ckpt) {
                                p->checkpoint_done = p->checkpoint_req;
                                p->checkpoint_epoch = sealed;
                        }
                        if (freeze) {
                                p->frozen = true;
                                p->frozen_epoch = sealed;
                        }
                        pthread_cond_broadcast(&p->cond);
                        pthread_mutex_unlock(&p->mutex);
                        continue;
                }

                if (!frozen && p->vm->pre_copy && e->session && e->fresh.n > 0) {
                        r = precopy(e);
                        if (r < 0 && r != -ENOTCONN)
                                return r;
                }

                r = harvest_wait(e, frozen ? 100 : epoch_next_timeout_ms(e));
                if (r < 0)
                        return r;
        }
}

static void *epoch_thread(void *userdata)
{
        Epoch *e = userdata;
        Primary *p = e->p;
        int r;

        r = epoch_loop(e);
        epoch_stop_vmm(e, r);
        if (r < 0 && r != -ECANCELED) {
                pthread_mutex_lock(&p->mutex);
                if (!p->failed)
                        set_failed_locked(p, "epoch pipeline stopped: %s", strerror(-r));
                p->attached = false;
                /* Wake anyone waiting for a freeze or checkpoint: it will see `failed`. */
                pthread_cond_broadcast(&p->cond);
                pthread_mutex_unlock(&p->mutex);
                wake(p->notify_fd);
        }
        epoch_free(e);
        free(e);
        return NULL;
}

/* ---- the loop side: link ---------------------------------------------------------------- */

static int schedule_reconnect(Primary *p);

/*
 * link_free() stops the writer at once, and the ERROR frame that link_fail()
 * queued (why this primary stopped) would never reach the standby, which then
 * sees a closed connection, a loss, and fails over while the VM may still run
 * here. So give the writer a moment (bounded: the loop waits) to send it.
 */
#define FLUSH_WAIT_USEC (200 * USEC_PER_MSEC)
static void link_flush(Link *l)
{
        uint64_t end = now_usec() + FLUSH_WAIT_USEC;
        LinkStats ls;

        if (!l)
                return;
        for (;;) {
                link_get_stats(l, &ls);
                if (ls.queued_bytes == 0 || now_usec() >= end)
                        return;
                (void) usleep(1000);
        }
}

static void drop_link(Primary *p)
{
        Link *l;

        pthread_mutex_lock(&p->mutex);
        l = p->link;
        p->link = NULL;
        if (p->link_up)
                p->link_gen++;
        p->link_up = false;
        /* The epoch thread's sends on a down Link return at once; wait for them to leave. */
        while (p->link_users > 0)
                pthread_cond_wait(&p->cond, &p->mutex);
        pthread_mutex_unlock(&p->mutex);
        wake(p->wake_fd);
        link_flush(l);
        link_free(l);
}

static int on_up(Link *l, const Dr__Repl__Welcome *w, void *userdata)
{
        Primary *p = userdata;
        bool ours = w && w->has_session && w->session.len == sizeof(p->session) &&
                    memcmp(w->session.data, p->session, sizeof(p->session)) == 0;

        pthread_mutex_lock(&p->mutex);
        p->link_up = true;
        p->link_gen++;
        p->syncing = true; /* until the resync epoch the thread starts now is acked */
        p->sync_epoch = UINT64_MAX;
        p->welcome_ours = ours;
        p->welcome_last = w && w->has_last_committed ? w->last_committed : 0;
        /* The standby committed that epoch of ours: its output may go (an ACK may have
         * been lost with the old link). Release pairs with handle_acks(). */
        if (ours && p->welcome_last <= p->last_sealed &&
            p->welcome_last > atomic_load_explicit(&p->acked, memory_order_relaxed))
                atomic_store_explicit(&p->acked, p->welcome_last, memory_order_release);
        snprintf(p->detail, sizeof(p->detail), "connected to %s", link_peer_name(l));
        /* A standby again: output waits for its ACKs (the resync's first), a suspended
         * VM resumes (the epoch thread sees both with the new link generation). */
        if (p->guard != GUARD_NONE)
                log_notice("VM %s: standby %s connected: output commit resumes", p->vm->name,
                           link_peer_name(l));
        p->guard = GUARD_NONE;
        pthread_mutex_unlock(&p->mutex);
        p->split_timer = sd_event_source_disable_unref(p->split_timer);
        p->backoff_ms = BACKOFF_MIN_MS;
        log_info("VM %s: replication link to %s up (standby holds epoch %" PRIu64 "%s)", p->vm->name,
                 link_peer_name(l), w && w->has_last_committed ? w->last_committed : 0,
                 ours ? " of this session" : "");
        wake(p->wake_fd);
        return 0;
}

/* Under mutex: the inter-commit gap histogram (role.h) gets the time since the last commit. */
static void note_commit(Primary *p, uint64_t t)
{
        static const uint64_t edges_ms[] = COMMIT_GAP_EDGES_MS;
        uint64_t gap;
        size_t b = 0;

        _Static_assert(ELEMENTSOF(edges_ms) == COMMIT_GAP_BUCKETS - 1, "one edge per bucket but the last");
        if (p->last_commit_usec > 0 && t >= p->last_commit_usec) {
                gap = t - p->last_commit_usec;
                while (b < ELEMENTSOF(edges_ms) && gap > edges_ms[b] * 1000)
                        b++;
                p->commit_gaps[b]++;
                p->commit_gap_max_usec = MAX(p->commit_gap_max_usec, gap);
        }
        p->last_commit_usec = t;
}

static int on_frame(Link *l, uint16_t type, const uint8_t *payload, size_t len, void *userdata)
{
        Primary *p = userdata;
        Dr__Repl__Ack *a;
        uint64_t sealed;

        if (type != DR__REPL__FRAME_TYPE__FRAME_ACK)
                return 0;
        a = dr__repl__ack__unpack(NULL, len, payload);
        if (!a) {
                link_fail(l, -EBADMSG, "undecodable ACK");
                return -EBADMSG;
        }
        pthread_mutex_lock(&p->mutex);
        sealed = p->last_sealed;
        pthread_mutex_unlock(&p->mutex);
        if (a->epoch > sealed || a->epoch < atomic_load_explicit(&p->acked, memory_order_relaxed)) {
                link_fail(l, -EPROTO, "ACK for epoch %" PRIu64 " (last sealed %" PRIu64 ")", a->epoch,
                          sealed);
                dr__repl__ack__free_unpacked(a, NULL);
                return -EPROTO;
        }
        pthread_mutex_lock(&p->mutex);
        if (a->epoch > atomic_load_explicit(&p->acked, memory_order_relaxed)) {
                p->epochs_committed++;
                note_commit(p, now_usec());
        }
        if (p->syncing && a->epoch >= p->sync_epoch) {
                link_set_patience(l, 0);
                p->syncing = false;
                p->last_sync_usec = now_usec() - p->sync_start_usec;
                p->last_sync_full = p->sync_full;
        }
        p->had_standby = true;
        pthread_mutex_unlock(&p->mutex);
        /* Release pairs with the acquire load in handle_acks(). */
        atomic_store_explicit(&p->acked, a->epoch, memory_order_release);
        dr__repl__ack__free_unpacked(a, NULL);
        wake(p->wake_fd);
        return 0;
}

static void fill_heartbeat(Link *l, Dr__Repl__Heartbeat *hb, void *userdata)
{
        Primary *p = userdata;

        pthread_mutex_lock(&p->mutex);
        hb->has_last_sealed = true;
        hb->last_sealed = p->last_sealed;
        pthread_mutex_unlock(&p->mutex);
}

static int on_split_timer(sd_event_source *s, uint64_t usec, void *userdata)
{
        Primary *p = userdata;
        bool cont = p->vm->split_brain_policy == SPLIT_BRAIN_POLICY_CONTINUE;

        p->split_timer = sd_event_source_disable_unref(p->split_timer);
        pthread_mutex_lock(&p->mutex);
        if (p->guard != GUARD_HOLDING) {
                pthread_mutex_unlock(&p->mutex);
                return 0;
        }
        p->guard = cont ? GUARD_UNPROTECTED : GUARD_SUSPENDED;
        snprintf(p->detail, sizeof(p->detail),
                 cont ? "standby lost for %" PRIu32 " ms: running UNPROTECTED (SplitBrainPolicy=continue)"
                      : "standby lost for %" PRIu32 " ms: VM suspended (SplitBrainPolicy=suspend)",
                 p->vm->split_brain_timeout_ms);
        pthread_mutex_unlock(&p->mutex);
        if (cont)
                log_error("VM %s: standby lost for %" PRIu32
                          " ms: the VM now runs UNPROTECTED and releases its output; a failover now would "
                          "lose what it did since epoch %" PRIu64
                          ", and a promoted standby would mean split brain",
                          p->vm->name, p->vm->split_brain_timeout_ms,
                          atomic_load_explicit(&p->acked, memory_order_relaxed));
        else
                log_error("VM %s: standby lost for %" PRIu32
                          " ms: suspending the VM (SplitBrainPolicy=suspend)",
                          p->vm->name, p->vm->split_brain_timeout_ms);
        wake(p->wake_fd);
        return 0;
}

/* Standby lost: hold output, and apply the policy after SplitBrainTimeoutMs=. */
static void guard_arm(Primary *p)
{
        int r;

        log_warning("VM %s: standby lost: output held; SplitBrainPolicy=%s applies in %" PRIu32 " ms",
                    p->vm->name, split_brain_policy_to_string(p->vm->split_brain_policy),
                    p->vm->split_brain_timeout_ms);
        p->split_timer = sd_event_source_disable_unref(p->split_timer);
        r = sd_event_add_time_relative(p->event, &p->split_timer, CLOCK_MONOTONIC,
                                       (uint64_t) p->vm->split_brain_timeout_ms * USEC_PER_MSEC, 1000,
                                       on_split_timer, p);
        if (r < 0) {
                /* Cannot time it: the safe side is to keep holding (as with no policy). */
                log_error_errno(r, "VM %s: cannot arm the split-brain timer, output stays held: %m",
                                p->vm->name);
        }
}

static void on_down(Link *l, int error, const char *reason, void *userdata)
{
        Primary *p = userdata;
        bool stopping, guard, maintenance;

        log_warning_errno(error, "VM %s: replication link to %s down: %s", p->vm->name, link_peer_name(l),
                          reason);
        pthread_mutex_lock(&p->mutex);
        stopping = p->stop || p->failed;
        snprintf(p->detail, sizeof(p->detail), "link to %s down: %s", link_peer_name(l), reason);
        guard = p->had_standby && p->guard == GUARD_NONE;
        maintenance = link_down_by_peer(l) && error == STANDBY_MAINTENANCE_CODE;
        if (maintenance) {
                /* The authenticated standby said it goes down for planned maintenance and
                 * will not promote until it has resynced: no split brain to guard against,
                 * so run on (unprotected) instead of holding output and suspending. */
                guard = false;
                p->guard = GUARD_UNPROTECTED;
                snprintf(p->detail, sizeof(p->detail),
                         "standby %s in planned maintenance: running UNPROTECTED until it resyncs",
                         link_peer_name(l));
        }
        if (guard)
                p->guard = GUARD_HOLDING;
        pthread_mutex_unlock(&p->mutex);
        if (maintenance)
                log_warning(
                        "VM %s: the standby went down for planned maintenance: output is released without "
                        "a standby's ACK, the VM runs UNPROTECTED until it is back and resynced",
                        p->vm->name);
        drop_link(p);
        if (!stopping)
                (void) schedule_reconnect(p);
        if (guard && !stopping)
                guard_arm(p);
}

static const LinkCallbacks link_callbacks = {
        .on_up = on_up,
        .on_frame = on_frame,
        .fill_heartbeat = fill_heartbeat,
        .on_down = on_down,
};

static int connect_now(Primary *p)
{
        LinkParams lp = {
                .side = LINK_PRIMARY,
                .secret = p->secret,
                .secret_len = p->secret_len,
                .heartbeat_ms = p->dcfg->heartbeat_interval_ms,
                .heartbeat_misses = p->dcfg->heartbeat_misses,
                .hello = &p->hello,
                .peer_name = p->vm->peer.text,
                .tls = p->tls,
        };
        Link *l = NULL;
        int r;

        r = link_connect(p->event, (const struct sockaddr *) &p->vm->peer.sa, p->vm->peer.len, &lp,
                         &link_callbacks, p, &l);
        if (r < 0) {
                pthread_mutex_lock(&p->mutex);
                snprintf(p->detail, sizeof(p->detail), "connecting to %s failed: %s", p->vm->peer.text,
                         strerror(-r));
                pthread_mutex_unlock(&p->mutex);
                return schedule_reconnect(p);
        }
        pthread_mutex_lock(&p->mutex);
        p->link = l;
        snprintf(p->peer, sizeof(p->peer), "%s", p->vm->peer.text);
        pthread_mutex_unlock(&p->mutex);
        return 0;
}

static int on_reconnect_timer(sd_event_source *s, uint64_t usec, void *userdata)
{
        Primary *p = userdata;

        p->reconnect_timer = sd_event_source_disable_unref(p->reconnect_timer);
        return connect_now(p);
}

static int schedule_reconnect(Primary *p)
{
        uint64_t delay = p->backoff_ms;

        p->backoff_ms = MIN(p->backoff_ms * 2, BACKOFF_MAX_MS);
        p->reconnect_timer = sd_event_source_disable_unref(p->reconnect_timer);
        return sd_event_add_time_relative(p->event, &p->reconnect_timer, CLOCK_MONOTONIC,
                                          delay * USEC_PER_MSEC, 1000, on_reconnect_timer, p);
}

/* Loop thread: runs a finished image's callback (or, when the Primary goes away, a cancelled one). */
static void image_deliver(Primary *p, bool cancel)
{
        primary_image_done_t cb;
        PrimaryImageResult res = {};
        char err[sizeof(p->image_err)];
        _cleanup_free_ char *dir = NULL;
        void *userdata;

        pthread_mutex_lock(&p->mutex);
        if (!p->image_cb || (!p->image_ready && !cancel)) {
                pthread_mutex_unlock(&p->mutex);
                return;
        }
        if (p->image_ready) {
                res.result = p->image_result;
                res.epoch = p->image_epoch;
                res.pause_ns = p->image_pause_ns;
                res.present_pages = p->image_stats.present_pages;
                res.stored_bytes = p->image_stats.stored_bytes;
                res.total_bytes = p->image_stats.total_bytes;
                res.write_ns = p->image_stats.write_ns;
                snprintf(err, sizeof(err), "%s", p->image_err);
        } else {
                res.result = -ECANCELED;
                snprintf(err, sizeof(err), "the VM's primary role was stopped");
        }
        res.error = err;
        cb = p->image_cb;
        userdata = p->image_userdata;
        dir = TAKE_PTR(p->image_req_dir);
        res.dir = dir;
        p->image_cb = NULL;
        p->image_ready = p->image_busy = false;
        pthread_mutex_unlock(&p->mutex);
        cb(p, &res, userdata);
}

int primary_checkpoint_image(Primary *p, const char *dir, const char *parent, bool compress,
                             primary_image_done_t done, void *userdata)
{
        int r;

        if (!dir || !*dir || !done)
                return -EINVAL;
        pthread_mutex_lock(&p->mutex);
        if (p->image_busy)
                r = -EBUSY;
        else if (p->frozen)
                r = -EBUSY;
        else
                r = seal_request_possible_locked(p);
        if (r >= 0) {
                p->image_dir = strdup(dir);
                p->image_req_dir = strdup(dir);
                p->image_parent = parent ? strdup(parent) : NULL;
                if (!p->image_dir || !p->image_req_dir || (parent && !p->image_parent)) {
                        p->image_dir = mfree(p->image_dir);
                        p->image_req_dir = mfree(p->image_req_dir);
                        p->image_parent = mfree(p->image_parent);
                        r = -ENOMEM;
                }
        }
        if (r >= 0) {
                p->image_compress = compress;
                p->image_busy = p->image_req = true;
                p->image_ready = false;
                p->image_cb = done;
                p->image_userdata = userdata;
        }
        pthread_mutex_unlock(&p->mutex);
        if (r >= 0)
                wake(p->wake_fd);
        return r;
}

/* Whether the VMM still serves its control socket: a dead VMM leaves the
 * file, but nobody accepts (ECONNREFUSED), or the file is gone. */
static int on_gone_timer(sd_event_source *s, uint64_t usec, void *userdata);

/*
 * Tells the standby why replication stopped. -EHOSTDOWN says the VM is gone
 * here, so it may fail over; anything else (the VM may still run here,
 * unprotected) must not make it do so. A VMM that is being killed resets its
 * control connection before its listening socket is closed: the kernel
 * closes a dying process's fds one by one, after tearing down its memory,
 * and closing the KVM fds destroys the VM, which took long enough here that
 * a connect() in between still succeeded (bench/load-bench.py --churn: the
 * standby heard -EIO and never failed over). So a VMM that still answers is
 * asked again every GONE_CHECK_USEC, GONE_CHECKS times, before -EIO.
 */
static void report_stop(Primary *p)
{
        char detail[sizeof(p->detail)];
        Link *l;

        pthread_mutex_lock(&p->mutex);
        l = p->link;
        snprintf(detail, sizeof(detail), "%s", p->detail);
        pthread_mutex_unlock(&p->mutex);
        if (!l)
                return;
        if (!vmm_link_listening(p->vm->control_socket)) {
                log_error("VM %s: the VMM is gone (%s): telling the standby", p->vm->name, detail);
                link_fail(l, -EHOSTDOWN, "the primary's VM is gone: %s", detail); /* on_down drops it */
                return;
        }
        if (p->gone_checks++ < GONE_CHECKS &&
            sd_event_add_time_relative(p->event, &p->gone_timer, CLOCK_MONOTONIC, GONE_CHECK_USEC, 1000,
                                       on_gone_timer, p) >= 0)
                return;
        link_fail(l, -EIO, "primary stopped replicating: %s", detail);
}

static int on_gone_timer(sd_event_source *s, uint64_t usec, void *userdata)
{
        Primary *p = userdata;

        p->gone_timer = sd_event_source_disable_unref(p->gone_timer);
        report_stop(p);
        return 0;
}

/* The epoch thread stopped (tracking error, VMM lost): stop shipping, tell the standby. */
static int on_notify(sd_event_source *s, int fd, uint32_t revents, void *userdata)
{
        Primary *p = userdata;
        eventfd_t v;
        bool failed;

        (void) eventfd_read(fd, &v);
        image_deliver(p, false);
        pthread_mutex_lock(&p->mutex);
        failed = p->failed;
        pthread_mutex_unlock(&p->mutex);
        if (!failed || p->fail_reported)
                return 0;
        p->fail_reported = true;
        p->reconnect_timer = sd_event_source_disable_unref(p->reconnect_timer);
        report_stop(p);
        return 0;
}

/* ---- the loop side: attach ------------------------------------------------------------- */

static int build_hello(Primary *p, const VmmLayout *lay)
{
        free(p->regions);
        free(p->region_ptrs);
        p->regions = calloc(MAX(lay->n_regions, 1u), sizeof(*p->regions));
        p->region_ptrs = calloc(MAX(lay->n_regions, 1u), sizeof(*p->region_ptrs));
        if (!p->regions || !p->region_ptrs)
                return -ENOMEM;
        for (size_t i = 0; i < lay->n_regions; i++) {
                p->regions[i] = (Dr__Repl__MemRegion) DR__REPL__MEM_REGION__INIT;
                p->regions[i].slot = lay->regions[i].slot;
                p->regions[i].guest_phys = lay->regions[i].guest_phys;
                p->regions[i].size = lay->regions[i].size;
                p->regions[i].memfd_offset = lay->regions[i].fd_offset;
                p->region_ptrs[i] = &p->regions[i];
        }
        p->hello = (Dr__Repl__Hello) DR__REPL__HELLO__INIT;
        p->hello.version = DR__REPL__REPL_VERSION__REPL_VERSION_CURRENT;
        p->hello.vm_name = p->vm->name;
        p->hello.vm_uuid.data = p->uuid;
        p->hello.vm_uuid.len = sizeof(p->uuid);
        p->hello.regions = p->region_ptrs;
        p->hello.n_regions = lay->n_regions;
        p->hello.page_size = lay->page_size;
        p->hello.session.data = p->session;
        p->hello.session.len = sizeof(p->session);
        p->hello.primary_host = p->host;
        p->hello.has_vcpus = true;
        p->hello.vcpus = (uint32_t) lay->n_vcpus;
        p->total_pages = lay->total_pages;
        return 0;
}

static bool mode_matches(ConfigTracking want, Dr__Control__TrackingMode have)
{
        switch (want) {
        case CONFIG_TRACKING_RING:
                return have == DR__CONTROL__TRACKING_MODE__TRACKING_MODE_RING;
        case CONFIG_TRACKING_BITMAP:
                return have == DR__CONTROL__TRACKING_MODE__TRACKING_MODE_BITMAP;
        default:
                return true;
        }
}

static int schedule_attach(Primary *p);

static int attach_now(Primary *p)
{
        _cleanup_(vmm_link_freep) VmmLink *vmm = NULL;
        Epoch *e = NULL;
        const VmmLayout *lay;
        int r;

        char why[512] = "";

        r = vmm_link_open_checked(p->vm->control_socket, "dirtyrepd", why, sizeof(why), &vmm);
        if (r == -EPERM && why[0]) {
                /* Not a VMM this daemon may trust: said once per attempt, as other attach errors. */
                pthread_mutex_lock(&p->mutex);
                snprintf(p->detail, sizeof(p->detail), "VMM control socket refused: %s", why);
                pthread_mutex_unlock(&p->mutex);
                log_error("VM %s: refusing the VMM control socket: %s; retrying", p->vm->name, why);
                return schedule_attach(p);
        }
        if (r < 0) {
                pthread_mutex_lock(&p->mutex);
                snprintf(p->detail, sizeof(p->detail), "VMM control socket %s: %s%s%s",
                         p->vm->control_socket, strerror(-r), vmm && vmm_link_last_error(vmm)[0] ? ": " : "",
                         vmm ? vmm_link_last_error(vmm) : "");
                pthread_mutex_unlock(&p->mutex);
                if (r != -ENOENT && r != -ECONNREFUSED)
                        log_warning_errno(r, "VM %s: attaching to %s failed: %m; retrying", p->vm->name,
                                          p->vm->control_socket);
                return schedule_attach(p);
        }
        lay = vmm_link_layout(vmm);
        if (!mode_matches(p->vm->tracking, lay->mode)) {
                pthread_mutex_lock(&p->mutex);
                set_failed_locked(
                        p,
                        "Tracking=%s but the VMM tracks with %s; start the VMM with --tracking %s or "
                        "set Tracking=auto",
                        config_tracking_to_string(p->vm->tracking),
                        lay->mode == DR__CONTROL__TRACKING_MODE__TRACKING_MODE_RING ? "rings" : "a bitmap",
                        config_tracking_to_string(p->vm->tracking));
                pthread_mutex_unlock(&p->mutex);
                return log_error_errno(-EINVAL, "VM %s: %s", p->vm->name, p->detail);
        }

        e = calloc(1, sizeof(*e));
        if (!e)
                return -ENOMEM;
        e->p = p;
        e->vmm = vmm;
        r = tracker_init(&e->t, vmm);
        if (r >= 0)
                r = epoch_init(e);
        if (r >= 0)
                r = build_hello(p, lay);
        if (r >= 0) {
                r = vmm_link_start_tracking(vmm);
                if (r < 0)
                        log_error_errno(r, "VM %s: StartTracking failed: %s", p->vm->name,
                                        vmm_link_last_error(vmm));
        }
        if (r >= 0 && vmm_link_hello_suspended(vmm)) {
                /* The split-brain guard suspended this VM under an earlier dirtyrepd (or
                 * an earlier session of ours): another host may serve it now. It stays
                 * so until a standby connects and resyncs, or the operator decides. */
                e->suspended = true;
                pthread_mutex_lock(&p->mutex);
                p->guard = GUARD_SUSPENDED;
                p->suspended = true;
                p->attach_suspended = true;
                pthread_mutex_unlock(&p->mutex);
                log_error("VM %s: the VMM says the VM is SUSPENDED by the split-brain guard (%" PRIu64
                          " bytes of output held): it stays paused until a standby at %s resyncs it, or "
                          "`dirtyrepctl resume %s` runs it unprotected (only if the other host does not "
                          "serve it)",
                          p->vm->name, vmm_link_hello_held_bytes(vmm), p->vm->peer.text, p->vm->name);
        } else if (r >= 0) {
                /* Output from here on is held under epoch 1 until the standby commits it. */
                r = vmm_link_resume(vmm, 1);
                if (r < 0)
                        log_error_errno(r, "VM %s: Resume(1) failed: %s", p->vm->name,
                                        vmm_link_last_error(vmm));
                else if (vmm_link_hello_held_bytes(vmm) > 0)
                        log_notice("VM %s: %" PRIu64
                                   " bytes of output held by an earlier dirtyrepd wait for the "
                                   "standby's first commit",
                                   p->vm->name, vmm_link_hello_held_bytes(vmm));
        }
        if (r < 0) {
                e->vmm = NULL;
                epoch_free(e);
                free(e);
                pthread_mutex_lock(&p->mutex);
                set_failed_locked(p, "attaching to the VMM failed: %s", strerror(-r));
                pthread_mutex_unlock(&p->mutex);
                return r;
        }
        e->epoch_start_us = e->last_collect_us = e->last_reset_us = now_usec();
        TAKE_PTR(vmm);

        r = -pthread_create(&p->thread, NULL, epoch_thread, e);
        if (r < 0) {
                epoch_free(e);
                free(e);
                pthread_mutex_lock(&p->mutex);
                set_failed_locked(p, "cannot start the epoch thread: %s", strerror(-r));
                pthread_mutex_unlock(&p->mutex);
                return r;
        }
        p->thread_started = true;
        pthread_mutex_lock(&p->mutex);
        p->attached = true;
        if (p->guard == GUARD_SUSPENDED)
                snprintf(p->detail, sizeof(p->detail),
                         "suspended before attach (split-brain guard, kept by the VMM); waiting for a "
                         "standby at %s "
                         "or `dirtyrepctl resume`",
                         p->vm->peer.text);
        else if (p->promoted)
                snprintf(p->detail, sizeof(p->detail),
                         "promoted from the replica of epoch %" PRIu64
                         "; unprotected until a standby at %s syncs",
                         p->promoted_from, p->vm->peer.text);
        else
                snprintf(p->detail, sizeof(p->detail), "attached; connecting to %s", p->vm->peer.text);
        pthread_mutex_unlock(&p->mutex);
        log_info("VM %s: attached to %s (%s tracking, %zu vCPUs, %" PRIu64 " pages)", p->vm->name,
                 p->vm->control_socket, e->t.ops->name, lay->n_vcpus, lay->total_pages);
        return connect_now(p);
}

static int on_attach_timer(sd_event_source *s, uint64_t usec, void *userdata)
{
        Primary *p = userdata;

        p->attach_timer = sd_event_source_disable_unref(p->attach_timer);
        (void) attach_now(p);
        return 0;
}

static int schedule_attach(Primary *p)
{
        p->attach_timer = sd_event_source_disable_unref(p->attach_timer);
        return sd_event_add_time_relative(p->event, &p->attach_timer, CLOCK_MONOTONIC, ATTACH_RETRY_USEC,
                                          1000, on_attach_timer, p);
}

/* ---- public API ----------------------------------------------------------------------- */

int primary_new(sd_event *e, const DaemonConfig *d, const VmConfig *vm, const uint8_t *secret,
                size_t secret_len, Primary **ret)
{
        _cleanup_(primary_freep) Primary *p = NULL;
        static const char label[] = "dirtyrep-vm-uuid:";
        uint8_t digest[EVP_MAX_MD_SIZE];
        unsigned dlen = 0;
        EVP_MD_CTX *md;
        bool ok;

        if (!e || !d || !vm || !secret || secret_len == 0 || !ret || !vm->name || !vm->control_socket)
                return -EINVAL;
        if (vm->peer.len == 0)
                return -EDESTADDRREQ;

        p = calloc(1, sizeof(*p));
        if (!p)
                return -ENOMEM;
        p->wake_fd = p->notify_fd = -EBADF;
        pthread_mutex_init(&p->mutex, NULL);
        pthread_cond_init(&p->cond, NULL);
        p->event = sd_event_ref(e);
        p->dcfg = d;
        p->vm = vm;
        p->backoff_ms = BACKOFF_MIN_MS;
        p->secret = malloc(secret_len);
        if (!p->secret)
                return -ENOMEM;
        memcpy(p->secret, secret, secret_len);
        p->secret_len = secret_len;
        if (getrandom(p->session, sizeof(p->session), 0) != (ssize_t) sizeof(p->session))
                return -EIO;
        /* The VM's identity on the wire: stable across VMM restarts and failovers (the
         * reference VMM's own UUID is random per start), derived from the name both
         * hosts configure: SHA-256("dirtyrep-vm-uuid:" NAME), first 16 bytes. */
        md = EVP_MD_CTX_new();
        if (!md)
                return -ENOMEM;
        ok = EVP_DigestInit_ex(md, EVP_sha256(), NULL) == 1 &&
             EVP_DigestUpdate(md, label, strlen(label)) == 1 &&
             EVP_DigestUpdate(md, vm->name, strlen(vm->name)) == 1 &&
             EVP_DigestFinal_ex(md, digest, &dlen) == 1;
        EVP_MD_CTX_free(md);
        if (!ok || dlen < sizeof(p->uuid))
                return -EIO;
        memcpy(p->uuid, digest, sizeof(p->uuid));
        if (gethostname(p->host, sizeof(p->host) - 1) < 0)
                snprintf(p->host, sizeof(p->host), "unknown");

        p->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        p->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (p->wake_fd < 0 || p->notify_fd < 0)
                return -errno;
        *ret = TAKE_PTR(p);
        return 0;
}

int primary_set_tls(Primary *p, SSL_CTX *tls)
{
        if (!p || p->started)
                return -EINVAL;
        if (tls && SSL_CTX_up_ref(tls) != 1)
                return -EIO;
        SSL_CTX_free(p->tls);
        p->tls = tls;
        return 0;
}

int primary_start(Primary *p)
{
        int r;

        if (!p)
                return -EINVAL;
        if (p->started)
                return -EALREADY;
        r = sd_event_add_io(p->event, &p->notify_source, p->notify_fd, EPOLLIN, on_notify, p);
        if (r < 0)
                return r;
        p->started = true;
        pthread_mutex_lock(&p->mutex);
        snprintf(p->detail, sizeof(p->detail), "waiting for the VMM at %s", p->vm->control_socket);
        pthread_mutex_unlock(&p->mutex);
        r = attach_now(p);
        /* A wrong tracking mode is final (status failed); everything else retries. */
        return r == -EINVAL ? r : 0;
}

Primary *primary_free(Primary *p)
{
        if (!p)
                return NULL;
        pthread_mutex_lock(&p->mutex);
        p->stop = true;
        pthread_cond_broadcast(&p->cond);
        pthread_mutex_unlock(&p->mutex);
        if (p->link)
                /* Tells the standby why, and makes any send in progress return. */
                link_fail(p->link, -ECANCELED, "primary stopping");
        if (p->link)
                drop_link(p);
        if (p->wake_fd >= 0)
                wake(p->wake_fd);
        if (p->thread_started)
                pthread_join(p->thread, NULL);
        /* Every image request is answered: with its result, or cancelled. */
        image_deliver(p, true);
        free(p->image_dir);
        free(p->image_parent);
        free(p->image_req_dir);

        p->attach_timer = sd_event_source_disable_unref(p->attach_timer);
        p->reconnect_timer = sd_event_source_disable_unref(p->reconnect_timer);
        p->notify_source = sd_event_source_disable_unref(p->notify_source);
        p->split_timer = sd_event_source_disable_unref(p->split_timer);
        p->gone_timer = sd_event_source_disable_unref(p->gone_timer);
        safe_close(p->wake_fd);
        safe_close(p->notify_fd);
        SSL_CTX_free(p->tls);
        if (p->secret) {
                explicit_bzero(p->secret, p->secret_len);
                free(p->secret);
        }
        free(p->regions);
        free(p->region_ptrs);
        free(p->hash_path);
        pthread_cond_destroy(&p->cond);
        pthread_mutex_destroy(&p->mutex);
        sd_event_unref(p->event);
        free(p);
        return NULL;
}

void primary_drain(Primary *p)
{
        pthread_mutex_lock(&p->mutex);
        p->drain_target = p->last_sealed;
        pthread_mutex_unlock(&p->mutex);
        atomic_store_explicit(&p->draining, true, memory_order_relaxed);
        wake(p->wake_fd);
}

bool primary_suspended(Primary *p)
{
        bool r;

        pthread_mutex_lock(&p->mutex);
        r = p->guard == GUARD_SUSPENDED;
        pthread_mutex_unlock(&p->mutex);
        return r;
}

bool primary_take_attach_suspended(Primary *p)
{
        bool r;

        pthread_mutex_lock(&p->mutex);
        r = p->attach_suspended;
        p->attach_suspended = false;
        pthread_mutex_unlock(&p->mutex);
        return r;
}

bool primary_drained(Primary *p)
{
        bool done;

        pthread_mutex_lock(&p->mutex);
        /* Nothing more can come: no standby to ACK, or the guard already holds everything. */
        done = !p->attached || p->failed || !p->link_up || p->guard != GUARD_NONE ||
               atomic_load_explicit(&p->acked, memory_order_relaxed) >= p->drain_target;
        pthread_mutex_unlock(&p->mutex);
        return done;
}

int primary_resume_unprotected(Primary *p)
{
        Guard was;

        pthread_mutex_lock(&p->mutex);
        if (p->failed || !p->attached) {
                pthread_mutex_unlock(&p->mutex);
                return -ENOTCONN;
        }
        was = p->guard;
        if (was == GUARD_UNPROTECTED) {
                pthread_mutex_unlock(&p->mutex);
                return -EALREADY;
        }
        if (was == GUARD_NONE && p->link_up) {
                /* Protected (or syncing): output follows the standby's ACKs. */
                pthread_mutex_unlock(&p->mutex);
                return -EBUSY;
        }
        p->guard = GUARD_UNPROTECTED;
        snprintf(p->detail, sizeof(p->detail),
                 "resumed by the operator: running UNPROTECTED until a standby at %s syncs",
                 p->vm->peer.text);
        pthread_mutex_unlock(&p->mutex);
        p->split_timer = sd_event_source_disable_unref(p->split_timer);
        log_error("VM %s: the operator resumed the VM (was %s): held output is released and the VM runs "
                  "UNPROTECTED; if another host serves this VM now, both answer clients",
                  p->vm->name,
                  was == GUARD_SUSPENDED ? "suspended"
                  : was == GUARD_HOLDING ? "holding output"
                                         : "waiting for a standby");
        wake(p->wake_fd);
        return 0;
}

void primary_set_promoted(Primary *p, uint64_t from_epoch)
{
        pthread_mutex_lock(&p->mutex);
        p->promoted = true;
        p->promoted_from = from_epoch;
        p->guard = GUARD_UNPROTECTED;
        pthread_mutex_unlock(&p->mutex);
}

static int cmp_u64(const void *a, const void *b)
{
        uint64_t x = *(const uint64_t *) a, y = *(const uint64_t *) b;
        return x < y ? -1 : x > y;
}

void primary_get_status(Primary *p, ReplStatus *ret)
{
        uint64_t sorted[PAUSE_WINDOW], vm_sorted[PAUSE_WINDOW], page_in, page_out;
        size_t n_vm = 0;
        size_t n;
        LinkStats ls = {};
        Link *l;

        *ret = (ReplStatus){.role = "primary"};
        pthread_mutex_lock(&p->mutex);
        if (p->failed)
                ret->state = "failed";
        else if (!p->attached)
                ret->state = p->promoted ? "activating" : "attaching";
        else if (p->guard == GUARD_SUSPENDED)
                ret->state = p->suspended ? "suspended" : "suspending";
        else if (p->guard == GUARD_UNPROTECTED)
                ret->state = "unprotected";
        else if (!p->link_up)
                ret->state = "connecting";
        else if (p->syncing)
                ret->state = "syncing";
        else
                ret->state = "protected";
        snprintf(ret->detail, sizeof(ret->detail), "%s", p->detail);
        ret->link_up = p->link_up;
        snprintf(ret->peer, sizeof(ret->peer), "%s", p->vm->peer.text);
        ret->last_sealed = p->last_sealed;
        ret->last_committed = atomic_load_explicit(&p->acked, memory_order_relaxed);
        ret->epochs_committed = p->epochs_committed;
        ret->full_syncs = p->full_syncs;
        ret->incremental_syncs = p->incremental_syncs;
        n = (size_t) MIN(p->n_pauses, (uint64_t) PAUSE_WINDOW);
        memcpy(sorted, p->pauses, n * sizeof(uint64_t));
        for (size_t i = 0; i < n; i++)
                if (p->vm_pauses[i] > 0)
                        vm_sorted[n_vm++] = p->vm_pauses[i];
        ret->pages_last_epoch = p->pages_last_epoch;
        ret->dirty_pages_per_s = p->dirty_rate;
        ret->inflight = p->inflight;
        ret->staging_bytes = p->staging_bytes;
        ret->ram_bytes = p->total_pages * PAGE_BYTES;
        ret->last_sync_usec = p->last_sync_usec;
        ret->last_sync_full = p->last_sync_full;
        if (p->syncing && p->sync_full && p->link_up) {
                ret->sync_total_bytes = p->total_pages * PAGE_BYTES;
                ret->sync_done_bytes = MIN(p->sync_walked_pages, p->total_pages) * PAGE_BYTES;
                ret->sync_elapsed_usec = now_usec() - p->sync_start_usec;
        }
        ret->commit_gap_max_usec = p->commit_gap_max_usec;
        memcpy(ret->commit_gaps, p->commit_gaps, sizeof(ret->commit_gaps));
        page_in = p->page_bytes_in;
        page_out = p->page_bytes_out;
        l = p->link;
        if (l)
                link_get_stats(l, &ls);
        pthread_mutex_unlock(&p->mutex);

        if (n > 0) {
                qsort(sorted, n, sizeof(uint64_t), cmp_u64);
                ret->pause_ns_p50 = sorted[(n - 1) / 2];
                ret->pause_ns_p99 = sorted[MIN((size_t) ((double) (n - 1) * 0.99 + 0.5), n - 1)];
                ret->pause_ns_max = sorted[n - 1];
        }
        if (n_vm > 0) {
                qsort(vm_sorted, n_vm, sizeof(uint64_t), cmp_u64);
                ret->vm_pause_ns_p50 = vm_sorted[(n_vm - 1) / 2];
                ret->vm_pause_ns_p99 = vm_sorted[MIN((size_t) ((double) (n_vm - 1) * 0.99 + 0.5), n_vm - 1)];
                ret->vm_pause_ns_max = vm_sorted[n_vm - 1];
        }
        ret->bytes_sent = ls.bytes_sent;
        ret->bytes_received = ls.bytes_received;
        ret->compression_ratio = page_out > 0 ? (double) page_in / (double) page_out : 0.0;
}

/* Waits on the condition variable until pred holds, the thread failed, or the timeout. */
#define WAIT_FOR(p, pred)                                                                                   \
        ({                                                                                                  \
                struct timespec _ts;                                                                        \
                int _r = 0;                                                                                 \
                clock_gettime(CLOCK_REALTIME, &_ts);                                                        \
                _ts.tv_sec += REQUEST_TIMEOUT_USEC / USEC_PER_SEC;                                          \
                while (!(pred)) {                                                                           \
                        if ((p)->failed || !(p)->attached) {                                                \
                                _r = -ESTALE;                                                               \
                                break;                                                                      \
                        }                                                                                   \
                        if (pthread_cond_timedwait(&(p)->cond, &(p)->mutex, &_ts) == ETIMEDOUT) {           \
                                _r = (pred) ? 0 : -ETIMEDOUT;                                               \
                                break;                                                                      \
                        }                                                                                   \
                }                                                                                           \
                _r;                                                                                         \
        })

/*
 * Checkpoint and freeze wait on the loop thread for the epoch thread to seal.
 * The loop is what delivers ACKs and link changes, so wait only for what can
 * happen without it: with no link, or with the one extra in-flight epoch a
 * synchronous request may take already used (by an earlier request whose
 * ACKs are still queued on the loop), the seal cannot come; answer at once
 * (-ENOTCONN, -EBUSY) and let the caller retry after the loop ran.
 * Called with p->mutex held.
 */
static int seal_request_possible_locked(Primary *p)
{
        if (!p->link_up)
                return -ENOTCONN;
        if (p->inflight >= MAX(p->vm->max_inflight_epochs, 1u) + 1u)
                return -EBUSY;
        return 0;
}

int primary_checkpoint(Primary *p, uint64_t *ret_epoch)
{
        uint64_t want;
        int r;

        pthread_mutex_lock(&p->mutex);
        if (p->frozen) {
                pthread_mutex_unlock(&p->mutex);
                return -EBUSY;
        }
        r = seal_request_possible_locked(p);
        if (r < 0) {
                pthread_mutex_unlock(&p->mutex);
                return r;
        }
        want = ++p->checkpoint_req;
        pthread_mutex_unlock(&p->mutex);
        wake(p->wake_fd);
        pthread_mutex_lock(&p->mutex);
        r = WAIT_FOR(p, p->checkpoint_done >= want);
        if (r == 0 && ret_epoch)
                *ret_epoch = p->checkpoint_epoch;
        pthread_mutex_unlock(&p->mutex);
        return r;
}

int primary_freeze(Primary *p, uint64_t *ret_epoch)
{
        int r;

        pthread_mutex_lock(&p->mutex);
        if (p->frozen) {
                if (ret_epoch)
                        *ret_epoch = p->frozen_epoch;
                pthread_mutex_unlock(&p->mutex);
                return 0;
        }
        r = seal_request_possible_locked(p);
        if (r < 0) {
                pthread_mutex_unlock(&p->mutex);
                return r;
        }
        p->freeze_req = true;
        pthread_mutex_unlock(&p->mutex);
        wake(p->wake_fd);
        pthread_mutex_lock(&p->mutex);
        r = WAIT_FOR(p, p->frozen);
        if (r == 0 && ret_epoch)
                *ret_epoch = p->frozen_epoch;
        if (r < 0)
                p->freeze_req = false;
        pthread_mutex_unlock(&p->mutex);
        return r;
}

int primary_reset_pauses(Primary *p)
{
        pthread_mutex_lock(&p->mutex);
        p->n_pauses = 0;
        pthread_mutex_unlock(&p->mutex);
        return 0;
}

int primary_thaw(Primary *p)
{
        int r;

        pthread_mutex_lock(&p->mutex);
        if (!p->frozen) {
                p->freeze_req = false;
                pthread_mutex_unlock(&p->mutex);
                return 0;
        }
        p->thaw_req = true;
        pthread_mutex_unlock(&p->mutex);
        wake(p->wake_fd);
        pthread_mutex_lock(&p->mutex);
        r = WAIT_FOR(p, !p->frozen);
        pthread_mutex_unlock(&p->mutex);
        return r;
}

int primary_hash_ram(Primary *p, const char *path)
{
        char *copy;
        uint64_t want;
        int r;

        if (!path)
                return -EINVAL;
        copy = strdup(path);
        if (!copy)
                return -ENOMEM;
        pthread_mutex_lock(&p->mutex);
        if (!p->frozen) {
                pthread_mutex_unlock(&p->mutex);
                free(copy);
                return -EBUSY;
        }
        free(p->hash_path);
        p->hash_path = copy;
        p->hash_req = true;
        want = ++p->hash_seq;
        pthread_mutex_unlock(&p->mutex);
        wake(p->wake_fd);
        pthread_mutex_lock(&p->mutex);
        r = WAIT_FOR(p, p->hash_done >= want);
        if (r == 0)
                r = p->hash_result;
        pthread_mutex_unlock(&p->mutex);
        return r;
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The primary half of role.h: attach to the local VMM, connect to the
 * standby, and run the epoch pipeline (docs/architecture.md, "Design invariants" and "dirtyrepd").
 *
 * Threads: the loop and the epoch thread, and the command queue between
 * them, are described at the top of primary-internal.h.
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
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <unistd.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>

#include "crc32c.h"
#include "log.h"
#include "primary-internal.h"
#include "util.h"

/* ---- small helpers ---------------------------------------------------------------------- */

static void primary_vset_failed_locked(Primary *p, const char *fmt, va_list ap) _printf_(2, 0);
static void primary_vset_failed_locked(Primary *p, const char *fmt, va_list ap)
{
        p->failed = true;
        vsnprintf(p->detail, sizeof(p->detail), fmt, ap);
}

void primary_set_failed_locked(Primary *p, const char *fmt, ...)
{
        va_list ap;

        va_start(ap, fmt);
        primary_vset_failed_locked(p, fmt, ap);
        va_end(ap);
}

static void primary_vfail(Primary *p, const char *fmt, va_list ap) _printf_(2, 0);
static void primary_vfail(Primary *p, const char *fmt, va_list ap)
{
        pthread_mutex_lock(&p->mutex);
        primary_vset_failed_locked(p, fmt, ap);
        pthread_mutex_unlock(&p->mutex);
}

void primary_fail(Primary *p, const char *fmt, ...)
{
        va_list ap;

        va_start(ap, fmt);
        primary_vfail(p, fmt, ap);
        va_end(ap);
}

/*
 * Epoch thread: the pipeline failed. Marks the Primary failed (detail from
 * fmt) and wakes the loop, which tells the standby. Returns r.
 */
static int epoch_fail(Epoch *e, int r, const char *fmt, ...) _printf_(3, 4);
static int epoch_fail(Epoch *e, int r, const char *fmt, ...)
{
        va_list ap;

        va_start(ap, fmt);
        primary_vfail(e->p, fmt, ap);
        va_end(ap);
        wake(e->p->notify_fd);
        return r;
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

        log_error_errno(r, "VM %s: %s: %s; replication stopped", p->vm->name, what,
                        e->t.error[0] ? e->t.error : "error");
        return epoch_fail(e, r, "%s: %s", what, e->t.error[0] ? e->t.error : strerror(-r));
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
int epoch_handle_acks(Epoch *e)
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
        p->pub.inflight = e->n_hist;
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
                        e->p->pub.sync_walked_pages = page;
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
        e->p->pub.sync_walked_pages = e->lay->total_pages;
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
                p->pub.incremental_syncs++;
                p->sync_epoch = e->cur;
                p->syncing = true;
                p->pub.sync_full = false;
                p->pub.sync_start_usec = now_usec();
                p->pub.inflight = 0;
                pthread_mutex_unlock(&p->mutex);
                return send_begin(e, false, L);
        }

        log_info("VM %s: full sync in epoch %" PRIu64 " (standby holds %s)", p->vm->name, e->cur,
                 ours ? "an epoch we cannot resume from" : "no replica of this session");
        hist_drop_upto(e, UINT64_MAX);
        e->cur_full = true;
        pthread_mutex_lock(&p->mutex);
        p->pub.full_syncs++;
        p->sync_epoch = e->cur;
        p->syncing = true;
        p->pub.sync_full = true;
        p->pub.sync_start_usec = now_usec();
        p->pub.sync_walked_pages = 0;
        p->pub.inflight = 0;
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
        p->pub.pauses[p->pub.n_pauses % PAUSE_WINDOW] = ns;
        p->pub.vm_pauses[p->pub.n_pauses % PAUSE_WINDOW] = vm_ns;
        p->pub.n_pauses++;
}

/* One seal's working state, shared by its steps. */
typedef struct Seal {
        uint64_t epoch; /* the epoch being sealed (e->cur until seal_account()) */
        bool freeze;
        /* Round trips to the agent are where a loaded host stretches a pause (each
         * one waits for a thread to be scheduled): with the agent's features a seal
         * is two, PAUSE+SAVE_STATE and RESET_RINGS+RESUME, instead of four. */
        bool state_in_pause, reset_in_resume;
        uint8_t *state; /* SAVE_STATE's blob, owned */
        size_t state_len;
        uint64_t t0, pause_ns, vm_pause_ns;
        uint64_t distinct; /* pages the epoch sent (pre-copy and staging) */
        int image_copy_r;
} Seal;

/*
 * PAUSE (with SAVE_STATE when the agent folds it in). Returns 0, 1 when the
 * PAUSE timed out and the VM runs on in the same epoch (seal later), or a
 * negative errno with the Primary failed.
 */
static int seal_pause(Epoch *e, Seal *s)
{
        Primary *p = e->p;
        int r;

        s->t0 = now_nsec();
        if (s->state_in_pause)
                r = vmm_link_pause_save(e->vmm, PAUSE_TIMEOUT_MS, NULL, &s->state, &s->state_len);
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
                log_error_errno(r, "VM %s: PAUSE failed: %s", p->vm->name, vmm_link_last_error(e->vmm));
                return epoch_fail(e, r, "PAUSE failed: %s", vmm_link_last_error(e->vmm));
        }
        e->pause_timeouts = 0;
        return 0;
}

/* Paused: the final collect (and reset), and the pages the VMM wrote itself. */
static int seal_harvest(Epoch *e, Seal *s)
{
        int64_t n;

        /* Ordering rule: collect, reset, and only then copy. With the reset folded
         * into RESUME the copy comes before the reset, which is the same thing here:
         * every vCPU is parked from the collect to the reset, so no write can land
         * between the copy and the re-protection. */
        n = s->reset_in_resume ? e->t.ops->collect(&e->t, &e->col) : tracker_sync(&e->t, &e->col);
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
        return 0;
}

/*
 * Paused: copies what is left to send into staging, shipping each full
 * buffer (MaxStagingMB) while the VM stays paused, and the epoch's pages
 * into an image taken at this seal. Returns 0 or the error of a shipment.
 */
static int seal_copy(Epoch *e, Seal *s)
{
        int r;

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
                                r = ship_staging(e, s->epoch);
                                if (r < 0 && r != -ENOTCONN)
                                        return r;
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
                s->image_copy_r = k < 0 ? (int) k : 0;
        }
        return 0;
}

/* SAVE_STATE (unless PAUSE did it) and RESUME(cur + 1) (unless freezing); the pause ends here. */
static int seal_resume(Epoch *e, Seal *s)
{
        Primary *p = e->p;
        int r;

        r = s->state_in_pause ? 0 : vmm_link_save_state(e->vmm, &s->state, &s->state_len);
        if (r < 0) {
                log_error_errno(r, "VM %s: SAVE_STATE failed: %s", p->vm->name, vmm_link_last_error(e->vmm));
                primary_fail(p, "SAVE_STATE failed: %s", vmm_link_last_error(e->vmm));
                (void) vmm_link_resume(e->vmm, e->cur);
                wake(p->notify_fd);
                return r;
        }
        if (!s->freeze) {
                r = s->reset_in_resume ? tracker_reset_and_resume(&e->t, e->cur + 1)
                                       : vmm_link_resume(e->vmm, e->cur + 1);
                if (r == -EUCLEAN)
                        return tracking_failed(e, r, "dirty ring reset at resume");
                if (r < 0) {
                        const char *why = s->reset_in_resume ? e->t.error : vmm_link_last_error(e->vmm);
                        (void) epoch_fail(e, r, "RESUME failed: %s", why);
                        return log_error_errno(r, "VM %s: RESUME failed: %s", p->vm->name, why);
                }
        }
        s->pause_ns = now_nsec() - s->t0;
        /* What the guest saw: the agent's Pause arrival to vCPU release, without
         * the two requests' trips between the processes (0 when freezing). */
        s->vm_pause_ns = s->freeze ? 0 : vmm_link_last_paused_ns(e->vmm);
        return 0;
}

/* Running again: the epoch joins the history, the next one starts, the status is updated. */
static void seal_account(Epoch *e, Seal *s)
{
        Primary *p = e->p;
        uint64_t dirty_pages = e->dirty_since_seal, span_us = MAX(now_usec() - e->epoch_start_us, 1u);

        s->distinct = e->run->n;
        e->dirty_since_seal = 0;
        e->epoch_start_us = now_usec();
        e->last_sealed = s->epoch;
        epoch_image_seal_done(e, s->epoch, s->pause_ns, s->state, s->state_len, s->image_copy_r);
        e->hist[e->n_hist++] = (History){.epoch = s->epoch, .full = e->cur_full, .bits = e->run};
        e->run = pool_get(e);
        e->cur++;
        e->cur_full = false;
        if (!p->vm->output_commit) {
                /* OutputCommit=no: output flows as soon as its epoch is sealed. */
                (void) vmm_link_release_output(e->vmm, s->epoch, NULL);
                e->released = MAX(e->released, s->epoch);
        }

        pthread_mutex_lock(&p->mutex);
        /* A freezing seal counts up to where RESUME would have been. */
        record_pause(p, s->pause_ns, s->vm_pause_ns);
        p->pub.page_bytes_in = e->pstats.bytes_in;
        p->pub.page_bytes_out = e->pstats.bytes_out;
        p->pub.last_sealed = s->epoch;
        p->pub.pages_last_epoch = s->distinct;
        p->pub.dirty_rate = (double) dirty_pages * 1e6 / (double) span_us;
        p->pub.inflight = e->n_hist;
        p->pub.staging_bytes = (uint64_t) e->stage_n * PAGE_BYTES;
        pthread_mutex_unlock(&p->mutex);
}

/*
 * Ships the sealed epoch while the next one runs: staging, STATE, EPOCH_END,
 * then the next epoch's EPOCH_BEGIN. A lost link drops the rest: the pages
 * are in the history bitmap and go out again in the resync.
 */
static int seal_ship(Epoch *e, Seal *s)
{
        Primary *p = e->p;
        Dr__Repl__EpochState st = DR__REPL__EPOCH_STATE__INIT;
        Dr__Repl__EpochEnd end = DR__REPL__EPOCH_END__INIT;
        int r;

        r = ship_staging(e, s->epoch);
        if (r == 0) {
                st.epoch = s->epoch;
                st.vmstate.data = s->state;
                st.vmstate.len = s->state_len;
                r = ep_send(e, DR__REPL__FRAME_TYPE__FRAME_STATE, NULL, 0, &st.base, true);
        }
        if (r == 0) {
                end.epoch = s->epoch;
                end.page_records = e->page_records;
                end.distinct_pages = s->distinct;
                end.has_seal_pause_ns = true;
                end.seal_pause_ns = s->pause_ns;
                r = ep_send(e, DR__REPL__FRAME_TYPE__FRAME_EPOCH_END, NULL, 0, &end.base, true);
        }
        e->page_records = 0;
        e->stage_n = 0;
        if (r == 0)
                r = send_begin(e, false, s->epoch);
        pthread_mutex_lock(&p->mutex);
        p->pub.staging_bytes = 0;
        pthread_mutex_unlock(&p->mutex);
        return r == -ENOTCONN ? 0 : r;
}

/*
 * Seals the running epoch: PAUSE -> final collect + reset -> VMM-written
 * pages -> copy the remaining dirty pages into staging -> SAVE_STATE ->
 * RESUME(cur + 1) (unless freezing) -> ship staging, STATE, EPOCH_END.
 * Returns 0, 1 when the PAUSE timed out (the epoch goes on), or a negative
 * errno (the pipeline stops).
 *
 * Staging is bounded by MaxStagingMB. When an epoch's remaining dirty set is
 * larger, the VM stays paused while each full staging buffer is shipped
 * (queued on the link) and the copy continues: memory stays bounded and the
 * replica stays exact, at the price of a longer pause for that one epoch.
 * With pre-copy that only happens when the link cannot keep up at all.
 */
static int seal(Epoch *e, bool freeze)
{
        Seal s = {
                .epoch = e->cur,
                .freeze = freeze,
                .state_in_pause =
                        vmm_link_has_feature(e->vmm, DR__CONTROL__FEATURE__FEATURE_PAUSE_SAVES_STATE),
                .reset_in_resume = !freeze && tracker_resume_resets(&e->t),
        };
        int r;

        r = seal_pause(e, &s);
        if (r == 0)
                r = seal_harvest(e, &s);
        if (r == 0) {
                r = seal_copy(e, &s);
                if (r < 0) {
                        (void) vmm_link_resume(e->vmm, e->cur);
                        wake(e->p->notify_fd);
                }
        }
        if (r == 0)
                r = seal_resume(e, &s);
        if (r == 0) {
                seal_account(e, &s);
                r = seal_ship(e, &s);
        }
        free(s.state);
        return r;
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

void epoch_free(Epoch *e)
{
        epoch_image_shutdown(e);
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

int epoch_init(Epoch *e)
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
        freeze = e->freeze_pending && !e->frozen;
        ckpt = e->checkpoint_want > e->checkpoint_done;
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

/* CMD_THAW: resumes a frozen VM. */
static int epoch_thaw(Epoch *e)
{
        Primary *p = e->p;
        int r;

        if (!e->frozen)
                return 0;
        r = vmm_link_resume(e->vmm, e->cur);
        e->frozen = e->freeze_pending = false;
        pthread_mutex_lock(&p->mutex);
        p->frozen = false;
        if (r < 0)
                primary_set_failed_locked(p, "RESUME after thaw failed: %s", vmm_link_last_error(e->vmm));
        pthread_cond_broadcast(&p->cond);
        pthread_mutex_unlock(&p->mutex);
        if (r < 0)
                return r;
        e->epoch_start_us = now_usec();
        return 0;
}

/* CMD_HASH: page hashes of frozen RAM (-EBUSY unless frozen), answered through p->cond. */
static void epoch_hash(Epoch *e, const Command *c)
{
        Primary *p = e->p;
        int r = e->frozen ? hash_ram(e, c->hash.path) : -EBUSY;

        pthread_mutex_lock(&p->mutex);
        p->hash_result = r;
        p->hash_done = c->hash.seq;
        pthread_cond_broadcast(&p->cond);
        pthread_mutex_unlock(&p->mutex);
}

/* Acts on one command; a link change is only noted in *link (the newest wins). */
static int epoch_command(Epoch *e, Command *c, Command *link)
{
        switch (c->type) {
        case CMD_NONE:
                return 0;
        case CMD_LINK:
                *link = *c;
                return 0;
        case CMD_CHECKPOINT:
                e->checkpoint_want = MAX(e->checkpoint_want, c->checkpoint.seq);
                return 0;
        case CMD_FREEZE:
                e->freeze_pending = true;
                return 0;
        case CMD_FREEZE_CANCEL:
                e->freeze_pending = false;
                return 0;
        case CMD_THAW:
                return epoch_thaw(e);
        case CMD_HASH:
                epoch_hash(e, c);
                return 0;
        case CMD_IMAGE:
                epoch_image_request(e, c);
                return 0;
        }
        return 0;
}

/*
 * The one place the epoch thread takes the loop's commands (the boundary in
 * primary-internal.h). A link change is returned in *link (type CMD_LINK)
 * for the caller to act on after the rest. Returns 0 or the error that ends
 * the pipeline.
 */
static int epoch_take_commands(Epoch *e, Command *link)
{
        Command cmds[COMMAND_QUEUE_MAX];
        size_t n = command_queue_take(&e->p->commands, cmds, ELEMENTSOF(cmds));
        int r = 0;

        for (size_t i = 0; i < n; i++) {
                if (r >= 0)
                        r = epoch_command(e, &cmds[i], link);
                else if (cmds[i].type == CMD_IMAGE)
                        epoch_image_request(e, &cmds[i]); /* answered by epoch_image_shutdown() */
                command_done(&cmds[i]);
        }
        return r;
}

/* Exiting: commands nobody will act on. An image request is kept, so epoch_image_shutdown() answers it. */
static void epoch_drop_commands(Epoch *e)
{
        Command cmds[COMMAND_QUEUE_MAX];
        size_t n = command_queue_take(&e->p->commands, cmds, ELEMENTSOF(cmds));

        for (size_t i = 0; i < n; i++) {
                if (cmds[i].type == CMD_IMAGE)
                        epoch_image_request(e, &cmds[i]);
                command_done(&cmds[i]);
        }
}

/* The link went down or came up: what was in flight on the old one is discarded (its pages are in
 * the history and the running set). */
static int epoch_link_changed(Epoch *e, const Command *link)
{
        int r;

        e->gen = link->link.gen;
        e->session = false;
        e->stage_n = 0;
        if (!link->link.up)
                return 0;
        r = session_start(e, link->link.ours, link->link.last);
        if (r == -ENOTCONN) {
                e->session = false;
                return 0;
        }
        return r;
}

static int epoch_loop(Epoch *e)
{
        Primary *p = e->p;
        int r;

        for (;;) {
                Command link = {.type = CMD_NONE}; /* CMD_LINK when the link changed */
                bool stop, frozen, freeze = false, ckpt = false;

                pthread_mutex_lock(&p->mutex);
                stop = p->stop;
                pthread_mutex_unlock(&p->mutex);
                if (stop)
                        return 0;

                r = epoch_take_commands(e, &link);
                if (r < 0)
                        return r;
                frozen = e->frozen;

                r = epoch_handle_acks(e);
                if (r < 0)
                        return r;
                epoch_image_collect(e, false);
                if (!frozen)
                        epoch_image_start(e);

                r = epoch_guard_apply(e, &frozen);
                if (r < 0)
                        return r;

                if (link.type == CMD_LINK && link.link.gen != e->gen) {
                        r = epoch_link_changed(e, &link);
                        if (r < 0)
                                return r;
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
                        if (ckpt)
                                e->checkpoint_done = e->checkpoint_want;
                        if (freeze) {
                                e->frozen = true;
                                e->freeze_pending = false;
                        }
                        pthread_mutex_lock(&p->mutex);
                        if (ckpt) {
                                p->checkpoint_done = e->checkpoint_done;
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

void *epoch_thread(void *userdata)
{
        Epoch *e = userdata;
        Primary *p = e->p;
        int r;

        r = epoch_loop(e);
        epoch_stop_vmm(e, r);
        epoch_drop_commands(e);
        if (r < 0 && r != -ECANCELED) {
                pthread_mutex_lock(&p->mutex);
                if (!p->failed)
                        primary_set_failed_locked(p, "epoch pipeline stopped: %s", strerror(-r));
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
        p->wake_fd = p->notify_fd = p->attach_fd = -EBADF;
        pthread_mutex_init(&p->mutex, NULL);
        pthread_cond_init(&p->cond, NULL);
        command_queue_init(&p->commands);
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
        p->attach_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (p->wake_fd < 0 || p->notify_fd < 0 || p->attach_fd < 0)
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
        r = sd_event_add_io(p->event, &p->notify_source, p->notify_fd, EPOLLIN, primary_on_notify, p);
        if (r < 0)
                return r;
        p->started = true;
        pthread_mutex_lock(&p->mutex);
        snprintf(p->detail, sizeof(p->detail), "waiting for the VMM at %s", p->vm->control_socket);
        pthread_mutex_unlock(&p->mutex);
        /* Its outcome comes later, on the loop (on_attach_done(), the attach callback). */
        return primary_attach(p);
}

Primary *primary_free(Primary *p)
{
        if (!p)
                return NULL;
        pthread_mutex_lock(&p->mutex);
        p->stop = true;
        pthread_cond_broadcast(&p->cond);
        pthread_mutex_unlock(&p->mutex);
        /* An attach still running: its VmmLink and Epoch were never the epoch thread's. */
        primary_attach_cancel(p);
        if (p->link)
                /* Tells the standby why, and makes any send in progress return. */
                link_fail(p->link, -ECANCELED, "primary stopping");
        if (p->link)
                primary_drop_link(p);
        if (p->wake_fd >= 0)
                wake(p->wake_fd);
        if (p->thread_started)
                pthread_join(p->thread, NULL);
        /* Every image request is answered: with its result, or cancelled. */
        primary_image_deliver(p, true);
        free(p->image_req_dir);
        command_queue_done(&p->commands);

        p->attach_timer = sd_event_source_disable_unref(p->attach_timer);
        p->reconnect_timer = sd_event_source_disable_unref(p->reconnect_timer);
        p->notify_source = sd_event_source_disable_unref(p->notify_source);
        p->split_timer = sd_event_source_disable_unref(p->split_timer);
        p->gone_timer = sd_event_source_disable_unref(p->gone_timer);
        safe_close(p->wake_fd);
        safe_close(p->notify_fd);
        safe_close(p->attach_fd);
        SSL_CTX_free(p->tls);
        if (p->secret) {
                explicit_bzero(p->secret, p->secret_len);
                free(p->secret);
        }
        free(p->regions);
        free(p->region_ptrs);
        pthread_cond_destroy(&p->cond);
        pthread_mutex_destroy(&p->mutex);
        sd_event_unref(p->event);
        free(p);
        return NULL;
}

void primary_drain(Primary *p)
{
        pthread_mutex_lock(&p->mutex);
        p->drain_target = p->pub.last_sealed;
        pthread_mutex_unlock(&p->mutex);
        atomic_store_explicit(&p->draining, true, memory_order_relaxed);
        wake(p->wake_fd);
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The primary's status (role.h's ReplStatus): the epoch thread's EpochStats copied whole under
 * the mutex with the loop's own fields, then derived outside it.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "primary-internal.h"
#include "util.h"

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

static int cmp_u64(const void *a, const void *b)
{
        uint64_t x = *(const uint64_t *) a, y = *(const uint64_t *) b;
        return x < y ? -1 : x > y;
}

/* The percentiles of the first n of v (sorted in place). */
static void pause_percentiles(uint64_t *v, size_t n, uint64_t *p50, uint64_t *p99, uint64_t *max)
{
        if (n == 0)
                return;
        qsort(v, n, sizeof(uint64_t), cmp_u64);
        *p50 = v[(n - 1) / 2];
        *p99 = v[MIN((size_t) ((double) (n - 1) * 0.99 + 0.5), n - 1)];
        *max = v[n - 1];
}

void primary_get_status(Primary *p, ReplStatus *ret)
{
        EpochStats pub; /* 16 KiB of pauses: as much stack as the sort buffers took before */
        size_t n, n_vm = 0;
        LinkStats ls = {};
        Link *l;

        *ret = (ReplStatus){.role = "primary"};
        pthread_mutex_lock(&p->mutex);
        /* The epoch thread's side, as one copy (EpochStats); the rest is the loop's own. */
        pub = p->pub;
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
        ret->last_committed = atomic_load_explicit(&p->acked, memory_order_relaxed);
        ret->epochs_committed = p->epochs_committed;
        ret->last_sync_usec = p->last_sync_usec;
        ret->last_sync_full = p->last_sync_full;
        ret->ram_bytes = p->total_pages * PAGE_BYTES;
        if (p->syncing && pub.sync_full && p->link_up) {
                ret->sync_total_bytes = p->total_pages * PAGE_BYTES;
                ret->sync_done_bytes = MIN(pub.sync_walked_pages, p->total_pages) * PAGE_BYTES;
                ret->sync_elapsed_usec = now_usec() - pub.sync_start_usec;
        }
        ret->commit_gap_max_usec = p->commit_gap_max_usec;
        memcpy(ret->commit_gaps, p->commit_gaps, sizeof(ret->commit_gaps));
        l = p->link;
        if (l)
                link_get_stats(l, &ls);
        pthread_mutex_unlock(&p->mutex);

        ret->last_sealed = pub.last_sealed;
        ret->full_syncs = pub.full_syncs;
        ret->incremental_syncs = pub.incremental_syncs;
        ret->pages_last_epoch = pub.pages_last_epoch;
        ret->dirty_pages_per_s = pub.dirty_rate;
        ret->inflight = pub.inflight;
        ret->staging_bytes = pub.staging_bytes;
        n = (size_t) MIN(pub.n_pauses, (uint64_t) PAUSE_WINDOW);
        for (size_t i = 0; i < n; i++) /* the seals the agent reported, to the front */
                if (pub.vm_pauses[i] > 0)
                        pub.vm_pauses[n_vm++] = pub.vm_pauses[i];
        pause_percentiles(pub.pauses, n, &ret->pause_ns_p50, &ret->pause_ns_p99, &ret->pause_ns_max);
        pause_percentiles(pub.vm_pauses, n_vm, &ret->vm_pause_ns_p50, &ret->vm_pause_ns_p99,
                          &ret->vm_pause_ns_max);
        ret->bytes_sent = ls.bytes_sent;
        ret->bytes_received = ls.bytes_received;
        ret->compression_ratio =
                pub.page_bytes_out > 0 ? (double) pub.page_bytes_in / (double) pub.page_bytes_out : 0.0;
}

int primary_reset_pauses(Primary *p)
{
        pthread_mutex_lock(&p->mutex);
        p->pub.n_pauses = 0;
        pthread_mutex_unlock(&p->mutex);
        return 0;
}

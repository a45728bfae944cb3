/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The primary's status, as a snapshot taken under the mutex (role.h's ReplStatus).
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

int primary_reset_pauses(Primary *p)
{
        pthread_mutex_lock(&p->mutex);
        p->n_pauses = 0;
        pthread_mutex_unlock(&p->mutex);
        return 0;
}

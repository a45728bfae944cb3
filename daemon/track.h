/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * Dirty tracking backends behind one table of function pointers (the KVM
 * selftests' dirty_log_test runs one body in several modes the same way).
 *
 * Pages are numbered VM-wide (regions concatenated in layout order, see
 * VmmLayout); a dirty set is a DirtySet of total_pages pages (dirtyset.h), so
 * a page dirtied many times in an epoch is recorded once, and the ring backend's
 * cost follows the pages it harvests, not the size of RAM.
 *
 * Ordering rule (docs/architecture.md, "Design invariants"): collect -> reset -> only then copy contents.
 * A write that lands after the reset is logged again; one that lands before
 * it is in the copy. tracker_sync() does collect + reset in that order.
 */

#include <stdbool.h>
#include <stdint.h>

#include "dirtyset.h"
#include "vmm-link.h"

typedef struct Tracker Tracker;

typedef struct TrackerStats {
        uint64_t entries;          /* ring entries harvested (before de-duplication) */
        uint64_t new_pages;        /* bits newly set in a dirty set */
        uint64_t resets;           /* sum of KVM_RESET_DIRTY_RINGS results */
        uint64_t marked;           /* ring entries marked for reset by us */
        uint64_t ring_full_events; /* ring-full eventfd reads */
        uint64_t collects;
} TrackerStats;

typedef struct TrackerOps {
        const char *name;
        /*
         * Collects pages dirtied since the last collect into `dirty`. Ring: drains
         * every vCPU ring (entries marked RESET, not yet re-protected). Bitmap:
         * GET_DIRTY_LOG + CLEAR_DIRTY_LOG per slot (collect and re-protect in one).
         * Safe while the VM runs. Returns the number of new pages or -errno.
         */
        int64_t (*collect)(Tracker *t, DirtySet *dirty);
        /* Re-protects what collect() took (ring: RESET_RINGS). Returns 0 or -errno. */
        int (*reset)(Tracker *t);
} TrackerOps;

extern const TrackerOps tracker_ring_ops;
extern const TrackerOps tracker_bitmap_ops;

struct Tracker {
        const TrackerOps *ops;
        VmmLink *link; /* borrowed */
        const VmmLayout *lay;
        uint32_t fetch[VMM_LINK_MAX_VCPUS];   /* ring mode: next entry to read per vCPU */
        bool fetch_known[VMM_LINK_MAX_VCPUS]; /* false until the ring's position was found (see track-ring.c)
                                               */
        uint64_t pending_reset;               /* ring mode: marked since the last RESET_RINGS */
        unsigned empty_full_streak;           /* ring-full wake-ups that found nothing: wedge detection */
        bool force_reset; /* ring mode: call RESET_RINGS even with nothing marked (wakes a full vCPU) */
        TrackerStats stats;
        char error[256];
};

/* Picks the backend from the layout's mode. The tracker borrows link. */
int tracker_init(Tracker *t, VmmLink *link);

/* collect + reset, in that order. Returns new pages or -errno. */
int64_t tracker_sync(Tracker *t, DirtySet *dirty);

/*
 * Call when the ring-full eventfd fired: drains it, collects, resets.
 * Returns new pages, or -EDEADLK when rings keep reporting full with
 * nothing to harvest (the ring jam of docs/kvm-host.md; t->error says what to do).
 */
int64_t tracker_ring_full(Tracker *t, DirtySet *dirty);

/*
 * Resumes the paused VM at `epoch`, re-protecting first what collect() took
 * while it was paused (ring mode with FEATURE_RESUME_RESETS_RINGS: one round
 * trip; nothing runs between the caller's copy and the reset). Without the
 * feature, or in bitmap mode, it is reset() then RESUME. Returns 0 or -errno
 * (-EUCLEAN: the reset count showed lost entries; the VM runs regardless).
 */
int tracker_reset_and_resume(Tracker *t, uint64_t epoch);

/* Whether tracker_reset_and_resume() saves a round trip (so callers may copy before the reset). */
bool tracker_resume_resets(const Tracker *t);

/* Ring backend: accounts a KVM_RESET_DIRTY_RINGS result against what was harvested. */
int tracker_ring_reset_done(Tracker *t, uint64_t count);

/* Number of 64-bit words in a dirty bitmap for this layout. */
static inline uint64_t tracker_bitmap_words(const VmmLayout *lay)
{
        return (lay->total_pages + 63) / 64;
}

/* A dirty set sized for this layout. */
static inline int tracker_dirtyset_init(const VmmLayout *lay, DirtySet *ret)
{
        return dirtyset_init(ret, lay->total_pages);
}

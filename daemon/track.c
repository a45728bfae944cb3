/* SPDX-License-Identifier: GPL-2.0-or-later */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "macros.h"
#include "track.h"

/* Ring-full wake-ups in a row that harvest nothing before we call the ring jammed. */
#define WEDGE_STREAK 32

int tracker_init(Tracker *t, VmmLink *link)
{
        memset(t, 0, sizeof(*t));
        t->link = link;
        t->lay = vmm_link_layout(link);
        /* Where each ring continues is found on the first collect (track-ring.c). */
        switch (t->lay->mode) {
        case DR__CONTROL__TRACKING_MODE__TRACKING_MODE_RING:
                t->ops = &tracker_ring_ops;
                break;
        case DR__CONTROL__TRACKING_MODE__TRACKING_MODE_BITMAP:
                t->ops = &tracker_bitmap_ops;
                break;
        default:
                return -EINVAL;
        }
        return 0;
}

int64_t tracker_sync(Tracker *t, DirtySet *dirty)
{
        int64_t n;
        int r;

        n = t->ops->collect(t, dirty);
        if (n < 0)
                return n;
        r = t->ops->reset(t);
        if (r < 0)
                return r;
        return n;
}

bool tracker_resume_resets(const Tracker *t)
{
        return t->ops == &tracker_ring_ops &&
               vmm_link_has_feature(t->link, DR__CONTROL__FEATURE__FEATURE_RESUME_RESETS_RINGS);
}

int tracker_reset_and_resume(Tracker *t, uint64_t epoch)
{
        uint64_t count = 0;
        int r;

        if (!tracker_resume_resets(t) || t->pending_reset == 0) {
                r = t->ops->reset(t);
                if (r < 0)
                        return r;
                r = vmm_link_resume(t->link, epoch);
                if (r < 0)
                        snprintf(t->error, sizeof(t->error), "RESUME failed: %s",
                                 vmm_link_last_error(t->link));
                return r;
        }
        r = vmm_link_resume_reset(t->link, epoch, &count);
        if (r < 0) {
                snprintf(t->error, sizeof(t->error), "RESUME with RESET_RINGS failed: %s",
                         vmm_link_last_error(t->link));
                return r;
        }
        return tracker_ring_reset_done(t, count);
}

int64_t tracker_ring_full(Tracker *t, DirtySet *dirty)
{
        uint64_t v, before = t->stats.entries, resets_before = t->stats.resets;
        int64_t n;

        if (t->lay->ring_full_fd >= 0 && read(t->lay->ring_full_fd, &v, sizeof(v)) == sizeof(v))
                t->stats.ring_full_events += v;
        /* A vCPU waits in the agent until the next RESET_RINGS, even when its ring
         * turned out empty: always send one, so it re-enters and KVM re-checks. */
        t->force_reset = true;
        n = tracker_sync(t, dirty);
        t->force_reset = false;
        if (n < 0)
                return n;

        if (t->stats.entries == before && t->stats.resets == resets_before) {
                /* A vCPU says its ring is full, yet there is nothing in any ring and
                 * KVM reset nothing: the jam docs/kvm-host.md describes. Do not spin. */
                if (++t->empty_full_streak >= WEDGE_STREAK) {
                        snprintf(t->error, sizeof(t->error),
                                 "dirty ring jammed: a vCPU keeps stopping on ring-full with nothing to "
                                 "harvest (%u wake-ups); restart the VM with bitmap tracking "
                                 "(--tracking bitmap / tracking=bitmap)",
                                 t->empty_full_streak);
                        return -EDEADLK;
                }
        } else
                t->empty_full_streak = 0;
        return n;
}

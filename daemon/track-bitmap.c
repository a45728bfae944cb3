/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Bitmap backend: KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG (manual protect)
 * through the agent, which writes each slot's bitmap into a shared memfd.
 * Cost grows with RAM size: the whole bitmap is fetched and scanned.
 */
#include <errno.h>
#include <stdio.h>

#include "macros.h"
#include "track.h"

static int64_t bitmap_collect(Tracker *t, DirtySet *dirty)
{
        const VmmLayout *lay = t->lay;
        int64_t added = 0;

        t->stats.collects++;
        for (size_t i = 0; i < lay->n_regions; i++) {
                const VmmRegion *r = &lay->regions[i];
                const uint64_t *bm = (const uint64_t *) (lay->bitmap + r->bitmap_offset);
                uint64_t n_words = DIV_ROUND_UP(r->n_pages, 64), pages = 0;
                int ret;

                /* clear=true: the agent re-protects exactly the pages it reports,
                 * before replying, so collect and reset happen together. */
                ret = vmm_link_get_dirty_log(t->link, r->slot, true, &pages);
                if (ret < 0) {
                        snprintf(t->error, sizeof(t->error), "GET_DIRTY_LOG(slot %u) failed: %s", r->slot,
                                 vmm_link_last_error(t->link));
                        return ret;
                }
                if (pages == 0)
                        continue;
                for (uint64_t k = 0; k < n_words; k++) {
                        uint64_t v = __atomic_load_n(&bm[k], __ATOMIC_RELAXED);
                        if (!v)
                                continue;
                        if (k == n_words - 1 && r->n_pages % 64)
                                v &= (1ULL << (r->n_pages % 64)) - 1;
                        for (uint64_t b = v; b; b &= b - 1) {
                                uint64_t page = r->first_page + k * 64 + (uint64_t) __builtin_ctzll(b);
                                if (dirtyset_add(dirty, page))
                                        added++;
                                t->stats.entries++;
                        }
                }
        }
        t->stats.new_pages += (uint64_t) added;
        return added;
}

static int bitmap_reset(Tracker *t)
{
        return 0; /* collect() already re-protected what it reported */
}

const TrackerOps tracker_bitmap_ops = {
        .name = "bitmap",
        .collect = bitmap_collect,
        .reset = bitmap_reset,
};

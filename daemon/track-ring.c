/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Ring backend: the daemon reads every vCPU's dirty ring itself (it got the
 * vCPU fds over the control socket and mapped the rings), and asks the VMM's
 * agent for KVM_RESET_DIRTY_RINGS, which only works in the VMM's process.
 */
#include <errno.h>
#include <stdio.h>

#include "macros.h"
#include "track.h"

static int64_t ring_collect(Tracker *t, uint64_t *dirty)
{
        const VmmLayout *lay = t->lay;
        uint32_t mask = lay->ring_entries - 1;
        int64_t added = 0;

        t->stats.collects++;
        for (size_t i = 0; i < lay->n_vcpus; i++) {
                struct kvm_dirty_gfn *ring = lay->vcpus[i].ring;
                uint32_t fetch = t->fetch[i];

                for (;;) {
                        struct kvm_dirty_gfn *e = &ring[fetch & mask];
                        uint64_t page;
                        uint32_t flags;

                        /* Acquire pairs with KVM's release store of DIRTY when it pushed
                         * the entry (kvm_dirty_gfn_set_dirtied): slot/offset are valid
                         * once we see the flag. */
                        flags = __atomic_load_n(&e->flags, __ATOMIC_ACQUIRE);
                        if (!(flags & KVM_DIRTY_GFN_F_DIRTY))
                                break;
                        if (vmm_layout_page_index(lay, e->slot, e->offset, &page) < 0) {
                                snprintf(t->error, sizeof(t->error),
                                         "vCPU %u ring entry %u names slot %u page %llu outside the layout",
                                         lay->vcpus[i].index, fetch & mask, e->slot,
                                         (unsigned long long) e->offset);
                                t->fetch[i] = fetch;
                                return -EBADMSG;
                        }
                        if (!(dirty[page / 64] & (1ULL << (page % 64)))) {
                                dirty[page / 64] |= 1ULL << (page % 64);
                                added++;
                        }
                        /* Release pairs with KVM's acquire load of the flags in
                         * KVM_RESET_DIRTY_RINGS: our reads of slot/offset above complete
                         * before KVM may reuse the entry. */
                        __atomic_store_n(&e->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
                        fetch++;
                        t->stats.entries++;
                        t->stats.marked++;
                        t->pending_reset++;
                }
                t->fetch[i] = fetch;
        }
        t->stats.new_pages += (uint64_t) added;
        return added;
}

static int ring_reset(Tracker *t)
{
        uint64_t count = 0;
        int r;

        if (t->pending_reset == 0 && !t->force_reset)
                return 0;
        r = vmm_link_reset_rings(t->link, &count);
        if (r < 0) {
                snprintf(t->error, sizeof(t->error), "RESET_RINGS failed: %s", vmm_link_last_error(t->link));
                return r;
        }
        t->stats.resets += count;
        /* KVM resets exactly the entries we marked (selftests: reset count ==
         * harvested count). Anything else means lost or phantom entries. */
        if (count != t->pending_reset) {
                snprintf(t->error, sizeof(t->error), "RESET_RINGS reset %llu entries, %llu were harvested",
                         (unsigned long long) count, (unsigned long long) t->pending_reset);
                t->pending_reset = 0;
                return -EUCLEAN;
        }
        t->pending_reset = 0;
        return 0;
}

const TrackerOps tracker_ring_ops = {
        .name = "ring",
        .collect = ring_collect,
        .reset = ring_reset,
};

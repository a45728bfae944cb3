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

static bool entry_dirty(const struct kvm_dirty_gfn *e)
{
        /* Acquire: see ring_collect(). */
        return __atomic_load_n(&e->flags, __ATOMIC_ACQUIRE) & KVM_DIRTY_GFN_F_DIRTY;
}

/*
 * Where does this vCPU's ring continue? A fresh VM's ring starts at entry 0,
 * but after an earlier client (or the agent, harvesting on its own while no
 * client was attached) KVM's push index is anywhere, and a reset ring holds
 * no trace of it. The published entries form one run that starts where KVM
 * resumed pushing: the DIRTY entry whose predecessor is not DIRTY. Returns
 * false while the ring is empty (nothing to find yet) or entirely DIRTY (no
 * start visible: harvest it all and look again next time).
 */
static bool ring_find_start(const struct kvm_dirty_gfn *ring, uint32_t n, uint32_t *ret)
{
        for (uint32_t k = 0; k < n; k++)
                if (entry_dirty(&ring[k]) && !entry_dirty(&ring[(k - 1) & (n - 1)])) {
                        *ret = k;
                        return true;
                }
        return false;
}

static int64_t ring_collect(Tracker *t, DirtySet *dirty)
{
        const VmmLayout *lay = t->lay;
        uint32_t mask = lay->ring_entries - 1;
        int64_t added = 0;

        t->stats.collects++;
        for (size_t i = 0; i < lay->n_vcpus; i++) {
                struct kvm_dirty_gfn *ring = lay->vcpus[i].ring;
                uint32_t fetch = t->fetch[i], limit = UINT32_MAX, got = 0;
                bool full_scan = false;

                if (!t->fetch_known[i]) {
                        if (ring_find_start(ring, lay->ring_entries, &fetch))
                                t->fetch_known[i] = true;
                        else if (entry_dirty(&ring[0])) {
                                /* Entirely DIRTY: take one lap from 0, position still unknown. */
                                fetch = 0;
                                limit = lay->ring_entries;
                                full_scan = true;
                        } else
                                continue; /* empty */
                }

                for (; got < limit; got++) {
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
                        if (dirtyset_add(dirty, page))
                                added++;
                        /* Release pairs with KVM's acquire load of the flags in
                         * KVM_RESET_DIRTY_RINGS: our reads of slot/offset above complete
                         * before KVM may reuse the entry. */
                        __atomic_store_n(&e->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
                        fetch++;
                        t->stats.entries++;
                        t->stats.marked++;
                        t->pending_reset++;
                }
                if (!full_scan)
                        t->fetch[i] = fetch;
        }
        t->stats.new_pages += (uint64_t) added;
        return added;
}

int tracker_ring_reset_done(Tracker *t, uint64_t count)
{
        t->stats.resets += count;
        /* KVM resets exactly the entries we marked (selftests: reset count ==
         * harvested count). Anything else means lost or phantom entries. */
        if (count != t->pending_reset) {
                /* Seen when a ring jams (docs/kvm-host.md): emulated kernel-mode bulk stores push
                 * past the ring's reserved slots and overwrite entries not yet reset. Entries
                 * may have been lost, so the dirty set cannot be trusted any more. */
                snprintf(t->error, sizeof(t->error),
                         "dirty ring overflowed: KVM reset %llu entries but %llu were harvested, so dirty "
                         "pages may have been lost; restart the VM with bitmap tracking "
                         "(--tracking bitmap / tracking=bitmap)",
                         (unsigned long long) count, (unsigned long long) t->pending_reset);
                t->pending_reset = 0;
                return -EUCLEAN;
        }
        t->pending_reset = 0;
        return 0;
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
        return tracker_ring_reset_done(t, count);
}

const TrackerOps tracker_ring_ops = {
        .name = "ring",
        .collect = ring_collect,
        .reset = ring_reset,
};

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The daemon's side of the control protocol: what it does with the replies
 * of a VMM agent it does not trust (daemon/vmm-link.c), including the
 * Layout that tells it which shared memory to map and where the bitmaps
 * and dirty rings are, and what the dirty trackers (track-ring.c,
 * track-bitmap.c) then read from that memory.
 *
 * The harness is the agent: before vmm_link_open_fd() it queues all the
 * replies of the input on a SOCK_SEQPACKET socketpair (the daemon's
 * requests pile up unread on the other end), the second one carrying eight
 * fds (each can be taken once): 0, 1 RAM memfds, 2, 3 memfds standing in
 * for vCPU fds (rings at KVM_DIRTY_LOG_PAGE_OFFSET, a few entries dirty),
 * 4 bitmap memfd, 5 the VMM-dirty memfd (magic, a changed sequence, all
 * bits set), 6 state memfd, 7 an eventfd. Then it closes its write side, so a daemon waiting for more
 * replies reads end-of-file.
 *
 * Input: byte 0 = number of operations (mod 16), then that many operation
 * bytes (run after a successful open), then replies as [length le16][bytes].
 * Reply ids are the daemon's request numbers, 1, 2, 3, ...
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <syslog.h>
#include <unistd.h>

#include "dirtyset.h"
#include "fdpass.h"
#include "log.h"
#include "track.h"
#include "vmm-link.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MEMFD_BYTES (2u << 20)
#define N_FDS       8
#define N_MEMFDS    7

static int fds[N_FDS] = {-1, -1, -1, -1, -1, -1, -1, -1};

static void fds_init(void)
{
        static const char *names[N_MEMFDS] = {"ram0",   "ram1",      "vcpu0", "vcpu1",
                                              "bitmap", "vmm-dirty", "state"};
        uint8_t page[4096];

        for (size_t i = 0; i < N_FDS; i++) {
                if (fds[i] >= 0)
                        continue;
                fds[i] = i < N_MEMFDS ? memfd_create(names[i], MFD_CLOEXEC)
                                      : eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
                if (fds[i] < 0 || (i < N_MEMFDS && ftruncate(fds[i], MEMFD_BYTES) < 0))
                        abort();
        }
        /* Every input starts from the same memory: the daemon writes to some of it. */
        memset(page, 0, sizeof(page));
        for (size_t i = 0; i < 8; i++) { /* ring entries: flags DIRTY, slot 0, offset i */
                struct kvm_dirty_gfn g = {.flags = KVM_DIRTY_GFN_F_DIRTY, .slot = 0, .offset = i};
                memcpy(page + i * sizeof(g), &g, sizeof(g));
        }
        for (size_t i = 2; i <= 3; i++)
                if (pwrite(fds[i], page, sizeof(page), KVM_DIRTY_LOG_PAGE_OFFSET * 4096) != sizeof(page))
                        abort();
        memset(page, 0x55, sizeof(page));
        if (pwrite(fds[4], page, sizeof(page), 0) != sizeof(page) ||
            pwrite(fds[6], page, sizeof(page), 0) != sizeof(page))
                abort();
        memset(page, 0xff, sizeof(page));
        memcpy(page, "DRVMDIRT", 8);
        memset(page + 8, 0, 8);
        page[8] = 1; /* sequence: changed */
        if (pwrite(fds[5], page, sizeof(page), 0) != sizeof(page))
                abort();
}

static void run_op(VmmLink *l, Tracker *t, DirtySet *dirty, uint8_t op)
{
        const VmmLayout *lay = vmm_link_layout(l);
        Dr__Control__StatusReply *st = NULL;
        uint8_t *buf = NULL;
        uint64_t v, acc = 0;
        size_t len;

        switch (op % 13) {
        case 0:
                (void) tracker_sync(t, dirty);
                break;
        case 1:
                (void) tracker_ring_full(t, dirty);
                break;
        case 2:
                (void) tracker_reset_and_resume(t, 7);
                break;
        case 3:
                (void) vmm_link_start_tracking(l);
                break;
        case 4:
                (void) vmm_link_stop_tracking(l);
                break;
        case 5:
                (void) vmm_link_pause(l, 100, &v);
                break;
        case 6:
                if (vmm_link_pause_save(l, 100, &v, &buf, &len) >= 0)
                        acc += buf[0] + buf[len - 1];
                break;
        case 7:
                (void) vmm_link_resume(l, 8);
                break;
        case 8:
                if (vmm_link_save_state(l, &buf, &len) >= 0)
                        acc += buf[0] + buf[len - 1];
                break;
        case 9:
                (void) vmm_link_release_output(l, 9, &v);
                break;
        case 10:
                if (vmm_link_get_status(l, &st) >= 0)
                        dr__control__status_reply__free_unpacked(st, NULL);
                break;
        case 11:
                (void) vmm_link_take_vmm_dirty(l, dirty);
                break;
        case 12:
                /* What the primary does with a dirty page: find, read and place it. */
                for (uint64_t p = 0; p < lay->total_pages; p++) {
                        const uint8_t *ram = vmm_layout_page_ptr(lay, p);
                        if (!ram || vmm_layout_page_gpa(lay, p) == UINT64_MAX)
                                abort(); /* every page of the layout is somewhere */
                        acc += ram[0] + ram[lay->page_size - 1];
                }
                break;
        }
        free(buf);
        (void) acc;
        if (getenv("FUZZ_DEBUG"))
                fprintf(stderr, "op %u: %s\n", op % 13, vmm_link_last_error(l));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        _cleanup_(vmm_link_freep) VmmLink *l = NULL;
        _cleanup_(dirtyset_freep) DirtySet *dirty = NULL;
        size_t n_ops, at;
        unsigned n = 0;
        Tracker t;
        int sv[2], r;

        if (size < 1 || size > 64 * 1024)
                return 0;
        log_set_max_level(getenv("FUZZ_DEBUG") ? LOG_DEBUG : LOG_CRIT);
        fds_init();
        n_ops = MIN((size_t) data[0] % 16, size - 1);
        at = 1 + n_ops;

        /* Only the harness's end is non-blocking: replies that do not fit in the
         * socket's queue are not sent (the daemon reads end-of-file there). */
        if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0 ||
            fcntl(sv[1], F_SETFL, O_NONBLOCK) < 0)
                abort();
        while (at + 2 <= size) {
                size_t len = MIN((size_t) (data[at] | data[at + 1] << 8), size - at - 2);
                if (fdpass_send(sv[1], data + at + 2, len, n == 1 ? fds : NULL, n == 1 ? N_FDS : 0) < 0)
                        break;
                at += 2 + len;
                n++;
        }
        (void) shutdown(sv[1], SHUT_WR);

        r = vmm_link_open_fd(sv[0], "fuzz", &l);
        if (getenv("FUZZ_DEBUG"))
                fprintf(stderr, "open: %s\n", r < 0 ? strerror(-r) : "ok");
        if (r >= 0) {
                const VmmLayout *lay = vmm_link_layout(l);
                if (lay->n_regions == 0 || lay->total_pages == 0)
                        abort();
                /* The layout was validated as the standby and images validate theirs (common/layout.h):
                 * no two regions share a slot or overlap in guest memory or in the memfd. */
                for (size_t i = 0; i < lay->n_regions; i++)
                        for (size_t j = 0; j < i; j++) {
                                const VmmRegion *a = &lay->regions[i], *b = &lay->regions[j];
                                if (a->slot == b->slot ||
                                    (a->guest_phys < b->guest_phys + b->size &&
                                     b->guest_phys < a->guest_phys + a->size) ||
                                    (a->fd_offset < b->fd_offset + b->size &&
                                     b->fd_offset < a->fd_offset + a->size))
                                        abort();
                        }
                dirty = dirtyset_new(lay->total_pages);
                if (!dirty || tracker_init(&t, l) < 0)
                        goto out;
                for (size_t i = 0; i < n_ops; i++)
                        run_op(l, &t, dirty, data[1 + i]);
        }
out:
        close(sv[1]);
        return 0;
}

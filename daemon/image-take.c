/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Checkpoint images of a tracked VM: the capture protocol of imagefile.h driven through a VmmLink. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "image-take.h"
#include "util.h"

_printf_(3, 4) static int fail(char *err, size_t errlen, const char *fmt, ...)
{
        va_list ap;

        if (err && errlen > 0) {
                va_start(ap, fmt);
                vsnprintf(err, errlen, fmt, ap);
                va_end(ap);
        }
        return 0;
}

#define FAIL(r, ...) (fail(err, errlen, __VA_ARGS__), (r))

int image_layout_from_vmm(const VmmLayout *vl, ImageLayout *ret, const uint8_t **ret_ram)
{
        if (image_layout_check(&vl->ram) < 0) /* vmm-link.c validated it; a hand-made one may not be */
                return -EINVAL;
        for (size_t i = 0; i < vl->ram.n_regions; i++)
                ret_ram[i] = vl->regions[i].ram;
        *ret = vl->ram;
        return 0;
}

int image_take(VmmLink *link, Tracker *t, DirtySet *since, DirtySet *scratch, const ImageTakeOptions *o,
               ImageTakeResult *ret, char *err, size_t errlen)
{
        _cleanup_(image_capture_freep) ImageCapture *cap = NULL;
        _cleanup_free_ uint8_t *state = NULL;
        const uint8_t *ram[IMAGE_MAX_REGIONS];
        uint64_t t0, agent_ns = 0;
        ImageTakeResult res = {};
        ImageWriteOptions wo;
        ImageLayout il;
        size_t state_len = 0;
        int64_t n;
        int r;

        r = image_layout_from_vmm(t->lay, &il, ram);
        if (r < 0)
                return FAIL(r, "the VM's RAM layout cannot be imaged");
        r = image_capture_new(&il, ram, &cap);
        if (r < 0)
                return FAIL(r, "cannot set up image staging: %s", strerror(-r));

        /* Pre-copy while the VM runs: collect -> reset, then copy (the ordering rule of track.h). */
        n = tracker_sync(t, since);
        if (n < 0)
                return FAIL((int) n, "harvest failed: %s", t->error);
        (void) vmm_link_take_vmm_dirty(link, since);
        res.precopy_pages = image_capture_copy(cap, o->parent ? since->w : NULL);

        /* The pause: what an epoch's seal costs. */
        dirtyset_clear(scratch);
        t0 = now_nsec();
        r = vmm_link_pause(link, 2000, &agent_ns);
        if (r < 0)
                return FAIL(r, "pause failed: %s", vmm_link_last_error(link));
        n = tracker_sync(t, scratch);
        if (n < 0) {
                r = FAIL((int) n, "final harvest failed: %s", t->error);
                goto resume;
        }
        (void) vmm_link_take_vmm_dirty(link, scratch);
        res.pause_pages = image_capture_copy(cap, scratch->w);
        r = vmm_link_save_state(link, &state, &state_len);
        if (r < 0)
                r = FAIL(r, "SaveState failed: %s", vmm_link_last_error(link));
resume:
        /* Whatever happened, pages harvested here are not lost: they join since. */
        (void) dirtyset_merge(since, scratch);
        {
                int q = vmm_link_resume(link, o->epoch + 1);
                if (q < 0 && r >= 0)
                        r = FAIL(q, "resume failed: %s", vmm_link_last_error(link));
        }
        res.pause_ns = now_nsec() - t0;
        res.agent_pause_ns = agent_ns;
        if (r < 0)
                return r;
        if (o->resumed)
                o->resumed(o->dir, o->userdata);

        wo = (ImageWriteOptions){
                .vm_name = o->vm_name,
                .vm_uuid = o->vm_uuid,
                .state = state,
                .state_len = state_len,
                .covered = o->parent ? since->w : NULL,
                .parent = o->parent,
                .parent_id = o->parent_id,
                .compress = o->compress,
                .epoch = o->epoch,
        };
        r = image_capture_write(cap, o->dir, &wo, &res.write, err, errlen);
        if (r < 0)
                return r;
        dirtyset_clear(since);
        if (ret)
                *ret = res;
        return 0;
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * Taking checkpoint images (image/imagefile.h) of a VM this process tracks
 * through a VmmLink and a Tracker (daemon/track.h).
 *
 * The caller keeps `since`: a DirtySet over the VM's pages (dirtyset.h)
 * of the pages dirtied since the last image. Every harvest between images
 * must OR into it (tracker collect / ring-full / vmm_link_take_vmm_dirty);
 * image_take() clears it once the image is written. The first image of a
 * tracking session must be full (parent NULL): pages dirtied before tracking
 * started are in no bitmap.
 *
 * An owner with an epoch pipeline of its own (the primary) does not call
 * image_take(), which pauses the VM itself; it uses the capture calls of
 * imagefile.h at its own seal (see docs/architecture.md, "Checkpoint images").
 */

#include <stdint.h>

#include "imagefile.h"
#include "track.h"
#include "vmm-link.h"

typedef struct ImageTakeOptions {
        const char *dir;    /* must not exist */
        const char *parent; /* NULL: a full image */
        const uint8_t
                *parent_id; /* the last image taken (ImageWriteStats.image_id); see ImageWriteOptions */
        const char *vm_name;
        const uint8_t *vm_uuid; /* 16 bytes or NULL */
        bool compress;
        uint64_t epoch; /* recorded in the inventory; the VM resumes as epoch + 1 */
        /* Called once the VM runs again, before the image is written (may be NULL). */
        void (*resumed)(const char *dir, void *userdata);
        void *userdata;
} ImageTakeOptions;

typedef struct ImageTakeResult {
        ImageWriteStats write;
        int64_t precopy_pages;   /* copied while the VM ran */
        int64_t pause_pages;     /* re-dirtied pages copied in the pause */
        uint64_t pause_ns;       /* Pause sent .. Resume answered */
        uint64_t agent_pause_ns; /* the agent's own figure for stopping the vCPUs */
} ImageTakeResult;

/* The image layout of a VMM layout, and each region's RAM mapping. 0 or -EINVAL. */
int image_layout_from_vmm(const VmmLayout *vl, ImageLayout *ret, const uint8_t **ret_ram);

/*
 * Takes one image: collect + reset into `since`, pre-copy `since` (or all of
 * RAM) while the VM runs; pause; collect + reset into `scratch` (a second
 * bitmap of the same size), copy those pages, SaveState; resume; write the
 * image (covering since | scratch) and clear `since`. On failure the VM is
 * resumed if this paused it, `since` keeps every page (so a retry stores
 * them), and err says what failed. Returns 0 or -errno.
 */
int image_take(VmmLink *link, Tracker *t, DirtySet *since, DirtySet *scratch, const ImageTakeOptions *o,
               ImageTakeResult *ret, char *err, size_t errlen);

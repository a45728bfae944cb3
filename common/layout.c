/* SPDX-License-Identifier: GPL-2.0-or-later */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>

#include "layout.h"
#include "macros.h"

_printf_(4, 5) static int reject(int r, char *reason, size_t size, const char *fmt, ...)
{
        va_list ap;

        if (reason && size > 0) {
                va_start(ap, fmt);
                vsnprintf(reason, size, fmt, ap);
                va_end(ap);
        }
        return r;
}

static bool ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
        return a < b + blen && b < a + alen;
}

int ram_layout_validate(RamLayout *lay, char *reason, size_t size)
{
        uint64_t total = 0, extent = 0;

        if (lay->page_size != RAM_PAGE_SIZE)
                return reject(-EINVAL, reason, size, "page size %" PRIu32 " (only %u is supported)",
                              lay->page_size, RAM_PAGE_SIZE);
        if (lay->n_regions == 0 || lay->n_regions > RAM_MAX_REGIONS)
                return reject(-EINVAL, reason, size, "%zu memory regions (1..%u allowed)", lay->n_regions,
                              RAM_MAX_REGIONS);
        for (size_t i = 0; i < lay->n_regions; i++) {
                RamRegion *m = &lay->regions[i];

                if (m->size == 0 || m->size % RAM_PAGE_SIZE || m->guest_phys % RAM_PAGE_SIZE ||
                    m->fd_offset % RAM_PAGE_SIZE)
                        return reject(-EINVAL, reason, size,
                                      "region %zu (slot %" PRIu32
                                      ") is empty or not page aligned: guest_phys 0x%" PRIx64
                                      ", size 0x%" PRIx64 ", memfd_offset 0x%" PRIx64,
                                      i, m->slot, m->guest_phys, m->size, m->fd_offset);
                /* Bounded before any sum can overflow. */
                if (m->size > RAM_MAX_BYTES || m->fd_offset > RAM_MAX_BYTES - m->size ||
                    m->guest_phys > UINT64_MAX - m->size || total > RAM_MAX_BYTES - m->size)
                        return reject(-EFBIG, reason, size,
                                      "region %zu (slot %" PRIu32 ") exceeds the limit of %" PRIu64
                                      " GiB of RAM (size 0x%" PRIx64 ", memfd_offset 0x%" PRIx64 ")",
                                      i, m->slot, RAM_MAX_BYTES >> 30, m->size, m->fd_offset);
                for (size_t j = 0; j < i; j++) {
                        const RamRegion *o = &lay->regions[j];

                        if (o->slot == m->slot ||
                            ranges_overlap(o->guest_phys, o->size, m->guest_phys, m->size) ||
                            ranges_overlap(o->fd_offset, o->size, m->fd_offset, m->size))
                                return reject(-EINVAL, reason, size,
                                              "regions %zu and %zu (slots %" PRIu32 ", %" PRIu32
                                              ") share a slot or overlap in guest memory or in the memfd",
                                              j, i, o->slot, m->slot);
                }
                m->first_page = total / RAM_PAGE_SIZE;
                total += m->size;
                extent = MAX(extent, m->fd_offset + m->size);
        }
        lay->total_pages = total / RAM_PAGE_SIZE;
        lay->memfd_size = extent;
        return 0;
}

bool ram_layout_equal(const RamLayout *a, const RamLayout *b)
{
        if (a->page_size != b->page_size || a->n_regions != b->n_regions)
                return false;
        for (size_t i = 0; i < a->n_regions; i++)
                if (a->regions[i].slot != b->regions[i].slot ||
                    a->regions[i].guest_phys != b->regions[i].guest_phys ||
                    a->regions[i].size != b->regions[i].size ||
                    a->regions[i].fd_offset != b->regions[i].fd_offset)
                        return false;
        return true;
}

size_t ram_layout_region_of(const RamLayout *lay, uint64_t page)
{
        size_t lo = 0, hi = lay->n_regions; /* the region is the last one with first_page <= page */

        if (lay->n_regions == 0 || page >= lay->total_pages)
                return SIZE_MAX;
        while (hi - lo > 1) {
                size_t mid = (lo + hi) / 2;
                if (lay->regions[mid].first_page <= page)
                        lo = mid;
                else
                        hi = mid;
        }
        return lo;
}

uint64_t ram_layout_page_offset(const RamLayout *lay, uint64_t page)
{
        size_t i = ram_layout_region_of(lay, page);

        if (i == SIZE_MAX)
                return UINT64_MAX;
        return lay->regions[i].fd_offset + (page - lay->regions[i].first_page) * RAM_PAGE_SIZE;
}

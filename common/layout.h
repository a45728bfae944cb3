/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * A VM's guest RAM layout, the one type the VMM link (daemon/vmm-link.c),
 * the standby (daemon/standby.c) and checkpoint images (image/) share, and
 * its one validator.
 *
 * Guest RAM lives in one memfd: region i covers guest physical addresses
 * [guest_phys, guest_phys + size) and the memfd's bytes [fd_offset,
 * fd_offset + size). Pages are numbered VM-wide: the regions concatenated in
 * layout order (region i's first page is the sum of the sizes before it).
 *
 * Every layout comes from a peer that is not trusted (the VMM's agent, the
 * primary's Hello, an image file): ram_layout_validate() is the only way a
 * layout gets its derived fields, and checks what all three rely on.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define RAM_PAGE_SIZE   4096U
#define RAM_MAX_REGIONS 32U
#define RAM_MAX_BYTES   (UINT64_C(1) << 40) /* 1 TiB: total guest RAM, and the memfd's extent */

typedef struct RamRegion {
        uint32_t slot; /* the KVM memory slot */
        uint64_t guest_phys;
        uint64_t size;
        uint64_t fd_offset;  /* in the RAM memfd */
        uint64_t first_page; /* derived: VM-wide number of its first page */
} RamRegion;

typedef struct RamLayout {
        uint32_t page_size; /* RAM_PAGE_SIZE */
        RamRegion regions[RAM_MAX_REGIONS];
        size_t n_regions;
        uint64_t total_pages; /* derived: the regions' pages together */
        uint64_t memfd_size;  /* derived: max(fd_offset + size), the memfd the layout needs */
} RamLayout;

/*
 * Checks the page size, the region count, each region (not empty, page
 * aligned, within RAM_MAX_BYTES, no address wrap-around) and every pair (no
 * shared slot, no overlap in guest memory or in the memfd), then sets the
 * derived fields. 0, or -EINVAL (-EFBIG for a size beyond the limits) with
 * reason naming the region and the problem (reason may be NULL).
 */
int ram_layout_validate(RamLayout *lay, char *reason, size_t reason_size);

/* Same regions in the same order (the derived fields follow from them). */
bool ram_layout_equal(const RamLayout *a, const RamLayout *b);

/* Index of the region holding VM-wide page `page` (< total_pages of a validated layout); SIZE_MAX beyond. */
size_t ram_layout_region_of(const RamLayout *lay, uint64_t page);

/* Offset in the memfd of VM-wide page `page`; UINT64_MAX when page >= total_pages. */
uint64_t ram_layout_page_offset(const RamLayout *lay, uint64_t page);

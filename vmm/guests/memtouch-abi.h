/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * What the memtouch guest leaves in RAM, shared by the guest (freestanding)
 * and the host checker (memcheck.c). All fields little-endian (x86 guest).
 *
 * Per CPU and generation g (1, 2, 3, ...; per CPU), the guest does, in
 * program order:
 *   1. inflight_page = p; inflight_gen = g
 *   2. page p: u64[0] = g, u64[1..510] = memtouch_word(gpa, g, i), u64[511] = g
 *   3. index[p] = g
 *   4. committed = g
 * So in any snapshot taken while the vCPUs are stopped between instructions,
 * every page except possibly the in-flight one (when inflight_gen >
 * committed) is whole, with header == trailer == index[p] <= committed.
 * A page never written is all zero with index 0.
 */

#include <stdint.h>

#define MEMTOUCH_DESC_GPA   0x1000000ULL /* GUEST_WORK_BASE */
#define MEMTOUCH_MAGIC      "MEMTOUCH"
#define MEMTOUCH_VERSION    1
#define MEMTOUCH_MAX_CPUS   32
#define MEMTOUCH_PAGE_SIZE  4096
#define MEMTOUCH_PAGE_WORDS (MEMTOUCH_PAGE_SIZE / 8)

struct memtouch_cpu {
        uint64_t data_base;     /* guest-physical, page aligned */
        uint64_t data_pages;    /* 0: this CPU never started */
        uint64_t index_base;    /* guest-physical, u64[data_pages] */
        uint64_t committed;     /* last generation fully written */
        uint64_t inflight_page; /* page being written (index into data) */
        uint64_t inflight_gen;  /* generation being written */
        uint64_t reserved[2];
};

struct memtouch_desc {
        char magic[8]; /* "MEMTOUCH", written last at start-up */
        uint32_t version;
        uint32_t ncpus;
        uint64_t page_size;
        uint64_t reserved[5];
        struct memtouch_cpu cpu[MEMTOUCH_MAX_CPUS];
};

_Static_assert(sizeof(struct memtouch_cpu) == 64, "memtouch_cpu layout");
_Static_assert(sizeof(struct memtouch_desc) == 64 + 64 * MEMTOUCH_MAX_CPUS, "memtouch_desc layout");
_Static_assert(sizeof(struct memtouch_desc) <= MEMTOUCH_PAGE_SIZE, "descriptor fits a page");

/* Body word i (1..510) of the page at guest-physical gpa for generation gen. */
static inline uint64_t memtouch_word(uint64_t gpa, uint64_t gen, unsigned i)
{
        if (gen == 0)
                return 0;
        return (gen * 0x9E3779B97F4A7C15ULL) ^ (gpa + 8ULL * i) ^ ((uint64_t) i << 52);
}

/* Step 2 above, in order: header, body, trailer. */
static inline void memtouch_fill(volatile uint64_t *page, uint64_t gpa, uint64_t gen)
{
        page[0] = gen;
        for (unsigned i = 1; i < MEMTOUCH_PAGE_WORDS - 1; i++)
                page[i] = memtouch_word(gpa, gen, i);
        page[MEMTOUCH_PAGE_WORDS - 1] = gen;
}

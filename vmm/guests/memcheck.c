/* SPDX-License-Identifier: GPL-2.0-or-later */
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "memcheck.h"

static int fail(int r, char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int fail(int r, char *err, size_t errlen, const char *fmt, ...)
{
        va_list ap;

        if (errlen > 0) {
                va_start(ap, fmt);
                vsnprintf(err, errlen, fmt, ap);
                va_end(ap);
        }
        return r;
}

/* Is [gpa, gpa + len) inside the image? Overflow-safe. */
static bool in_image(uint64_t gpa, uint64_t len, uint64_t ram_size)
{
        return gpa <= ram_size && len <= ram_size - gpa;
}

static uint64_t load64(const uint8_t *ram, uint64_t gpa)
{
        uint64_t v;
        memcpy(&v, ram + gpa, sizeof(v)); /* the image need not be aligned */
        return v;
}

/* Returns the first body word that differs from generation gen, or -1. */
static int page_mismatch(const uint8_t *ram, uint64_t gpa, uint64_t gen)
{
        for (unsigned i = 1; i < MEMTOUCH_PAGE_WORDS - 1; i++)
                if (load64(ram, gpa + 8ULL * i) != memtouch_word(gpa, gen, i))
                        return (int) i;
        return -1;
}

static int check_cpu(const uint8_t *ram, uint64_t ram_size, unsigned c, const struct memtouch_cpu *mc,
                     MemtouchCheck *res, char *err, size_t errlen)
{
        uint64_t pages = mc->data_pages, committed = mc->committed;
        bool torn_ok = mc->inflight_gen > committed && mc->inflight_page < pages;
        bool committed_seen = committed == 0;

        if (pages == 0)
                return 0;
        if (mc->data_base % MEMTOUCH_PAGE_SIZE != 0 || pages > ram_size / MEMTOUCH_PAGE_SIZE ||
            !in_image(mc->data_base, pages * MEMTOUCH_PAGE_SIZE, ram_size))
                return fail(-EINVAL, err, errlen,
                            "cpu %u: data area 0x%llx + %llu pages is outside the %llu-byte image", c,
                            (unsigned long long) mc->data_base, (unsigned long long) pages,
                            (unsigned long long) ram_size);
        if (!in_image(mc->index_base, pages * 8, ram_size))
                return fail(-EINVAL, err, errlen, "cpu %u: index 0x%llx + %llu entries is outside the image",
                            c, (unsigned long long) mc->index_base, (unsigned long long) pages);

        for (uint64_t p = 0; p < pages; p++) {
                uint64_t gpa = mc->data_base + p * MEMTOUCH_PAGE_SIZE;
                uint64_t ix = load64(ram, mc->index_base + 8 * p);
                uint64_t head = load64(ram, gpa);
                uint64_t tail = load64(ram, gpa + MEMTOUCH_PAGE_SIZE - 8);

                if (torn_ok && p == mc->inflight_page) {
                        /* Being rewritten: any content; the index is the old
                         * generation or, after step 3, the in-flight one. */
                        if (ix > committed && ix != mc->inflight_gen)
                                return fail(-EBADMSG, err, errlen,
                                            "cpu %u page %llu (gpa 0x%llx): in-flight page has index %llu, "
                                            "committed %llu, in-flight gen %llu",
                                            c, (unsigned long long) p, (unsigned long long) gpa,
                                            (unsigned long long) ix, (unsigned long long) committed,
                                            (unsigned long long) mc->inflight_gen);
                        if (ix == committed || ix == mc->inflight_gen)
                                committed_seen = true;
                        res->pages_torn++;
                        continue;
                }
                if (ix > committed)
                        return fail(
                                -EBADMSG, err, errlen,
                                "cpu %u page %llu (gpa 0x%llx): index %llu is newer than committed gen %llu",
                                c, (unsigned long long) p, (unsigned long long) gpa, (unsigned long long) ix,
                                (unsigned long long) committed);
                if (head != ix || tail != ix)
                        return fail(
                                -EBADMSG, err, errlen,
                                "cpu %u page %llu (gpa 0x%llx): header %llu trailer %llu, index says %llu "
                                "(committed %llu)",
                                c, (unsigned long long) p, (unsigned long long) gpa,
                                (unsigned long long) head, (unsigned long long) tail,
                                (unsigned long long) ix, (unsigned long long) committed);
                int w = page_mismatch(ram, gpa, ix);
                if (w >= 0)
                        return fail(-EBADMSG, err, errlen,
                                    "cpu %u page %llu (gpa 0x%llx): body word %d is 0x%llx, expected 0x%llx "
                                    "for gen %llu",
                                    c, (unsigned long long) p, (unsigned long long) gpa, w,
                                    (unsigned long long) load64(ram, gpa + 8ULL * (unsigned) w),
                                    (unsigned long long) memtouch_word(gpa, ix, (unsigned) w),
                                    (unsigned long long) ix);
                if (ix == committed)
                        committed_seen = true;
                res->pages_checked++;
        }
        /* Generation `committed` went to some page whose index then said so;
         * only a later write (the in-flight one) can have replaced it. */
        if (!committed_seen)
                return fail(-EBADMSG, err, errlen,
                            "cpu %u: no page holds committed gen %llu (stale index or data)", c,
                            (unsigned long long) committed);
        return 0;
}

int memtouch_check(const void *ram_v, uint64_t ram_size, MemtouchCheck *ret, char *err, size_t errlen)
{
        const uint8_t *ram = ram_v;
        struct memtouch_desc d;
        MemtouchCheck res = {};
        int r;

        if (errlen > 0)
                err[0] = 0;
        if (!ram || !in_image(MEMTOUCH_DESC_GPA, sizeof(d), ram_size))
                return fail(-EINVAL, err, errlen,
                            "image of %llu bytes is too small for the memtouch descriptor at 0x%llx",
                            (unsigned long long) ram_size, (unsigned long long) MEMTOUCH_DESC_GPA);
        /* One copy: the checks below and the walk then use the same values. */
        memcpy(&d, ram + MEMTOUCH_DESC_GPA, sizeof(d));
        if (memcmp(d.magic, MEMTOUCH_MAGIC, sizeof(d.magic)) != 0)
                return fail(-EINVAL, err, errlen, "no memtouch descriptor (magic \"MEMTOUCH\") at 0x%llx",
                            (unsigned long long) MEMTOUCH_DESC_GPA);
        if (d.version != MEMTOUCH_VERSION || d.page_size != MEMTOUCH_PAGE_SIZE)
                return fail(-EINVAL, err, errlen,
                            "memtouch descriptor version %u page size %llu, expected %u/%u", d.version,
                            (unsigned long long) d.page_size, MEMTOUCH_VERSION, MEMTOUCH_PAGE_SIZE);
        if (d.ncpus == 0 || d.ncpus > MEMTOUCH_MAX_CPUS)
                return fail(-EINVAL, err, errlen, "memtouch descriptor ncpus=%u outside 1..%u", d.ncpus,
                            MEMTOUCH_MAX_CPUS);

        res.ncpus = d.ncpus;
        for (unsigned c = 0; c < d.ncpus; c++) {
                r = check_cpu(ram, ram_size, c, &d.cpu[c], &res, err, errlen);
                if (r < 0)
                        return r;
                res.committed[c] = d.cpu[c].committed;
        }
        if (ret)
                *ret = res;
        return 0;
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Unit test of memtouch_check() on synthetic RAM images written the way the
 * memtouch guest writes them: a consistent image passes, a replica that
 * missed one dirty page fails naming it, a torn in-flight page passes, and
 * garbage or short images give a clean error.
 */
#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "memcheck.h"

#define RAM_SIZE   (24u << 20)
#define DATA_BASE  0x1200000ULL
#define INDEX_BASE 0x1001000ULL
#define PAGES      256 /* per CPU */
#define NCPUS      2

static int failures;

#define CHECK(cond, ...)                                                                                    \
        do {                                                                                                \
                if (!(cond)) {                                                                              \
                        fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                                \
                        fprintf(stderr, __VA_ARGS__);                                                       \
                        fputc('\n', stderr);                                                                \
                        failures++;                                                                         \
                }                                                                                           \
        } while (0)

static struct memtouch_desc *desc(uint8_t *ram)
{
        return (struct memtouch_desc *) (ram + MEMTOUCH_DESC_GPA);
}

static uint8_t *image_new(void)
{
        uint8_t *ram = calloc(1, RAM_SIZE);
        assert(ram);
        struct memtouch_desc *d = desc(ram);
        d->version = MEMTOUCH_VERSION;
        d->ncpus = NCPUS;
        d->page_size = MEMTOUCH_PAGE_SIZE;
        for (unsigned c = 0; c < NCPUS; c++) {
                d->cpu[c].data_base = DATA_BASE + (uint64_t) c * PAGES * MEMTOUCH_PAGE_SIZE;
                d->cpu[c].index_base = INDEX_BASE + (uint64_t) c * PAGES * 8;
                d->cpu[c].data_pages = PAGES;
        }
        memcpy(d->magic, MEMTOUCH_MAGIC, 8);
        return ram;
}

static uint64_t *index_of(uint8_t *ram, unsigned c)
{
        return (uint64_t *) (ram + desc(ram)->cpu[c].index_base);
}

static uint64_t page_gpa(uint8_t *ram, unsigned c, uint64_t p)
{
        return desc(ram)->cpu[c].data_base + p * MEMTOUCH_PAGE_SIZE;
}

/* The guest's four steps for one generation; `steps` < 4 stops early. */
static void write_gen(uint8_t *ram, unsigned c, uint64_t p, unsigned steps)
{
        struct memtouch_cpu *mc = &desc(ram)->cpu[c];
        uint64_t gen = mc->committed + 1, gpa = page_gpa(ram, c, p);

        mc->inflight_page = p;
        mc->inflight_gen = gen;
        if (steps >= 2)
                memtouch_fill((volatile uint64_t *) (ram + gpa), gpa, gen);
        else if (steps == 1) /* torn: header and half the body */
                for (unsigned i = 0; i < MEMTOUCH_PAGE_WORDS / 2; i++)
                        ((uint64_t *) (ram + gpa))[i] = i ? memtouch_word(gpa, gen, i) : gen;
        if (steps >= 3)
                index_of(ram, c)[p] = gen;
        if (steps >= 4)
                mc->committed = gen;
}

static void run_gens(uint8_t *ram, unsigned n, uint64_t seed)
{
        for (unsigned i = 0; i < n; i++) {
                seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
                write_gen(ram, i % NCPUS, (seed >> 33) % PAGES, 4);
        }
}

static int check(uint8_t *ram, uint64_t size, MemtouchCheck *res, char *err, size_t errlen)
{
        return memtouch_check(ram, size, res, err, errlen);
}

static void test_consistent(void)
{
        uint8_t *ram = image_new();
        MemtouchCheck res;
        char err[512];

        CHECK(check(ram, RAM_SIZE, &res, err, sizeof(err)) == 0, "fresh image: %s", err);
        run_gens(ram, 3000, 1);
        int r = check(ram, RAM_SIZE, &res, err, sizeof(err));
        CHECK(r == 0, "consistent image rejected: %d %s", r, err);
        CHECK(res.ncpus == NCPUS && res.committed[0] == 1500 && res.committed[1] == 1500, "gens %llu,%llu",
              (unsigned long long) res.committed[0], (unsigned long long) res.committed[1]);
        CHECK(res.pages_checked == NCPUS * PAGES, "pages_checked %llu",
              (unsigned long long) res.pages_checked);
        free(ram);
}

/* A replica that missed the last write of one dirty page: data page, index
 * page or descriptor page copied from an older snapshot. */
static void test_stale_page(void)
{
        uint8_t *old = image_new(), *cur;
        char err[512];
        int r;

        run_gens(old, 2000, 2);
        cur = malloc(RAM_SIZE);
        assert(cur);
        memcpy(cur, old, RAM_SIZE);
        write_gen(cur, 1, 17, 4); /* cpu 1 page 17 is now dirty */
        write_gen(cur, 1, 42, 4);
        CHECK(check(cur, RAM_SIZE, NULL, err, sizeof(err)) == 0, "%s", err);

        /* stale data page */
        uint8_t *bad = malloc(RAM_SIZE);
        assert(bad);
        memcpy(bad, cur, RAM_SIZE);
        uint64_t gpa = page_gpa(cur, 1, 17);
        memcpy(bad + gpa, old + gpa, MEMTOUCH_PAGE_SIZE);
        r = check(bad, RAM_SIZE, NULL, err, sizeof(err));
        CHECK(r == -EBADMSG, "stale data page accepted (%d)", r);
        CHECK(strstr(err, "cpu 1 page 17 ") != NULL, "error does not name the page: %s", err);
        printf("stale data page: %s\n", err);

        /* stale index page (the page holding index[42] of cpu 1) */
        memcpy(bad, cur, RAM_SIZE);
        uint64_t ipage = (desc(cur)->cpu[1].index_base + 42 * 8) & ~4095ULL;
        memcpy(bad + ipage, old + ipage, MEMTOUCH_PAGE_SIZE);
        r = check(bad, RAM_SIZE, NULL, err, sizeof(err));
        CHECK(r == -EBADMSG, "stale index page accepted (%d)", r);
        printf("stale index page: %s\n", err);

        /* stale descriptor page */
        memcpy(bad, cur, RAM_SIZE);
        memcpy(bad + MEMTOUCH_DESC_GPA, old + MEMTOUCH_DESC_GPA, MEMTOUCH_PAGE_SIZE);
        r = check(bad, RAM_SIZE, NULL, err, sizeof(err));
        CHECK(r == -EBADMSG, "stale descriptor page accepted (%d)", r);
        printf("stale descriptor: %s\n", err);

        /* one flipped body byte */
        memcpy(bad, cur, RAM_SIZE);
        bad[page_gpa(cur, 0, 3) + 1000] ^= 1;
        if (index_of(cur, 0)[3] != 0) {
                r = check(bad, RAM_SIZE, NULL, err, sizeof(err));
                CHECK(r == -EBADMSG, "flipped byte accepted (%d)", r);
        }
        free(bad);
        free(cur);
        free(old);
}

static void test_torn_inflight(void)
{
        uint8_t *ram = image_new();
        char err[512];
        MemtouchCheck res;
        int r;

        run_gens(ram, 500, 3);
        for (unsigned steps = 0; steps < 4; steps++) {
                uint8_t *img = malloc(RAM_SIZE);
                assert(img);
                memcpy(img, ram, RAM_SIZE);
                write_gen(img, 0, 9, steps); /* stopped after `steps` steps */
                r = check(img, RAM_SIZE, &res, err, sizeof(err));
                CHECK(r == 0, "snapshot after step %u rejected: %s", steps, err);
                /* The same torn page on a page that is NOT in flight must fail. */
                if (steps == 1) {
                        desc(img)->cpu[0].inflight_page = 10;
                        r = check(img, RAM_SIZE, NULL, err, sizeof(err));
                        CHECK(r == -EBADMSG, "torn page accepted while not in flight (%d)", r);
                        desc(img)->cpu[0].inflight_page = 9;
                        desc(img)->cpu[0].inflight_gen = desc(img)->cpu[0].committed;
                        r = check(img, RAM_SIZE, NULL, err, sizeof(err));
                        CHECK(r == -EBADMSG, "torn page accepted with in-flight gen <= committed (%d)", r);
                }
                free(img);
        }
        /* rewriting the page that holds the committed generation */
        uint8_t *img = malloc(RAM_SIZE);
        assert(img);
        memcpy(img, ram, RAM_SIZE);
        write_gen(img, 1, 5, 4);
        write_gen(img, 1, 5, 3);
        r = check(img, RAM_SIZE, NULL, err, sizeof(err));
        CHECK(r == 0, "rewrite of the committed page rejected: %s", err);
        free(img);
        free(ram);
}

static void test_garbage(void)
{
        char err[512];
        int r;

        r = memtouch_check(NULL, 0, NULL, err, sizeof(err));
        CHECK(r == -EINVAL && err[0], "NULL image: %d", r);
        uint8_t small[4096] = {};
        r = memtouch_check(small, sizeof(small), NULL, err, sizeof(err));
        CHECK(r == -EINVAL && strstr(err, "too small"), "short image: %d %s", r, err);
        printf("short image: %s\n", err);

        uint8_t *ram = image_new();
        /* image cut just after the descriptor: data areas out of range */
        r = memtouch_check(ram, MEMTOUCH_DESC_GPA + 4096, NULL, err, sizeof(err));
        CHECK(r == -EINVAL, "truncated image: %d %s", r, err);
        printf("truncated image: %s\n", err);

        desc(ram)->magic[0] = 'X';
        r = memtouch_check(ram, RAM_SIZE, NULL, err, sizeof(err));
        CHECK(r == -EINVAL && strstr(err, "MEMTOUCH"), "bad magic: %d %s", r, err);
        desc(ram)->magic[0] = 'M';

        desc(ram)->ncpus = 1000;
        r = memtouch_check(ram, RAM_SIZE, NULL, err, sizeof(err));
        CHECK(r == -EINVAL, "ncpus=1000: %d", r);
        desc(ram)->ncpus = NCPUS;

        struct memtouch_cpu *mc = &desc(ram)->cpu[1];
        uint64_t saved = mc->data_pages;
        mc->data_pages = UINT64_MAX / 2; /* overflow bait */
        r = memtouch_check(ram, RAM_SIZE, NULL, err, sizeof(err));
        CHECK(r == -EINVAL, "huge data_pages: %d", r);
        mc->data_pages = saved;
        mc->index_base = UINT64_MAX - 8;
        r = memtouch_check(ram, RAM_SIZE, NULL, err, sizeof(err));
        CHECK(r == -EINVAL, "index_base near 2^64: %d", r);
        mc->index_base = INDEX_BASE + PAGES * 8;
        mc->data_base = DATA_BASE + 1;
        r = memtouch_check(ram, RAM_SIZE, NULL, err, sizeof(err));
        CHECK(r == -EINVAL, "unaligned data_base: %d", r);

        /* random garbage everywhere: must not crash, must not say ok */
        srand(7);
        for (unsigned i = 0; i < RAM_SIZE; i++)
                ram[i] = (uint8_t) rand();
        r = memtouch_check(ram, RAM_SIZE, NULL, err, sizeof(err));
        CHECK(r < 0, "garbage accepted");
        memcpy(desc(ram)->magic, MEMTOUCH_MAGIC, 8);
        desc(ram)->version = MEMTOUCH_VERSION;
        desc(ram)->page_size = MEMTOUCH_PAGE_SIZE;
        desc(ram)->ncpus = 3;
        r = memtouch_check(ram, RAM_SIZE, NULL, err, sizeof(err));
        CHECK(r < 0, "garbage with a valid header accepted");

        /* zero-length error buffer is allowed */
        r = memtouch_check(ram, 10, NULL, NULL, 0);
        CHECK(r == -EINVAL, "errlen 0: %d", r);
        free(ram);
}

int main(void)
{
        test_consistent();
        test_stale_page();
        test_torn_inflight();
        test_garbage();
        if (failures) {
                fprintf(stderr, "%d check(s) failed\n", failures);
                return 1;
        }
        printf("memcheck unit tests passed\n");
        return 0;
}

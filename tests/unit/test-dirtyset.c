/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * DirtySet (daemon/dirtyset.h) against a plain reference bitmap: random adds,
 * deletes, word takes, merges, moves and clears, checking after each step the
 * exact count, the members, the summary invariant (a non-empty word always
 * has its summary bit) and that a walk with dirtyset_next_word() visits
 * exactly the non-empty words in order.
 */
#include <stdlib.h>

#include "dirtyset.h"
#include "tests.h"

static uint64_t rnd_state = 0x9e3779b97f4a7c15ULL;

static uint64_t rnd(void)
{
        /* xorshift64*: reproducible across runs. */
        rnd_state ^= rnd_state >> 12;
        rnd_state ^= rnd_state << 25;
        rnd_state ^= rnd_state >> 27;
        return rnd_state * 2685821657736338717ULL;
}

static void check(DirtySet *s, const uint8_t *ref)
{
        uint64_t n = 0, expect_k = 0;

        for (uint64_t p = 0; p < s->pages; p++) {
                ASSERT_EQ(dirtyset_test(s, p), ref[p]);
                n += ref[p];
        }
        ASSERT_EQ(s->n, n);
        ASSERT_EQ(dirtyset_count_slow(s), n);
        for (uint64_t k = 0; k < s->words; k++)
                if (s->w[k])
                        ASSERT_TRUE(s->sum[k / 64] & (1ULL << (k % 64)));
        /* The walk visits exactly the non-empty words, in order. */
        for (uint64_t k = dirtyset_next_word(s, 0); k < s->words; k = dirtyset_next_word(s, k + 1)) {
                while (expect_k < s->words && !s->w[expect_k])
                        expect_k++;
                ASSERT_EQ(k, expect_k);
                expect_k++;
        }
        while (expect_k < s->words && !s->w[expect_k])
                expect_k++;
        ASSERT_EQ(expect_k, s->words);
}

TEST(random_ops)
{
        /* Not a multiple of 64 nor of 64*64: the tail words and summary bits are exercised. */
        const uint64_t pages[] = {1, 63, 64, 65, 4095, 4096, 4097, 70001};

        for (size_t c = 0; c < sizeof(pages) / sizeof(pages[0]); c++) {
                uint64_t P = pages[c];
                DirtySet a, b;
                uint8_t *ra = calloc(P, 1), *rb = calloc(P, 1);

                ASSERT_TRUE(ra && rb);
                ASSERT_OK(dirtyset_init(&a, P));
                ASSERT_OK(dirtyset_init(&b, P));
                for (unsigned step = 0; step < 400; step++) {
                        unsigned op = (unsigned) (rnd() % 100);

                        if (op < 50) {
                                unsigned burst = (unsigned) (rnd() % 50) + 1;
                                for (unsigned i = 0; i < burst; i++) {
                                        uint64_t p = rnd() % P;
                                        bool fresh = !ra[p];
                                        ASSERT_EQ(dirtyset_add(&a, p), fresh);
                                        ra[p] = 1;
                                        p = rnd() % P;
                                        (void) dirtyset_add(&b, p);
                                        rb[p] = 1;
                                }
                        } else if (op < 70) {
                                uint64_t p = rnd() % P;
                                dirtyset_del(&a, p);
                                ra[p] = 0;
                        } else if (op < 78) {
                                uint64_t k = rnd() % a.words, v = dirtyset_take_word(&a, k), expect = 0;
                                for (uint64_t i = 0; i < 64 && k * 64 + i < P; i++) {
                                        expect |= (uint64_t) ra[k * 64 + i] << i;
                                        ra[k * 64 + i] = 0;
                                }
                                ASSERT_EQ(v, expect);
                        } else if (op < 86) {
                                uint64_t added = dirtyset_merge(&a, &b), expect = 0;
                                for (uint64_t p = 0; p < P; p++)
                                        if (rb[p] && !ra[p]) {
                                                ra[p] = 1;
                                                expect++;
                                        }
                                ASSERT_EQ(added, expect);
                                check(&b, rb);
                        } else if (op < 92) {
                                uint64_t added = dirtyset_move(&b, &a), expect = 0;
                                for (uint64_t p = 0; p < P; p++) {
                                        if (ra[p] && !rb[p]) {
                                                rb[p] = 1;
                                                expect++;
                                        }
                                        ra[p] = 0;
                                }
                                ASSERT_EQ(added, expect);
                                check(&b, rb);
                        } else {
                                dirtyset_clear(&a);
                                memset(ra, 0, P);
                        }
                        check(&a, ra);
                }
                dirtyset_done(&a);
                dirtyset_done(&b);
                free(ra);
                free(rb);
        }
}

TEST(clear_after_deletes)
{
        /* Summary bits linger after deletes; clear() and a walk still leave nothing. */
        DirtySet *s = dirtyset_new(1 << 20);

        ASSERT_TRUE(s);
        for (uint64_t p = 0; p < (1 << 20); p += 4099)
                ASSERT_TRUE(dirtyset_add(s, p));
        for (uint64_t p = 0; p < (1 << 20); p += 4099)
                dirtyset_del(s, p);
        ASSERT_EQ(s->n, 0);
        ASSERT_EQ(dirtyset_next_word(s, 0), s->words);
        for (uint64_t j = 0; j < s->sum_words; j++)
                ASSERT_EQ(s->sum[j], 0); /* the walk cleaned the hints */
        ASSERT_TRUE(dirtyset_add(s, 12345));
        dirtyset_clear(s);
        ASSERT_EQ(s->n, 0);
        ASSERT_EQ(dirtyset_count_slow(s), 0);
        dirtyset_free(s);
}

int main(void)
{
        return tests_run();
}

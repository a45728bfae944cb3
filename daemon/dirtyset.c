/* SPDX-License-Identifier: GPL-2.0-or-later */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "dirtyset.h"
#include "macros.h"

int dirtyset_init(DirtySet *s, uint64_t pages)
{
        *s = (DirtySet){
                .pages = pages,
                .words = DIV_ROUND_UP(pages, 64),
        };
        s->sum_words = DIV_ROUND_UP(MAX(s->words, 1u), 64);
        s->w = calloc(MAX(s->words, 1u), sizeof(uint64_t));
        s->sum = calloc(s->sum_words, sizeof(uint64_t));
        if (!s->w || !s->sum) {
                dirtyset_done(s);
                return -ENOMEM;
        }
        return 0;
}

void dirtyset_done(DirtySet *s)
{
        free(s->w);
        free(s->sum);
        *s = (DirtySet){};
}

DirtySet *dirtyset_new(uint64_t pages)
{
        DirtySet *s = malloc(sizeof(*s));

        if (s && dirtyset_init(s, pages) < 0) {
                free(s);
                return NULL;
        }
        return s;
}

DirtySet *dirtyset_free(DirtySet *s)
{
        if (s) {
                dirtyset_done(s);
                free(s);
        }
        return NULL;
}

uint64_t dirtyset_next_word(DirtySet *s, uint64_t k)
{
        while (k < s->words) {
                uint64_t j = k / 64, m = s->sum[j] & (~0ULL << (k % 64));

                while (m) {
                        uint64_t w = j * 64 + (uint64_t) __builtin_ctzll(m);

                        if (s->w[w])
                                return w;
                        s->sum[j] &= ~(1ULL << (w % 64)); /* emptied by dirtyset_del() */
                        m &= m - 1;
                }
                k = (j + 1) * 64;
        }
        return s->words;
}

void dirtyset_clear(DirtySet *s)
{
        if (s->n == 0) {
                /* Words may be empty while summary bits linger: drop those without a walk. */
                memset(s->sum, 0, s->sum_words * sizeof(uint64_t));
                return;
        }
        for (uint64_t j = 0; j < s->sum_words; j++) {
                for (uint64_t m = s->sum[j]; m; m &= m - 1)
                        s->w[j * 64 + (uint64_t) __builtin_ctzll(m)] = 0;
                s->sum[j] = 0;
        }
        s->n = 0;
}

uint64_t dirtyset_merge(DirtySet *dst, DirtySet *src)
{
        uint64_t added = 0;

        if (src->n == 0)
                return 0;
        for (uint64_t k = dirtyset_next_word(src, 0); k < src->words; k = dirtyset_next_word(src, k + 1))
                added += dirtyset_add_word(dst, k, src->w[k]);
        return added;
}

uint64_t dirtyset_move(DirtySet *dst, DirtySet *src)
{
        uint64_t added = dirtyset_merge(dst, src);

        dirtyset_clear(src);
        return added;
}

uint64_t dirtyset_count_slow(const DirtySet *s)
{
        uint64_t n = 0;

        for (uint64_t k = 0; k < s->words; k++)
                n += (uint64_t) __builtin_popcountll(s->w[k]);
        return n;
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * A set of guest pages (VM-wide page numbers) whose cost follows the number
 * of pages in it, not the size of guest RAM.
 *
 * Level 0 is a plain bitmap, one bit per page. Level 1 ("summary") has one
 * bit per 64-bit word of level 0: set whenever that word got a bit. A summary
 * bit may stay set after its word was emptied by dirtyset_del() (it is a
 * hint, cleaned up lazily by the next walk), but a word with a bit set always
 * has its summary bit set. Walking, merging and clearing a set visit only
 * summary words and the words they name: for a 16 GiB guest (4 Mi pages)
 * that is 1 Ki summary words instead of 64 Ki bitmap words, which is what
 * keeps ring-mode epochs independent of RAM size (the ring collect itself
 * touches only ring entries).
 *
 * Not thread-safe: one owner at a time.
 */

#include <stdbool.h>
#include <stdint.h>

#include "macros.h"

typedef struct DirtySet {
        uint64_t *w;    /* level 0: one bit per page */
        uint64_t *sum;  /* level 1: one bit per word of w */
        uint64_t pages; /* capacity */
        uint64_t words; /* of w */
        uint64_t sum_words;
        uint64_t n; /* pages in the set (exact) */
} DirtySet;

int dirtyset_init(DirtySet *s, uint64_t pages);
void dirtyset_done(DirtySet *s);
/* Heap variants: NULL on -ENOMEM. */
DirtySet *dirtyset_new(uint64_t pages);
DirtySet *dirtyset_free(DirtySet *s);
DEFINE_TRIVIAL_CLEANUP_FUNC(DirtySet *, dirtyset_free);

static inline bool dirtyset_test(const DirtySet *s, uint64_t page)
{
        return s->w[page / 64] & (1ULL << (page % 64));
}

/* Adds page (< s->pages). Returns true when it was not in the set. */
static inline bool dirtyset_add(DirtySet *s, uint64_t page)
{
        uint64_t k = page / 64, bit = 1ULL << (page % 64);

        if (s->w[k] & bit)
                return false;
        s->w[k] |= bit;
        s->sum[k / 64] |= 1ULL << (k % 64);
        s->n++;
        return true;
}

/* Adds the pages of word k given as bits (bit b = page k*64+b). Returns how many were new. */
static inline uint64_t dirtyset_add_word(DirtySet *s, uint64_t k, uint64_t bits)
{
        uint64_t added = bits & ~s->w[k];

        if (!added)
                return 0;
        s->w[k] |= added;
        s->sum[k / 64] |= 1ULL << (k % 64);
        s->n += (uint64_t) __builtin_popcountll(added);
        return (uint64_t) __builtin_popcountll(added);
}

/* Removes page if present. The summary bit is left for the next walk to clean. */
static inline void dirtyset_del(DirtySet *s, uint64_t page)
{
        uint64_t k = page / 64, bit = 1ULL << (page % 64);

        if (s->w[k] & bit) {
                s->w[k] &= ~bit;
                s->n--;
        }
}

/* Returns word k and empties it (its summary bit lingers until the next walk). */
static inline uint64_t dirtyset_take_word(DirtySet *s, uint64_t k)
{
        uint64_t v = s->w[k];

        s->w[k] = 0;
        s->n -= (uint64_t) __builtin_popcountll(v);
        return v;
}

/*
 * The first word index >= k whose word is non-zero, or s->words when there is
 * none. Clears summary bits of words found empty on the way. Use as
 *   for (k = dirtyset_next_word(s, 0); k < s->words; k = dirtyset_next_word(s, k + 1))
 *           ... s->w[k] ...
 */
uint64_t dirtyset_next_word(DirtySet *s, uint64_t k);

/* Empties the set: touches only the words the summary names. */
void dirtyset_clear(DirtySet *s);

/* dst |= src. Returns the number of pages new to dst. Sets must have the same capacity. */
uint64_t dirtyset_merge(DirtySet *dst, DirtySet *src);

/* dst |= src, then src is emptied. Returns the number of pages new to dst. */
uint64_t dirtyset_move(DirtySet *dst, DirtySet *src);

/* Recounts n from level 0 (O(RAM); for checks and tests). */
uint64_t dirtyset_count_slow(const DirtySet *s);

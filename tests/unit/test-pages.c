/* SPDX-License-Identifier: GPL-2.0-or-later */
#include <errno.h>

#include "frame.h"
#include "macros.h"
#include "pages.h"
#include "tests.h"

typedef struct Sink {
        uint64_t pages[64];
        uint8_t data[64][PAGE_BYTES];
        bool zero[64];
        unsigned n;
} Sink;

static int sink_fn(void *userdata, uint64_t page, const uint8_t *data)
{
        Sink *s = userdata;
        if (s->n >= 64)
                return -E2BIG;
        s->pages[s->n] = page;
        s->zero[s->n] = !data;
        if (data)
                memcpy(s->data[s->n], data, PAGE_BYTES);
        s->n++;
        return 0;
}

static int count_fn(void *userdata, uint64_t page, const uint8_t *data)
{
        return data ? 0 : -EINVAL; /* no zero pages were sent */
}

static uint8_t pages_in[4][PAGE_BYTES];
static uint8_t buf[PAGE_BATCH_HEADER + 8 * PAGE_RECORD_MAX];
static Sink sink;

static size_t build(bool compress, PageBatchStats *st)
{
        PageBatch b;
        uint32_t x = 7;

        memset(pages_in, 0, sizeof(pages_in));
        for (size_t i = 0; i < 64; i++) /* page 1: mostly zero, compressible */
                pages_in[1][i * 64] = (uint8_t) i;
        for (size_t i = 0; i < PAGE_BYTES; i++) { /* page 2: random, incompressible */
                x = x * 1664525u + 1013904223u;
                pages_in[2][i] = (uint8_t) (x >> 24);
        }
        memset(pages_in[3], 0xAB, PAGE_BYTES); /* page 3: trivially compressible */
        ASSERT_OK(page_batch_init(&b, 42, buf, sizeof(buf), 16, compress, st));
        for (int i = 0; i < 4; i++)
                ASSERT_OK(page_batch_add(&b, 100 + i, pages_in[i]));
        ASSERT_OK(page_batch_add_zero(&b, 7));
        return page_batch_finish(&b);
}

TEST(pages_roundtrip)
{
        for (int compress = 0; compress <= 1; compress++) {
                PageBatchStats st = {};
                uint64_t epoch = 0;
                size_t len = build(compress, &st);

                memset(&sink, 0, sizeof(sink));
                ASSERT_EQ(page_batch_decode(buf, len, 1000, &epoch, sink_fn, &sink), 5);
                ASSERT_EQ(epoch, 42);
                for (int i = 0; i < 4; i++) {
                        ASSERT_EQ(sink.pages[i], 100 + i);
                        ASSERT_EQ(sink.zero[i], i == 0);
                        if (i)
                                ASSERT_TRUE(memcmp(sink.data[i], pages_in[i], PAGE_BYTES) == 0);
                }
                ASSERT_EQ(sink.pages[4], 7);
                ASSERT_TRUE(sink.zero[4]);
                ASSERT_EQ(st.zero, 2);
                if (compress) {
                        ASSERT_EQ(st.lz4, 2); /* pages 1 and 3 */
                        ASSERT_EQ(st.raw, 1); /* the random page is not worth compressing */
                        ASSERT_TRUE(len < PAGE_BATCH_HEADER + 5 * PAGE_RECORD_HEADER + 2 * PAGE_BYTES);
                } else
                        ASSERT_EQ(st.raw, 3);
        }
}

TEST(pages_lz4_backoff)
{
        /* Incompressible pages: after PAGE_LZ4_FAILS failures LZ4 is tried ever more
         * rarely (at most every PAGE_LZ4_SKIP_MAX + 1 pages); one compressible page
         * that gets tried brings compression back at once. Every page round-trips. */
        static uint8_t big[PAGE_BATCH_HEADER + 512 * PAGE_RECORD_MAX];
        static uint8_t rnd[PAGE_BYTES], text[PAGE_BYTES];
        PageBatchStats st = {};
        PageBatch b;
        uint32_t x = 12345;
        uint64_t epoch, tried_before;
        size_t len;

        for (size_t i = 0; i < PAGE_BYTES; i++) {
                x = x * 1103515245u + 12345u;
                rnd[i] = (uint8_t) (x >> 16);
                text[i] = (uint8_t) ("dirtyrep "[i % 9]);
        }
        ASSERT_OK(page_batch_init(&b, 9, big, sizeof(big), 512, true, &st));
        for (uint64_t p = 0; p < 400; p++)
                ASSERT_OK(page_batch_add(&b, p, rnd));
        ASSERT_EQ(st.raw, 400);
        ASSERT_EQ(st.lz4, 0);
        /* Tried: the first PAGE_LZ4_FAILS, then one per growing gap; skips dominate. */
        ASSERT_TRUE(st.lz4_skipped > 400 - 20);
        ASSERT_TRUE(st.lz4_skip <= PAGE_LZ4_SKIP_MAX);
        /* Compressible pages: within one skip gap compression is back. */
        tried_before = st.lz4_skipped;
        for (uint64_t p = 400; p < 400 + PAGE_LZ4_SKIP_MAX + 2; p++)
                ASSERT_OK(page_batch_add(&b, p, text));
        ASSERT_TRUE(st.lz4 >= 1);
        ASSERT_EQ(st.lz4_fails, 0);
        ASSERT_TRUE(st.lz4_skipped - tried_before <= PAGE_LZ4_SKIP_MAX);
        len = page_batch_finish(&b);
        ASSERT_EQ(page_batch_decode(big, len, 1000, &epoch, count_fn, NULL), 400 + PAGE_LZ4_SKIP_MAX + 2);
}

TEST(pages_full_batch)
{
        static uint8_t small[PAGE_BATCH_HEADER + 2 * PAGE_RECORD_MAX];
        PageBatch b;

        memset(pages_in, 0x11, sizeof(pages_in));
        ASSERT_OK(page_batch_init(&b, 1, small, sizeof(small), 512, false, NULL));
        ASSERT_OK(page_batch_add(&b, 0, pages_in[0]));
        ASSERT_OK(page_batch_add(&b, 1, pages_in[1]));
        ASSERT_EQ(page_batch_add(&b, 2, pages_in[2]), -ENOSPC);
        ASSERT_OK(page_batch_init(&b, 1, small, sizeof(small), 1, false, NULL));
        ASSERT_OK(page_batch_add_zero(&b, 0));
        ASSERT_EQ(page_batch_add_zero(&b, 1), -ENOSPC);
        ASSERT_EQ(page_batch_init(&b, 1, small, 100, 1, false, NULL), -EINVAL);
}

TEST(pages_decode_rejects)
{
        size_t len = build(true, NULL);
        uint64_t epoch;

        /* Page outside the receiver's RAM. */
        memset(&sink, 0, sizeof(sink));
        ASSERT_EQ(page_batch_decode(buf, len, 103, &epoch, sink_fn, &sink), -EBADMSG);
        /* Every truncation is rejected (never a partial record read past the end). */
        for (size_t cut = 0; cut < len; cut++) {
                memset(&sink, 0, sizeof(sink));
                ASSERT_EQ(page_batch_decode(buf, cut, 1000, &epoch, sink_fn, &sink), -EBADMSG);
        }
        /* Trailing garbage. */
        buf[len] = 0;
        ASSERT_EQ(page_batch_decode(buf, len + 1, 1000, &epoch, sink_fn, &sink), -EBADMSG);
        /* A record count larger than the payload could hold. */
        put_le32(buf + 8, 1000000);
        ASSERT_EQ(page_batch_decode(buf, len, 1000, &epoch, sink_fn, &sink), -EBADMSG);
        put_le32(buf + 8, 5);
        /* Unknown encoding; zero record carrying data; raw with a short length. */
        put_le16(buf + PAGE_BATCH_HEADER + 12, 9);
        ASSERT_EQ(page_batch_decode(buf, len, 1000, &epoch, sink_fn, &sink), -EBADMSG);
        put_le16(buf + PAGE_BATCH_HEADER + 12, PAGE_ZERO);
        put_le32(buf + PAGE_BATCH_HEADER + 8, 16);
        ASSERT_EQ(page_batch_decode(buf, len, 1000, &epoch, sink_fn, &sink), -EBADMSG);
}

TEST(page_is_zero)
{
        static uint8_t p[PAGE_BYTES];
        ASSERT_TRUE(page_is_zero(p));
        for (size_t i = 0; i < PAGE_BYTES; i += 511) {
                p[i] = 1;
                ASSERT_TRUE(!page_is_zero(p));
                p[i] = 0;
        }
        p[PAGE_BYTES - 1] = 1;
        ASSERT_TRUE(!page_is_zero(p));
}

DEFINE_TEST_MAIN

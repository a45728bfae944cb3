/* SPDX-License-Identifier: GPL-2.0-or-later */
#include <errno.h>
#include <lz4.h>
#include <string.h>

#include "frame.h"
#include "macros.h"
#include "pages.h"

bool page_is_zero(const uint8_t *data)
{
        const uint64_t *w = (const uint64_t *) data;
        uint64_t acc = 0;

        /* Check in 512-byte strides so a non-zero page bails out early. */
        for (size_t i = 0; i < PAGE_BYTES / 8; i += 64) {
                for (size_t k = 0; k < 64; k++)
                        acc |= w[i + k];
                if (acc)
                        return false;
        }
        return true;
}

int page_batch_init(PageBatch *b, uint64_t epoch, uint8_t *buf, size_t cap, uint32_t max_records,
                    bool compress, PageBatchStats *stats)
{
        if (cap < PAGE_BATCH_HEADER + PAGE_RECORD_MAX || max_records == 0)
                return -EINVAL;
        *b = (PageBatch){
                .buf = buf,
                .cap = cap,
                .used = PAGE_BATCH_HEADER,
                .max_records = max_records,
                .compress = compress,
                .stats = stats,
        };
        put_le64(buf, epoch);
        return 0;
}

static void record_header(uint8_t *p, uint64_t page, uint32_t len, uint16_t enc)
{
        put_le64(p, page);
        put_le32(p + 8, len);
        put_le16(p + 12, enc);
        put_le16(p + 14, 0);
}

int page_batch_add_zero(PageBatch *b, uint64_t page)
{
        if (b->n >= b->max_records || b->cap - b->used < PAGE_RECORD_HEADER)
                return -ENOSPC;
        record_header(b->buf + b->used, page, 0, PAGE_ZERO);
        b->used += PAGE_RECORD_HEADER;
        b->n++;
        if (b->stats) {
                b->stats->zero++;
                b->stats->bytes_in += PAGE_BYTES;
                b->stats->bytes_out += PAGE_RECORD_HEADER;
        }
        return 0;
}

int page_batch_add(PageBatch *b, uint64_t page, const uint8_t *data)
{
        uint8_t *rec;
        size_t room;
        int clen = 0;

        if (b->n >= b->max_records || b->cap - b->used < PAGE_RECORD_MAX)
                return -ENOSPC;
        if (page_is_zero(data))
                return page_batch_add_zero(b, page);

        rec = b->buf + b->used;
        room = b->cap - b->used - PAGE_RECORD_HEADER;
        if (b->compress && b->stats && b->stats->lz4_skip > 0) {
                b->stats->lz4_skip--;
                b->stats->lz4_skipped++;
        } else if (b->compress) {
                /* Only worth it below a raw page; LZ4 returns 0 when it does not fit. */
                clen = LZ4_compress_default((const char *) data, (char *) rec + PAGE_RECORD_HEADER,
                                            PAGE_BYTES, (int) MIN(room, PAGE_BYTES - 1));
                if (b->stats) {
                        if (clen > 0)
                                b->stats->lz4_fails = 0;
                        else if (++b->stats->lz4_fails >= PAGE_LZ4_FAILS)
                                b->stats->lz4_skip = MIN(1u << MIN(b->stats->lz4_fails - PAGE_LZ4_FAILS, 6u),
                                                         PAGE_LZ4_SKIP_MAX);
                }
        }
        if (clen > 0) {
                record_header(rec, page, (uint32_t) clen, PAGE_LZ4);
                b->used += PAGE_RECORD_HEADER + (size_t) clen;
                if (b->stats)
                        b->stats->lz4++;
        } else {
                record_header(rec, page, PAGE_BYTES, PAGE_RAW);
                memcpy(rec + PAGE_RECORD_HEADER, data, PAGE_BYTES);
                b->used += PAGE_RECORD_MAX;
                if (b->stats)
                        b->stats->raw++;
        }
        b->n++;
        if (b->stats) {
                b->stats->bytes_in += PAGE_BYTES;
                b->stats->bytes_out += PAGE_RECORD_HEADER + (clen > 0 ? (uint64_t) clen : PAGE_BYTES);
        }
        return 0;
}

size_t page_batch_finish(PageBatch *b)
{
        if (b->n == 0)
                return 0;
        put_le32(b->buf + 8, b->n);
        put_le32(b->buf + 12, 0);
        return b->used;
}

int64_t page_batch_decode(const uint8_t *payload, size_t len, uint64_t n_pages, uint64_t *ret_epoch,
                          page_batch_fn fn, void *userdata)
{
        uint8_t page_buf[PAGE_BYTES] __attribute__((aligned(64)));
        size_t off = PAGE_BATCH_HEADER;
        uint32_t n;

        if (len < PAGE_BATCH_HEADER)
                return -EBADMSG;
        n = get_le32(payload + 8);
        if (n == 0 || get_le32(payload + 12) != 0)
                return -EBADMSG;
        /* Each record takes at least its header: bound n by the payload before looping. */
        if ((uint64_t) n * PAGE_RECORD_HEADER > len - PAGE_BATCH_HEADER)
                return -EBADMSG;
        if (ret_epoch)
                *ret_epoch = get_le64(payload);

        for (uint32_t i = 0; i < n; i++) {
                const uint8_t *rec = payload + off;
                const uint8_t *data;
                uint64_t page;
                uint32_t dlen;
                uint16_t enc;
                int r;

                if (len - off < PAGE_RECORD_HEADER)
                        return -EBADMSG;
                page = get_le64(rec);
                dlen = get_le32(rec + 8);
                enc = get_le16(rec + 12);
                if (page >= n_pages || get_le16(rec + 14) != 0 || dlen > len - off - PAGE_RECORD_HEADER)
                        return -EBADMSG;
                data = rec + PAGE_RECORD_HEADER;
                switch (enc) {
                case PAGE_ZERO:
                        if (dlen != 0)
                                return -EBADMSG;
                        r = fn(userdata, page, NULL);
                        break;
                case PAGE_RAW:
                        if (dlen != PAGE_BYTES)
                                return -EBADMSG;
                        r = fn(userdata, page, data);
                        break;
                case PAGE_LZ4:
                        if (dlen == 0 || dlen >= PAGE_BYTES ||
                            LZ4_decompress_safe((const char *) data, (char *) page_buf, (int) dlen,
                                                PAGE_BYTES) != (int) PAGE_BYTES)
                                return -EBADMSG;
                        r = fn(userdata, page, page_buf);
                        break;
                default:
                        return -EBADMSG;
                }
                if (r < 0)
                        return r;
                off += PAGE_RECORD_HEADER + dlen;
        }
        if (off != len)
                return -EBADMSG; /* trailing bytes */
        return n;
}

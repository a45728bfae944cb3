/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * Page batches: the payload of a replication PAGES frame.
 *
 *   batch header, 16 bytes:  le64 epoch, le32 n_records, le32 flags (0)
 *   then n_records records, each a 16-byte header followed by its data:
 *     le64 page        VM-wide page number (regions concatenated in layout order)
 *     le32 data_len    bytes of data that follow (0 for ZERO, 4096 for RAW)
 *     le16 encoding    PAGE_ZERO, PAGE_RAW or PAGE_LZ4
 *     le16 reserved    0
 *
 * Zero pages travel as a record without data. LZ4 is used only when it
 * saves space; an incompressible page goes RAW. The decoder checks every
 * field against the receiver's limits before touching memory.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PAGE_BATCH_HEADER  16u
#define PAGE_RECORD_HEADER 16u
#define PAGE_BYTES         4096u

enum {
        PAGE_ZERO = 0,
        PAGE_RAW = 1,
        PAGE_LZ4 = 2,
};

typedef struct PageBatchStats {
        uint64_t zero, raw, lz4;
        uint64_t bytes_in;  /* page bytes represented */
        uint64_t bytes_out; /* record bytes produced */
        /* Incompressible-data back-off (kept across batches): after PAGE_LZ4_FAILS
         * pages in a row that LZ4 could not shrink, the next pages go raw without
         * trying: 1, then 2, 4, ... up to PAGE_LZ4_SKIP_MAX between attempts while
         * attempts keep failing; one success starts over. Random-looking RAM then
         * costs a copy, not a failed compression per page. */
        uint32_t lz4_fails, lz4_skip;
        uint64_t lz4_skipped; /* pages sent raw without trying */
} PageBatchStats;

#define PAGE_LZ4_FAILS    4u
#define PAGE_LZ4_SKIP_MAX 64u

typedef struct PageBatch {
        uint8_t *buf; /* caller-owned, at least PAGE_BATCH_HEADER + one worst-case record */
        size_t cap;
        size_t used;
        uint32_t n;
        uint32_t max_records;
        bool compress;
        PageBatchStats *stats; /* optional, accumulated */
} PageBatch;

/* Worst-case size of one record: header + a raw page. */
#define PAGE_RECORD_MAX (PAGE_RECORD_HEADER + PAGE_BYTES)

/* Starts a batch for `epoch` in buf[cap]. cap must hold the header and one record. */
int page_batch_init(PageBatch *b, uint64_t epoch, uint8_t *buf, size_t cap, uint32_t max_records,
                    bool compress, PageBatchStats *stats);

/*
 * Appends page `page` whose 4096 bytes are at `data`. Returns 0, or -ENOSPC
 * when the batch is full (nothing added: ship it and start a new one).
 */
int page_batch_add(PageBatch *b, uint64_t page, const uint8_t *data);

/* Appends a zero-page record without looking at memory (full sync of known-zero pages). */
int page_batch_add_zero(PageBatch *b, uint64_t page);

/* Finalizes the header. Returns the payload length (0 if the batch is empty). */
size_t page_batch_finish(PageBatch *b);

/* True if all 4096 bytes are zero. */
bool page_is_zero(const uint8_t *data);

/*
 * Called for each record in order with the decoded page (data = NULL for a
 * zero page). Returning a negative errno stops decoding with that error.
 */
typedef int (*page_batch_fn)(void *userdata, uint64_t page, const uint8_t *data);

/*
 * Decodes and validates a batch: every record's page < n_pages, encodings
 * and lengths sane, LZ4 data decompressing to exactly 4096 bytes, nothing
 * past the payload. Returns the number of records, or -EBADMSG with nothing
 * after the bad record delivered. Stores the batch's epoch in *ret_epoch.
 */
int64_t page_batch_decode(const uint8_t *payload, size_t len, uint64_t n_pages, uint64_t *ret_epoch,
                          page_batch_fn fn, void *userdata);

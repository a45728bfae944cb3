/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * What image/format.c, write.c and read.c share; not part of the API
 * (imagefile.h is). format.c owns the on-disk format: file headers, the
 * inventory and page map decoders, the layout checks and loading a checked
 * inventory (the writer loads its parent's, the reader every image's).
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "imagefile.h"

#define FILE_INVENTORY "inventory.img"
#define FILE_STATE     "state.img"
#define FILE_PAGEMAP   "pagemap.img"
#define FILE_PAGES     "pages.img"

#define RUN_MAX_BYTES ((size_t) IMAGE_RUN_MAX_PAGES * IMAGE_PAGE_SIZE)

/* Formats a message into err (when err is not NULL); returns 0. */
_printf_(3, 4) int image_fail(char *err, size_t errlen, const char *fmt, ...);
#define FAIL(r, ...) (image_fail(err, errlen, __VA_ARGS__), (r))

uint32_t image_get_le32(const uint8_t *p);
void image_header_encode(uint8_t out[IMAGE_HEADER_SIZE], const char *magic, const uint8_t id[16],
                         uint64_t payload_len, uint32_t payload_crc);

/* A VM name as images store it: [A-Za-z0-9_.-], 1..IMAGE_NAME_MAX, not starting with '.'. */
bool image_name_ok(const char *s);

/* Region index of VM-wide page `page` and the first page after that region; SIZE_MAX when outside. */
size_t image_layout_region_of(const ImageLayout *lay, uint64_t page, uint64_t *ret_first, uint64_t *ret_end);

const Dr__Image__FileRef *image_inventory_file(const Dr__Image__Inventory *inv, const char *name);

/* Reads a regular file of at most max bytes (-EFBIG beyond, -EBADFD when not a regular file). */
int image_read_file_at(int dfd, const char *name, uint64_t max, uint8_t **ret, size_t *ret_len);
/* Reads and fully checks one image's inventory.img; ret_sha (or NULL) gets the file's SHA-256. */
int image_inventory_load(int dfd, const char *dir, Dr__Image__Inventory **ret, ImageLayout *ret_lay,
                         uint8_t ret_sha[32], char *err, size_t errlen);

/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * Checkpoint images (proto/image.proto is the format): a directory with an
 * inventory, the VM state, a page map and page data, optionally on top of
 * a parent image (incremental). CRIU's image directory and Firecracker's
 * diff snapshots are the models.
 *
 * Taking an image (any owner of a dirty tracker: the primary, dr-imager):
 *
 *     image_capture_new(layout, ram)            staging for one image
 *     while the VM runs:  tracker sync (collect -> reset), then
 *         image_capture_copy(cap, since_image)  pre-copy, pages already reset
 *     pause; tracker sync -> D
 *         image_capture_copy(cap, D)            only what was re-dirtied
 *         SaveState
 *     resume
 *     image_capture_write(cap, dir, {covered = since_image | D, parent, state})
 *
 * The ordering rule of daemon/track.h holds for every copy: a page is copied
 * only after its dirty-log entry was reset, so a write after the copy is
 * logged again and copied again at the pause. The pause therefore costs what
 * an epoch's does: a final collect + reset, copying the re-dirtied pages,
 * SaveState.
 *
 * Reading: image_open() checks every file's header, checksum and cross
 * references, and the whole parent chain; image_restore() writes the RAM
 * (oldest image first, so every run of every image is read and its CRC
 * checked). Errors come back as -errno plus a message naming the file.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "image.pb-c.h"
#include "layout.h"
#include "macros.h"

#define IMAGE_PAGE_SIZE      4096U
#define IMAGE_MAX_REGIONS    RAM_MAX_REGIONS
#define IMAGE_MAX_VCPUS      128U
#define IMAGE_MAX_DEPTH      64U           /* incremental images on top of one full image */
#define IMAGE_RUN_MAX_PAGES  256U          /* a PRESENT run holds at most 1 MiB */
#define IMAGE_RAM_MAX        RAM_MAX_BYTES /* 1 TiB, the reference VMM's bound */
#define IMAGE_INVENTORY_MAX  (64U << 10)
#define IMAGE_STATE_MAX      (256U << 20)
#define IMAGE_PAGEMAP_MAX    (256U << 20)
#define IMAGE_HEADER_SIZE    48U
#define IMAGE_PAGES_DATA_OFF 4096U /* pages.img payload starts here */
#define IMAGE_NAME_MAX       64U
#define IMAGE_ERR_MAX        512U

/* The RAM layout of common/layout.h: regions of the VMM's RAM memfd, pages numbered VM-wide. */
typedef RamRegion ImageRegion;
typedef RamLayout ImageLayout;

/* Checks a layout (ram_layout_validate(), and total_pages as given). 0 or -EINVAL. */
int image_layout_check(const ImageLayout *lay);

/* ---- taking an image ---- */

typedef struct ImageCapture ImageCapture;

typedef struct ImageWriteOptions {
        const char *vm_name;    /* [A-Za-z0-9_.-], 1..64 */
        const uint8_t *vm_uuid; /* 16 bytes or NULL */
        const uint8_t *state;   /* VmState bytes (proto/vmstate.proto) */
        size_t state_len;
        const uint64_t *covered; /* pages this image stores (dirtied since the parent); NULL = all (full) */
        const char *parent;      /* parent image directory, NULL for a full image */
        /*
         * The id of the image `covered` counts from (the last image this
         * owner took; ImageWriteStats.image_id). When set, a parent with
         * another id is refused (-ESTALE): its pages would be missing.
         */
        const uint8_t *parent_id;
        bool compress;  /* LZ4 per run where it saves space */
        uint64_t epoch; /* informative */
} ImageWriteOptions;

typedef struct ImageWriteStats {
        uint64_t present_pages, zero_pages, parent_pages;
        uint64_t stored_bytes; /* page data in pages.img */
        uint64_t total_bytes;  /* all four files */
        uint64_t runs;
        uint64_t write_ns;    /* image_capture_write() wall time */
        uint8_t image_id[16]; /* of the image written */
} ImageWriteStats;

/*
 * Staging for one image of a VM with this layout; ram[i] is a readable
 * mapping of region i (borrowed; must stay mapped until the capture is
 * freed). Staging is a sparse memfd: it costs what is copied into it.
 */
int image_capture_new(const ImageLayout *lay, const uint8_t *const *ram, ImageCapture **ret);
ImageCapture *image_capture_free(ImageCapture *c);
DEFINE_TRIVIAL_CLEANUP_FUNC(ImageCapture *, image_capture_free);

/*
 * Copies the pages set in `pages` (a bitmap over total_pages; NULL = every
 * page) from RAM into staging. Only for pages whose dirty-log entries were
 * already reset (collect -> reset -> copy). Safe while the VM runs. Returns
 * the number of pages copied (all-zero pages not yet staged are skipped:
 * staging reads them as zero anyway).
 */
int64_t image_capture_copy(ImageCapture *c, const uint64_t *pages);

/*
 * Writes the image directory `dir` (which must not exist) from staging,
 * crash-safe: a temporary directory next to it, every file and the
 * directory fsync()ed, rename(), the parent directory fsync()ed. Every
 * covered page must have been copied (-EINVAL otherwise). With a parent,
 * the parent's inventory is checked (and hashed) and its layout must be
 * ours. Returns 0 or -errno with a message in err.
 */
int image_capture_write(ImageCapture *c, const char *dir, const ImageWriteOptions *o,
                        ImageWriteStats *ret_stats, char *err, size_t errlen);

/* ---- reading an image ---- */

typedef struct Image Image;
struct Image {
        char *path;
        Dr__Image__Inventory *inv;
        Dr__Image__PageMap *map;
        uint8_t *state;
        size_t state_len;
        int pages_fd;
        uint64_t pages_len; /* payload bytes of pages.img */
        uint8_t inv_sha256[32];
        ImageLayout layout;
        Image *parent; /* owned; NULL for a full image or without IMAGE_OPEN_CHAIN */
};

enum {
        IMAGE_OPEN_CHAIN = 1 << 0,       /* open and check the whole parent chain */
        IMAGE_OPEN_VERIFY_DATA = 1 << 1, /* read every run of pages.img and check its CRC */
};

/* Opens and checks an image directory. On failure err names the file and the problem. */
int image_open(const char *dir, unsigned flags, Image **ret, char *err, size_t errlen);
Image *image_free(Image *img);
DEFINE_TRIVIAL_CLEANUP_FUNC(Image *, image_free);

/*
 * Writes the guest RAM the chain describes into `ram`, laid out as the
 * VMM's memfd (region i at fd_offset), `ram_size` bytes. `ram_is_zero`:
 * the memory is known to be zero (a fresh memfd), so ZERO runs of the
 * oldest image are skipped. Every run read is CRC-checked first. 0 or
 * -errno with err naming the file.
 */
int image_restore(const Image *img, uint8_t *ram, uint64_t ram_size, bool ram_is_zero, char *err,
                  size_t errlen);

/* Bytes of RAM in the memfd layout (max fd_offset + size). */
uint64_t image_layout_ram_size(const ImageLayout *lay);

/* ---- decoders (exposed for the fuzzer and `image show`) ---- */

typedef struct ImageFileHeader {
        char magic[8];
        uint32_t version;
        uint8_t image_id[16];
        uint64_t payload_len;
        uint32_t payload_crc;
        uint32_t header_crc;
} ImageFileHeader;

#define IMAGE_MAGIC_INVENTORY "DRIMGINV"
#define IMAGE_MAGIC_STATE     "DRIMGSTA"
#define IMAGE_MAGIC_PAGEMAP   "DRIMGPMP"
#define IMAGE_MAGIC_PAGES     "DRIMGPGS"
#define IMAGE_FILE_VERSION    1U

/* Decodes and checks a 48-byte header (magic, version, reserved, header CRC). */
int image_header_decode(const uint8_t *buf, size_t len, const char *magic, ImageFileHeader *ret, char *err,
                        size_t errlen);
/* Decodes an inventory payload and checks every field. */
int image_inventory_decode(const uint8_t *buf, size_t len, Dr__Image__Inventory **ret,
                           ImageLayout *ret_layout, char *err, size_t errlen);
/* Decodes a page map payload and checks it against the layout and pages.img's payload size. */
int image_pagemap_decode(const uint8_t *buf, size_t len, const ImageLayout *lay, bool has_parent,
                         uint64_t pages_len, Dr__Image__PageMap **ret, char *err, size_t errlen);

const char *image_run_kind_name(Dr__Image__RunKind k);

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Checkpoint image decoders on hostile files. The first input byte picks
 * what the rest is:
 *   0  an inventory.img file (header, then the Inventory payload; the payload
 *      is decoded even when the header's CRC does not match)
 *   1  a page map payload for a fixed two-region layout; the next byte's
 *      low bit says "has a parent", the next 8 bytes are pages.img's size
 *   2  a whole image directory: four files, each a u32 LE length and its
 *      bytes (inventory.img, state.img, pagemap.img, pages.img), written
 *      to a temporary directory, then opened with every check
 *      (image_open) and restored into 8 MiB of RAM (image_restore)
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "imagefile.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define RAM_SIZE (8U << 20)

static const ImageLayout fixed_layout = {
        .page_size = IMAGE_PAGE_SIZE,
        .regions = {{.slot = 0, .guest_phys = 0, .size = 4U << 20, .fd_offset = 0},
                    {.slot = 1, .guest_phys = 1ULL << 32, .size = 4U << 20, .fd_offset = 4U << 20}},
        .n_regions = 2,
        .total_pages = RAM_SIZE / IMAGE_PAGE_SIZE,
};

static const char *const names[] = {"inventory.img", "state.img", "pagemap.img", "pages.img"};
static char dir[64];
static uint8_t *ram;

static void cleanup(void)
{
        char p[128];

        for (size_t i = 0; i < 4; i++) {
                snprintf(p, sizeof(p), "%s/%s", dir, names[i]);
                unlink(p);
        }
        rmdir(dir);
        free(ram);
}

static void whole_dir(const uint8_t *data, size_t size)
{
        char err[IMAGE_ERR_MAX], p[128];
        Image *img = NULL;

        if (!dir[0]) {
                strcpy(dir, "/tmp/fuzz-image-XXXXXX");
                if (!mkdtemp(dir))
                        abort();
                atexit(cleanup);
                ram = malloc(RAM_SIZE);
                if (!ram)
                        abort();
        }
        for (size_t i = 0; i < 4; i++) {
                uint32_t len;
                FILE *f;

                snprintf(p, sizeof(p), "%s/%s", dir, names[i]);
                unlink(p);
                if (size < 4)
                        continue;
                memcpy(&len, data, 4);
                data += 4;
                size -= 4;
                len = len > size ? (uint32_t) size : len;
                f = fopen(p, "we");
                if (!f)
                        abort();
                if (len)
                        (void) !fwrite(data, 1, len, f);
                fclose(f);
                data += len;
                size -= len;
        }
        if (image_open(dir, IMAGE_OPEN_VERIFY_DATA, &img, err, sizeof(err)) >= 0) {
                /* A full image restores on its own; an incremental one lacks its chain. */
                if (!img->inv->parent && image_layout_ram_size(&img->layout) <= RAM_SIZE)
                        (void) image_restore(img, ram, RAM_SIZE, false, err, sizeof(err));
                image_free(img);
        }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        char err[IMAGE_ERR_MAX];

        if (size < 1)
                return 0;
        switch (data[0] % 3) {
        case 0: {
                ImageFileHeader h;
                Dr__Image__Inventory *inv;
                ImageLayout lay;

                /* The payload decoder runs whatever the header said: a CRC would hide it from the fuzzer. */
                (void) image_header_decode(data + 1, size - 1, IMAGE_MAGIC_INVENTORY, &h, err, sizeof(err));
                if (size < 1 + IMAGE_HEADER_SIZE)
                        break;
                if (image_inventory_decode(data + 1 + IMAGE_HEADER_SIZE, size - 1 - IMAGE_HEADER_SIZE, &inv,
                                           &lay, err, sizeof(err)) >= 0)
                        dr__image__inventory__free_unpacked(inv, NULL);
                break;
        }
        case 1: {
                Dr__Image__PageMap *map;
                uint64_t pages_len;

                if (size < 10)
                        break;
                memcpy(&pages_len, data + 2, 8);
                if (image_pagemap_decode(data + 10, size - 10, &fixed_layout, data[1] & 1, pages_len, &map,
                                         err, sizeof(err)) >= 0)
                        dr__image__page_map__free_unpacked(map, NULL);
                break;
        }
        case 2:
                whole_dir(data + 1, size - 1);
                break;
        }
        return 0;
}

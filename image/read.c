/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Checkpoint images, the reader: image_open() checks an image directory and
 * its parent chain, image_restore() writes the RAM they describe. The format
 * and its checks are format.c; API: imagefile.h.
 */
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <lz4.h>

#include "crc32c.h"
#include "image-internal.h"
#include "util.h"
#include "vmstate.pb-c.h"

Image *image_free(Image *img)
{
        while (img) {
                Image *p = img->parent;

                free(img->path);
                if (img->inv)
                        dr__image__inventory__free_unpacked(img->inv, NULL);
                if (img->map)
                        dr__image__page_map__free_unpacked(img->map, NULL);
                free(img->state);
                safe_close(img->pages_fd);
                free(img);
                img = p;
        }
        return NULL;
}

/* Reads a small file of this image: header, size and header CRC as the inventory says, payload CRC. */
static int small_file_load(int dfd, const Image *img, const char *name, const char *magic, uint64_t max,
                           uint8_t **ret, size_t *ret_len, char *err, size_t errlen)
{
        _cleanup_free_ uint8_t *buf = NULL;
        const Dr__Image__FileRef *fr = image_inventory_file(img->inv, name);
        char why[IMAGE_ERR_MAX] = "";
        ImageFileHeader h;
        size_t len;
        int r;

        r = image_read_file_at(dfd, name, IMAGE_HEADER_SIZE + max, &buf, &len);
        if (r < 0)
                return FAIL(r, "%s/%s: cannot read: %s", img->path, name, strerror(-r));
        r = image_header_decode(buf, len, magic, &h, why, sizeof(why));
        if (r < 0)
                return FAIL(r, "%s/%s: %s", img->path, name, why);
        if (memcmp(h.image_id, img->inv->image_id.data, 16) != 0 || h.header_crc != fr->header_crc)
                return FAIL(-EBADMSG,
                            "%s/%s: belongs to another image (id or header does not match the inventory)",
                            img->path, name);
        if (len != fr->size || h.payload_len != len - IMAGE_HEADER_SIZE)
                return FAIL(-EBADMSG, "%s/%s: %zu bytes, the inventory says %" PRIu64, img->path, name, len,
                            fr->size);
        if (crc32c(0, buf + IMAGE_HEADER_SIZE, len - IMAGE_HEADER_SIZE) != h.payload_crc)
                return FAIL(-EBADMSG, "%s/%s: checksum mismatch", img->path, name);
        memmove(buf, buf + IMAGE_HEADER_SIZE, len - IMAGE_HEADER_SIZE);
        *ret = TAKE_PTR(buf);
        *ret_len = len - IMAGE_HEADER_SIZE;
        return 0;
}

static int pages_file_open(int dfd, Image *img, char *err, size_t errlen)
{
        const Dr__Image__FileRef *fr = image_inventory_file(img->inv, FILE_PAGES);
        uint8_t hdr[IMAGE_PAGES_DATA_OFF];
        char why[IMAGE_ERR_MAX] = "";
        ImageFileHeader h;
        struct stat st;
        int fd, r;

        fd = openat(dfd, FILE_PAGES, O_RDONLY | O_CLOEXEC | O_NOCTTY);
        if (fd < 0)
                return FAIL(-errno, "%s/%s: cannot open: %m", img->path, FILE_PAGES);
        img->pages_fd = fd;
        if (fstat(fd, &st) < 0)
                return FAIL(-errno, "%s/%s: %m", img->path, FILE_PAGES);
        if (!S_ISREG(st.st_mode) || (uint64_t) st.st_size != fr->size || fr->size < IMAGE_PAGES_DATA_OFF)
                return FAIL(-EBADMSG, "%s/%s: %" PRIu64 " bytes, the inventory says %" PRIu64, img->path,
                            FILE_PAGES, (uint64_t) st.st_size, fr->size);
        r = loop_read_exact(fd, hdr, sizeof(hdr));
        if (r < 0)
                return FAIL(r, "%s/%s: cannot read the header: %s", img->path, FILE_PAGES, strerror(-r));
        r = image_header_decode(hdr, sizeof(hdr), IMAGE_MAGIC_PAGES, &h, why, sizeof(why));
        if (r < 0)
                return FAIL(r, "%s/%s: %s", img->path, FILE_PAGES, why);
        if (memcmp(h.image_id, img->inv->image_id.data, 16) != 0 || h.header_crc != fr->header_crc)
                return FAIL(-EBADMSG,
                            "%s/%s: belongs to another image (id or header does not match the inventory)",
                            img->path, FILE_PAGES);
        if (h.payload_len != fr->size - IMAGE_PAGES_DATA_OFF || h.payload_crc != 0)
                return FAIL(-EBADMSG, "%s/%s: header says %" PRIu64 " payload bytes, the file has %" PRIu64,
                            img->path, FILE_PAGES, h.payload_len, fr->size - IMAGE_PAGES_DATA_OFF);
        for (size_t i = IMAGE_HEADER_SIZE; i < sizeof(hdr); i++)
                if (hdr[i] != 0)
                        return FAIL(-EBADMSG, "%s/%s: header padding is not zero", img->path, FILE_PAGES);
        img->pages_len = h.payload_len;
        return 0;
}

/* Reads a PRESENT run's stored bytes into buf and checks its CRC. */
static int run_read(const Image *img, const Dr__Image__PageRun *run, uint8_t *buf, char *err, size_t errlen)
{
        ssize_t n;
        size_t got = 0;

        while (got < run->stored_len) {
                n = pread(img->pages_fd, buf + got, (size_t) run->stored_len - got,
                          (off_t) (IMAGE_PAGES_DATA_OFF + run->data_offset + got));
                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        return FAIL(n < 0 ? -errno : -EPIPE, "%s/%s: read failed at run of page %" PRIu64,
                                    img->path, FILE_PAGES, run->first_page);
                got += (size_t) n;
        }
        if (crc32c(0, buf, (size_t) run->stored_len) != run->data_crc)
                return FAIL(-EBADMSG, "%s/%s: checksum mismatch in the data of pages %" PRIu64 "..%" PRIu64,
                            img->path, FILE_PAGES, run->first_page, run->first_page + run->n_pages - 1);
        return 0;
}

static int run_decode(const Image *img, const Dr__Image__PageRun *run, const uint8_t *stored, uint8_t *out,
                      char *err, size_t errlen)
{
        size_t raw = (size_t) run->n_pages * IMAGE_PAGE_SIZE;

        if (run->has_compression && run->compression == DR__IMAGE__COMPRESSION__COMPRESSION_LZ4) {
                int n = LZ4_decompress_safe((const char *) stored, (char *) out, (int) run->stored_len,
                                            (int) raw);
                if (n != (int) raw)
                        return FAIL(-EBADMSG,
                                    "%s/%s: LZ4 data of pages %" PRIu64 "+%" PRIu64 " does not decode",
                                    img->path, FILE_PAGES, run->first_page, run->n_pages);
        } else if (stored != out)
                memcpy(out, stored, raw);
        return 0;
}

static int verify_data(const Image *img, char *err, size_t errlen)
{
        _cleanup_free_ uint8_t *buf = NULL, *out = NULL;

        buf = malloc(RUN_MAX_BYTES);
        out = malloc(RUN_MAX_BYTES);
        if (!buf || !out)
                return -ENOMEM;
        for (size_t i = 0; i < img->map->n_runs; i++) {
                const Dr__Image__PageRun *run = img->map->runs[i];
                int r;

                if (run->kind != DR__IMAGE__RUN_KIND__RUN_PRESENT)
                        continue;
                r = run_read(img, run, buf, err, errlen);
                if (r >= 0)
                        r = run_decode(img, run, buf, out, err, errlen);
                if (r < 0)
                        return r;
        }
        return 0;
}

static int open_one(const char *dir, unsigned flags, Image **ret, char *err, size_t errlen)
{
        _cleanup_(image_freep) Image *img = NULL;
        _cleanup_free_ uint8_t *map_buf = NULL;
        _cleanup_close_ int dfd = -EBADF;
        Dr__Vmstate__VmState *vs;
        char why[IMAGE_ERR_MAX] = "";
        size_t map_len;
        int r;

        img = calloc(1, sizeof(*img));
        if (!img)
                return -ENOMEM;
        img->pages_fd = -EBADF;
        img->path = strdup(dir);
        if (!img->path)
                return -ENOMEM;
        dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd < 0)
                return FAIL(-errno, "%s: cannot open image directory: %m", dir);
        r = image_inventory_load(dfd, dir, &img->inv, &img->layout, img->inv_sha256, err, errlen);
        if (r < 0)
                return r;
        r = small_file_load(dfd, img, FILE_STATE, IMAGE_MAGIC_STATE, IMAGE_STATE_MAX, &img->state,
                            &img->state_len, err, errlen);
        if (r < 0)
                return r;
        vs = dr__vmstate__vm_state__unpack(NULL, img->state_len, img->state);
        if (!vs)
                return FAIL(-EBADMSG, "%s/%s: not a valid VM state", dir, FILE_STATE);
        if (vs->n_vcpus != img->inv->n_vcpus) {
                dr__vmstate__vm_state__free_unpacked(vs, NULL);
                return FAIL(-EBADMSG, "%s/%s: %zu vCPUs, the inventory says %" PRIu32, dir, FILE_STATE,
                            (size_t) vs->n_vcpus, img->inv->n_vcpus);
        }
        dr__vmstate__vm_state__free_unpacked(vs, NULL);
        r = pages_file_open(dfd, img, err, errlen);
        if (r < 0)
                return r;
        r = small_file_load(dfd, img, FILE_PAGEMAP, IMAGE_MAGIC_PAGEMAP, IMAGE_PAGEMAP_MAX, &map_buf,
                            &map_len, err, errlen);
        if (r < 0)
                return r;
        r = image_pagemap_decode(map_buf, map_len, &img->layout, img->inv->parent != NULL, img->pages_len,
                                 &img->map, why, sizeof(why));
        if (r < 0)
                return FAIL(r, "%s/%s: %s", dir, FILE_PAGEMAP, why);
        {
                uint64_t present = 0, zero = 0;
                for (size_t i = 0; i < img->map->n_runs; i++) {
                        if (img->map->runs[i]->kind == DR__IMAGE__RUN_KIND__RUN_PRESENT)
                                present += img->map->runs[i]->n_pages;
                        else if (img->map->runs[i]->kind == DR__IMAGE__RUN_KIND__RUN_ZERO)
                                zero += img->map->runs[i]->n_pages;
                }
                if (present != img->inv->present_pages || zero != img->inv->zero_pages)
                        return FAIL(-EBADMSG, "%s/%s: page counts differ from the inventory's", dir,
                                    FILE_PAGEMAP);
        }
        if (flags & IMAGE_OPEN_VERIFY_DATA) {
                r = verify_data(img, err, errlen);
                if (r < 0)
                        return r;
        }
        *ret = TAKE_PTR(img);
        return 0;
}

static int parent_dir(const Image *img, char **ret)
{
        const char *p = img->inv->parent->path;
        char *s;

        if (p[0] == '/')
                s = strdup(p);
        else if (strneq(p, "../", 3) && !strchr(p + 3, '/')) {
                /* A sibling (what the writer stores): name it as such, not as "img3/../img2/../img1". */
                _cleanup_free_ char *copy = strdup(img->path);
                if (!copy || asprintf(&s, "%s/%s", dirname(copy), p + 3) < 0)
                        s = NULL;
        } else if (asprintf(&s, "%s/%s", img->path, p) < 0)
                s = NULL;
        if (!s)
                return -ENOMEM;
        *ret = s;
        return 0;
}

int image_open(const char *dir, unsigned flags, Image **ret, char *err, size_t errlen)
{
        _cleanup_(image_freep) Image *head = NULL;
        Image *cur;
        int r;

        r = open_one(dir, flags, &head, err, errlen);
        if (r < 0)
                return r;
        cur = head;
        while ((flags & IMAGE_OPEN_CHAIN) && cur->inv->parent) {
                _cleanup_free_ char *pdir = NULL;
                const Dr__Image__ParentRef *ref = cur->inv->parent;
                Image *p;

                r = parent_dir(cur, &pdir);
                if (r < 0)
                        return r;
                if (access(pdir, F_OK) < 0)
                        return FAIL(-ENOENT, "%s: parent image %s is missing (%m)", cur->path, pdir);
                r = open_one(pdir, flags, &p, err, errlen);
                if (r < 0)
                        return r;
                cur->parent = p;
                if (memcmp(p->inv->image_id.data, ref->image_id.data, 16) != 0 ||
                    memcmp(p->inv_sha256, ref->inventory_sha256.data, 32) != 0)
                        return FAIL(-EBADMSG,
                                    "%s: parent %s is not the image this one was taken on (id or inventory "
                                    "SHA-256 differ)",
                                    cur->path, pdir);
                if (p->inv->depth + 1 != cur->inv->depth || !ram_layout_equal(&p->layout, &cur->layout) ||
                    !streq(p->inv->vm_name, cur->inv->vm_name))
                        return FAIL(-EBADMSG, "%s: parent %s has another depth, VM or RAM layout", cur->path,
                                    pdir);
                cur = p;
        }
        *ret = TAKE_PTR(head);
        return 0;
}

static int restore_one(const Image *img, uint8_t *ram, uint64_t ram_size, bool skip_zero, uint8_t *buf,
                       char *err, size_t errlen)
{
        for (size_t i = 0; i < img->map->n_runs; i++) {
                const Dr__Image__PageRun *run = img->map->runs[i];
                uint64_t rfirst, rend, off;
                size_t ri = image_layout_region_of(&img->layout, run->first_page, &rfirst, &rend);
                size_t raw = (size_t) run->n_pages * IMAGE_PAGE_SIZE;
                uint8_t *dst;
                bool lz4;
                int r;

                assert(ri != SIZE_MAX); /* checked by image_pagemap_decode() */
                off = img->layout.regions[ri].fd_offset + (run->first_page - rfirst) * IMAGE_PAGE_SIZE;
                if (off > ram_size || raw > ram_size - off)
                        return FAIL(-ERANGE, "%s: RAM of %" PRIu64 " bytes is too small for the image",
                                    img->path, ram_size);
                dst = ram + off;
                switch (run->kind) {
                case DR__IMAGE__RUN_KIND__RUN_PRESENT:
                        lz4 = run->has_compression &&
                              run->compression == DR__IMAGE__COMPRESSION__COMPRESSION_LZ4;
                        /* Raw runs are read straight into guest RAM and checked there. */
                        r = run_read(img, run, lz4 ? buf : dst, err, errlen);
                        if (r >= 0 && lz4)
                                r = run_decode(img, run, buf, dst, err, errlen);
                        if (r < 0)
                                return r;
                        break;
                case DR__IMAGE__RUN_KIND__RUN_ZERO:
                        if (!skip_zero)
                                memset(dst, 0, raw);
                        break;
                default:
                        break;
                }
        }
        return 0;
}

int image_restore(const Image *img, uint8_t *ram, uint64_t ram_size, bool ram_is_zero, char *err,
                  size_t errlen)
{
        _cleanup_free_ uint8_t *buf = NULL;
        const Image *chain[IMAGE_MAX_DEPTH + 1];
        size_t n = 0;

        for (const Image *p = img; p; p = p->parent) {
                if (n == ELEMENTSOF(chain))
                        return FAIL(-ELOOP, "%s: parent chain longer than %u", img->path, IMAGE_MAX_DEPTH);
                chain[n++] = p;
        }
        if (chain[n - 1]->inv->parent)
                return FAIL(-EINVAL, "%s: the parent chain was not opened", img->path);
        if (image_layout_ram_size(&img->layout) > ram_size)
                return FAIL(-ERANGE, "%s: needs %" PRIu64 " bytes of RAM, got %" PRIu64, img->path,
                            image_layout_ram_size(&img->layout), ram_size);
        buf = malloc(RUN_MAX_BYTES);
        if (!buf)
                return -ENOMEM;
        /* Oldest first: each newer image overwrites what it changed, and every run is read and checked. */
        for (size_t k = n; k-- > 0;) {
                int r = restore_one(chain[k], ram, ram_size, ram_is_zero && k == n - 1, buf, err, errlen);
                if (r < 0)
                        return r;
        }
        return 0;
}

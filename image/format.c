/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Checkpoint images, the format (proto/image.proto): file headers, the
 * inventory and page map decoders with every check a reader makes, the RAM
 * layout checks, and loading a checked inventory. The writer is write.c, the
 * reader read.c; API and the capture protocol: imagefile.h.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "crc32c.h"
#include "image-internal.h"
#include "util.h"

int image_fail(char *err, size_t errlen, const char *fmt, ...)
{
        va_list ap;

        if (err && errlen > 0) {
                va_start(ap, fmt);
                vsnprintf(err, errlen, fmt, ap);
                va_end(ap);
        }
        return 0;
}

static void put_le32(uint8_t *p, uint32_t v)
{
        for (int i = 0; i < 4; i++)
                p[i] = (uint8_t) (v >> (8 * i));
}

static void put_le64(uint8_t *p, uint64_t v)
{
        for (int i = 0; i < 8; i++)
                p[i] = (uint8_t) (v >> (8 * i));
}

uint32_t image_get_le32(const uint8_t *p)
{
        return (uint32_t) p[0] | (uint32_t) p[1] << 8 | (uint32_t) p[2] << 16 | (uint32_t) p[3] << 24;
}

static uint64_t get_le64(const uint8_t *p)
{
        return (uint64_t) image_get_le32(p) | (uint64_t) image_get_le32(p + 4) << 32;
}

const char *image_run_kind_name(Dr__Image__RunKind k)
{
        switch (k) {
        case DR__IMAGE__RUN_KIND__RUN_PRESENT:
                return "present";
        case DR__IMAGE__RUN_KIND__RUN_ZERO:
                return "zero";
        case DR__IMAGE__RUN_KIND__RUN_PARENT:
                return "parent";
        default:
                return "invalid";
        }
}

/* ---- layout ---- */

int image_layout_check(const ImageLayout *lay)
{
        ImageLayout v = *lay;

        if (ram_layout_validate(&v, NULL, 0) < 0 || v.total_pages != lay->total_pages)
                return -EINVAL;
        return 0;
}

uint64_t image_layout_ram_size(const ImageLayout *lay)
{
        uint64_t end = 0;

        for (size_t i = 0; i < lay->n_regions; i++)
                end = MAX(end, lay->regions[i].fd_offset + lay->regions[i].size);
        return end;
}

/* Region index of VM-wide page `page`, and the first page after that region. */
size_t image_layout_region_of(const ImageLayout *lay, uint64_t page, uint64_t *ret_first, uint64_t *ret_end)
{
        uint64_t first = 0;

        for (size_t i = 0; i < lay->n_regions; i++) {
                uint64_t n = lay->regions[i].size / IMAGE_PAGE_SIZE;
                if (page < first + n) {
                        *ret_first = first;
                        *ret_end = first + n;
                        return i;
                }
                first += n;
        }
        return SIZE_MAX;
}

/* ---- file headers ---- */

void image_header_encode(uint8_t out[IMAGE_HEADER_SIZE], const char *magic, const uint8_t id[16],
                         uint64_t payload_len, uint32_t payload_crc)
{
        memset(out, 0, IMAGE_HEADER_SIZE);
        memcpy(out, magic, 8);
        put_le32(out + 8, IMAGE_FILE_VERSION);
        memcpy(out + 16, id, 16);
        put_le64(out + 32, payload_len);
        put_le32(out + 40, payload_crc);
        put_le32(out + 44, crc32c(0, out, 44));
}

int image_header_decode(const uint8_t *buf, size_t len, const char *magic, ImageFileHeader *ret, char *err,
                        size_t errlen)
{
        ImageFileHeader h;

        if (len < IMAGE_HEADER_SIZE)
                return FAIL(-EBADMSG, "truncated: %zu bytes, the header alone is %u", len,
                            IMAGE_HEADER_SIZE);
        if (memcmp(buf, magic, 8) != 0)
                return FAIL(-EBADMSG, "bad magic (not a %.8s file)", magic);
        if (image_get_le32(buf + 44) != crc32c(0, buf, 44))
                return FAIL(-EBADMSG, "header checksum mismatch");
        memcpy(h.magic, buf, 8);
        h.version = image_get_le32(buf + 8);
        if (h.version != IMAGE_FILE_VERSION)
                return FAIL(-EPROTONOSUPPORT,
                            "file version %" PRIu32 " is not supported (this reader knows %u)", h.version,
                            IMAGE_FILE_VERSION);
        if (image_get_le32(buf + 12) != 0)
                return FAIL(-EBADMSG, "reserved header field is not zero");
        memcpy(h.image_id, buf + 16, 16);
        h.payload_len = get_le64(buf + 32);
        h.payload_crc = image_get_le32(buf + 40);
        h.header_crc = image_get_le32(buf + 44);
        *ret = h;
        return 0;
}

/* ---- inventory ---- */

bool image_name_ok(const char *s)
{
        size_t n = strlen(s);

        if (n == 0 || n > IMAGE_NAME_MAX || s[0] == '.')
                return false;
        for (const char *p = s; *p; p++)
                if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
                      *p == '_' || *p == '-' || *p == '.'))
                        return false;
        return true;
}

int image_inventory_decode(const uint8_t *buf, size_t len, Dr__Image__Inventory **ret,
                           ImageLayout *ret_layout, char *err, size_t errlen)
{
        Dr__Image__Inventory *m;
        ImageLayout lay = {.page_size = IMAGE_PAGE_SIZE};
        char why[IMAGE_ERR_MAX] = "";
        bool seen[3] = {};
        static const char *const names[3] = {FILE_STATE, FILE_PAGEMAP, FILE_PAGES};
        int r = -EBADMSG;

        if (len > IMAGE_INVENTORY_MAX)
                return FAIL(-EFBIG, "inventory of %zu bytes exceeds %u", len, IMAGE_INVENTORY_MAX);
        m = dr__image__inventory__unpack(NULL, len, buf);
        if (!m)
                return FAIL(-EBADMSG, "inventory is not a valid protobuf message");

        if (m->format_version != DR__IMAGE__IMAGE_FORMAT__IMAGE_FORMAT_CURRENT) {
                r = FAIL(-EPROTONOSUPPORT, "image format %" PRIu32 " is not supported", m->format_version);
                goto bad;
        }
        if (m->image_id.len != 16 || (m->has_vm_uuid && m->vm_uuid.len != 16)) {
                r = FAIL(-EBADMSG, "image id or VM UUID is not 16 bytes");
                goto bad;
        }
        if (!image_name_ok(m->vm_name)) {
                r = FAIL(-EBADMSG, "invalid VM name");
                goto bad;
        }
        if (m->page_size != IMAGE_PAGE_SIZE) {
                r = FAIL(-EBADMSG, "page size %" PRIu32 " is not %u", m->page_size, IMAGE_PAGE_SIZE);
                goto bad;
        }
        if (m->n_regions < 1 || m->n_regions > IMAGE_MAX_REGIONS) {
                r = FAIL(-EBADMSG, "%zu RAM regions, expected 1..%u", m->n_regions, IMAGE_MAX_REGIONS);
                goto bad;
        }
        for (size_t i = 0; i < m->n_regions; i++)
                lay.regions[i] = (ImageRegion){
                        .slot = m->regions[i]->slot,
                        .guest_phys = m->regions[i]->guest_phys,
                        .size = m->regions[i]->size,
                        .fd_offset = m->regions[i]->fd_offset,
                };
        lay.n_regions = m->n_regions;
        if (ram_layout_validate(&lay, why, sizeof(why)) < 0) {
                r = FAIL(-EBADMSG, "invalid RAM layout: %s", why);
                goto bad;
        }
        if (lay.total_pages != m->total_pages) {
                r = FAIL(-EBADMSG,
                         "invalid RAM layout: %" PRIu64 " pages in total, the regions have %" PRIu64,
                         m->total_pages, lay.total_pages);
                goto bad;
        }
        if (m->n_vcpus < 1 || m->n_vcpus > IMAGE_MAX_VCPUS) {
                r = FAIL(-EBADMSG, "%" PRIu32 " vCPUs, expected 1..%u", m->n_vcpus, IMAGE_MAX_VCPUS);
                goto bad;
        }
        if (m->parent) {
                if (m->depth < 1 || m->depth > IMAGE_MAX_DEPTH || m->parent->image_id.len != 16 ||
                    m->parent->inventory_sha256.len != 32 || !m->parent->path[0] ||
                    strlen(m->parent->path) >= PATH_MAX) {
                        r = FAIL(-EBADMSG, "invalid parent reference (depth %" PRIu32 ")", m->depth);
                        goto bad;
                }
        } else if (m->depth != 0 || m->parent_pages != 0) {
                r = FAIL(-EBADMSG, "a full image with depth %" PRIu32 " or parent pages", m->depth);
                goto bad;
        }
        if (m->present_pages > m->total_pages || m->zero_pages > m->total_pages - m->present_pages ||
            m->parent_pages != m->total_pages - m->present_pages - m->zero_pages) {
                r = FAIL(-EBADMSG, "page counts do not add up to the RAM size");
                goto bad;
        }
        if (m->n_files != 3) {
                r = FAIL(-EBADMSG, "%zu files listed, expected 3", m->n_files);
                goto bad;
        }
        for (size_t i = 0; i < m->n_files; i++) {
                size_t k;
                for (k = 0; k < 3; k++)
                        if (streq(m->files[i]->name, names[k]))
                                break;
                if (k == 3 || seen[k]) {
                        r = FAIL(-EBADMSG, "unexpected or duplicate file entry");
                        goto bad;
                }
                seen[k] = true;
        }
        *ret = m;
        if (ret_layout)
                *ret_layout = lay;
        return 0;
bad:
        dr__image__inventory__free_unpacked(m, NULL);
        return r;
}

const Dr__Image__FileRef *image_inventory_file(const Dr__Image__Inventory *inv, const char *name)
{
        for (size_t i = 0; i < inv->n_files; i++)
                if (streq(inv->files[i]->name, name))
                        return inv->files[i];
        return NULL;
}

/* ---- page map ---- */

int image_pagemap_decode(const uint8_t *buf, size_t len, const ImageLayout *lay, bool has_parent,
                         uint64_t pages_len, Dr__Image__PageMap **ret, char *err, size_t errlen)
{
        Dr__Image__PageMap *m;
        uint64_t next = 0, data_end = 0;
        int r = -EBADMSG;

        if (len > IMAGE_PAGEMAP_MAX)
                return FAIL(-EFBIG, "page map of %zu bytes exceeds %u", len, IMAGE_PAGEMAP_MAX);
        m = dr__image__page_map__unpack(NULL, len, buf);
        if (!m)
                return FAIL(-EBADMSG, "page map is not a valid protobuf message");
        if (m->n_runs > lay->total_pages) {
                r = FAIL(-EBADMSG, "%zu runs for %" PRIu64 " pages", m->n_runs, lay->total_pages);
                goto bad;
        }
        for (size_t i = 0; i < m->n_runs; i++) {
                const Dr__Image__PageRun *run = m->runs[i];
                uint64_t rfirst, rend;

                if (run->first_page != next || run->n_pages == 0 || run->n_pages > lay->total_pages - next) {
                        r = FAIL(-EBADMSG,
                                 "run %zu (pages %" PRIu64 "+%" PRIu64 ") does not continue at page %" PRIu64
                                 " within the RAM",
                                 i, run->first_page, run->n_pages, next);
                        goto bad;
                }
                if (image_layout_region_of(lay, run->first_page, &rfirst, &rend) == SIZE_MAX ||
                    run->n_pages > rend - run->first_page) {
                        r = FAIL(-EBADMSG, "run %zu crosses a RAM region boundary", i);
                        goto bad;
                }
                switch (run->kind) {
                case DR__IMAGE__RUN_KIND__RUN_PRESENT: {
                        uint64_t raw = run->n_pages * IMAGE_PAGE_SIZE;
                        bool lz4 = run->has_compression &&
                                   run->compression == DR__IMAGE__COMPRESSION__COMPRESSION_LZ4;

                        if (run->n_pages > IMAGE_RUN_MAX_PAGES || !run->has_data_offset ||
                            !run->has_stored_len || !run->has_data_crc || run->data_offset != data_end) {
                                r = FAIL(-EBADMSG,
                                         "present run %zu: too long, fields missing or data not in order",
                                         i);
                                goto bad;
                        }
                        if (run->has_compression &&
                            run->compression != DR__IMAGE__COMPRESSION__COMPRESSION_NONE && !lz4) {
                                r = FAIL(-EBADMSG, "present run %zu: unknown compression", i);
                                goto bad;
                        }
                        if (lz4 ? (run->stored_len == 0 || run->stored_len >= raw)
                                : run->stored_len != raw) {
                                r = FAIL(-EBADMSG,
                                         "present run %zu: stored length %" PRIu64 " for %" PRIu64 " pages",
                                         i, run->stored_len, run->n_pages);
                                goto bad;
                        }
                        if (run->stored_len > pages_len - data_end) {
                                r = FAIL(-EBADMSG,
                                         "present run %zu ends beyond the page data (%" PRIu64 " bytes)", i,
                                         pages_len);
                                goto bad;
                        }
                        data_end += run->stored_len;
                        break;
                }
                case DR__IMAGE__RUN_KIND__RUN_ZERO:
                case DR__IMAGE__RUN_KIND__RUN_PARENT:
                        if (run->has_data_offset || run->has_stored_len || run->has_data_crc) {
                                r = FAIL(-EBADMSG, "run %zu has data fields but no data", i);
                                goto bad;
                        }
                        if (run->kind == DR__IMAGE__RUN_KIND__RUN_PARENT && !has_parent) {
                                r = FAIL(-EBADMSG, "run %zu refers to a parent, but this is a full image",
                                         i);
                                goto bad;
                        }
                        break;
                default:
                        r = FAIL(-EBADMSG, "run %zu has unknown kind %d", i, (int) run->kind);
                        goto bad;
                }
                next += run->n_pages;
        }
        if (next != lay->total_pages) {
                r = FAIL(-EBADMSG, "runs cover %" PRIu64 " of %" PRIu64 " pages", next, lay->total_pages);
                goto bad;
        }
        if (data_end != pages_len) {
                r = FAIL(-EBADMSG, "page data is %" PRIu64 " bytes, runs use %" PRIu64, pages_len, data_end);
                goto bad;
        }
        *ret = m;
        return 0;
bad:
        dr__image__page_map__free_unpacked(m, NULL);
        return r;
}

int image_read_file_at(int dfd, const char *name, uint64_t max, uint8_t **ret, size_t *ret_len)
{
        _cleanup_close_ int fd = openat(dfd, name, O_RDONLY | O_CLOEXEC | O_NOCTTY);
        _cleanup_free_ uint8_t *buf = NULL;
        struct stat st;
        int r;

        if (fd < 0)
                return -errno;
        if (fstat(fd, &st) < 0)
                return -errno;
        if (!S_ISREG(st.st_mode))
                return -EBADFD;
        if ((uint64_t) st.st_size > max)
                return -EFBIG;
        buf = malloc(st.st_size ? (size_t) st.st_size : 1);
        if (!buf)
                return -ENOMEM;
        r = loop_read_exact(fd, buf, (size_t) st.st_size);
        if (r < 0)
                return r;
        *ret = TAKE_PTR(buf);
        *ret_len = (size_t) st.st_size;
        return 0;
}

static void sha256(const uint8_t *buf, size_t len, uint8_t out[32])
{
        unsigned n = 32;
        (void) EVP_Digest(buf, len, out, &n, EVP_sha256(), NULL);
}

/* Reads and fully checks one image's inventory.img; *ret_sha gets the file's SHA-256. */
int image_inventory_load(int dfd, const char *dir, Dr__Image__Inventory **ret, ImageLayout *ret_lay,
                         uint8_t ret_sha[32], char *err, size_t errlen)
{
        _cleanup_free_ uint8_t *buf = NULL;
        char why[IMAGE_ERR_MAX] = "";
        ImageFileHeader h;
        size_t len;
        int r;

        r = image_read_file_at(dfd, FILE_INVENTORY, IMAGE_HEADER_SIZE + IMAGE_INVENTORY_MAX, &buf, &len);
        if (r == -ENOENT)
                return FAIL(r, "%s/%s: missing: not an image directory (or an interrupted one)", dir,
                            FILE_INVENTORY);
        if (r < 0)
                return FAIL(r, "%s/%s: cannot read: %s", dir, FILE_INVENTORY, strerror(-r));
        r = image_header_decode(buf, len, IMAGE_MAGIC_INVENTORY, &h, why, sizeof(why));
        if (r < 0)
                return FAIL(r, "%s/%s: %s", dir, FILE_INVENTORY, why);
        if (h.payload_len != len - IMAGE_HEADER_SIZE)
                return FAIL(-EBADMSG, "%s/%s: payload is %zu bytes, header says %" PRIu64, dir,
                            FILE_INVENTORY, len - IMAGE_HEADER_SIZE, h.payload_len);
        if (crc32c(0, buf + IMAGE_HEADER_SIZE, len - IMAGE_HEADER_SIZE) != h.payload_crc)
                return FAIL(-EBADMSG, "%s/%s: checksum mismatch", dir, FILE_INVENTORY);
        r = image_inventory_decode(buf + IMAGE_HEADER_SIZE, len - IMAGE_HEADER_SIZE, ret, ret_lay, why,
                                   sizeof(why));
        if (r < 0)
                return FAIL(r, "%s/%s: %s", dir, FILE_INVENTORY, why);
        if (memcmp((*ret)->image_id.data, h.image_id, 16) != 0) {
                *ret = (dr__image__inventory__free_unpacked(*ret, NULL), NULL);
                return FAIL(-EBADMSG, "%s/%s: header and inventory name different images", dir,
                            FILE_INVENTORY);
        }
        if (ret_sha)
                sha256(buf, len, ret_sha);
        return 0;
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Checkpoint images: writer (from a staging memfd), reader, chain checks,
 * restore. Format: proto/image.proto; API and the capture protocol: imagefile.h.
 */
#include <assert.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <lz4.h>
#include <openssl/evp.h>

#include "crc32c.h"
#include "imagefile.h"
#include "util.h"
#include "vmstate.pb-c.h"

#define FILE_INVENTORY "inventory.img"
#define FILE_STATE     "state.img"
#define FILE_PAGEMAP   "pagemap.img"
#define FILE_PAGES     "pages.img"

#define RUN_MAX_BYTES ((size_t) IMAGE_RUN_MAX_PAGES * IMAGE_PAGE_SIZE)
#define WBUF_SIZE     (4U << 20)

_printf_(3, 4) static int fail(char *err, size_t errlen, const char *fmt, ...)
{
        va_list ap;

        if (err && errlen > 0) {
                va_start(ap, fmt);
                vsnprintf(err, errlen, fmt, ap);
                va_end(ap);
        }
        return 0;
}

#define FAIL(r, ...) (fail(err, errlen, __VA_ARGS__), (r))

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

static uint32_t get_le32(const uint8_t *p)
{
        return (uint32_t) p[0] | (uint32_t) p[1] << 8 | (uint32_t) p[2] << 16 | (uint32_t) p[3] << 24;
}

static uint64_t get_le64(const uint8_t *p)
{
        return (uint64_t) get_le32(p) | (uint64_t) get_le32(p + 4) << 32;
}

static inline bool bit_test(const uint64_t *bits, uint64_t i)
{
        return bits[i / 64] & (1ULL << (i % 64));
}

static inline void bit_set(uint64_t *bits, uint64_t i)
{
        bits[i / 64] |= 1ULL << (i % 64);
}

static bool page_is_zero(const uint8_t *p)
{
        const uint64_t *w = (const uint64_t *) p;
        uint64_t acc = 0;

        for (size_t i = 0; i < IMAGE_PAGE_SIZE / 8; i += 8)
                acc |= w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7];
        return acc == 0;
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
        uint64_t pages = 0;

        if (lay->page_size != IMAGE_PAGE_SIZE || lay->n_regions < 1 || lay->n_regions > IMAGE_MAX_REGIONS)
                return -EINVAL;
        for (size_t i = 0; i < lay->n_regions; i++) {
                const ImageRegion *a = &lay->regions[i];

                if (a->size == 0 || a->size % IMAGE_PAGE_SIZE || a->guest_phys % IMAGE_PAGE_SIZE ||
                    a->fd_offset % IMAGE_PAGE_SIZE || a->size > IMAGE_RAM_MAX ||
                    a->guest_phys > UINT64_MAX - a->size || a->fd_offset > IMAGE_RAM_MAX)
                        return -EINVAL;
                for (size_t j = 0; j < i; j++) {
                        const ImageRegion *b = &lay->regions[j];
                        if (a->guest_phys < b->guest_phys + b->size &&
                            b->guest_phys < a->guest_phys + a->size)
                                return -EINVAL;
                        if (a->fd_offset < b->fd_offset + b->size && b->fd_offset < a->fd_offset + a->size)
                                return -EINVAL;
                        if (a->slot == b->slot)
                                return -EINVAL;
                }
                pages += a->size / IMAGE_PAGE_SIZE;
        }
        if (pages != lay->total_pages || pages > IMAGE_RAM_MAX / IMAGE_PAGE_SIZE)
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

static bool layout_equal(const ImageLayout *a, const ImageLayout *b)
{
        if (a->page_size != b->page_size || a->n_regions != b->n_regions || a->total_pages != b->total_pages)
                return false;
        for (size_t i = 0; i < a->n_regions; i++)
                if (a->regions[i].slot != b->regions[i].slot ||
                    a->regions[i].guest_phys != b->regions[i].guest_phys ||
                    a->regions[i].size != b->regions[i].size ||
                    a->regions[i].fd_offset != b->regions[i].fd_offset)
                        return false;
        return true;
}

/* Region index of VM-wide page `page`, and the first page after that region. */
static size_t layout_region_of(const ImageLayout *lay, uint64_t page, uint64_t *ret_first, uint64_t *ret_end)
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

static void header_encode(uint8_t out[IMAGE_HEADER_SIZE], const char *magic, const uint8_t id[16],
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
        if (get_le32(buf + 44) != crc32c(0, buf, 44))
                return FAIL(-EBADMSG, "header checksum mismatch");
        memcpy(h.magic, buf, 8);
        h.version = get_le32(buf + 8);
        if (h.version != IMAGE_FILE_VERSION)
                return FAIL(-EPROTONOSUPPORT,
                            "file version %" PRIu32 " is not supported (this reader knows %u)", h.version,
                            IMAGE_FILE_VERSION);
        if (get_le32(buf + 12) != 0)
                return FAIL(-EBADMSG, "reserved header field is not zero");
        memcpy(h.image_id, buf + 16, 16);
        h.payload_len = get_le64(buf + 32);
        h.payload_crc = get_le32(buf + 40);
        h.header_crc = get_le32(buf + 44);
        *ret = h;
        return 0;
}

/* ---- inventory ---- */

static bool name_ok(const char *s)
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
        if (!name_ok(m->vm_name)) {
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
        lay.total_pages = m->total_pages;
        if (image_layout_check(&lay) < 0) {
                r = FAIL(-EBADMSG, "invalid RAM layout (sizes, alignment, overlaps or total)");
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

static const Dr__Image__FileRef *inventory_file(const Dr__Image__Inventory *inv, const char *name)
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
                if (layout_region_of(lay, run->first_page, &rfirst, &rend) == SIZE_MAX ||
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

/* ---- capture ---- */

struct ImageCapture {
        ImageLayout lay;
        const uint8_t *ram[IMAGE_MAX_REGIONS];
        int staging_fd;
        uint8_t *staging; /* total_pages * page, MAP_SHARED, sparse */
        uint64_t *staged; /* pages holding data in staging */
        uint64_t *copied; /* pages passed to image_capture_copy() */
};

int image_capture_new(const ImageLayout *lay, const uint8_t *const *ram, ImageCapture **ret)
{
        _cleanup_(image_capture_freep) ImageCapture *c = NULL;
        uint64_t words = (lay->total_pages + 63) / 64, bytes;
        void *p;

        if (image_layout_check(lay) < 0)
                return -EINVAL;
        c = calloc(1, sizeof(*c));
        if (!c)
                return -ENOMEM;
        c->staging_fd = -EBADF;
        c->lay = *lay;
        for (size_t i = 0; i < lay->n_regions; i++)
                c->ram[i] = ram[i];
        c->staged = calloc(words, sizeof(uint64_t));
        c->copied = calloc(words, sizeof(uint64_t));
        if (!c->staged || !c->copied)
                return -ENOMEM;
        bytes = lay->total_pages * IMAGE_PAGE_SIZE;
        c->staging_fd = memfd_new_sized("dirtyrep-image-staging", bytes);
        if (c->staging_fd < 0)
                return c->staging_fd;
        p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, c->staging_fd, 0);
        if (p == MAP_FAILED)
                return -errno;
        c->staging = p;
        *ret = TAKE_PTR(c);
        return 0;
}

ImageCapture *image_capture_free(ImageCapture *c)
{
        if (!c)
                return NULL;
        if (c->staging)
                munmap(c->staging, c->lay.total_pages * IMAGE_PAGE_SIZE);
        safe_close(c->staging_fd);
        free(c->staged);
        free(c->copied);
        free(c);
        return NULL;
}

int64_t image_capture_copy(ImageCapture *c, const uint64_t *pages)
{
        uint64_t page = 0, n = 0;

        for (size_t i = 0; i < c->lay.n_regions; i++) {
                uint64_t np = c->lay.regions[i].size / IMAGE_PAGE_SIZE;

                for (uint64_t k = 0; k < np; k++, page++) {
                        const uint8_t *src;
                        uint8_t *dst;

                        if (pages) {
                                /* Skip empty words quickly: dirty sets are sparse. */
                                if (page % 64 == 0 && pages[page / 64] == 0 && np - k >= 64) {
                                        k += 63;
                                        page += 63;
                                        continue;
                                }
                                if (!bit_test(pages, page))
                                        continue;
                        }
                        bit_set(c->copied, page);
                        src = c->ram[i] + k * IMAGE_PAGE_SIZE;
                        dst = c->staging + page * IMAGE_PAGE_SIZE;
                        /* A zero page that was never staged already reads as zero there. */
                        if (!bit_test(c->staged, page) && page_is_zero(src))
                                continue;
                        memcpy(dst, src, IMAGE_PAGE_SIZE);
                        bit_set(c->staged, page);
                        n++;
                }
        }
        return (int64_t) n;
}

/* A buffered writer that also counts bytes. */
typedef struct WBuf {
        int fd;
        uint8_t *buf;
        size_t used;
        uint64_t written;
} WBuf;

static int wbuf_flush(WBuf *w)
{
        int r;

        if (w->used == 0)
                return 0;
        r = loop_write(w->fd, w->buf, w->used);
        if (r < 0)
                return r;
        w->used = 0;
        return 0;
}

static int wbuf_put(WBuf *w, const void *data, size_t len)
{
        if (len >= WBUF_SIZE) {
                int r = wbuf_flush(w);
                if (r < 0)
                        return r;
                r = loop_write(w->fd, data, len);
                if (r < 0)
                        return r;
                w->written += len;
                return 0;
        }
        if (w->used + len > WBUF_SIZE) {
                int r = wbuf_flush(w);
                if (r < 0)
                        return r;
        }
        memcpy(w->buf + w->used, data, len);
        w->used += len;
        w->written += len;
        return 0;
}

/* Growable array of runs for the page map. */
typedef struct RunVec {
        Dr__Image__PageRun *v;
        size_t n, cap;
} RunVec;

static Dr__Image__PageRun *runvec_push(RunVec *rv)
{
        if (rv->n == rv->cap) {
                size_t cap = rv->cap ? rv->cap * 2 : 1024;
                Dr__Image__PageRun *v = reallocarray(rv->v, cap, sizeof(*v));
                if (!v)
                        return NULL;
                rv->v = v;
                rv->cap = cap;
        }
        dr__image__page_run__init(&rv->v[rv->n]);
        return &rv->v[rv->n++];
}

static int write_small_file(int dfd, const char *name, const char *magic, const uint8_t id[16],
                            const uint8_t *payload, size_t len, uint64_t *ret_size, uint32_t *ret_header_crc)
{
        _cleanup_close_ int fd = -EBADF;
        uint8_t h[IMAGE_HEADER_SIZE];
        int r;

        header_encode(h, magic, id, len, crc32c(0, payload, len));
        fd = openat(dfd, name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd < 0)
                return -errno;
        r = loop_write(fd, h, sizeof(h));
        if (r >= 0)
                r = loop_write(fd, payload, len);
        if (r < 0)
                return r;
        if (fsync(fd) < 0)
                return -errno;
        if (ret_size)
                *ret_size = IMAGE_HEADER_SIZE + len;
        if (ret_header_crc)
                *ret_header_crc = get_le32(h + 44);
        return 0;
}

static int read_file_at(int dfd, const char *name, uint64_t max, uint8_t **ret, size_t *ret_len)
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
static int inventory_load(int dfd, const char *dir, Dr__Image__Inventory **ret, ImageLayout *ret_lay,
                          uint8_t ret_sha[32], char *err, size_t errlen)
{
        _cleanup_free_ uint8_t *buf = NULL;
        char why[IMAGE_ERR_MAX] = "";
        ImageFileHeader h;
        size_t len;
        int r;

        r = read_file_at(dfd, FILE_INVENTORY, IMAGE_HEADER_SIZE + IMAGE_INVENTORY_MAX, &buf, &len);
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

/* Parent path as stored: relative to the new image's directory when both share a directory. */
static int parent_ref_path(const char *dir, const char *parent, char **ret)
{
        _cleanup_free_ char *pabs = NULL, *dcopy = NULL, *dparent = NULL, *pcopy = NULL;
        char *s;

        pabs = realpath(parent, NULL);
        if (!pabs)
                return -errno;
        dcopy = strdup(dir);
        pcopy = strdup(pabs);
        if (!dcopy || !pcopy)
                return -ENOMEM;
        dparent = realpath(dirname(dcopy), NULL);
        if (!dparent)
                return -errno;
        if (streq(dirname(pcopy), dparent)) {
                if (asprintf(&s, "../%s", basename(pabs)) < 0)
                        return -ENOMEM;
        } else {
                s = TAKE_PTR(pabs);
        }
        *ret = s;
        return 0;
}

static int fsync_dir(const char *path)
{
        _cleanup_close_ int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0)
                return -errno;
        return fsync(fd) < 0 ? -errno : 0;
}

static int rm_rf_flat(const char *path)
{
        DIR *d = opendir(path);
        struct dirent *de;

        if (!d)
                return -errno;
        while ((de = readdir(d)))
                if (!streq(de->d_name, ".") && !streq(de->d_name, ".."))
                        (void) unlinkat(dirfd(d), de->d_name, 0);
        closedir(d);
        return rmdir(path) < 0 ? -errno : 0;
}

static uint64_t realtime_usec(void)
{
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        return (uint64_t) ts.tv_sec * USEC_PER_SEC + (uint64_t) ts.tv_nsec / 1000;
}

/* Writes pages.img (payload after a 4 KiB header) and fills the run list. */
static int write_pages(ImageCapture *c, int dfd, const uint8_t id[16], const uint64_t *covered,
                       bool compress, RunVec *rv, ImageWriteStats *st, uint64_t *ret_size,
                       uint32_t *ret_header_crc)
{
        _cleanup_close_ int fd = -EBADF;
        _cleanup_free_ uint8_t *buf = NULL, *zbuf = NULL;
        uint8_t hdr[IMAGE_PAGES_DATA_OFF] = {};
        WBuf w = {};
        uint64_t page = 0;
        int r;

        fd = openat(dfd, FILE_PAGES, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd < 0)
                return -errno;
        buf = malloc(WBUF_SIZE);
        zbuf = compress ? malloc((size_t) LZ4_compressBound((int) RUN_MAX_BYTES)) : NULL;
        if (!buf || (compress && !zbuf))
                return -ENOMEM;
        /* The header is written last: a file without it is not a valid image file. */
        r = loop_write(fd, hdr, sizeof(hdr));
        if (r < 0)
                return r;
        w = (WBuf){.fd = fd, .buf = buf};

        for (size_t ri = 0; ri < c->lay.n_regions; ri++) {
                uint64_t end = page + c->lay.regions[ri].size / IMAGE_PAGE_SIZE;

                while (page < end) {
                        Dr__Image__RunKind kind;
                        Dr__Image__PageRun *run;
                        uint64_t first = page;
                        bool cov = !covered || bit_test(covered, page);

                        if (cov && !bit_test(c->copied, page))
                                return -EINVAL; /* the caller never copied a page it wants stored */
                        kind = !cov ? DR__IMAGE__RUN_KIND__RUN_PARENT
                               : (!bit_test(c->staged, page) ||
                                  page_is_zero(c->staging + page * IMAGE_PAGE_SIZE))
                                       ? DR__IMAGE__RUN_KIND__RUN_ZERO
                                       : DR__IMAGE__RUN_KIND__RUN_PRESENT;
                        for (page++; page < end; page++) {
                                Dr__Image__RunKind k;

                                if (kind == DR__IMAGE__RUN_KIND__RUN_PRESENT &&
                                    page - first >= IMAGE_RUN_MAX_PAGES)
                                        break;
                                cov = !covered || bit_test(covered, page);
                                if (cov && !bit_test(c->copied, page))
                                        return -EINVAL;
                                k = !cov ? DR__IMAGE__RUN_KIND__RUN_PARENT
                                    : (!bit_test(c->staged, page) ||
                                       page_is_zero(c->staging + page * IMAGE_PAGE_SIZE))
                                            ? DR__IMAGE__RUN_KIND__RUN_ZERO
                                            : DR__IMAGE__RUN_KIND__RUN_PRESENT;
                                if (k != kind)
                                        break;
                        }
                        run = runvec_push(rv);
                        if (!run)
                                return -ENOMEM;
                        run->first_page = first;
                        run->n_pages = page - first;
                        run->kind = kind;
                        if (kind == DR__IMAGE__RUN_KIND__RUN_PRESENT) {
                                const uint8_t *src = c->staging + first * IMAGE_PAGE_SIZE;
                                size_t raw = (size_t) run->n_pages * IMAGE_PAGE_SIZE;
                                int clen = 0;

                                if (compress)
                                        clen = LZ4_compress_default((const char *) src, (char *) zbuf,
                                                                    (int) raw,
                                                                    LZ4_compressBound((int) RUN_MAX_BYTES));
                                run->has_data_offset = run->has_stored_len = run->has_data_crc = true;
                                run->data_offset = w.written;
                                if (clen > 0 && (size_t) clen < raw) {
                                        run->has_compression = true;
                                        run->compression = DR__IMAGE__COMPRESSION__COMPRESSION_LZ4;
                                        run->stored_len = (uint64_t) clen;
                                        run->data_crc = crc32c(0, zbuf, (size_t) clen);
                                        r = wbuf_put(&w, zbuf, (size_t) clen);
                                } else {
                                        run->stored_len = raw;
                                        run->data_crc = crc32c(0, src, raw);
                                        r = wbuf_put(&w, src, raw);
                                }
                                if (r < 0)
                                        return r;
                                st->present_pages += run->n_pages;
                        } else if (kind == DR__IMAGE__RUN_KIND__RUN_ZERO)
                                st->zero_pages += run->n_pages;
                        else
                                st->parent_pages += run->n_pages;
                }
        }
        r = wbuf_flush(&w);
        if (r < 0)
                return r;
        st->stored_bytes = w.written;
        st->runs = rv->n;
        header_encode(hdr, IMAGE_MAGIC_PAGES, id, w.written, 0);
        if (pwrite(fd, hdr, IMAGE_HEADER_SIZE, 0) != IMAGE_HEADER_SIZE)
                return -EIO;
        if (fsync(fd) < 0)
                return -errno;
        *ret_size = IMAGE_PAGES_DATA_OFF + w.written;
        *ret_header_crc = get_le32(hdr + 44);
        return 0;
}

int image_capture_write(ImageCapture *c, const char *dir, const ImageWriteOptions *o,
                        ImageWriteStats *ret_stats, char *err, size_t errlen)
{
        _cleanup_free_ char *tmp = NULL, *dcopy = NULL, *parent_path = NULL, *dparent = NULL;
        _cleanup_free_ uint8_t *map_buf = NULL, *inv_buf = NULL;
        _cleanup_free_ Dr__Image__PageRun **run_ptrs = NULL;
        _cleanup_close_ int dfd = -EBADF;
        Dr__Image__Inventory *pinv = NULL;
        Dr__Image__Inventory inv = DR__IMAGE__INVENTORY__INIT;
        Dr__Image__ParentRef pref = DR__IMAGE__PARENT_REF__INIT;
        Dr__Image__PageMap map = DR__IMAGE__PAGE_MAP__INIT;
        Dr__Image__Region regs[IMAGE_MAX_REGIONS], *reg_ptrs[IMAGE_MAX_REGIONS];
        Dr__Image__FileRef files[3], *file_ptrs[3];
        Dr__Vmstate__VmState *vs;
        ImageWriteStats st = {};
        RunVec rv = {};
        uint8_t id[16], psha[32];
        uint64_t t0 = now_nsec(), sizes[3];
        uint32_t hcrcs[3];
        size_t map_len, inv_len, n_vcpus;
        struct stat sst;
        bool done = false;
        int r;

        if (!o->vm_name || !name_ok(o->vm_name))
                return FAIL(-EINVAL, "invalid VM name");
        if (!o->state || o->state_len == 0 || o->state_len > IMAGE_STATE_MAX)
                return FAIL(-EINVAL, "VM state missing or larger than %u bytes", IMAGE_STATE_MAX);
        if (!!o->parent != !!o->covered)
                return FAIL(-EINVAL,
                            "an incremental image needs both a parent and the set of pages dirtied since");
        vs = dr__vmstate__vm_state__unpack(NULL, o->state_len, o->state);
        if (!vs)
                return FAIL(-EBADMSG, "the VM state is not a valid VmState message");
        n_vcpus = vs->n_vcpus;
        dr__vmstate__vm_state__free_unpacked(vs, NULL);
        if (n_vcpus < 1 || n_vcpus > IMAGE_MAX_VCPUS)
                return FAIL(-EBADMSG, "the VM state has %zu vCPUs", n_vcpus);
        if (lstat(dir, &sst) == 0)
                return FAIL(-EEXIST, "%s already exists", dir);

        if (o->parent) {
                _cleanup_close_ int pfd = open(o->parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
                ImageLayout play;

                if (pfd < 0)
                        return FAIL(-errno, "parent image %s: %m", o->parent);
                r = inventory_load(pfd, o->parent, &pinv, &play, psha, err, errlen);
                if (r < 0)
                        return r;
                if (!layout_equal(&play, &c->lay) || !streq(pinv->vm_name, o->vm_name)) {
                        dr__image__inventory__free_unpacked(pinv, NULL);
                        return FAIL(-EINVAL, "parent image %s is of another VM or RAM layout", o->parent);
                }
                if (o->parent_id && memcmp(o->parent_id, pinv->image_id.data, 16) != 0) {
                        dr__image__inventory__free_unpacked(pinv, NULL);
                        return FAIL(-ESTALE,
                                    "parent image %s is not the last image taken of this VM; an incremental "
                                    "image can only follow that one (or take a full image)",
                                    o->parent);
                }
                if (pinv->depth + 1 > IMAGE_MAX_DEPTH) {
                        dr__image__inventory__free_unpacked(pinv, NULL);
                        return FAIL(-ELOOP, "parent image %s is %u deep already; take a full image",
                                    o->parent, pinv->depth);
                }
                r = parent_ref_path(dir, o->parent, &parent_path);
                if (r < 0) {
                        dr__image__inventory__free_unpacked(pinv, NULL);
                        return FAIL(r, "parent image %s: %s", o->parent, strerror(-r));
                }
        }

        if (getrandom(id, sizeof(id), 0) != sizeof(id)) {
                r = FAIL(-errno, "getrandom: %m");
                goto out;
        }
        dcopy = strdup(dir);
        if (!dcopy) {
                r = -ENOMEM;
                goto out;
        }
        dparent = strdup(dirname(dcopy));
        free(dcopy);
        dcopy = strdup(dir);
        if (!dparent || !dcopy || asprintf(&tmp, "%s/.%s.tmp-XXXXXX", dparent, basename(dcopy)) < 0) {
                r = -ENOMEM;
                goto out;
        }
        if (!mkdtemp(tmp)) {
                r = FAIL(-errno, "cannot create a temporary directory next to %s: %m", dir);
                goto out;
        }
        dfd = open(tmp, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd < 0) {
                r = FAIL(-errno, "%s: %m", tmp);
                goto out;
        }

        /* Data first, inventory last: until inventory.img is complete nothing here is an image. */
        r = write_pages(c, dfd, id, o->covered, o->compress, &rv, &st, &sizes[2], &hcrcs[2]);
        if (r == -EINVAL) {
                r = FAIL(r, "a page to be stored was never copied into staging (capture protocol violated)");
                goto out;
        }
        if (r < 0) {
                r = FAIL(r, "%s/%s: %s", tmp, FILE_PAGES, strerror(-r));
                goto out;
        }

        run_ptrs = calloc(rv.n ? rv.n : 1, sizeof(*run_ptrs));
        if (!run_ptrs) {
                r = -ENOMEM;
                goto out;
        }
        for (size_t i = 0; i < rv.n; i++)
                run_ptrs[i] = &rv.v[i];
        map.n_runs = rv.n;
        map.runs = run_ptrs;
        map_len = dr__image__page_map__get_packed_size(&map);
        if (map_len > IMAGE_PAGEMAP_MAX) {
                r = FAIL(-E2BIG, "page map of %zu runs is too large (%zu bytes); take a full image", rv.n,
                         map_len);
                goto out;
        }
        map_buf = malloc(map_len ? map_len : 1);
        if (!map_buf) {
                r = -ENOMEM;
                goto out;
        }
        dr__image__page_map__pack(&map, map_buf);
        r = write_small_file(dfd, FILE_PAGEMAP, IMAGE_MAGIC_PAGEMAP, id, map_buf, map_len, &sizes[1],
                             &hcrcs[1]);
        if (r >= 0)
                r = write_small_file(dfd, FILE_STATE, IMAGE_MAGIC_STATE, id, o->state, o->state_len,
                                     &sizes[0], &hcrcs[0]);
        if (r < 0) {
                r = FAIL(r, "writing %s: %s", tmp, strerror(-r));
                goto out;
        }

        inv.format_version = DR__IMAGE__IMAGE_FORMAT__IMAGE_FORMAT_CURRENT;
        inv.image_id = (ProtobufCBinaryData){.len = 16, .data = id};
        inv.vm_name = (char *) o->vm_name;
        if (o->vm_uuid) {
                inv.has_vm_uuid = true;
                inv.vm_uuid = (ProtobufCBinaryData){.len = 16, .data = (uint8_t *) o->vm_uuid};
        }
        inv.page_size = IMAGE_PAGE_SIZE;
        for (size_t i = 0; i < c->lay.n_regions; i++) {
                dr__image__region__init(&regs[i]);
                regs[i].slot = c->lay.regions[i].slot;
                regs[i].guest_phys = c->lay.regions[i].guest_phys;
                regs[i].size = c->lay.regions[i].size;
                regs[i].fd_offset = c->lay.regions[i].fd_offset;
                reg_ptrs[i] = &regs[i];
        }
        inv.n_regions = c->lay.n_regions;
        inv.regions = reg_ptrs;
        inv.total_pages = c->lay.total_pages;
        inv.created_usec = realtime_usec();
        inv.n_vcpus = (uint32_t) n_vcpus;
        if (pinv) {
                pref.path = parent_path;
                pref.image_id = pinv->image_id;
                pref.inventory_sha256 = (ProtobufCBinaryData){.len = 32, .data = psha};
                inv.parent = &pref;
                inv.depth = pinv->depth + 1;
        }
        {
                static const char *const names[3] = {FILE_STATE, FILE_PAGEMAP, FILE_PAGES};
                for (size_t i = 0; i < 3; i++) {
                        dr__image__file_ref__init(&files[i]);
                        files[i].name = (char *) names[i];
                        files[i].size = sizes[i];
                        files[i].header_crc = hcrcs[i];
                        file_ptrs[i] = &files[i];
                }
        }
        inv.n_files = 3;
        inv.files = file_ptrs;
        inv.present_pages = st.present_pages;
        inv.zero_pages = st.zero_pages;
        inv.parent_pages = st.parent_pages;
        inv.has_epoch = true;
        inv.epoch = o->epoch;
        inv_len = dr__image__inventory__get_packed_size(&inv);
        if (inv_len > IMAGE_INVENTORY_MAX) {
                r = FAIL(-E2BIG, "inventory too large");
                goto out;
        }
        inv_buf = malloc(inv_len);
        if (!inv_buf) {
                r = -ENOMEM;
                goto out;
        }
        dr__image__inventory__pack(&inv, inv_buf);
        r = write_small_file(dfd, FILE_INVENTORY, IMAGE_MAGIC_INVENTORY, id, inv_buf, inv_len, NULL, NULL);
        if (r < 0) {
                r = FAIL(r, "writing %s/%s: %s", tmp, FILE_INVENTORY, strerror(-r));
                goto out;
        }
        if (fsync(dfd) < 0) {
                r = FAIL(-errno, "fsync %s: %m", tmp);
                goto out;
        }
        /* RENAME_NOREPLACE: never clobber an image that appeared meanwhile. */
        if (renameat2(AT_FDCWD, tmp, AT_FDCWD, dir, RENAME_NOREPLACE) < 0) {
                r = FAIL(-errno, "cannot rename %s to %s: %m", tmp, dir);
                goto out;
        }
        done = true;
        r = fsync_dir(dparent);
        if (r < 0) {
                r = FAIL(r, "fsync %s: %s", dparent, strerror(-r));
                goto out;
        }
        st.total_bytes = sizes[0] + sizes[1] + sizes[2] + IMAGE_HEADER_SIZE + inv_len;
        st.write_ns = now_nsec() - t0;
        memcpy(st.image_id, id, 16);
        if (ret_stats)
                *ret_stats = st;
        r = 0;
out:
        if (!done && tmp && dfd >= 0)
                (void) rm_rf_flat(tmp);
        free(rv.v);
        if (pinv)
                dr__image__inventory__free_unpacked(pinv, NULL);
        return r;
}

/* ---- reading ---- */

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
        const Dr__Image__FileRef *fr = inventory_file(img->inv, name);
        char why[IMAGE_ERR_MAX] = "";
        ImageFileHeader h;
        size_t len;
        int r;

        r = read_file_at(dfd, name, IMAGE_HEADER_SIZE + max, &buf, &len);
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
        const Dr__Image__FileRef *fr = inventory_file(img->inv, FILE_PAGES);
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
        r = inventory_load(dfd, dir, &img->inv, &img->layout, img->inv_sha256, err, errlen);
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
                if (p->inv->depth + 1 != cur->inv->depth || !layout_equal(&p->layout, &cur->layout) ||
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
                size_t ri = layout_region_of(&img->layout, run->first_page, &rfirst, &rend);
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

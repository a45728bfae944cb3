/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Checkpoint images, the writer: staging (image_capture_new/copy) and
 * image_capture_write(), which writes an image directory crash-safe in named
 * steps. The format and its checks are format.c; API: imagefile.h.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <lz4.h>

#include "crc32c.h"
#include "image-internal.h"
#include "util.h"
#include "vmstate.pb-c.h"

#define WBUF_SIZE (4U << 20)

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
        (void) ram_layout_validate(&c->lay, NULL, 0); /* checked above: sets the derived fields */
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

        image_header_encode(h, magic, id, len, crc32c(0, payload, len));
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
                *ret_header_crc = image_get_le32(h + 44);
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

/* What page `page` is in the image: PARENT when not covered, else ZERO or PRESENT as staged. */
static int page_kind(const ImageCapture *c, const uint64_t *covered, uint64_t page, Dr__Image__RunKind *ret)
{
        if (covered && !bit_test(covered, page)) {
                *ret = DR__IMAGE__RUN_KIND__RUN_PARENT;
                return 0;
        }
        if (!bit_test(c->copied, page))
                return -EINVAL; /* the caller never copied a page it wants stored */
        *ret = !bit_test(c->staged, page) || page_is_zero(c->staging + page * IMAGE_PAGE_SIZE)
                       ? DR__IMAGE__RUN_KIND__RUN_ZERO
                       : DR__IMAGE__RUN_KIND__RUN_PRESENT;
        return 0;
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

                        r = page_kind(c, covered, page, &kind);
                        if (r < 0)
                                return r;
                        for (page++; page < end; page++) {
                                Dr__Image__RunKind k;

                                if (kind == DR__IMAGE__RUN_KIND__RUN_PRESENT &&
                                    page - first >= IMAGE_RUN_MAX_PAGES)
                                        break;
                                r = page_kind(c, covered, page, &k);
                                if (r < 0)
                                        return r;
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
        image_header_encode(hdr, IMAGE_MAGIC_PAGES, id, w.written, 0);
        if (pwrite(fd, hdr, IMAGE_HEADER_SIZE, 0) != IMAGE_HEADER_SIZE)
                return -EIO;
        if (fsync(fd) < 0)
                return -errno;
        *ret_size = IMAGE_PAGES_DATA_OFF + w.written;
        *ret_header_crc = image_get_le32(hdr + 44);
        return 0;
}

/*
 * One image_capture_write(): what its steps share. write_job_done() releases
 * everything, and removes the temporary directory unless it was renamed into
 * place.
 */
typedef struct WriteJob {
        ImageCapture *c;
        const char *dir;
        const ImageWriteOptions *o;
        char *err;
        size_t errlen;

        size_t n_vcpus;
        Dr__Image__Inventory *pinv; /* the parent's, or NULL */
        uint8_t psha[32];           /* SHA-256 of the parent's inventory.img */
        char *parent_path;          /* as stored in the inventory */

        uint8_t id[16];
        char *dparent; /* the directory dir is created in */
        char *tmp;     /* the temporary directory next to dir, once created */
        int dfd;       /* tmp, open */
        bool renamed;  /* tmp is dir now */

        RunVec rv;
        ImageWriteStats st;
        uint64_t sizes[3]; /* state, page map, pages: as FILE_STATE, FILE_PAGEMAP, FILE_PAGES */
        uint32_t hcrcs[3];
        size_t inv_len;
} WriteJob;

static void write_job_done(WriteJob *j)
{
        if (j->tmp && !j->renamed)
                (void) rm_rf_flat(j->tmp);
        safe_close(j->dfd);
        free(j->tmp);
        free(j->dparent);
        free(j->parent_path);
        free(j->rv.v);
        if (j->pinv)
                dr__image__inventory__free_unpacked(j->pinv, NULL);
}

/* Step 1: the options and the VM state, before anything is written. */
static int write_check_options(WriteJob *j)
{
        const ImageWriteOptions *o = j->o;
        Dr__Vmstate__VmState *vs;
        char *err = j->err;
        size_t errlen = j->errlen;
        struct stat sst;

        if (!o->vm_name || !image_name_ok(o->vm_name))
                return FAIL(-EINVAL, "invalid VM name");
        if (!o->state || o->state_len == 0 || o->state_len > IMAGE_STATE_MAX)
                return FAIL(-EINVAL, "VM state missing or larger than %u bytes", IMAGE_STATE_MAX);
        if (!!o->parent != !!o->covered)
                return FAIL(-EINVAL,
                            "an incremental image needs both a parent and the set of pages dirtied since");
        vs = dr__vmstate__vm_state__unpack(NULL, o->state_len, o->state);
        if (!vs)
                return FAIL(-EBADMSG, "the VM state is not a valid VmState message");
        j->n_vcpus = vs->n_vcpus;
        dr__vmstate__vm_state__free_unpacked(vs, NULL);
        if (j->n_vcpus < 1 || j->n_vcpus > IMAGE_MAX_VCPUS)
                return FAIL(-EBADMSG, "the VM state has %zu vCPUs", j->n_vcpus);
        if (lstat(j->dir, &sst) == 0)
                return FAIL(-EEXIST, "%s already exists", j->dir);
        return 0;
}

/* Step 2 (incremental only): the parent's inventory, checked and hashed; it must be the one we follow. */
static int write_load_parent(WriteJob *j)
{
        const ImageWriteOptions *o = j->o;
        _cleanup_close_ int pfd = -EBADF;
        char *err = j->err;
        size_t errlen = j->errlen;
        ImageLayout play;
        int r;

        if (!o->parent)
                return 0;
        pfd = open(o->parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (pfd < 0)
                return FAIL(-errno, "parent image %s: %m", o->parent);
        r = image_inventory_load(pfd, o->parent, &j->pinv, &play, j->psha, err, errlen);
        if (r < 0)
                return r;
        if (!ram_layout_equal(&play, &j->c->lay) || !streq(j->pinv->vm_name, o->vm_name))
                return FAIL(-EINVAL, "parent image %s is of another VM or RAM layout", o->parent);
        if (o->parent_id && memcmp(o->parent_id, j->pinv->image_id.data, 16) != 0)
                return FAIL(-ESTALE,
                            "parent image %s is not the last image taken of this VM; an incremental "
                            "image can only follow that one (or take a full image)",
                            o->parent);
        if (j->pinv->depth + 1 > IMAGE_MAX_DEPTH)
                return FAIL(-ELOOP, "parent image %s is %u deep already; take a full image", o->parent,
                            j->pinv->depth);
        r = parent_ref_path(j->dir, o->parent, &j->parent_path);
        if (r < 0)
                return FAIL(r, "parent image %s: %s", o->parent, strerror(-r));
        return 0;
}

/* Step 3: a new image id and the temporary directory next to dir. */
static int write_make_tmpdir(WriteJob *j)
{
        _cleanup_free_ char *dcopy = NULL, *bcopy = NULL;
        char *err = j->err;
        size_t errlen = j->errlen;

        if (getrandom(j->id, sizeof(j->id), 0) != sizeof(j->id))
                return FAIL(-errno, "getrandom: %m");
        dcopy = strdup(j->dir);
        bcopy = strdup(j->dir);
        if (!dcopy || !bcopy)
                return -ENOMEM;
        j->dparent = strdup(dirname(dcopy));
        if (!j->dparent || asprintf(&j->tmp, "%s/.%s.tmp-XXXXXX", j->dparent, basename(bcopy)) < 0) {
                j->tmp = NULL;
                return -ENOMEM;
        }
        if (!mkdtemp(j->tmp)) {
                j->tmp = mfree(j->tmp); /* nothing to remove */
                return FAIL(-errno, "cannot create a temporary directory next to %s: %m", j->dir);
        }
        j->dfd = open(j->tmp, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (j->dfd < 0)
                return FAIL(-errno, "%s: %m", j->tmp);
        return 0;
}

/* Step 4: pages.img, then the page map its runs make, then the VM state. */
static int write_data_files(WriteJob *j)
{
        _cleanup_free_ Dr__Image__PageRun **run_ptrs = NULL;
        _cleanup_free_ uint8_t *map_buf = NULL;
        Dr__Image__PageMap map = DR__IMAGE__PAGE_MAP__INIT;
        char *err = j->err;
        size_t errlen = j->errlen, map_len;
        int r;

        r = write_pages(j->c, j->dfd, j->id, j->o->covered, j->o->compress, &j->rv, &j->st, &j->sizes[2],
                        &j->hcrcs[2]);
        if (r == -EINVAL)
                return FAIL(r,
                            "a page to be stored was never copied into staging (capture protocol violated)");
        if (r < 0)
                return FAIL(r, "%s/%s: %s", j->tmp, FILE_PAGES, strerror(-r));

        run_ptrs = calloc(j->rv.n ? j->rv.n : 1, sizeof(*run_ptrs));
        if (!run_ptrs)
                return -ENOMEM;
        for (size_t i = 0; i < j->rv.n; i++)
                run_ptrs[i] = &j->rv.v[i];
        map.n_runs = j->rv.n;
        map.runs = run_ptrs;
        map_len = dr__image__page_map__get_packed_size(&map);
        if (map_len > IMAGE_PAGEMAP_MAX)
                return FAIL(-E2BIG, "page map of %zu runs is too large (%zu bytes); take a full image",
                            j->rv.n, map_len);
        map_buf = malloc(map_len ? map_len : 1);
        if (!map_buf)
                return -ENOMEM;
        dr__image__page_map__pack(&map, map_buf);
        r = write_small_file(j->dfd, FILE_PAGEMAP, IMAGE_MAGIC_PAGEMAP, j->id, map_buf, map_len,
                             &j->sizes[1], &j->hcrcs[1]);
        if (r >= 0)
                r = write_small_file(j->dfd, FILE_STATE, IMAGE_MAGIC_STATE, j->id, j->o->state,
                                     j->o->state_len, &j->sizes[0], &j->hcrcs[0]);
        if (r < 0)
                return FAIL(r, "writing %s: %s", j->tmp, strerror(-r));
        return 0;
}

/* Step 5: inventory.img, last: until it is complete nothing in the directory is an image. */
static int write_inventory(WriteJob *j)
{
        static const char *const names[3] = {FILE_STATE, FILE_PAGEMAP, FILE_PAGES};
        const ImageLayout *lay = &j->c->lay;
        const ImageWriteOptions *o = j->o;
        _cleanup_free_ uint8_t *inv_buf = NULL;
        Dr__Image__Inventory inv = DR__IMAGE__INVENTORY__INIT;
        Dr__Image__ParentRef pref = DR__IMAGE__PARENT_REF__INIT;
        Dr__Image__Region regs[IMAGE_MAX_REGIONS], *reg_ptrs[IMAGE_MAX_REGIONS];
        Dr__Image__FileRef files[3], *file_ptrs[3];
        char *err = j->err;
        size_t errlen = j->errlen;
        int r;

        inv.format_version = DR__IMAGE__IMAGE_FORMAT__IMAGE_FORMAT_CURRENT;
        inv.image_id = (ProtobufCBinaryData){.len = 16, .data = j->id};
        inv.vm_name = (char *) o->vm_name;
        if (o->vm_uuid) {
                inv.has_vm_uuid = true;
                inv.vm_uuid = (ProtobufCBinaryData){.len = 16, .data = (uint8_t *) o->vm_uuid};
        }
        inv.page_size = IMAGE_PAGE_SIZE;
        for (size_t i = 0; i < lay->n_regions; i++) {
                dr__image__region__init(&regs[i]);
                regs[i].slot = lay->regions[i].slot;
                regs[i].guest_phys = lay->regions[i].guest_phys;
                regs[i].size = lay->regions[i].size;
                regs[i].fd_offset = lay->regions[i].fd_offset;
                reg_ptrs[i] = &regs[i];
        }
        inv.n_regions = lay->n_regions;
        inv.regions = reg_ptrs;
        inv.total_pages = lay->total_pages;
        inv.created_usec = realtime_usec();
        inv.n_vcpus = (uint32_t) j->n_vcpus;
        if (j->pinv) {
                pref.path = j->parent_path;
                pref.image_id = j->pinv->image_id;
                pref.inventory_sha256 = (ProtobufCBinaryData){.len = 32, .data = j->psha};
                inv.parent = &pref;
                inv.depth = j->pinv->depth + 1;
        }
        for (size_t i = 0; i < 3; i++) {
                dr__image__file_ref__init(&files[i]);
                files[i].name = (char *) names[i];
                files[i].size = j->sizes[i];
                files[i].header_crc = j->hcrcs[i];
                file_ptrs[i] = &files[i];
        }
        inv.n_files = 3;
        inv.files = file_ptrs;
        inv.present_pages = j->st.present_pages;
        inv.zero_pages = j->st.zero_pages;
        inv.parent_pages = j->st.parent_pages;
        inv.has_epoch = true;
        inv.epoch = o->epoch;
        j->inv_len = dr__image__inventory__get_packed_size(&inv);
        if (j->inv_len > IMAGE_INVENTORY_MAX)
                return FAIL(-E2BIG, "inventory too large");
        inv_buf = malloc(j->inv_len);
        if (!inv_buf)
                return -ENOMEM;
        dr__image__inventory__pack(&inv, inv_buf);
        r = write_small_file(j->dfd, FILE_INVENTORY, IMAGE_MAGIC_INVENTORY, j->id, inv_buf, j->inv_len, NULL,
                             NULL);
        if (r < 0)
                return FAIL(r, "writing %s/%s: %s", j->tmp, FILE_INVENTORY, strerror(-r));
        return 0;
}

/* Step 6: the directory fsync()ed, renamed into place (never over another), its parent fsync()ed. */
static int write_publish(WriteJob *j)
{
        char *err = j->err;
        size_t errlen = j->errlen;
        int r;

        if (fsync(j->dfd) < 0)
                return FAIL(-errno, "fsync %s: %m", j->tmp);
        /* RENAME_NOREPLACE: never clobber an image that appeared meanwhile. */
        if (renameat2(AT_FDCWD, j->tmp, AT_FDCWD, j->dir, RENAME_NOREPLACE) < 0)
                return FAIL(-errno, "cannot rename %s to %s: %m", j->tmp, j->dir);
        j->renamed = true;
        r = fsync_dir(j->dparent);
        if (r < 0)
                return FAIL(r, "fsync %s: %s", j->dparent, strerror(-r));
        return 0;
}

int image_capture_write(ImageCapture *c, const char *dir, const ImageWriteOptions *o,
                        ImageWriteStats *ret_stats, char *err, size_t errlen)
{
        _cleanup_(write_job_done) WriteJob j = {
                .c = c,
                .dir = dir,
                .o = o,
                .err = err,
                .errlen = errlen,
                .dfd = -EBADF,
        };
        uint64_t t0 = now_nsec();
        int r;

        r = write_check_options(&j);
        if (r >= 0)
                r = write_load_parent(&j);
        if (r >= 0)
                r = write_make_tmpdir(&j);
        if (r >= 0)
                r = write_data_files(&j);
        if (r >= 0)
                r = write_inventory(&j);
        if (r >= 0)
                r = write_publish(&j);
        if (r < 0)
                return r;

        j.st.total_bytes = j.sizes[0] + j.sizes[1] + j.sizes[2] + IMAGE_HEADER_SIZE + j.inv_len;
        j.st.write_ns = now_nsec() - t0;
        memcpy(j.st.image_id, j.id, 16);
        if (ret_stats)
                *ret_stats = j.st;
        return 0;
}

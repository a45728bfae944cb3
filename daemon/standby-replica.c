/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The standby's replica as a file in StateDirectory= (NAME.replica): what
 * standby_replica_save() writes before maintenance and
 * standby_replica_load() restores after it (role.h). The replica itself,
 * and how it is received, is daemon/standby.c.
 */

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "crc32c.h"
#include "layout.h"
#include "pages.h"
#include "role.h"
#include "standby-internal.h"
#include "util.h"

/*
 * File format (all little-endian, explicit): a 4 KiB header page, then the
 * state, then the RAM at the next 4 KiB boundary, memfd_size bytes, holes
 * where the memfd has holes.
 *
 *   0  magic "DRREPLCA"      8   u32 version (1)     12  u32 flags (bit 0: stale)
 *   16 u64 epoch             24  session[16]         40  vm_uuid[16]
 *   56 u32 n_regions         60  u32 0               64  u64 state_len
 *   72 u64 memfd_size        80  u32 state_crc       84  u32 ram_crc
 *   88 regions: n x { u32 slot, u32 0, u64 guest_phys, u64 size, u64 memfd_offset }
 *   4092 u32 CRC32C of bytes 0..4091
 */
#define RFILE_MAGIC      "DRREPLCA"
#define RFILE_VERSION    1u
#define RFILE_HEADER     4096u
#define RFILE_REGIONS_AT 88u
#define RFILE_REGION_SZ  32u
#define RFILE_CHUNK      ((size_t) 1 << 20)

static void put_u32(uint8_t *p, uint32_t v)
{
        for (int i = 0; i < 4; i++)
                p[i] = (uint8_t) (v >> (8 * i));
}

static void put_u64(uint8_t *p, uint64_t v)
{
        for (int i = 0; i < 8; i++)
                p[i] = (uint8_t) (v >> (8 * i));
}

static uint32_t get_u32(const uint8_t *p)
{
        uint32_t v = 0;
        for (int i = 3; i >= 0; i--)
                v = (v << 8) | p[i];
        return v;
}

static uint64_t get_u64(const uint8_t *p)
{
        uint64_t v = 0;
        for (int i = 7; i >= 0; i--)
                v = (v << 8) | p[i];
        return v;
}

static uint64_t rfile_ram_offset(uint64_t state_len)
{
        return RFILE_HEADER + DIV_ROUND_UP(state_len, (uint64_t) PAGE_BYTES) * PAGE_BYTES;
}

/* CRC32C of the mapped RAM, skipping nothing: holes read as zeros. */
static uint32_t ram_crc(const uint8_t *map, uint64_t size)
{
        uint32_t crc = 0;
        for (uint64_t o = 0; o < size; o += RFILE_CHUNK)
                crc = crc32c(crc, map + o, (size_t) MIN((uint64_t) RFILE_CHUNK, size - o));
        return crc;
}

static int pread_exact(int fd, uint8_t *buf, size_t len, off_t off)
{
        while (len > 0) {
                ssize_t k = pread(fd, buf, len, off);
                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (k == 0)
                        return -EIO;
                buf += k;
                len -= (size_t) k;
                off += k;
        }
        return 0;
}

static char *rfile_path(const char *dir, const char *name, const char *suffix)
{
        char *p = NULL;
        if (asprintf(&p, "%s/%s.replica%s", dir, name, suffix) < 0)
                return NULL;
        return p;
}

int standby_replica_save(const StandbyReplica *rep, const char *dir, const char *name)
{
        _cleanup_free_ char *path = NULL, *tmp = NULL;
        _cleanup_close_ int fd = -EBADF, dfd = -EBADF;
        const Replica *R;
        uint8_t h[RFILE_HEADER] = {};
        uint64_t ram_off, o;
        int r;

        if (!rep || !rep->r.valid || !dir || !name)
                return -EINVAL;
        R = &rep->r;
        path = rfile_path(dir, name, "");
        tmp = rfile_path(dir, name, ".tmp");
        if (!path || !tmp)
                return -ENOMEM;
        fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
        if (fd < 0)
                return -errno;

        memcpy(h, RFILE_MAGIC, 8);
        put_u32(h + 8, RFILE_VERSION);
        put_u32(h + 12, R->stale ? 1u : 0u);
        put_u64(h + 16, R->epoch);
        memcpy(h + 24, R->session, SESSION_BYTES);
        memcpy(h + 40, R->vm_uuid, UUID_BYTES);
        put_u32(h + 56, (uint32_t) R->layout.n_regions);
        put_u64(h + 64, R->state_len);
        put_u64(h + 72, R->layout.memfd_size);
        put_u32(h + 80, crc32c(0, R->state, R->state_len));
        put_u32(h + 84, ram_crc(R->map, R->layout.memfd_size));
        for (size_t i = 0; i < R->layout.n_regions; i++) {
                uint8_t *p = h + RFILE_REGIONS_AT + i * RFILE_REGION_SZ;
                put_u32(p, R->layout.regions[i].slot);
                put_u64(p + 8, R->layout.regions[i].guest_phys);
                put_u64(p + 16, R->layout.regions[i].size);
                put_u64(p + 24, R->layout.regions[i].fd_offset);
        }
        put_u32(h + RFILE_HEADER - 4, crc32c(0, h, RFILE_HEADER - 4));

        ram_off = rfile_ram_offset(R->state_len);
        r = loop_write(fd, h, sizeof(h));
        if (r >= 0)
                r = loop_write(fd, R->state, R->state_len);
        if (r < 0)
                goto fail;
        /* Only the memfd's data extents are written: the file is as sparse as the replica. */
        for (o = 0; o < R->layout.memfd_size;) {
                off_t data = lseek(R->fd, (off_t) o, SEEK_DATA), hole;
                if (data < 0) {
                        if (errno == ENXIO)
                                break;
                        r = -errno;
                        goto fail;
                }
                hole = lseek(R->fd, data, SEEK_HOLE);
                if (hole < 0) {
                        r = -errno;
                        goto fail;
                }
                hole = (off_t) MIN((uint64_t) hole, R->layout.memfd_size);
                /* Runs of non-zero pages only: zero pages a full sync wrote stay holes too. */
                for (uint64_t x = (uint64_t) data; x < (uint64_t) hole;) {
                        uint64_t end = x;
                        size_t n;
                        ssize_t w;

                        while (x < (uint64_t) hole && page_is_zero(R->map + x))
                                x += PAGE_BYTES;
                        end = x;
                        while (end < (uint64_t) hole && end - x < RFILE_CHUNK && !page_is_zero(R->map + end))
                                end += PAGE_BYTES;
                        if (end == x)
                                break;
                        n = (size_t) (end - x);
                        w = pwrite(fd, R->map + x, n, (off_t) (ram_off + x));
                        if (w < 0) {
                                r = -errno;
                                goto fail;
                        }
                        if ((size_t) w != n) {
                                r = -EIO;
                                goto fail;
                        }
                        x = end;
                }
                o = (uint64_t) hole;
        }
        if (ftruncate(fd, (off_t) (ram_off + R->layout.memfd_size)) < 0 || fsync(fd) < 0) {
                r = -errno;
                goto fail;
        }
        if (rename(tmp, path) < 0) {
                r = -errno;
                goto fail;
        }
        dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0)
                (void) fsync(dfd);
        return 0;
fail:
        (void) unlink(tmp);
        return r;
}

int standby_replica_remove(const char *dir, const char *name)
{
        _cleanup_free_ char *path = rfile_path(dir, name, "");
        if (!path)
                return -ENOMEM;
        if (unlink(path) < 0 && errno != ENOENT)
                return -errno;
        return 0;
}

#define BAD(...)                                                                                            \
        ({                                                                                                  \
                snprintf(why, why_size, __VA_ARGS__);                                                       \
                -EBADMSG;                                                                                   \
        })

int standby_replica_load(const char *dir, const char *name, StandbyReplica **ret, char *why, size_t why_size)
{
        _cleanup_(standby_replica_freep) StandbyReplica *rep = NULL;
        _cleanup_free_ char *path = NULL;
        _cleanup_close_ int fd = -EBADF;
        uint8_t h[RFILE_HEADER];
        struct stat st;
        uint64_t extent = 0, ram_off, o;
        uint32_t n;
        Replica *R;
        int r;

        why[0] = 0;
        path = rfile_path(dir, name, "");
        if (!path)
                return -ENOMEM;
        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (fd < 0)
                return -errno;
        if (fstat(fd, &st) < 0)
                return -errno;
        if (!S_ISREG(st.st_mode))
                return BAD("%s is not a regular file", path);
        r = loop_read_exact(fd, h, sizeof(h));
        if (r < 0)
                return r == -EPIPE ? BAD("%s: truncated header", path) : r;
        if (memcmp(h, RFILE_MAGIC, 8) != 0 || get_u32(h + 8) != RFILE_VERSION)
                return BAD("%s: not a replica file of version %u", path, RFILE_VERSION);
        if (crc32c(0, h, RFILE_HEADER - 4) != get_u32(h + RFILE_HEADER - 4))
                return BAD("%s: header checksum mismatch", path);

        rep = calloc(1, sizeof(*rep));
        if (!rep)
                return -ENOMEM;
        R = &rep->r;
        R->fd = -EBADF;
        R->stale = get_u32(h + 12) & 1u;
        R->epoch = get_u64(h + 16);
        memcpy(R->session, h + 24, SESSION_BYTES);
        memcpy(R->vm_uuid, h + 40, UUID_BYTES);
        n = get_u32(h + 56);
        R->state_len = get_u64(h + 64);
        if (n == 0 || n > RAM_MAX_REGIONS)
                return BAD("%s: %" PRIu32 " regions (1..%u)", path, n, RAM_MAX_REGIONS);
        if (R->state_len == 0 || R->state_len > STANDBY_MAX_STATE_BYTES)
                return BAD("%s: state of %" PRIu64 " bytes (1..%zu)", path, (uint64_t) R->state_len,
                           STANDBY_MAX_STATE_BYTES);
        R->layout = (Layout){.page_size = RAM_PAGE_SIZE, .n_regions = n};
        for (uint32_t i = 0; i < n; i++) {
                const uint8_t *p = h + RFILE_REGIONS_AT + i * RFILE_REGION_SZ;
                R->layout.regions[i] = (Region){
                        .slot = get_u32(p),
                        .guest_phys = get_u64(p + 8),
                        .size = get_u64(p + 16),
                        .fd_offset = get_u64(p + 24),
                };
        }
        /* The same validator as a Hello's layout: bounds, alignment, no shared slot, no overlap. */
        {
                char reason[256];

                if (ram_layout_validate(&R->layout, reason, sizeof(reason)) < 0)
                        return BAD("%s: %s", path, reason);
        }
        extent = R->layout.memfd_size;
        if (get_u64(h + 72) != extent)
                return BAD("%s: RAM size %" PRIu64 " does not match its layout (%" PRIu64 ")", path,
                           get_u64(h + 72), extent);
        ram_off = rfile_ram_offset(R->state_len);
        if ((uint64_t) st.st_size != ram_off + extent)
                return BAD("%s: %" PRIu64 " bytes, expected %" PRIu64 " (truncated or extended)", path,
                           (uint64_t) st.st_size, ram_off + extent);

        R->state = malloc(R->state_len);
        if (!R->state)
                return -ENOMEM;
        r = loop_read_exact(fd, R->state, R->state_len);
        if (r < 0)
                return r == -EPIPE ? BAD("%s: truncated state", path) : r;
        if (crc32c(0, R->state, R->state_len) != get_u32(h + 80))
                return BAD("%s: state checksum mismatch", path);

        r = memfd_map_new("dirtyrep-replica", extent, &R->fd, &R->map);
        if (r < 0)
                return r;
        for (o = 0; o < extent;) {
                off_t data = lseek(fd, (off_t) (ram_off + o), SEEK_DATA), hole;
                if (data < 0) {
                        if (errno == ENXIO)
                                break;
                        return -errno;
                }
                hole = lseek(fd, data, SEEK_HOLE);
                if (hole < 0)
                        return -errno;
                for (uint64_t x = (uint64_t) data - ram_off; x < (uint64_t) hole - ram_off;
                     x += RFILE_CHUNK) {
                        size_t k = (size_t) MIN((uint64_t) RFILE_CHUNK, (uint64_t) hole - ram_off - x);
                        r = pread_exact(fd, R->map + x, k, (off_t) (ram_off + x));
                        if (r < 0)
                                return r;
                }
                o = (uint64_t) hole - ram_off;
        }
        if (ram_crc(R->map, extent) != get_u32(h + 84))
                return BAD("%s: RAM checksum mismatch", path);
        R->valid = true;
        *ret = TAKE_PTR(rep);
        return 0;
}

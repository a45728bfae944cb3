/* SPDX-License-Identifier: GPL-2.0-or-later */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kvm.h"
#include "macros.h"
#include "memory.h"
#include "util.h"

int guest_ram_check_size(uint64_t size)
{
        if (size < RAM_SIZE_MIN || size > RAM_SIZE_MAX)
                return -ERANGE;
        if (size % PAGE_SIZE_4K != 0)
                return -EINVAL;
        return 0;
}

static void guest_ram_layout(GuestRam *ram)
{
        uint64_t low = MIN(ram->size, RAM_LOW_LIMIT);

        ram->regions[0] = (DrAgentRegion){
                .slot = 0,
                .guest_phys = 0,
                .size = low,
                .memfd = ram->memfd,
                .memfd_offset = 0,
                .host_addr = ram->map,
        };
        ram->n_regions = 1;
        if (ram->size > RAM_LOW_LIMIT) {
                ram->regions[1] = (DrAgentRegion){
                        .slot = 1,
                        .guest_phys = RAM_HIGH_BASE,
                        .size = ram->size - RAM_LOW_LIMIT,
                        .memfd = ram->memfd,
                        .memfd_offset = RAM_LOW_LIMIT,
                        .host_addr = ram->map + RAM_LOW_LIMIT,
                };
                ram->n_regions = 2;
        }
}

/* Takes ownership of fd on success. */
static int guest_ram_map(int fd, uint64_t size, GuestRam **ret)
{
        _cleanup_free_ GuestRam *ram = NULL;
        void *p;

        ram = calloc(1, sizeof(*ram));
        if (!ram)
                return -ENOMEM;
        /* MAP_NORESERVE: a 16 GiB guest that touches 100 MiB costs 100 MiB. */
        p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
        if (p == MAP_FAILED)
                return -errno;
        (void) madvise(p, size, MADV_DONTDUMP);
        ram->memfd = fd;
        ram->size = size;
        ram->map = p;
        guest_ram_layout(ram);
        *ret = TAKE_PTR(ram);
        return 0;
}

int guest_ram_new(uint64_t size, GuestRam **ret)
{
        _cleanup_close_ int fd = -EBADF;
        int r;

        r = guest_ram_check_size(size);
        if (r < 0)
                return r;
        fd = memfd_new_sized("dirtyrep-guest-ram", size);
        if (fd < 0)
                return fd;
        r = guest_ram_map(fd, size, ret);
        if (r < 0)
                return r;
        TAKE_FD(fd);
        return 0;
}

/* Copies a file into RAM, skipping holes so a sparse image stays sparse. */
static int guest_ram_copy_in(GuestRam *ram, int fd)
{
        off_t pos = 0, end = (off_t) ram->size;

        while (pos < end) {
                off_t data = lseek(fd, pos, SEEK_DATA), hole;
                if (data < 0) {
                        if (errno == ENXIO)
                                break; /* only a hole left */
                        if (errno != EINVAL)
                                return -errno;
                        data = pos; /* no SEEK_DATA support: read everything */
                        hole = end;
                } else {
                        hole = lseek(fd, data, SEEK_HOLE);
                        if (hole < 0)
                                hole = end;
                }
                hole = MIN(hole, end);
                for (off_t p = data; p < hole;) {
                        ssize_t n = pread(fd, ram->map + p, (size_t) MIN(hole - p, (off_t) (8 << 20)), p);
                        if (n < 0) {
                                if (errno == EINTR)
                                        continue;
                                return -errno;
                        }
                        if (n == 0)
                                return -EPIPE; /* file shrank under us */
                        p += n;
                }
                pos = hole;
        }
        return 0;
}

int guest_ram_from_fd(int fd, uint64_t expected_size, GuestRam **ret, bool *ret_direct)
{
        _cleanup_(guest_ram_freep) GuestRam *ram = NULL;
        struct stat st;
        uint64_t size;
        int r;

        if (fstat(fd, &st) < 0)
                return -errno;
        if (!S_ISREG(st.st_mode))
                return -EBADFD;
        size = (uint64_t) st.st_size;
        if (expected_size != 0 && size != expected_size)
                return -EMEDIUMTYPE;
        r = guest_ram_check_size(size);
        if (r < 0)
                return r;

        /* F_GET_SEALS only works on shmem (memfd) files: map those in place. */
        if (fcntl(fd, F_GET_SEALS) >= 0) {
                int flags = fcntl(fd, F_GETFL);

                if (flags < 0)
                        return -errno;
                if ((flags & O_ACCMODE) != O_RDWR)
                        return -EACCES;
                r = guest_ram_map(fd, size, ret);
                if (r < 0)
                        return r;
                /* The fd we were given is ours now; make sure a child cannot inherit it. */
                (void) fcntl(fd, F_SETFD, FD_CLOEXEC);
                *ret_direct = true;
                return 0;
        }

        r = guest_ram_new(size, &ram);
        if (r < 0)
                return r;
        r = guest_ram_copy_in(ram, fd);
        if (r < 0)
                return r;
        *ret = TAKE_PTR(ram);
        *ret_direct = false;
        return 0;
}

int guest_ram_register(GuestRam *ram, int vm_fd)
{
        for (unsigned i = 0; i < ram->n_regions; i++) {
                const DrAgentRegion *rg = &ram->regions[i];
                int r = kvm_set_user_memory_region(vm_fd, rg->slot, 0, rg->guest_phys, rg->size,
                                                   rg->host_addr);
                if (r < 0)
                        return r;
        }
        return 0;
}

void *guest_ram_ptr(GuestRam *ram, uint64_t gpa, uint64_t len)
{
        for (unsigned i = 0; i < ram->n_regions; i++) {
                const DrAgentRegion *rg = &ram->regions[i];
                if (gpa >= rg->guest_phys && gpa - rg->guest_phys <= rg->size &&
                    len <= rg->size - (gpa - rg->guest_phys))
                        return (uint8_t *) rg->host_addr + (gpa - rg->guest_phys);
        }
        return NULL;
}

GuestRam *guest_ram_free(GuestRam *ram)
{
        if (!ram)
                return NULL;
        if (ram->map)
                munmap(ram->map, ram->size);
        safe_close(ram->memfd);
        free(ram);
        return NULL;
}

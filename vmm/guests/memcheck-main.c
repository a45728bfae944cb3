/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * dirtyrep-memcheck RAMFILE [--base-offset N]: verify a memtouch RAM image.
 * Exit 0: consistent; 1: inconsistent (message names page and values);
 * 2: usage or I/O error.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "memcheck.h"

static int usage(void)
{
        fprintf(stderr, "usage: dirtyrep-memcheck RAMFILE [--base-offset N]\n"
                        "  RAMFILE holds guest RAM from guest-physical 0 at file offset N (default 0)\n");
        return 2;
}

int main(int argc, char **argv)
{
        const char *path = NULL;
        uint64_t base = 0;
        char err[512];
        MemtouchCheck res;

        for (int i = 1; i < argc; i++) {
                if (strcmp(argv[i], "--base-offset") == 0 && i + 1 < argc) {
                        char *end;
                        errno = 0;
                        unsigned long long v = strtoull(argv[++i], &end, 0);
                        if (errno || end == argv[i] || *end || argv[i][0] == '-')
                                return usage();
                        base = v;
                } else if (strncmp(argv[i], "--base-offset=", 14) == 0) {
                        char *end;
                        errno = 0;
                        unsigned long long v = strtoull(argv[i] + 14, &end, 0);
                        if (errno || end == argv[i] + 14 || *end || argv[i][14] == '-')
                                return usage();
                        base = v;
                } else if (argv[i][0] == '-' || path)
                        return usage();
                else
                        path = argv[i];
        }
        if (!path)
                return usage();

        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
                fprintf(stderr, "memcheck: cannot open %s: %s\n", path, strerror(errno));
                return 2;
        }
        struct stat st;
        if (fstat(fd, &st) < 0) {
                fprintf(stderr, "memcheck: cannot stat %s: %s\n", path, strerror(errno));
                close(fd);
                return 2;
        }
        if ((uint64_t) st.st_size <= base) {
                fprintf(stderr, "memcheck: %s has %lld bytes, base offset %" PRIu64 " leaves no RAM\n", path,
                        (long long) st.st_size, base);
                close(fd);
                return 2;
        }
        void *map = mmap(NULL, (size_t) st.st_size, PROT_READ, MAP_SHARED, fd, 0);
        int saved = errno;
        close(fd);
        if (map == MAP_FAILED) {
                fprintf(stderr, "memcheck: cannot map %s: %s\n", path, strerror(saved));
                return 2;
        }

        int r = memtouch_check((const uint8_t *) map + base, (uint64_t) st.st_size - base, &res, err,
                               sizeof(err));
        munmap(map, (size_t) st.st_size);
        if (r < 0) {
                fprintf(stderr, "memcheck: FAIL: %s\n", err);
                return 1;
        }
        printf("memcheck: ok cpus=%u gens=", res.ncpus);
        for (unsigned c = 0; c < res.ncpus; c++)
                printf("%s%" PRIu64, c ? "," : "", res.committed[c]);
        printf(" pages_checked=%" PRIu64 "\n", res.pages_checked);
        return 0;
}

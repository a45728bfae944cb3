/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Corpus replay driver: runs LLVMFuzzerTestOneInput() over every file in the
 * directories or files given on the command line, so the fuzz suite replays
 * the seed corpora and past crashers with any compiler (systemd's fuzzers
 * double as regression tests the same way). With clang and -Dfuzzers=true
 * the same targets are also linked against libFuzzer.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int run_file(const char *path)
{
        struct stat st;
        uint8_t *buf;
        ssize_t n;
        int fd;

        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0 || fstat(fd, &st) < 0) {
                fprintf(stderr, "%s: %s\n", path, strerror(errno));
                return -1;
        }
        buf = malloc(st.st_size ? (size_t) st.st_size : 1);
        if (!buf)
                return -1;
        n = read(fd, buf, (size_t) st.st_size);
        close(fd);
        if (n != st.st_size) {
                free(buf);
                return -1;
        }
        LLVMFuzzerTestOneInput(buf, (size_t) n);
        free(buf);
        return 0;
}

int main(int argc, char **argv)
{
        unsigned count = 0;

        for (int i = 1; i < argc; i++) {
                struct stat st;
                DIR *d;

                if (stat(argv[i], &st) < 0) {
                        fprintf(stderr, "%s: %s\n", argv[i], strerror(errno));
                        return 1;
                }
                if (!S_ISDIR(st.st_mode)) {
                        if (run_file(argv[i]) < 0)
                                return 1;
                        count++;
                        continue;
                }
                d = opendir(argv[i]);
                if (!d)
                        return 1;
                for (struct dirent *de; (de = readdir(d));) {
                        char p[4096];
                        if (de->d_name[0] == '.')
                                continue;
                        snprintf(p, sizeof(p), "%s/%s", argv[i], de->d_name);
                        if (run_file(p) < 0) {
                                closedir(d);
                                return 1;
                        }
                        count++;
                }
                closedir(d);
        }
        /* An empty corpus would make this test pass vacuously. */
        if (count == 0) {
                fprintf(stderr, "no corpus inputs found\n");
                return 1;
        }
        printf("replayed %u inputs\n", count);
        return 0;
}

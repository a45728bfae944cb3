/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * A deliberately faulty program for test-sanitize-wrap.py: it proves that a
 * sanitizer report from a process a test started (and whose exit status the
 * test ignores, like a daemon's) fails the test under tests/sanitize-wrap.py.
 * Built only in sanitized builds, used by no product code.
 *
 *   sanitize-canary clean    exits 0, reports nothing
 *   sanitize-canary ubsan    a signed integer overflow (UBSan: runtime error)
 *   sanitize-canary leak     loses a heap block and exits 0 (LeakSanitizer at exit)
 */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void *volatile keep;

int main(int argc, char *argv[])
{
        if (argc != 2) {
                fprintf(stderr, "usage: %s clean|ubsan|leak\n", argv[0]);
                return 2;
        }
        if (strcmp(argv[1], "clean") == 0)
                return 0;
        if (strcmp(argv[1], "ubsan") == 0) {
                /* From argc so that the compiler cannot see the overflow coming. */
                volatile int big = INT_MAX - 2 + argc;
                int sum = big + argc;
                printf("%d\n", sum);
                return 0;
        }
        if (strcmp(argv[1], "leak") == 0) {
                keep = malloc(4242);
                memset(keep, 1, 4242);
                keep = NULL;
                return 0;
        }
        fprintf(stderr, "unknown mode %s\n", argv[1]);
        return 2;
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * A tiny TEST() harness in the spirit of systemd's tests.h: each TEST(name)
 * registers itself; main() runs them all and exits non-zero on the first
 * failed ASSERT_*, printing file:line and the values.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct TestCase {
        const char *name;
        void (*func)(void);
} TestCase;

#define TEST(n)                                                                                             \
        static void test_##n(void);                                                                         \
        static const TestCase test_case_##n                                                                 \
                __attribute__((used, section("dr_tests"), aligned(sizeof(void *)))) = {#n, test_##n};       \
        static void test_##n(void)

#define ASSERT_TRUE(expr)                                                                                   \
        do {                                                                                                \
                if (!(expr)) {                                                                              \
                        fprintf(stderr, "%s:%d: assertion failed: %s\n", __FILE__, __LINE__, #expr);        \
                        exit(1);                                                                            \
                }                                                                                           \
        } while (0)

#define ASSERT_EQ(a, b)                                                                                     \
        do {                                                                                                \
                intmax_t _a = (intmax_t) (a), _b = (intmax_t) (b);                                          \
                if (_a != _b) {                                                                             \
                        fprintf(stderr, "%s:%d: %s == %s failed: %jd != %jd\n", __FILE__, __LINE__, #a, #b, \
                                _a, _b);                                                                    \
                        exit(1);                                                                            \
                }                                                                                           \
        } while (0)

/* Evaluates expr once: it may allocate or have side effects. */
#define ASSERT_OK(expr)                                                                                     \
        do {                                                                                                \
                intmax_t _r = (intmax_t) (expr);                                                            \
                if (_r < 0) {                                                                               \
                        fprintf(stderr, "%s:%d: %s failed: %jd\n", __FILE__, __LINE__, #expr, _r);          \
                        exit(1);                                                                            \
                }                                                                                           \
        } while (0)

extern const TestCase __start_dr_tests[];
extern const TestCase __stop_dr_tests[];

static inline int tests_run(void)
{
        unsigned n = 0;
        for (const TestCase *t = __start_dr_tests; t < __stop_dr_tests; t++) {
                printf("/* %s */\n", t->name);
                fflush(stdout);
                t->func();
                n++;
        }
        printf("%u tests passed\n", n);
        return 0;
}

#define DEFINE_TEST_MAIN                                                                                    \
        int main(void)                                                                                      \
        {                                                                                                   \
                return tests_run();                                                                         \
        }

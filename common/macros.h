/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * Scoped cleanup and ownership helpers, modelled on systemd's macro.h.
 * A variable declared with _cleanup_free_ / _cleanup_close_ / _cleanup_(f)
 * is released when it goes out of scope; hand ownership on with TAKE_PTR /
 * TAKE_FD so the cleanup sees NULL / -1.
 */

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

#define _cleanup_(f)         __attribute__((cleanup(f)))
#define _unused_             __attribute__((unused))
#define _noreturn_           __attribute__((noreturn))
#define _printf_(a, b)       __attribute__((format(printf, a, b)))
#define _likely_(x)          __builtin_expect(!!(x), 1)
#define _unlikely_(x)        __builtin_expect(!!(x), 0)
#define _pure_               __attribute__((pure))
#define _warn_unused_result_ __attribute__((warn_unused_result))

#define ELEMENTSOF(x)      (sizeof(x) / sizeof((x)[0]))
#define MIN(a, b)          ((a) < (b) ? (a) : (b))
#define MAX(a, b)          ((a) > (b) ? (a) : (b))
#define DIV_ROUND_UP(x, y) (((x) + (y) -1) / (y))
#define ALIGN_TO(x, a)     (((x) + (a) -1) & ~((__typeof__(x)) (a) -1))
#define IS_POWER_OF_2(x)   ((x) != 0 && (((x) & ((x) -1)) == 0))

#define FOREACH_ARRAY(i, array, num)                                                                        \
        for (__typeof__(array[0]) *i = (array), *_end_##i = (array) + (num); i < _end_##i; i++)

/* Return the pointer and set the variable to NULL: ownership passes to the caller. */
#define TAKE_PTR(p)                                                                                         \
        ({                                                                                                  \
                __typeof__(p) *_pp_ = &(p);                                                                 \
                __typeof__(p) _ptr_ = *_pp_;                                                                \
                *_pp_ = NULL;                                                                               \
                _ptr_;                                                                                      \
        })

#define TAKE_FD(fd)                                                                                         \
        ({                                                                                                  \
                int *_pfd_ = &(fd);                                                                         \
                int _fd_ = *_pfd_;                                                                          \
                *_pfd_ = -EBADF;                                                                            \
                _fd_;                                                                                       \
        })

/* free() that returns NULL, for p = mfree(p). */
static inline void *mfree(void *p)
{
        free(p);
        return NULL;
}

/* A malloc()ed copy of len bytes (len > 0), or NULL. */
static inline void *memdup(const void *p, size_t len)
{
        void *q = malloc(len);

        if (q)
                __builtin_memcpy(q, p, len);
        return q;
}

static inline void freep(void *p)
{
        free(*(void **) p);
}
#define _cleanup_free_ _cleanup_(freep)

/* Closes fd if it is valid, preserving errno; returns -EBADF for chaining. */
static inline int safe_close(int fd)
{
        if (fd >= 0) {
                int saved = errno;
                close(fd);
                errno = saved;
        }
        return -EBADF;
}

static inline void closep(int *fd)
{
        safe_close(*fd);
}
#define _cleanup_close_ _cleanup_(closep)

/* Define a `namep(type **)` cleanup helper for a `type *name_free(type *)` destructor. */
#define DEFINE_TRIVIAL_CLEANUP_FUNC(type, func)                                                             \
        static inline void func##p(type *p)                                                                 \
        {                                                                                                   \
                if (*p)                                                                                     \
                        *p = func(*p);                                                                      \
        }

#define DEFINE_TRIVIAL_CLEANUP_FUNC_VOID(type, func)                                                        \
        static inline void func##p(type *p)                                                                 \
        {                                                                                                   \
                if (*p)                                                                                     \
                        func(*p);                                                                           \
        }

/* Negative errno from a libc call that returns -1 and sets errno. */
#define NEG_ERRNO() (errno > 0 ? -errno : -EIO)
#define RET_NERRNO(expr)                                                                                    \
        ({                                                                                                  \
                __typeof__(expr) _r_ = (expr);                                                              \
                _r_ < 0 ? NEG_ERRNO() : (int) _r_;                                                          \
        })

#define streq(a, b)     (strcmp((a), (b)) == 0)
#define strneq(a, b, n) (strncmp((a), (b), (n)) == 0)
#define isempty(s)      (!(s) || !*(s))

#define PAGE_SIZE_4K  4096ULL
#define PAGE_SHIFT_4K 12

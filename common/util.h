/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#define USEC_PER_SEC  1000000ULL
#define NSEC_PER_USEC 1000ULL
#define USEC_PER_MSEC 1000ULL

/* CLOCK_MONOTONIC in microseconds / nanoseconds. */
uint64_t now_usec(void);
uint64_t now_nsec(void);

/*
 * Parses a size with an optional binary suffix (K, M, G, T; "KiB" etc. also
 * accepted) into bytes. Returns 0 or -EINVAL / -ERANGE.
 */
int parse_size(const char *s, uint64_t *ret);

/* Parses an unsigned decimal or 0x-prefixed integer with range check. */
int parse_u64(const char *s, uint64_t *ret);
int parse_u32(const char *s, uint32_t *ret);

/* Writes all of buf / reads exactly len bytes, retrying on EINTR. 0 or -errno (-EPIPE on EOF). */
int loop_write(int fd, const void *buf, size_t len);
int loop_read_exact(int fd, void *buf, size_t len);
/* Reads until end of file or size bytes, retrying on EINTR. The byte count or -errno;
 * size means "maybe more": give one byte more room than the largest accepted file. */
ssize_t loop_read_upto(int fd, void *buf, size_t size);

/*
 * A UUID from its canonical text form, 8-4-4-4-12 hex digits (libuuid's
 * uuid_parse(): nothing else, no other hyphenation, no surrounding text).
 * 0 or -EINVAL.
 */
int uuid_from_string(const char *s, uint8_t ret[16]);
#define UUID_STRING_MAX 37 /* 36 characters and the NUL */
/* The canonical lower-case text form (libuuid's uuid_unparse_lower()); returns buf. */
const char *uuid_to_string(const uint8_t u[16], char buf[UUID_STRING_MAX]);

/* Creates an anonymous memfd (MFD_CLOEXEC) of the given size. Returns fd or -errno. */
int memfd_new_sized(const char *name, uint64_t size);

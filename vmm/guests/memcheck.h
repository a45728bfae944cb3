/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * Verify a RAM image written by the memtouch guest (memtouch-abi.h).
 * The image is hostile input: every descriptor field is bounded against it.
 */

#include <stddef.h>
#include <stdint.h>

#include "memtouch-abi.h"

typedef struct MemtouchCheck {
        unsigned ncpus;
        uint64_t committed[MEMTOUCH_MAX_CPUS]; /* per CPU */
        uint64_t pages_checked;                /* data pages verified whole */
        uint64_t pages_torn;                   /* in-flight pages accepted as torn (0 or 1 per CPU) */
} MemtouchCheck;

/*
 * Check the image `ram` (guest-physical 0 .. ram_size). Returns 0 when it is
 * consistent and fills *ret (may be NULL); -EINVAL when there is no valid
 * memtouch descriptor or it points outside the image; -EBADMSG when a page,
 * index entry or generation is inconsistent. On failure a one-line
 * explanation naming the CPU, page, address and values is written to err
 * (always NUL-terminated when errlen > 0). ret is written only on success.
 */
int memtouch_check(const void *ram, uint64_t ram_size, MemtouchCheck *ret, char *err, size_t errlen);

/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/* Internal to daemon/link.c and its tests: not part of the Link API. */

#include <stddef.h>

#include "link.h"

/*
 * Feeds len bytes to the Link's frame parser exactly as if they had been read
 * from its socket (same checks, same dispatch, same callbacks). Returns 0 when
 * all were consumed, a negative errno once the link is down. For the fuzzer.
 */
int link_feed_for_fuzzing(Link *l, const void *data, size_t len);

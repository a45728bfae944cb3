/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * dirtyrepd's capabilities (docs/security.md). As root it needs only
 * CAP_NET_ADMIN (service address add/remove over rtnetlink) and CAP_NET_RAW
 * (gratuitous ARP from an AF_PACKET socket): every other capability is
 * dropped at start-up, before any thread exists (capabilities are per
 * thread and inherited by new ones).
 */

#include <stdbool.h>
#include <stdint.h>

#define DAEMON_CAPABILITIES                                                                                 \
        ((UINT64_C(1) << 12 /* CAP_NET_ADMIN */) | (UINT64_C(1) << 13 /* CAP_NET_RAW    \
                                                                                           */))

/*
 * Reduces the calling thread's permitted and effective sets to
 * DAEMON_CAPABILITIES (those it has), empties the inheritable and ambient
 * sets, and, unless keep_bounding, reduces the bounding set to
 * DAEMON_CAPABILITIES too (the unit's CapabilityBoundingSet=, so the same
 * with and without systemd). The bounding set is what limits children:
 * a child running as root (the fence command, a VMM started at failover)
 * regains every capability of the bounding set at execve(). Does nothing
 * for a process without capabilities. Returns 0 or a negative errno;
 * *ret_bounding_reduced says whether the bounding set was reduced.
 */
int caps_drop(bool keep_bounding, bool *ret_bounding_reduced);

/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * Shared by the standby's own files (daemon/standby.c, the receiving side;
 * daemon/standby-replica.c, the replica file in StateDirectory=), and by
 * tests and fuzzers. Not part of role.h's interface.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "layout.h"
#include "role.h"

#define STANDBY_MAX_STATE_BYTES ((size_t) 64 << 20)
#define SESSION_BYTES           16u
#define UUID_BYTES              16u

/* A validated RAM layout (common/layout.h). Pages are VM-wide: regions concatenated in layout order. */
typedef RamRegion Region;
typedef RamLayout Layout;

typedef struct Replica {
        bool valid; /* a committed epoch is here */
        Layout layout;
        uint8_t vm_uuid[UUID_BYTES];
        int fd;
        uint8_t *map; /* layout.memfd_size bytes, MAP_SHARED */
        uint8_t *state;
        size_t state_len;
        uint64_t epoch;
        uint8_t session[SESSION_BYTES];
        bool stale; /* restored after maintenance: not promotable until the next commit */
} Replica;

/* The replica outside a Standby (role.h's StandbyReplica). */
struct StandbyReplica {
        Replica r;
};

/*
 * daemon/standby.c: a fresh memfd of size bytes (zero-filled), mapped
 * MAP_SHARED read-write. On success the caller owns *ret_fd and *ret_map;
 * returns a negative errno otherwise (nothing written).
 */
int memfd_map_new(const char *name, uint64_t size, int *ret_fd, uint8_t **ret_map);

/*
 * For tests and fuzzers (tests/fuzz/fuzz-standby.c): hands an already
 * connected stream socket to the standby as if its listener had accepted
 * it, so a peer can be played over a socketpair without TCP. The standby
 * owns fd whatever this returns. Needs no standby_start().
 */
int standby_accept_fd(Standby *s, int fd);

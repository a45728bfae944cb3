/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * For tests and fuzzers (tests/fuzz/fuzz-standby.c): hands an already
 * connected stream socket to the standby as if its listener had accepted
 * it, so a peer can be played over a socketpair without TCP. The standby
 * owns fd whatever this returns. Needs no standby_start().
 */

#include "role.h"

int standby_accept_fd(Standby *s, int fd);

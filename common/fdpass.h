/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * One message per SOCK_SEQPACKET packet, with up to FDPASS_MAX_FDS file
 * descriptors in SCM_RIGHTS. Received fds are always O_CLOEXEC.
 */

#include <stddef.h>
#include <sys/types.h>

#define FDPASS_MAX_FDS 253 /* SCM_MAX_FD */

/* Sends buf and fds as one packet. Returns 0 or a negative errno (-EMSGSIZE if too big). */
int fdpass_send(int sock, const void *buf, size_t len, const int *fds, size_t n_fds);

/*
 * Receives one packet into buf (capacity cap). Writes at most max_fds
 * received fds to fds (the caller owns them) and their count to *ret_n_fds.
 * Returns the packet length, 0 on orderly shutdown, or a negative errno:
 * -EMSGSIZE if the packet was larger than cap (it is discarded, fds closed),
 * -ETOOMANYREFS if more fds came than max_fds (all closed).
 */
ssize_t fdpass_recv(int sock, void *buf, size_t cap, int *fds, size_t max_fds, size_t *ret_n_fds);

/* Closes n fds from an array and sets them to -1. */
void fdpass_close_all(int *fds, size_t n);

/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * dirtyrepd --debug-socket PATH: a root-only (0600, SO_PEERCRED) Unix socket
 * with a line protocol (daemon/debug-request.h), served on the manager's
 * event loop. It is what the integration tests and a host without a system
 * bus have instead of the D-Bus API; docs/architecture.md says why it stays.
 */

#include "manager.h"

typedef struct DebugServer DebugServer;

/*
 * Binds path (replacing what is there), makes it 0600 and serves it on
 * m->event. Returns 0 and a server the caller frees with
 * debug_server_free(), or a negative errno (logged).
 */
int debug_server_open(Manager *m, const char *path, DebugServer **ret);

/* Stops listening and removes the socket file. Accepts NULL; returns NULL. */
DebugServer *debug_server_free(DebugServer *s);

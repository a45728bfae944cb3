/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * dirtyrepctl's exit codes (dirtyrepctl(1), EXIT STATUS) and the verbs that
 * live in their own files. A verb is int verb_NAME(int argc, char *argv[]):
 * argv[0] is the verb, and it returns one of the exit codes below.
 */

#include <stdlib.h>

enum {
        /* EXIT_SUCCESS 0, EXIT_FAILURE 1: anything not listed */
        EXIT_USAGE = 2,       /* bad command line */
        EXIT_NO_SUCH_VM = 3,  /* no VM of that name (or none at all) */
        EXIT_STATE = 4,       /* refused in the VM's current state (not primary, not attached, ...) */
        EXIT_DENIED = 5,      /* not root or in group dirtyrep */
        EXIT_UNREACHABLE = 6, /* no bus, or dirtyrepd not on it */
        EXIT_UNSUPPORTED = 7, /* the daemon lacks the method (e.g. Failover before issue 4) */
        EXIT_CONFIG = 8,      /* reload: the new configuration is invalid, nothing changed */
        /* status (the worst VM decides, in this order of severity, failed first): */
        EXIT_UNPROTECTED = 10, /* running without a committed replica: syncing, connecting,
                                * listening, attaching, detached, unprotected, ... */
        EXIT_SUSPENDED = 11,   /* the primary suspended its VM (split-brain guard) */
        EXIT_VM_FAILED = 12,   /* a VM's role failed, or its service address takeover did */
};

/* client/image.c (CRIU-style images), when it is built. */
int verb_image(int argc, char *argv[]);

/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * The debug socket's protocol without the socket (daemon/debug.c serves it):
 * the line framing, the request parser, which requests fit a VM in which
 * role, and the JSON of `status`. No I/O and no Manager, so
 * tests/fuzz/fuzz-debug.c drives exactly this code.
 *
 * One request per connection, one line of at most DEBUG_LINE_MAX - 1 bytes,
 * at most DEBUG_WORDS_MAX words separated by blanks (more are ignored):
 *   status [VM]                one JSON object per VM, one per line
 *   checkpoint VM              seal an epoch now: "ok EPOCH"
 *   freeze VM | thaw VM        primary: seal and keep the VM paused / resume
 *   reset-pauses VM            primary: forget the pause window
 *   resume VM                  primary: release output unprotected
 *   hash VM PATH               page-hash file (primary: frozen RAM; standby: replica)
 *   dump VM RAMPATH STATEPATH  standby: committed replica RAM and VmState
 *   image VM DIR [PARENT]      primary: checkpoint image at the next seal (LZ4), answered once
 *                              written: "ok EPOCH pages=N bytes=N pause_ns=N"
 *   promote VM [force]         standby: fence, then start the VM on the replica
 *                              (force: even with the primary connected or the fence failing)
 *   demote VM                  primary: stop the VMM dirtyrepd started, give up the
 *                              service address, become a standby again
 *   stall SECONDS              block the loop (the watchdog test), 0..DEBUG_STALL_MAX_SEC
 * Answers "ok ..." or "error MESSAGE".
 */

#include <stdbool.h>
#include <stddef.h>

#include "role.h"

#define DEBUG_LINE_MAX      4096
#define DEBUG_WORDS_MAX     5
#define DEBUG_STALL_MAX_SEC 120

typedef enum DebugVerb {
        DEBUG_STATUS,
        DEBUG_STALL,
        DEBUG_CHECKPOINT,
        DEBUG_FREEZE,
        DEBUG_THAW,
        DEBUG_RESET_PAUSES,
        DEBUG_RESUME,
        DEBUG_HASH,
        DEBUG_DUMP,
        DEBUG_IMAGE,
        DEBUG_PROMOTE,
        DEBUG_DEMOTE,
        DEBUG_UNKNOWN, /* answered once the VM is known: the error names its role */
} DebugVerb;

/* What a VM is, for debug_request_fits(). */
typedef enum DebugRole {
        DEBUG_ROLE_PRIMARY = 1 << 0,
        DEBUG_ROLE_STANDBY = 1 << 1,
        DEBUG_ROLE_FAILED = 1 << 2,
} DebugRole;

typedef struct DebugRequest {
        DebugVerb verb;
        char *words[DEBUG_WORDS_MAX]; /* into the parsed line; words[0] is the verb */
        size_t n_words;
        const char *vm;     /* words[1], or NULL (status of every VM) */
        unsigned stall_sec; /* DEBUG_STALL */
        bool force;         /* DEBUG_PROMOTE with "force" */
} DebugRequest;

/* A connection's bytes until its newline. */
typedef struct DebugLine {
        char buf[DEBUG_LINE_MAX];
        size_t len;
} DebugLine;

/* Where the next bytes go (recv() into it) and how many fit. */
static inline char *debug_line_tail(DebugLine *l, size_t *ret_room)
{
        *ret_room = sizeof(l->buf) - 1 - l->len;
        return l->buf + l->len;
}

/*
 * Accounts n more bytes written at debug_line_tail(). Returns 1 and the
 * line (without its newline, NUL-terminated, in l) in *ret_line when a
 * newline arrived, 0 when more is needed, -E2BIG when the buffer is full
 * without one. A NUL byte ends what is looked at, as in a C string.
 */
int debug_line_add(DebugLine *l, size_t n, char **ret_line);

/*
 * Parses one request line (modified: split into words). Returns 0 and
 * *ret, or -EINVAL with the error to answer in error ("empty request",
 * "stall needs ...", "'VERB' needs a VM name"). An unknown verb parses,
 * as DEBUG_UNKNOWN: its answer names the VM's role.
 */
int debug_request_parse(char *line, DebugRequest *ret, char *error, size_t error_size);

/* Whether a request for a VM (verb, number of words) fits the VM's role. */
bool debug_request_fits(const DebugRequest *req, DebugRole role);

/*
 * The `status` line of one VM: a JSON object (json-c: strings escaped, no
 * NaN or infinity) and a newline. Returns 0 and a malloc()ed string, or
 * -ENOMEM.
 */
int debug_status_json(const char *name, const ReplStatus *st, char **ret);

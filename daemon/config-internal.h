/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * Shared by the files of the dirtyrepd configuration: daemon/config.c (the
 * parser, the objects, loading) and daemon/config-check.c (the checks that
 * are not parsing). Not part of config.h's interface.
 */

#include <stdbool.h>
#include <stddef.h>

#include "config.h"
#include "macros.h"

#define DEFAULT_STATE_DIRECTORY   "/var/lib/dirtyrep"
#define DEFAULT_RUNTIME_DIRECTORY "/run/dirtyrep"
#define VALUE_QUOTE_MAX           64U /* bytes of a value quoted in an error message */
#define ESCAPE_BUF_SIZE           (VALUE_QUOTE_MAX * 4 + 4)

/* Error collection (config.c): bounded per file and per load, "PATH:LINE: message" lines. */
typedef struct ErrorList {
        char *buf; /* lines separated by '\n' */
        size_t len;
        unsigned n_file;        /* lines kept for the current file */
        unsigned dropped_file;  /* lines not kept for the current file */
        unsigned n_total;       /* lines kept over all files */
        unsigned dropped_total; /* lines not kept because of ERRORS_TOTAL_MAX */
        unsigned errors_file;   /* errors in the current file, kept or not */
        bool any;               /* at least one error, kept or not */
        bool oom;
} ErrorList;

void error_list_done(ErrorList *e);
/* Records "PATH:LINE: message" (or "PATH: message" for line 0). */
_printf_(4, 5) void error_add(ErrorList *e, const char *path, unsigned line, const char *fmt, ...);
/* Ends a file: says how many of its errors were not kept. */
void error_file_done(ErrorList *e, const char *path);
/* Hands the collected message to *ret_errors (when wanted) and returns r, or -ENOMEM
 * when the message could not be built. */
int error_list_finish(ErrorList *e, int r, char **ret_errors);
/* At most VALUE_QUOTE_MAX bytes of s, non-printable bytes as \xNN, in buf
 * (ESCAPE_BUF_SIZE bytes) for an error message. Returns buf. */
const char *escape_value(const char *s, char *buf, size_t size);

/* config-check.c: what failover needs of a VM's configuration (Peer= for
 * FailoverPolicy=auto, VmmArgs= not setting what activation passes), into e
 * at the given lines. */
void check_failover_needs(const VmConfig *v, ErrorList *e, const char *path, unsigned policy_line,
                          unsigned args_line);
/* config-check.c: the cross-file checks of config_validate(), into e. */
void validate_into(const Config *c, ErrorList *e);

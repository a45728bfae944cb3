/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * Logging in the shape of systemd's log.h: log_*_errno() log and return
 * the negative errno they were given, so the decision point can write
 * `return log_error_errno(r, "Failed to ...: %m");`. "%m" prints the
 * error of the r passed in (not the ambient errno).
 *
 * Output goes to stderr with a syslog priority prefix ("<3>") when stderr
 * is the journal (JOURNAL_STREAM set), else a readable "name: " prefix.
 */

#include <stdarg.h>
#include <syslog.h>

#include "macros.h"

void log_set_max_level(int level);
int log_get_max_level(void);
void log_set_ident(const char *ident);

int log_internal(int level, int error, const char *file, int line, const char *func, const char *format, ...)
        _printf_(6, 7);

#define log_full_errno(level, error, ...) \
        log_internal((level), (error), __FILE__, __LINE__, __func__, __VA_ARGS__)

#define log_debug(...)   log_full_errno(LOG_DEBUG, 0, __VA_ARGS__)
#define log_info(...)    log_full_errno(LOG_INFO, 0, __VA_ARGS__)
#define log_notice(...)  log_full_errno(LOG_NOTICE, 0, __VA_ARGS__)
#define log_warning(...) log_full_errno(LOG_WARNING, 0, __VA_ARGS__)
#define log_error(...)   log_full_errno(LOG_ERR, 0, __VA_ARGS__)

#define log_debug_errno(e, ...)   log_full_errno(LOG_DEBUG, (e), __VA_ARGS__)
#define log_info_errno(e, ...)    log_full_errno(LOG_INFO, (e), __VA_ARGS__)
#define log_warning_errno(e, ...) log_full_errno(LOG_WARNING, (e), __VA_ARGS__)
#define log_error_errno(e, ...)   log_full_errno(LOG_ERR, (e), __VA_ARGS__)

/* For "should not happen" conditions where we return an error instead of asserting. */
#define log_oom() log_error_errno(-ENOMEM, "Out of memory.")

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
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <syslog.h>

#include "macros.h"

void log_set_max_level(int level);
int log_get_max_level(void);
void log_set_ident(const char *ident);

int log_internal(int level, int error, const char *file, int line, const char *func, const char *format, ...)
        _printf_(6, 7);

/*
 * Structured records (the journal's native protocol). A sink registered by
 * the program (dirtyrepd: daemon/journal.c, sd_journal_sendv()) receives
 * every record while stderr is the journal (JOURNAL_STREAM names stderr's
 * device and inode); otherwise records go to stderr as above. fields are
 * extra "KEY=value" strings. A message that starts with "VM NAME: " gets
 * VM=NAME without asking; log_event() adds MESSAGE_ID=, VM= and EPOCH=.
 * The sink runs under the log lock: it must not log.
 */
typedef void (*LogSink)(int level, int error, const char *file, int line, const char *func,
                        const char *message, const char *const *fields, size_t n_fields);
void log_set_sink(LogSink sink);
/* Whether records go to the sink now (a sink is set and stderr is the journal). */
bool log_to_sink(void);

int log_struct_internal(int level, int error, const char *file, int line, const char *func,
                        const char *message_id, const char *vm, uint64_t epoch, const char *format, ...)
        _printf_(9, 10);

/* A record of one event kind: message_id a 32-hex-digit MESSAGE_ID=, vm NULL for none, epoch 0 for none. */
#define log_event(level, message_id, vm, epoch, ...)                                                        \
        log_struct_internal((level), 0, __FILE__, __LINE__, __func__, (message_id), (vm), (epoch),          \
                            __VA_ARGS__)

#define log_full_errno(level, error, ...)                                                                   \
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

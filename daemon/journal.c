/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The journal sink of common/log.c (journal.h). Runs under the log lock:
 * nothing here logs; a record the journal refuses goes to stderr instead.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/uio.h>
#include <systemd/sd-journal.h>

#include "journal.h"
#include "log.h"
#include "macros.h"

#define FIELDS_MAX 16

static void journal_sink(int level, int error, const char *file, int line, const char *func,
                         const char *message, const char *const *fields, size_t n_fields)
{
        char msg[2100], prio[16], cfile[300], cline[32], cfunc[128], err[32];
        struct iovec iov[FIELDS_MAX];
        size_t n = 0;

        snprintf(msg, sizeof(msg), "MESSAGE=%s", message);
        snprintf(prio, sizeof(prio), "PRIORITY=%d", level);
        snprintf(cfile, sizeof(cfile), "CODE_FILE=%s", file);
        snprintf(cline, sizeof(cline), "CODE_LINE=%d", line);
        snprintf(cfunc, sizeof(cfunc), "CODE_FUNC=%s", func);
        iov[n++] = (struct iovec){msg, strlen(msg)};
        iov[n++] = (struct iovec){prio, strlen(prio)};
        iov[n++] = (struct iovec){(char *) "SYSLOG_IDENTIFIER=dirtyrepd",
                                  strlen("SYSLOG_IDENTIFIER=dirtyrepd")};
        iov[n++] = (struct iovec){cfile, strlen(cfile)};
        iov[n++] = (struct iovec){cline, strlen(cline)};
        iov[n++] = (struct iovec){cfunc, strlen(cfunc)};
        if (error > 0) {
                snprintf(err, sizeof(err), "ERRNO=%d", error);
                iov[n++] = (struct iovec){err, strlen(err)};
        }
        for (size_t i = 0; i < n_fields && n < FIELDS_MAX; i++)
                iov[n++] = (struct iovec){(char *) fields[i], strlen(fields[i])};
        if (sd_journal_sendv(iov, (int) n) < 0)
                fprintf(stderr, "<%d>%s\n", level, message);
}

void journal_log_setup(void)
{
        log_set_sink(journal_sink);
}

const char *journal_state_message_id(const char *state)
{
        if (!state)
                return NULL;
        if (streq(state, "protected"))
                return DR_MESSAGE_PROTECTED;
        if (streq(state, "failed"))
                return DR_MESSAGE_FAILED;
        if (streq(state, "suspended") || streq(state, "suspending"))
                return DR_MESSAGE_SUSPENDED;
        return DR_MESSAGE_UNPROTECTED;
}

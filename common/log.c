/* SPDX-License-Identifier: GPL-2.0-or-later */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>

#include "log.h"

static int max_level = LOG_INFO;
static const char *log_ident = NULL;
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;

void log_set_max_level(int level)
{
        max_level = level;
}

int log_get_max_level(void)
{
        return max_level;
}

void log_set_ident(const char *ident)
{
        log_ident = ident;
}

static void log_init_from_env(void)
{
        static int done = 0;
        const char *e;

        if (done)
                return;
        done = 1;
        e = getenv("DIRTYREP_LOG_LEVEL");
        if (!e)
                return;
        if (streq(e, "debug"))
                max_level = LOG_DEBUG;
        else if (streq(e, "info"))
                max_level = LOG_INFO;
        else if (streq(e, "notice"))
                max_level = LOG_NOTICE;
        else if (streq(e, "warning"))
                max_level = LOG_WARNING;
        else if (streq(e, "err") || streq(e, "error"))
                max_level = LOG_ERR;
}

int log_internal(int level, int error, const char *file, int line, const char *func, const char *format, ...)
{
        char buf[2048];
        va_list ap;
        int saved = errno;

        log_init_from_env();
        if (error < 0)
                error = -error;
        if (level > max_level)
                return -error;

        /* Make %m refer to the error we were handed, as systemd does. */
        errno = error;
        va_start(ap, format);
        vsnprintf(buf, sizeof(buf), format, ap);
        va_end(ap);

        pthread_mutex_lock(&log_lock);
        if (getenv("JOURNAL_STREAM"))
                fprintf(stderr, "<%d>%s\n", level, buf);
        else if (log_ident)
                fprintf(stderr, "%s: %s\n", log_ident, buf);
        else
                fprintf(stderr, "%s\n", buf);
        fflush(stderr);
        pthread_mutex_unlock(&log_lock);

        errno = saved;
        return -error;
}

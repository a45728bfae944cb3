/* SPDX-License-Identifier: GPL-2.0-or-later */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"

static int max_level = LOG_INFO;
static const char *log_ident = NULL;
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static LogSink log_sink;

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

void log_set_sink(LogSink sink)
{
        pthread_mutex_lock(&log_lock);
        log_sink = sink;
        pthread_mutex_unlock(&log_lock);
}

/* Whether stderr is the journal's stream: JOURNAL_STREAM=DEV:INO of stderr (systemd.exec(5)). */
static bool stderr_is_journal(void)
{
        static int cached = -1;
        const char *e;

        if (cached >= 0)
                return cached;
        cached = 0;
        e = getenv("JOURNAL_STREAM");
        if (e) {
                unsigned long long dev, ino;
                struct stat st;
                if (sscanf(e, "%llu:%llu", &dev, &ino) == 2 && fstat(STDERR_FILENO, &st) == 0 &&
                    (unsigned long long) st.st_dev == dev && (unsigned long long) st.st_ino == ino)
                        cached = 1;
        }
        return cached;
}

bool log_to_sink(void)
{
        return log_sink && stderr_is_journal();
}

/* VM=NAME for a message "VM NAME: ..." (the daemon's convention), into buf; false: none. */
static bool vm_field_from_message(const char *msg, char *buf, size_t size)
{
        size_t n;

        if (strncmp(msg, "VM ", 3) != 0)
                return false;
        n = strspn(msg + 3, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-");
        if (n == 0 || n > 64 || msg[3 + n] != ':')
                return false;
        snprintf(buf, size, "VM=%.*s", (int) n, msg + 3);
        return true;
}

static void log_emit(int level, int error, const char *file, int line, const char *func, const char *buf,
                     const char *const *fields, size_t n_fields)
{
        pthread_mutex_lock(&log_lock);
        if (log_sink && stderr_is_journal()) {
                const char *all[8];
                char vm[80];
                size_t n = 0;
                bool has_vm = false;

                for (size_t i = 0; i < n_fields && n < ELEMENTSOF(all) - 1; i++) {
                        all[n++] = fields[i];
                        has_vm = has_vm || strncmp(fields[i], "VM=", 3) == 0;
                }
                if (!has_vm && vm_field_from_message(buf, vm, sizeof(vm)))
                        all[n++] = vm;
                log_sink(level, error, file, line, func, buf, all, n);
        } else if (getenv("JOURNAL_STREAM"))
                fprintf(stderr, "<%d>%s\n", level, buf);
        else if (log_ident)
                fprintf(stderr, "%s: %s\n", log_ident, buf);
        else
                fprintf(stderr, "%s\n", buf);
        fflush(stderr);
        pthread_mutex_unlock(&log_lock);
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

        log_emit(level, error, file, line, func, buf, NULL, 0);
        errno = saved;
        return -error;
}

int log_struct_internal(int level, int error, const char *file, int line, const char *func,
                        const char *message_id, const char *vm, uint64_t epoch, const char *format, ...)
{
        char buf[2048], id[48], vmf[80], ep[40];
        const char *fields[3];
        size_t n = 0;
        va_list ap;
        int saved = errno;

        log_init_from_env();
        if (error < 0)
                error = -error;
        if (level > max_level)
                return -error;
        errno = error;
        va_start(ap, format);
        vsnprintf(buf, sizeof(buf), format, ap);
        va_end(ap);

        if (message_id) {
                snprintf(id, sizeof(id), "MESSAGE_ID=%s", message_id);
                fields[n++] = id;
        }
        if (vm) {
                snprintf(vmf, sizeof(vmf), "VM=%s", vm);
                fields[n++] = vmf;
        }
        if (epoch > 0) {
                snprintf(ep, sizeof(ep), "EPOCH=%llu", (unsigned long long) epoch);
                fields[n++] = ep;
        }
        log_emit(level, error, file, line, func, buf, fields, n);
        errno = saved;
        return -error;
}

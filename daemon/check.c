/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Configuration checks that need the system: secret files and the VMM's
 * own verdict on VmmArgs= (check.h). Run by `dirtyrepd --check-config` and
 * at start-up, before any thread exists.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "log.h"
#include "macros.h"
#include "util.h"

extern char **environ;

/* The last non-empty line of the VMM's output, control characters replaced: its error. */
static void last_line(char *buf, size_t len, char *out, size_t size)
{
        size_t end = len, start;

        while (end > 0 && (buf[end - 1] == '\n' || buf[end - 1] == ' '))
                end--;
        start = end;
        while (start > 0 && buf[start - 1] != '\n')
                start--;
        snprintf(out, size, "%.*s", (int) (end - start), buf + start);
        for (char *p = out; *p; p++)
                if ((unsigned char) *p < 0x20 || *p == 0x7f)
                        *p = '?';
}

int check_vmm_args(const VmConfig *v, char **ret_error)
{
        _cleanup_free_ char **argv = NULL;
        _cleanup_close_ int rd = -EBADF;
        posix_spawn_file_actions_t fa;
        char out[CHECK_VMM_OUTPUT_MAX], line[512];
        int pipefd[2], status = 0, r;
        size_t n = 0, len = 0;
        uint64_t end;
        pid_t pid;

        if (access(v->vmm, X_OK) < 0) {
                r = -errno;
                if (asprintf(ret_error, "%s: Vmm=%s cannot be run: %s", v->path, v->vmm, strerror(-r)) < 0)
                        *ret_error = NULL;
                return r;
        }
        /* QEMU has no dry run of its command line: that it can be run is what can be checked here
         * (the template's placeholders were checked when the configuration was read). */
        if (v->vmm_type == VMM_TYPE_QEMU)
                return 0;
        argv = calloc(v->n_vmm_args + 16, sizeof(char *));
        if (!argv)
                return -ENOMEM;
        argv[n++] = v->vmm;
        argv[n++] = (char *) "--check";
        for (size_t i = 0; i < v->n_vmm_args; i++)
                argv[n++] = v->vmm_args[i];
        /* What activation adds (failover.c), with stand-ins for the replica's state and fds. */
        argv[n++] = (char *) "--name";
        argv[n++] = v->name;
        argv[n++] = (char *) "--control";
        argv[n++] = v->control_socket;
        argv[n++] = (char *) "--restore";
        argv[n++] = (char *) "/dev/null";
        argv[n++] = (char *) "--ram-fd";
        argv[n++] = (char *) "3";
        argv[n++] = (char *) "--ready-fd";
        argv[n++] = (char *) "5";
        if (v->console_commit)
                argv[n++] = (char *) "--console-commit";
        argv[n] = NULL;

        if (pipe2(pipefd, O_CLOEXEC) < 0)
                return -errno;
        rd = pipefd[0];
        r = posix_spawn_file_actions_init(&fa);
        if (r != 0) {
                safe_close(pipefd[1]);
                return -r;
        }
        (void) posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
        (void) posix_spawn_file_actions_adddup2(&fa, pipefd[1], STDOUT_FILENO);
        (void) posix_spawn_file_actions_adddup2(&fa, pipefd[1], STDERR_FILENO);
        r = posix_spawn(&pid, argv[0], &fa, NULL, argv, environ);
        posix_spawn_file_actions_destroy(&fa);
        safe_close(pipefd[1]);
        if (r != 0) {
                if (asprintf(ret_error, "%s: Vmm=%s cannot be run: %s", v->path, v->vmm, strerror(r)) < 0)
                        *ret_error = NULL;
                return -r;
        }

        /* Bounded in time and size: a VMM that hangs or floods is an error too. */
        end = now_usec() + CHECK_VMM_TIMEOUT_USEC;
        for (;;) {
                struct pollfd p = {.fd = rd, .events = POLLIN};
                uint64_t now = now_usec();
                ssize_t k;

                if (now >= end) {
                        (void) kill(pid, SIGKILL);
                        (void) waitpid(pid, NULL, 0);
                        if (asprintf(ret_error, "%s: Vmm=%s --check did not finish within %llu s", v->path,
                                     v->vmm, CHECK_VMM_TIMEOUT_USEC / 1000000ULL) < 0)
                                *ret_error = NULL;
                        return -ETIMEDOUT;
                }
                r = poll(&p, 1, (int) ((end - now) / 1000 + 1));
                if (r < 0 && errno == EINTR)
                        continue;
                if (r < 0)
                        break;
                if (r == 0)
                        continue;
                k = read(rd, out + len, sizeof(out) - 1 - len);
                if (k < 0 && errno == EINTR)
                        continue;
                if (k <= 0)
                        break;
                len += (size_t) k;
                if (len == sizeof(out) - 1) {
                        /* Keep the tail: the error is the last line. */
                        memmove(out, out + len / 2, len - len / 2);
                        len -= len / 2;
                }
        }
        out[len] = 0;
        while (waitpid(pid, &status, 0) < 0)
                if (errno != EINTR)
                        return -errno;
        if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
                return 0;
        last_line(out, len, line, sizeof(line));
        if (strstr(line, "--check") && (strstr(line, "unrecognized") || strstr(line, "unknown"))) {
                if (asprintf(ret_error,
                             "%s: Vmm=%s has no --check mode, so VmmArgs= cannot be verified: a VMM for "
                             "dirtyrep must take dirtyrep-vmm's options, --check included (%s)",
                             v->path, v->vmm, line) < 0)
                        *ret_error = NULL;
                return -EOPNOTSUPP;
        }
        if (asprintf(ret_error,
                     "%s: VmmArgs=%s: the VMM rejects the arguments failover would start it with: %s",
                     v->path, v->vmm_args_string ? v->vmm_args_string : "",
                     line[0] ? line : "(no message; exit status other than 0)") < 0)
                *ret_error = NULL;
        return -EINVAL;
}

static int append_line(char **errors, const char *line)
{
        char *s;

        if (asprintf(&s, "%s%s%s", *errors ? *errors : "", *errors ? "\n" : "", line) < 0)
                return -ENOMEM;
        free(*errors);
        *errors = s;
        return 0;
}

int check_config_system(const Config *c, char **ret_errors)
{
        _cleanup_free_ char *errors = NULL;
        int r;

        for (size_t i = 0; i < c->n_vms; i++) {
                const VmConfig *v = c->vms[i];
                _cleanup_free_ char *err = NULL;
                uint8_t *secret = NULL;
                size_t secret_len = 0;

                r = config_load_secret(v->secret_file, &secret, &secret_len, &err);
                if (r >= 0)
                        config_secret_free(secret, secret_len);
                else {
                        _cleanup_free_ char *l = NULL;
                        if (asprintf(&l, "%s: SecretFile=: %s%s", v->path, err ? err : strerror(-r),
                                     r == -EACCES && geteuid() != 0 ? " (run --check-config as root, as the "
                                                                      "service runs)"
                                                                    : "") < 0 ||
                            append_line(&errors, l) < 0)
                                return -ENOMEM;
                }
                err = mfree(err);
                r = check_vmm_args(v, &err);
                if (r == -ENOMEM)
                        return r;
                if (r < 0 && append_line(&errors, err ? err : "VMM check failed") < 0)
                        return -ENOMEM;
        }
        if (errors) {
                if (ret_errors)
                        *ret_errors = TAKE_PTR(errors);
                return -EINVAL;
        }
        return 0;
}

void check_log_standby(const VmConfig *v)
{
        _cleanup_free_ char *err = NULL;

        if (v->role == VM_ROLE_STANDBY && check_vmm_args(v, &err) < 0)
                log_warning("VM %s: failover would fail: %s", v->name, err ? err : "the VMM check failed");
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Fencing, VMM activation and the service address: see failover.h.
 *
 * Children are started with fork() + execve() and only async-signal-safe
 * calls in between (the daemon has threads): everything they need (argv,
 * envp, fds) is prepared before the fork. Each child is watched through a
 * pidfd on the loop and reaped with waitid(P_PIDFD), so the daemon needs no
 * SIGCHLD handling and never reaps a child that is not its own.
 */
#include <errno.h>
#include <poll.h>
#include <limits.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "failover.h"
#include "log.h"
#include "takeover.h"
#include "util.h"

#ifndef P_PIDFD
#define P_PIDFD 3
#endif

#define VMM_STOP_GRACE_USEC (2 * USEC_PER_SEC)

typedef struct Child {
        pid_t pid;
        int pidfd;
        sd_event_source *exit_source;
} Child;

struct Failover {
        sd_event *event;
        const DaemonConfig *d;
        const VmConfig *vm;
        FailoverCallbacks cb;
        void *userdata;

        /* Fence command. */
        Child fence;
        int fence_out;
        sd_event_source *fence_out_source, *fence_timer, *fence_defer;
        char fence_buf[FENCE_OUTPUT_MAX + 1];
        size_t fence_len;
        bool fence_timed_out;

        /* The VMM we started. */
        Child vmm;
        int ready_fd;
        sd_event_source *ready_source;
        char vmm_log[PATH_MAX]; /* its stdout and stderr, so a failed start can say why */
        uint64_t vmm_log_start; /* where this start's output begins in it */

        bool address_up;
        int address_error;     /* the last add/remove failed with this (0: it did not) */
        bool address_error_up; /* ... and it was an add */
};

static int pidfd_open_(pid_t pid)
{
        return (int) syscall(SYS_pidfd_open, pid, 0);
}

/* Closes every fd >= from in the child (async-signal-safe). */
static void close_from(int from)
{
        if (syscall(SYS_close_range, (unsigned) from, ~0U, 0) == 0)
                return;
        for (int fd = from; fd < 1024; fd++)
                (void) close(fd);
}

/*
 * fork + exec. fds[i] (or -1) becomes fd 3 + i in the child; stdout and
 * stderr become out_fd when >= 0. The child gets an empty signal mask and
 * (own_group) its own process group, so a timeout can kill its helpers too.
 * Returns the pid, or a negative errno.
 */
static pid_t spawn(char *const argv[], char *const envp[], const int *fds, size_t n_fds, int out_fd,
                   bool own_group)
{
        sigset_t empty;
        pid_t pid;

        sigemptyset(&empty);
        pid = fork();
        if (pid < 0)
                return -errno;
        if (pid > 0)
                return pid;

        /* Child: async-signal-safe calls only. */
        if (own_group)
                (void) setpgid(0, 0);
        (void) sigprocmask(SIG_SETMASK, &empty, NULL);
        if (out_fd >= 0) {
                if (dup2(out_fd, STDOUT_FILENO) < 0 || dup2(out_fd, STDERR_FILENO) < 0)
                        _exit(127);
        }
        /* Move the passed fds above the target range first, so dup2 never clobbers one. */
        int moved[8];
        for (size_t i = 0; i < n_fds && i < ELEMENTSOF(moved); i++) {
                moved[i] = fds[i] >= 0 ? fcntl(fds[i], F_DUPFD, 3 + (int) n_fds) : -1;
                if (fds[i] >= 0 && moved[i] < 0)
                        _exit(127);
        }
        for (size_t i = 0; i < n_fds && i < ELEMENTSOF(moved); i++) {
                if (moved[i] < 0)
                        continue;
                if (dup2(moved[i], 3 + (int) i) < 0) /* dup2 clears FD_CLOEXEC on the new fd */
                        _exit(127);
        }
        close_from(3 + (int) n_fds);
        execve(argv[0], argv, envp);
        _exit(127);
}

static void child_release(Child *c)
{
        c->exit_source = sd_event_source_disable_unref(c->exit_source);
        c->pidfd = safe_close(c->pidfd);
        c->pid = 0;
}

/* Reaps the child if it exited; returns true then, with its status. */
static bool child_reap(Child *c, siginfo_t *ret)
{
        siginfo_t si = {};

        if (c->pid <= 0)
                return false;
        if (waitid(P_PIDFD, (id_t) c->pidfd, &si, WEXITED | WNOHANG) < 0 || si.si_pid == 0)
                return false;
        *ret = si;
        return true;
}

static int child_watch(Failover *f, Child *c, pid_t pid, sd_event_io_handler_t handler)
{
        c->pid = pid;
        c->pidfd = pidfd_open_(pid);
        if (c->pidfd < 0) {
                int r = -errno;
                (void) kill(pid, SIGKILL);
                (void) waitpid(pid, NULL, 0);
                c->pid = 0;
                return r;
        }
        return sd_event_add_io(f->event, &c->exit_source, c->pidfd, EPOLLIN, handler, f);
}

/* SIGTERM, wait up to grace, SIGKILL, wait. Blocks the loop at most grace + a moment. */
static void child_stop(Child *c, uint64_t grace_usec)
{
        siginfo_t si;
        uint64_t end;

        if (c->pid <= 0)
                return;
        (void) kill(c->pid, SIGTERM);
        end = now_usec() + grace_usec;
        while (!child_reap(c, &si)) {
                uint64_t now = now_usec();
                struct pollfd pfd = {.fd = c->pidfd, .events = POLLIN};

                if (now >= end) {
                        (void) kill(c->pid, SIGKILL);
                        (void) waitid(P_PIDFD, (id_t) c->pidfd, &si, WEXITED);
                        break;
                }
                /* The pidfd becomes readable when the child exits: sleep until then, not in steps. */
                (void) poll(&pfd, 1, (int) DIV_ROUND_UP(end - now, USEC_PER_MSEC));
        }
        child_release(c);
}

/* ---- fence ---------------------------------------------------------------------------- */

static void fence_log_output(Failover *f)
{
        char *save = NULL;

        f->fence_buf[f->fence_len] = 0;
        for (char *l = strtok_r(f->fence_buf, "\n", &save); l; l = strtok_r(NULL, "\n", &save))
                log_info("VM %s: fence: %s", f->vm->name, l);
        f->fence_len = 0;
}

static void fence_cleanup(Failover *f)
{
        f->fence_out_source = sd_event_source_disable_unref(f->fence_out_source);
        f->fence_timer = sd_event_source_disable_unref(f->fence_timer);
        f->fence_out = safe_close(f->fence_out);
        child_release(&f->fence);
}

static void fence_read(Failover *f)
{
        char buf[1024];
        ssize_t n;

        while (f->fence_out >= 0) {
                n = read(f->fence_out, buf, sizeof(buf));
                if (n <= 0)
                        return;
                /* Keep at most FENCE_OUTPUT_MAX bytes; the rest is dropped (and said so). */
                size_t take = MIN((size_t) n, FENCE_OUTPUT_MAX - f->fence_len);
                memcpy(f->fence_buf + f->fence_len, buf, take);
                f->fence_len += take;
        }
}

static int on_fence_output(sd_event_source *s, int fd, uint32_t revents, void *userdata)
{
        Failover *f = userdata;

        fence_read(f);
        if (revents & (EPOLLHUP | EPOLLERR))
                f->fence_out_source = sd_event_source_disable_unref(f->fence_out_source);
        return 0;
}

static int on_fence_exit(sd_event_source *s, int fd, uint32_t revents, void *userdata)
{
        Failover *f = userdata;
        char reason[160];
        siginfo_t si;
        int result;

        if (!child_reap(&f->fence, &si))
                return 0;
        fence_read(f);
        fence_log_output(f);
        if (f->fence_timed_out) {
                result = -ETIMEDOUT;
                snprintf(reason, sizeof(reason),
                         "fence command timed out after %" PRIu64 " s and was killed",
                         (uint64_t) (FENCE_TIMEOUT_USEC / USEC_PER_SEC));
        } else if (si.si_code == CLD_EXITED && si.si_status == 0) {
                result = 0;
                snprintf(reason, sizeof(reason), "fence command succeeded");
        } else {
                result = -EPROTO;
                if (si.si_code == CLD_EXITED)
                        snprintf(reason, sizeof(reason), "fence command exited with status %d%s",
                                 si.si_status, si.si_status == 127 ? " (could not be run)" : "");
                else
                        snprintf(reason, sizeof(reason), "fence command killed by signal %d", si.si_status);
        }
        fence_cleanup(f);
        if (result == 0)
                log_notice("VM %s: %s", f->vm->name, reason);
        else
                log_error("VM %s: %s; not promoting", f->vm->name, reason);
        if (f->cb.fenced)
                f->cb.fenced(f, result, reason, f->userdata);
        return 0;
}

static int on_fence_timeout(sd_event_source *s, uint64_t usec, void *userdata)
{
        Failover *f = userdata;

        f->fence_timed_out = true;
        if (f->fence.pid > 0)
                (void) kill(-f->fence.pid, SIGKILL); /* its own process group: helpers die too */
        return 0;
}

static int on_fence_skip(sd_event_source *s, void *userdata)
{
        Failover *f = userdata;

        f->fence_defer = sd_event_source_disable_unref(f->fence_defer);
        if (f->cb.fenced)
                f->cb.fenced(f, 0, "no FenceCommand= configured", f->userdata);
        return 0;
}

bool failover_fencing(Failover *f)
{
        return f->fence.pid > 0 || f->fence_defer;
}

int failover_fence(Failover *f)
{
        _cleanup_free_ char *env_vm = NULL;
        _cleanup_close_ int rd = -EBADF, wr = -EBADF;
        int p[2];
        pid_t pid;
        int r;

        if (failover_fencing(f))
                return -EBUSY;
        if (!f->vm->fence_command)
                return sd_event_add_defer(f->event, &f->fence_defer, on_fence_skip, f);

        if (asprintf(&env_vm, "DIRTYREP_VM=%s", f->vm->name) < 0)
                return -ENOMEM;
        char *argv[] = {(char *) "/bin/sh", (char *) "-c", f->vm->fence_command, NULL};
        char *envp[] = {(char *) "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", env_vm,
                        NULL};
        if (pipe2(p, O_CLOEXEC | O_NONBLOCK) < 0)
                return -errno;
        rd = p[0];
        wr = p[1];
        log_notice("VM %s: running fence command: %s", f->vm->name, f->vm->fence_command);
        pid = spawn(argv, envp, NULL, 0, wr, true);
        if (pid < 0)
                return log_error_errno(pid, "VM %s: cannot start the fence command: %m", f->vm->name);
        wr = safe_close(wr);
        f->fence_timed_out = false;
        f->fence_len = 0;
        r = child_watch(f, &f->fence, pid, on_fence_exit);
        if (r < 0)
                return r;
        f->fence_out = TAKE_FD(rd);
        r = sd_event_add_io(f->event, &f->fence_out_source, f->fence_out, EPOLLIN, on_fence_output, f);
        if (r >= 0)
                r = sd_event_add_time_relative(f->event, &f->fence_timer, CLOCK_MONOTONIC,
                                               FENCE_TIMEOUT_USEC, 0, on_fence_timeout, f);
        if (r < 0) {
                (void) kill(-pid, SIGKILL);
                child_stop(&f->fence, 0);
                fence_cleanup(f);
        }
        return r;
}

/* ---- VMM ------------------------------------------------------------------------------ */

static int on_vmm_exit(sd_event_source *s, int fd, uint32_t revents, void *userdata)
{
        Failover *f = userdata;
        siginfo_t si;

        if (!child_reap(&f->vmm, &si))
                return 0;
        if (si.si_code == CLD_EXITED)
                log_full_errno(si.si_status == 0 ? LOG_NOTICE : LOG_ERR, 0,
                               "VM %s: VMM (pid %d) exited with status %d", f->vm->name, (int) f->vmm.pid,
                               si.si_status);
        else
                log_error("VM %s: VMM (pid %d) killed by signal %d", f->vm->name, (int) f->vmm.pid,
                          si.si_status);
        child_release(&f->vmm);
        f->ready_source = sd_event_source_disable_unref(f->ready_source);
        f->ready_fd = safe_close(f->ready_fd);
        if (f->cb.vmm_exited)
                f->cb.vmm_exited(f, si.si_code, si.si_status, f->userdata);
        return 0;
}

static int on_vmm_ready(sd_event_source *s, int fd, uint32_t revents, void *userdata)
{
        Failover *f = userdata;
        char buf[8];
        ssize_t n;

        n = read(fd, buf, sizeof(buf));
        if (n < 0 && errno == EAGAIN)
                return 0;
        f->ready_source = sd_event_source_disable_unref(f->ready_source);
        f->ready_fd = safe_close(f->ready_fd);
        if (n <= 0)
                return 0; /* closed without a word: it failed; on_vmm_exit reports */
        log_notice("VM %s: the VMM (pid %d) runs the guest from the replica", f->vm->name, (int) f->vmm.pid);
        if (f->cb.vmm_ready)
                f->cb.vmm_ready(f, f->userdata);
        return 0;
}

static void words_freep(char ***l)
{
        for (char **p = *l; p && *p; p++)
                free(*p);
        free(*l);
}

int failover_activate(Failover *f, int ram_fd_in, const uint8_t *state, size_t state_len, uint64_t epoch)
{
        _cleanup_close_ int ram_fd = ram_fd_in, state_fd = -EBADF, rd = -EBADF, wr = -EBADF, log_fd = -EBADF;
        off_t log_fd_start = 0;
        _cleanup_free_ char **argv = NULL;
        _cleanup_(words_freep) char **expanded = NULL;
        char state_path[64];
        int p[2], fds[3];
        size_t n = 0;
        pid_t pid;
        int r;

        if (f->vmm.pid > 0)
                return -EBUSY;
        if (ram_fd < 0 || !state || state_len == 0)
                return -EINVAL;

        /* The state as a memfd of its own: only the VMM reads it, through /proc/self/fd/4. */
        state_fd = memfd_new_sized("dirtyrep-vmstate", 0);
        if (state_fd < 0)
                return state_fd;
        r = loop_write(state_fd, state, state_len);
        if (r < 0)
                return r;
        if (pipe2(p, O_CLOEXEC | O_NONBLOCK) < 0)
                return -errno;
        rd = p[0];
        wr = p[1];

        /* fds in the child: 3 = RAM, 4 = state, 5 = ready pipe. */
        fds[0] = ram_fd;
        fds[1] = state_fd;
        fds[2] = wr;
        snprintf(state_path, sizeof(state_path), "/proc/self/fd/4");
        argv = calloc(f->vm->n_vmm_args + 16, sizeof(char *));
        if (!argv)
                return -ENOMEM;
        argv[n++] = f->vm->vmm;
        if (f->vm->vmm_type == VMM_TYPE_QEMU) {
                /* QEMU (docs/qemu.md): VmmArgs= is its command line with placeholders. */
                const VmmArgValues val = {.ram = "/proc/self/fd/3",
                                          .state = state_path,
                                          .ready_fd = "5",
                                          .control = f->vm->control_socket,
                                          .name = f->vm->name};

                expanded = calloc(f->vm->n_vmm_args + 1, sizeof(char *));
                if (!expanded)
                        return -ENOMEM;
                for (size_t i = 0; i < f->vm->n_vmm_args; i++) {
                        r = vmm_arg_expand(f->vm->vmm_args[i], &val, &expanded[i], NULL, NULL);
                        if (r < 0) /* VmmArgs= was checked at load: only -ENOMEM is left */
                                return log_error_errno(r, "VM %s: cannot expand VmmArgs=: %m", f->vm->name);
                        argv[n++] = expanded[i];
                }
        } else {
                for (size_t i = 0; i < f->vm->n_vmm_args; i++)
                        argv[n++] = f->vm->vmm_args[i];
                argv[n++] = (char *) "--name";
                argv[n++] = f->vm->name;
                argv[n++] = (char *) "--control";
                argv[n++] = f->vm->control_socket;
                argv[n++] = (char *) "--restore";
                argv[n++] = state_path;
                argv[n++] = (char *) "--ram-fd";
                argv[n++] = (char *) "3";
                argv[n++] = (char *) "--ready-fd";
                argv[n++] = (char *) "5";
                if (f->vm->console_commit)
                        argv[n++] = (char *) "--console-commit";
        }
        argv[n] = NULL;

        extern char **environ;
        /* A stale socket of a VMM that died would make the new one fail to bind. */
        (void) unlink(f->vm->control_socket);
        /* Its output goes to a file of its own, not to our stderr: it must outlive this
         * daemon (a pipe to us would break), and a start that fails can quote it. */
        snprintf(f->vmm_log, sizeof(f->vmm_log), "%s/%s.vmm.log",
                 f->d && f->d->runtime_directory ? f->d->runtime_directory : "/run/dirtyrep", f->vm->name);
        log_fd = open(f->vmm_log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0600);
        if (log_fd < 0) {
                log_warning_errno(-errno, "VM %s: cannot open %s, the VMM writes to our stderr: %m",
                                  f->vm->name, f->vmm_log);
                f->vmm_log[0] = 0;
        } else
                log_fd_start = lseek(log_fd, 0, SEEK_END);
        f->vmm_log_start = log_fd_start > 0 ? (uint64_t) log_fd_start : 0;
        log_notice("VM %s: starting %s on the replica of epoch %" PRIu64 " (%zu bytes of state)%s%s",
                   f->vm->name, f->vm->vmm, epoch, state_len, f->vmm_log[0] ? ", output to " : "",
                   f->vmm_log);
        pid = spawn(argv, environ, fds, 3, log_fd, false);
        if (pid < 0)
                return log_error_errno(pid, "VM %s: cannot start %s: %m", f->vm->name, f->vm->vmm);
        wr = safe_close(wr);
        r = child_watch(f, &f->vmm, pid, on_vmm_exit);
        if (r < 0)
                return log_error_errno(r, "VM %s: cannot watch the VMM: %m", f->vm->name);
        f->ready_fd = TAKE_FD(rd);
        r = sd_event_add_io(f->event, &f->ready_source, f->ready_fd, EPOLLIN, on_vmm_ready, f);
        if (r < 0) {
                child_stop(&f->vmm, 0);
                f->ready_fd = safe_close(f->ready_fd);
                return r;
        }
        return 0;
}

pid_t failover_vmm_pid(Failover *f)
{
        return f ? f->vmm.pid : 0;
}

void failover_stop_vmm(Failover *f)
{
        if (!f || f->vmm.pid <= 0)
                return;
        log_notice("VM %s: stopping the VMM (pid %d)", f->vm->name, (int) f->vmm.pid);
        f->ready_source = sd_event_source_disable_unref(f->ready_source);
        f->ready_fd = safe_close(f->ready_fd);
        child_stop(&f->vmm, VMM_STOP_GRACE_USEC);
}

void failover_vmm_output(Failover *f, char *buf, size_t size)
{
        _cleanup_close_ int fd = -EBADF;
        char tail[1024], *save = NULL, *p;
        off_t end, from;
        ssize_t n;
        size_t o = 0;

        buf[0] = 0;
        if (!f || !f->vmm_log[0])
                return;
        fd = open(f->vmm_log, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (fd < 0)
                return;
        end = lseek(fd, 0, SEEK_END);
        if (end <= (off_t) f->vmm_log_start)
                return;
        from = MAX((off_t) f->vmm_log_start, end - (off_t) sizeof(tail) + 1);
        n = pread(fd, tail, sizeof(tail) - 1, from);
        if (n <= 0)
                return;
        tail[n] = 0;
        p = tail;
        if (from > (off_t) f->vmm_log_start) { /* cut into a line: drop its start */
                char *nl = strchr(p, '\n');
                p = nl ? nl + 1 : p;
        }
        /* The last lines that fit (the error is usually the last one), in order, joined
         * with "; ": a one-line reason. */
        char *lines[64];
        size_t n_lines = 0, first, need = 0;
        for (char *l = strtok_r(p, "\n", &save); l; l = strtok_r(NULL, "\n", &save)) {
                if (n_lines == ELEMENTSOF(lines)) {
                        memmove(lines, lines + 1, sizeof(lines) - sizeof(lines[0]));
                        n_lines--;
                }
                lines[n_lines++] = l;
        }
        for (first = n_lines; first > 0; first--) {
                need += strlen(lines[first - 1]) + (first < n_lines ? 2 : 0);
                if (need + 1 > size && first < n_lines)
                        break;
        }
        for (size_t i = first; i < n_lines && o + 1 < size; i++) {
                int k = snprintf(buf + o, size - o, "%s%s", o ? "; " : "", lines[i]);
                if (k < 0)
                        break;
                o = MIN(size - 1, o + (size_t) k);
        }
}

void failover_forget_vmm(Failover *f)
{
        if (!f || f->vmm.pid <= 0)
                return;
        log_notice("VM %s: leaving the VMM (pid %d) running", f->vm->name, (int) f->vmm.pid);
        f->ready_source = sd_event_source_disable_unref(f->ready_source);
        f->ready_fd = safe_close(f->ready_fd);
        child_release(&f->vmm);
}

int failover_move_vmm(Failover *to, Failover *from)
{
        int r;

        if (!to || !from || to->vmm.pid > 0)
                return -EINVAL;
        if (from->vmm.pid <= 0)
                return 0;
        to->vmm.pid = from->vmm.pid;
        to->vmm.pidfd = TAKE_FD(from->vmm.pidfd);
        from->vmm.exit_source = sd_event_source_disable_unref(from->vmm.exit_source);
        from->vmm.pid = 0;
        memcpy(to->vmm_log, from->vmm_log, sizeof(to->vmm_log));
        to->vmm_log_start = from->vmm_log_start;
        r = sd_event_add_io(to->event, &to->vmm.exit_source, to->vmm.pidfd, EPOLLIN, on_vmm_exit, to);
        if (r < 0)
                return r;
        if (from->ready_fd >= 0) {
                to->ready_fd = TAKE_FD(from->ready_fd);
                from->ready_source = sd_event_source_disable_unref(from->ready_source);
                r = sd_event_add_io(to->event, &to->ready_source, to->ready_fd, EPOLLIN, on_vmm_ready, to);
        }
        return r;
}

/* ---- service address ------------------------------------------------------------------ */

int failover_service_address(Failover *f, bool up)
{
        char a[80];
        int r;

        if (f->vm->service_address.family == AF_UNSPEC || !f->vm->service_interface)
                return 0;
        takeover_format(&f->vm->service_address, a, sizeof(a));
        if (up) {
                r = takeover_add(f->vm->service_interface, &f->vm->service_address);
                f->address_error = r < 0 ? r : 0;
                f->address_error_up = true;
                if (r < 0)
                        return log_error_errno(r, "VM %s: cannot take over service address %s on %s: %m",
                                               f->vm->name, a, f->vm->service_interface);
                log_notice("VM %s: service address %s up on %s%s", f->vm->name, a, f->vm->service_interface,
                           f->vm->service_address.family == AF_INET ? ", gratuitous ARP sent" : "");
                f->address_up = true;
        } else {
                r = takeover_remove(f->vm->service_interface, &f->vm->service_address);
                f->address_error = r < 0 ? r : 0;
                f->address_error_up = false;
                if (r < 0)
                        return log_error_errno(r, "VM %s: cannot remove service address %s from %s: %m",
                                               f->vm->name, a, f->vm->service_interface);
                if (f->address_up)
                        log_notice("VM %s: service address %s removed from %s", f->vm->name, a,
                                   f->vm->service_interface);
                f->address_up = false;
        }
        return 0;
}

const char *failover_service_address_state(Failover *f, char *buf, size_t size)
{
        if (!f || f->vm->service_address.family == AF_UNSPEC || !f->vm->service_interface)
                snprintf(buf, size, "none");
        else if (f->address_error < 0)
                snprintf(buf, size, "%s failed: %s", f->address_error_up ? "takeover" : "release",
                         strerror(-f->address_error));
        else
                snprintf(buf, size, "%s", f->address_up ? "held" : "released");
        return buf;
}

/* ---- object --------------------------------------------------------------------------- */

int failover_new(sd_event *e, const DaemonConfig *d, const VmConfig *vm, const FailoverCallbacks *cb,
                 void *userdata, Failover **ret)
{
        Failover *f;

        if (!e || !vm || !ret)
                return -EINVAL;
        f = calloc(1, sizeof(*f));
        if (!f)
                return -ENOMEM;
        f->event = sd_event_ref(e);
        f->d = d;
        f->vm = vm;
        if (cb)
                f->cb = *cb;
        f->userdata = userdata;
        f->fence.pidfd = f->vmm.pidfd = -EBADF;
        f->fence_out = f->ready_fd = -EBADF;
        *ret = f;
        return 0;
}

Failover *failover_free(Failover *f)
{
        if (!f)
                return NULL;
        if (f->fence.pid > 0) {
                (void) kill(-f->fence.pid, SIGKILL);
                child_stop(&f->fence, 0);
        }
        fence_cleanup(f);
        f->fence_defer = sd_event_source_disable_unref(f->fence_defer);
        failover_stop_vmm(f);
        child_release(&f->vmm);
        f->ready_source = sd_event_source_disable_unref(f->ready_source);
        safe_close(f->ready_fd);
        sd_event_unref(f->event);
        free(f);
        return NULL;
}

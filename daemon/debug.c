/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The debug socket (debug.h): accepting, reading a request line, answering
 * it from the Manager. The protocol itself (framing, parser, status JSON)
 * is daemon/debug-request.c, which tests/fuzz/fuzz-debug.c drives.
 */
#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "debug-request.h"
#include "debug.h"
#include "log.h"
#include "macros.h"
#include "util.h"

#define DEBUG_CLIENTS_MAX 16

struct DebugServer {
        Manager *manager;
        char *path;
        int fd;
        sd_event_source *source;
        unsigned clients;
};

typedef struct DebugClient {
        DebugServer *server;
        sd_event_source *source;
        int fd;
        DebugLine line;
} DebugClient;

static DebugClient *debug_client_free(DebugClient *c)
{
        if (!c)
                return NULL;
        sd_event_source_disable_unref(c->source);
        safe_close(c->fd);
        c->server->clients--;
        free(c);
        return NULL;
}

static void debug_reply(DebugClient *c, const char *fmt, ...) _printf_(2, 3);
static void debug_reply(DebugClient *c, const char *fmt, ...)
{
        char buf[1024];
        va_list ap;
        int n;

        va_start(ap, fmt);
        n = vsnprintf(buf, sizeof(buf), fmt, ap);
        va_end(ap);
        if (n > 0)
                (void) send(c->fd, buf, MIN((size_t) n, sizeof(buf) - 1), MSG_NOSIGNAL);
}

static void debug_image_done(Primary *p, const PrimaryImageResult *res, void *userdata)
{
        DebugClient *c = userdata;

        if (res->result < 0)
                debug_reply(c, "error image: %s\n", res->error);
        else
                debug_reply(c, "ok %" PRIu64 " pages=%" PRIu64 " bytes=%" PRIu64 " pause_ns=%" PRIu64 "\n",
                            res->epoch, res->present_pages, res->total_bytes, res->pause_ns);
        debug_client_free(c);
}

static void debug_status(DebugClient *c, const char *name)
{
        Manager *m = c->server->manager;

        for (size_t i = 0; i < m->n_vms; i++) {
                _cleanup_free_ char *out = NULL;
                ReplStatus st;

                if (name && !streq(m->vms[i]->cfg->name, name))
                        continue;
                vm_get_status(m->vms[i], &st);
                if (debug_status_json(m->vms[i]->cfg->name, &st, &out) < 0) {
                        debug_reply(c, "error status: %s\n", strerror(ENOMEM));
                        return;
                }
                (void) send(c->fd, out, strlen(out), MSG_NOSIGNAL);
        }
}

static DebugRole vm_debug_role(const Vm *vm)
{
        return vm->primary ? DEBUG_ROLE_PRIMARY : vm->standby ? DEBUG_ROLE_STANDBY : DEBUG_ROLE_FAILED;
}

/* A request for one VM that fits its role. Returns true when it answers later (the client is then
 * owned by the request). */
static bool debug_execute_vm(DebugClient *c, const DebugRequest *req, Vm *vm)
{
        char why[256] = "";
        uint64_t epoch = 0;
        int r;

        switch (req->verb) {
        case DEBUG_IMAGE:
                r = primary_checkpoint_image(vm->primary, req->words[2],
                                             req->n_words == 4 ? req->words[3] : NULL, true,
                                             debug_image_done, c);
                if (r < 0) {
                        debug_reply(c, "error image: %s\n", strerror(-r));
                        return false;
                }
                /* Nothing more is read from this client; the answer comes from the callback. */
                (void) sd_event_source_set_enabled(c->source, SD_EVENT_OFF);
                return true;
        case DEBUG_CHECKPOINT:
                r = primary_checkpoint(vm->primary, &epoch);
                break;
        case DEBUG_FREEZE:
                r = primary_freeze(vm->primary, &epoch);
                break;
        case DEBUG_THAW:
                r = primary_thaw(vm->primary);
                break;
        case DEBUG_RESET_PAUSES:
                r = primary_reset_pauses(vm->primary);
                break;
        case DEBUG_RESUME:
                r = primary_resume_unprotected(vm->primary);
                break;
        case DEBUG_HASH:
                r = vm->primary ? primary_hash_ram(vm->primary, req->words[2])
                                : standby_hash_replica(vm->standby, req->words[2], &epoch);
                break;
        case DEBUG_DUMP:
                r = standby_dump_replica(vm->standby, req->words[2], req->words[3], &epoch);
                break;
        case DEBUG_PROMOTE:
                r = vm_promote(vm, req->force, why, sizeof(why));
                if (r < 0) {
                        debug_reply(c, "error promote: %s\n", why[0] ? why : strerror(-r));
                        return false;
                }
                (void) standby_replica_epoch(vm->standby, &epoch);
                break;
        case DEBUG_DEMOTE:
                r = vm_demote(vm, why, sizeof(why));
                if (r < 0) {
                        debug_reply(c, "error demote: %s\n", why[0] ? why : strerror(-r));
                        return false;
                }
                break;
        default:
                assert(!"a verb debug_request_fits() lets through without a case here");
                return false;
        }
        if (r < 0)
                debug_reply(c, "error %s: %s\n", req->words[0], strerror(-r));
        else
                debug_reply(c, "ok %" PRIu64 "\n", epoch);
        return false;
}

/* Returns true when the request answers later (the client is then owned by the request). */
static bool debug_execute(DebugClient *c, char *line)
{
        DebugRequest req;
        char error[256];
        Vm *vm;

        if (debug_request_parse(line, &req, error, sizeof(error)) < 0) {
                debug_reply(c, "error %s\n", error);
                return false;
        }
        if (req.verb == DEBUG_STATUS) {
                debug_status(c, req.vm);
                return false;
        }
        if (req.verb == DEBUG_STALL) {
                /* On purpose: nothing else runs, so WATCHDOG=1 stops (the watchdog test). */
                log_warning("Debug socket: stalling the event loop for %us", req.stall_sec);
                debug_reply(c, "ok 0\n");
                (void) sleep(req.stall_sec);
                return false;
        }
        vm = manager_find_vm(c->server->manager, req.vm);
        if (!vm) {
                debug_reply(c, "error no VM named '%s'\n", req.vm);
                return false;
        }
        if (!debug_request_fits(&req, vm_debug_role(vm))) {
                debug_reply(c, "error '%s' with %zu argument(s) is not a request for %s VM '%s'\n",
                            req.words[0], req.n_words - 1,
                            vm->primary   ? "primary"
                            : vm->standby ? "standby"
                                          : "failed",
                            vm->cfg->name);
                return false;
        }
        return debug_execute_vm(c, &req, vm);
}

static int on_debug_client(sd_event_source *s, int fd, uint32_t revents, void *userdata)
{
        DebugClient *c = userdata;
        char *tail, *line = NULL;
        size_t room;
        ssize_t k;
        int r;

        tail = debug_line_tail(&c->line, &room);
        k = recv(fd, tail, room, MSG_DONTWAIT);
        if (k < 0 && (errno == EAGAIN || errno == EINTR))
                return 0;
        if (k <= 0) {
                debug_client_free(c);
                return 0;
        }
        r = debug_line_add(&c->line, (size_t) k, &line);
        if (r == -E2BIG) {
                debug_reply(c, "error request longer than %d bytes\n", DEBUG_LINE_MAX - 1);
                debug_client_free(c);
        }
        if (r <= 0)
                return 0;
        if (!debug_execute(c, line))
                debug_client_free(c);
        return 0;
}

static int on_debug_accept(sd_event_source *s, int fd, uint32_t revents, void *userdata)
{
        DebugServer *d = userdata;
        _cleanup_close_ int cfd = -EBADF;
        struct ucred cred;
        socklen_t len = sizeof(cred);
        DebugClient *c;
        int r;

        cfd = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (cfd < 0)
                return 0;
        /* The socket is 0600, but say it twice: only root and our own uid. */
        if (getsockopt(cfd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0 ||
            (cred.uid != 0 && cred.uid != getuid()))
                return 0;
        if (d->clients >= DEBUG_CLIENTS_MAX)
                return 0;
        c = calloc(1, sizeof(*c));
        if (!c)
                return 0;
        c->server = d;
        c->fd = TAKE_FD(cfd);
        d->clients++;
        r = sd_event_add_io(d->manager->event, &c->source, c->fd, EPOLLIN, on_debug_client, c);
        if (r < 0)
                debug_client_free(c);
        return 0;
}

DebugServer *debug_server_free(DebugServer *d)
{
        if (!d)
                return NULL;
        d->source = sd_event_source_disable_unref(d->source);
        d->fd = safe_close(d->fd);
        if (d->path)
                (void) unlink(d->path);
        free(d->path);
        free(d);
        return NULL;
}

DEFINE_TRIVIAL_CLEANUP_FUNC(DebugServer *, debug_server_free);

int debug_server_open(Manager *m, const char *path, DebugServer **ret)
{
        _cleanup_(debug_server_freep) DebugServer *d = NULL;
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        int r;

        if (strlen(path) >= sizeof(sa.sun_path))
                return log_error_errno(-ENAMETOOLONG, "Debug socket path too long: %s", path);
        strcpy(sa.sun_path, path);
        d = calloc(1, sizeof(*d));
        if (!d)
                return log_oom();
        d->manager = m;
        d->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (d->fd < 0)
                return log_error_errno(-errno, "socket(): %m");
        d->path = strdup(path); /* from here on, the file is ours to remove */
        if (!d->path)
                return log_oom();
        (void) unlink(path);
        if (bind(d->fd, (struct sockaddr *) &sa, sizeof(sa)) < 0)
                return log_error_errno(-errno, "Failed to bind debug socket %s: %m", path);
        /* Nobody can connect before listen(), so chmod here is race-free. */
        if (chmod(path, 0600) < 0)
                return log_error_errno(-errno, "chmod(%s): %m", path);
        if (listen(d->fd, 16) < 0)
                return log_error_errno(-errno, "listen(%s): %m", path);
        r = sd_event_add_io(m->event, &d->source, d->fd, EPOLLIN, on_debug_accept, d);
        if (r < 0)
                return log_error_errno(r, "Failed to watch the debug socket: %m");
        *ret = TAKE_PTR(d);
        return 0;
}

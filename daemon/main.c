/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * dirtyrepd: one sd-event loop, many VMs, each either primary (attached to
 * its VMM, streaming epochs) or standby (holding a replica). See
 * docs/architecture.md and dirtyrepd(8).
 *
 * A VM that cannot be set up (bad secret file, address in use, ...) is
 * logged and marked failed; the daemon keeps serving the others.
 *
 * --debug-socket PATH serves a root-only (0600) diagnostic socket with a
 * line protocol, used by the integration tests and for field diagnosis:
 *   status                     one JSON object per VM, one per line
 *   checkpoint VM              seal an epoch now: "ok EPOCH"
 *   freeze VM | thaw VM        primary: seal and keep the VM paused / resume
 *   hash VM PATH               page-hash file (primary: frozen RAM; standby: replica)
 *   dump VM RAMPATH STATEPATH  standby: committed replica RAM and VmState
 *   image VM DIR [PARENT]      primary: checkpoint image at the next seal (LZ4), answered once
 *                              written: "ok EPOCH pages=N bytes=N pause_ns=N"
 *   promote VM [force]         standby: fence, then start the VM on the replica
 *                              (force: even with the primary connected or the fence failing)
 *   demote VM                  primary: stop the VMM dirtyrepd started, give up the
 *                              service address, become a standby again
 * Answers "ok ..." or "error MESSAGE". One request per connection.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <systemd/sd-daemon.h>
#include <systemd/sd-event.h>
#include <unistd.h>

#include "config.h"
#include "dirtyrep-build.h"
#include "failover.h"
#include "log.h"
#include "macros.h"
#include "role.h"
#include "util.h"

#define DEBUG_LINE_MAX 4096
#define DEBUG_CLIENTS_MAX 16

typedef struct Manager Manager;

typedef struct Vm {
        Manager *m;
        const VmConfig *cfg;
        Primary *primary;
        Standby *standby;
        char error[256]; /* set when setting the VM up failed */
        /* Role switching (failover.h): fence, activation, service address. */
        Failover *failover;
        sd_event_source *promote_defer; /* a promotion asked for from inside a callback */
        bool promote_force;
        bool promoting;        /* fence or activation running */
        uint64_t promote_epoch; /* the replica's epoch being activated */
        uint64_t promote_start_usec;
} Vm;

struct Manager {
        sd_event *event;
        Config *config;
        Vm *vms;
        size_t n_vms;
        int debug_fd;
        sd_event_source *debug_source;
        unsigned debug_clients;
};

typedef struct DebugClient {
        Manager *m;
        sd_event_source *source;
        int fd;
        char buf[DEBUG_LINE_MAX];
        size_t len;
} DebugClient;

static const char *arg_config = SYSCONFDIR "/dirtyrep/dirtyrep.conf";
static const char *arg_config_dir = SYSCONFDIR "/dirtyrep/vm.d";
static const char *arg_debug_socket;
static bool arg_check_config;

static Vm *manager_find_vm(Manager *m, const char *name)
{
        for (size_t i = 0; i < m->n_vms; i++)
                if (streq(m->vms[i].cfg->name, name))
                        return &m->vms[i];
        return NULL;
}

static void vm_status(Vm *vm, ReplStatus *st)
{
        memset(st, 0, sizeof(*st));
        if (vm->primary)
                primary_get_status(vm->primary, st);
        else if (vm->standby)
                standby_get_status(vm->standby, st);
        else if (vm->promoting) {
                st->role = "primary";
                st->state = "activating";
                snprintf(st->detail, sizeof(st->detail), "starting the VMM on the replica of epoch %" PRIu64,
                         vm->promote_epoch);
                st->last_committed = vm->promote_epoch;
        } else {
                st->role = vm_role_to_string(vm->cfg->role);
                st->state = "failed";
                snprintf(st->detail, sizeof(st->detail), "%s", vm->error);
        }
}

/* JSON string body with the characters JSON requires escaped. */
static void json_escape(const char *s, char *out, size_t size)
{
        size_t o = 0;

        for (; *s && o + 7 < size; s++) {
                unsigned char c = (unsigned char) *s;
                if (c == '"' || c == '\\') {
                        out[o++] = '\\';
                        out[o++] = (char) c;
                } else if (c < 0x20)
                        o += (size_t) snprintf(out + o, size - o, "\\u%04x", c);
                else
                        out[o++] = (char) c;
        }
        out[o] = 0;
}

static int vm_status_json(Vm *vm, char *out, size_t size)
{
        char detail[600], peer[200];
        ReplStatus st;

        vm_status(vm, &st);
        json_escape(st.detail, detail, sizeof(detail));
        json_escape(st.peer, peer, sizeof(peer));
        return snprintf(out, size,
                        "{\"vm\": \"%s\", \"role\": \"%s\", \"state\": \"%s\", \"detail\": \"%s\", "
                        "\"link_up\": %s, \"peer\": \"%s\", \"last_sealed\": %" PRIu64
                        ", \"last_committed\": %" PRIu64 ", \"epochs_committed\": %" PRIu64
                        ", \"full_syncs\": %" PRIu64 ", \"incremental_syncs\": %" PRIu64
                        ", \"pause_ns_p50\": %" PRIu64 ", \"pause_ns_p99\": %" PRIu64 ", \"pause_ns_max\": %" PRIu64
                        ", \"pages_last_epoch\": %" PRIu64 ", \"dirty_pages_per_s\": %.1f, \"bytes_sent\": %" PRIu64
                        ", \"bytes_received\": %" PRIu64 ", \"inflight\": %" PRIu64
                        ", \"compression_ratio\": %.3f, \"staging_bytes\": %" PRIu64 ", \"ram_bytes\": %" PRIu64
                        ", \"last_sync_usec\": %" PRIu64 ", \"last_sync_full\": %s}\n",
                        vm->cfg->name, st.role ? st.role : "?", st.state ? st.state : "?", detail,
                        st.link_up ? "true" : "false", peer, st.last_sealed, st.last_committed,
                        st.epochs_committed, st.full_syncs, st.incremental_syncs, st.pause_ns_p50, st.pause_ns_p99,
                        st.pause_ns_max, st.pages_last_epoch, st.dirty_pages_per_s, st.bytes_sent,
                        st.bytes_received, st.inflight, st.compression_ratio, st.staging_bytes, st.ram_bytes,
                        st.last_sync_usec, st.last_sync_full ? "true" : "false");
}

/* ---- role switching -------------------------------------------------------------------- */

static int vm_load_secret(Vm *vm, uint8_t **ret, size_t *ret_len)
{
        _cleanup_free_ char *err = NULL;
        int r;

        r = config_load_secret(vm->cfg->secret_file, ret, ret_len, &err);
        if (r < 0)
                log_error("VM %s: %s", vm->cfg->name, err ? err : strerror(-r));
        return r;
}

static void on_standby_lost(Standby *s, int error, const char *reason, void *userdata);

/* Starts listening as a standby (the VM's setup, or a demotion). */
static int vm_become_standby(Vm *vm)
{
        uint8_t *secret = NULL;
        size_t secret_len = 0;
        int r;

        r = vm_load_secret(vm, &secret, &secret_len);
        if (r < 0)
                return r;
        r = standby_new(vm->m->event, vm->m->config->daemon, vm->cfg, secret, secret_len, &vm->standby);
        config_secret_free(secret, secret_len);
        if (r < 0)
                return r;
        standby_set_lost_callback(vm->standby, on_standby_lost, vm);
        r = standby_start(vm->standby);
        if (r < 0)
                vm->standby = standby_free(vm->standby);
        return r;
}

static int on_promote_defer(sd_event_source *src, void *userdata);

/*
 * The public entry to promotion (debug socket now, D-Bus Failover later):
 * checks, then runs the fence command (unless force) and activation
 * asynchronously; the status says how far it got. why gets a reason on error.
 */
static int vm_promote(Vm *vm, bool force, char *why, size_t why_size)
{
        uint64_t epoch = 0;
        int r;

        if (!vm->standby) {
                snprintf(why, why_size, "VM %s is not a standby here", vm->cfg->name);
                return -EINVAL;
        }
        if (vm->promoting || vm->promote_defer) {
                snprintf(why, why_size, "a promotion of VM %s is already running", vm->cfg->name);
                return -EBUSY;
        }
        if (!standby_replica_epoch(vm->standby, &epoch)) {
                snprintf(why, why_size, "VM %s has no committed replica to start from", vm->cfg->name);
                return -ENODATA;
        }
        if (vm->cfg->peer.len == 0) {
                snprintf(why, why_size, "VM %s has no Peer= for the standby it would need as primary",
                         vm->cfg->name);
                return -EDESTADDRREQ;
        }
        if (!force && standby_primary_connected(vm->standby)) {
                snprintf(why, why_size, "the primary of VM %s is connected (use force to promote anyway)",
                         vm->cfg->name);
                return -EBUSY;
        }
        /* Deferred: a promotion may free the Standby, and this may run inside its callback. */
        r = sd_event_add_defer(vm->m->event, &vm->promote_defer, on_promote_defer, vm);
        if (r < 0) {
                snprintf(why, why_size, "%s", strerror(-r));
                return r;
        }
        vm->promote_force = force;
        vm->promote_epoch = epoch;
        vm->promote_start_usec = now_usec();
        log_notice("VM %s: promoting to primary from the replica of epoch %" PRIu64 "%s", vm->cfg->name, epoch,
                   force ? " (forced)" : "");
        return 0;
}

static void on_standby_lost(Standby *s, int error, const char *reason, void *userdata)
{
        Vm *vm = userdata;
        char why[256];
        int r;

        if (vm->cfg->failover_policy != FAILOVER_POLICY_AUTO) {
                log_warning("VM %s: primary lost; FailoverPolicy=manual: waiting for an explicit promote",
                            vm->cfg->name);
                standby_set_note(s, NULL, "primary lost; FailoverPolicy=manual: waiting for promote");
                return;
        }
        r = vm_promote(vm, false, why, sizeof(why));
        if (r < 0)
                log_error("VM %s: primary lost, but cannot fail over: %s", vm->cfg->name, why);
}

static int on_promote_defer(sd_event_source *src, void *userdata)
{
        Vm *vm = userdata;
        int r;

        vm->promote_defer = sd_event_source_disable_unref(vm->promote_defer);
        if (!vm->standby)
                return 0;
        vm->promoting = true;
        if (vm->promote_force) {
                log_warning("VM %s: forced promotion: the fence command is not run", vm->cfg->name);
                standby_set_note(vm->standby, "promoting", "forced promotion");
                r = failover_fence(vm->failover); /* with force, its result is only logged */
        } else {
                standby_set_note(vm->standby, "fencing", "running the fence command");
                r = failover_fence(vm->failover);
        }
        if (r < 0) {
                vm->promoting = false;
                log_error_errno(r, "VM %s: cannot run the fence command, not promoting: %m", vm->cfg->name);
                standby_set_note(vm->standby, NULL, "promotion failed: cannot run the fence command");
        }
        return 0;
}

static void on_fenced(Failover *f, int result, const char *reason, void *userdata)
{
        Vm *vm = userdata;
        _cleanup_free_ uint8_t *state = NULL;
        size_t state_len = 0;
        uint64_t epoch = 0;
        int fd = -EBADF, r;

        if (!vm->standby) {
                vm->promoting = false;
                return;
        }
        if (result < 0 && !vm->promote_force) {
                char note[256];
                vm->promoting = false;
                snprintf(note, sizeof(note), "promotion refused: %s", reason);
                standby_set_note(vm->standby, NULL, note);
                return;
        }
        r = standby_take_replica(vm->standby, &fd, &state, &state_len, &epoch);
        if (r < 0) {
                vm->promoting = false;
                standby_set_note(vm->standby, NULL, "promotion failed: no replica");
                return;
        }
        vm->standby = standby_free(vm->standby);
        vm->promote_epoch = epoch;
        /* The address first: the VMM's service port may bind to it. */
        (void) failover_service_address(vm->failover, true);
        r = failover_activate(vm->failover, fd, state, state_len, epoch);
        if (r < 0) {
                vm->promoting = false;
                snprintf(vm->error, sizeof(vm->error), "activation failed: cannot start the VMM: %s",
                         strerror(-r));
                log_error("VM %s: %s", vm->cfg->name, vm->error);
        }
}

static void on_vmm_ready(Failover *f, void *userdata)
{
        Vm *vm = userdata;
        uint8_t *secret = NULL;
        size_t secret_len = 0;
        int r;

        vm->promoting = false;
        log_notice("VM %s: guest running on this host %.1f ms after the promotion began", vm->cfg->name,
                   (double) (now_usec() - vm->promote_start_usec) / 1000.0);
        r = vm_load_secret(vm, &secret, &secret_len);
        if (r >= 0) {
                r = primary_new(vm->m->event, vm->m->config->daemon, vm->cfg, secret, secret_len, &vm->primary);
                config_secret_free(secret, secret_len);
        }
        if (r >= 0) {
                primary_set_promoted(vm->primary, vm->promote_epoch);
                r = primary_start(vm->primary);
        }
        if (r < 0) {
                vm->primary = primary_free(vm->primary);
                snprintf(vm->error, sizeof(vm->error), "promoted, but the primary role failed: %s", strerror(-r));
                log_error("VM %s: %s", vm->cfg->name, vm->error);
                return;
        }
        log_notice("VM %s: now primary on this host", vm->cfg->name);
}

static void on_vmm_exited(Failover *f, int code, int status, void *userdata)
{
        Vm *vm = userdata;

        if (vm->promoting) {
                vm->promoting = false;
                snprintf(vm->error, sizeof(vm->error), "activation failed: the VMM exited (%s %d)",
                         code == CLD_EXITED ? "status" : "signal", status);
                log_error("VM %s: %s", vm->cfg->name, vm->error);
        }
        /* A primary attached to it sees its control socket close and reports that. */
}

static const FailoverCallbacks failover_callbacks = {
        .fenced = on_fenced,
        .vmm_ready = on_vmm_ready,
        .vmm_exited = on_vmm_exited,
};

/* Primary -> standby: stop the VMM we started (never one we did not start:
 * detaching from a running VM would leave it running unprotected), drop the
 * service address, listen for the new primary. */
static int vm_demote(Vm *vm, char *why, size_t why_size)
{
        ReplStatus st;
        int r;

        if (!vm->primary) {
                snprintf(why, why_size, "VM %s is not a primary here", vm->cfg->name);
                return -EINVAL;
        }
        primary_get_status(vm->primary, &st);
        if (failover_vmm_pid(vm->failover) == 0 && !streq(st.state, "attaching") && !streq(st.state, "failed")) {
                snprintf(why, why_size,
                         "VM %s runs in a VMM dirtyrepd did not start; stop that VMM first, then demote",
                         vm->cfg->name);
                return -EBUSY;
        }
        log_notice("VM %s: demoting to standby", vm->cfg->name);
        failover_stop_vmm(vm->failover);
        vm->primary = primary_free(vm->primary);
        (void) failover_service_address(vm->failover, false);
        vm->error[0] = 0;
        r = vm_become_standby(vm);
        if (r < 0) {
                snprintf(why, why_size, "cannot start the standby role: %s", strerror(-r));
                snprintf(vm->error, sizeof(vm->error), "demoted, but %s", why);
                return r;
        }
        return 0;
}

static DebugClient *debug_client_free(DebugClient *c)
{
        if (!c)
                return NULL;
        sd_event_source_disable_unref(c->source);
        safe_close(c->fd);
        c->m->debug_clients--;
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

/* Splits line into at most max words on spaces. */
static size_t split_words(char *line, char **words, size_t max)
{
        size_t n = 0;
        for (char *save = NULL, *w = strtok_r(line, " \t", &save); w && n < max; w = strtok_r(NULL, " \t", &save))
                words[n++] = w;
        return n;
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

/* Returns true when the request answers later (the client is then owned by the request). */
static bool debug_execute(DebugClient *c, char *line)
{
        Manager *m = c->m;
        char *w[5];
        size_t n = split_words(line, w, ELEMENTSOF(w));
        uint64_t epoch = 0;
        Vm *vm;
        int r;

        if (n == 0) {
                debug_reply(c, "error empty request\n");
                return false;
        }
        if (streq(w[0], "status")) {
                for (size_t i = 0; i < m->n_vms; i++) {
                        char out[2048];
                        if (n > 1 && !streq(m->vms[i].cfg->name, w[1]))
                                continue;
                        vm_status_json(&m->vms[i], out, sizeof(out));
                        (void) send(c->fd, out, strlen(out), MSG_NOSIGNAL);
                }
                return false;
        }
        if (n < 2) {
                debug_reply(c, "error '%s' needs a VM name\n", w[0]);
                return false;
        }
        vm = manager_find_vm(m, w[1]);
        if (!vm) {
                debug_reply(c, "error no VM named '%s'\n", w[1]);
                return false;
        }
        if (streq(w[0], "image") && (n == 3 || n == 4) && vm->primary) {
                r = primary_checkpoint_image(vm->primary, w[2], n == 4 ? w[3] : NULL, true, debug_image_done, c);
                if (r < 0) {
                        debug_reply(c, "error image: %s\n", strerror(-r));
                        return false;
                }
                /* Nothing more is read from this client; the answer comes from the callback. */
                (void) sd_event_source_set_enabled(c->source, SD_EVENT_OFF);
                return true;
        }

        if (streq(w[0], "checkpoint") && vm->primary)
                r = primary_checkpoint(vm->primary, &epoch);
        else if (streq(w[0], "freeze") && vm->primary)
                r = primary_freeze(vm->primary, &epoch);
        else if (streq(w[0], "thaw") && vm->primary)
                r = primary_thaw(vm->primary);
        else if (streq(w[0], "hash") && n == 3 && vm->primary)
                r = primary_hash_ram(vm->primary, w[2]);
        else if (streq(w[0], "hash") && n == 3 && vm->standby)
                r = standby_hash_replica(vm->standby, w[2], &epoch);
        else if (streq(w[0], "dump") && n == 4 && vm->standby)
                r = standby_dump_replica(vm->standby, w[2], w[3], &epoch);
        else if (streq(w[0], "promote") && (n == 2 || (n == 3 && streq(w[2], "force")))) {
                char why[256] = "";
                r = vm_promote(vm, n == 3, why, sizeof(why));
                if (r < 0) {
                        debug_reply(c, "error promote: %s\n", why[0] ? why : strerror(-r));
                        return false;
                }
                (void) standby_replica_epoch(vm->standby, &epoch);
        } else if (streq(w[0], "demote") && n == 2) {
                char why[256] = "";
                r = vm_demote(vm, why, sizeof(why));
                if (r < 0) {
                        debug_reply(c, "error demote: %s\n", why[0] ? why : strerror(-r));
                        return false;
                }
        } else {
                debug_reply(c, "error '%s' with %zu argument(s) is not a request for %s VM '%s'\n", w[0], n - 1,
                            vm->primary ? "primary" : vm->standby ? "standby" : "failed", vm->cfg->name);
                return false;
        }
        if (r < 0)
                debug_reply(c, "error %s: %s\n", w[0], strerror(-r));
        else
                debug_reply(c, "ok %" PRIu64 "\n", epoch);
        return false;
}

static int on_debug_client(sd_event_source *s, int fd, uint32_t revents, void *userdata)
{
        DebugClient *c = userdata;
        ssize_t k;
        char *nl;

        k = recv(fd, c->buf + c->len, sizeof(c->buf) - 1 - c->len, MSG_DONTWAIT);
        if (k < 0 && (errno == EAGAIN || errno == EINTR))
                return 0;
        if (k <= 0) {
                debug_client_free(c);
                return 0;
        }
        c->len += (size_t) k;
        c->buf[c->len] = 0;
        nl = strchr(c->buf, '\n');
        if (!nl) {
                if (c->len >= sizeof(c->buf) - 1) {
                        debug_reply(c, "error request longer than %d bytes\n", DEBUG_LINE_MAX - 1);
                        debug_client_free(c);
                }
                return 0;
        }
        *nl = 0;
        if (!debug_execute(c, c->buf))
                debug_client_free(c);
        return 0;
}

static int on_debug_accept(sd_event_source *s, int fd, uint32_t revents, void *userdata)
{
        Manager *m = userdata;
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
        if (m->debug_clients >= DEBUG_CLIENTS_MAX)
                return 0;
        c = calloc(1, sizeof(*c));
        if (!c)
                return 0;
        c->m = m;
        c->fd = TAKE_FD(cfd);
        m->debug_clients++;
        r = sd_event_add_io(m->event, &c->source, c->fd, EPOLLIN, on_debug_client, c);
        if (r < 0)
                debug_client_free(c);
        return 0;
}

static int debug_socket_open(Manager *m, const char *path)
{
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        int r;

        if (strlen(path) >= sizeof(sa.sun_path))
                return log_error_errno(-ENAMETOOLONG, "Debug socket path too long: %s", path);
        strcpy(sa.sun_path, path);
        m->debug_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (m->debug_fd < 0)
                return log_error_errno(-errno, "socket(): %m");
        (void) unlink(path);
        if (bind(m->debug_fd, (struct sockaddr *) &sa, sizeof(sa)) < 0)
                return log_error_errno(-errno, "Failed to bind debug socket %s: %m", path);
        /* Nobody can connect before listen(), so chmod here is race-free. */
        if (chmod(path, 0600) < 0)
                return log_error_errno(-errno, "chmod(%s): %m", path);
        if (listen(m->debug_fd, 16) < 0)
                return log_error_errno(-errno, "listen(%s): %m", path);
        r = sd_event_add_io(m->event, &m->debug_source, m->debug_fd, EPOLLIN, on_debug_accept, m);
        if (r < 0)
                return log_error_errno(r, "Failed to watch the debug socket: %m");
        return 0;
}

static void vm_setup(Manager *m, Vm *vm)
{
        const VmConfig *cfg = vm->cfg;
        _cleanup_free_ char *err = NULL;
        uint8_t *secret = NULL;
        size_t secret_len = 0;
        int r;

        vm->m = m;
        r = failover_new(m->event, m->config->daemon, cfg, &failover_callbacks, vm, &vm->failover);
        if (r < 0) {
                snprintf(vm->error, sizeof(vm->error), "%s", strerror(-r));
                log_error("VM %s: %s", cfg->name, vm->error);
                return;
        }
        r = config_load_secret(cfg->secret_file, &secret, &secret_len, &err);
        if (r < 0) {
                snprintf(vm->error, sizeof(vm->error), "%s", err ? err : strerror(-r));
                log_error("VM %s: %s", cfg->name, vm->error);
                return;
        }
        if (cfg->role == VM_ROLE_PRIMARY) {
                r = primary_new(m->event, m->config->daemon, cfg, secret, secret_len, &vm->primary);
                config_secret_free(secret, secret_len);
                if (r >= 0)
                        r = primary_start(vm->primary);
                if (r >= 0)
                        (void) failover_service_address(vm->failover, true);
        } else {
                /* A standby never holds the service address (left over from a crash as primary). */
                config_secret_free(secret, secret_len);
                (void) failover_service_address(vm->failover, false);
                r = vm_become_standby(vm);
        }
        if (r < 0) {
                snprintf(vm->error, sizeof(vm->error), "setting up the %s role failed: %s",
                         vm_role_to_string(cfg->role), strerror(-r));
                log_error("VM %s: %s", cfg->name, vm->error);
                vm->primary = primary_free(vm->primary);
                vm->standby = standby_free(vm->standby);
                return;
        }
        log_info("VM %s: %s role started", cfg->name, vm_role_to_string(cfg->role));
}

static void manager_free(Manager *m)
{
        for (size_t i = 0; i < m->n_vms; i++) {
                Vm *vm = &m->vms[i];
                sd_event_source_disable_unref(vm->promote_defer);
                if (vm->primary && vm->failover)
                        (void) failover_service_address(vm->failover, false);
                primary_free(vm->primary);
                standby_free(vm->standby);
                /* Stops a VMM started by a promotion: its VM lives as long as this daemon. */
                failover_free(vm->failover);
        }
        free(m->vms);
        sd_event_source_disable_unref(m->debug_source);
        safe_close(m->debug_fd);
        if (arg_debug_socket)
                (void) unlink(arg_debug_socket);
        config_free(m->config);
        sd_event_unref(m->event);
}

/* Logs a multi-line error report one line at a time (log records are bounded). */
static void log_error_lines(const char *text)
{
        _cleanup_free_ char *copy = strdup(text ? text : "");
        char *save = NULL;

        if (!copy)
                return;
        for (char *l = strtok_r(copy, "\n", &save); l; l = strtok_r(NULL, "\n", &save))
                log_error("%s", l);
}

static void help(void)
{
        printf("Usage: dirtyrepd [OPTIONS]\n\n"
               "Replicates KVM virtual machines to a standby host.\n\n"
               "  -h --help                Show this help\n"
               "     --version             Show the version\n"
               "  -c --config FILE         Main configuration (default %s)\n"
               "  -d --config-dir DIR      Per-VM configuration files (default %s)\n"
               "     --check-config        Validate the configuration and exit\n"
               "     --debug-socket PATH   Serve the diagnostic socket (root only)\n",
               SYSCONFDIR "/dirtyrep/dirtyrep.conf", SYSCONFDIR "/dirtyrep/vm.d");
}

static int parse_argv(int argc, char **argv)
{
        enum { ARG_VERSION = 0x100, ARG_CHECK, ARG_DEBUG };
        static const struct option opts[] = {
                { "help", no_argument, NULL, 'h' },
                { "version", no_argument, NULL, ARG_VERSION },
                { "config", required_argument, NULL, 'c' },
                { "config-dir", required_argument, NULL, 'd' },
                { "check-config", no_argument, NULL, ARG_CHECK },
                { "debug-socket", required_argument, NULL, ARG_DEBUG },
                {}
        };
        int c;

        while ((c = getopt_long(argc, argv, "hc:d:", opts, NULL)) >= 0)
                switch (c) {
                case 'h':
                        help();
                        return 0;
                case ARG_VERSION:
                        printf("dirtyrepd %s\n", DIRTYREP_VERSION);
                        return 0;
                case 'c':
                        arg_config = optarg;
                        break;
                case 'd':
                        arg_config_dir = optarg;
                        break;
                case ARG_CHECK:
                        arg_check_config = true;
                        break;
                case ARG_DEBUG:
                        arg_debug_socket = optarg;
                        break;
                default:
                        return -EINVAL;
                }
        if (optind < argc)
                return log_error_errno(-EINVAL, "Unexpected argument '%s' (see --help)", argv[optind]);
        return 1;
}

int main(int argc, char **argv)
{
        Manager m = { .debug_fd = -EBADF };
        _cleanup_free_ char *errors = NULL;
        sigset_t mask;
        int r;

        log_set_ident("dirtyrepd");
        r = parse_argv(argc, argv);
        if (r <= 0)
                return r < 0 ? 1 : 0;

        r = config_load(arg_config, arg_config_dir, &m.config, &errors);
        if (r < 0) {
                log_error_lines(errors);
                log_error_errno(r, "Configuration is invalid (%s, %s/*.conf)", arg_config, arg_config_dir);
                return 1;
        }
        if (arg_check_config) {
                printf("Configuration OK: %zu VM(s)\n", m.config->n_vms);
                for (size_t i = 0; i < m.config->n_vms; i++)
                        printf("  %s: %s\n", m.config->vms[i]->name, vm_role_to_string(m.config->vms[i]->role));
                config_free(m.config);
                return 0;
        }
        log_set_max_level(m.config->daemon->log_level);

        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigaddset(&mask, SIGPIPE);
        if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0)
                return log_error_errno(-errno, "sigprocmask(): %m"), 1;

        r = sd_event_default(&m.event);
        if (r < 0) {
                log_error_errno(r, "Failed to create the event loop: %m");
                goto out;
        }
        (void) sd_event_add_signal(m.event, NULL, SIGTERM, NULL, NULL);
        (void) sd_event_add_signal(m.event, NULL, SIGINT, NULL, NULL);

        if (arg_debug_socket) {
                r = debug_socket_open(&m, arg_debug_socket);
                if (r < 0)
                        goto out;
        }

        m.vms = calloc(m.config->n_vms ? m.config->n_vms : 1, sizeof(Vm));
        if (!m.vms) {
                r = log_oom();
                goto out;
        }
        m.n_vms = m.config->n_vms;
        for (size_t i = 0; i < m.n_vms; i++) {
                m.vms[i].cfg = m.config->vms[i];
                vm_setup(&m, &m.vms[i]);
        }

        (void) sd_notifyf(false, "READY=1\nSTATUS=Serving %zu VM(s)", m.n_vms);
        log_info("dirtyrepd %s serving %zu VM(s)", DIRTYREP_VERSION, m.n_vms);
        r = sd_event_loop(m.event);
        if (r < 0)
                log_error_errno(r, "Event loop failed: %m");
        (void) sd_notify(false, "STOPPING=1");
out:
        manager_free(&m);
        return r < 0 ? 1 : 0;
}

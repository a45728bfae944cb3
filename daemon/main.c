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
 *   stall SECONDS              block the loop (the watchdog test)
 * Answers "ok ..." or "error MESSAGE". One request per connection.
 */
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <systemd/sd-daemon.h>
#include <systemd/sd-event.h>
#include <unistd.h>

#include "bus.h"
#include "caps.h"
#include "check.h"
#include "config.h"
#include "dirtyrep-build.h"
#include "journal.h"
#include "log.h"
#include "macros.h"
#include "manager.h"
#include "role.h"
#include "util.h"

#define DEBUG_LINE_MAX    4096
#define DEBUG_CLIENTS_MAX 16
#define STALL_MAX_SEC     120

/* The daemon: the manager plus the debug socket. */
typedef struct Daemon {
        Manager manager;
        int debug_fd;
        sd_event_source *debug_source;
        unsigned debug_clients;
} Daemon;

typedef struct DebugClient {
        Daemon *d;
        sd_event_source *source;
        int fd;
        char buf[DEBUG_LINE_MAX];
        size_t len;
} DebugClient;

static const char *arg_config = SYSCONFDIR "/dirtyrep/dirtyrep.conf";
static const char *arg_config_dir = SYSCONFDIR "/dirtyrep/vm.d";
static const char *arg_debug_socket;
static bool arg_keep_capabilities;
static bool arg_check_config;
typedef enum SandboxMode { SANDBOX_AUTO, SANDBOX_UNIT, SANDBOX_NONE } SandboxMode;
static SandboxMode arg_sandbox = SANDBOX_AUTO;
typedef enum BusMode { BUS_AUTO, BUS_SYSTEM, BUS_NONE } BusMode;
static BusMode arg_bus = BUS_AUTO;
static const char *arg_bus_address;
static CliVm *arg_vms;
static size_t arg_n_vms;

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
        char detail[600], peer[200], gaps[COMMIT_GAP_BUCKETS * 22];
        ReplStatus st;

        vm_get_status(vm, &st);
        for (size_t i = 0, o = 0; i < COMMIT_GAP_BUCKETS; i++)
                o += (size_t) snprintf(gaps + o, sizeof(gaps) - o, "%s%" PRIu64, i ? ", " : "",
                                       st.commit_gaps[i]);
        json_escape(st.detail, detail, sizeof(detail));
        json_escape(st.peer, peer, sizeof(peer));
        return snprintf(
                out, size,
                "{\"vm\": \"%s\", \"role\": \"%s\", \"state\": \"%s\", \"detail\": \"%s\", "
                "\"link_up\": %s, \"peer\": \"%s\", \"last_sealed\": %" PRIu64
                ", \"last_committed\": %" PRIu64 ", \"epochs_committed\": %" PRIu64
                ", \"full_syncs\": %" PRIu64 ", \"incremental_syncs\": %" PRIu64
                ", \"pause_ns_p50\": %" PRIu64 ", \"pause_ns_p99\": %" PRIu64 ", \"pause_ns_max\": %" PRIu64
                ", \"vm_pause_ns_p50\": %" PRIu64 ", \"vm_pause_ns_p99\": %" PRIu64
                ", \"vm_pause_ns_max\": %" PRIu64 ", \"pages_last_epoch\": %" PRIu64
                ", \"dirty_pages_per_s\": %.1f, \"bytes_sent\": %" PRIu64 ", \"bytes_received\": %" PRIu64
                ", \"inflight\": %" PRIu64 ", \"compression_ratio\": %.3f, \"staging_bytes\": %" PRIu64
                ", \"ram_bytes\": %" PRIu64 ", \"last_sync_usec\": %" PRIu64 ", \"last_sync_full\": %s"
                ", \"commit_gap_max_usec\": %" PRIu64 ", \"commit_gaps\": [%s]}\n",
                vm->cfg->name, st.role ? st.role : "?", st.state ? st.state : "?", detail,
                st.link_up ? "true" : "false", peer, st.last_sealed, st.last_committed, st.epochs_committed,
                st.full_syncs, st.incremental_syncs, st.pause_ns_p50, st.pause_ns_p99, st.pause_ns_max,
                st.vm_pause_ns_p50, st.vm_pause_ns_p99, st.vm_pause_ns_max, st.pages_last_epoch,
                st.dirty_pages_per_s, st.bytes_sent, st.bytes_received, st.inflight, st.compression_ratio,
                st.staging_bytes, st.ram_bytes, st.last_sync_usec, st.last_sync_full ? "true" : "false",
                st.commit_gap_max_usec, gaps);
}

static DebugClient *debug_client_free(DebugClient *c)
{
        if (!c)
                return NULL;
        sd_event_source_disable_unref(c->source);
        safe_close(c->fd);
        c->d->debug_clients--;
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
        for (char *save = NULL, *w = strtok_r(line, " \t", &save); w && n < max;
             w = strtok_r(NULL, " \t", &save))
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
        Manager *m = &c->d->manager;
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
                        char out[3072];
                        if (n > 1 && !streq(m->vms[i]->cfg->name, w[1]))
                                continue;
                        vm_status_json(m->vms[i], out, sizeof(out));
                        (void) send(c->fd, out, strlen(out), MSG_NOSIGNAL);
                }
                return false;
        }
        if (streq(w[0], "stall")) {
                unsigned long sec;
                char *end;

                errno = 0;
                sec = n == 2 ? strtoul(w[1], &end, 10) : ULONG_MAX;
                if (n != 2 || errno != 0 || *end || sec > STALL_MAX_SEC) {
                        debug_reply(c, "error stall needs a number of seconds, 0..%d\n", STALL_MAX_SEC);
                        return false;
                }
                /* On purpose: nothing else runs, so WATCHDOG=1 stops (the watchdog test). */
                log_warning("Debug socket: stalling the event loop for %lus", sec);
                debug_reply(c, "ok 0\n");
                (void) sleep((unsigned) sec);
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
                r = primary_checkpoint_image(vm->primary, w[2], n == 4 ? w[3] : NULL, true, debug_image_done,
                                             c);
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
        else if (streq(w[0], "reset-pauses") && n == 2 && vm->primary)
                r = primary_reset_pauses(vm->primary);
        else if (streq(w[0], "resume") && n == 2 && vm->primary)
                r = primary_resume_unprotected(vm->primary);
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
                debug_reply(c, "error '%s' with %zu argument(s) is not a request for %s VM '%s'\n", w[0],
                            n - 1,
                            vm->primary   ? "primary"
                            : vm->standby ? "standby"
                                          : "failed",
                            vm->cfg->name);
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
        Daemon *m = userdata;
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
        c->d = m;
        c->fd = TAKE_FD(cfd);
        m->debug_clients++;
        r = sd_event_add_io(m->manager.event, &c->source, c->fd, EPOLLIN, on_debug_client, c);
        if (r < 0)
                debug_client_free(c);
        return 0;
}

static int debug_socket_open(Daemon *m, const char *path)
{
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
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
        r = sd_event_add_io(m->manager.event, &m->debug_source, m->debug_fd, EPOLLIN, on_debug_accept, m);
        if (r < 0)
                return log_error_errno(r, "Failed to watch the debug socket: %m");
        return 0;
}

static void daemon_done(Daemon *d)
{
        manager_done(&d->manager);
        d->debug_source = sd_event_source_disable_unref(d->debug_source);
        d->debug_fd = safe_close(d->debug_fd);
        if (arg_debug_socket)
                (void) unlink(arg_debug_socket);
        d->manager.event = sd_event_unref(d->manager.event);
        for (size_t i = 0; i < arg_n_vms; i++)
                for (size_t j = 0; j < arg_vms[i].n_settings; j++)
                        free(arg_vms[i].settings[j]);
        free(arg_vms);
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

/*
 * Whether paths are checked against dirtyrep.service's sandbox: asked for,
 * or (auto) the configuration is the one the unit reads (the default files,
 * nothing from the command line), or this process was started by systemd.
 */
static bool sandbox_applies(void)
{
        if (arg_sandbox != SANDBOX_AUTO)
                return arg_sandbox == SANDBOX_UNIT;
        if (getenv("INVOCATION_ID"))
                return true;
        return arg_n_vms == 0 && arg_config && arg_config_dir &&
               streq(arg_config, SYSCONFDIR "/dirtyrep/dirtyrep.conf") &&
               streq(arg_config_dir, SYSCONFDIR "/dirtyrep/vm.d");
}

/* --check-config: the parser's checks passed; now the ones that need the system. Exit status. */
static int check_config(const Config *config)
{
        _cleanup_free_ char *sandbox_errors = NULL, *system_errors = NULL;
        int r, ret = 0;

        if (sandbox_applies()) {
                r = config_check_sandbox(config, &sandbox_errors);
                if (r < 0) {
                        log_error_lines(sandbox_errors ? sandbox_errors : strerror(-r));
                        ret = 1;
                }
        }
        r = check_config_system(config, &system_errors);
        if (r < 0) {
                log_error_lines(system_errors ? system_errors : strerror(-r));
                ret = 1;
        }
        if (ret != 0) {
                log_error("Configuration is invalid (%s, %s/*.conf%s): the daemon would start, but these "
                          "would "
                          "fail a VM or its failover",
                          arg_config ?: "no main file", arg_config_dir ?: "no VM directory",
                          arg_n_vms > 0 ? ", command line" : "");
                return ret;
        }
        printf("Configuration OK: %zu VM(s)%s\n", config->n_vms,
               sandbox_applies() ? ", paths fit dirtyrep.service's sandbox" : "");
        for (size_t i = 0; i < config->n_vms; i++)
                printf("  %s: %s (%s)\n", config->vms[i]->name, vm_role_to_string(config->vms[i]->role),
                       config->vms[i]->path);
        return 0;
}

/* At start-up the same checks only warn: the VMs start anyway, the journal says what would fail. */
static void check_config_at_start(const Config *config)
{
        _cleanup_free_ char *errors = NULL;
        _cleanup_free_ char *copy = NULL;
        char *save = NULL;

        if (getenv("INVOCATION_ID") && config_check_sandbox(config, &errors) < 0 && errors) {
                copy = TAKE_PTR(errors);
                for (char *l = strtok_r(copy, "\n", &save); l; l = strtok_r(NULL, "\n", &save))
                        log_warning("%s", l);
                copy = mfree(copy);
        }
        /* A standby's VMM check: it is what its failover would run. */
        for (size_t i = 0; i < config->n_vms; i++)
                check_log_standby(config->vms[i]);
}

/*
 * One dirtyrepd per runtime directory: a second one (same configuration,
 * by mistake) would fight over addresses, sockets and the bus name, and on
 * its way out remove what the first one holds. The lock is taken before
 * anything is touched; a loser exits without touching anything. The fd
 * stays open (and locked) for the life of the process; the file is never
 * removed (removing it would let a third daemon lock a new inode).
 */
static int lock_fd = -EBADF;

static int take_instance_lock(const char *runtime_directory)
{
        _cleanup_free_ char *path = NULL;
        char pid[32] = "";
        int fd, r;

        if (asprintf(&path, "%s/dirtyrepd.lock", runtime_directory) < 0)
                return log_oom();
        if (mkdir(runtime_directory, 0755) < 0 && errno != EEXIST)
                return log_error_errno(-errno, "Cannot create RuntimeDirectory=%s: %m", runtime_directory);
        fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOCTTY | O_NOFOLLOW, 0644);
        if (fd < 0)
                return log_error_errno(-errno, "Cannot open the instance lock %s: %m", path);
        if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
                r = -errno;
                if (r == -EWOULDBLOCK) {
                        char who[48] = "";
                        ssize_t k = pread(fd, pid, sizeof(pid) - 1, 0);
                        pid[k > 0 ? k : 0] = 0;
                        pid[strspn(pid, "0123456789")] = 0;
                        if (pid[0])
                                snprintf(who, sizeof(who), " (PID %s)", pid);
                        safe_close(fd);
                        return log_struct_internal(
                                LOG_ERR, -EBUSY, __FILE__, __LINE__, __func__, DR_MESSAGE_ALREADY_RUNNING,
                                NULL, 0,
                                "Another dirtyrepd%s is running with RuntimeDirectory=%s (it "
                                "holds %s). This one exits without touching anything. Use "
                                "dirtyrepctl to talk to it, or stop it first (systemctl stop "
                                "dirtyrep).",
                                who, runtime_directory, path);
                }
                safe_close(fd);
                return log_error_errno(r, "Cannot lock %s: %m", path);
        }
        snprintf(pid, sizeof(pid), "%d\n", (int) getpid());
        if (ftruncate(fd, 0) < 0 || pwrite(fd, pid, strlen(pid), 0) < 0)
                log_warning("Cannot write the PID into %s: %s", path, strerror(errno));
        lock_fd = fd;
        return 0;
}

static void help(void)
{
        printf("Usage: dirtyrepd [OPTIONS] [--vm NAME VM-OPTIONS]...\n\n"
               "Replicates KVM virtual machines to a standby host.\n\n"
               "  -h --help                   Show this help\n"
               "     --version                Show the version\n"
               "  -c --config FILE            Main configuration (default %s; \"\" for none)\n"
               "  -d --config-dir DIR         Per-VM configuration files (default %s; \"\" for none)\n"
               "     --check-config           Validate the configuration and exit (also reads the secret\n"
               "                              files and asks the VMM to --check VmmArgs=)\n"
               "     --sandbox=auto|unit|none With --check-config: check paths against dirtyrep.service's\n"
               "                              sandbox (auto: for the default configuration files)\n"
               "     --bus=auto|system|none   D-Bus API on the system bus: auto (default) runs without it\n"
               "                              when there is no bus, system requires it\n"
               "     --bus-address=ADDRESS    Serve the D-Bus API on this bus instead (required)\n"
               "     --debug-socket PATH      Serve the diagnostic socket (root only)\n"
               "     --keep-capabilities      As root, keep the capability bounding set (children such as\n"
               "                              FenceCommand= may need more than dirtyrepd itself)\n"
               "\nA VM from the command line (options after --vm NAME apply to that VM and override\n"
               "its file vm.d/NAME.conf, if any; they are checked like the file's keys):\n"
               "     --vm NAME                Define or override VM NAME\n"
               "     --role primary|standby   Role=\n"
               "     --control-socket PATH    ControlSocket=\n"
               "     --peer ADDRESS:PORT      Peer=\n"
               "     --listen ADDRESS:PORT    Listen=\n"
               "     --epoch-ms MS            EpochMs=\n"
               "     --tracking auto|ring|bitmap  Tracking=\n"
               "     --secret-file PATH       SecretFile=\n"
               "     --max-inflight-epochs N  MaxInflightEpochs=\n"
               "     --compression lz4|none   Compression=\n"
               "     --set KEY=VALUE          Any other key of the [VM] section\n",
               SYSCONFDIR "/dirtyrep/dirtyrep.conf", SYSCONFDIR "/dirtyrep/vm.d");
}

/* Adds "Key=value" to the current --vm block. */
static int cli_vm_add(const char *option, const char *key, const char *value)
{
        CliVm *v;
        char *s;

        if (arg_n_vms == 0)
                return log_error_errno(-EINVAL, "%s needs a --vm NAME before it", option);
        v = &arg_vms[arg_n_vms - 1];
        if (v->n_settings >= MANAGER_CLI_SETTINGS_MAX)
                return log_error_errno(-E2BIG, "--vm %s: more than %u settings", v->name,
                                       MANAGER_CLI_SETTINGS_MAX);
        if (key) {
                if (asprintf(&s, "%s=%s", key, value) < 0)
                        return log_oom();
        } else {
                if (!strchr(value, '='))
                        return log_error_errno(-EINVAL, "--vm %s: %s expects KEY=VALUE, got '%s'", v->name,
                                               option, value);
                s = strdup(value);
                if (!s)
                        return log_oom();
        }
        v->settings[v->n_settings++] = s;
        return 0;
}

static int cli_vm_begin(const char *name)
{
        CliVm *l;

        for (size_t i = 0; i < arg_n_vms; i++)
                if (streq(arg_vms[i].name, name))
                        return log_error_errno(-EINVAL, "--vm %s given twice", name);
        if (arg_n_vms >= CONFIG_VMS_MAX)
                return log_error_errno(-E2BIG, "More than %u --vm options", CONFIG_VMS_MAX);
        l = realloc(arg_vms, (arg_n_vms + 1) * sizeof(CliVm));
        if (!l)
                return log_oom();
        arg_vms = l;
        /* The name is checked with the settings, so its error reads like the others. */
        arg_vms[arg_n_vms++] = (CliVm){.name = (char *) name};
        return 0;
}

static int parse_argv(int argc, char **argv)
{
        enum {
                ARG_VERSION = 0x100,
                ARG_CHECK,
                ARG_SANDBOX,
                ARG_DEBUG,
                ARG_KEEP_CAPS,
                ARG_BUS,
                ARG_BUS_ADDRESS,
                ARG_VM,
                ARG_SET,
                ARG_VM_KEY, /* + index into vm_options */
        };
        static const struct {
                const char *option, *key;
        } vm_options[] = {
                {"role", "Role"},
                {"control-socket", "ControlSocket"},
                {"peer", "Peer"},
                {"listen", "Listen"},
                {"epoch-ms", "EpochMs"},
                {"tracking", "Tracking"},
                {"secret-file", "SecretFile"},
                {"max-inflight-epochs", "MaxInflightEpochs"},
                {"compression", "Compression"},
        };
        struct option opts[32] = {
                {"help", no_argument, NULL, 'h'},
                {"version", no_argument, NULL, ARG_VERSION},
                {"config", required_argument, NULL, 'c'},
                {"config-dir", required_argument, NULL, 'd'},
                {"check-config", no_argument, NULL, ARG_CHECK},
                {"sandbox", required_argument, NULL, ARG_SANDBOX},
                {"debug-socket", required_argument, NULL, ARG_DEBUG},
                {"bus", required_argument, NULL, ARG_BUS},
                {"bus-address", required_argument, NULL, ARG_BUS_ADDRESS},
                {"vm", required_argument, NULL, ARG_VM},
                {"set", required_argument, NULL, ARG_SET},
                {"keep-capabilities", no_argument, NULL, ARG_KEEP_CAPS},
        };
        size_t n_opts = 12;
        int c, r;

        for (size_t i = 0; i < ELEMENTSOF(vm_options); i++)
                opts[n_opts++] =
                        (struct option){vm_options[i].option, required_argument, NULL, ARG_VM_KEY + (int) i};
        assert(n_opts < ELEMENTSOF(opts));

        while ((c = getopt_long(argc, argv, "hc:d:", opts, NULL)) >= 0)
                switch (c) {
                case 'h':
                        help();
                        return 0;
                case ARG_VERSION:
                        printf("dirtyrepd %s\n", DIRTYREP_VERSION);
                        return 0;
                case 'c':
                        arg_config = *optarg ? optarg : NULL;
                        break;
                case 'd':
                        arg_config_dir = *optarg ? optarg : NULL;
                        break;
                case ARG_CHECK:
                        arg_check_config = true;
                        break;
                case ARG_SANDBOX:
                        if (streq(optarg, "auto"))
                                arg_sandbox = SANDBOX_AUTO;
                        else if (streq(optarg, "unit"))
                                arg_sandbox = SANDBOX_UNIT;
                        else if (streq(optarg, "none"))
                                arg_sandbox = SANDBOX_NONE;
                        else
                                return log_error_errno(
                                        -EINVAL, "--sandbox= must be auto, unit or none, not '%s'", optarg);
                        break;
                case ARG_DEBUG:
                        arg_debug_socket = optarg;
                        break;
                case ARG_KEEP_CAPS:
                        arg_keep_capabilities = true;
                        break;
                case ARG_BUS:
                        if (streq(optarg, "auto"))
                                arg_bus = BUS_AUTO;
                        else if (streq(optarg, "system"))
                                arg_bus = BUS_SYSTEM;
                        else if (streq(optarg, "none"))
                                arg_bus = BUS_NONE;
                        else
                                return log_error_errno(
                                        -EINVAL, "--bus= must be auto, system or none, not '%s'", optarg);
                        break;
                case ARG_BUS_ADDRESS:
                        if (!*optarg || strlen(optarg) > 4096)
                                return log_error_errno(-EINVAL, "--bus-address= needs an address");
                        arg_bus_address = optarg;
                        break;
                case ARG_VM:
                        r = cli_vm_begin(optarg);
                        if (r < 0)
                                return r;
                        break;
                case ARG_SET:
                        r = cli_vm_add("--set", NULL, optarg);
                        if (r < 0)
                                return r;
                        break;
                default:
                        if (c >= ARG_VM_KEY && c < ARG_VM_KEY + (int) ELEMENTSOF(vm_options)) {
                                char option[64];
                                snprintf(option, sizeof(option), "--%s", vm_options[c - ARG_VM_KEY].option);
                                r = cli_vm_add(option, vm_options[c - ARG_VM_KEY].key, optarg);
                                if (r < 0)
                                        return r;
                                break;
                        }
                        return -EINVAL;
                }
        if (optind < argc)
                return log_error_errno(-EINVAL, "Unexpected argument '%s' (see --help)", argv[optind]);
        return 1;
}

static void log_config_errors(int r, const char *errors)
{
        log_error_lines(errors);
        log_struct_internal(LOG_ERR, r, __FILE__, __LINE__, __func__, DR_MESSAGE_CONFIG_INVALID, NULL, 0,
                            "Configuration is invalid (%s, %s/*.conf%s)", arg_config ?: "no main file",
                            arg_config_dir ?: "no VM directory", arg_n_vms > 0 ? ", command line" : "");
}

/*
 * SIGTERM/SIGINT: before the primaries are freed (which releases only what
 * the standby acknowledged, primary_free()), give each standby a bounded
 * moment to acknowledge the epochs in flight, so a routine stop of a healthy
 * pair leaves as little output held as possible. A second signal stops at once.
 */
#define STOP_DRAIN_USEC      (2 * USEC_PER_SEC)
#define STOP_DRAIN_POLL_USEC (10 * USEC_PER_MSEC)
static uint64_t stop_deadline;

static int on_drain_timer(sd_event_source *s, uint64_t usec, void *userdata)
{
        Manager *m = userdata;
        size_t waiting = 0;

        for (size_t i = 0; i < m->n_vms; i++)
                if (m->vms[i]->primary && !primary_drained(m->vms[i]->primary))
                        waiting++;
        if (waiting == 0 || now_usec() >= stop_deadline) {
                if (waiting > 0)
                        log_warning(
                                "Stopping: %zu VM(s) still have unacknowledged epochs after %llu ms; their "
                                "output stays held in the VMM",
                                waiting, (unsigned long long) (STOP_DRAIN_USEC / USEC_PER_MSEC));
                return sd_event_exit(sd_event_source_get_event(s), 0);
        }
        (void) sd_event_source_set_time_relative(s, STOP_DRAIN_POLL_USEC);
        return sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
}

static int on_stop_signal(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata)
{
        Manager *m = userdata;
        int r;

        if (stop_deadline > 0) {
                log_notice("%s again: stopping now", si->ssi_signo == SIGINT ? "SIGINT" : "SIGTERM");
                return sd_event_exit(sd_event_source_get_event(s), 0);
        }
        (void) sd_notify(false, "STOPPING=1");
        stop_deadline = now_usec() + STOP_DRAIN_USEC;
        for (size_t i = 0; i < m->n_vms; i++)
                if (m->vms[i]->primary)
                        primary_drain(m->vms[i]->primary);
        r = sd_event_add_time_relative(m->event, NULL, CLOCK_MONOTONIC, 0, 1000, on_drain_timer, m);
        if (r < 0)
                return sd_event_exit(m->event, 0);
        log_info("Stopping: waiting up to %llu ms for the standbys to acknowledge epochs in flight",
                 (unsigned long long) (STOP_DRAIN_USEC / USEC_PER_MSEC));
        return 0;
}

static int on_sighup(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata)
{
        Manager *m = userdata;
        _cleanup_free_ char *errors = NULL;
        int r;

        (void) sd_notify(false, "RELOADING=1");
        log_info("SIGHUP: reloading the configuration");
        r = manager_reload(m, NULL, NULL, NULL, NULL, &errors);
        if (r < 0)
                log_config_errors(r, errors);
        else
                log_event(LOG_INFO, DR_MESSAGE_RELOADED, NULL, 0, "Configuration reloaded (SIGHUP)");
        (void) sd_notify(false, "READY=1");
        return 0;
}

int main(int argc, char **argv)
{
        Daemon d = {.debug_fd = -EBADF};
        Manager *m = &d.manager;
        _cleanup_(config_freep) Config *config = NULL;
        _cleanup_free_ char *errors = NULL;
        sigset_t mask;
        int r;

        log_set_ident("dirtyrepd");
        journal_log_setup();
        r = parse_argv(argc, argv);
        if (r <= 0) {
                daemon_done(&d);
                return r < 0 ? 1 : 0;
        }
        m->config_path = arg_config;
        m->config_dir = arg_config_dir;
        m->cli_vms = arg_vms;
        m->n_cli_vms = arg_n_vms;
        m->bus_address = (char *) arg_bus_address;

        r = manager_load_config(m, &config, &errors);
        if (r < 0) {
                log_config_errors(r, errors);
                daemon_done(&d);
                return 1;
        }
        if (arg_check_config) {
                r = check_config(config);
                daemon_done(&d);
                return r;
        }
        log_set_max_level(config->daemon->log_level);

        /* Before anything is touched (debug socket, addresses, bus name, VMs). */
        r = take_instance_lock(config->daemon->runtime_directory);
        if (r < 0) {
                arg_debug_socket = NULL; /* the other daemon's: daemon_done() must not unlink it */
                daemon_done(&d);
                return 1;
        }
        check_config_at_start(config);

        /* Before any thread exists: capabilities are per thread, and new threads inherit them. */
        {
                bool bounding = false;
                r = caps_drop(arg_keep_capabilities, &bounding);
                if (r < 0) {
                        log_error_errno(r, "Failed to drop capabilities: %m");
                        daemon_done(&d);
                        return 1;
                }
                if (bounding)
                        log_debug("Capabilities reduced to CAP_NET_ADMIN and CAP_NET_RAW, bounding set "
                                  "included.");
        }

        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigaddset(&mask, SIGHUP);
        sigaddset(&mask, SIGPIPE);
        if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0)
                return log_error_errno(-errno, "sigprocmask(): %m"), 1;

        r = sd_event_default(&m->event);
        if (r < 0) {
                log_error_errno(r, "Failed to create the event loop: %m");
                goto out;
        }
        (void) sd_event_add_signal(m->event, NULL, SIGTERM, on_stop_signal, m);
        (void) sd_event_add_signal(m->event, NULL, SIGINT, on_stop_signal, m);
        (void) sd_event_add_signal(m->event, NULL, SIGHUP, on_sighup, m);
        /* WATCHDOG=1 from the loop itself when WATCHDOG_USEC is set: a hung loop stops it. */
        r = sd_event_set_watchdog(m->event, true);
        if (r < 0)
                log_warning("Failed to enable the service manager's watchdog: %s", strerror(-r));

        if (arg_debug_socket) {
                r = debug_socket_open(&d, arg_debug_socket);
                if (r < 0)
                        goto out;
        }

        r = manager_start(m, config);
        if (r < 0)
                goto out;

        if (arg_bus_address || arg_bus != BUS_NONE) {
                r = bus_open(m);
                if (r < 0 && (arg_bus_address || arg_bus == BUS_SYSTEM)) {
                        log_error_errno(r, "The D-Bus API is required (--bus=%s) but unavailable",
                                        arg_bus_address ? "ADDRESS" : "system");
                        goto out;
                }
                if (r < 0)
                        log_warning("Running without the D-Bus API (--bus=auto); only the debug socket is "
                                    "served");
        }
        r = manager_start_status_timer(m);
        if (r < 0) {
                log_error_errno(r, "Failed to start the status timer: %m");
                goto out;
        }

        {
                char status[512];
                manager_format_status(m, status, sizeof(status));
                (void) sd_notifyf(false, "READY=1\nSTATUS=%s", status);
        }
        log_event(LOG_INFO, DR_MESSAGE_STARTED, NULL, 0, "dirtyrepd %s serving %zu VM(s)%s",
                  DIRTYREP_VERSION, m->n_vms, m->bus ? ", D-Bus API up" : "");
        r = sd_event_loop(m->event);
        if (r < 0)
                log_error_errno(r, "Event loop failed: %m");
        (void) sd_notify(false, "STOPPING=1");
        log_event(LOG_INFO, DR_MESSAGE_STOPPING, NULL, 0, "dirtyrepd stopping (%zu VM(s))", m->n_vms);
out:
        daemon_done(&d);
        return r < 0 ? 1 : 0;
}

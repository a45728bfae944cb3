/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * dirtyrepd's manager: VM lifecycle (start, stop, attach, detach), reload,
 * and the periodic status that feeds the bus and the service manager.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/ssl.h>
#include <systemd/sd-daemon.h>

#include <fcntl.h>
#include <limits.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bus.h"
#include "log.h"
#include "manager.h"
#include "tls.h"
#include "util.h"
#include "vmm-link.h"

#define STATUS_INTERVAL_USEC (200 * 1000ULL)
#define NOTIFY_EVERY_TICKS   5 /* STATUS= at most once a second */

Vm *manager_find_vm(Manager *m, const char *name)
{
        if (!name)
                return NULL;
        for (size_t i = 0; i < m->n_vms; i++)
                if (streq(m->vms[i]->cfg->name, name))
                        return m->vms[i];
        return NULL;
}

bool vm_is_attached(Vm *vm)
{
        return vm->primary || vm->standby;
}

/* Answers an Attach() call waiting for the primary's attach: r = 0 attached, else why. */
static void vm_attach_answer(Vm *vm, int r, const char *why)
{
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *call = TAKE_PTR(vm->attach_call);

        if (!call)
                return;
        if (r >= 0)
                (void) sd_bus_reply_method_return(call, NULL);
        else
                (void) sd_bus_reply_method_errorf(call, "org.dirtyrep1.Error.AttachFailed",
                                                  "Attaching VM '%s' failed: %s", vm->cfg->name, why);
}

int vm_attach_call(Vm *vm, sd_bus_message *call)
{
        if (vm->attach_call || !vm->primary || !vm->address_waits_attach)
                return -EALREADY; /* nothing to wait for: answer now */
        vm->attach_call = sd_bus_message_ref(call);
        return 0;
}

/* Frees the primary role, and with it a pending free of a primary whose attach failed. */
static void vm_drop_primary(Vm *vm)
{
        vm->attach_failed_defer = sd_event_source_disable_unref(vm->attach_failed_defer);
        vm->primary = primary_free(vm->primary);
        vm_attach_answer(vm, -ECANCELED, "the primary role stopped before its attach ended");
}

static int on_attach_failed_defer(sd_event_source *src, void *userdata)
{
        Vm *vm = userdata;

        /* As when setting the role up fails: no role, status failed with vm->error, and
         * `dirtyrepctl attach` tries again. */
        vm_drop_primary(vm);
        return 0;
}

/*
 * The primary's attach ended (it runs on a worker: primary_start() returns at once). Decides the
 * service address where vm_attach() left it to the attach, takes it away from a VM the VMM says
 * is suspended (another host may serve it), and turns a final failure into the Vm's error.
 */
static void on_primary_attached(Primary *p, int r, bool suspended, void *userdata)
{
        Vm *vm = userdata;
        bool waited = vm->address_waits_attach;

        if (r < 0) {
                ReplStatus st;

                /* The address stays as it is: down if it waited for this attach. */
                primary_get_status(p, &st);
                snprintf(vm->error, sizeof(vm->error), "%s", st.detail);
                vm_attach_answer(vm, r, vm->error);
                if (!vm->attach_failed_defer &&
                    sd_event_add_defer(vm->manager->event, &vm->attach_failed_defer, on_attach_failed_defer,
                                       vm) < 0)
                        log_error("VM %s: cannot schedule freeing the failed primary", vm->cfg->name);
                return;
        }
        vm->address_waits_attach = false;
        vm_attach_answer(vm, 0, NULL);
        if (suspended) {
                if (vm->cfg->service_address.family != AF_UNSPEC)
                        log_notice("VM %s: attached to a suspended VM: the service address %s until the "
                                   "suspension ends",
                                   vm->cfg->name,
                                   waited || vm->service_address_deferred ? "waits" : "is removed");
                if (!waited && !vm->service_address_deferred)
                        (void) failover_service_address(vm->failover, false);
                vm->service_address_deferred = true;
        } else if (waited) {
                vm->service_address_deferred = false;
                (void) failover_service_address(vm->failover, true);
        }
}

void vm_get_status(Vm *vm, ReplStatus *st)
{
        memset(st, 0, sizeof(*st));
        if (vm->primary)
                primary_get_status(vm->primary, st);
        else if (vm->standby)
                standby_get_status(vm->standby, st);
        else if (vm->maintenance) {
                st->role = "standby";
                st->state = "maintenance";
                if (vm->kept)
                        snprintf(st->detail, sizeof(st->detail),
                                 "planned maintenance: not replicating, the primary runs unprotected; "
                                 "replica of "
                                 "epoch %" PRIu64
                                 " kept (stale until resynced); `dirtyrepctl maintenance %s off` "
                                 "resumes",
                                 standby_replica_get_epoch(vm->kept), vm->cfg->name);
                else
                        snprintf(st->detail, sizeof(st->detail),
                                 "planned maintenance: not replicating, no replica held; `dirtyrepctl "
                                 "maintenance "
                                 "%s off` resumes",
                                 vm->cfg->name);
                st->last_committed = vm->kept ? standby_replica_get_epoch(vm->kept) : 0;
        } else if (vm->promoting) {
                st->role = "primary";
                st->state = "activating";
                snprintf(st->detail, sizeof(st->detail), "starting the VMM on the replica of epoch %" PRIu64,
                         vm->promote_epoch);
                st->last_committed = vm->promote_epoch;
        } else {
                st->role = vm_role_to_string(vm->cfg->role);
                st->state = vm->detached ? "detached" : "failed";
                snprintf(st->detail, sizeof(st->detail), "%s",
                         vm->detached ? "detached on request; Attach() starts it" : vm->error);
        }
}

/* ---- role switching (failover) ---------------------------------------------------------- */

static int vm_load_secret(Vm *vm, uint8_t **ret, size_t *ret_len)
{
        _cleanup_free_ char *err = NULL;
        int r;

        r = config_load_secret(vm->cfg->secret_file, ret, ret_len, &err);
        if (r < 0) {
                snprintf(vm->error, sizeof(vm->error), "%s", err ? err : strerror(-r));
                log_error("VM %s: %s", vm->cfg->name, vm->error);
        }
        return r;
}

/* The VM's TLS context (TLS=yes), built from its files at every role start, so a renewed
 * certificate takes effect with the next attach, promotion or reload. *ret = NULL with TLS=no. */
static int vm_load_tls(Vm *vm, SSL_CTX **ret)
{
        _cleanup_free_ char *err = NULL;
        const VmConfig *c = vm->cfg;
        int r;

        *ret = NULL;
        if (!c->tls)
                return 0;
        r = tls_context_new(&(TlsFiles){.cert_file = c->tls_cert_file,
                                        .key_file = c->tls_key_file,
                                        .ca_file = c->tls_ca_file,
                                        .peer_name = c->tls_peer_name},
                            ret, &err);
        if (r < 0) {
                snprintf(vm->error, sizeof(vm->error), "TLS: %s", err ? err : strerror(-r));
                log_error("VM %s: %s", c->name, vm->error);
        }
        return r;
}

static void ssl_ctx_freep(SSL_CTX **c)
{
        SSL_CTX_free(*c);
}

static void on_standby_lost(Standby *s, int error, const char *reason, void *userdata);

static bool has_prefix(const char *s, const char *p)
{
        return strncmp(s, p, strlen(p)) == 0;
}

/* ---- what outlives the daemon: StateDirectory/NAME.role and NAME.replica ---------------- */

static const char *vm_state_dir(Vm *vm)
{
        return vm->daemon->state_directory ? vm->daemon->state_directory : "/var/lib/dirtyrep";
}

static int vm_role_path(Vm *vm, const char *suffix, char *buf, size_t size)
{
        int n = snprintf(buf, size, "%s/%s.role%s", vm_state_dir(vm), vm->cfg->name, suffix);
        return n < 0 || (size_t) n >= size ? -ENAMETOOLONG : 0;
}

/*
 * The role file says what this host is for the VM beyond its configuration:
 * "role=primary" after a failover (with from_epoch= and unit=, the VMM's own
 * systemd unit), or "maintenance=1". Written to a temporary file, fsync()ed
 * and renamed: a crash leaves the old file or the new one. Absent: the
 * configuration decides.
 */
static int vm_role_save(Vm *vm)
{
        char path[PATH_MAX], tmp[PATH_MAX], buf[512];
        _cleanup_close_ int fd = -EBADF;
        int n, r;

        if (vm_role_path(vm, "", path, sizeof(path)) < 0 || vm_role_path(vm, ".tmp", tmp, sizeof(tmp)) < 0)
                return -ENAMETOOLONG;
        if (!vm->promoted && !vm->maintenance) {
                if (unlink(path) < 0 && errno != ENOENT)
                        return log_error_errno(-errno, "VM %s: cannot remove %s: %m", vm->cfg->name, path);
                return 0;
        }
        (void) mkdir(vm_state_dir(vm), 0700);
        if (vm->promoted)
                n = snprintf(buf, sizeof(buf),
                             "role=primary\nfrom_epoch=%" PRIu64 "\nunit=%s\nvmm_pid=%d\nvmm_start=%" PRIu64
                             "\n%s",
                             vm->promoted_from, vm->vmm_unit, (int) vm->vmm_pid, vm->vmm_start,
                             vm->promoted_synced ? "standby_synced=1\n" : "");
        else
                n = snprintf(buf, sizeof(buf), "maintenance=1\n");
        fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
        if (fd < 0)
                return log_error_errno(-errno, "VM %s: cannot write %s: %m", vm->cfg->name, tmp);
        r = loop_write(fd, buf, (size_t) n);
        if (r >= 0 && fsync(fd) < 0)
                r = -errno;
        if (r >= 0 && rename(tmp, path) < 0)
                r = -errno;
        if (r < 0) {
                (void) unlink(tmp);
                return log_error_errno(r, "VM %s: cannot save its role to %s: %m", vm->cfg->name, path);
        }
        return 0;
}

/* Reads the role file into vm->promoted/promoted_from/vmm_unit/maintenance. Bad content is
 * logged and ignored (the configuration decides), never half applied. */
static void vm_role_load(Vm *vm)
{
        char path[PATH_MAX], buf[512], unit[sizeof(vm->vmm_unit)] = "";
        _cleanup_close_ int fd = -EBADF;
        bool primary = false, maint = false, synced = false;
        uint64_t from = 0, vmm_pid = 0, vmm_start = 0;
        ssize_t n;
        char *save = NULL;

        vm->promoted = vm->maintenance = vm->promoted_synced = false;
        vm->vmm_unit[0] = 0;
        if (vm_role_path(vm, "", path, sizeof(path)) < 0)
                return;
        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (fd < 0)
                return;
        n = loop_read_upto(fd, buf, sizeof(buf) - 1);
        if (n < 0 || (size_t) n >= sizeof(buf) - 1) {
                log_error(
                        "VM %s: %s is unreadable or too long; ignored, Role= from the configuration applies",
                        vm->cfg->name, path);
                return;
        }
        buf[n] = 0;
        for (char *l = strtok_r(buf, "\n", &save); l; l = strtok_r(NULL, "\n", &save)) {
                if (streq(l, "role=primary"))
                        primary = true;
                else if (streq(l, "maintenance=1"))
                        maint = true;
                else if (streq(l, "standby_synced=1"))
                        synced = true;
                else if (has_prefix(l, "from_epoch=")) {
                        if (parse_u64(l + strlen("from_epoch="), &from) < 0)
                                goto bad;
                } else if (has_prefix(l, "vmm_pid=")) {
                        if (parse_u64(l + strlen("vmm_pid="), &vmm_pid) < 0 || vmm_pid > INT_MAX)
                                goto bad;
                } else if (has_prefix(l, "vmm_start=")) {
                        if (parse_u64(l + strlen("vmm_start="), &vmm_start) < 0)
                                goto bad;
                } else if (has_prefix(l, "unit=")) {
                        const char *u = l + strlen("unit=");
                        if (strlen(u) >= sizeof(unit) || strpbrk(u, "/ "))
                                goto bad;
                        snprintf(unit, sizeof(unit), "%s", u);
                } else
                        goto bad;
        }
        if (primary == maint)
                goto bad;
        vm->promoted = primary;
        vm->promoted_from = from;
        vm->promoted_synced = primary && synced;
        vm->maintenance = maint;
        memcpy(vm->vmm_unit, unit, sizeof(unit));
        vm->vmm_pid = (pid_t) vmm_pid;
        vm->vmm_start = vmm_start;
        return;
bad:
        log_error("VM %s: %s has unexpected content; ignored, Role= from the configuration applies",
                  vm->cfg->name, path);
}

/* A replica that is no longer needed (this host is primary now): a stale copy must never be
 * restored and promoted later. */
static void vm_forget_saved_replica(Vm *vm, const char *why)
{
        int r = standby_replica_remove(vm_state_dir(vm), vm->cfg->name);
        if (r > 0 && why)
                log_notice("VM %s: removed the saved replica %s/%s.replica: %s", vm->cfg->name,
                           vm_state_dir(vm), vm->cfg->name, why);
        if (r < 0)
                log_warning_errno(r, "VM %s: cannot remove its saved replica in %s: %m", vm->cfg->name,
                                  vm_state_dir(vm));
}

/* Saves vm->kept (and frees it): the daemon stops or the VM leaves the configuration. */
static void vm_save_kept(Vm *vm)
{
        uint64_t epoch;
        int r;

        if (!vm->kept)
                return;
        epoch = standby_replica_get_epoch(vm->kept);
        (void) mkdir(vm_state_dir(vm), 0700);
        r = standby_replica_save(vm->kept, vm_state_dir(vm), vm->cfg->name);
        if (r < 0)
                log_error_errno(r,
                                "VM %s: cannot save the replica of epoch %" PRIu64
                                " to %s/%s.replica: %m; it is "
                                "LOST with this stop (free space there, or keep the daemon running)",
                                vm->cfg->name, epoch, vm_state_dir(vm), vm->cfg->name);
        else
                log_notice("VM %s: replica of epoch %" PRIu64
                           " saved to %s/%s.replica; the next start restores "
                           "it",
                           vm->cfg->name, epoch, vm_state_dir(vm), vm->cfg->name);
        vm->kept = standby_replica_free(vm->kept);
}

/* Loads a saved replica into vm->kept (the file is removed once a Standby holds it). */
static bool vm_load_saved(Vm *vm)
{
        char why[256];
        int r;

        if (vm->kept)
                return false;
        r = standby_replica_load(vm_state_dir(vm), vm->cfg->name, &vm->kept, why, sizeof(why));
        if (r == -ENOENT)
                return false;
        if (r < 0) {
                char from[PATH_MAX], to[PATH_MAX];
                snprintf(from, sizeof(from), "%s/%s.replica", vm_state_dir(vm), vm->cfg->name);
                if (snprintf(to, sizeof(to), "%s.bad", from) >= (int) sizeof(to))
                        return false;
                (void) rename(from, to);
                log_error("VM %s: cannot restore the saved replica: %s; moved aside to %s, starting without "
                          "a replica (the primary sends a full one)",
                          vm->cfg->name, r == -EBADMSG ? why : strerror(-r), to);
                return false;
        }
        log_notice("VM %s: replica of epoch %" PRIu64 " restored from %s/%s.replica%s", vm->cfg->name,
                   standby_replica_get_epoch(vm->kept), vm_state_dir(vm), vm->cfg->name,
                   standby_replica_is_stale(vm->kept) ? " (stale: taken before maintenance)" : "");
        return true;
}

/* Starts listening as a standby (the VM's setup, a demotion, the end of maintenance, a failed
 * activation): on vm->kept or a saved replica when there is one. */
static int vm_become_standby(Vm *vm)
{
        _cleanup_(ssl_ctx_freep) SSL_CTX *tls = NULL;
        uint8_t *secret = NULL;
        size_t secret_len = 0;
        bool loaded;
        int r;

        r = vm_load_secret(vm, &secret, &secret_len);
        if (r < 0)
                return r;
        r = vm_load_tls(vm, &tls);
        if (r < 0) {
                config_secret_free(secret, secret_len);
                return r;
        }
        r = standby_new(vm->manager->event, vm->daemon, vm->cfg, secret, secret_len, &vm->standby);
        config_secret_free(secret, secret_len);
        if (r < 0)
                return r;
        standby_set_lost_callback(vm->standby, on_standby_lost, vm);
        loaded = vm_load_saved(vm);
        if (vm->kept) {
                r = standby_adopt_replica(vm->standby, vm->kept);
                if (r < 0)
                        goto fail;
                vm->kept = NULL;
        }
        r = standby_set_tls(vm->standby, tls);
        if (r >= 0)
                r = standby_start(vm->standby);
        if (r < 0)
                goto fail;
        if (loaded)
                vm_forget_saved_replica(vm, NULL); /* in memory now; a stale file must not come back later */
        return 0;
fail:
        /* Whatever failed, the replica stays with the Vm. */
        if (!vm->kept)
                (void) standby_release_replica(vm->standby, 0, NULL, &vm->kept);
        vm->standby = standby_free(vm->standby);
        return r;
}

/* ---- the VMM's own systemd unit ------------------------------------------------------------ */

/* The start time of pid in clock ticks since boot (/proc/PID/stat, field 22), or 0 when it is
 * gone: no such process, or a zombie (a killed VMM whose parent died is reaped by whoever
 * adopted it, maybe late, and keeps its pid and start time until then). */
static uint64_t proc_start_time(pid_t pid)
{
        char path[64], buf[1024], *p, state;
        _cleanup_close_ int fd = -EBADF;
        unsigned long long start;
        ssize_t n;

        if (pid <= 0)
                return 0;
        snprintf(path, sizeof(path), "/proc/%d/stat", (int) pid);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
                return 0;
        n = loop_read_upto(fd, buf, sizeof(buf) - 1);
        if (n <= 0)
                return 0;
        buf[n] = 0;
        p = strrchr(buf, ')'); /* comm may hold spaces and parentheses */
        /* After ")": state (field 3), fields 4..21, then starttime (22). */
        if (!p ||
            sscanf(p + 1, " %c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %*u %*u %*d %*d %*d %*d %*d %*d %llu",
                   &state, &start) != 2)
                return 0;
        return state == 'Z' || state == 'X' ? 0 : start;
}

/* Whether the VMM a failover started here still runs: it listens on its control socket, or the
 * process the role file names is still that process (a VMM that does not listen yet, or any
 * more, but runs). */
static bool vm_promoted_vmm_alive(Vm *vm)
{
        if (vmm_link_listening(vm->cfg->control_socket))
                return true;
        return vm->vmm_pid > 0 && vm->vmm_start != 0 && proc_start_time(vm->vmm_pid) == vm->vmm_start;
}

/*
 * Moves the VMM a promotion started into a transient scope unit of its own,
 * dirtyrep-vmm-NAME.scope, so that stopping or restarting dirtyrep.service
 * (whatever its KillMode=) leaves the guest alone. A scope, not a service:
 * the VMM must inherit the replica memfd, which systemd 252 cannot pass to a
 * transient service. Without a service manager on the bus this fails and the
 * VMM stays in our unit: it is then stopped with the daemon, as before.
 */
static int vm_vmm_to_scope(Vm *vm, pid_t pid)
{
        _cleanup_(sd_bus_error_free) sd_bus_error e = SD_BUS_ERROR_NULL;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *msg = NULL;
        char unit[sizeof(vm->vmm_unit)], desc[160];
        sd_bus *bus = vm->manager->bus;
        int r;

        vm->vmm_unit[0] = 0;
        vm->vmm_pid = pid;
        vm->vmm_start = proc_start_time(pid);
        if (!bus)
                return -ENOTCONN;
        snprintf(unit, sizeof(unit), "dirtyrep-vmm-%s.scope", vm->cfg->name);
        snprintf(desc, sizeof(desc), "dirtyrep VM %s (started by dirtyrepd at failover)", vm->cfg->name);
        r = sd_bus_message_new_method_call(bus, &msg, "org.freedesktop.systemd1",
                                           "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager",
                                           "StartTransientUnit");
        if (r >= 0)
                r = sd_bus_message_append(msg, "ss", unit, "fail");
        if (r >= 0)
                r = sd_bus_message_open_container(msg, 'a', "(sv)");
        if (r >= 0)
                r = sd_bus_message_append(msg, "(sv)(sv)(sv)", "PIDs", "au", 1, (uint32_t) pid,
                                          "Description", "s", desc, "CollectMode", "s",
                                          "inactive-or-failed");
        if (r >= 0)
                r = sd_bus_message_close_container(msg);
        if (r >= 0)
                r = sd_bus_message_append(msg, "a(sa(sv))", 0);
        if (r < 0)
                return r;
        r = sd_bus_call(bus, msg, 5 * USEC_PER_SEC, &e, NULL);
        if (r < 0) {
                log_warning("VM %s: cannot give the VMM (pid %d) a unit of its own (%s): it stays in "
                            "dirtyrepd's and is stopped with the daemon",
                            vm->cfg->name, (int) pid, e.message ? e.message : strerror(-r));
                return r;
        }
        memcpy(vm->vmm_unit, unit, sizeof(unit));
        log_notice("VM %s: the VMM (pid %d) runs in %s: it outlives a stop or restart of dirtyrepd",
                   vm->cfg->name, (int) pid, unit);
        return 0;
}

/* Stops the VMM's unit after a restart (it is not our child any more), or the scope of a VMM
 * that failed to start. A unit already gone (CollectMode=inactive-or-failed) counts as stopped. */
static int vm_stop_vmm_unit(Vm *vm)
{
        _cleanup_(sd_bus_error_free) sd_bus_error e = SD_BUS_ERROR_NULL;
        int r;

        if (!vm->vmm_unit[0] || !vm->manager->bus)
                return -ENOTCONN;
        r = sd_bus_call_method(vm->manager->bus, "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                               "org.freedesktop.systemd1.Manager", "StopUnit", &e, NULL, "ss", vm->vmm_unit,
                               "replace");
        if (r < 0 && sd_bus_error_has_name(&e, "org.freedesktop.systemd1.NoSuchUnit"))
                return 0;
        if (r < 0)
                return log_error_errno(r, "VM %s: cannot stop %s: %s", vm->cfg->name, vm->vmm_unit,
                                       e.message ? e.message : strerror(-r));
        log_notice("VM %s: stopping %s", vm->cfg->name, vm->vmm_unit);
        return 0;
}

/* ---- promotion ------------------------------------------------------------------------------- */

/* Answers a Failover() call waiting for the promotion's end (r = 0: the guest runs). */
static void vm_promotion_answer(Vm *vm, int r, const char *why)
{
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *call = TAKE_PTR(vm->failover_call);

        if (!call)
                return;
        if (r >= 0)
                (void) sd_bus_reply_method_return(call, "s", "primary");
        else
                (void) sd_bus_reply_method_errorf(call, "org.dirtyrep1.Error.FailoverFailed", "%s", why);
}

int vm_promote_call(Vm *vm, sd_bus_message *call)
{
        if (vm->failover_call)
                return -EBUSY;
        vm->failover_call = sd_bus_message_ref(call);
        return 0;
}

/*
 * An activation failed before the guest ran: the replica is unchanged (the VMM
 * only mapped it), so this host goes back to being a standby on it, and the
 * failover can be retried once the cause is fixed. The address goes too.
 */
static void vm_activation_failed(Vm *vm, const char *reason)
{
        uint64_t epoch = vm->kept ? standby_replica_get_epoch(vm->kept) : vm->promote_epoch;
        char why[sizeof(vm->error)];
        int r;

        vm->promoting = false;
        /* Its scope normally goes with the VMM, but not when the VMM had exited before systemd
         * moved it there (a zombie does not move): the scope then stays active and empty, and
         * the retried failover's VMM could not have a scope of its own. */
        if (vm->vmm_unit[0])
                (void) vm_stop_vmm_unit(vm);
        vm->vmm_unit[0] = 0;
        if (vm->failover)
                (void) failover_service_address(vm->failover, false);
        snprintf(why, sizeof(why), "activation failed: %s", reason);
        log_error("VM %s: %s; the replica of epoch %" PRIu64
                  " is kept, back to standby: fix the cause and run "
                  "`dirtyrepctl failover %s` again",
                  vm->cfg->name, why, epoch, vm->cfg->name);
        vm_promotion_answer(vm, -EIO, why);
        r = vm_become_standby(vm);
        if (r < 0) {
                if (snprintf(vm->error, sizeof(vm->error), "%.180s; and the standby role failed: %s", why,
                             strerror(-r)) < 0)
                        vm->error[0] = 0;
                return;
        }
        snprintf(vm->error, sizeof(vm->error), "%s", why);
        {
                char note[256];
                snprintf(note, sizeof(note), "%.200s; replica kept, retry the failover", why);
                standby_set_note(vm->standby, NULL, note);
        }
}

static int on_promote_defer(sd_event_source *src, void *userdata);

int vm_promote(Vm *vm, bool force, char *why, size_t why_size)
{
        uint64_t epoch = 0;
        int r;

        if (!vm->standby) {
                snprintf(why, why_size, "VM %s is not a standby here", vm->cfg->name);
                if (vm->maintenance)
                        snprintf(why, why_size,
                                 "VM %s is in maintenance here: `dirtyrepctl maintenance %s off` first (its "
                                 "replica is stale until the primary resynced it)",
                                 vm->cfg->name, vm->cfg->name);
                return -EINVAL;
        }
        if (vm->promoting || vm->promote_defer) {
                snprintf(why, why_size, "a promotion of VM %s is already running", vm->cfg->name);
                return -EBUSY;
        }
        if (!vm->failover) {
                snprintf(why, why_size, "VM %s has no failover setup: %s", vm->cfg->name, vm->error);
                return -EINVAL;
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
        if (!force && standby_replica_stale(vm->standby)) {
                snprintf(why, why_size,
                         "the replica of VM %s (epoch %" PRIu64
                         ") is from before planned maintenance and the "
                         "primary ran unprotected since: wait for the resync, or force to accept losing "
                         "what it "
                         "did meanwhile",
                         vm->cfg->name, epoch);
                return -EBUSY;
        }
        if (!force && standby_primary_connected(vm->standby)) {
                snprintf(why, why_size, "the primary of VM %s is connected (use force to promote anyway)",
                         vm->cfg->name);
                return -EBUSY;
        }
        /* Deferred: a promotion may free the Standby, and this may run inside its callback. */
        r = sd_event_add_defer(vm->manager->event, &vm->promote_defer, on_promote_defer, vm);
        if (r < 0) {
                snprintf(why, why_size, "%s", strerror(-r));
                return r;
        }
        vm->promote_force = force;
        vm->promote_epoch = epoch;
        vm->promote_start_usec = now_usec();
        vm->error[0] = 0;
        log_notice("VM %s: promoting to primary from the replica of epoch %" PRIu64 "%s", vm->cfg->name,
                   epoch, force ? " (forced)" : "");
        return 0;
}

static void on_standby_lost(Standby *s, int error, const char *reason, void *userdata)
{
        Vm *vm = userdata;
        char why[256];
        int r;

        if (vm->cfg->failover_policy == FAILOVER_POLICY_CLUSTER) {
                /* Pacemaker fences the old primary and promotes through the resource agent (Failover());
                 * the replica stays as it is until then. */
                log_warning("VM %s: primary lost; FailoverPolicy=cluster: waiting for the cluster to fence "
                            "it and "
                            "promote",
                            vm->cfg->name);
                standby_set_note(s, NULL,
                                 "primary lost; FailoverPolicy=cluster: waiting for the cluster to promote");
                return;
        }
        if (vm->cfg->failover_policy != FAILOVER_POLICY_AUTO) {
                log_warning("VM %s: primary lost; FailoverPolicy=manual: waiting for an explicit promote",
                            vm->cfg->name);
                standby_set_note(s, NULL, "primary lost; FailoverPolicy=manual: waiting for promote");
                return;
        }
        r = vm_promote(vm, false, why, sizeof(why));
        if (r < 0) {
                log_error("VM %s: primary lost, but cannot fail over: %s", vm->cfg->name, why);
                standby_set_note(s, NULL, why);
        }
}

static int on_promote_defer(sd_event_source *src, void *userdata)
{
        Vm *vm = userdata;
        int r;

        vm->promote_defer = sd_event_source_disable_unref(vm->promote_defer);
        if (!vm->standby) {
                vm_promotion_answer(vm, -ENOTCONN, "the standby role went away");
                return 0;
        }
        vm->promoting = true;
        if (vm->promote_force) {
                log_warning("VM %s: forced promotion: the fence command's result is only logged",
                            vm->cfg->name);
                standby_set_note(vm->standby, "promoting", "forced promotion");
        } else
                standby_set_note(vm->standby, "fencing", "running the fence command");
        r = failover_fence(vm->failover);
        if (r < 0) {
                vm->promoting = false;
                log_error_errno(r, "VM %s: cannot run the fence command, not promoting: %m", vm->cfg->name);
                standby_set_note(vm->standby, NULL, "promotion failed: cannot run the fence command");
                vm_promotion_answer(vm, r, "cannot run the fence command");
        }
        return 0;
}

static void on_fenced(Failover *f, int result, const char *reason, void *userdata)
{
        Vm *vm = userdata;
        const uint8_t *state = NULL;
        size_t state_len = 0;
        char why[256];
        int fd = -EBADF, r;

        if (!vm->standby) {
                vm->promoting = false;
                vm_promotion_answer(vm, -ENOTCONN, "the standby role went away");
                return;
        }
        if (result < 0 && !vm->promote_force) {
                char note[256];
                vm->promoting = false;
                snprintf(note, sizeof(note), "promotion refused: %s", reason);
                standby_set_note(vm->standby, NULL, note);
                vm_promotion_answer(vm, result, note);
                return;
        }
        /* The replica leaves the Standby but stays with the Vm until the guest runs: an
         * activation that fails before that goes back to it. */
        r = standby_release_replica(vm->standby, 0, NULL, &vm->kept);
        if (r < 0) {
                vm->promoting = false;
                standby_set_note(vm->standby, NULL, "promotion failed: no replica");
                vm_promotion_answer(vm, r, "no committed replica");
                return;
        }
        vm->standby = standby_free(vm->standby);
        vm->promote_epoch = standby_replica_get_epoch(vm->kept);
        r = standby_replica_activation(vm->kept, &fd, &state, &state_len);
        if (r < 0) {
                snprintf(why, sizeof(why), "cannot hand the replica to the VMM: %s", strerror(-r));
                vm_activation_failed(vm, why);
                return;
        }
        /* The address first: the VMM's service port may bind to it. */
        (void) failover_service_address(vm->failover, true);
        r = failover_activate(vm->failover, fd, state, state_len, vm->promote_epoch);
        if (r < 0) {
                snprintf(why, sizeof(why), "cannot start the VMM %s: %s", vm->cfg->vmm, strerror(-r));
                vm_activation_failed(vm, why);
                return;
        }
        (void) vm_vmm_to_scope(vm, failover_vmm_pid(vm->failover));
}

static void on_vmm_ready(Failover *f, void *userdata)
{
        Vm *vm = userdata;
        _cleanup_(ssl_ctx_freep) SSL_CTX *tls = NULL;
        uint8_t *secret = NULL;
        size_t secret_len = 0;
        int r;

        vm->promoting = false;
        vm->failovers++;
        /* The guest runs on the memfd now: the VMM holds it, our copy of the handle goes. */
        vm->kept = standby_replica_free(vm->kept);
        vm->promoted = true;
        vm->promoted_from = vm->promote_epoch;
        vm->promoted_synced = false;
        (void) vm_role_save(vm);
        vm_forget_saved_replica(vm, NULL);
        log_notice("VM %s: guest running on this host %.1f ms after the promotion began", vm->cfg->name,
                   (double) (now_usec() - vm->promote_start_usec) / 1000.0);
        vm_promotion_answer(vm, 0, NULL);
        r = vm_load_tls(vm, &tls);
        if (r >= 0)
                r = vm_load_secret(vm, &secret, &secret_len);
        if (r >= 0) {
                r = primary_new(vm->manager->event, vm->daemon, vm->cfg, secret, secret_len, &vm->primary);
                config_secret_free(secret, secret_len);
        }
        if (r >= 0)
                r = primary_set_tls(vm->primary, tls);
        if (r >= 0) {
                primary_set_promoted(vm->primary, vm->promote_epoch);
                /* The address is up already (vm_start_activation()). */
                vm->address_waits_attach = false;
                primary_set_attach_callback(vm->primary, on_primary_attached, vm);
                r = primary_start(vm->primary);
        }
        if (r < 0) {
                vm_drop_primary(vm);
                snprintf(vm->error, sizeof(vm->error), "promoted, but the primary role failed: %s",
                         strerror(-r));
                log_error("VM %s: %s", vm->cfg->name, vm->error);
                return;
        }
        log_notice("VM %s: now primary on this host", vm->cfg->name);
}

static void on_vmm_exited(Failover *f, int code, int status, void *userdata)
{
        Vm *vm = userdata;

        if (vm->promoting) {
                char out[180], why[256];
                failover_vmm_output(f, out, sizeof(out));
                snprintf(why, sizeof(why), "the VMM exited (%s %d) before the guest ran%s%s",
                         code == CLD_EXITED ? "status" : "signal", status, out[0] ? ": " : "", out);
                vm_activation_failed(vm, why);
        }
        /* A primary attached to it sees its control socket close and reports that. */
}

static const FailoverCallbacks failover_callbacks = {
        .fenced = on_fenced,
        .vmm_ready = on_vmm_ready,
        .vmm_exited = on_vmm_exited,
};

int vm_demote(Vm *vm, char *why, size_t why_size)
{
        ReplStatus st;
        int r;

        if (!vm->primary) {
                snprintf(why, why_size, "VM %s is not a primary here", vm->cfg->name);
                return -EINVAL;
        }
        primary_get_status(vm->primary, &st);
        if (failover_vmm_pid(vm->failover) == 0 && !vm->vmm_unit[0] && !streq(st.state, "attaching") &&
            !streq(st.state, "failed")) {
                snprintf(why, why_size,
                         "VM %s runs in a VMM dirtyrepd did not start; stop that VMM first, then demote",
                         vm->cfg->name);
                return -EBUSY;
        }
        log_notice("VM %s: demoting to standby", vm->cfg->name);
        if (failover_vmm_pid(vm->failover) > 0)
                failover_stop_vmm(vm->failover);
        else if (vm->vmm_unit[0])
                (void) vm_stop_vmm_unit(vm); /* started before a restart of this daemon */
        vm_drop_primary(vm);
        (void) failover_service_address(vm->failover, false);
        vm->promoted = vm->promoted_synced = false;
        vm->vmm_unit[0] = 0;
        (void) vm_role_save(vm);
        vm->error[0] = 0;
        r = vm_become_standby(vm);
        if (r < 0) {
                snprintf(why, why_size, "cannot start the standby role: %s", strerror(-r));
                snprintf(vm->error, sizeof(vm->error), "demoted, but %s", why);
                return r;
        }
        return 0;
}

int vm_attach(Vm *vm)
{
        const VmConfig *cfg = vm->cfg;
        uint8_t *secret = NULL;
        size_t secret_len = 0;
        bool as_primary;
        int r;

        if (vm_is_attached(vm) || vm->promoting)
                return -EALREADY;
        if (vm->maintenance) {
                snprintf(vm->error, sizeof(vm->error),
                         "in planned maintenance: `dirtyrepctl maintenance %s off` resumes replication",
                         cfg->name);
                return -EBUSY;
        }
        vm->detached = false;
        vm->error[0] = 0;
        if (!vm->failover) {
                r = failover_new(vm->manager->event, vm->daemon, cfg, &failover_callbacks, vm,
                                 &vm->failover);
                if (r < 0) {
                        snprintf(vm->error, sizeof(vm->error), "failover setup: %s", strerror(-r));
                        log_error("VM %s: %s", cfg->name, vm->error);
                        return r;
                }
        }
        /* Promoted here by a failover (StateDirectory/NAME.role): primary whatever Role= says. */
        as_primary = cfg->role == VM_ROLE_PRIMARY || vm->promoted;
        if (as_primary) {
                _cleanup_(ssl_ctx_freep) SSL_CTX *tls = NULL;

                if (vm->kept) {
                        snprintf(vm->error, sizeof(vm->error),
                                 "holds a replica (epoch %" PRIu64
                                 ") but is to be primary: refusing to discard it",
                                 standby_replica_get_epoch(vm->kept));
                        log_error("VM %s: %s", cfg->name, vm->error);
                        return -EBUSY;
                }
                r = vm_load_tls(vm, &tls);
                if (r < 0)
                        return r;
                r = vm_load_secret(vm, &secret, &secret_len);
                if (r < 0)
                        return r;
                r = primary_new(vm->manager->event, vm->daemon, cfg, secret, secret_len, &vm->primary);
                config_secret_free(secret, secret_len);
                if (r >= 0)
                        r = primary_set_tls(vm->primary, tls);
                if (r >= 0 && vm->promoted) {
                        /* Its VMM runs on (its own unit); this reattaches to it. Until a standby had
                         * synced from it, it runs unprotected, as right after the failover; once one
                         * had, that standby may hold the only copy of what was acknowledged, so output
                         * waits for its resync, as for any primary that restarts. */
                        log_notice("VM %s: primary here since the failover from epoch %" PRIu64
                                   " (%s/%s.role); reattaching to its VMM%s%s%s",
                                   cfg->name, vm->promoted_from, vm_state_dir(vm), cfg->name,
                                   vm->vmm_unit[0] ? " in " : "", vm->vmm_unit,
                                   vm->promoted_synced ? "; output waits for the standby's resync" : "");
                        if (!vm->promoted_synced)
                                primary_set_promoted(vm->primary, vm->promoted_from);
                }
                if (r >= 0) {
                        /* A VMM that listens answers the attach in moments, and what it says
                         * decides the address: a VM it calls suspended may be served by the
                         * other host. One that does not listen yet gets the address now (its
                         * service port may bind to it); a suspension found later takes it away. */
                        primary_set_attach_callback(vm->primary, on_primary_attached, vm);
                        vm->address_waits_attach = vmm_link_listening(cfg->control_socket);
                        r = primary_start(vm->primary);
                }
                vm->service_address_deferred = r >= 0 && vm->address_waits_attach;
                if (r >= 0 && !vm->address_waits_attach)
                        (void) failover_service_address(vm->failover, true);
                if (r >= 0)
                        vm_forget_saved_replica(vm, "this host is the VM's primary now (Role=primary)");
        } else {
                /* A standby never holds the service address (left over from a crash as primary). */
                (void) failover_service_address(vm->failover, false);
                r = vm_become_standby(vm);
        }
        if (r < 0) {
                if (!vm->error[0])
                        snprintf(vm->error, sizeof(vm->error), "setting up the %s role failed: %s",
                                 as_primary ? "primary" : "standby", strerror(-r));
                log_error("VM %s: %s", cfg->name, vm->error);
                vm_drop_primary(vm);
                vm->standby = standby_free(vm->standby);
                return r;
        }
        log_info("VM %s: %s role started", cfg->name, as_primary ? "primary" : "standby");
        return 0;
}

/* Takes the standby's replica into vm->kept (code: what the primary is told). */
static void vm_keep_replica(Vm *vm, int code, const char *reason)
{
        if (!vm->standby || vm->kept)
                return;
        if (standby_release_replica(vm->standby, code, reason, &vm->kept) >= 0 && code != 0)
                log_info("VM %s: replica of epoch %" PRIu64 " kept", vm->cfg->name,
                         standby_replica_get_epoch(vm->kept));
}

int vm_detach(Vm *vm)
{
        if (!vm_is_attached(vm))
                return -ENOTCONN;
        vm->promote_defer = sd_event_source_disable_unref(vm->promote_defer);
        vm_promotion_answer(vm, -ECANCELED, "detached");
        if (vm->primary && vm->failover)
                (void) failover_service_address(vm->failover, false);
        vm_drop_primary(vm);
        /* A detached standby keeps its replica: Attach() starts from it again. */
        vm_keep_replica(vm, -ECANCELED, "standby detached on request");
        vm->standby = standby_free(vm->standby);
        vm->detached = true;
        log_info("VM %s: %s role stopped (detached)", vm->cfg->name, vm_role_to_string(vm->cfg->role));
        return 0;
}

int vm_maintenance(Vm *vm, bool on, char *why, size_t why_size)
{
        int r;

        if (on == vm->maintenance) {
                snprintf(why, why_size, "VM %s is %s in maintenance", vm->cfg->name, on ? "already" : "not");
                return -EALREADY;
        }
        if (!on) {
                vm->maintenance = false;
                (void) vm_role_save(vm);
                r = vm_attach(vm);
                if (r < 0) {
                        snprintf(why, why_size, "cannot start the standby role: %s", vm->error);
                        return r;
                }
                log_notice(
                        "VM %s: maintenance over: listening again; the primary resyncs (the replica stays "
                        "stale, i.e. not promotable, until then)",
                        vm->cfg->name);
                return 0;
        }
        if (vm->primary || vm->promoting || vm->promoted || vm->cfg->role == VM_ROLE_PRIMARY) {
                snprintf(why, why_size,
                         "VM %s is primary here: run `dirtyrepctl maintenance %s on` on the standby's host "
                         "(the primary learns it through the link)",
                         vm->cfg->name, vm->cfg->name);
                return -EINVAL;
        }
        vm->promote_defer = sd_event_source_disable_unref(vm->promote_defer);
        if (vm->standby)
                vm_keep_replica(
                        vm, STANDBY_MAINTENANCE_CODE,
                        "standby going down for planned maintenance; it will not fail over until it has "
                        "resynced");
        vm->standby = standby_free(vm->standby);
        /* The primary now releases output without our ACKs: until a resync, this replica
         * misses what the outside world already saw. */
        standby_replica_set_stale(vm->kept, true);
        vm->maintenance = true;
        vm->detached = false;
        (void) vm_role_save(vm);
        log_warning("VM %s: planned maintenance: replication stopped, the primary runs UNPROTECTED; replica "
                    "of epoch %" PRIu64
                    " kept (not promotable until resynced); `dirtyrepctl maintenance %s off` "
                    "ends it",
                    vm->cfg->name, standby_replica_get_epoch(vm->kept), vm->cfg->name);
        return 0;
}

int vm_checkpoint(Vm *vm, uint64_t *ret_epoch)
{
        if (vm->standby)
                return -EMEDIUMTYPE;
        if (!vm->primary)
                return -ENOTCONN;
        return primary_checkpoint(vm->primary, ret_epoch);
}

/*
 * Frees the Vm: the daemon stops, or the VM left the configuration (a changed
 * VM's state was moved to its successor first). Its replica is saved; a VMM
 * in a unit of its own (or one this daemon did not start) runs on, and a
 * promoted VM keeps its service address and role file for the next start.
 */
static Vm *vm_free(Vm *vm)
{
        bool vmm_survives;

        if (!vm)
                return NULL;
        sd_event_source_disable_unref(vm->promote_defer);
        sd_event_source_disable_unref(vm->attach_failed_defer);
        vm_promotion_answer(vm, -ECANCELED, "dirtyrepd is stopping or the VM was reconfigured");
        vm_attach_answer(vm, -ECANCELED, "dirtyrepd is stopping or the VM was reconfigured");
        vmm_survives = vm->promoted && (failover_vmm_pid(vm->failover) == 0 || vm->vmm_unit[0]);
        if (vm->primary && vm->failover && !vmm_survives)
                (void) failover_service_address(vm->failover, false);
        primary_free(vm->primary);
        vm_keep_replica(vm, -ECANCELED, "standby stopping; its replica is kept");
        standby_free(vm->standby);
        vm_save_kept(vm);
        if (vmm_survives)
                failover_forget_vmm(vm->failover);
        else if (vm->promoted && failover_vmm_pid(vm->failover) > 0) {
                /* Stopped below with the daemon: the next start must not look for it. */
                vm->promoted = false;
                (void) vm_role_save(vm);
        }
        /* Stops a VMM started by a promotion that has no unit of its own (no service manager). */
        failover_free(vm->failover);
        vm_config_free(vm->cfg);
        daemon_config_free(vm->daemon);
        free(vm);
        return NULL;
}
DEFINE_TRIVIAL_CLEANUP_FUNC(Vm *, vm_free);

/* A Vm for cfg (taken) with its own copy of the daemon settings; not started. */
static int vm_new(Manager *m, VmConfig *cfg, const DaemonConfig *d, Vm **ret)
{
        _cleanup_(vm_freep) Vm *vm = NULL;

        vm = calloc(1, sizeof(*vm));
        if (!vm)
                return -ENOMEM;
        vm->manager = m;
        vm->cfg = cfg;
        vm->daemon = daemon_config_copy(d);
        if (!vm->daemon) {
                vm->cfg = NULL; /* not ours on failure */
                return -ENOMEM;
        }
        *ret = TAKE_PTR(vm);
        return 0;
}

/* Starts a VM read from the configuration: what the state directory says first. */
static void vm_start(Vm *vm)
{
        vm_role_load(vm);
        /* (A VMM handed over by a reload is this daemon's own child, whatever its socket says.) */
        if (vm->promoted && failover_vmm_pid(vm->failover) == 0 && !vm_promoted_vmm_alive(vm)) {
                /* The VMM the failover started is gone with this host's last life (a crash, a
                 * reboot, a kill of its unit): there is nothing here to reattach to, and the
                 * peer may have failed over since. Claiming the primary role (and the service
                 * address) now could make two hosts answer; Role= decides instead. */
                log_warning("VM %s: %s/%s.role says this host is primary since the failover from epoch "
                            "%" PRIu64
                            ", but its VMM is gone (nothing listens on %s): the promotion is void, "
                            "Role= from the configuration applies",
                            vm->cfg->name, vm_state_dir(vm), vm->cfg->name, vm->promoted_from,
                            vm->cfg->control_socket);
                vm->promoted = vm->promoted_synced = false;
                vm->vmm_unit[0] = 0;
                (void) vm_role_save(vm);
        }
        if (vm->maintenance) {
                (void) vm_load_saved(vm);
                if (vm->kept) {
                        standby_replica_set_stale(vm->kept, true);
                        vm_forget_saved_replica(vm, NULL); /* in memory; saved again at the next stop */
                }
                log_warning("VM %s: in planned maintenance (%s/%s.role): not replicating; `dirtyrepctl "
                            "maintenance %s off` ends it",
                            vm->cfg->name, vm_state_dir(vm), vm->cfg->name, vm->cfg->name);
                return;
        }
        (void) vm_attach(vm);
}

/*
 * A reload restarts a changed VM's role on a new Vm: what must not be lost moves
 * over first. The replica (the standby's, or one kept during maintenance) goes to
 * the successor, which adopts it; the primary reconnects to the new listener and
 * resyncs from it (incremental when its session still covers the replica's epoch).
 * A VMM a promotion started moves too, and the successor reattaches to it as
 * primary (the role file says so).
 */
static void vm_hand_over(Vm *old, Vm *succ)
{
        int r;

        if (!succ)
                return;
        vm_keep_replica(old, -ECANCELED, "standby restarting with a new configuration; reconnect");
        succ->kept = TAKE_PTR(old->kept);
        if (failover_vmm_pid(old->failover) > 0) {
                r = failover_new(succ->manager->event, succ->daemon, succ->cfg, &failover_callbacks, succ,
                                 &succ->failover);
                if (r >= 0)
                        r = failover_move_vmm(succ->failover, old->failover);
                if (r < 0)
                        log_error_errno(r, "VM %s: cannot hand its VMM over to the new configuration: %m",
                                        old->cfg->name);
        }
}

int manager_load_config(Manager *m, Config **ret, char **ret_errors)
{
        _cleanup_(config_freep) Config *c = NULL;
        int r;

        r = config_load(m->config_path, m->config_dir, &c, ret_errors);
        if (r < 0)
                return r;
        for (size_t i = 0; i < m->n_cli_vms; i++) {
                CliVm *v = &m->cli_vms[i];
                _cleanup_free_ char *origin = NULL;

                if (asprintf(&origin, "command line (--vm %s)", v->name) < 0)
                        return -ENOMEM;
                r = config_apply_vm_settings(c, v->name, v->settings, v->n_settings, origin, ret_errors);
                if (r < 0)
                        return r;
        }
        if (m->n_cli_vms > 0) {
                r = config_validate(c, ret_errors);
                if (r < 0)
                        return r;
        }
        *ret = TAKE_PTR(c);
        return 0;
}

int manager_start(Manager *m, Config *c)
{
        int r;

        m->daemon = daemon_config_copy(c->daemon);
        if (!m->daemon)
                return log_oom();
        m->vms = calloc(c->n_vms ? c->n_vms : 1, sizeof(Vm *));
        if (!m->vms)
                return log_oom();
        for (size_t i = 0; i < c->n_vms; i++) {
                r = vm_new(m, c->vms[i], c->daemon, &m->vms[m->n_vms]);
                if (r < 0)
                        return log_oom();
                c->vms[i] = NULL; /* owned by the Vm now */
                vm_start(m->vms[m->n_vms++]);
        }
        return 0;
}

int manager_reload(Manager *m, unsigned *ret_added, unsigned *ret_removed, unsigned *ret_changed,
                   unsigned *ret_unchanged, char **ret_errors)
{
        _cleanup_(config_freep) Config *c = NULL;
        _cleanup_free_ Vm **vms = NULL;
        _cleanup_free_ uint8_t *fresh = NULL; /* 0 kept, 1 new, 2 replaces a changed VM */
        unsigned added = 0, removed = 0, changed = 0, unchanged = 0;
        bool daemon_same;
        size_t n = 0;
        int r;

        r = manager_load_config(m, &c, ret_errors);
        if (r < 0)
                return r;
        daemon_same = daemon_config_equal(m->daemon, c->daemon);

        vms = calloc(c->n_vms ? c->n_vms : 1, sizeof(Vm *));
        fresh = calloc(c->n_vms ? c->n_vms : 1, 1);
        if (!vms || !fresh)
                return -ENOMEM;

        /* Build the new list first: nothing is stopped until nothing can fail. */
        for (size_t i = 0; i < c->n_vms; i++) {
                Vm *old = manager_find_vm(m, c->vms[i]->name);
                uint64_t epoch = 0;

                if (old && daemon_same && vm_config_equal(old->cfg, c->vms[i])) {
                        vms[n++] = old;
                        continue;
                }
                /* A changed VM is restarted with its state carried over (below); refused
                 * only where that cannot be done without losing something. */
                if (old && (old->promoting || old->promote_defer)) {
                        r = -EBUSY;
                        if (ret_errors &&
                            asprintf(ret_errors,
                                     "VM %s: a promotion is running; nothing was changed, reload "
                                     "again once it has finished (dirtyrepctl status %s)\n",
                                     old->cfg->name, old->cfg->name) < 0)
                                *ret_errors = NULL;
                }
                if (old && !old->promoted && c->vms[i]->role == VM_ROLE_PRIMARY &&
                    (old->kept || standby_replica_epoch(old->standby, &epoch))) {
                        if (old->kept)
                                epoch = standby_replica_get_epoch(old->kept);
                        r = -EBUSY;
                        if (ret_errors &&
                            asprintf(ret_errors,
                                     "VM %s: this host holds its replica (epoch %" PRIu64
                                     "), the only copy if the "
                                     "primary is lost; Role=primary would discard it. Nothing was changed. "
                                     "Fail "
                                     "over instead (dirtyrepctl failover %s), or remove the VM from the "
                                     "configuration first (its replica is saved to %s/%s.replica; delete "
                                     "that "
                                     "file to discard it)\n",
                                     old->cfg->name, epoch, old->cfg->name, vm_state_dir(old),
                                     old->cfg->name) < 0)
                                *ret_errors = NULL;
                }
                if (r == -EBUSY) {
                        for (size_t j = 0; j < n; j++)
                                if (fresh[j]) {
                                        vms[j]->cfg = NULL; /* still owned by c */
                                        vm_free(vms[j]);
                                }
                        log_error("Reload refused: %s",
                                  ret_errors && *ret_errors ? *ret_errors : "see above");
                        return r;
                }
                r = vm_new(m, c->vms[i], c->daemon, &vms[n]);
                if (r < 0) {
                        for (size_t j = 0; j < n; j++)
                                if (fresh[j]) {
                                        vms[j]->cfg = NULL; /* still owned by c */
                                        vm_free(vms[j]);
                                }
                        return r;
                }
                fresh[n++] = old ? 2 : 1;
        }
        /* From here on nothing fails. The fresh Vms own their configs: take them out of c. */
        for (size_t i = 0; i < n; i++)
                if (fresh[i])
                        c->vms[i] = NULL;

        /* Stop every old VM that is not kept: removed, or changed (a fresh Vm replaces it). */
        for (size_t i = 0; i < m->n_vms; i++) {
                Vm *old = m->vms[i];
                bool kept = false, renewed = false;

                for (size_t j = 0; j < n; j++) {
                        if (vms[j] == old)
                                kept = true;
                        else if (streq(vms[j]->cfg->name, old->cfg->name))
                                renewed = true;
                }
                if (kept) {
                        unchanged++;
                        continue;
                }
                if (renewed) {
                        Vm *succ = NULL;
                        for (size_t j = 0; j < n; j++)
                                if (vms[j] != old && streq(vms[j]->cfg->name, old->cfg->name))
                                        succ = vms[j];
                        changed++;
                        log_info("VM %s: configuration changed, restarting its role", old->cfg->name);
                        vm_hand_over(old, succ);
                } else {
                        removed++;
                        log_info("VM %s: removed from the configuration, stopping it", old->cfg->name);
                        bus_vm_removed(m, old->cfg->name);
                }
                vm_free(old);
        }
        added = (unsigned) n - unchanged - changed;

        free(m->vms);
        m->vms = TAKE_PTR(vms);
        m->n_vms = n;
        daemon_config_free(m->daemon);
        m->daemon = daemon_config_copy(c->daemon);
        if (!m->daemon)
                return -ENOMEM;
        log_set_max_level(m->daemon->log_level);

        for (size_t i = 0; i < n; i++)
                if (fresh[i]) {
                        vm_start(m->vms[i]);
                        /* A changed VM keeps its object; its properties are announced by the timer. */
                        if (fresh[i] == 1)
                                bus_vm_added(m, m->vms[i]);
                }

        log_info("Reloaded: %u VM(s) added, %u removed, %u restarted with a new configuration, %u unchanged",
                 added, removed, changed, unchanged);
        if (ret_added)
                *ret_added = added;
        if (ret_removed)
                *ret_removed = removed;
        if (ret_changed)
                *ret_changed = changed;
        if (ret_unchanged)
                *ret_unchanged = unchanged;
        return 0;
}

void manager_done(Manager *m)
{
        m->status_timer = sd_event_source_disable_unref(m->status_timer);
        bus_close(m);
        for (size_t i = 0; i < m->n_vms; i++)
                vm_free(m->vms[i]);
        free(m->vms);
        m->vms = NULL;
        m->n_vms = 0;
        m->daemon = daemon_config_free(m->daemon);
}

void manager_format_status(Manager *m, char *buf, size_t size)
{
        size_t o = 0, protected = 0, failed = 0;

        buf[0] = 0;
        for (size_t i = 0; i < m->n_vms; i++) {
                ReplStatus st;
                vm_get_status(m->vms[i], &st);
                protected += streq(st.state, "protected");
                failed += streq(st.state, "failed");
        }
        if (m->n_vms == 0) {
                snprintf(buf, size, "No VMs configured");
                return;
        }
        o = (size_t) snprintf(buf, size, "%zu VM(s), %zu protected, %zu failed", m->n_vms, protected,
                              failed);
        for (size_t i = 0; i < m->n_vms && o < size; i++) {
                ReplStatus st;
                uint64_t lag;
                vm_get_status(m->vms[i], &st);
                lag = st.last_sealed > st.last_committed ? st.last_sealed - st.last_committed : 0;
                if (streq(st.role, "primary"))
                        o += (size_t) snprintf(buf + o, size - o,
                                               "; %s: primary %s, epoch %" PRIu64 ", lag %" PRIu64,
                                               m->vms[i]->cfg->name, st.state, st.last_sealed, lag);
                else
                        o += (size_t) snprintf(buf + o, size - o, "; %s: standby %s, epoch %" PRIu64,
                                               m->vms[i]->cfg->name, st.state, st.last_committed);
        }
}

static int on_status_timer(sd_event_source *s, uint64_t usec, void *userdata)
{
        Manager *m = userdata;

        for (size_t i = 0; i < m->n_vms; i++) {
                Vm *vm = m->vms[i];

                /* A suspension the attach found (on_primary_attached()) ended: the address comes. */
                if (vm->service_address_deferred && !vm->address_waits_attach && vm->primary &&
                    !primary_suspended(vm->primary)) {
                        vm->service_address_deferred = false;
                        (void) failover_service_address(vm->failover, true);
                }
                bus_vm_check_changes(m, vm);
                /* A promoted primary's first standby ACK: a restart must not run it unprotected
                 * any more (vm_attach). Up to one tick late: a crash in that window restarts it
                 * unprotected (docs/architecture.md, known problems). */
                if (vm->promoted && !vm->promoted_synced && vm->primary) {
                        ReplStatus st;
                        primary_get_status(vm->primary, &st);
                        if (st.last_committed > 0 && streq(st.state, "protected")) {
                                vm->promoted_synced = true;
                                (void) vm_role_save(vm);
                        }
                }
        }

        if (m->status_ticks++ % NOTIFY_EVERY_TICKS == 0) {
                char status[sizeof(m->last_notify_status)];

                manager_format_status(m, status, sizeof(status));
                if (!streq(status, m->last_notify_status)) {
                        (void) sd_notifyf(false, "STATUS=%s", status);
                        memcpy(m->last_notify_status, status, sizeof(status));
                }
        }
        (void) sd_event_source_set_time(s, usec + STATUS_INTERVAL_USEC);
        return 0;
}

int manager_start_status_timer(Manager *m)
{
        uint64_t now;
        int r;

        r = sd_event_now(m->event, CLOCK_MONOTONIC, &now);
        if (r < 0)
                return r;
        r = sd_event_add_time(m->event, &m->status_timer, CLOCK_MONOTONIC, now + STATUS_INTERVAL_USEC,
                              10 * 1000, on_status_timer, m);
        if (r < 0)
                return r;
        return sd_event_source_set_enabled(m->status_timer, SD_EVENT_ON);
}

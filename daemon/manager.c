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

#include <sys/wait.h>

#include "bus.h"
#include "log.h"
#include "manager.h"
#include "tls.h"
#include "util.h"

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

void vm_get_status(Vm *vm, ReplStatus *st)
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

/* Starts listening as a standby (the VM's setup, or a demotion). */
static int vm_become_standby(Vm *vm)
{
        _cleanup_(ssl_ctx_freep) SSL_CTX *tls = NULL;
        uint8_t *secret = NULL;
        size_t secret_len = 0;
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
        r = standby_set_tls(vm->standby, tls);
        if (r >= 0)
                r = standby_start(vm->standby);
        if (r < 0)
                vm->standby = standby_free(vm->standby);
        return r;
}

static int on_promote_defer(sd_event_source *src, void *userdata);

int vm_promote(Vm *vm, bool force, char *why, size_t why_size)
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
                log_warning("VM %s: forced promotion: the fence command's result is only logged", vm->cfg->name);
                standby_set_note(vm->standby, "promoting", "forced promotion");
        } else
                standby_set_note(vm->standby, "fencing", "running the fence command");
        r = failover_fence(vm->failover);
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
        _cleanup_(ssl_ctx_freep) SSL_CTX *tls = NULL;
        uint8_t *secret = NULL;
        size_t secret_len = 0;
        int r;

        vm->promoting = false;
        log_notice("VM %s: guest running on this host %.1f ms after the promotion began", vm->cfg->name,
                   (double) (now_usec() - vm->promote_start_usec) / 1000.0);
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

int vm_demote(Vm *vm, char *why, size_t why_size)
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

int vm_attach(Vm *vm)
{
        const VmConfig *cfg = vm->cfg;
        uint8_t *secret = NULL;
        size_t secret_len = 0;
        int r;

        if (vm_is_attached(vm) || vm->promoting)
                return -EALREADY;
        vm->detached = false;
        vm->error[0] = 0;
        if (!vm->failover) {
                r = failover_new(vm->manager->event, vm->daemon, cfg, &failover_callbacks, vm, &vm->failover);
                if (r < 0) {
                        snprintf(vm->error, sizeof(vm->error), "failover setup: %s", strerror(-r));
                        log_error("VM %s: %s", cfg->name, vm->error);
                        return r;
                }
        }
        if (cfg->role == VM_ROLE_PRIMARY) {
                _cleanup_(ssl_ctx_freep) SSL_CTX *tls = NULL;

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
                if (r >= 0)
                        r = primary_start(vm->primary);
                vm->service_address_deferred = r >= 0 && primary_suspended(vm->primary);
                if (r >= 0)
                        (void) primary_take_attach_suspended(vm->primary); /* decided here */
                if (vm->service_address_deferred && cfg->service_address.family != AF_UNSPEC)
                        log_notice("VM %s: suspended: the service address waits until the suspension ends",
                                   cfg->name);
                else if (r >= 0)
                        (void) failover_service_address(vm->failover, true);
        } else {
                /* A standby never holds the service address (left over from a crash as primary). */
                (void) failover_service_address(vm->failover, false);
                r = vm_become_standby(vm);
        }
        if (r < 0) {
                if (!vm->error[0])
                        snprintf(vm->error, sizeof(vm->error), "setting up the %s role failed: %s",
                                 vm_role_to_string(cfg->role), strerror(-r));
                log_error("VM %s: %s", cfg->name, vm->error);
                vm->primary = primary_free(vm->primary);
                vm->standby = standby_free(vm->standby);
                return r;
        }
        log_info("VM %s: %s role started", cfg->name, vm_role_to_string(cfg->role));
        return 0;
}

int vm_detach(Vm *vm)
{
        if (!vm_is_attached(vm))
                return -ENOTCONN;
        vm->promote_defer = sd_event_source_disable_unref(vm->promote_defer);
        if (vm->primary && vm->failover)
                (void) failover_service_address(vm->failover, false);
        vm->primary = primary_free(vm->primary);
        vm->standby = standby_free(vm->standby);
        vm->detached = true;
        log_info("VM %s: %s role stopped (detached)", vm->cfg->name, vm_role_to_string(vm->cfg->role));
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

static Vm *vm_free(Vm *vm)
{
        if (!vm)
                return NULL;
        sd_event_source_disable_unref(vm->promote_defer);
        if (vm->primary && vm->failover)
                (void) failover_service_address(vm->failover, false);
        primary_free(vm->primary);
        standby_free(vm->standby);
        /* Stops a VMM started by a promotion: its VM lives as long as this daemon (or this VM's config). */
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
                (void) vm_attach(m->vms[m->n_vms++]);
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

                if (old && daemon_same && vm_config_equal(old->cfg, c->vms[i])) {
                        vms[n++] = old;
                        continue;
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
                        changed++;
                        log_info("VM %s: configuration changed, restarting its role", old->cfg->name);
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
                        (void) vm_attach(m->vms[i]);
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

                /* The VMM was not reachable at vm_attach() (not started yet, another client still
                 * attached, ...): the address went up then, and the attach that followed found
                 * the VM suspended. Another host may serve it: the address goes. */
                if (vm->primary && primary_take_attach_suspended(vm->primary) && !vm->service_address_deferred &&
                    primary_suspended(vm->primary)) {
                        if (vm->cfg->service_address.family != AF_UNSPEC)
                                log_notice("VM %s: attached to a suspended VM: the service address is removed "
                                           "until the suspension ends",
                                           vm->cfg->name);
                        (void) failover_service_address(vm->failover, false);
                        vm->service_address_deferred = true;
                }
                if (vm->service_address_deferred && vm->primary && !primary_suspended(vm->primary)) {
                        vm->service_address_deferred = false;
                        (void) failover_service_address(vm->failover, true);
                }
                bus_vm_check_changes(m, vm);
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

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * dirtyrepd's D-Bus API. Modelled on systemd's timedated/machined: one
 * manager object, one object per VM found through a fallback vtable (so a
 * reload needs no re-registration), named method arguments, named errors.
 *
 * Every caller is hostile: VM names are validated before any lookup, the
 * bus daemon bounds message sizes, and mutating methods check the caller
 * (root or group dirtyrep) here as well as in the bus policy, because a
 * policy file is easy to get wrong and a private bus may have none.
 */
#include <errno.h>
#include <limits.h>
#include <grp.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bus.h"
#include "dirtyrep-build.h"
#include "journal.h"
#include "log.h"
#include "takeover.h"

#define BUS_RETRY_USEC (5 * 1000 * 1000ULL)

static int bus_connect(Manager *m);

/* ---------------------------------------------------------------------- */
/* Helpers */

static int vm_object_path(const char *name, char **ret)
{
        return sd_bus_path_encode(BUS_VM_PREFIX, name, ret);
}

/* root, or a member of BUS_ADMIN_GROUP (primary or supplementary group). */
static int check_privileged(sd_bus_message *msg, sd_bus_error *error)
{
        _cleanup_(sd_bus_creds_unrefp) sd_bus_creds *creds = NULL;
        struct group grbuf, *gr = NULL;
        char buf[4096];
        const gid_t *gids = NULL;
        uid_t uid;
        gid_t gid;
        int r, n;

        r = sd_bus_query_sender_creds(msg,
                                      SD_BUS_CREDS_EUID | SD_BUS_CREDS_UID | SD_BUS_CREDS_EGID |
                                              SD_BUS_CREDS_SUPPLEMENTARY_GIDS | SD_BUS_CREDS_AUGMENT,
                                      &creds);
        if (r < 0)
                return sd_bus_error_set_errnof(error, r, "Cannot determine the caller's credentials: %m");
        r = sd_bus_creds_get_euid(creds, &uid);
        if (r < 0)
                r = sd_bus_creds_get_uid(creds, &uid);
        if (r < 0)
                return sd_bus_error_set(error, SD_BUS_ERROR_ACCESS_DENIED, "Caller's user is unknown");
        if (uid == 0)
                return 0;

        if (getgrnam_r(BUS_ADMIN_GROUP, &grbuf, buf, sizeof(buf), &gr) == 0 && gr) {
                if (sd_bus_creds_get_egid(creds, &gid) >= 0 && gid == gr->gr_gid)
                        return 0;
                n = sd_bus_creds_get_supplementary_gids(creds, &gids);
                for (int i = 0; i < n; i++)
                        if (gids[i] == gr->gr_gid)
                                return 0;
        }
        return sd_bus_error_setf(error, SD_BUS_ERROR_ACCESS_DENIED,
                                 "Only root and members of group '%s' may change dirtyrepd's state",
                                 BUS_ADMIN_GROUP);
}

static Vm *lookup_vm(Manager *m, const char *name, sd_bus_error *error)
{
        Vm *vm;

        if (!config_vm_name_is_valid(name)) {
                sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Invalid VM name");
                return NULL;
        }
        vm = manager_find_vm(m, name);
        if (!vm)
                sd_bus_error_setf(error, BUS_ERROR("NoSuchVM"), "No VM named '%s'", name);
        return vm;
}

/* ---------------------------------------------------------------------- */
/* Manager object */

static int property_get_version(sd_bus *bus, const char *path, const char *interface, const char *property,
                                sd_bus_message *reply, void *userdata, sd_bus_error *error)
{
        return sd_bus_message_append(reply, "s", DIRTYREP_VERSION);
}

static int property_get_n_vms(sd_bus *bus, const char *path, const char *interface, const char *property,
                              sd_bus_message *reply, void *userdata, sd_bus_error *error)
{
        Manager *m = userdata;
        return sd_bus_message_append(reply, "u", (uint32_t) m->n_vms);
}

static int method_list_vms(sd_bus_message *msg, void *userdata, sd_bus_error *error)
{
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        Manager *m = userdata;
        int r;

        r = sd_bus_message_new_method_return(msg, &reply);
        if (r < 0)
                return r;
        r = sd_bus_message_open_container(reply, 'a', "(ssso)");
        if (r < 0)
                return r;
        for (size_t i = 0; i < m->n_vms; i++) {
                _cleanup_free_ char *path = NULL;
                ReplStatus st;

                vm_get_status(m->vms[i], &st);
                r = vm_object_path(m->vms[i]->cfg->name, &path);
                if (r < 0)
                        return r;
                r = sd_bus_message_append(reply, "(ssso)", m->vms[i]->cfg->name, st.role, st.state, path);
                if (r < 0)
                        return r;
        }
        r = sd_bus_message_close_container(reply);
        if (r < 0)
                return r;
        return sd_bus_send(NULL, reply, NULL);
}

static int method_get_vm(sd_bus_message *msg, void *userdata, sd_bus_error *error)
{
        _cleanup_free_ char *path = NULL;
        Manager *m = userdata;
        const char *name;
        Vm *vm;
        int r;

        r = sd_bus_message_read(msg, "s", &name);
        if (r < 0)
                return r;
        vm = lookup_vm(m, name, error);
        if (!vm)
                return -EINVAL;
        r = vm_object_path(vm->cfg->name, &path);
        if (r < 0)
                return r;
        return sd_bus_reply_method_return(msg, "o", path);
}

static int method_reload(sd_bus_message *msg, void *userdata, sd_bus_error *error)
{
        _cleanup_free_ char *errors = NULL;
        Manager *m = userdata;
        unsigned added = 0, removed = 0, changed = 0, unchanged = 0;
        int r;

        r = check_privileged(msg, error);
        if (r < 0)
                return r;
        log_info("Reload requested over D-Bus");
        r = manager_reload(m, &added, &removed, &changed, &unchanged, &errors);
        if (r == -EINVAL) {
                /* errors is bounded by the parser (CONFIG_ERRORS_MAX lines per file). */
                if (errors) {
                        char *save = NULL;
                        _cleanup_free_ char *copy = strdup(errors);
                        for (char *l = copy ? strtok_r(copy, "\n", &save) : NULL; l;
                             l = strtok_r(NULL, "\n", &save))
                                log_error("%s", l);
                }
                log_event(LOG_ERR, DR_MESSAGE_CONFIG_INVALID, NULL, 0,
                          "Reload refused: the configuration is invalid, nothing was changed");
                return sd_bus_error_setf(error, BUS_ERROR("InvalidConfig"),
                                         "The configuration is invalid, nothing was changed:\n%s",
                                         errors ? errors : "(no details)");
        }
        if (r == -EBUSY && errors)
                /* Refused: it would have discarded a replica, or hit a promotion (the reason names it). */
                return sd_bus_error_setf(error, BUS_ERROR("ReloadRefused"), "Reload refused: %s", errors);
        if (r < 0)
                return sd_bus_error_set_errnof(error, r, "Reload failed: %m");
        log_event(LOG_INFO, DR_MESSAGE_RELOADED, NULL, 0,
                  "Configuration reloaded: %u added, %u removed, %u restarted, %u unchanged", added, removed,
                  changed, unchanged);
        return sd_bus_reply_method_return(msg, "uuuu", added, removed, changed, unchanged);
}

static const sd_bus_vtable manager_vtable[] = {
        SD_BUS_VTABLE_START(0),
        SD_BUS_PROPERTY("Version", "s", property_get_version, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("NVMs", "u", property_get_n_vms, 0, 0),
        SD_BUS_METHOD_WITH_ARGS("ListVMs", SD_BUS_NO_ARGS, SD_BUS_RESULT("a(ssso)", vms), method_list_vms,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("GetVM", SD_BUS_ARGS("s", name), SD_BUS_RESULT("o", path), method_get_vm,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        /* Mutating methods are UNPRIVILEGED for sd-bus (whose own check knows only uid 0 and
         * CAP_SYS_ADMIN) and checked by check_privileged(), which also admits group dirtyrep. */
        SD_BUS_METHOD_WITH_ARGS("Reload", SD_BUS_NO_ARGS,
                                SD_BUS_RESULT("u", added, "u", removed, "u", changed, "u", unchanged),
                                method_reload, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_VTABLE_END,
};

/* ---------------------------------------------------------------------- */
/* VM objects */

static int vm_object_find(sd_bus *bus, const char *path, const char *interface, void *userdata, void **found,
                          sd_bus_error *error)
{
        _cleanup_free_ char *name = NULL;
        Manager *m = userdata;
        Vm *vm;
        int r;

        r = sd_bus_path_decode(path, BUS_VM_PREFIX, &name);
        if (r <= 0)
                return 0;
        if (!config_vm_name_is_valid(name))
                return 0;
        vm = manager_find_vm(m, name);
        if (!vm)
                return 0;
        *found = vm;
        return 1;
}

static int vm_node_enumerator(sd_bus *bus, const char *path, void *userdata, char ***nodes,
                              sd_bus_error *error)
{
        Manager *m = userdata;
        char **l;

        l = calloc(m->n_vms + 1, sizeof(char *));
        if (!l)
                return -ENOMEM;
        for (size_t i = 0; i < m->n_vms; i++)
                if (vm_object_path(m->vms[i]->cfg->name, &l[i]) < 0) {
                        for (size_t j = 0; j < i; j++)
                                free(l[j]);
                        free(l);
                        return -ENOMEM;
                }
        *nodes = l;
        return 0;
}

#define STATUS_GETTER(fn, sig, type, expr)                                                                  \
        static int fn(sd_bus *bus, const char *path, const char *interface, const char *property,           \
                      sd_bus_message *reply, void *userdata, sd_bus_error *error)                           \
        {                                                                                                   \
                ReplStatus st;                                                                              \
                vm_get_status(userdata, &st);                                                               \
                return sd_bus_message_append(reply, sig, (type) (expr));                                    \
        }

STATUS_GETTER(property_get_role, "s", const char *, st.role ? st.role : "")
STATUS_GETTER(property_get_state, "s", const char *, st.state ? st.state : "")
STATUS_GETTER(property_get_detail, "s", const char *, st.detail)
STATUS_GETTER(property_get_peer, "s", const char *, st.peer)
STATUS_GETTER(property_get_link_up, "b", int, st.link_up)
STATUS_GETTER(property_get_protected, "b", int, st.state &&streq(st.state, "protected"))
STATUS_GETTER(property_get_last_sealed, "t", uint64_t, st.last_sealed)
STATUS_GETTER(property_get_last_committed, "t", uint64_t, st.last_committed)
STATUS_GETTER(property_get_lag, "t", uint64_t,
              st.last_sealed > st.last_committed ? st.last_sealed - st.last_committed : 0)
STATUS_GETTER(property_get_epochs_committed, "t", uint64_t, st.epochs_committed)
STATUS_GETTER(property_get_full_syncs, "t", uint64_t, st.full_syncs)
STATUS_GETTER(property_get_incremental_syncs, "t", uint64_t, st.incremental_syncs)
STATUS_GETTER(property_get_pause_p50, "t", uint64_t, st.pause_ns_p50)
STATUS_GETTER(property_get_pause_p99, "t", uint64_t, st.pause_ns_p99)
STATUS_GETTER(property_get_pause_max, "t", uint64_t, st.pause_ns_max)
STATUS_GETTER(property_get_vm_pause_p50, "t", uint64_t, st.vm_pause_ns_p50)
STATUS_GETTER(property_get_vm_pause_p99, "t", uint64_t, st.vm_pause_ns_p99)
STATUS_GETTER(property_get_vm_pause_max, "t", uint64_t, st.vm_pause_ns_max)
STATUS_GETTER(property_get_pages_last_epoch, "t", uint64_t, st.pages_last_epoch)
STATUS_GETTER(property_get_dirty_rate, "d", double, st.dirty_pages_per_s)
STATUS_GETTER(property_get_bytes_sent, "t", uint64_t, st.bytes_sent)
STATUS_GETTER(property_get_bytes_received, "t", uint64_t, st.bytes_received)
STATUS_GETTER(property_get_inflight, "t", uint64_t, st.inflight)
STATUS_GETTER(property_get_compression_ratio, "d", double, st.compression_ratio)
STATUS_GETTER(property_get_staging_bytes, "t", uint64_t, st.staging_bytes)

STATUS_GETTER(property_get_sync_done, "t", uint64_t, st.sync_done_bytes)
STATUS_GETTER(property_get_sync_total, "t", uint64_t, st.sync_total_bytes)
STATUS_GETTER(property_get_sync_elapsed, "t", uint64_t, st.sync_elapsed_usec)
STATUS_GETTER(property_get_last_sync_usec, "t", uint64_t, st.last_sync_usec)

static int property_get_service_address(sd_bus *bus, const char *path, const char *interface,
                                        const char *property, sd_bus_message *reply, void *userdata,
                                        sd_bus_error *error)
{
        const Vm *vm = userdata;
        char a[80] = "";

        if (vm->cfg->service_address.family != AF_UNSPEC && vm->cfg->service_interface) {
                char cidr[64];
                takeover_format(&vm->cfg->service_address, cidr, sizeof(cidr));
                snprintf(a, sizeof(a), "%s on %s", cidr, vm->cfg->service_interface);
        }
        return sd_bus_message_append(reply, "s", a);
}

static int property_get_service_address_state(sd_bus *bus, const char *path, const char *interface,
                                              const char *property, sd_bus_message *reply, void *userdata,
                                              sd_bus_error *error)
{
        Vm *vm = userdata;
        char buf[128];

        return sd_bus_message_append(reply, "s",
                                     failover_service_address_state(vm->failover, buf, sizeof(buf)));
}

#define CONFIG_GETTER(fn, sig, type, expr)                                                                  \
        static int fn(sd_bus *bus, const char *path, const char *interface, const char *property,           \
                      sd_bus_message *reply, void *userdata, sd_bus_error *error)                           \
        {                                                                                                   \
                const Vm *vm = userdata;                                                                    \
                return sd_bus_message_append(reply, sig, (type) (expr));                                    \
        }

CONFIG_GETTER(property_get_name, "s", const char *, vm->cfg->name)
CONFIG_GETTER(property_get_attached, "b", int, vm->primary || vm->standby)
CONFIG_GETTER(property_get_configured_role, "s", const char *, vm_role_to_string(vm->cfg->role))
CONFIG_GETTER(property_get_epoch_ms, "u", uint32_t, vm->cfg->epoch_ms)
CONFIG_GETTER(property_get_tracking, "s", const char *, config_tracking_to_string(vm->cfg->tracking))
CONFIG_GETTER(property_get_compression, "s", const char *,
              config_compression_to_string(vm->cfg->compression))
CONFIG_GETTER(property_get_max_inflight, "u", uint32_t, vm->cfg->max_inflight_epochs)
CONFIG_GETTER(property_get_control_socket, "s", const char *,
              vm->cfg->control_socket ? vm->cfg->control_socket : "")
CONFIG_GETTER(property_get_config_peer, "s", const char *, vm->cfg->peer.len ? vm->cfg->peer.text : "")
CONFIG_GETTER(property_get_config_listen, "s", const char *, vm->cfg->listen.len ? vm->cfg->listen.text : "")
CONFIG_GETTER(property_get_config_path, "s", const char *, vm->cfg->path ? vm->cfg->path : "")
CONFIG_GETTER(property_get_failovers, "t", uint64_t, vm->failovers)
CONFIG_GETTER(property_get_failover_policy, "s", const char *,
              failover_policy_to_string(vm->cfg->failover_policy))

static int method_checkpoint(sd_bus_message *msg, void *userdata, sd_bus_error *error)
{
        Vm *vm = userdata;
        uint64_t epoch = 0;
        int r;

        r = check_privileged(msg, error);
        if (r < 0)
                return r;
        r = vm_checkpoint(vm, &epoch);
        switch (r) {
        case 0:
                log_info("VM %s: checkpoint requested over D-Bus: epoch %" PRIu64, vm->cfg->name, epoch);
                return sd_bus_reply_method_return(msg, "t", epoch);
        case -EMEDIUMTYPE:
                return sd_bus_error_setf(error, BUS_ERROR("NotPrimary"),
                                         "VM '%s' is a standby; only a primary seals epochs", vm->cfg->name);
        case -ENOTCONN:
                if (!vm_is_attached(vm))
                        return sd_bus_error_setf(error, BUS_ERROR("NotAttached"),
                                                 "VM '%s' is not attached (%s)", vm->cfg->name,
                                                 vm->detached ? "detached" : "its role failed to start");
                return sd_bus_error_setf(error, BUS_ERROR("NotConnected"),
                                         "VM '%s' has no standby connected; no epoch can be sealed",
                                         vm->cfg->name);
        case -EBUSY:
                return sd_bus_error_setf(
                        error, BUS_ERROR("Busy"),
                        "VM '%s' is busy (frozen, or the in-flight epoch limit is reached); "
                        "try again",
                        vm->cfg->name);
        default:
                return sd_bus_error_setf(error, BUS_ERROR("CheckpointFailed"),
                                         "Checkpoint of VM '%s' failed: %s", vm->cfg->name, strerror(-r));
        }
}

/* CheckpointImage answers once the image is written: the call is kept until then. */
static void image_done(Primary *p, const PrimaryImageResult *res, void *userdata)
{
        sd_bus_message *msg = userdata;

        if (res->result < 0)
                (void) sd_bus_reply_method_errorf(msg, BUS_ERROR("ImageFailed"), "Image %s: %s", res->dir,
                                                  res->error);
        else
                (void) sd_bus_reply_method_return(msg, "tttt", res->epoch, res->present_pages,
                                                  res->total_bytes, res->pause_ns);
        sd_bus_message_unref(msg);
}

/*
 * CheckpointImage writes (and, for a parent, reads) directories a caller names, as root. A member
 * of group dirtyrep may call it, but must not be able to have root write anywhere: the directory
 * must resolve (symbolic links followed, a last component that does not exist yet allowed) to
 * somewhere strictly below the image root, ImageDirectory= (default StateDirectory=/images,
 * created 0700 when missing). On success *ret_real is the resolved path, the one to use.
 * -EPERM (outside), -EINVAL (no last component) or another errno, with the reason in why.
 */
static int image_path_confine(const DaemonConfig *d, const char *path, char **ret_real, char *why,
                              size_t why_size)
{
        _cleanup_free_ char *root_cfg = NULL, *root = NULL, *real = NULL, *parent = NULL,
                            *real_parent = NULL;
        char *slash;
        size_t n;

        if (d->image_directory)
                root_cfg = strdup(d->image_directory);
        else if (asprintf(&root_cfg, "%s/images", d->state_directory) < 0)
                root_cfg = NULL;
        if (!root_cfg)
                return -ENOMEM;
        if (mkdir(root_cfg, 0700) < 0 && errno != EEXIST) {
                int r = -errno;
                snprintf(why, why_size, "cannot create the image root ImageDirectory=%s: %s", root_cfg,
                         strerror(-r));
                return r;
        }
        root = realpath(root_cfg, NULL);
        if (!root) {
                int r = -errno;
                snprintf(why, why_size, "the image root ImageDirectory=%s: %s", root_cfg, strerror(-r));
                return r;
        }

        real = realpath(path, NULL);
        if (!real) {
                if (errno != ENOENT) {
                        int r = -errno;
                        snprintf(why, why_size, "%s: %s", path, strerror(-r));
                        return r;
                }
                /* Not there yet (a new image): its parent must be, and the name is taken as is. */
                parent = strdup(path);
                if (!parent)
                        return -ENOMEM;
                for (n = strlen(parent); n > 1 && parent[n - 1] == '/'; n--)
                        parent[n - 1] = 0;
                slash = strrchr(parent, '/');
                if (!slash || streq(slash + 1, "") || streq(slash + 1, ".") || streq(slash + 1, "..")) {
                        snprintf(why, why_size, "%s does not name a directory to create", path);
                        return -EINVAL;
                }
                *slash = 0;
                real_parent = realpath(parent[0] ? parent : "/", NULL);
                if (!real_parent) {
                        int r = -errno;
                        snprintf(why, why_size, "%s: %s", parent[0] ? parent : "/", strerror(-r));
                        return r;
                }
                if (asprintf(&real, "%s/%s", streq(real_parent, "/") ? "" : real_parent, slash + 1) < 0) {
                        real = NULL;
                        return -ENOMEM;
                }
        }
        n = strlen(root);
        if (streq(root, "/") ? streq(real, "/")
                             : (strncmp(real, root, n) != 0 || real[n] != '/' || real[n + 1] == 0)) {
                snprintf(why, why_size,
                         "%s (resolved: %s) is not below the image root ImageDirectory=%s: images are "
                         "written and read only there (set ImageDirectory= in dirtyrep.conf to move it)",
                         path, real, root);
                return -EPERM;
        }
        *ret_real = TAKE_PTR(real);
        return 0;
}

static int method_checkpoint_image(sd_bus_message *msg, void *userdata, sd_bus_error *error)
{
        _cleanup_free_ char *real_dir = NULL, *real_parent = NULL;
        Vm *vm = userdata;
        const char *dir, *parent;
        int compress, r;

        r = check_privileged(msg, error);
        if (r < 0)
                return r;
        r = sd_bus_message_read(msg, "ssb", &dir, &parent, &compress);
        if (r < 0)
                return r;
        if (dir[0] != '/' || strlen(dir) >= PATH_MAX ||
            (parent[0] && (parent[0] != '/' || strlen(parent) >= PATH_MAX)))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "Image and parent directories must be absolute paths");
        {
                char why[PATH_MAX * 2 + 256];
                r = image_path_confine(vm->daemon, dir, &real_dir, why, sizeof(why));
                if (r >= 0 && parent[0])
                        r = image_path_confine(vm->daemon, parent, &real_parent, why, sizeof(why));
                if (r < 0) {
                        log_warning("VM %s: CheckpointImage refused: %s", vm->cfg->name, why);
                        return sd_bus_error_setf(error,
                                                 r == -EPERM ? BUS_ERROR("ImageOutsideRoot")
                                                             : SD_BUS_ERROR_INVALID_ARGS,
                                                 "%s", why);
                }
                dir = real_dir;
                if (parent[0])
                        parent = real_parent;
        }
        if (!vm->primary)
                return sd_bus_error_setf(
                        error, vm->standby ? BUS_ERROR("NotPrimary") : BUS_ERROR("NotAttached"),
                        "VM '%s' is not a running primary; images are taken at its seals", vm->cfg->name);
        /* Run by systemd, the daemon writes inside dirtyrep.service's sandbox: an image in its
         * private /tmp would "succeed" where nobody finds it. Say so instead. */
        if (getenv("INVOCATION_ID")) {
                _cleanup_free_ char *why = NULL;
                if (config_check_sandbox_path("Image directory", dir, &why) < 0)
                        return sd_bus_error_setf(error, BUS_ERROR("ImageFailed"), "%s",
                                                 why ? why
                                                     : "Image directory outside the service's sandbox");
        }
        r = primary_checkpoint_image(vm->primary, dir, parent[0] ? parent : NULL, compress, image_done,
                                     sd_bus_message_ref(msg));
        if (r < 0) {
                sd_bus_message_unref(msg);
                if (r == -ENOTCONN)
                        return sd_bus_error_setf(error, BUS_ERROR("NotConnected"),
                                                 "VM '%s' has no standby connected; no epoch is sealed",
                                                 vm->cfg->name);
                if (r == -EBUSY)
                        return sd_bus_error_setf(
                                error, BUS_ERROR("Busy"),
                                "VM '%s' is taking another image, frozen, or at its in-flight "
                                "limit; try again",
                                vm->cfg->name);
                return sd_bus_error_setf(error, BUS_ERROR("ImageFailed"), "Image of VM '%s': %s",
                                         vm->cfg->name, strerror(-r));
        }
        log_info("VM %s: image %s requested over D-Bus", vm->cfg->name, dir);
        return 1; /* answered by image_done() */
}

/* Standby: promote (fence, then activate the replica); primary: demote to standby. */
static int method_failover(sd_bus_message *msg, void *userdata, sd_bus_error *error)
{
        Vm *vm = userdata;
        char why[256] = "";
        int force, r;

        r = check_privileged(msg, error);
        if (r < 0)
                return r;
        r = sd_bus_message_read(msg, "b", &force);
        if (r < 0)
                return r;
        if (vm->standby) {
                r = vm_promote(vm, force, why, sizeof(why));
                if (r >= 0) {
                        log_notice("VM %s: failover (promotion) requested over D-Bus%s", vm->cfg->name,
                                   force ? ", forced" : "");
                        /* Answered once the guest runs, or with the reason it does not. */
                        r = vm_promote_call(vm, msg);
                        if (r >= 0)
                                return 1;
                        return sd_bus_reply_method_return(msg, "s", "primary");
                }
        } else if (vm->primary) {
                r = vm_demote(vm, why, sizeof(why));
                if (r >= 0) {
                        log_notice("VM %s: failover (demotion) requested over D-Bus", vm->cfg->name);
                        return sd_bus_reply_method_return(msg, "s", "standby");
                }
        } else
                return sd_bus_error_setf(
                        error, BUS_ERROR("NotAttached"), "VM '%s' has no running role%s", vm->cfg->name,
                        vm->promoting     ? " (a promotion is running)"
                        : vm->maintenance ? " (in maintenance: dirtyrepctl maintenance VM off)"
                                          : "");
        switch (r) {
        case -EBUSY:
                return sd_bus_error_setf(error, BUS_ERROR("Unsafe"), "Failover of VM '%s' refused: %s",
                                         vm->cfg->name, why);
        case -ENODATA:
                return sd_bus_error_setf(error, BUS_ERROR("NoReplica"), "Failover of VM '%s' refused: %s",
                                         vm->cfg->name, why);
        default:
                return sd_bus_error_setf(error, BUS_ERROR("FailoverFailed"),
                                         "Failover of VM '%s' failed: %s", vm->cfg->name,
                                         why[0] ? why : strerror(-r));
        }
}

/* Planned maintenance of a standby: Maintenance(true) takes it down without the primary
 * suspending (told through the link), Maintenance(false) brings it back with a resync. */
static int method_maintenance(sd_bus_message *msg, void *userdata, sd_bus_error *error)
{
        Vm *vm = userdata;
        char why[256] = "";
        int on, r;

        r = check_privileged(msg, error);
        if (r < 0)
                return r;
        r = sd_bus_message_read(msg, "b", &on);
        if (r < 0)
                return r;
        r = vm_maintenance(vm, on, why, sizeof(why));
        bus_vm_check_changes(vm->manager, vm);
        if (r == -EALREADY)
                return sd_bus_error_setf(error, BUS_ERROR("AlreadyInState"), "%s", why);
        if (r == -EINVAL)
                return sd_bus_error_setf(error, BUS_ERROR("NotStandby"), "%s", why);
        if (r < 0)
                return sd_bus_error_setf(error, BUS_ERROR("MaintenanceFailed"), "Maintenance of VM '%s': %s",
                                         vm->cfg->name, why[0] ? why : strerror(-r));
        log_notice("VM %s: maintenance %s requested over D-Bus", vm->cfg->name, on ? "start" : "end");
        return sd_bus_reply_method_return(msg, "s", on ? "maintenance" : "standby");
}

static int method_attach(sd_bus_message *msg, void *userdata, sd_bus_error *error)
{
        Vm *vm = userdata;
        int r;

        r = check_privileged(msg, error);
        if (r < 0)
                return r;
        r = vm_attach(vm);
        /* Announce now: a Detach right after would otherwise hide this from the 200 ms poll. */
        bus_vm_check_changes(vm->manager, vm);
        if (r == -EALREADY)
                return sd_bus_error_setf(error, BUS_ERROR("AlreadyAttached"), "VM '%s' is already attached",
                                         vm->cfg->name);
        if (r < 0)
                return sd_bus_error_setf(error, BUS_ERROR("AttachFailed"), "Attaching VM '%s' failed: %s",
                                         vm->cfg->name, vm->error);
        /* A primary attaches on a worker: with its VMM listening, the answer waits for the outcome
         * (vm_attach_answer()); with none yet, it retries and the call returns now. */
        if (vm_attach_call(vm, msg) >= 0)
                return 1;
        return sd_bus_reply_method_return(msg, NULL);
}

static int method_detach(sd_bus_message *msg, void *userdata, sd_bus_error *error)
{
        Vm *vm = userdata;
        int r;

        r = check_privileged(msg, error);
        if (r < 0)
                return r;
        r = vm_detach(vm);
        bus_vm_check_changes(vm->manager, vm);
        if (r == -ENOTCONN)
                return sd_bus_error_setf(error, BUS_ERROR("NotAttached"), "VM '%s' is not attached",
                                         vm->cfg->name);
        if (r < 0)
                return r;
        return sd_bus_reply_method_return(msg, NULL);
}

/* The operator's way out of the split-brain guard: see primary_resume_unprotected(). */
static int method_resume(sd_bus_message *msg, void *userdata, sd_bus_error *error)
{
        Vm *vm = userdata;
        int r;

        r = check_privileged(msg, error);
        if (r < 0)
                return r;
        if (!vm->primary)
                return sd_bus_error_setf(error,
                                         vm->standby ? BUS_ERROR("NotPrimary") : BUS_ERROR("NotAttached"),
                                         "VM '%s' is not an attached primary", vm->cfg->name);
        r = primary_resume_unprotected(vm->primary);
        bus_vm_check_changes(vm->manager, vm);
        switch (r) {
        case 0:
                return sd_bus_reply_method_return(msg, NULL);
        case -EBUSY:
                return sd_bus_error_setf(error, BUS_ERROR("Protected"),
                                         "VM '%s' has a standby connected: its output follows the standby's "
                                         "acknowledgements, nothing to resume",
                                         vm->cfg->name);
        case -EALREADY:
                return sd_bus_error_setf(error, BUS_ERROR("Unprotected"), "VM '%s' already runs unprotected",
                                         vm->cfg->name);
        default:
                return sd_bus_error_setf(error, BUS_ERROR("NotAttached"),
                                         "VM '%s' is not attached to its VMM", vm->cfg->name);
        }
}

#define EMITS SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE

/*
 * Properties marked EMITS change with the VM's state and are announced by
 * PropertiesChanged (checked every 200 ms); counters change every epoch
 * and are read on demand (no signal, "EmitsChangedSignal" false).
 *
 * Failover(force) -> the role it becomes: "primary" (answered once the
 * guest runs on the replica, or an error naming why it does not; the
 * replica is then kept and the failover can be retried) or "standby"
 * (demoted). Maintenance(on) -> "maintenance" or "standby". CheckpointImage(dir, parent, compress) answers
 * once the image is written.
 */
static const sd_bus_vtable vm_vtable[] = {
        SD_BUS_VTABLE_START(0),
        SD_BUS_PROPERTY("Name", "s", property_get_name, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("ConfigPath", "s", property_get_config_path, 0, 0),
        SD_BUS_PROPERTY("Role", "s", property_get_role, 0, EMITS),
        SD_BUS_PROPERTY("ConfiguredRole", "s", property_get_configured_role, 0, 0),
        SD_BUS_PROPERTY("State", "s", property_get_state, 0, EMITS),
        SD_BUS_PROPERTY("Detail", "s", property_get_detail, 0, EMITS),
        SD_BUS_PROPERTY("Attached", "b", property_get_attached, 0, EMITS),
        SD_BUS_PROPERTY("Protected", "b", property_get_protected, 0, EMITS),
        SD_BUS_PROPERTY("Peer", "s", property_get_peer, 0, EMITS),
        SD_BUS_PROPERTY("LinkUp", "b", property_get_link_up, 0, EMITS),
        SD_BUS_PROPERTY("LastSealed", "t", property_get_last_sealed, 0, 0),
        SD_BUS_PROPERTY("LastCommitted", "t", property_get_last_committed, 0, 0),
        SD_BUS_PROPERTY("Lag", "t", property_get_lag, 0, 0),
        SD_BUS_PROPERTY("EpochsCommitted", "t", property_get_epochs_committed, 0, 0),
        SD_BUS_PROPERTY("FullSyncs", "t", property_get_full_syncs, 0, 0),
        SD_BUS_PROPERTY("IncrementalSyncs", "t", property_get_incremental_syncs, 0, 0),
        SD_BUS_PROPERTY("DirtyPagesPerSec", "d", property_get_dirty_rate, 0, 0),
        SD_BUS_PROPERTY("PagesLastEpoch", "t", property_get_pages_last_epoch, 0, 0),
        SD_BUS_PROPERTY("PauseNSecP50", "t", property_get_pause_p50, 0, 0),
        SD_BUS_PROPERTY("PauseNSecP99", "t", property_get_pause_p99, 0, 0),
        SD_BUS_PROPERTY("PauseNSecMax", "t", property_get_pause_max, 0, 0),
        SD_BUS_PROPERTY("VmPauseNSecP50", "t", property_get_vm_pause_p50, 0, 0),
        SD_BUS_PROPERTY("VmPauseNSecP99", "t", property_get_vm_pause_p99, 0, 0),
        SD_BUS_PROPERTY("VmPauseNSecMax", "t", property_get_vm_pause_max, 0, 0),
        SD_BUS_PROPERTY("BytesSent", "t", property_get_bytes_sent, 0, 0),
        SD_BUS_PROPERTY("BytesReceived", "t", property_get_bytes_received, 0, 0),
        SD_BUS_PROPERTY("InflightEpochs", "t", property_get_inflight, 0, 0),
        SD_BUS_PROPERTY("CompressionRatio", "d", property_get_compression_ratio, 0, 0),
        SD_BUS_PROPERTY("StagingBytes", "t", property_get_staging_bytes, 0, 0),
        SD_BUS_PROPERTY("EpochMSec", "u", property_get_epoch_ms, 0, 0),
        SD_BUS_PROPERTY("Tracking", "s", property_get_tracking, 0, 0),
        SD_BUS_PROPERTY("Compression", "s", property_get_compression, 0, 0),
        SD_BUS_PROPERTY("MaxInflightEpochs", "u", property_get_max_inflight, 0, 0),
        SD_BUS_PROPERTY("ControlSocket", "s", property_get_control_socket, 0, 0),
        SD_BUS_PROPERTY("ConfiguredPeer", "s", property_get_config_peer, 0, 0),
        SD_BUS_PROPERTY("ConfiguredListen", "s", property_get_config_listen, 0, 0),
        SD_BUS_PROPERTY("ServiceAddress", "s", property_get_service_address, 0, 0),
        SD_BUS_PROPERTY("ServiceAddressState", "s", property_get_service_address_state, 0, EMITS),
        SD_BUS_PROPERTY("FailoverPolicy", "s", property_get_failover_policy, 0, 0),
        SD_BUS_PROPERTY("Failovers", "t", property_get_failovers, 0, 0),
        SD_BUS_PROPERTY("SyncBytesDone", "t", property_get_sync_done, 0, 0),
        SD_BUS_PROPERTY("SyncBytesTotal", "t", property_get_sync_total, 0, 0),
        SD_BUS_PROPERTY("SyncUSec", "t", property_get_sync_elapsed, 0, 0),
        SD_BUS_PROPERTY("LastSyncUSec", "t", property_get_last_sync_usec, 0, 0),
        SD_BUS_METHOD_WITH_ARGS("Checkpoint", SD_BUS_NO_ARGS, SD_BUS_RESULT("t", epoch), method_checkpoint,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Attach", SD_BUS_NO_ARGS, SD_BUS_NO_RESULT, method_attach,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Detach", SD_BUS_NO_ARGS, SD_BUS_NO_RESULT, method_detach,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Resume", SD_BUS_NO_ARGS, SD_BUS_NO_RESULT, method_resume,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Failover", SD_BUS_ARGS("b", force), SD_BUS_RESULT("s", role),
                                method_failover, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Maintenance", SD_BUS_ARGS("b", on), SD_BUS_RESULT("s", state),
                                method_maintenance, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("CheckpointImage", SD_BUS_ARGS("s", dir, "s", parent, "b", compress),
                                SD_BUS_RESULT("t", epoch, "t", pages, "t", bytes, "t", pause_ns),
                                method_checkpoint_image, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_VTABLE_END,
};

/* ---------------------------------------------------------------------- */
/* Signals */

void bus_vm_added(Manager *m, Vm *vm)
{
        _cleanup_free_ char *path = NULL;

        if (!m->bus || vm_object_path(vm->cfg->name, &path) < 0)
                return;
        (void) sd_bus_emit_interfaces_added(m->bus, path, BUS_VM_IFACE, NULL);
}

void bus_vm_removed(Manager *m, const char *name)
{
        _cleanup_free_ char *path = NULL;

        if (!m->bus || vm_object_path(name, &path) < 0)
                return;
        (void) sd_bus_emit_interfaces_removed(m->bus, path, BUS_VM_IFACE, NULL);
}

static void copy_field(char *dst, size_t size, const char *src)
{
        snprintf(dst, size, "%s", src ? src : "");
}

void bus_vm_check_changes(Manager *m, Vm *vm)
{
        _cleanup_free_ char *path = NULL;
        VmAnnounced now = {.valid = true};
        VmAnnounced *a = &vm->announced;
        const char *changed[10];
        size_t n = 0;
        ReplStatus st;

        vm_get_status(vm, &st);
        copy_field(now.role, sizeof(now.role), st.role);
        copy_field(now.state, sizeof(now.state), st.state);
        copy_field(now.detail, sizeof(now.detail), st.detail);
        copy_field(now.peer, sizeof(now.peer), st.peer);
        now.link_up = st.link_up;
        now.attached = vm_is_attached(vm);
        (void) failover_service_address_state(vm->failover, now.address_state, sizeof(now.address_state));

        if (!a->valid || !streq(a->role, now.role)) {
                changed[n++] = "Role";
                if (a->valid && streq(a->role, "standby") && streq(now.role, "primary"))
                        log_event(LOG_NOTICE, DR_MESSAGE_FAILOVER, vm->cfg->name, st.last_committed,
                                  "VM %s: failed over: this host is now the primary, from the replica of "
                                  "epoch %" PRIu64,
                                  vm->cfg->name, st.last_committed);
        }
        if (!a->valid || !streq(a->state, now.state)) {
                changed[n++] = "State";
                changed[n++] = "Protected";
                /* One record per state change, with its kind: journalctl MESSAGE_ID=... finds them all. */
                log_event(streq(now.state, "failed")      ? LOG_ERR
                          : streq(now.state, "protected") ? LOG_INFO
                                                          : LOG_NOTICE,
                          journal_state_message_id(now.state), vm->cfg->name,
                          streq(now.role, "primary") ? st.last_sealed : st.last_committed,
                          "VM %s: %s %s%s%s", vm->cfg->name, now.role, now.state, now.detail[0] ? ": " : "",
                          now.detail);
        }
        if (!a->valid || !streq(a->detail, now.detail))
                changed[n++] = "Detail";
        if (!a->valid || !streq(a->peer, now.peer))
                changed[n++] = "Peer";
        if (!a->valid || a->link_up != now.link_up)
                changed[n++] = "LinkUp";
        if (!a->valid || a->attached != now.attached)
                changed[n++] = "Attached";
        if (!a->valid || !streq(a->address_state, now.address_state)) {
                changed[n++] = "ServiceAddressState";
                if (a->valid || !streq(now.address_state, "none"))
                        log_event(strstr(now.address_state, "failed") ? LOG_ERR : LOG_NOTICE,
                                  DR_MESSAGE_ADDRESS, vm->cfg->name, 0, "VM %s: service address %s",
                                  vm->cfg->name, now.address_state);
        }
        changed[n] = NULL;
        *a = now;
        if (n == 0 || !m->bus || vm_object_path(vm->cfg->name, &path) < 0)
                return;
        (void) sd_bus_emit_properties_changed_strv(m->bus, path, BUS_VM_IFACE, (char **) changed);
}

/* ---------------------------------------------------------------------- */
/* Connection */

static int on_bus_retry(sd_event_source *s, uint64_t usec, void *userdata)
{
        Manager *m = userdata;

        m->bus_retry = sd_event_source_disable_unref(m->bus_retry);
        if (bus_connect(m) < 0)
                (void) sd_event_add_time_relative(m->event, &m->bus_retry, CLOCK_MONOTONIC, BUS_RETRY_USEC,
                                                  0, on_bus_retry, m);
        return 0;
}

static int on_bus_disconnected(sd_bus_message *msg, void *userdata, sd_bus_error *error)
{
        Manager *m = userdata;

        /* Replication goes on without the bus; the API comes back when the bus does. */
        log_warning("Lost the D-Bus connection; VMs keep running, reconnecting every %llus",
                    BUS_RETRY_USEC / 1000000ULL);
        bus_close(m);
        (void) sd_event_add_time_relative(m->event, &m->bus_retry, CLOCK_MONOTONIC, BUS_RETRY_USEC, 0,
                                          on_bus_retry, m);
        return 0;
}

static int bus_connect(Manager *m)
{
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        int r;

        if (m->bus_address) {
                r = sd_bus_new(&bus);
                if (r < 0)
                        return log_error_errno(r, "Failed to allocate a bus: %m");
                r = sd_bus_set_address(bus, m->bus_address);
                if (r < 0)
                        return log_error_errno(r, "Invalid bus address '%s': %m", m->bus_address);
                (void) sd_bus_set_bus_client(bus, true);
                (void) sd_bus_set_trusted(bus, false);
                r = sd_bus_start(bus);
                if (r < 0)
                        return log_error_errno(r, "Failed to connect to the bus at %s: %m", m->bus_address);
        } else {
                r = sd_bus_open_system(&bus);
                if (r < 0)
                        return log_error_errno(r, "Failed to connect to the system bus: %m");
        }
        /* We reconnect ourselves; never let a lost bus end the event loop. */
        (void) sd_bus_set_exit_on_disconnect(bus, false);

        r = sd_bus_add_object_vtable(bus, NULL, BUS_MANAGER_PATH, BUS_MANAGER_IFACE, manager_vtable, m);
        if (r < 0)
                return log_error_errno(r, "Failed to register the manager object: %m");
        r = sd_bus_add_fallback_vtable(bus, NULL, BUS_VM_PREFIX, BUS_VM_IFACE, vm_vtable, vm_object_find, m);
        if (r < 0)
                return log_error_errno(r, "Failed to register the VM objects: %m");
        r = sd_bus_add_node_enumerator(bus, NULL, BUS_VM_PREFIX, vm_node_enumerator, m);
        if (r < 0)
                return log_error_errno(r, "Failed to register the VM enumerator: %m");
        r = sd_bus_add_object_manager(bus, NULL, BUS_MANAGER_PATH);
        if (r < 0)
                return log_error_errno(r, "Failed to register the object manager: %m");
        r = sd_bus_match_signal(bus, NULL, "org.freedesktop.DBus.Local", NULL, "org.freedesktop.DBus.Local",
                                "Disconnected", on_bus_disconnected, m);
        if (r < 0)
                return log_error_errno(r, "Failed to watch for the bus going away: %m");

        r = sd_bus_request_name(bus, BUS_NAME, 0);
        if (r == -EEXIST)
                return log_error_errno(r, "The bus name %s is taken: is another dirtyrepd running?",
                                       BUS_NAME);
        if (r < 0)
                return log_error_errno(r, "Failed to acquire the bus name %s (bus policy?): %m", BUS_NAME);
        r = sd_bus_attach_event(bus, m->event, SD_EVENT_PRIORITY_NORMAL);
        if (r < 0)
                return log_error_errno(r, "Failed to attach the bus to the event loop: %m");

        m->bus = TAKE_PTR(bus);
        log_info("D-Bus API: %s on %s", BUS_NAME, m->bus_address ? m->bus_address : "the system bus");
        /* Whatever a client saw before a reconnect is stale: announce everything again. */
        for (size_t i = 0; i < m->n_vms; i++)
                m->vms[i]->announced.valid = false;
        return 0;
}

int bus_open(Manager *m)
{
        return bus_connect(m);
}

void bus_close(Manager *m)
{
        m->bus_retry = sd_event_source_disable_unref(m->bus_retry);
        if (!m->bus)
                return;
        (void) sd_bus_detach_event(m->bus);
        m->bus = sd_bus_flush_close_unref(m->bus);
}

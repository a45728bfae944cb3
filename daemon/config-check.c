/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The dirtyrepd configuration's checks that are not parsing and need no
 * system (daemon/check.c has those that do): VmmArgs= against what failover
 * activation passes, what failover needs of a VM, the cross-file checks of
 * config_validate(), the paths dirtyrep.service's sandbox makes read-only,
 * and VmmType=qemu's VmmArgs= template. The parser is daemon/config.c; both
 * share daemon/config-internal.h.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config-internal.h"
#include "config.h"
#include "macros.h"

/* ---------------------------------------------------------------------- */
/* VmmArgs= against what failover activation passes */

/*
 * dirtyrep-vmm's options (vmm/ref/main.c, parse_argv(); the unit test
 * operator-check-config compares this table with `dirtyrep-vmm --help`).
 * getopt_long() takes any unambiguous prefix of a long option ("--mem" is
 * --memory), so the check below resolves VmmArgs= the same way. reason:
 * why activation cannot take it from VmmArgs=, NULL when it may.
 */
static const struct VmmOption {
        const char *name;
        char short_name; /* 0: none */
        bool has_arg;
        const char *reason;
} vmm_options[] = {
        {"help", 'h', false, "it prints the help and exits"},
        {"version", 0, false, "it prints the version and exits"},
        {"check", 0, false, "it only checks the arguments and exits"},
        {"kernel", 'k', true, "activation restores the replica (--restore), it boots no kernel"},
        {"append", 'a', true, "activation restores the replica (--restore), it boots no kernel"},
        {"memory", 'm', true, "the RAM size is the replica's"},
        {"cpus", 'c', true, "the vCPU count is the replica's"},
        {"name", 'n', true, "activation passes --name NAME itself"},
        {"uuid", 0, true, NULL},
        {"tracking", 0, true, NULL},
        {"ring-entries", 0, true, NULL},
        {"control", 0, true, "activation passes --control with ControlSocket="},
        {"console", 0, true, NULL},
        {"console-commit", 0, false, NULL},
        {"service-listen", 0, true, NULL},
        {"restore", 0, true, "activation passes --restore with the replica's state"},
        {"restore-image", 0, true, "activation restores the replica, not an image"},
        {"ram", 0, true, "activation passes the replica's RAM (--ram-fd)"},
        {"ram-fd", 0, true, "activation passes the replica's RAM (--ram-fd)"},
        {"ready-fd", 0, true, "activation passes --ready-fd itself"},
};

const char *const *config_vmm_option_names(size_t *ret_n)
{
        static const char *names[ELEMENTSOF(vmm_options)];

        for (size_t i = 0; i < ELEMENTSOF(vmm_options); i++)
                names[i] = vmm_options[i].name;
        *ret_n = ELEMENTSOF(vmm_options);
        return names;
}

/* The long option "--word" (without "--" and "=...") stands for, as getopt_long() resolves it:
 * an exact name, else the only option it is a prefix of. NULL: unknown or ambiguous. */
static const struct VmmOption *vmm_long_option(const char *word, size_t len)
{
        const struct VmmOption *found = NULL;
        size_t n = 0;

        for (size_t i = 0; i < ELEMENTSOF(vmm_options); i++) {
                if (strlen(vmm_options[i].name) == len && strncmp(vmm_options[i].name, word, len) == 0)
                        return &vmm_options[i];
                if (len > 0 && strncmp(vmm_options[i].name, word, len) == 0) {
                        found = &vmm_options[i];
                        n++;
                }
        }
        return n == 1 ? found : NULL;
}

int config_vmm_args_scan(char *const *args, size_t n_args, ConfigVmmArgFn fn, void *userdata)
{
        for (size_t i = 0; i < n_args; i++) {
                const char *a = args[i];
                const struct VmmOption *o = NULL;
                const char *value = NULL;
                int r;

                if (streq(a, "--"))
                        break;
                if (a[0] == '-' && a[1] == '-') {
                        const char *eq = strchr(a + 2, '=');
                        size_t len = eq ? (size_t) (eq - a - 2) : strlen(a + 2);

                        o = vmm_long_option(a + 2, len);
                        if (!o)
                                continue; /* unknown or ambiguous: the VMM's own check says so */
                        if (eq)
                                value = eq + 1;
                        else if (o->has_arg && i + 1 < n_args)
                                value = args[++i];
                } else if (a[0] == '-' && a[1]) {
                        /* A cluster of short options: "-m2G", "-hm 2G". */
                        for (const char *p = a + 1; *p && !o; p++)
                                for (size_t k = 0; k < ELEMENTSOF(vmm_options); k++)
                                        if (vmm_options[k].short_name == *p) {
                                                if (vmm_options[k].has_arg) {
                                                        o = &vmm_options[k];
                                                        value = p[1]             ? p + 1
                                                                : i + 1 < n_args ? args[++i]
                                                                                 : NULL;
                                                } else {
                                                        r = fn(&vmm_options[k].name[0], a,
                                                               vmm_options[k].reason, NULL, userdata);
                                                        if (r < 0)
                                                                return r;
                                                }
                                                break;
                                        }
                        if (!o)
                                continue;
                } else
                        continue;
                r = fn(o->name, a, o->reason, value, userdata);
                if (r < 0)
                        return r;
        }
        return 0;
}

typedef struct VmmConflicts {
        ErrorList *e;
        const char *path;
        unsigned line;
} VmmConflicts;

static int vmm_arg_conflict(const char *option, const char *as_written, const char *reason,
                            const char *value, void *userdata)
{
        VmmConflicts *c = userdata;
        char esc[ESCAPE_BUF_SIZE];

        if (!reason)
                return 0;
        if (strncmp(as_written, "--", 2) == 0 && strncmp(as_written + 2, option, strlen(option)) != 0)
                error_add(c->e, c->path, c->line,
                          "VmmArgs=: %s is read by the VMM as --%s, which must not be "
                          "set here: %s",
                          escape_value(as_written, esc, sizeof(esc)), option, reason);
        else
                error_add(c->e, c->path, c->line, "VmmArgs=: %s (--%s) must not be set here: %s",
                          escape_value(as_written, esc, sizeof(esc)), option, reason);
        return 0;
}

/*
 * What failover needs of a VM's configuration, checked for both roles (a
 * primary becomes a standby at demotion and a primary again at the next
 * failover): a standby that fails over by itself needs the Peer= it will
 * then replicate to (without it, vm_promote() refuses at the worst moment),
 * and VmmArgs= must not set what activation passes.
 */
void check_failover_needs(const VmConfig *v, ErrorList *e, const char *path, unsigned policy_line,
                          unsigned args_line)
{
        VmmConflicts c = {.e = e, .path = path, .line = args_line};

        if (v->role == VM_ROLE_STANDBY && v->failover_policy == FAILOVER_POLICY_AUTO && v->peer.len == 0)
                error_add(
                        e, path, policy_line,
                        "FailoverPolicy=auto requires Peer=ADDRESS:PORT: after a failover this host is the "
                        "primary and replicates to the old primary's host (set Peer= to its Listen=)");
        /* dirtyrep-vmm's options, read as its getopt reads them; QEMU's command line is a template
         * checked by config_qemu_args_problem() instead. */
        if (v->vmm_type != VMM_TYPE_QEMU)
                (void) config_vmm_args_scan(v->vmm_args, v->n_vmm_args, vmm_arg_conflict, &c);
}

/* ---------------------------------------------------------------------- */
/* Cross-file checks */

static bool address_is_wildcard(const ConfigAddress *a)
{
        if (a->sa.ss_family == AF_INET)
                return ((const struct sockaddr_in *) &a->sa)->sin_addr.s_addr == htonl(INADDR_ANY);
        return IN6_IS_ADDR_UNSPECIFIED(&((const struct sockaddr_in6 *) &a->sa)->sin6_addr);
}

static uint16_t address_port(const ConfigAddress *a)
{
        if (a->sa.ss_family == AF_INET)
                return ntohs(((const struct sockaddr_in *) &a->sa)->sin_port);
        return ntohs(((const struct sockaddr_in6 *) &a->sa)->sin6_port);
}

/*
 * Whether two listeners would collide at bind(): same port (port 0 picks a
 * free one, never collides) and the same address, or a wildcard that covers
 * the other. "[::]" covers IPv4 too, as sockets are dual-stack by default.
 */
static bool listeners_collide(const ConfigAddress *a, const ConfigAddress *b)
{
        uint16_t pa = address_port(a), pb = address_port(b);

        if (pa == 0 || pa != pb)
                return false;
        if (a->sa.ss_family == b->sa.ss_family) {
                if (address_is_wildcard(a) || address_is_wildcard(b))
                        return true;
                if (a->sa.ss_family == AF_INET)
                        return ((const struct sockaddr_in *) &a->sa)->sin_addr.s_addr ==
                               ((const struct sockaddr_in *) &b->sa)->sin_addr.s_addr;
                return IN6_ARE_ADDR_EQUAL(&((const struct sockaddr_in6 *) &a->sa)->sin6_addr,
                                          &((const struct sockaddr_in6 *) &b->sa)->sin6_addr);
        }
        return (a->sa.ss_family == AF_INET6 && address_is_wildcard(a)) ||
               (b->sa.ss_family == AF_INET6 && address_is_wildcard(b));
}

static bool cidr_same_address(const ConfigCidr *a, const ConfigCidr *b)
{
        if (a->family == AF_UNSPEC || a->family != b->family)
                return false;
        if (a->family == AF_INET)
                return a->addr.in.s_addr == b->addr.in.s_addr;
        return IN6_ARE_ADDR_EQUAL(&a->addr.in6, &b->addr.in6);
}

void validate_into(const Config *c, ErrorList *e)
{
        const DaemonConfig *d = c->daemon;

        for (size_t i = 0; i < c->n_vms; i++) {
                const VmConfig *v = c->vms[i];

                if (d && d->listen_address.len > 0 && v->listen.len > 0 &&
                    listeners_collide(&v->listen, &d->listen_address))
                        error_add(e, v->path, 0, "Listen=%s collides with ListenAddress=%s of %s",
                                  v->listen.text, d->listen_address.text, d->path ? d->path : "the daemon");

                for (size_t j = 0; j < i; j++) {
                        const VmConfig *w = c->vms[j];

                        if (v->listen.len > 0 && w->listen.len > 0 &&
                            listeners_collide(&v->listen, &w->listen))
                                error_add(e, v->path, 0, "Listen=%s collides with Listen=%s of VM %s (%s)",
                                          v->listen.text, w->listen.text, w->name, w->path);
                        if (v->control_socket && w->control_socket &&
                            streq(v->control_socket, w->control_socket))
                                error_add(e, v->path, 0, "ControlSocket=%s is also used by VM %s (%s)",
                                          v->control_socket, w->name, w->path);
                        if (cidr_same_address(&v->service_address, &w->service_address))
                                error_add(e, v->path, 0, "ServiceAddress= is also used by VM %s (%s)",
                                          w->name, w->path);
                        if (streq(v->name, w->name))
                                error_add(e, v->path, 0, "VM name %s is also used by %s", v->name, w->path);
                }
        }
}

int config_validate(const Config *c, char **ret_errors)
{
        ErrorList e = {};

        validate_into(c, &e);
        error_file_done(&e, "cross-file checks");
        if (e.any)
                return error_list_finish(&e, -EINVAL, ret_errors);
        error_list_done(&e);
        return 0;
}

/* ---------------------------------------------------------------------- */
/* Paths the service's sandbox makes read-only */

const char *const config_sandbox_writable[] = {DEFAULT_RUNTIME_DIRECTORY, DEFAULT_STATE_DIRECTORY, NULL};
static const char *const sandbox_private[] = {"/tmp", "/var/tmp", NULL};

static bool path_is_under(const char *path, const char *dir)
{
        size_t n = strlen(dir);
        return strncmp(path, dir, n) == 0 && (path[n] == 0 || path[n] == '/');
}

typedef struct SandboxCheck {
        ErrorList *e;
        const VmConfig *v;
} SandboxCheck;

static void sandbox_check_path(ErrorList *e, const char *origin, const char *what, const char *path)
{
        char esc[ESCAPE_BUF_SIZE], list[256];
        size_t o = 0;

        if (!path || path[0] != '/')
                return;
        for (size_t i = 0; config_sandbox_writable[i]; i++)
                if (path_is_under(path, config_sandbox_writable[i]))
                        return;
        for (size_t i = 0; config_sandbox_writable[i] && o < sizeof(list); i++)
                o += (size_t) snprintf(list + o, sizeof(list) - o, "%s%s", i ? ", " : "",
                                       config_sandbox_writable[i]);
        for (size_t i = 0; sandbox_private[i]; i++)
                if (path_is_under(path, sandbox_private[i])) {
                        error_add(e, origin, 0,
                                  "%s %s is in the service's private %s (PrivateTmp=yes): nobody outside "
                                  "dirtyrep.service sees it; use a path under %s",
                                  what, escape_value(path, esc, sizeof(esc)), sandbox_private[i], list);
                        return;
                }
        error_add(e, origin, 0,
                  "%s %s is read-only for dirtyrep.service (ProtectSystem=strict; writable: %s); move it "
                  "there, or add ReadWritePaths= for it in a drop-in (systemctl edit dirtyrep)",
                  what, escape_value(path, esc, sizeof(esc)), list);
}

static int sandbox_vmm_arg(const char *option, const char *as_written, const char *reason, const char *value,
                           void *userdata)
{
        SandboxCheck *c = userdata;
        char what[96];

        if (!streq(option, "console") || !value || streq(value, "-"))
                return 0;
        snprintf(what, sizeof(what), "VmmArgs= console file (%s)", as_written);
        sandbox_check_path(c->e, c->v->path, what, value);
        return 0;
}

int config_check_sandbox_path(const char *what, const char *path, char **ret_error)
{
        ErrorList e = {};

        sandbox_check_path(&e, "dirtyrep.service", what, path);
        if (e.any)
                return error_list_finish(&e, -EROFS, ret_error);
        error_list_done(&e);
        return 0;
}

int config_check_sandbox(const Config *c, char **ret_errors)
{
        ErrorList e = {};

        if (c->daemon) {
                const char *origin = c->daemon->path ? c->daemon->path : "defaults";
                sandbox_check_path(&e, origin, "StateDirectory=", c->daemon->state_directory);
                sandbox_check_path(&e, origin, "RuntimeDirectory=", c->daemon->runtime_directory);
                if (c->daemon->image_directory) /* unset: below StateDirectory=, checked above */
                        sandbox_check_path(&e, origin, "ImageDirectory=", c->daemon->image_directory);
        }
        for (size_t i = 0; i < c->n_vms; i++) {
                const VmConfig *v = c->vms[i];
                SandboxCheck sc = {.e = &e, .v = v};

                /* The VMM that failover starts creates its socket there, inside the sandbox. */
                if (v->control_socket) {
                        _cleanup_free_ char *dir = strdup(v->control_socket);
                        char *slash;
                        if (!dir)
                                return error_list_finish(&e, -ENOMEM, ret_errors);
                        slash = strrchr(dir, '/');
                        if (slash)
                                *(slash == dir ? slash + 1 : slash) = 0;
                        sandbox_check_path(&e, v->path, "ControlSocket= directory", dir);
                }
                (void) config_vmm_args_scan(v->vmm_args, v->n_vmm_args, sandbox_vmm_arg, &sc);
        }
        error_file_done(&e, "sandbox checks (dirtyrep.service)");
        if (e.any)
                return error_list_finish(&e, -EINVAL, ret_errors);
        error_list_done(&e);
        return 0;
}

/* ---------------------------------------------------------------------- */
/* VmmType=qemu: the VmmArgs= template */

const char *config_qemu_args_problem(const VmConfig *v, char *buf, size_t size)
{
        static const VmmArgValues probe = {};
        static const char *const names[] = {"%r (the replica's RAM)", "%s (the saved state)",
                                            "%f (the ready fd)", "%c (the control socket)"};
        unsigned seen = 0;

        for (size_t i = 0; i < v->n_vmm_args; i++) {
                _cleanup_free_ char *x = NULL;
                char bad = 0;
                int r = vmm_arg_expand(v->vmm_args[i], &probe, &x, &bad, &seen);

                if (r == -EINVAL) {
                        snprintf(buf, size,
                                 "unknown placeholder %%%c in VmmArgs= (%%r %%s %%f %%c %%n %%%%)", bad);
                        return buf;
                }
                if (r < 0) {
                        snprintf(buf, size, "out of memory");
                        return buf;
                }
        }
        for (unsigned i = 0; i < ELEMENTSOF(names); i++)
                if (!(seen & (1u << i))) {
                        snprintf(buf, size, "VmmArgs= lacks %s, which failover fills in", names[i]);
                        return buf;
                }
        return NULL;
}

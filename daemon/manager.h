/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * dirtyrepd's manager: the VMs the daemon serves, each with its role,
 * loaded from the configuration files plus the command line, reloaded in
 * place, attached and detached on request. The D-Bus API (bus.c), the
 * debug socket and the sd_notify status (main.c) are views of it.
 *
 * Everything here runs on the one sd-event loop.
 */

#include <stdbool.h>
#include <systemd/sd-bus.h>
#include <systemd/sd-event.h>

#include "config.h"
#include "failover.h"
#include "macros.h"
#include "role.h"

#define MANAGER_CLI_SETTINGS_MAX 64U /* Key=Value settings per --vm on the command line */

typedef struct Manager Manager;

/* What the bus last announced for a VM: PropertiesChanged goes out when this changes. */
typedef struct VmAnnounced {
        bool valid;
        char role[16];
        char state[32];
        char detail[256];
        char peer[80];
        bool link_up;
        bool attached;
        char address_state[128];
} VmAnnounced;

typedef struct Vm {
        Manager *manager;
        VmConfig *cfg;        /* owned */
        DaemonConfig *daemon; /* owned copy: the role borrows it for its whole life */
        Primary *primary;
        Standby *standby;
        bool detached;   /* by Detach(): no role runs until Attach() */
        char error[256]; /* set when setting the role up failed */
        VmAnnounced announced;
        /* Role switching (failover.h): fence, activation, service address. */
        Failover *failover;
        sd_event_source *promote_defer; /* a promotion asked for from inside a callback */
        bool promote_force;
        bool promoting;         /* fence or activation running */
        uint64_t promote_epoch; /* the replica's epoch being activated */
        uint64_t promote_start_usec;
        /* The primary came back suspended (the VMM says so): another host may hold the
         * service address; it is added only once the suspension ends (status timer). */
        bool service_address_deferred;
        /* The VMM listened when the primary started: its attach (on a worker, see
         * on_primary_attached()) decides whether the address goes up. */
        bool address_waits_attach;
        sd_event_source *attach_failed_defer; /* frees a primary whose attach failed for good */
        sd_bus_message *attach_call;          /* an Attach() call, answered when that attach ends */
        uint64_t failovers; /* promotions that got the guest running here, since the Vm was created */
        sd_bus_message *failover_call; /* a Failover() call, answered when the promotion ends */
        /* The replica while no Standby holds it: during an activation (until the guest
         * runs), planned maintenance, a reload's restart of the role. Never dropped: a
         * Vm freed with it saves it to StateDirectory/NAME.replica. */
        StandbyReplica *kept;
        bool maintenance;       /* standby role down on request (dirtyrepctl maintenance) */
        bool promoted;          /* primary here since a failover: StateDirectory/NAME.role */
        uint64_t promoted_from; /* the replica's epoch it started from */
        bool promoted_synced;   /* a standby has acked an epoch of it since (persisted too) */
        char vmm_unit[128];     /* the failover VMM's own systemd unit, or "" */
        pid_t vmm_pid;          /* that VMM's pid and start time (/proc/PID/stat), persisted too: */
        uint64_t vmm_start;     /* a restarted daemon tells a live VMM from a reused pid */
} Vm;

/* One --vm NAME block of the command line: settings as "Key=Value". */
typedef struct CliVm {
        char *name;
        char *settings[MANAGER_CLI_SETTINGS_MAX];
        size_t n_settings;
} CliVm;

struct Manager {
        sd_event *event;
        DaemonConfig *daemon; /* the current one (LogLevel=, ...) */
        Vm **vms;             /* sorted by name */
        size_t n_vms;

        /* Where the configuration comes from; NULL path or dir: not read. */
        const char *config_path;
        const char *config_dir;
        CliVm *cli_vms;
        size_t n_cli_vms;

        sd_bus *bus;
        char *bus_address; /* NULL: the system bus */
        bool bus_required;
        sd_event_source *bus_retry;
        sd_event_source *status_timer;
        unsigned status_ticks;
        char last_notify_status[512];
};

/*
 * Loads the configuration: the files, then every --vm block of the command
 * line, then the cross-checks. Returns 0 and a Config the caller owns, or a
 * negative errno and the errors (as config_load()).
 */
int manager_load_config(Manager *m, Config **ret, char **ret_errors);

/* Takes the VMs of c (c keeps its daemon section, ownership of VMs moves) and starts their roles. */
int manager_start(Manager *m, Config *c);

/*
 * Re-reads the configuration. A VM whose configuration (and the daemon
 * settings its role uses) did not change is left alone, running or
 * detached as it is; a removed VM is stopped; a changed VM is stopped and
 * started with its new configuration; a new VM is started. An invalid
 * configuration changes nothing: -EINVAL and the errors.
 */
int manager_reload(Manager *m, unsigned *ret_added, unsigned *ret_removed, unsigned *ret_changed,
                   unsigned *ret_unchanged, char **ret_errors);

void manager_done(Manager *m);

Vm *manager_find_vm(Manager *m, const char *name);

/* The VM's status; a detached or failed VM gets role from its config and state "detached" / "failed". */
void vm_get_status(Vm *vm, ReplStatus *ret);
bool vm_is_attached(Vm *vm);

/* Starts the VM's role. -EALREADY when it runs; otherwise 0, or the setup error (also in vm->error). */
int vm_attach(Vm *vm);
/* Stops the VM's role. -ENOTCONN when none runs. */
int vm_detach(Vm *vm);

/*
 * Standby -> primary: checks, then the fence command (unless force) and the
 * activation of the VMM on the replica run asynchronously; the status says
 * how far it got. why gets a reason on error (-EINVAL not a standby, -EBUSY
 * primary still connected or a promotion running, -ENODATA no replica).
 */
int vm_promote(Vm *vm, bool force, char *why, size_t why_size);
/* Keeps a D-Bus Failover() call (referenced) to answer once the promotion vm_promote() started
 * ends: the guest runs, or the real error. -EBUSY when one is kept already. */
int vm_promote_call(Vm *vm, sd_bus_message *call);
/* Keeps a D-Bus Attach() call (referenced) to answer once the primary's attach, which runs on a
 * worker, ends: attached, or why not. -EALREADY when there is nothing to wait for (a standby, or
 * a primary whose VMM did not listen yet and which retries): answer at once. */
int vm_attach_call(Vm *vm, sd_bus_message *call);
/* Primary -> standby: stops the VMM dirtyrepd started, drops the service address, listens. */
int vm_demote(Vm *vm, char *why, size_t why_size);

/*
 * Planned maintenance of a standby (on): the primary is told through the link that
 * this standby goes away and will not promote (it runs on unprotected instead of
 * holding output), the role stops, the replica is kept (stale until resynced) and
 * the state persists across a daemon restart. off: listens again, the primary
 * resyncs. -EALREADY (already so), -EINVAL (a primary: run it on the standby host).
 */
int vm_maintenance(Vm *vm, bool on, char *why, size_t why_size);

/* Seals an epoch now. -EMEDIUMTYPE for a standby, -ENOTCONN/-EBUSY/... from primary_checkpoint(). */
int vm_checkpoint(Vm *vm, uint64_t *ret_epoch);

/* Starts the 200 ms status timer: PropertiesChanged on the bus, STATUS= to the service manager. */
int manager_start_status_timer(Manager *m);

/* The STATUS= text for the service manager. */
void manager_format_status(Manager *m, char *buf, size_t size);

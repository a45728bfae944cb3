/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * What a host does to become (or stop being) a VM's primary, apart from the
 * replication roles themselves (role.h): run the fence command, start the
 * VMM on the standby's replica, own that VMM process, and hold the service
 * address. main.c sequences it; see docs/architecture.md "Failover".
 *
 * Everything is asynchronous on the caller's sd-event loop: child processes
 * are watched through pidfds, their output is read from pipes and logged,
 * and results come back through FailoverCallbacks (never from inside a
 * failover_*() call).
 */

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <systemd/sd-event.h>

#include "config.h"
#include "macros.h"

#define FENCE_TIMEOUT_USEC (30 * USEC_PER_SEC)
#define FENCE_OUTPUT_MAX   4096u /* bytes of the fence command's output that are logged */

typedef struct Failover Failover;

typedef struct FailoverCallbacks {
        /* The fence command finished: 0 when it exited 0, else a negative errno
         * (-ETIMEDOUT: killed after FENCE_TIMEOUT_USEC; -EPROTO: non-zero exit
         * or a signal) and a one-line reason. */
        void (*fenced)(Failover *f, int result, const char *reason, void *userdata);
        /* The VMM started by failover_activate() runs the guest (its --ready-fd fired). */
        void (*vmm_ready)(Failover *f, void *userdata);
        /* That VMM exited (status as from waitid(): CLD_EXITED/KILLED/DUMPED and code). */
        void (*vmm_exited)(Failover *f, int code, int status, void *userdata);
} FailoverCallbacks;

int failover_new(sd_event *e, const DaemonConfig *d, const VmConfig *vm, const FailoverCallbacks *cb,
                 void *userdata, Failover **ret);
/* Stops (SIGTERM, then SIGKILL after 2 s) a VMM it started and a running fence command. */
Failover *failover_free(Failover *f);
DEFINE_TRIVIAL_CLEANUP_FUNC(Failover *, failover_free);

/* Starts FenceCommand= (with DIRTYREP_VM=NAME in its environment); ->fenced() follows.
 * No FenceCommand=: ->fenced(0) on the next loop iteration. -EBUSY while one runs. */
int failover_fence(Failover *f);
bool failover_fencing(Failover *f);

/*
 * Starts Vmm= VmmArgs= --name NAME --control CONTROLSOCKET --restore STATE
 * --ram-fd N --ready-fd M (plus --console-commit with ConsoleCommit=yes):
 * the replica memfd ram_fd (taken, also on error) is the guest's RAM in
 * place; state (copied) goes to a memfd passed as /proc/self/fd/4.
 * ->vmm_ready() when the guest runs, ->vmm_exited() when the VMM exits.
 * -EBUSY when a VMM of ours is still running.
 */
int failover_activate(Failover *f, int ram_fd, const uint8_t *state, size_t state_len, uint64_t epoch);
/* The PID of the VMM we started, or 0. */
pid_t failover_vmm_pid(Failover *f);
/* Stops our VMM: SIGTERM, SIGKILL after 2 s; waits (bounded) for it. */
void failover_stop_vmm(Failover *f);

/* The VMM's output since its last start (the last lines that fit, "; "-joined): the reason
 * a start failed. Empty when there is none. */
void failover_vmm_output(Failover *f, char *buf, size_t size);
/* Stops watching our VMM without stopping it: it lives on in a unit of its own. */
void failover_forget_vmm(Failover *f);
/* Hands our VMM (and its watch) over to another Failover of the same VM (a reload). */
int failover_move_vmm(Failover *to, Failover *from);

/* Takes (up) or gives up (!up) ServiceAddress= on ServiceInterface=; logs.
 * 0 when not configured. */
int failover_service_address(Failover *f, bool up);
/* The service address as the operator sees it: "none" (not configured), "held", "released",
 * or "takeover failed: ERROR" / "release failed: ERROR" (the last attempt). Returns buf. */
const char *failover_service_address_state(Failover *f, char *buf, size_t size);

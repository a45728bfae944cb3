/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The split-brain guard (output side) and how the epoch thread stops the
 * VMM. The loop decides the guard's state (link callbacks, its timer, the
 * operator); the epoch thread applies it to the VM (it owns the VmmLink).
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "primary-internal.h"
#include "util.h"

static void stop_tracking_logged(Epoch *e, bool hold)
{
        int r = hold ? vmm_link_stop_tracking_hold(e->vmm) : vmm_link_stop_tracking(e->vmm);

        /* A VMM that is gone needs no StopTracking (and its agent holds, were it alive). */
        if (r < 0 && r != -ECONNRESET && r != -EPIPE && r != -ENOTCONN && r != -ESHUTDOWN)
                log_error_errno(r, "VM %s: StopTracking failed: %s", e->p->vm->name,
                                vmm_link_last_error(e->vmm));
}

/*
 * Every way this primary stops (daemon stop or restart, a reload that changes
 * or removes the VM, Detach, an error of the epoch thread) ends here, on the
 * epoch thread, which owns the VmmLink. What the standby acknowledged is
 * released; nothing else is: held output of unacknowledged epochs (and of the
 * running one) stays held in the agent, and so does what the VM sends until
 * the next dirtyrepd's first release, because the standby may fail over from
 * its last committed epoch at any time (even during the next session's full
 * sync). A VM suspended by the split-brain guard stays suspended: another
 * host may be serving it. Only a VM whose output already flows by decision
 * (SplitBrainPolicy=continue, `dirtyrepctl resume`, OutputCommit=no) gives
 * its held output up. A crash does the same without us: the agent keeps
 * output held and a suspended VM paused.
 */
void epoch_stop_vmm(Epoch *e, int loop_result)
{
        Primary *p = e->p;
        uint64_t acked;
        Guard g;
        int r;

        if (!e->vmm)
                return;
        /* Release what the standby committed, including ACKs that arrived while stopping.
         * Not after an error: the VmmLink may be what failed, and whatever stays held
         * is released by the next session's first commit anyway. */
        if (loop_result >= 0 || loop_result == -ECANCELED)
                (void) epoch_handle_acks(e);
        pthread_mutex_lock(&p->mutex);
        g = p->guard;
        pthread_mutex_unlock(&p->mutex);
        acked = e->released;

        if (g == GUARD_SUSPENDED && !e->suspended) {
                r = vmm_link_suspend(e->vmm, PAUSE_TIMEOUT_MS);
                if (r < 0 && r != -ETIMEDOUT)
                        log_error_errno(r, "VM %s: suspending the VM before stopping failed: %s",
                                        p->vm->name, vmm_link_last_error(e->vmm));
                else
                        e->suspended = true;
        }
        if (e->suspended || g == GUARD_SUSPENDED) {
                stop_tracking_logged(e, true);
                log_warning("VM %s: stopping replication of a SUSPENDED VM: it stays paused with its output "
                            "held "
                            "until a dirtyrepd resyncs it with a standby or `dirtyrepctl resume %s` runs it "
                            "unprotected",
                            p->vm->name, p->vm->name);
                return;
        }
        if (g == GUARD_UNPROTECTED || !p->vm->output_commit) {
                /* Output flows already: nothing held is waiting for the standby. */
                stop_tracking_logged(e, false);
                return;
        }
        /* On failure too the agent keeps output held (as for a client that vanished). */
        stop_tracking_logged(e, true);
        if (loop_result < 0 && loop_result != -ECANCELED)
                log_error("VM %s: replication stopped on an error; the VM runs on, its output after epoch "
                          "%" PRIu64 " stays held in the VMM until a new session's standby commits: "
                          "`dirtyrepctl detach %s` "
                          "and `dirtyrepctl attach %s` start one",
                          p->vm->name, acked, p->vm->name, p->vm->name);
        else
                log_notice("VM %s: replication stopped with the standby at epoch %" PRIu64 " of %" PRIu64
                           ": the VM runs on, its output from later epochs stays held in the VMM until "
                           "dirtyrepd "
                           "attaches and a standby commits (to run it unprotected instead: `dirtyrepctl "
                           "resume %s` before a "
                           "stop)",
                           p->vm->name, acked, e->cur, p->vm->name);
}

/*
 * The split-brain guard and OutputCommit=no, on the epoch thread (it owns
 * the VmmLink). Unprotected: release everything held, every pass of the
 * loop (at most a millisecond apart, see epoch_next_timeout_ms()), so
 * output is not delayed by more than that. Suspended: the VM stays paused
 * until the guard lifts; *frozen makes the loop skip seals meanwhile.
 */
int epoch_guard_apply(Epoch *e, bool *frozen)
{
        Primary *p = e->p;
        Guard g;
        int r;

        pthread_mutex_lock(&p->mutex);
        g = p->guard;
        pthread_mutex_unlock(&p->mutex);

        if (g == GUARD_SUSPENDED && !e->suspended && !*frozen) {
                /* Pause{suspend}: the agent keeps the VM paused even if this daemon
                 * stops or dies, and tells the next one (HelloReply.suspended). */
                r = vmm_link_suspend(e->vmm, PAUSE_TIMEOUT_MS);
                if (r < 0)
                        return log_error_errno(r, "VM %s: PAUSE for the split-brain policy failed: %s",
                                               p->vm->name, vmm_link_last_error(e->vmm));
                e->suspended = true;
                pthread_mutex_lock(&p->mutex);
                p->suspended = true;
                pthread_mutex_unlock(&p->mutex);
                log_error("VM %s: VM suspended (SplitBrainPolicy=suspend): its output stays held until a "
                          "standby resyncs",
                          p->vm->name);
        } else if (g != GUARD_SUSPENDED && e->suspended) {
                r = vmm_link_unsuspend(e->vmm, e->cur);
                if (r < 0)
                        return log_error_errno(r, "VM %s: RESUME after suspension failed: %s", p->vm->name,
                                               vmm_link_last_error(e->vmm));
                e->suspended = false;
                e->epoch_start_us = now_usec();
                pthread_mutex_lock(&p->mutex);
                p->suspended = false;
                pthread_mutex_unlock(&p->mutex);
                if (g == GUARD_UNPROTECTED)
                        log_warning("VM %s: VM resumed by the operator: it runs UNPROTECTED", p->vm->name);
                else
                        log_notice("VM %s: VM resumed: a standby is connected", p->vm->name);
        }
        if (e->suspended)
                *frozen = true;

        if (g == GUARD_UNPROTECTED || !p->vm->output_commit) {
                r = vmm_link_release_output(e->vmm, e->cur, NULL);
                if (r < 0)
                        return log_error_errno(r, "VM %s: ReleaseOutput(%" PRIu64 ") failed: %s",
                                               p->vm->name, e->cur, vmm_link_last_error(e->vmm));
                e->released = MAX(e->released, e->cur);
        }
        return 0;
}

static int on_split_timer(sd_event_source *s, uint64_t usec, void *userdata)
{
        Primary *p = userdata;
        bool cont = p->vm->split_brain_policy == SPLIT_BRAIN_POLICY_CONTINUE;

        p->split_timer = sd_event_source_disable_unref(p->split_timer);
        pthread_mutex_lock(&p->mutex);
        if (p->guard != GUARD_HOLDING) {
                pthread_mutex_unlock(&p->mutex);
                return 0;
        }
        p->guard = cont ? GUARD_UNPROTECTED : GUARD_SUSPENDED;
        snprintf(p->detail, sizeof(p->detail),
                 cont ? "standby lost for %" PRIu32 " ms: running UNPROTECTED (SplitBrainPolicy=continue)"
                      : "standby lost for %" PRIu32 " ms: VM suspended (SplitBrainPolicy=suspend)",
                 p->vm->split_brain_timeout_ms);
        pthread_mutex_unlock(&p->mutex);
        if (cont)
                log_error("VM %s: standby lost for %" PRIu32
                          " ms: the VM now runs UNPROTECTED and releases its output; a failover now would "
                          "lose what it did since epoch %" PRIu64
                          ", and a promoted standby would mean split brain",
                          p->vm->name, p->vm->split_brain_timeout_ms,
                          atomic_load_explicit(&p->acked, memory_order_relaxed));
        else
                log_error("VM %s: standby lost for %" PRIu32
                          " ms: suspending the VM (SplitBrainPolicy=suspend)",
                          p->vm->name, p->vm->split_brain_timeout_ms);
        wake(p->wake_fd);
        return 0;
}

/* Standby lost: hold output, and apply the policy after SplitBrainTimeoutMs=. */
void primary_guard_arm(Primary *p)
{
        int r;

        log_warning("VM %s: standby lost: output held; SplitBrainPolicy=%s applies in %" PRIu32 " ms",
                    p->vm->name, split_brain_policy_to_string(p->vm->split_brain_policy),
                    p->vm->split_brain_timeout_ms);
        p->split_timer = sd_event_source_disable_unref(p->split_timer);
        r = sd_event_add_time_relative(p->event, &p->split_timer, CLOCK_MONOTONIC,
                                       (uint64_t) p->vm->split_brain_timeout_ms * USEC_PER_MSEC, 1000,
                                       on_split_timer, p);
        if (r < 0) {
                /* Cannot time it: the safe side is to keep holding (as with no policy). */
                log_error_errno(r, "VM %s: cannot arm the split-brain timer, output stays held: %m",
                                p->vm->name);
        }
}

bool primary_suspended(Primary *p)
{
        bool r;

        pthread_mutex_lock(&p->mutex);
        r = p->guard == GUARD_SUSPENDED;
        pthread_mutex_unlock(&p->mutex);
        return r;
}

int primary_resume_unprotected(Primary *p)
{
        Guard was;

        pthread_mutex_lock(&p->mutex);
        if (p->failed || !p->attached) {
                pthread_mutex_unlock(&p->mutex);
                return -ENOTCONN;
        }
        was = p->guard;
        if (was == GUARD_UNPROTECTED) {
                pthread_mutex_unlock(&p->mutex);
                return -EALREADY;
        }
        if (was == GUARD_NONE && p->link_up) {
                /* Protected (or syncing): output follows the standby's ACKs. */
                pthread_mutex_unlock(&p->mutex);
                return -EBUSY;
        }
        p->guard = GUARD_UNPROTECTED;
        snprintf(p->detail, sizeof(p->detail),
                 "resumed by the operator: running UNPROTECTED until a standby at %s syncs",
                 p->vm->peer.text);
        pthread_mutex_unlock(&p->mutex);
        p->split_timer = sd_event_source_disable_unref(p->split_timer);
        log_error("VM %s: the operator resumed the VM (was %s): held output is released and the VM runs "
                  "UNPROTECTED; if another host serves this VM now, both answer clients",
                  p->vm->name,
                  was == GUARD_SUSPENDED ? "suspended"
                  : was == GUARD_HOLDING ? "holding output"
                                         : "waiting for a standby");
        wake(p->wake_fd);
        return 0;
}

void primary_set_promoted(Primary *p, uint64_t from_epoch)
{
        pthread_mutex_lock(&p->mutex);
        p->promoted = true;
        p->promoted_from = from_epoch;
        p->guard = GUARD_UNPROTECTED;
        pthread_mutex_unlock(&p->mutex);
}

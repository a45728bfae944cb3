/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Attaching to the VMM: open and check its control socket, set up tracking,
 * build the Hello the standby will check, start the epoch thread, then
 * connect to the standby. Retries every ATTACH_RETRY_USEC while the VMM is
 * not there.
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

/* ---- the loop side: attach ------------------------------------------------------------- */

static int build_hello(Primary *p, const VmmLayout *lay)
{
        free(p->regions);
        free(p->region_ptrs);
        p->regions = calloc(MAX(lay->n_regions, 1u), sizeof(*p->regions));
        p->region_ptrs = calloc(MAX(lay->n_regions, 1u), sizeof(*p->region_ptrs));
        if (!p->regions || !p->region_ptrs)
                return -ENOMEM;
        for (size_t i = 0; i < lay->n_regions; i++) {
                p->regions[i] = (Dr__Repl__MemRegion) DR__REPL__MEM_REGION__INIT;
                p->regions[i].slot = lay->regions[i].slot;
                p->regions[i].guest_phys = lay->regions[i].guest_phys;
                p->regions[i].size = lay->regions[i].size;
                p->regions[i].memfd_offset = lay->regions[i].fd_offset;
                p->region_ptrs[i] = &p->regions[i];
        }
        p->hello = (Dr__Repl__Hello) DR__REPL__HELLO__INIT;
        p->hello.version = DR__REPL__REPL_VERSION__REPL_VERSION_CURRENT;
        p->hello.vm_name = p->vm->name;
        p->hello.vm_uuid.data = p->uuid;
        p->hello.vm_uuid.len = sizeof(p->uuid);
        p->hello.regions = p->region_ptrs;
        p->hello.n_regions = lay->n_regions;
        p->hello.page_size = lay->page_size;
        p->hello.session.data = p->session;
        p->hello.session.len = sizeof(p->session);
        p->hello.primary_host = p->host;
        p->hello.has_vcpus = true;
        p->hello.vcpus = (uint32_t) lay->n_vcpus;
        p->total_pages = lay->total_pages;
        return 0;
}

static bool mode_matches(ConfigTracking want, Dr__Control__TrackingMode have)
{
        switch (want) {
        case CONFIG_TRACKING_RING:
                return have == DR__CONTROL__TRACKING_MODE__TRACKING_MODE_RING;
        case CONFIG_TRACKING_BITMAP:
                return have == DR__CONTROL__TRACKING_MODE__TRACKING_MODE_BITMAP;
        default:
                return true;
        }
}

static int schedule_attach(Primary *p);

int primary_attach(Primary *p)
{
        _cleanup_(vmm_link_freep) VmmLink *vmm = NULL;
        Epoch *e = NULL;
        const VmmLayout *lay;
        int r;

        char why[512] = "";

        r = vmm_link_open_checked(p->vm->control_socket, "dirtyrepd", why, sizeof(why), &vmm);
        if (r == -EPERM && why[0]) {
                /* Not a VMM this daemon may trust: said once per attempt, as other attach errors. */
                pthread_mutex_lock(&p->mutex);
                snprintf(p->detail, sizeof(p->detail), "VMM control socket refused: %s", why);
                pthread_mutex_unlock(&p->mutex);
                log_error("VM %s: refusing the VMM control socket: %s; retrying", p->vm->name, why);
                return schedule_attach(p);
        }
        if (r < 0) {
                pthread_mutex_lock(&p->mutex);
                snprintf(p->detail, sizeof(p->detail), "VMM control socket %s: %s%s%s",
                         p->vm->control_socket, strerror(-r), vmm && vmm_link_last_error(vmm)[0] ? ": " : "",
                         vmm ? vmm_link_last_error(vmm) : "");
                pthread_mutex_unlock(&p->mutex);
                if (r != -ENOENT && r != -ECONNREFUSED)
                        log_warning_errno(r, "VM %s: attaching to %s failed: %m; retrying", p->vm->name,
                                          p->vm->control_socket);
                return schedule_attach(p);
        }
        lay = vmm_link_layout(vmm);
        if (!mode_matches(p->vm->tracking, lay->mode)) {
                pthread_mutex_lock(&p->mutex);
                primary_set_failed_locked(
                        p,
                        "Tracking=%s but the VMM tracks with %s; start the VMM with --tracking %s or "
                        "set Tracking=auto",
                        config_tracking_to_string(p->vm->tracking),
                        lay->mode == DR__CONTROL__TRACKING_MODE__TRACKING_MODE_RING ? "rings" : "a bitmap",
                        config_tracking_to_string(p->vm->tracking));
                pthread_mutex_unlock(&p->mutex);
                return log_error_errno(-EINVAL, "VM %s: %s", p->vm->name, p->detail);
        }

        e = calloc(1, sizeof(*e));
        if (!e)
                return -ENOMEM;
        e->p = p;
        e->vmm = vmm;
        r = tracker_init(&e->t, vmm);
        if (r >= 0)
                r = epoch_init(e);
        if (r >= 0)
                r = build_hello(p, lay);
        if (r >= 0) {
                r = vmm_link_start_tracking(vmm);
                if (r < 0)
                        log_error_errno(r, "VM %s: StartTracking failed: %s", p->vm->name,
                                        vmm_link_last_error(vmm));
        }
        if (r >= 0 && vmm_link_hello_suspended(vmm)) {
                /* The split-brain guard suspended this VM under an earlier dirtyrepd (or
                 * an earlier session of ours): another host may serve it now. It stays
                 * so until a standby connects and resyncs, or the operator decides. */
                e->suspended = true;
                pthread_mutex_lock(&p->mutex);
                p->guard = GUARD_SUSPENDED;
                p->suspended = true;
                p->attach_suspended = true;
                pthread_mutex_unlock(&p->mutex);
                log_error("VM %s: the VMM says the VM is SUSPENDED by the split-brain guard (%" PRIu64
                          " bytes of output held): it stays paused until a standby at %s resyncs it, or "
                          "`dirtyrepctl resume %s` runs it unprotected (only if the other host does not "
                          "serve it)",
                          p->vm->name, vmm_link_hello_held_bytes(vmm), p->vm->peer.text, p->vm->name);
        } else if (r >= 0) {
                /* Output from here on is held under epoch 1 until the standby commits it. */
                r = vmm_link_resume(vmm, 1);
                if (r < 0)
                        log_error_errno(r, "VM %s: Resume(1) failed: %s", p->vm->name,
                                        vmm_link_last_error(vmm));
                else if (vmm_link_hello_held_bytes(vmm) > 0)
                        log_notice("VM %s: %" PRIu64
                                   " bytes of output held by an earlier dirtyrepd wait for the "
                                   "standby's first commit",
                                   p->vm->name, vmm_link_hello_held_bytes(vmm));
        }
        if (r < 0) {
                e->vmm = NULL;
                epoch_free(e);
                free(e);
                primary_fail(p, "attaching to the VMM failed: %s", strerror(-r));
                return r;
        }
        e->epoch_start_us = e->last_collect_us = e->last_reset_us = now_usec();
        TAKE_PTR(vmm);

        r = -pthread_create(&p->thread, NULL, epoch_thread, e);
        if (r < 0) {
                epoch_free(e);
                free(e);
                primary_fail(p, "cannot start the epoch thread: %s", strerror(-r));
                return r;
        }
        p->thread_started = true;
        pthread_mutex_lock(&p->mutex);
        p->attached = true;
        if (p->guard == GUARD_SUSPENDED)
                snprintf(p->detail, sizeof(p->detail),
                         "suspended before attach (split-brain guard, kept by the VMM); waiting for a "
                         "standby at %s "
                         "or `dirtyrepctl resume`",
                         p->vm->peer.text);
        else if (p->promoted)
                snprintf(p->detail, sizeof(p->detail),
                         "promoted from the replica of epoch %" PRIu64
                         "; unprotected until a standby at %s syncs",
                         p->promoted_from, p->vm->peer.text);
        else
                snprintf(p->detail, sizeof(p->detail), "attached; connecting to %s", p->vm->peer.text);
        pthread_mutex_unlock(&p->mutex);
        log_info("VM %s: attached to %s (%s tracking, %zu vCPUs, %" PRIu64 " pages)", p->vm->name,
                 p->vm->control_socket, e->t.ops->name, lay->n_vcpus, lay->total_pages);
        return primary_connect(p);
}

static int on_attach_timer(sd_event_source *s, uint64_t usec, void *userdata)
{
        Primary *p = userdata;

        p->attach_timer = sd_event_source_disable_unref(p->attach_timer);
        (void) primary_attach(p);
        return 0;
}

static int schedule_attach(Primary *p)
{
        p->attach_timer = sd_event_source_disable_unref(p->attach_timer);
        return sd_event_add_time_relative(p->event, &p->attach_timer, CLOCK_MONOTONIC, ATTACH_RETRY_USEC,
                                          1000, on_attach_timer, p);
}

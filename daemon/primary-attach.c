/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Attaching to the VMM: open and check its control socket, set up tracking,
 * build the Hello the standby will check, start the epoch thread, then
 * connect to the standby. Retries every ATTACH_RETRY_USEC while the VMM is
 * not there.
 *
 * Everything that talks to the VMM (connect, Hello, the layout and its
 * mappings, StartTracking, the first Resume) runs on an attach worker, a
 * thread of its own, so that a slow or hung VMM never stalls the loop (the
 * D-Bus API, the other VMs, the standby's ACKs). The worker touches nothing
 * of the Primary but its configuration (p->vm, const) and p->detail under
 * the mutex; it leaves its result in an AttachJob and signals attach_fd.
 * The loop then joins it and does the rest: the Primary's state, the Hello,
 * the epoch thread, the link. At most one worker runs; primary_free() waits
 * for it (the VMM's Hello is bounded by VMM_LINK_HELLO_TIMEOUT_USEC) and
 * frees what it built.
 *
 *   loop                         attach worker
 *   primary_attach() --create--> attach_work(): open, check, track, resume
 *   on_attach_done() <-eventfd-- job->r, job->vmm, job->e
 *     retry (timer) / fail / attached: epoch thread, then primary_connect()
 */
#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "primary-internal.h"
#include "util.h"

typedef struct AttachJob {
        Primary *p;
        /* Written by the worker before it signals attach_fd. */
        int r;        /* 0 attached; < 0 failed */
        bool final;   /* failed for good (status failed); otherwise retried */
        bool refused; /* the socket's owner is not one to trust (why says who) */
        char why[512];
        VmmLink *vmm; /* on success */
        Epoch *e;     /* on success: tracking set up, VM resumed (or suspended) */
        bool suspended;
        uint64_t held_bytes;
} AttachJob;

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

static void attach_job_free(AttachJob *job)
{
        if (!job)
                return;
        if (job->e) {
                job->e->vmm = NULL; /* freed below, once */
                epoch_free(job->e);
                free(job->e);
        }
        vmm_link_free(job->vmm);
        free(job);
}

/* Worker: tracking on, and the VM resumed under epoch 1 (or left suspended). job->e on success. */
static int attach_track(AttachJob *job, VmmLink *vmm)
{
        Primary *p = job->p;
        Epoch *e;
        int r;

        e = calloc(1, sizeof(*e));
        if (!e)
                return -ENOMEM;
        job->e = e;
        e->p = p;
        e->vmm = vmm;
        r = tracker_init(&e->t, vmm);
        if (r >= 0)
                r = epoch_init(e);
        if (r < 0)
                return r;
        r = vmm_link_start_tracking(vmm);
        if (r < 0)
                return log_error_errno(r, "VM %s: StartTracking failed: %s", p->vm->name,
                                       vmm_link_last_error(vmm));
        job->held_bytes = vmm_link_hello_held_bytes(vmm);
        if (vmm_link_hello_suspended(vmm)) {
                /* The split-brain guard suspended this VM under an earlier dirtyrepd (or an
                 * earlier session of ours): another host may serve it now. It stays so until
                 * a standby connects and resyncs, or the operator decides. */
                job->suspended = true;
                return 0;
        }
        /* Output from here on is held under epoch 1 until the standby commits it. */
        r = vmm_link_resume(vmm, 1);
        if (r < 0)
                return log_error_errno(r, "VM %s: Resume(1) failed: %s", p->vm->name,
                                       vmm_link_last_error(vmm));
        return 0;
}

static void *attach_work(void *userdata)
{
        AttachJob *job = userdata;
        Primary *p = job->p;
        _cleanup_(vmm_link_freep) VmmLink *vmm = NULL;
        const VmmLayout *lay;
        int r;

        r = vmm_link_open_checked(p->vm->control_socket, "dirtyrepd", job->why, sizeof(job->why), &vmm);
        if (r == -EPERM && job->why[0]) {
                job->refused = true;
                job->r = r;
                goto done;
        }
        if (r < 0) {
                char said[sizeof(job->why)];

                /* why: what the exchange with the agent said, if it got that far. */
                snprintf(said, sizeof(said), "%s", job->why);
                snprintf(job->why, sizeof(job->why), "VMM control socket %.200s: %.200s",
                         p->vm->control_socket, said[0] ? said : strerror(-r));
                job->r = r;
                goto done;
        }
        lay = vmm_link_layout(vmm);
        if (!mode_matches(p->vm->tracking, lay->mode)) {
                snprintf(job->why, sizeof(job->why),
                         "Tracking=%s but the VMM tracks with %s; start the VMM with --tracking %s or "
                         "set Tracking=auto",
                         config_tracking_to_string(p->vm->tracking),
                         lay->mode == DR__CONTROL__TRACKING_MODE__TRACKING_MODE_RING ? "rings" : "a bitmap",
                         config_tracking_to_string(p->vm->tracking));
                job->r = -EINVAL;
                job->final = true;
                goto done;
        }
        r = attach_track(job, vmm);
        if (r < 0) {
                snprintf(job->why, sizeof(job->why), "attaching to the VMM failed: %s", strerror(-r));
                job->r = r;
                job->final = true;
                goto done;
        }
        job->vmm = TAKE_PTR(vmm);
done:
        wake(p->attach_fd);
        return NULL;
}

static int schedule_attach(Primary *p);

/* Loop: the worker attached; the Primary takes its Epoch and starts the pipeline. */
static int attach_finish(Primary *p, AttachJob *job)
{
        const VmmLayout *lay = vmm_link_layout(job->vmm);
        Epoch *e = job->e;
        const char *tracking;
        int r;

        r = build_hello(p, lay);
        if (r < 0) {
                primary_fail(p, "attaching to the VMM failed: %s", strerror(-r));
                return r;
        }
        if (job->suspended) {
                pthread_mutex_lock(&p->mutex);
                p->guard = GUARD_SUSPENDED;
                p->suspended = true;
                e->suspended = true;
                pthread_mutex_unlock(&p->mutex);
                log_error("VM %s: the VMM says the VM is SUSPENDED by the split-brain guard (%" PRIu64
                          " bytes of output held): it stays paused until a standby at %s resyncs it, or "
                          "`dirtyrepctl resume %s` runs it unprotected (only if the other host does not "
                          "serve it)",
                          p->vm->name, job->held_bytes, p->vm->peer.text, p->vm->name);
        } else if (job->held_bytes > 0)
                log_notice(
                        "VM %s: %" PRIu64
                        " bytes of output held by an earlier dirtyrepd wait for the standby's first commit",
                        p->vm->name, job->held_bytes);

        /* From here the epoch thread owns the VmmLink and the Epoch (it frees both). */
        job->vmm = NULL;
        job->e = NULL;
        e->epoch_start_us = e->last_collect_us = e->last_reset_us = now_usec();
        tracking = e->t.ops->name;
        r = -pthread_create(&p->thread, NULL, epoch_thread, e);
        if (r < 0) {
                epoch_free(e); /* with the VmmLink */
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
                         "standby at %s or `dirtyrepctl resume`",
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
                 p->vm->control_socket, tracking, lay->n_vcpus, lay->total_pages);
        return 0;
}

static int on_attach_done(sd_event_source *s, int fd, uint32_t revents, void *userdata)
{
        Primary *p = userdata;
        AttachJob *job;
        eventfd_t v;
        bool suspended;
        int r;

        (void) eventfd_read(fd, &v);
        if (!p->attach_running)
                return 0;
        pthread_join(p->attach_thread, NULL);
        p->attach_running = false;
        job = TAKE_PTR(p->attach_job);
        suspended = job->suspended;

        if (job->r < 0 && !job->final) {
                /* No VMM yet, or not one to trust: said in the status, retried. */
                pthread_mutex_lock(&p->mutex);
                snprintf(p->detail, sizeof(p->detail), "%s%.220s",
                         job->refused ? "VMM control socket refused: " : "", job->why);
                pthread_mutex_unlock(&p->mutex);
                if (job->refused)
                        log_error("VM %s: refusing the VMM control socket: %s; retrying", p->vm->name,
                                  job->why);
                else if (job->r != -ENOENT && job->r != -ECONNREFUSED)
                        log_warning_errno(job->r, "VM %s: attaching to %s failed: %m; retrying", p->vm->name,
                                          p->vm->control_socket);
                attach_job_free(job);
                (void) schedule_attach(p);
                return 0;
        }
        if (job->r < 0) {
                r = job->r;
                if (r == -EINVAL) {
                        pthread_mutex_lock(&p->mutex);
                        primary_set_failed_locked(p, "%.250s", job->why);
                        pthread_mutex_unlock(&p->mutex);
                        log_error("VM %s: %s", p->vm->name, job->why);
                } else
                        primary_fail(p, "%.250s", job->why);
        } else
                r = attach_finish(p, job);
        attach_job_free(job);
        if (p->attach_cb)
                p->attach_cb(p, r, suspended, p->attach_userdata);
        if (r >= 0)
                (void) primary_connect(p);
        return 0;
}

int primary_attach(Primary *p)
{
        AttachJob *job;
        int r;

        assert(!p->attach_running);
        if (!p->attach_source) {
                r = sd_event_add_io(p->event, &p->attach_source, p->attach_fd, EPOLLIN, on_attach_done, p);
                if (r < 0)
                        return r;
        }
        job = calloc(1, sizeof(*job));
        if (!job)
                return -ENOMEM;
        job->p = p;
        r = -pthread_create(&p->attach_thread, NULL, attach_work, job);
        if (r < 0) {
                free(job);
                return r;
        }
        p->attach_job = job;
        p->attach_running = true;
        return 0;
}

void primary_attach_cancel(Primary *p)
{
        if (p->attach_running) {
                pthread_join(p->attach_thread, NULL);
                p->attach_running = false;
        }
        attach_job_free(TAKE_PTR(p->attach_job));
        p->attach_source = sd_event_source_disable_unref(p->attach_source);
}

void primary_set_attach_callback(Primary *p, primary_attach_done_t done, void *userdata)
{
        p->attach_cb = done;
        p->attach_userdata = userdata;
}

static int on_attach_timer(sd_event_source *s, uint64_t usec, void *userdata)
{
        Primary *p = userdata;

        p->attach_timer = sd_event_source_disable_unref(p->attach_timer);
        if (primary_attach(p) < 0)
                (void) schedule_attach(p);
        return 0;
}

static int schedule_attach(Primary *p)
{
        p->attach_timer = sd_event_source_disable_unref(p->attach_timer);
        return sd_event_add_time_relative(p->event, &p->attach_timer, CLOCK_MONOTONIC, ATTACH_RETRY_USEC,
                                          1000, on_attach_timer, p);
}

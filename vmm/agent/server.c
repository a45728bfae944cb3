/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The agent thread: serves proto/control.proto on the control socket.
 *
 * One client at a time. Every packet gets exactly one Reply, bad ones
 * included; nothing a peer sends ends the session except a wrong protocol
 * version. When the client goes away, for whatever reason and at whatever
 * point, agent_detach() puts the VM back on its own: tracking off, vCPUs
 * running. Held output is released only by a client that gave up protection
 * (a plain STOP_TRACKING); one that vanished while output was held (its
 * dirtyrepd crashed) or stopped with StopTracking{hold_output} leaves it held
 * for the next client: the standby may already be failing over from an older
 * epoch, and releasing would show the world replies that the failover rolls
 * back (found by the fault campaign). A VM suspended by Pause{suspend} (the
 * split-brain guard) is the exception to "running": it stays paused, whoever
 * goes away, until a client sends Resume{unsuspend}.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include "agent-internal.h"
#include "dirtyrep-build.h"
#include "fdpass.h"
#include "log.h"
#include "macros.h"
#include "util.h"

#define MAX_MESSAGE          ((size_t) DR__CONTROL__CONTROL_LIMIT__CONTROL_MAX_MESSAGE)
#define PAUSE_TIMEOUT_MAX_MS 10000u

/* One reply under construction. Large; allocated per request. */
typedef struct Ctx {
        Dr__Control__Reply reply;
        char message[256];
        int fds[FDPASS_MAX_FDS]; /* borrowed: sent, never closed here */
        size_t n_fds;
        bool close_after;

        Dr__Control__HelloReply hello;
        Dr__Control__Layout layout;
        Dr__Control__Region regions[DR_AGENT_MAX_REGIONS];
        Dr__Control__Region *region_ptrs[DR_AGENT_MAX_REGIONS];
        Dr__Control__Vcpu vcpus[DR_AGENT_MAX_VCPUS];
        Dr__Control__Vcpu *vcpu_ptrs[DR_AGENT_MAX_VCPUS];
        Dr__Control__ResetRingsReply reset_rings;
        Dr__Control__PauseReply pause;
        Dr__Control__ResumeReply resume;
        Dr__Control__SaveStateReply save_state;
        Dr__Control__GetDirtyLogReply get_dirty_log;
        Dr__Control__ReleaseOutputReply release_output;
        Dr__Control__StatusReply status;
        Dr__Control__VcpuStatus vstatus[DR_AGENT_MAX_VCPUS];
        Dr__Control__VcpuStatus *vstatus_ptrs[DR_AGENT_MAX_VCPUS];
} Ctx;

_printf_(3, 4) static int ctx_fail(Ctx *c, int error, const char *fmt, ...)
{
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(c->message, sizeof(c->message), fmt, ap);
        va_end(ap);
        return error;
}

static int ctx_add_fd(Ctx *c, int fd)
{
        if (c->n_fds >= FDPASS_MAX_FDS)
                return -ETOOMANYREFS;
        c->fds[c->n_fds] = fd;
        return (int) c->n_fds++;
}

/* Packs and sends a reply on fd. A reply too large for a packet becomes an -EMSGSIZE error. */
static int reply_send(int fd, Dr__Control__Reply *rep, const int *fds, size_t n_fds)
{
        uint8_t buf[512];
        _cleanup_free_ uint8_t *big = NULL;
        uint8_t *p = buf;
        size_t len = dr__control__reply__get_packed_size(rep);

        if (len > MAX_MESSAGE) {
                Dr__Control__Reply e = DR__CONTROL__REPLY__INIT;
                e.id = rep->id;
                e.error = -EMSGSIZE;
                e.error_message = (char *) "reply does not fit in one control packet";
                log_error("Reply to request %llu is %zu bytes, over the %zu byte limit.",
                          (unsigned long long) rep->id, len, MAX_MESSAGE);
                return reply_send(fd, &e, NULL, 0);
        }
        if (len > sizeof(buf)) {
                p = big = malloc(len);
                if (!p)
                        return -ENOMEM;
        }
        dr__control__reply__pack(rep, p);
        return fdpass_send(fd, p, len, fds, n_fds);
}

_printf_(4, 5) static int reply_error(int fd, uint64_t id, int error, const char *fmt, ...)
{
        Dr__Control__Reply rep = DR__CONTROL__REPLY__INIT;
        char msg[256];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
        rep.id = id;
        rep.error = error;
        rep.error_message = msg;
        return reply_send(fd, &rep, NULL, 0);
}

static AgentRegion *region_by_slot(DrAgent *a, uint32_t slot)
{
        for (size_t i = 0; i < a->n_regions; i++)
                if (a->regions[i].r.slot == slot)
                        return &a->regions[i];
        return NULL;
}

/* ---- requests ---- */

static int handle_hello(DrAgent *a, const Dr__Control__Hello *m, Ctx *c)
{
        if (m->version != DR__CONTROL__CONTROL_VERSION__CONTROL_VERSION_CURRENT) {
                c->close_after = true;
                log_warning("Control client speaks protocol version %u, this agent %d: closing.", m->version,
                            DR__CONTROL__CONTROL_VERSION__CONTROL_VERSION_CURRENT);
                return ctx_fail(c, -EPROTONOSUPPORT, "protocol version %u not supported (agent speaks %d)",
                                m->version, DR__CONTROL__CONTROL_VERSION__CONTROL_VERSION_CURRENT);
        }
        a->hello_done = true;
        log_info("Control client \"%s\" (uid %u, pid %d) said hello.", m->client ?: "",
                 (unsigned) a->client_uid, (int) a->client_pid);

        c->hello = (Dr__Control__HelloReply) DR__CONTROL__HELLO_REPLY__INIT;
        c->hello.version = DR__CONTROL__CONTROL_VERSION__CONTROL_VERSION_CURRENT;
        c->hello.vmm = (char *) "libdirtyrep-agent " DIRTYREP_VERSION;
        c->hello.vm_name = a->vm_name;
        c->hello.has_vm_uuid = true;
        c->hello.vm_uuid.data = a->vm_uuid;
        c->hello.vm_uuid.len = sizeof(a->vm_uuid);
        c->hello.has_features = true;
        c->hello.features =
                DR__CONTROL__FEATURE__FEATURE_PAUSE_SAVES_STATE |
                (a->mode == DR_TRACKING_RING ? DR__CONTROL__FEATURE__FEATURE_RESUME_RESETS_RINGS : 0);
        pthread_mutex_lock(&a->lock);
        c->hello.has_suspended = true;
        c->hello.suspended = a->suspended;
        pthread_mutex_unlock(&a->lock);
        c->hello.has_held_output_bytes = true;
        c->hello.held_output_bytes = output_queue_held_bytes(a->outq);
        if (c->hello.suspended)
                log_notice("The VM is suspended (split-brain guard of an earlier client): it stays paused "
                           "until "
                           "a client resumes it with Resume{unsuspend}.");
        c->reply.body_case = DR__CONTROL__REPLY__BODY_HELLO;
        c->reply.hello = &c->hello;
        return 0;
}

static int handle_get_layout(DrAgent *a, Ctx *c)
{
        Dr__Control__Layout *l = &c->layout;

        *l = (Dr__Control__Layout) DR__CONTROL__LAYOUT__INIT;
        for (size_t i = 0; i < a->n_regions; i++) {
                const AgentRegion *ar = &a->regions[i];
                Dr__Control__Region *r = &c->regions[i];

                *r = (Dr__Control__Region) DR__CONTROL__REGION__INIT;
                r->slot = ar->r.slot;
                r->guest_phys = ar->r.guest_phys;
                r->size = ar->r.size;
                r->fd_index = ctx_add_fd(c, ar->r.memfd);
                r->fd_offset = ar->r.memfd_offset;
                if (a->mode == DR_TRACKING_BITMAP) {
                        r->has_bitmap_offset = true;
                        r->bitmap_offset = ar->bitmap_offset;
                }
                r->has_vmm_dirty_offset = true;
                r->vmm_dirty_offset = ar->vmm_dirty_offset;
                c->region_ptrs[i] = r;
        }
        l->regions = c->region_ptrs;
        l->n_regions = a->n_regions;

        for (unsigned i = 0; i < a->n_vcpus; i++) {
                Dr__Control__Vcpu *v = &c->vcpus[i];

                *v = (Dr__Control__Vcpu) DR__CONTROL__VCPU__INIT;
                v->index = i;
                v->fd_index = ctx_add_fd(c, a->vcpus[i].fd);
                c->vcpu_ptrs[i] = v;
        }
        l->vcpus = c->vcpu_ptrs;
        l->n_vcpus = a->n_vcpus;

        l->page_size = a->page_size;
        l->has_ring_entries = true;
        l->ring_entries = a->ring_entries;
        if (a->mode == DR_TRACKING_RING) {
                l->mode = DR__CONTROL__TRACKING_MODE__TRACKING_MODE_RING;
                l->has_ring_full_fd_index = true;
                l->ring_full_fd_index = ctx_add_fd(c, a->ring_full_fd);
        } else {
                l->mode = DR__CONTROL__TRACKING_MODE__TRACKING_MODE_BITMAP;
                l->has_bitmap_fd_index = l->has_bitmap_size = true;
                l->bitmap_fd_index = ctx_add_fd(c, a->bitmap_fd);
                l->bitmap_size = a->bitmap_size;
        }
        l->vmm_dirty_fd_index = ctx_add_fd(c, a->vmm_dirty_fd);
        l->vmm_dirty_size = a->vmm_dirty_size;
        l->state_fd_index = ctx_add_fd(c, a->state_fd);
        if (a->tsc_khz) {
                l->has_tsc_khz = true;
                l->tsc_khz = a->tsc_khz;
        }
        c->reply.body_case = DR__CONTROL__REPLY__BODY_LAYOUT;
        c->reply.layout = l;
        return 0;
}

/* KVM_RESET_DIRTY_RINGS, and wakes vCPUs waiting on a full ring. Returns the count or -errno. */
static int reset_rings(DrAgent *a)
{
        int n = ioctl(a->vm_fd, KVM_RESET_DIRTY_RINGS);

        if (n < 0)
                return -errno;
        pthread_mutex_lock(&a->lock);
        a->resets_total += (uint64_t) n;
        a->reset_gen++;
        pthread_cond_broadcast(&a->vcpu_cond); /* vCPUs waiting on a full ring */
        pthread_mutex_unlock(&a->lock);
        return n;
}

static int handle_reset_rings(DrAgent *a, Ctx *c)
{
        int n;

        if (a->mode != DR_TRACKING_RING)
                return ctx_fail(c, -EOPNOTSUPP, "the VM tracks dirty pages with a bitmap, not rings");
        n = reset_rings(a);
        if (n < 0)
                return ctx_fail(c, n, "KVM_RESET_DIRTY_RINGS: %s", strerror(-n));

        c->reset_rings = (Dr__Control__ResetRingsReply) DR__CONTROL__RESET_RINGS_REPLY__INIT;
        c->reset_rings.count = (uint64_t) n;
        c->reply.body_case = DR__CONTROL__REPLY__BODY_RESET_RINGS;
        c->reply.reset_rings = &c->reset_rings;
        return 0;
}

static int save_state(DrAgent *a, Ctx *c, uint64_t *ret_len);

static int handle_pause(DrAgent *a, const Dr__Control__Pause *m, Ctx *c)
{
        unsigned timeout_ms = m->has_timeout_ms && m->timeout_ms > 0
                                      ? MIN(m->timeout_ms, PAUSE_TIMEOUT_MAX_MS)
                                      : AGENT_DEFAULT_PAUSE_TIMEOUT_MS;
        uint64_t t0 = now_nsec(), deadline = t0 + (uint64_t) timeout_ms * 1000000ULL;
        struct timespec ts = {.tv_sec = deadline / 1000000000ULL, .tv_nsec = deadline % 1000000000ULL};
        bool idle;

        pthread_mutex_lock(&a->lock);
        if (!a->paused)
                a->paused_since_ns = t0;
        a->paused = true;
        if (m->has_suspend && m->suspend && !a->suspended) {
                /* Sticky from here, also if the wait below times out. */
                a->suspended = true;
                log_warning(
                        "VM suspended by the control client (split-brain guard): it stays paused until a "
                        "client resumes it explicitly.");
        }
        agent_kick_locked(a);
        while (!(idle = agent_all_idle_locked(a)))
                if (pthread_cond_timedwait(&a->agent_cond, &a->lock, &ts) == ETIMEDOUT) {
                        idle = agent_all_idle_locked(a);
                        break;
                }
        pthread_mutex_unlock(&a->lock);

        if (!idle) {
                /* Still paused: busy vCPUs park when they come back to before_run(). */
                log_warning("Pause: not every vCPU stopped within %u ms.", timeout_ms);
                return ctx_fail(c, -ETIMEDOUT, "not every vCPU stopped within %u ms", timeout_ms);
        }

        c->pause = (Dr__Control__PauseReply) DR__CONTROL__PAUSE_REPLY__INIT;
        c->pause.pause_ns = now_nsec() - t0;
        if (m->has_save_state && m->save_state) {
                /* Same as a SaveState request right after: the vCPUs stay parked. On
                 * failure the VM stays paused, as after a failed SaveState. */
                int r = save_state(a, c, &c->pause.state_length);
                if (r < 0)
                        return r;
                c->pause.has_state_length = true;
        }
        c->reply.body_case = DR__CONTROL__REPLY__BODY_PAUSE;
        c->reply.pause = &c->pause;
        return 0;
}

static int handle_resume(DrAgent *a, const Dr__Control__Resume *m, Ctx *c)
{
        bool unsuspend = m->has_unsuspend && m->unsuspend;
        uint64_t paused_ns = 0;
        bool suspended;
        int n = -1;

        pthread_mutex_lock(&a->lock);
        suspended = a->suspended;
        pthread_mutex_unlock(&a->lock);
        /* Only the agent thread changes `suspended`, so it cannot change under us. */
        if (suspended && !unsuspend)
                return ctx_fail(
                        c, -EPERM,
                        "the VM is suspended by the split-brain guard; only Resume{unsuspend} resumes it");
        if (m->has_reset_rings && m->reset_rings) {
                if (a->mode != DR_TRACKING_RING)
                        return ctx_fail(c, -EOPNOTSUPP,
                                        "the VM tracks dirty pages with a bitmap, not rings");
                /* Re-protect before any vCPU runs: the client copied while paused. */
                n = reset_rings(a);
                if (n < 0)
                        return ctx_fail(c, n,
                                        "KVM_RESET_DIRTY_RINGS before resuming: %s; the VM stays paused",
                                        strerror(-n));
        }
        pthread_mutex_lock(&a->lock);
        if (m->has_epoch) {
                a->epoch = m->epoch;
                a->have_epoch = true;
                /* Before any vCPU runs again: output of the new epoch is tagged with it. */
                output_queue_hold(a->outq, m->epoch);
        }
        if (a->paused && a->paused_since_ns > 0)
                paused_ns = now_nsec() - a->paused_since_ns;
        a->paused = false;
        a->paused_since_ns = 0;
        a->suspended = false;
        pthread_cond_broadcast(&a->vcpu_cond);
        pthread_mutex_unlock(&a->lock);
        if (suspended)
                log_notice("VM resumed from suspension by the control client.");
        c->resume = (Dr__Control__ResumeReply) DR__CONTROL__RESUME_REPLY__INIT;
        if (n >= 0) {
                c->resume.has_reset_count = true;
                c->resume.reset_count = (uint64_t) n;
        }
        if (paused_ns > 0) {
                c->resume.has_paused_ns = true;
                c->resume.paused_ns = paused_ns;
        }
        c->reply.body_case = DR__CONTROL__REPLY__BODY_RESUME;
        c->reply.resume = &c->resume;
        return 0;
}

static int write_state(DrAgent *a, const uint8_t *buf, size_t len)
{
        size_t done = 0;

        if (len > AGENT_STATE_MAX)
                return -EFBIG;
        if (len > a->state_size) {
                /* Grow only: the client may have the memfd mapped. */
                uint64_t size = ALIGN_TO((uint64_t) len, (uint64_t) a->page_size);
                if (ftruncate(a->state_fd, (off_t) size) < 0)
                        return -errno;
                a->state_size = size;
        }
        while (done < len) {
                ssize_t n = pwrite(a->state_fd, buf + done, len - done, (off_t) done);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                done += (size_t) n;
        }
        return 0;
}

static int handle_save_state(DrAgent *a, Ctx *c)
{
        uint64_t len;
        bool ok;
        int r;

        pthread_mutex_lock(&a->lock);
        ok = a->paused && agent_all_idle_locked(a);
        pthread_mutex_unlock(&a->lock);
        if (!ok)
                return ctx_fail(c, -EBUSY, "SaveState needs a paused VM");
        r = save_state(a, c, &len);
        if (r < 0)
                return r;
        c->save_state = (Dr__Control__SaveStateReply) DR__CONTROL__SAVE_STATE_REPLY__INIT;
        c->save_state.length = len;
        c->reply.body_case = DR__CONTROL__REPLY__BODY_SAVE_STATE;
        c->reply.save_state = &c->save_state;
        return 0;
}

/* Saves devices and vCPUs into the state memfd; the VM must be paused. */
static int save_state(DrAgent *a, Ctx *c, uint64_t *ret_len)
{
        _cleanup_free_ uint8_t *devices = NULL, *buf = NULL;
        _cleanup_free_ int *fds = NULL;
        size_t devices_len = 0, len = 0;
        int r;

        if (a->cb.save_devices) {
                r = a->cb.save_devices(a->userdata, &devices, &devices_len);
                if (r < 0)
                        return ctx_fail(c, r, "the VMM could not save its devices: %s", strerror(-r));
        }

        fds = calloc(a->n_vcpus, sizeof(int));
        if (!fds)
                return -ENOMEM;
        for (unsigned i = 0; i < a->n_vcpus; i++)
                fds[i] = a->vcpus[i].fd;
        r = dr_state_save(a->kvm_fd, a->vm_fd, fds, a->n_vcpus, devices, devices_len, &buf, &len);
        if (r < 0) {
                log_error_errno(r, "SaveState failed: %m");
                return ctx_fail(c, r, "saving the VM state failed: %s", strerror(-r));
        }
        r = write_state(a, buf, len);
        if (r < 0)
                return ctx_fail(c, r, "writing %zu bytes of state failed: %s", len, strerror(-r));
        *ret_len = len;
        return 0;
}

/* KVM_CLEAR_DIRTY_LOG for every run of non-zero 64-page words of bm in [first_page, first_page + num). */
static int clear_dirty_runs(DrAgent *a, const AgentRegion *ar, const uint64_t *bm, uint64_t first_page,
                            uint64_t num)
{
        uint64_t w = first_page / 64, w_end = DIV_ROUND_UP(first_page + num, 64);

        while (w < w_end) {
                uint64_t start;
                struct kvm_clear_dirty_log cl;

                while (w < w_end && __atomic_load_n(&bm[w], __ATOMIC_RELAXED) == 0)
                        w++;
                if (w >= w_end)
                        break;
                start = w;
                while (w < w_end && __atomic_load_n(&bm[w], __ATOMIC_RELAXED) != 0)
                        w++;
                /* KVM: first_page a multiple of 64, num_pages too unless the range ends the slot. */
                cl = (struct kvm_clear_dirty_log){
                        .slot = ar->r.slot,
                        .first_page = start * 64,
                        .num_pages = (uint32_t) MIN((w - start) * 64, ar->npages - start * 64),
                        .dirty_bitmap = (void *) &bm[start],
                };
                if (ioctl(a->vm_fd, KVM_CLEAR_DIRTY_LOG, &cl) < 0)
                        return -errno;
        }
        return 0;
}

static int handle_get_dirty_log(DrAgent *a, const Dr__Control__GetDirtyLog *m, Ctx *c)
{
        const AgentRegion *ar;
        uint64_t *bm, count = 0;
        struct kvm_dirty_log log = {};
        int r;

        if (a->mode != DR_TRACKING_BITMAP)
                return ctx_fail(c, -EOPNOTSUPP, "the VM tracks dirty pages with rings, not a bitmap");
        ar = region_by_slot(a, m->slot);
        if (!ar)
                return ctx_fail(c, -ENOENT, "no memory slot %u", m->slot);
        if (!atomic_load(&a->tracking))
                return ctx_fail(c, -ENOTCONN, "dirty tracking is off (StartTracking first)");

        bm = (uint64_t *) (a->bitmap_map + ar->bitmap_offset);
        log.slot = ar->r.slot;
        log.dirty_bitmap = bm;
        if (ioctl(a->vm_fd, KVM_GET_DIRTY_LOG, &log) < 0)
                return ctx_fail(c, -errno, "KVM_GET_DIRTY_LOG(slot %u): %s", m->slot, strerror(errno));
        for (uint64_t w = 0; w < ar->bitmap_bytes / 8; w++)
                count += (uint64_t) __builtin_popcountll(bm[w]);

        /* Without manual protect KVM_GET_DIRTY_LOG already re-protected what it reported. */
        if (m->has_clear && m->clear && a->manual_protect) {
                r = clear_dirty_runs(a, ar, bm, 0, ar->npages);
                if (r < 0)
                        return ctx_fail(c, r, "KVM_CLEAR_DIRTY_LOG(slot %u): %s", m->slot, strerror(-r));
        }

        c->get_dirty_log = (Dr__Control__GetDirtyLogReply) DR__CONTROL__GET_DIRTY_LOG_REPLY__INIT;
        c->get_dirty_log.dirty_pages = count;
        c->reply.body_case = DR__CONTROL__REPLY__BODY_GET_DIRTY_LOG;
        c->reply.get_dirty_log = &c->get_dirty_log;
        return 0;
}

static int handle_clear_dirty_log(DrAgent *a, const Dr__Control__ClearDirtyLog *m, Ctx *c)
{
        const AgentRegion *ar;
        int r;

        if (a->mode != DR_TRACKING_BITMAP)
                return ctx_fail(c, -EOPNOTSUPP, "the VM tracks dirty pages with rings, not a bitmap");
        if (!a->manual_protect)
                return ctx_fail(c, -EOPNOTSUPP, "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is not available");
        ar = region_by_slot(a, m->slot);
        if (!ar)
                return ctx_fail(c, -ENOENT, "no memory slot %u", m->slot);
        if (m->first_page % 64 != 0 || m->num_pages == 0 || m->first_page >= ar->npages ||
            m->num_pages > ar->npages - m->first_page ||
            (m->num_pages % 64 != 0 && m->first_page + m->num_pages != ar->npages))
                return ctx_fail(
                        c, -EINVAL,
                        "bad range: first_page %llu, num_pages %llu in a slot of %llu pages "
                        "(first_page and num_pages must be multiples of 64 unless the range ends the slot)",
                        (unsigned long long) m->first_page, (unsigned long long) m->num_pages,
                        (unsigned long long) ar->npages);

        r = clear_dirty_runs(a, ar, (const uint64_t *) (a->bitmap_map + ar->bitmap_offset), m->first_page,
                             m->num_pages);
        if (r < 0)
                return ctx_fail(c, r, "KVM_CLEAR_DIRTY_LOG(slot %u): %s", m->slot, strerror(-r));
        return 0;
}

static int handle_release_output(DrAgent *a, const Dr__Control__ReleaseOutput *m, Ctx *c)
{
        c->release_output = (Dr__Control__ReleaseOutputReply) DR__CONTROL__RELEASE_OUTPUT_REPLY__INIT;
        c->release_output.bytes = output_queue_release(a->outq, m->epoch);
        c->reply.body_case = DR__CONTROL__REPLY__BODY_RELEASE_OUTPUT;
        c->reply.release_output = &c->release_output;
        return 0;
}

static int handle_get_status(DrAgent *a, Ctx *c)
{
        Dr__Control__StatusReply *s = &c->status;

        *s = (Dr__Control__StatusReply) DR__CONTROL__STATUS_REPLY__INIT;
        pthread_mutex_lock(&a->lock);
        s->paused = a->paused;
        s->has_suspended = true;
        s->suspended = a->suspended;
        s->tracking = atomic_load(&a->tracking);
        s->has_epoch = a->have_epoch;
        s->epoch = a->epoch;
        s->has_resets_total = true;
        s->resets_total = a->resets_total;
        for (unsigned i = 0; i < a->n_vcpus; i++) {
                Dr__Control__VcpuStatus *v = &c->vstatus[i];

                *v = (Dr__Control__VcpuStatus) DR__CONTROL__VCPU_STATUS__INIT;
                v->index = i;
                v->state = a->vcpus[i].state;
                v->has_exits = v->has_ring_full_exits = true;
                v->exits = a->vcpus[i].exits;
                v->ring_full_exits = a->vcpus[i].ring_full_exits;
                c->vstatus_ptrs[i] = v;
        }
        pthread_mutex_unlock(&a->lock);
        s->vcpus = c->vstatus_ptrs;
        s->n_vcpus = a->n_vcpus;
        s->has_held_output_bytes = true;
        s->held_output_bytes = output_queue_held_bytes(a->outq);
        c->reply.body_case = DR__CONTROL__REPLY__BODY_STATUS;
        c->reply.status = s;
        return 0;
}

static int dispatch(DrAgent *a, const Dr__Control__Request *req, Ctx *c)
{
        int r;

        if (!a->hello_done && req->body_case != DR__CONTROL__REQUEST__BODY_HELLO)
                return ctx_fail(c, -EPROTO, "the first request must be Hello");

        switch (req->body_case) {
        case DR__CONTROL__REQUEST__BODY_GET_LAYOUT:
        case DR__CONTROL__REQUEST__BODY_START_TRACKING:
        case DR__CONTROL__REQUEST__BODY_RESET_RINGS:
        case DR__CONTROL__REQUEST__BODY_PAUSE:
        case DR__CONTROL__REQUEST__BODY_GET_DIRTY_LOG:
                if (atomic_load(&a->layout_stale))
                        return ctx_fail(c, -ESTALE,
                                        "the guest's memory layout changed since this client attached; "
                                        "dirty tracking cannot follow it: detach and attach again "
                                        "(a full sync)");
                break;
        default:
                break;
        }

        switch (req->body_case) {
        case DR__CONTROL__REQUEST__BODY_HELLO:
                return handle_hello(a, req->hello, c);
        case DR__CONTROL__REQUEST__BODY_GET_LAYOUT:
                return handle_get_layout(a, c);
        case DR__CONTROL__REQUEST__BODY_START_TRACKING:
                return agent_set_tracking(a, true);
        case DR__CONTROL__REQUEST__BODY_STOP_TRACKING: {
                uint64_t released;

                r = agent_set_tracking(a, false);
                if (req->stop_tracking->has_hold_output && req->stop_tracking->hold_output) {
                        /* The client stops, but its standby has not acknowledged everything held:
                         * keep holding (as after a crash) for the next client's first release. */
                        uint64_t held = output_queue_holding(a->outq) ? output_queue_orphan(a->outq) : 0;
                        log_info("Tracking stopped by the client; %llu bytes of output stay held, and new "
                                 "output "
                                 "too, until the next client releases it.",
                                 (unsigned long long) held);
                        return r;
                }
                /* The client gives up protection: the VM runs on its own, output flows. */
                released = output_queue_unhold(a->outq);
                if (released > 0)
                        log_info("Tracking stopped by the client: %llu bytes of held output released.",
                                 (unsigned long long) released);
                return r;
        }
        case DR__CONTROL__REQUEST__BODY_RESET_RINGS:
                return handle_reset_rings(a, c);
        case DR__CONTROL__REQUEST__BODY_PAUSE:
                return handle_pause(a, req->pause, c);
        case DR__CONTROL__REQUEST__BODY_RESUME:
                return handle_resume(a, req->resume, c);
        case DR__CONTROL__REQUEST__BODY_SAVE_STATE:
                return handle_save_state(a, c);
        case DR__CONTROL__REQUEST__BODY_GET_DIRTY_LOG:
                return handle_get_dirty_log(a, req->get_dirty_log, c);
        case DR__CONTROL__REQUEST__BODY_CLEAR_DIRTY_LOG:
                return handle_clear_dirty_log(a, req->clear_dirty_log, c);
        case DR__CONTROL__REQUEST__BODY_RELEASE_OUTPUT:
                return handle_release_output(a, req->release_output, c);
        case DR__CONTROL__REQUEST__BODY_GET_STATUS:
                return handle_get_status(a, c);
        default:
                /* A newer client's request (unknown oneof member) or none at all. */
                return ctx_fail(c, -EOPNOTSUPP, "unknown or missing request body");
        }
}

/* ---- session ---- */

void agent_detach(DrAgent *a, const char *why)
{
        bool was_tracking, was_holding;
        uint64_t released;

        if (a->client_fd < 0)
                return;

        was_tracking = atomic_load(&a->tracking);
        if (was_tracking)
                (void) agent_set_tracking(a, false);

        /* Still holding: the client did not stop tracking before it went (a crash, a
         * broken connection). Its output stays held for the next client. */
        was_holding = output_queue_holding(a->outq);
        released = was_holding ? output_queue_orphan(a->outq) : 0;

        /* A VM is never left paused, or waiting for resets, by a peer that is gone;
         * except a suspended one: another host may be serving it now. */
        pthread_mutex_lock(&a->lock);
        a->paused = a->suspended;
        if (!a->paused)
                a->paused_since_ns = 0;
        a->have_epoch = false;
        atomic_store(&a->attached, false);
        a->reset_gen++;
        pthread_cond_broadcast(&a->vcpu_cond);
        pthread_mutex_unlock(&a->lock);

        if (a->suspended)
                log_warning(
                        "Control client (uid %u, pid %d) gone (%s): the VM stays SUSPENDED (paused, %llu "
                        "bytes of output held) until a client resumes it.",
                        (unsigned) a->client_uid, (int) a->client_pid, why, (unsigned long long) released);
        else if (was_holding && !was_tracking)
                log_info("Control client (uid %u, pid %d) gone (%s): VM resumed, %llu bytes of output stay "
                         "held, "
                         "and new output too, until a client attaches and releases it.",
                         (unsigned) a->client_uid, (int) a->client_pid, why, (unsigned long long) released);
        else if (was_holding)
                log_warning(
                        "Control client (uid %u, pid %d) gone (%s) without stopping tracking: VM resumed, "
                        "%llu bytes of output stay held, and new output too, until a client attaches "
                        "and releases it (or stops tracking).",
                        (unsigned) a->client_uid, (int) a->client_pid, why, (unsigned long long) released);
        else if (was_tracking)
                log_warning("Control client (uid %u, pid %d) gone (%s): tracking stopped, VM resumed; "
                            "the VM now runs unprotected.",
                            (unsigned) a->client_uid, (int) a->client_pid, why);
        else
                log_info("Control client (uid %u, pid %d) gone (%s).", (unsigned) a->client_uid,
                         (int) a->client_pid, why);

        a->client_fd = safe_close(a->client_fd);
        a->hello_done = false;
}

static void accept_client(DrAgent *a)
{
        _cleanup_close_ int fd = -EBADF;
        struct ucred cred = {};
        socklen_t sl = sizeof(cred);
        struct timeval tv = {.tv_sec = AGENT_SEND_TIMEOUT_MS / 1000,
                             .tv_usec = (AGENT_SEND_TIMEOUT_MS % 1000) * 1000};
        int fl;

        fd = accept4(a->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd < 0) {
                if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
                        log_warning_errno(-errno, "accept() on the control socket failed: %m");
                return;
        }

        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &sl) < 0) {
                log_warning_errno(-errno, "SO_PEERCRED failed, refusing the connection: %m");
                return;
        }
        if (cred.uid != 0 && cred.uid != geteuid()) {
                log_warning("Refusing control connection from uid %u (pid %d): only root and uid %u may "
                            "control this VM.",
                            (unsigned) cred.uid, (int) cred.pid, (unsigned) geteuid());
                (void) reply_error(fd, 0, -EPERM, "permission denied for uid %u", (unsigned) cred.uid);
                return;
        }
        if (a->client_fd >= 0) {
                log_notice("Refusing a second control client (uid %u, pid %d): pid %d is attached.",
                           (unsigned) cred.uid, (int) cred.pid, (int) a->client_pid);
                (void) reply_error(fd, 0, -EBUSY, "another client (pid %d) is attached",
                                   (int) a->client_pid);
                return;
        }

        /* Blocking, but a peer that stops reading cannot hold the agent thread for long. */
        fl = fcntl(fd, F_GETFL);
        if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0 ||
            setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) < 0) {
                log_warning_errno(-errno, "Cannot set up the control connection: %m");
                return;
        }

        a->client_fd = TAKE_FD(fd);
        a->client_uid = cred.uid;
        a->client_pid = cred.pid;
        a->hello_done = false;
        /* Under the lock: dr_agent_set_regions() checks `attached` under it. */
        pthread_mutex_lock(&a->lock);
        atomic_store(&a->attached, true);
        pthread_mutex_unlock(&a->lock);
        log_info("Control client attached (uid %u, pid %d).", (unsigned) cred.uid, (int) cred.pid);
}

/* recv() returned 0: the peer closed, or sent an empty packet. Only poll can tell. */
static bool peer_closed(int fd)
{
        struct pollfd p = {.fd = fd, .events = POLLRDHUP};
        return poll(&p, 1, 0) > 0 && (p.revents & (POLLHUP | POLLRDHUP | POLLERR));
}

static void client_input(DrAgent *a, uint8_t *buf)
{
        Dr__Control__Request *req;
        _cleanup_free_ Ctx *c = NULL;
        int fds[FDPASS_MAX_FDS];
        size_t n_fds = 0;
        ssize_t n;
        int r;

        n = fdpass_recv(a->client_fd, buf, MAX_MESSAGE, fds, ELEMENTSOF(fds), &n_fds);
        /* The agent has no use for fds from the client. */
        fdpass_close_all(fds, n_fds);

        if (n == -EAGAIN || n == -EINTR)
                return;
        if (n == -EMSGSIZE) {
                log_notice("Control client sent a packet over %zu bytes.", MAX_MESSAGE);
                r = reply_error(a->client_fd, 0, -EMSGSIZE, "packet larger than %zu bytes", MAX_MESSAGE);
                goto sent;
        }
        if (n == -ETOOMANYREFS) {
                r = reply_error(a->client_fd, 0, -ETOOMANYREFS, "too many file descriptors (closed)");
                goto sent;
        }
        if (n < 0) {
                log_warning_errno((int) n, "Receiving from the control client failed: %m");
                agent_detach(a, "receive error");
                return;
        }
        if (n == 0) {
                if (peer_closed(a->client_fd)) {
                        agent_detach(a, "connection closed");
                        return;
                }
                r = reply_error(a->client_fd, 0, -EBADMSG, "empty packet");
                goto sent;
        }

        req = dr__control__request__unpack(NULL, (size_t) n, buf);
        if (!req) {
                log_notice("Control client sent a malformed request (%zd bytes).", n);
                r = reply_error(a->client_fd, 0, -EBADMSG, "malformed request (%zd bytes)", n);
                goto sent;
        }

        c = calloc(1, sizeof(*c));
        if (!c) {
                r = reply_error(a->client_fd, req->id, -ENOMEM, "out of memory");
                dr__control__request__free_unpacked(req, NULL);
                goto sent;
        }
        c->reply = (Dr__Control__Reply) DR__CONTROL__REPLY__INIT;
        c->reply.id = req->id;
        r = dispatch(a, req, c);
        log_debug("Request %llu (body %d): %d", (unsigned long long) req->id, (int) req->body_case, r);
        dr__control__request__free_unpacked(req, NULL);

        c->reply.error = r < 0 ? r : 0;
        if (r < 0) {
                c->reply.body_case = DR__CONTROL__REPLY__BODY__NOT_SET;
                c->n_fds = 0;
                if (!c->message[0])
                        snprintf(c->message, sizeof(c->message), "%s", strerror(-r));
        }
        if (c->message[0])
                c->reply.error_message = c->message;
        r = reply_send(a->client_fd, &c->reply, c->fds, c->n_fds);
        if (r >= 0 && c->close_after) {
                agent_detach(a, "protocol version mismatch");
                return;
        }
sent:
        if (r < 0)
                agent_detach(a, r == -EAGAIN ? "reply not read in time" : "reply could not be sent");
}

void *agent_thread_main(void *userdata)
{
        DrAgent *a = userdata;
        _cleanup_free_ uint8_t *buf = malloc(MAX_MESSAGE);
        sigset_t set;

        /* The kick signal is for vCPU threads only. */
        sigemptyset(&set);
        sigaddset(&set, a->kick_signal);
        pthread_sigmask(SIG_BLOCK, &set, NULL);

        if (!buf) {
                log_oom();
                return NULL;
        }

        for (;;) {
                struct pollfd p[3] = {
                        {.fd = a->stop_fd, .events = POLLIN},
                        {.fd = a->listen_fd, .events = POLLIN},
                        {.fd = a->client_fd, .events = POLLIN},
                };
                int n = poll(p, a->client_fd >= 0 ? 3 : 2, -1);

                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        log_error_errno(-errno, "poll() in the agent thread failed: %m");
                        break;
                }
                if (p[0].revents)
                        break;
                if (a->client_fd >= 0 && p[2].revents)
                        client_input(a, buf);
                if (p[1].revents & POLLIN)
                        accept_client(a);
        }

        agent_detach(a, "VMM stopping");
        return NULL;
}

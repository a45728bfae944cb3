/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * libdirtyrep-agent: object lifetime, the vCPU hooks, dirty tracking
 * switches, the vmm_dirty bitmap and the output queue front end. The
 * control socket is served in server.c.
 *
 * vCPU coordination in one paragraph: every vCPU thread brackets KVM_RUN
 * with dr_agent_vcpu_before_run() and dr_agent_vcpu_handle_exit(). A vCPU
 * is "busy" from before_run() returning 0 until it calls before_run()
 * again. Pause sets `paused` and kicks busy vCPUs (immediate_exit + signal);
 * it is complete when no vCPU is busy: each is parked in before_run(),
 * waiting there for a ring reset, wedged, stopped, or has not started.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "agent-internal.h"
#include "log.h"
#include "macros.h"
#include "util.h"

static void kick_handler(int sig)
{
        /* Nothing: the point is that KVM_RUN returns -EINTR. */
}

static int bind_socket(const char *path, int *ret_fd)
{
        _cleanup_close_ int fd = -EBADF;
        struct sockaddr_un sa = {.sun_family = AF_UNIX};

        if (strlen(path) >= sizeof(sa.sun_path))
                return -ENAMETOOLONG;
        strcpy(sa.sun_path, path);

        fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;

        if (bind(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0) {
                _cleanup_close_ int probe = -EBADF;
                struct stat st;

                if (errno != EADDRINUSE)
                        return -errno;
                /* Replace a stale socket, but never a live agent's or a non-socket. */
                if (lstat(path, &st) < 0)
                        return -errno;
                if (!S_ISSOCK(st.st_mode))
                        return -EEXIST;
                probe = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
                if (probe < 0)
                        return -errno;
                if (connect(probe, (struct sockaddr *) &sa, sizeof(sa)) >= 0)
                        return -EADDRINUSE;
                if (errno != ECONNREFUSED && errno != ENOENT)
                        return -errno;
                if (unlink(path) < 0 && errno != ENOENT)
                        return -errno;
                if (bind(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0)
                        return -errno;
        }

        /*
         * The socket file was created with the umask's mode. Nobody can
         * connect before listen(), so tightening it here leaves no window.
         */
        if (chmod(path, 0600) < 0 || listen(fd, 8) < 0) {
                int r = -errno;
                (void) unlink(path);
                return r;
        }
        *ret_fd = TAKE_FD(fd);
        return 0;
}

static int validate_regions(const DrAgentRegion *regions, size_t n)
{
        if (!regions || n == 0 || n > DR_AGENT_MAX_REGIONS)
                return -EINVAL;
        for (size_t i = 0; i < n; i++) {
                const DrAgentRegion *r = &regions[i];

                if (r->memfd < 0 || !r->host_addr || r->size == 0 || r->size % PAGE_SIZE_4K != 0 ||
                    r->guest_phys % PAGE_SIZE_4K != 0 || r->memfd_offset % PAGE_SIZE_4K != 0 ||
                    r->guest_phys + r->size < r->guest_phys ||
                    (r->kvm_flags & ~(uint32_t) KVM_MEM_READONLY) != 0)
                        return -EINVAL;
                for (size_t j = 0; j < i; j++) {
                        const DrAgentRegion *o = &regions[j];
                        if (o->slot == r->slot)
                                return -EINVAL;
                        if (r->guest_phys < o->guest_phys + o->size &&
                            o->guest_phys < r->guest_phys + r->size)
                                return -EINVAL;
                }
        }
        return 0;
}

static int validate_config(const DrAgentConfig *cfg)
{
        if (!cfg || isempty(cfg->socket_path) || cfg->kvm_fd < 0 || cfg->vm_fd < 0)
                return -EINVAL;
        if (cfg->mode != DR_TRACKING_RING && cfg->mode != DR_TRACKING_BITMAP)
                return -EINVAL;
        if (cfg->mode == DR_TRACKING_RING && (!IS_POWER_OF_2(cfg->ring_entries) || cfg->ring_entries < 256 ||
                                              cfg->ring_entries > AGENT_MAX_RING_ENTRIES))
                return -EINVAL; /* KVM: power of two, >= one page, <= 64k entries */
        if (cfg->n_vcpus == 0 || cfg->n_vcpus > DR_AGENT_MAX_VCPUS)
                return -EINVAL;
        if (cfg->kick_signal < 0 || cfg->kick_signal > SIGRTMAX || cfg->kick_signal == SIGKILL ||
            cfg->kick_signal == SIGSTOP)
                return -EINVAL;
        return validate_regions(cfg->regions, cfg->n_regions);
}

/* Turns on manual dirty-log protection (+ initially-set) for bitmap mode when KVM has it. */
static bool enable_manual_protect(int vm_fd)
{
        int caps = ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);
        struct kvm_enable_cap cap = {.cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2};

        if (caps <= 0)
                return false;
        cap.args[0] = (uint64_t) caps & (KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET);
        if (ioctl(vm_fd, KVM_ENABLE_CAP, &cap) < 0) {
                log_info_errno(-errno, "Cannot enable KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, "
                                       "KVM_GET_DIRTY_LOG clears on read: %m");
                return false;
        }
        return true;
}

static void close_regions(AgentRegion *regions, size_t n)
{
        for (size_t i = 0; i < n; i++)
                regions[i].r.memfd = safe_close(regions[i].r.memfd);
}

/* A memfd of size bytes, mapped shared read-write: 0 and both set, or a negative errno and neither. */
static int shared_memfd_new(const char *name, uint64_t size, int *ret_fd, uint8_t **ret_map)
{
        _cleanup_close_ int fd = memfd_new_sized(name, size);
        void *map;

        if (fd < 0)
                return fd;
        map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (map == MAP_FAILED)
                return -errno;
        *ret_fd = TAKE_FD(fd);
        *ret_map = map;
        return 0;
}

/*
 * Takes a validated region list: dups the memfds, lays out one 64-bit
 * aligned bitmap per region in the shared bitmaps, and creates the
 * vmm_dirty memfd (and the bitmap memfd in bitmap mode) to match. Replaces
 * what was there only when everything succeeded.
 */
static int regions_install(DrAgent *a, const DrAgentRegion *regions, size_t n)
{
        AgentRegion nr[DR_AGENT_MAX_REGIONS] = {};
        _cleanup_close_ int vd_fd = -EBADF, bm_fd = -EBADF;
        uint8_t *vd_map = NULL, *bm_map = NULL;
        uint64_t off = AGENT_VMM_DIRTY_HEADER, bm_size = 0, vd_size;
        int r;

        for (size_t i = 0; i < n; i++)
                nr[i].r.memfd = -EBADF;
        for (size_t i = 0; i < n; i++) {
                AgentRegion *ar = &nr[i];

                ar->r = regions[i];
                ar->r.memfd = fcntl(regions[i].memfd, F_DUPFD_CLOEXEC, 3);
                if (ar->r.memfd < 0) {
                        r = -errno;
                        goto fail;
                }
                ar->npages = ar->r.size / a->page_size;
                ar->bitmap_bytes = DIV_ROUND_UP(ar->npages, 64) * 8;
                ar->bitmap_offset = bm_size;
                bm_size += ar->bitmap_bytes;
                ar->vmm_dirty_offset = off;
                off += ar->bitmap_bytes;
        }
        vd_size = ALIGN_TO(off, (uint64_t) a->page_size);
        bm_size = ALIGN_TO(bm_size, (uint64_t) a->page_size);

        if (a->mode == DR_TRACKING_BITMAP) {
                r = shared_memfd_new("dirtyrep-bitmap", bm_size, &bm_fd, &bm_map);
                if (r < 0)
                        goto fail;
        }
        r = shared_memfd_new("dirtyrep-vmm-dirty", vd_size, &vd_fd, &vd_map);
        if (r < 0)
                goto fail;
        /* Header: magic bytes, then le64 sequence (x86-64 is little-endian: native atomics are le). */
        memcpy(vd_map, AGENT_VMM_DIRTY_MAGIC, 8);
        ((uint64_t *) vd_map)[1] = 0;

        /* Swap in. */
        close_regions(a->regions, a->n_regions);
        memcpy(a->regions, nr, sizeof(nr));
        a->n_regions = n;
        if (a->bitmap_map)
                munmap(a->bitmap_map, a->bitmap_size);
        safe_close(a->bitmap_fd);
        a->bitmap_fd = a->mode == DR_TRACKING_BITMAP ? TAKE_FD(bm_fd) : -EBADF;
        a->bitmap_map = bm_map;
        a->bitmap_size = bm_size;
        if (a->vmm_dirty_map)
                munmap(a->vmm_dirty_map, a->vmm_dirty_size);
        safe_close(a->vmm_dirty_fd);
        a->vmm_dirty_fd = TAKE_FD(vd_fd);
        a->vmm_dirty_map = vd_map;
        a->vmm_dirty_size = vd_size;
        return 0;

fail:
        close_regions(nr, n);
        if (bm_map)
                munmap(bm_map, bm_size);
        if (vd_map)
                munmap(vd_map, vd_size);
        return r;
}

int dr_agent_set_regions(DrAgent *a, const DrAgentRegion *regions, size_t n_regions)
{
        int r;

        if (!a)
                return -EINVAL;
        r = validate_regions(regions, n_regions);
        if (r < 0)
                return r;

        /*
         * Under the lock: accept_client() sets `attached` under it before the
         * agent thread reads any region, so either the client sees the new
         * list or we see the client.
         */
        pthread_mutex_lock(&a->lock);
        if (atomic_load(&a->attached)) {
                /* Tracking cannot follow (KVM would get flags for slots that no longer exist, or
                 * miss new ones): fail the session's tracking requests rather than let the
                 * replica silently miss pages. */
                atomic_store(&a->layout_stale, true);
                r = -EBUSY;
        } else {
                /*
                 * Not attached, so not tracking (detach clears `tracking` first): a
                 * note_guest_write() that starts now returns before it touches the
                 * regions. One that saw tracking on before the detach may still walk
                 * them: wait for it (it never blocks).
                 */
                while (atomic_load(&a->note_users) > 0)
                        sched_yield();
                r = regions_install(a, regions, n_regions);
                if (r >= 0)
                        atomic_store(&a->layout_stale, false);
        }
        pthread_mutex_unlock(&a->lock);
        return r;
}

static void dr_agent_freep_internal(DrAgent **a)
{
        if (*a)
                *a = dr_agent_free(*a);
}

int dr_agent_new(const DrAgentConfig *cfg, DrAgent **ret)
{
        _cleanup_(dr_agent_freep_internal) DrAgent *a = NULL;
        struct sigaction sa = {.sa_handler = kick_handler};
        pthread_condattr_t ca;
        int r;

        if (!ret)
                return -EINVAL;
        r = validate_config(cfg);
        if (r < 0)
                return r;

        a = calloc(1, sizeof(*a));
        if (!a)
                return -ENOMEM;
        a->listen_fd = a->stop_fd = a->ring_full_fd = a->bitmap_fd = a->vmm_dirty_fd = a->state_fd =
                a->client_fd = -EBADF;
        for (size_t i = 0; i < DR_AGENT_MAX_REGIONS; i++)
                a->regions[i].r.memfd = -EBADF;
        pthread_mutex_init(&a->lock, NULL);
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&a->vcpu_cond, &ca);
        pthread_cond_init(&a->agent_cond, &ca);
        pthread_condattr_destroy(&ca);

        a->kvm_fd = cfg->kvm_fd;
        a->vm_fd = cfg->vm_fd;
        a->mode = cfg->mode;
        a->ring_entries = cfg->mode == DR_TRACKING_RING ? cfg->ring_entries : 0;
        a->page_size = (uint32_t) sysconf(_SC_PAGESIZE);
        a->cb = cfg->cb;
        a->userdata = cfg->userdata;
        a->kick_signal = cfg->kick_signal ?: SIGUSR1;
        memcpy(a->vm_uuid, cfg->vm_uuid, sizeof(a->vm_uuid));
        a->socket_path = strdup(cfg->socket_path);
        a->vm_name = strdup(cfg->vm_name ?: "");
        if (!a->socket_path || !a->vm_name)
                return -ENOMEM;

        a->vcpus = calloc(cfg->n_vcpus, sizeof(AgentVcpu));
        if (!a->vcpus)
                return -ENOMEM;
        a->n_vcpus = cfg->n_vcpus;
        for (unsigned i = 0; i < cfg->n_vcpus; i++)
                a->vcpus[i] = (AgentVcpu){
                        .index = i,
                        .fd = -EBADF,
                        .state = DR__CONTROL__VCPU_RUN_STATE__VCPU_RUN_STATE_STOPPED,
                };

        r = output_queue_new(DR_AGENT_MAX_CHANNELS, cfg->output_limit ?: AGENT_DEFAULT_OUTPUT_LIMIT,
                             a->cb.output_release, a->userdata, &a->outq);
        if (r < 0)
                return r;

        a->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (a->stop_fd < 0)
                return -errno;

        if (a->mode == DR_TRACKING_RING) {
                a->ring_full_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
                if (a->ring_full_fd < 0)
                        return -errno;
        } else
                a->manual_protect = enable_manual_protect(a->vm_fd);

        r = regions_install(a, cfg->regions, cfg->n_regions);
        if (r < 0)
                return r;

        a->state_size = AGENT_STATE_INITIAL;
        a->state_fd = memfd_new_sized("dirtyrep-state", a->state_size);
        if (a->state_fd < 0)
                return a->state_fd;

        r = bind_socket(a->socket_path, &a->listen_fd);
        if (r < 0)
                return log_error_errno(r, "Failed to create control socket %s: %m", a->socket_path);

        /* No SA_RESTART: the signal exists to make KVM_RUN return -EINTR. */
        sigemptyset(&sa.sa_mask);
        if (sigaction(a->kick_signal, &sa, NULL) < 0)
                return -errno;

        *ret = TAKE_PTR(a);
        return 0;
}

int dr_agent_add_vcpu(DrAgent *a, unsigned index, int vcpu_fd, struct kvm_run *run)
{
        AgentVcpu *v;

        if (!a || index >= a->n_vcpus || vcpu_fd < 0 || !run || a->started)
                return -EINVAL;
        v = &a->vcpus[index];
        if (v->registered)
                return -EEXIST;
        v->fd = vcpu_fd;
        v->run = run;

        if (a->mode == DR_TRACKING_RING) {
                /* Our own view of the ring, for the ring-full checks and self-harvest. */
                void *p = mmap(NULL, (size_t) a->ring_entries * sizeof(struct kvm_dirty_gfn),
                               PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd,
                               (off_t) KVM_DIRTY_LOG_PAGE_OFFSET * a->page_size);
                if (p == MAP_FAILED)
                        log_warning_errno(-errno,
                                          "vCPU %u: cannot map its dirty ring, jam detection is "
                                          "limited: %m",
                                          index);
                else
                        v->ring = p;
        }

        if (index == 0) {
                /* Before the vCPU runs: a vCPU ioctl from another thread would wait for KVM_RUN. */
                int khz = ioctl(vcpu_fd, KVM_GET_TSC_KHZ);
                if (khz <= 0)
                        khz = ioctl(a->vm_fd, KVM_GET_TSC_KHZ);
                a->tsc_khz = khz > 0 ? (uint64_t) khz : 0;
        }
        v->registered = true;
        return 0;
}

int dr_agent_start(DrAgent *a)
{
        int r;

        if (!a || a->started)
                return -EINVAL;
        for (unsigned i = 0; i < a->n_vcpus; i++)
                if (!a->vcpus[i].registered)
                        return -EINVAL;
        r = -pthread_create(&a->thread, NULL, agent_thread_main, a);
        if (r < 0)
                return r;
        a->started = true;
        return 0;
}

void dr_agent_stop(DrAgent *a)
{
        if (!a)
                return;

        pthread_mutex_lock(&a->lock);
        a->stopping = true;
        agent_kick_locked(a);
        pthread_cond_broadcast(&a->vcpu_cond);
        pthread_mutex_unlock(&a->lock);

        if (a->started && !a->stopped) {
                (void) eventfd_write(a->stop_fd, 1);
                pthread_join(a->thread, NULL);
                a->stopped = true;
        }
}

DrAgent *dr_agent_free(DrAgent *a)
{
        if (!a)
                return NULL;

        dr_agent_stop(a);
        if (a->listen_fd >= 0)
                (void) unlink(a->socket_path);
        safe_close(a->listen_fd);
        safe_close(a->client_fd);
        safe_close(a->stop_fd);
        safe_close(a->ring_full_fd);
        safe_close(a->bitmap_fd);
        safe_close(a->vmm_dirty_fd);
        safe_close(a->state_fd);
        for (size_t i = 0; i < DR_AGENT_MAX_REGIONS; i++)
                safe_close(a->regions[i].r.memfd);
        if (a->bitmap_map)
                munmap(a->bitmap_map, a->bitmap_size);
        if (a->vmm_dirty_map)
                munmap(a->vmm_dirty_map, a->vmm_dirty_size);
        for (unsigned i = 0; a->vcpus && i < a->n_vcpus; i++)
                if (a->vcpus[i].ring)
                        munmap(a->vcpus[i].ring, (size_t) a->ring_entries * sizeof(struct kvm_dirty_gfn));
        if (a->outq) {
                /* Held output was never acknowledged by a standby (a client stopped with
                 * hold_output or vanished, or the VM is suspended and another host may serve
                 * it now): letting it out as the VMM exits would show clients replies that a
                 * failover rolls back. Nothing is held unless a client asked for it. */
                uint64_t held = output_queue_held_bytes(a->outq);

                if (held > 0)
                        log_warning("VMM stopping with %llu bytes of output held for a standby's "
                                    "acknowledgement%s: dropped, not released.",
                                    (unsigned long long) held, a->suspended ? " (the VM is suspended)" : "");
                output_queue_free(a->outq);
        }
        pthread_cond_destroy(&a->vcpu_cond);
        pthread_cond_destroy(&a->agent_cond);
        pthread_mutex_destroy(&a->lock);
        free(a->vcpus);
        free(a->socket_path);
        free(a->vm_name);
        free(a);
        return NULL;
}

/* ---- vCPU side ---- */

bool agent_all_idle_locked(DrAgent *a)
{
        for (unsigned i = 0; i < a->n_vcpus; i++)
                if (a->vcpus[i].busy)
                        return false;
        return true;
}

/*
 * Kick every busy vCPU out of KVM_RUN. Called with a->lock held, after the
 * caller set `paused` or `stopping`.
 *
 * Why no kick is lost: immediate_exit is stored before pthread_kill(). The
 * vCPU thread is then in one of three places:
 *  - inside KVM_RUN: the signal makes it return -EINTR;
 *  - between before_run() and the KVM_RUN ioctl: the no-op handler eats the
 *    signal, but KVM_RUN sees immediate_exit == 1 (stored before the kill,
 *    which is a system call, so it is visible) and returns -EINTR at once;
 *  - handling an exit in the VMM: its next before_run() takes the lock and
 *    sees the flag.
 * before_run() clears immediate_exit only under the lock and only when
 * neither flag is set, so it cannot wipe out a kick that is still wanted.
 */
void agent_kick_locked(DrAgent *a)
{
        for (unsigned i = 0; i < a->n_vcpus; i++) {
                AgentVcpu *v = &a->vcpus[i];

                if (!v->busy || !v->thread_known)
                        continue;
                __atomic_store_n(&v->run->immediate_exit, 1, __ATOMIC_RELAXED);
                (void) pthread_kill(v->thread, a->kick_signal);
        }
}

int dr_agent_vcpu_thread_init(DrAgent *a, unsigned index)
{
        sigset_t set;
        AgentVcpu *v;

        if (!a || index >= a->n_vcpus || !a->vcpus[index].registered)
                return -EINVAL;
        v = &a->vcpus[index];

        sigemptyset(&set);
        sigaddset(&set, a->kick_signal);
        pthread_sigmask(SIG_UNBLOCK, &set, NULL);

        pthread_mutex_lock(&a->lock);
        v->thread = pthread_self();
        v->thread_known = true;
        v->state = DR__CONTROL__VCPU_RUN_STATE__VCPU_RUN_STATE_RUNNING;
        pthread_mutex_unlock(&a->lock);
        return 0;
}

int dr_agent_vcpu_before_run(DrAgent *a, unsigned index)
{
        AgentVcpu *v;
        int r = 0;

        if (!a || index >= a->n_vcpus)
                return -EINVAL;
        v = &a->vcpus[index];

        pthread_mutex_lock(&a->lock);

        /*
         * Parking right after an exit the VMM handled: KVM may still owe the
         * guest the completion of that I/O instruction (the data of an IN,
         * RIP past an OUT). Let it finish with an immediate-exit KVM_RUN
         * before we count as parked, so SaveState never captures a
         * half-executed instruction that the replica would then repeat.
         */
        if ((a->paused || a->stopping) && v->pending_completion) {
                v->pending_completion = false;
                pthread_mutex_unlock(&a->lock);
                __atomic_store_n(&v->run->immediate_exit, 1, __ATOMIC_RELAXED);
                if (ioctl(v->fd, KVM_RUN, 0) == 0)
                        log_warning("vCPU %u: exit %u while completing I/O before a pause; it is not "
                                    "delivered to the VMM",
                                    index, v->run->exit_reason);
                pthread_mutex_lock(&a->lock);
        }

        v->busy = false;
        pthread_cond_broadcast(&a->agent_cond);

        for (;;) {
                if (a->stopping) {
                        v->state = DR__CONTROL__VCPU_RUN_STATE__VCPU_RUN_STATE_STOPPED;
                        r = -ESHUTDOWN;
                        break;
                }
                if (v->wedged) {
                        v->state = DR__CONTROL__VCPU_RUN_STATE__VCPU_RUN_STATE_WEDGED;
                        r = -EDEADLK;
                        break;
                }
                if (a->paused) {
                        v->state = DR__CONTROL__VCPU_RUN_STATE__VCPU_RUN_STATE_PARKED;
                        pthread_cond_wait(&a->vcpu_cond, &a->lock);
                        continue;
                }
                if (v->ring_wait) {
                        if (a->reset_gen == v->ring_wait_gen && atomic_load(&a->attached) &&
                            atomic_load(&a->tracking)) {
                                v->state = DR__CONTROL__VCPU_RUN_STATE__VCPU_RUN_STATE_RING_FULL;
                                pthread_cond_wait(&a->vcpu_cond, &a->lock);
                                continue;
                        }
                        v->ring_wait = false;
                }
                v->state = DR__CONTROL__VCPU_RUN_STATE__VCPU_RUN_STATE_RUNNING;
                v->busy = true;
                v->pending_completion = false; /* this KVM_RUN completes it */
                /* Safe only here: under the lock with no pause or stop in effect (see agent_kick_locked). */
                __atomic_store_n(&v->run->immediate_exit, 0, __ATOMIC_RELAXED);
                break;
        }

        pthread_mutex_unlock(&a->lock);
        return r;
}

/* Counts entries the client still has to collect (DIRTY) or that wait for a reset (RESET). */
static void ring_peek(DrAgent *a, AgentVcpu *v, size_t *ret_dirty, size_t *ret_reset)
{
        size_t d = 0, s = 0;

        for (uint32_t i = 0; v->ring && i < a->ring_entries; i++) {
                /* Acquire pairs with KVM's release store of DIRTY after it wrote slot/offset. */
                uint32_t f = __atomic_load_n(&v->ring[i].flags, __ATOMIC_ACQUIRE);
                if (f == KVM_DIRTY_GFN_F_DIRTY)
                        d++;
                else if (f & KVM_DIRTY_GFN_F_RESET)
                        s++;
        }
        *ret_dirty = d;
        *ret_reset = s;
}

/*
 * Marks every DIRTY entry of v's ring collected, discarding it. Only for
 * when nobody needs the dirty pages: no client, or tracking just stopped.
 * It scans the whole ring rather than following a fetch index because the
 * client's index is unknown to us.
 */
size_t agent_ring_drain(DrAgent *a, AgentVcpu *v)
{
        size_t n = 0;

        for (uint32_t i = 0; v->ring && i < a->ring_entries; i++)
                /* Acquire: see above. Release: KVM_RESET_DIRTY_RINGS must see RESET only after our read. */
                if (__atomic_load_n(&v->ring[i].flags, __ATOMIC_ACQUIRE) == KVM_DIRTY_GFN_F_DIRTY) {
                        __atomic_store_n(&v->ring[i].flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
                        n++;
                }
        return n;
}

/* With a->lock held. Returns true when the vCPU just got wedged (caller logs and calls back). */
static bool wedge_account_locked(DrAgent *a, AgentVcpu *v, bool suspect)
{
        if (!suspect) {
                v->wedge_streak = 0;
                return false;
        }
        if (++v->wedge_streak < AGENT_WEDGE_STREAK || v->wedged)
                return false;
        v->wedged = true;
        v->state = DR__CONTROL__VCPU_RUN_STATE__VCPU_RUN_STATE_WEDGED;
        return true;
}

static int handle_ring_full(DrAgent *a, AgentVcpu *v)
{
        size_t n_dirty = 0, n_reset = 0;
        bool wedged, with_client;

        pthread_mutex_lock(&a->lock);
        v->exits++;
        v->ring_full_exits++;
        with_client = atomic_load(&a->attached) && atomic_load(&a->tracking);
        pthread_mutex_unlock(&a->lock);

        if (with_client) {
                bool progress, suspect;

                ring_peek(a, v, &n_dirty, &n_reset);
                pthread_mutex_lock(&a->lock);
                /*
                 * The jam of docs/kvm-host.md: the ring is over-full, KVM's reset
                 * index sits on entries nobody can collect, every reset
                 * returns 0 and the vCPU comes straight back. So: a ring-full
                 * exit with no reset progress since this vCPU's previous one
                 * is suspect; AGENT_WEDGE_STREAK of them in a row is a jam.
                 * (A vCPU waits for a ResetRings between two such exits, so
                 * this never spins. The counter is VM-wide: with several
                 * vCPUs, others' progress can only delay the verdict.)
                 */
                progress = a->resets_total != v->resets_at_last_full;
                v->resets_at_last_full = a->resets_total;
                suspect = !progress;
                wedged = wedge_account_locked(a, v, suspect);
                log_debug("vCPU %u: ring full: %zu entries to collect, %zu to reset, progress %d, streak %u",
                          v->index, n_dirty, n_reset, progress, v->wedge_streak);
                if (!wedged) {
                        /* before_run() waits until the next ResetRings (or detach, stop). */
                        v->ring_wait = true;
                        v->ring_wait_gen = a->reset_gen;
                }
                pthread_mutex_unlock(&a->lock);
                (void) eventfd_write(a->ring_full_fd, 1);
        } else {
                /* Nobody harvests: the pages are not wanted. Free the ring ourselves. */
                size_t n = agent_ring_drain(a, v);
                int r = ioctl(a->vm_fd, KVM_RESET_DIRTY_RINGS);

                pthread_mutex_lock(&a->lock);
                if (r > 0)
                        a->resets_total += (uint64_t) r;
                wedged = wedge_account_locked(a, v, n == 0 && r <= 0);
                pthread_mutex_unlock(&a->lock);
        }

        if (wedged) {
                log_error("vCPU %u: dirty ring jammed: KVM_EXIT_DIRTY_RING_FULL %d times in a row with "
                          "nothing to harvest (a known KVM/PVM failure after bulk kernel-mode stores). "
                          "The vCPU is stopped. Restart the VM with --tracking bitmap to replicate it.",
                          v->index, AGENT_WEDGE_STREAK);
                if (a->cb.vcpu_wedged)
                        a->cb.vcpu_wedged(a->userdata, v->index);
        }
        return 1;
}

int dr_agent_vcpu_handle_exit(DrAgent *a, unsigned index, int run_result)
{
        AgentVcpu *v;

        if (!a || index >= a->n_vcpus)
                return -EINVAL;
        v = &a->vcpus[index];

        if (run_result == -EINTR || run_result == -EAGAIN) {
                pthread_mutex_lock(&a->lock);
                v->exits++;
                pthread_mutex_unlock(&a->lock);
                return 1;
        }

        if (run_result < 0) {
                pthread_mutex_lock(&a->lock);
                v->busy = false;
                v->state = DR__CONTROL__VCPU_RUN_STATE__VCPU_RUN_STATE_STOPPED;
                pthread_cond_broadcast(&a->agent_cond);
                pthread_mutex_unlock(&a->lock);
                return run_result;
        }

        switch (v->run->exit_reason) {
        case KVM_EXIT_DIRTY_RING_FULL:
                return handle_ring_full(a, v);

        case KVM_EXIT_SHUTDOWN:
        case KVM_EXIT_SYSTEM_EVENT:
        case KVM_EXIT_INTERNAL_ERROR:
        case KVM_EXIT_FAIL_ENTRY:
        case KVM_EXIT_HLT:
                /* The VMM normally stops this vCPU now; don't let a Pause wait for it. */
                pthread_mutex_lock(&a->lock);
                v->exits++;
                v->busy = false;
                v->state = DR__CONTROL__VCPU_RUN_STATE__VCPU_RUN_STATE_STOPPED;
                pthread_cond_broadcast(&a->agent_cond);
                pthread_mutex_unlock(&a->lock);
                return 0;

        default:
                pthread_mutex_lock(&a->lock);
                v->exits++;
                v->pending_completion = true;
                pthread_mutex_unlock(&a->lock);
                return 0;
        }
}

void dr_agent_vcpu_thread_exit(DrAgent *a, unsigned index)
{
        if (!a || index >= a->n_vcpus)
                return;
        pthread_mutex_lock(&a->lock);
        a->vcpus[index].busy = false;
        a->vcpus[index].thread_known = false;
        if (!a->vcpus[index].wedged)
                a->vcpus[index].state = DR__CONTROL__VCPU_RUN_STATE__VCPU_RUN_STATE_STOPPED;
        pthread_cond_broadcast(&a->agent_cond);
        pthread_mutex_unlock(&a->lock);
}

/* ---- tracking ---- */

int agent_set_tracking(DrAgent *a, bool on)
{
        int r = 0;

        /* On: note_guest_write() starts recording before KVM does, so nothing falls in between. */
        if (on)
                atomic_store(&a->tracking, true);

        for (size_t i = 0; i < a->n_regions; i++) {
                const AgentRegion *ar = &a->regions[i];
                struct kvm_userspace_memory_region m = {
                        .slot = ar->r.slot,
                        .flags = ar->r.kvm_flags | (on ? KVM_MEM_LOG_DIRTY_PAGES : 0),
                        .guest_phys_addr = ar->r.guest_phys,
                        .memory_size = ar->r.size,
                        .userspace_addr = (uint64_t) (uintptr_t) ar->r.host_addr,
                };
                if (ioctl(a->vm_fd, KVM_SET_USER_MEMORY_REGION, &m) < 0 && r == 0)
                        r = log_error_errno(-errno, "Failed to %s dirty logging on slot %u: %m",
                                            on ? "enable" : "disable", ar->r.slot);
        }

        if (!on) {
                atomic_store(&a->tracking, false);
                if (a->mode == DR_TRACKING_RING) {
                        /* Logging is off: drain what is left so no vCPU stays stuck on a full ring. */
                        int n;

                        for (unsigned i = 0; i < a->n_vcpus; i++)
                                (void) agent_ring_drain(a, &a->vcpus[i]);
                        n = ioctl(a->vm_fd, KVM_RESET_DIRTY_RINGS);
                        pthread_mutex_lock(&a->lock);
                        if (n > 0)
                                a->resets_total += (uint64_t) n;
                        a->reset_gen++;
                        pthread_cond_broadcast(&a->vcpu_cond);
                        pthread_mutex_unlock(&a->lock);
                }
        }
        return r;
}

/* ---- VMM writes to guest RAM ---- */

/* Sets bits [first, first+n) with atomic OR (the client takes them with atomic exchange). */
static void bitmap_set_atomic(uint64_t *words, uint64_t first, uint64_t n)
{
        while (n > 0) {
                uint64_t w = first / 64, b = first % 64;
                uint64_t k = MIN(n, 64 - b);
                uint64_t mask = (k == 64 ? ~0ULL : ((1ULL << k) - 1)) << b;

                __atomic_fetch_or(&words[w], mask, __ATOMIC_RELAXED);
                first += k;
                n -= k;
        }
}

void dr_agent_note_guest_write(DrAgent *a, uint64_t gpa, uint64_t len)
{
        uint64_t end, covered = 0;

        if (!a || len == 0)
                return;
        /* Counted before tracking is looked at: dr_agent_set_regions() waits for us (all seq_cst). */
        atomic_fetch_add(&a->note_users, 1);
        if (!atomic_load(&a->tracking)) {
                atomic_fetch_sub(&a->note_users, 1);
                return;
        }
        end = gpa + len < gpa ? UINT64_MAX : gpa + len;

        for (size_t i = 0; i < a->n_regions; i++) {
                const AgentRegion *ar = &a->regions[i];
                uint64_t lo = MAX(gpa, ar->r.guest_phys), hi = MIN(end, ar->r.guest_phys + ar->r.size);
                uint64_t first, last;

                if (lo >= hi)
                        continue;
                first = (lo - ar->r.guest_phys) / a->page_size;
                last = (hi - 1 - ar->r.guest_phys) / a->page_size;
                bitmap_set_atomic((uint64_t *) (a->vmm_dirty_map + ar->vmm_dirty_offset), first,
                                  last - first + 1);
                covered += hi - lo;
        }

        if (covered < len)
                log_debug("VMM write to [0x%llx, +0x%llx) is partly outside guest RAM, %llu bytes ignored",
                          (unsigned long long) gpa, (unsigned long long) len,
                          (unsigned long long) (len - covered));
        if (covered > 0)
                /* Release: a client that loads the new sequence (acquire) sees the bits set above. */
                __atomic_fetch_add((uint64_t *) a->vmm_dirty_map + 1, 1, __ATOMIC_RELEASE);
        atomic_fetch_sub(&a->note_users, 1);
}

/* ---- output ---- */

int dr_agent_output_submit(DrAgent *a, unsigned channel, const void *buf, size_t len)
{
        if (!a || channel >= DR_AGENT_MAX_CHANNELS)
                return -EINVAL;
        return output_queue_submit(a->outq, channel, buf, len);
}

size_t dr_agent_output_space(DrAgent *a, unsigned channel)
{
        if (!a || channel >= DR_AGENT_MAX_CHANNELS)
                return 0;
        return output_queue_space(a->outq, channel);
}

bool dr_agent_attached(DrAgent *a)
{
        return a && atomic_load(&a->attached);
}

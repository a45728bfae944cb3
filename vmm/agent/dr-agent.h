/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * libdirtyrep-agent: the VMM side of the dirtyrep control protocol
 * (proto/control.proto). A VMM links it, describes its VM (memory regions,
 * vCPUs, tracking mode), calls two hooks around KVM_RUN in every vCPU
 * thread, and the agent does the rest on a thread of its own: it serves the
 * control socket, hands the daemon the fds it needs, pauses and resumes
 * vCPUs, resets dirty rings, saves the VM's state, fetches dirty bitmaps and
 * holds guest output until the daemon says its epoch committed.
 *
 * Conventions: functions return 0 (or a count) on success and a negative
 * errno on failure; they never exit or abort on bad input. Objects returned
 * by *_new() are owned by the caller and released with *_free(), which
 * accepts NULL and returns NULL.
 *
 * Threading: dr_agent_vcpu_*() are called only from the vCPU's own thread.
 * dr_agent_note_guest_write() and dr_agent_output_submit() may be called
 * from any VMM thread. Everything else from the thread that owns the agent.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <linux/kvm.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DR_AGENT_MAX_VCPUS    128
#define DR_AGENT_MAX_REGIONS  32
#define DR_AGENT_MAX_CHANNELS 4

typedef struct DrAgent DrAgent;

typedef enum DrTrackingMode {
        DR_TRACKING_RING = 1,   /* KVM_CAP_DIRTY_LOG_RING(_ACQ_REL), harvested by the daemon */
        DR_TRACKING_BITMAP = 2, /* KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG (MANUAL_PROTECT2) */
} DrTrackingMode;

/* One KVM memory slot backed by a memfd. The VMM registers the slot itself. */
typedef struct DrAgentRegion {
        uint32_t slot;
        uint64_t guest_phys;
        uint64_t size;
        int memfd; /* borrowed; the agent dups what it needs */
        uint64_t memfd_offset;
        void *host_addr;    /* the VMM's mapping (userspace_addr of the slot) */
        uint32_t kvm_flags; /* other KVM_MEM_* flags of the slot (KVM_MEM_READONLY), kept when
                             * tracking switches KVM_MEM_LOG_DIRTY_PAGES; 0 for plain RAM */
} DrAgentRegion;

typedef struct DrAgentCallbacks {
        /*
         * Serialize the VMM's device state (called with the VM paused).
         * Set *ret_buf to a malloc()ed buffer the agent frees. Optional.
         */
        int (*save_devices)(void *userdata, uint8_t **ret_buf, size_t *ret_len);
        /*
         * Output on `channel` was released (its epoch committed, or no daemon
         * is attached) and may now go to the outside world. Called from the
         * agent thread, or from the submitting thread when nothing is held.
         * Must not block for long; the VMM buffers what it cannot send.
         */
        void (*output_release)(void *userdata, unsigned channel, const void *buf, size_t len);
        /* A vCPU's ring jammed (docs/kvm-host.md): informational, the vCPU is stopped. Optional. */
        void (*vcpu_wedged)(void *userdata, unsigned vcpu);
} DrAgentCallbacks;

typedef struct DrAgentConfig {
        const char *socket_path; /* unix SOCK_SEQPACKET, created mode 0600 */
        int kvm_fd;              /* borrowed */
        int vm_fd;               /* borrowed */
        const char *vm_name;
        uint8_t vm_uuid[16];
        DrTrackingMode mode;
        uint32_t ring_entries; /* per vCPU, ring mode only (KVM_CAP_DIRTY_LOG_RING was enabled with it) */
        const DrAgentRegion *regions;
        size_t n_regions;
        unsigned n_vcpus;
        size_t output_limit; /* bytes held per channel before submit returns -ENOBUFS; 0: 16 MiB */
        int kick_signal;     /* signal used to kick vCPU threads out of KVM_RUN; 0: SIGUSR1 */
        DrAgentCallbacks cb;
        void *userdata;
} DrAgentConfig;

/*
 * Creates the agent: validates cfg, creates the shared memfds and binds the
 * control socket (replacing a stale one). Installs a no-op, non-SA_RESTART
 * handler for kick_signal. Does not start serving yet.
 */
int dr_agent_new(const DrAgentConfig *cfg, DrAgent **ret);

/*
 * Replaces the region list (same rules as DrAgentConfig.regions) for a VMM
 * whose memory slots change while it runs (QEMU: firmware reprogramming the
 * PC's shadow RAM at boot). Only while no control client is attached: a
 * client holds a layout and dirty-ring entries that name the old slots.
 * Returns -EBUSY while one is attached, -EINVAL for a bad list. Any thread.
 * After -EBUSY the attached client's tracking requests fail with -ESTALE
 * (its layout is no longer KVM's: it must detach and attach again), and the
 * caller must call again once the client is gone (QEMU retries on a timer):
 * the agent keeps the old list until then.
 */
int dr_agent_set_regions(DrAgent *a, const DrAgentRegion *regions, size_t n_regions);

/* Registers vCPU `index` (0..n_vcpus-1) with its fd and kvm_run mapping. Before dr_agent_start(). */
int dr_agent_add_vcpu(DrAgent *a, unsigned index, int vcpu_fd, struct kvm_run *run);

/* Starts the agent thread serving the control socket. */
int dr_agent_start(DrAgent *a);

/*
 * Stops the agent: every vCPU parked or waiting is released and
 * dr_agent_vcpu_before_run() returns -ESHUTDOWN from then on. Joins the
 * agent thread. Call before joining vCPU threads.
 */
void dr_agent_stop(DrAgent *a);

/* Stops (if needed), closes the socket and frees. Accepts NULL; returns NULL. */
DrAgent *dr_agent_free(DrAgent *a);

/* Called by each vCPU thread once, before its first KVM_RUN. */
int dr_agent_vcpu_thread_init(DrAgent *a, unsigned index);

/*
 * Called before every KVM_RUN. Blocks while the VM is paused or while this
 * vCPU waits for its dirty ring to be reset. Returns 0 to go on running,
 * -ESHUTDOWN when the VMM is stopping, -EDEADLK when the vCPU's dirty ring
 * jammed ("ring full, nothing to harvest"; the error was logged).
 * On 0 it has cleared run->immediate_exit (the agent's own kick): a VMM that
 * kicks its vCPUs through immediate_exit too must set it again after this
 * call when one of its kicks is still outstanding (QEMU's patch does, from
 * cpu->thread_kicked), or that kick is lost.
 */
int dr_agent_vcpu_before_run(DrAgent *a, unsigned index);

/*
 * Called after every KVM_RUN with its result (0 or -errno). Returns 1 when
 * the agent consumed the exit (a kick: -EINTR/-EAGAIN, or
 * KVM_EXIT_DIRTY_RING_FULL), 0 when the VMM must handle run->exit_reason,
 * or a negative errno for a KVM_RUN failure the VMM should report.
 */
int dr_agent_vcpu_handle_exit(DrAgent *a, unsigned index, int run_result);

/*
 * Optional: called by a vCPU thread that will not call before_run() again
 * (it stops on its own, e.g. after a guest shutdown), so that a Pause does
 * not wait for it. Exits that usually end a vCPU (SHUTDOWN, SYSTEM_EVENT,
 * INTERNAL_ERROR, FAIL_ENTRY, HLT) and KVM_RUN failures already count as
 * stopped until the vCPU's next before_run().
 */
void dr_agent_vcpu_thread_exit(DrAgent *a, unsigned index);

/*
 * The VMM wrote guest RAM [gpa, gpa+len) itself (device emulation, DMA,
 * loading). KVM does not log such writes; the agent reports them to the
 * daemon through the vmm_dirty bitmap. Cheap; any thread.
 */
void dr_agent_note_guest_write(DrAgent *a, uint64_t gpa, uint64_t len);

/*
 * Output-commit queue. Bytes a device sends to the outside world on
 * `channel`: with no daemon attached they go straight to output_release();
 * with one attached they are held under the running epoch until
 * ReleaseOutput. Returns 0, or -ENOBUFS when the channel's held bytes would
 * exceed output_limit (nothing was queued: the device should apply back
 * pressure, e.g. keep its transmitter busy). Any thread.
 */
int dr_agent_output_submit(DrAgent *a, unsigned channel, const void *buf, size_t len);

/* Bytes that output_submit() would accept on `channel` right now. */
size_t dr_agent_output_space(DrAgent *a, unsigned channel);

/* True while a control client is attached (informational). */
bool dr_agent_attached(DrAgent *a);

/*
 * VM state helpers shared by SaveState and a VMM's --restore path.
 * dr_state_save() serializes a dr.vmstate.VmState (proto/vmstate.proto) of
 * the stopped vCPUs and the VM, plus the VMM's device blob, into a
 * malloc()ed buffer the caller owns. dr_state_restore() applies such a
 * buffer to freshly created vCPUs (same count) in the order docs/kvm-host.md
 * gives, and returns a malloc()ed copy of the device blob.
 */
int dr_state_save(int kvm_fd, int vm_fd, const int *vcpu_fds, unsigned n_vcpus, const uint8_t *devices,
                  size_t devices_len, uint8_t **ret_buf, size_t *ret_len);
int dr_state_restore(int kvm_fd, int vm_fd, const int *vcpu_fds, unsigned n_vcpus, const uint8_t *buf,
                     size_t len, uint8_t **ret_devices, size_t *ret_devices_len);

#ifdef __cplusplus
}
#endif

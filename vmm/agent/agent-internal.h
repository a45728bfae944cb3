/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/* Internal to libdirtyrep-agent: the DrAgent object shared by agent.c and server.c. */

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <sys/types.h>

#include "control.pb-c.h"
#include "dr-agent.h"
#include "output.h"

#define AGENT_DEFAULT_OUTPUT_LIMIT (16u * 1024 * 1024)
#define AGENT_MAX_RING_ENTRIES     65536u              /* KVM's maximum: 1 MiB of 16-byte entries */
#define AGENT_STATE_MAX            (64u * 1024 * 1024) /* cap on what SaveState writes */
#define AGENT_STATE_INITIAL        (1u * 1024 * 1024)
#define AGENT_VMM_DIRTY_HEADER     64
#define AGENT_VMM_DIRTY_MAGIC      "DRVMDIRT" /* 8 bytes, no NUL: le64 magic of control.proto */
/* Ring-full exits in a row with nothing to harvest or reset before a vCPU is declared wedged. */
#define AGENT_WEDGE_STREAK             64
#define AGENT_DEFAULT_PAUSE_TIMEOUT_MS 1000
#define AGENT_SEND_TIMEOUT_MS          2000

typedef struct AgentRegion {
        DrAgentRegion r; /* r.memfd is the agent's own dup */
        uint64_t npages;
        uint64_t bitmap_offset; /* in the bitmap memfd (bitmap mode) */
        uint64_t vmm_dirty_offset;
        uint64_t bitmap_bytes; /* one bitmap: npages rounded up to 64 bits */
} AgentRegion;

typedef struct AgentVcpu {
        unsigned index;
        int fd;                     /* borrowed from the VMM */
        struct kvm_run *run;        /* borrowed */
        struct kvm_dirty_gfn *ring; /* our own mapping of its dirty ring, or NULL */

        /* Under DrAgent.lock. */
        bool registered;
        bool thread_known;
        pthread_t thread;
        /*
         * busy: between before_run() returning 0 and the next before_run()
         * (KVM_RUN plus the VMM's handling of the exit). A Pause is complete
         * when no vCPU is busy, so device emulation that a vCPU thread does
         * between runs is never cut in half by SaveState.
         */
        bool busy;
        bool pending_completion; /* last exit went to the VMM: KVM may owe an I/O completion */
        bool ring_wait;          /* waiting for ResetRings after a ring-full exit */
        uint64_t ring_wait_gen;
        bool wedged;
        Dr__Control__VcpuRunState state;
        unsigned wedge_streak;
        uint64_t resets_at_last_full;
        uint64_t exits;
        uint64_t ring_full_exits;
} AgentVcpu;

struct DrAgent {
        /* Immutable after dr_agent_new() / dr_agent_add_vcpu(). */
        int kvm_fd, vm_fd;
        char *socket_path;
        char *vm_name;
        uint8_t vm_uuid[16];
        DrTrackingMode mode;
        uint32_t ring_entries;
        uint32_t page_size;
        uint64_t tsc_khz;
        bool manual_protect; /* KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is on for this VM */
        AgentRegion regions[DR_AGENT_MAX_REGIONS];
        size_t n_regions;
        unsigned n_vcpus;
        AgentVcpu *vcpus;
        DrAgentCallbacks cb;
        void *userdata;
        int kick_signal;

        int listen_fd;
        int stop_fd;      /* eventfd: dr_agent_stop() -> agent thread */
        int ring_full_fd; /* eventfd handed to the client (ring mode) */
        int bitmap_fd;    /* memfd (bitmap mode) */
        uint8_t *bitmap_map;
        uint64_t bitmap_size;
        int vmm_dirty_fd;
        uint8_t *vmm_dirty_map;
        uint64_t vmm_dirty_size;
        int state_fd;
        uint64_t state_size; /* current memfd size; only ever grows (the client maps it) */

        OutputQueue *outq;

        pthread_t thread;
        bool started, stopped;

        /* vCPU coordination. */
        pthread_mutex_t lock;
        pthread_cond_t vcpu_cond;  /* vCPUs wait here: resume, reset, stop */
        pthread_cond_t agent_cond; /* Pause waits here for vCPUs to become idle */
        bool paused;
        /* Pause{suspend}: the split-brain guard's pause. Survives StopTracking and the
         * client's departure; only Resume{unsuspend} clears it (proto/control.proto). */
        bool suspended;
        uint64_t paused_since_ns; /* when the Pause arrived (0: none), for ResumeReply.paused_ns */
        bool stopping;
        uint64_t reset_gen; /* bumped by every ResetRings and detach */
        uint64_t resets_total;
        uint64_t epoch;
        bool have_epoch;
        /* Mirrors of session state for vCPU threads and any-thread callers (also set under lock). */
        atomic_bool attached;
        atomic_bool tracking;
        /* dr_agent_note_guest_write() calls walking the regions; dr_agent_set_regions() waits for 0. */
        atomic_uint note_users;
        /* The VMM's memory slots changed while a client was attached (dr_agent_set_regions()
         * returned -EBUSY): the regions the client tracks are no longer KVM's. Tracking
         * requests fail with -ESTALE until the VMM installs the new list after the detach. */
        atomic_bool layout_stale;

        /* Agent thread only. */
        int client_fd;
        uid_t client_uid;
        pid_t client_pid;
        bool hello_done;
};

/* server.c */
void *agent_thread_main(void *userdata);
void agent_detach(DrAgent *a, const char *why);

/* agent.c, shared with server.c */
int agent_set_tracking(DrAgent *a, bool on);
size_t agent_ring_drain(DrAgent *a, AgentVcpu *v);
bool agent_all_idle_locked(DrAgent *a);
void agent_kick_locked(DrAgent *a);

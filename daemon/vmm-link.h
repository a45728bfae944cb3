/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * The daemon's side of the control protocol (proto/control.proto): a
 * connection to one VMM's agent, and the VM layout it handed over, mapped.
 *
 * VmmLink owns the socket and every fd and mapping that came with the
 * layout. All calls are synchronous request/reply; they return 0 or a
 * negative errno (the agent's error when it answered with one; its message
 * is then in vmm_link_last_error()).
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <linux/kvm.h>

#include "control.pb-c.h"
#include "dirtyset.h"
#include "layout.h"
#include "macros.h"

#define VMM_LINK_MAX_REGIONS 32
#define VMM_LINK_MAX_VCPUS   128

typedef struct VmmRegion {
        uint32_t slot;
        uint64_t guest_phys;
        uint64_t size;
        uint64_t n_pages;
        uint64_t first_page; /* index of this region's first page in the VM-wide page numbering */
        int fd;
        uint64_t fd_offset;
        const uint8_t *ram;     /* read-only MAP_SHARED mapping of the region */
        uint64_t bitmap_offset; /* into the bitmap memfd (bitmap mode) */
        uint64_t vmm_dirty_offset;
} VmmRegion;

typedef struct VmmVcpu {
        uint32_t index;
        int fd;
        struct kvm_dirty_gfn *ring; /* MAP_SHARED, read-write (ring mode) */
} VmmVcpu;

typedef struct VmmLayout {
        RamLayout ram; /* the regions' geometry, checked by ram_layout_validate() (regions[] repeat it) */
        Dr__Control__TrackingMode mode;
        uint32_t page_size;
        uint32_t ring_entries;
        uint64_t tsc_khz;
        VmmRegion regions[VMM_LINK_MAX_REGIONS];
        size_t n_regions;
        VmmVcpu vcpus[VMM_LINK_MAX_VCPUS];
        size_t n_vcpus;
        uint64_t total_pages; /* sum of n_pages over regions */
        int ring_full_fd;     /* eventfd, or -1 */
        int bitmap_fd;        /* or -1 */
        uint8_t *bitmap;      /* MAP_SHARED read-only view of bitmap_fd */
        uint64_t bitmap_size;
        int vmm_dirty_fd;
        uint8_t *vmm_dirty; /* MAP_SHARED read-write */
        uint64_t vmm_dirty_size;
        int state_fd;
} VmmLayout;

typedef struct VmmLink VmmLink;

/* How long the agent has to answer the Hello and the layout request (-ETIMEDOUT after). */
#define VMM_LINK_HELLO_TIMEOUT_USEC (10ULL * 1000 * 1000)

/*
 * Connects to the agent socket at path, says Hello (client names itself
 * `client`), fetches and maps the layout. Returns 0 and a VmmLink the
 * caller owns, or a negative errno (logged by the caller). Blocks for at most
 * VMM_LINK_HELLO_TIMEOUT_USEC per answer; later requests wait as long as the
 * agent takes.
 */
int vmm_link_open(const char *path, const char *client, VmmLink **ret);
/*
 * The same, and on failure says in why[why_size] what went wrong once connected (the agent's
 * answer, or that it did not answer in time), or "" before that; on -EPERM who serves the socket
 * and why that is refused:
 * the socket file must be owned by root, by this process's euid, or by the owner of a directory
 * only that owner can write (every directory above it owned by root, this euid or that owner and
 * writable by nobody else); the connected peer (SO_PEERCRED) must be root or the file's owner.
 * vmm_link_open() applies the same checks.
 */
int vmm_link_open_checked(const char *path, const char *client, char *why, size_t why_size, VmmLink **ret);
/*
 * Whether something listens on the VMM control socket at path: false only when
 * connect() says nobody does (ECONNREFUSED, ENOENT); true when it connects and
 * when it cannot tell (assume the worst: the VMM runs). The probe connection is
 * closed at once, before any Hello.
 */
bool vmm_link_listening(const char *path);
/* The same over an already connected SOCK_SEQPACKET socket (taken, also on failure). */
int vmm_link_open_fd(int fd, const char *client, VmmLink **ret);
VmmLink *vmm_link_free(VmmLink *l);
DEFINE_TRIVIAL_CLEANUP_FUNC(VmmLink *, vmm_link_free);

const VmmLayout *vmm_link_layout(const VmmLink *l);
const char *vmm_link_last_error(const VmmLink *l);
int vmm_link_fd(const VmmLink *l);

int vmm_link_start_tracking(VmmLink *l);
int vmm_link_stop_tracking(VmmLink *l);
/* StopTracking{hold_output}: held output stays held for the next client (control.proto). */
int vmm_link_stop_tracking_hold(VmmLink *l);
int vmm_link_reset_rings(VmmLink *l, uint64_t *ret_count);
int vmm_link_pause(VmmLink *l, uint32_t timeout_ms, uint64_t *ret_pause_ns);
int vmm_link_resume(VmmLink *l, uint64_t epoch);
/* Pause{suspend}: the VM stays paused across StopTracking and disconnects until unsuspended. */
int vmm_link_suspend(VmmLink *l, uint32_t timeout_ms);
/* Resume{epoch, unsuspend}: the only way to resume a suspended VM. */
int vmm_link_unsuspend(VmmLink *l, uint64_t epoch);
/* What the agent's HelloReply said: the VM is suspended; output held from an earlier client. */
bool vmm_link_hello_suspended(const VmmLink *l);
uint64_t vmm_link_hello_held_bytes(const VmmLink *l);
/* How long the VM was stopped, as the agent measured it (ResumeReply.paused_ns)
 * in the last Resume; 0 when the agent did not say. */
uint64_t vmm_link_last_paused_ns(const VmmLink *l);
/* Whether the agent announced a Dr__Control__Feature (HelloReply.features). */
bool vmm_link_has_feature(const VmmLink *l, uint32_t feature);
/* FEATURE_PAUSE_SAVES_STATE: Pause and SaveState in one round trip (-EOPNOTSUPP without it). */
int vmm_link_pause_save(VmmLink *l, uint32_t timeout_ms, uint64_t *ret_pause_ns, uint8_t **ret_buf,
                        size_t *ret_len);
/* FEATURE_RESUME_RESETS_RINGS: KVM_RESET_DIRTY_RINGS, then Resume, in one round trip;
 * *ret_count is what the reset returned (-EOPNOTSUPP without the feature). */
int vmm_link_resume_reset(VmmLink *l, uint64_t epoch, uint64_t *ret_count);
/* Saves state; on success *ret_buf is a malloc()ed copy of the VmState bytes. */
int vmm_link_save_state(VmmLink *l, uint8_t **ret_buf, size_t *ret_len);
int vmm_link_get_dirty_log(VmmLink *l, uint32_t slot, bool clear, uint64_t *ret_pages);
int vmm_link_release_output(VmmLink *l, uint64_t epoch, uint64_t *ret_bytes);
/* On success *ret is an unpacked reply the caller frees with dr__control__status_reply__free_unpacked(). */
int vmm_link_get_status(VmmLink *l, Dr__Control__StatusReply **ret);

/*
 * Takes the VMM-written pages reported since the last call (atomic
 * exchange-to-zero of the shared vmm_dirty bitmap) and adds them to `set`
 * (VM-wide page numbering). Returns the number of pages new to the set.
 * Skips the scan when the agent's sequence did not move.
 */
uint64_t vmm_link_take_vmm_dirty(VmmLink *l, DirtySet *set);

/* Maps (slot, page offset) from a ring entry to the VM-wide page number; -ERANGE when invalid. */
int vmm_layout_page_index(const VmmLayout *lay, uint32_t slot, uint64_t offset, uint64_t *ret);
/* Host address of VM-wide page `page` (read-only). */
const uint8_t *vmm_layout_page_ptr(const VmmLayout *lay, uint64_t page);
/* Guest physical address of VM-wide page `page`. */
uint64_t vmm_layout_page_gpa(const VmmLayout *lay, uint64_t page);

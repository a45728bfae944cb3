/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * VM state snapshot (internal to libdirtyrep-agent, exposed for unit tests).
 *
 * dr_state_save() = state_capture() (KVM ioctls) + state_encode() (protobuf);
 * dr_state_restore() = state_decode() + state_apply(). Encoding and decoding
 * touch no KVM, so a unit test can round-trip a synthetic snapshot.
 */

#include <stddef.h>
#include <stdint.h>
#include <linux/kvm.h>

#include "macros.h"

/* Bounds applied on decode (all input is hostile). */
#define STATE_MAX_VCPUS   128 /* == DR_AGENT_MAX_VCPUS */
#define STATE_MAX_CPUID   256
#define STATE_MAX_MSRS    1024
#define STATE_MAX_XSAVE   (64 * 1024)
#define STATE_MIN_XSAVE   4096 /* legacy struct kvm_xsave */
#define STATE_MAX_DEVICES (16 * 1024 * 1024)

typedef struct VcpuSnapshot {
        uint32_t index;
        struct kvm_cpuid_entry2 *cpuid;
        size_t n_cpuid;
        struct kvm_mp_state mp_state;
        struct kvm_regs regs;
        struct kvm_sregs sregs;
        uint8_t *xsave; /* XSAVE area (first 4096 bytes are struct kvm_xsave) */
        size_t xsave_len;
        struct kvm_xcrs xcrs;
        struct kvm_debugregs debugregs;
        int has_lapic;
        struct kvm_lapic_state lapic;
        struct kvm_msr_entry *msrs;
        size_t n_msrs;
        struct kvm_vcpu_events events;
        uint64_t tsc_khz; /* 0: unknown */
} VcpuSnapshot;

typedef struct VmSnapshot {
        VcpuSnapshot *vcpus;
        unsigned n_vcpus;
        int has_pit;
        struct kvm_pit_state2 pit;
        int has_clock;
        struct kvm_clock_data clock;
        int has_irqchip;
        struct kvm_pic_state pic[2]; /* master, slave */
        struct kvm_ioapic_state ioapic;
        uint8_t *devices;
        size_t devices_len;
} VmSnapshot;

VmSnapshot *vm_snapshot_free(VmSnapshot *s);
DEFINE_TRIVIAL_CLEANUP_FUNC(VmSnapshot *, vm_snapshot_free);

/* Allocates an empty snapshot with n_vcpus zeroed vCPU records. */
int vm_snapshot_new(unsigned n_vcpus, VmSnapshot **ret);

/* Serializes s as a dr.vmstate.VmState into a malloc()ed buffer. */
int state_encode(const VmSnapshot *s, uint8_t **ret_buf, size_t *ret_len);

/* Parses and validates a VmState. -EBADMSG (logged) for anything malformed. */
int state_decode(const uint8_t *buf, size_t len, VmSnapshot **ret);

/* Reads the state of stopped vCPUs and the VM. */
int state_capture(int kvm_fd, int vm_fd, const int *vcpu_fds, unsigned n_vcpus, VmSnapshot **ret);

/* Writes a snapshot into fresh vCPUs (same count) in the order docs/kvm-host.md gives. */
int state_apply(int kvm_fd, int vm_fd, const int *vcpu_fds, unsigned n_vcpus, const VmSnapshot *s);

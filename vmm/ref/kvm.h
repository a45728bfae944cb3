/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * Thin wrappers around the KVM ioctls dirtyrep-vmm uses. Each returns the
 * ioctl's non-negative result or a negative errno; none of them logs: the
 * caller decides what a failure means.
 */

#include <stdint.h>
#include <linux/kvm.h>

/* Opens /dev/kvm (O_CLOEXEC) and checks KVM_GET_API_VERSION == 12. Returns the fd. */
int kvm_open(void);
/* KVM_CHECK_EXTENSION on a system or VM fd: >= 0 (0: unsupported). */
int kvm_check_extension(int fd, long cap);
/* KVM_CREATE_VM (type 0). Returns the VM fd, made O_CLOEXEC. */
int kvm_create_vm(int kvm_fd);
int kvm_enable_cap(int vm_fd, uint32_t cap, uint64_t arg0);
int kvm_set_user_memory_region(int vm_fd, uint32_t slot, uint32_t flags, uint64_t guest_phys, uint64_t size,
                               void *host_addr);
int kvm_set_tss_addr(int vm_fd, uint64_t addr);
int kvm_set_identity_map_addr(int vm_fd, uint64_t addr);
int kvm_create_irqchip(int vm_fd);
int kvm_create_pit2(int vm_fd);
/* KVM_IRQ_LINE: drive GSI `irq` to `level` (0/1). Any thread. */
int kvm_irq_line(int vm_fd, uint32_t irq, int level);
/* KVM_GET_TSC_KHZ on a vCPU (or VM) fd: kHz or -errno. */
int kvm_get_tsc_khz(int fd);
/* Size of the kvm_run mapping (KVM_GET_VCPU_MMAP_SIZE). */
int kvm_vcpu_mmap_size(int kvm_fd);
/* KVM_CREATE_VCPU; the fd is O_CLOEXEC. */
int kvm_create_vcpu(int vm_fd, unsigned index);
/*
 * KVM_GET_SUPPORTED_CPUID into a malloc()ed kvm_cpuid2 the caller frees
 * (grown until it fits).
 */
int kvm_get_supported_cpuid(int kvm_fd, struct kvm_cpuid2 **ret);
int kvm_set_cpuid2(int vcpu_fd, const struct kvm_cpuid2 *cpuid);
int kvm_get_regs(int vcpu_fd, struct kvm_regs *regs);
int kvm_set_regs(int vcpu_fd, const struct kvm_regs *regs);
int kvm_get_sregs(int vcpu_fd, struct kvm_sregs *sregs);
int kvm_set_sregs(int vcpu_fd, const struct kvm_sregs *sregs);
int kvm_set_fpu(int vcpu_fd, const struct kvm_fpu *fpu);
int kvm_set_mp_state(int vcpu_fd, uint32_t state);
/* KVM_RUN: 0 or -errno (-EINTR when kicked). */
int kvm_run(int vcpu_fd);

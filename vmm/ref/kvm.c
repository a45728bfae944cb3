/* SPDX-License-Identifier: GPL-2.0-or-later */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include "kvm.h"
#include "macros.h"

static int kvm_ioctl(int fd, unsigned long req, void *arg)
{
        int r = ioctl(fd, req, arg);
        return r < 0 ? -errno : r;
}

int kvm_open(void)
{
        _cleanup_close_ int fd = -EBADF;
        int r;

        fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
        if (fd < 0)
                return -errno;
        r = kvm_ioctl(fd, KVM_GET_API_VERSION, NULL);
        if (r < 0)
                return r;
        if (r != KVM_API_VERSION)
                return -EPROTO;
        return TAKE_FD(fd);
}

int kvm_check_extension(int fd, long cap)
{
        int r = ioctl(fd, KVM_CHECK_EXTENSION, cap);
        return r < 0 ? -errno : r;
}

static int fd_set_cloexec(int fd)
{
        int flags = fcntl(fd, F_GETFD);
        if (flags < 0 || fcntl(fd, F_SETFD, flags | FD_CLOEXEC) < 0)
                return -errno;
        return 0;
}

/* KVM creates its fds O_CLOEXEC already (anon_inode_getfd with O_CLOEXEC); we make sure anyway. */
static int kvm_new_fd(int fd, unsigned long req, unsigned long arg)
{
        int nfd, r;

        nfd = ioctl(fd, req, arg);
        if (nfd < 0)
                return -errno;
        r = fd_set_cloexec(nfd);
        if (r < 0) {
                safe_close(nfd);
                return r;
        }
        return nfd;
}

int kvm_create_vm(int kvm_fd)
{
        return kvm_new_fd(kvm_fd, KVM_CREATE_VM, 0);
}

int kvm_enable_cap(int vm_fd, uint32_t cap, uint64_t arg0)
{
        struct kvm_enable_cap ec = {.cap = cap, .args[0] = arg0};
        return kvm_ioctl(vm_fd, KVM_ENABLE_CAP, &ec);
}

int kvm_set_user_memory_region(int vm_fd, uint32_t slot, uint32_t flags, uint64_t guest_phys, uint64_t size,
                               void *host_addr)
{
        struct kvm_userspace_memory_region mr = {
                .slot = slot,
                .flags = flags,
                .guest_phys_addr = guest_phys,
                .memory_size = size,
                .userspace_addr = (uint64_t) (uintptr_t) host_addr,
        };
        return kvm_ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &mr);
}

int kvm_set_tss_addr(int vm_fd, uint64_t addr)
{
        int r = ioctl(vm_fd, KVM_SET_TSS_ADDR, (unsigned long) addr);
        return r < 0 ? -errno : 0;
}

int kvm_set_identity_map_addr(int vm_fd, uint64_t addr)
{
        uint64_t a = addr;
        return kvm_ioctl(vm_fd, KVM_SET_IDENTITY_MAP_ADDR, &a);
}

int kvm_create_irqchip(int vm_fd)
{
        return kvm_ioctl(vm_fd, KVM_CREATE_IRQCHIP, NULL);
}

int kvm_create_pit2(int vm_fd)
{
        struct kvm_pit_config pc = {.flags = 0};
        return kvm_ioctl(vm_fd, KVM_CREATE_PIT2, &pc);
}

int kvm_irq_line(int vm_fd, uint32_t irq, int level)
{
        struct kvm_irq_level il = {.irq = irq, .level = level ? 1 : 0};
        return kvm_ioctl(vm_fd, KVM_IRQ_LINE, &il);
}

int kvm_get_tsc_khz(int fd)
{
        return kvm_ioctl(fd, KVM_GET_TSC_KHZ, NULL);
}

int kvm_vcpu_mmap_size(int kvm_fd)
{
        return kvm_ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, NULL);
}

int kvm_create_vcpu(int vm_fd, unsigned index)
{
        return kvm_new_fd(vm_fd, KVM_CREATE_VCPU, index);
}

int kvm_get_supported_cpuid(int kvm_fd, struct kvm_cpuid2 **ret)
{
        for (uint32_t n = 64; n <= 4096; n *= 2) {
                _cleanup_free_ struct kvm_cpuid2 *c = NULL;
                int r;

                c = calloc(1, sizeof(*c) + n * sizeof(struct kvm_cpuid_entry2));
                if (!c)
                        return -ENOMEM;
                c->nent = n;
                r = kvm_ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, c);
                if (r == -E2BIG)
                        continue;
                if (r < 0)
                        return r;
                *ret = TAKE_PTR(c);
                return 0;
        }
        return -E2BIG;
}

int kvm_set_cpuid2(int vcpu_fd, const struct kvm_cpuid2 *cpuid)
{
        return kvm_ioctl(vcpu_fd, KVM_SET_CPUID2, (void *) cpuid);
}

int kvm_get_regs(int vcpu_fd, struct kvm_regs *regs)
{
        return kvm_ioctl(vcpu_fd, KVM_GET_REGS, regs);
}

int kvm_set_regs(int vcpu_fd, const struct kvm_regs *regs)
{
        return kvm_ioctl(vcpu_fd, KVM_SET_REGS, (void *) regs);
}

int kvm_get_sregs(int vcpu_fd, struct kvm_sregs *sregs)
{
        return kvm_ioctl(vcpu_fd, KVM_GET_SREGS, sregs);
}

int kvm_set_sregs(int vcpu_fd, const struct kvm_sregs *sregs)
{
        return kvm_ioctl(vcpu_fd, KVM_SET_SREGS, (void *) sregs);
}

int kvm_set_fpu(int vcpu_fd, const struct kvm_fpu *fpu)
{
        return kvm_ioctl(vcpu_fd, KVM_SET_FPU, (void *) fpu);
}

int kvm_set_mp_state(int vcpu_fd, uint32_t state)
{
        struct kvm_mp_state mp = {.mp_state = state};
        return kvm_ioctl(vcpu_fd, KVM_SET_MP_STATE, &mp);
}

int kvm_run(int vcpu_fd)
{
        int r = ioctl(vcpu_fd, KVM_RUN, 0);
        return r < 0 ? -errno : 0;
}

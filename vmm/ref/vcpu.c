/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * vCPUs: creation, the multiboot entry state, and the run loop, which is
 * one switch over run->exit_reason (kvmtool style) wrapped in the agent's
 * before_run/handle_exit hooks.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "kvm.h"
#include "log.h"
#include "multiboot.h"
#include "vmm.h"

#define UNHANDLED_LOG_MAX 16

static void cpuid_fix_apic_id(struct kvm_cpuid2 *c, unsigned index)
{
        for (uint32_t i = 0; i < c->nent; i++) {
                struct kvm_cpuid_entry2 *e = &c->entries[i];

                switch (e->function) {
                case 1:
                        /* Initial APIC ID in EBX[31:24] must match the LAPIC's. */
                        e->ebx = (e->ebx & 0x00ffffffU) | ((uint32_t) index << 24);
                        break;
                case 0xb:
                case 0x1f:
                        e->edx = index; /* x2APIC ID */
                        break;
                }
        }
}

int vcpu_create(Vm *vm, unsigned index, const struct kvm_cpuid2 *supported)
{
        Vcpu *v = &vm->vcpus[index];
        _cleanup_free_ struct kvm_cpuid2 *cpuid = NULL;
        size_t sz = sizeof(*supported) + supported->nent * sizeof(supported->entries[0]);
        int r;

        *v = (Vcpu){.vm = vm, .index = index, .fd = -EBADF};
        r = kvm_create_vcpu(vm->vm_fd, index);
        if (r < 0)
                return log_error_errno(r, "KVM_CREATE_VCPU(%u) failed: %m", index);
        v->fd = r;

        r = kvm_vcpu_mmap_size(vm->kvm_fd);
        if (r < 0)
                return log_error_errno(r, "KVM_GET_VCPU_MMAP_SIZE failed: %m");
        v->run_size = (size_t) r;
        v->run = mmap(NULL, v->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
        if (v->run == MAP_FAILED) {
                v->run = NULL;
                return log_error_errno(-errno, "Failed to map kvm_run of vCPU %u: %m", index);
        }

        cpuid = malloc(sz);
        if (!cpuid)
                return log_oom();
        memcpy(cpuid, supported, sz);
        cpuid_fix_apic_id(cpuid, index);
        r = kvm_set_cpuid2(v->fd, cpuid);
        if (r < 0)
                return log_error_errno(r, "KVM_SET_CPUID2 on vCPU %u failed: %m", index);
        return 0;
}

static void seg_flat(struct kvm_segment *s, uint16_t selector, uint8_t type)
{
        *s = (struct kvm_segment){
                .base = 0,
                .limit = 0xffffffff,
                .selector = selector,
                .type = type,
                .present = 1,
                .dpl = 0,
                .db = 1,
                .s = 1,
                .l = 0,
                .g = 1,
        };
}

int vcpu_setup_boot(Vcpu *v, uint32_t entry, uint32_t eax, uint32_t ebx, uint32_t esp)
{
        struct kvm_sregs sregs;
        struct kvm_regs regs = {
                .rip = entry, .rax = eax, .rbx = ebx, .rsp = esp, .rflags = 0x2, /* reserved bit 1; IF=0 */
        };
        struct kvm_fpu fpu = {.fcw = 0x37f, .mxcsr = 0x1f80};
        int r;

        r = kvm_get_sregs(v->fd, &sregs);
        if (r < 0)
                return log_error_errno(r, "KVM_GET_SREGS on vCPU %u failed: %m", v->index);

        /* Multiboot v1 machine state: 32-bit protected mode, flat 4 GiB segments, paging off. */
        seg_flat(&sregs.cs, BOOT_CS, 0xb); /* execute/read, accessed */
        seg_flat(&sregs.ds, BOOT_DS, 0x3); /* read/write, accessed */
        sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
        sregs.gdt.base = BOOT_GDT_ADDR;
        sregs.gdt.limit = 3 * 8 - 1;
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        /* VMX wants a usable busy TSS and an LDT in protected mode even if the guest never uses them. */
        sregs.tr = (struct kvm_segment){.limit = 0xffff, .type = 0xb, .present = 1};
        sregs.ldt = (struct kvm_segment){.limit = 0xffff, .type = 0x2, .present = 1};
        sregs.cr0 = 0x11; /* PE | ET; caches on, as a BIOS leaves them */
        sregs.cr2 = 0;
        sregs.cr3 = 0;
        sregs.cr4 = 0;
        sregs.efer = 0;

        r = kvm_set_sregs(v->fd, &sregs);
        if (r < 0)
                return log_error_errno(r, "KVM_SET_SREGS on vCPU %u failed: %m", v->index);
        r = kvm_set_regs(v->fd, &regs);
        if (r < 0)
                return log_error_errno(r, "KVM_SET_REGS on vCPU %u failed: %m", v->index);
        r = kvm_set_fpu(v->fd, &fpu);
        if (r < 0)
                return log_error_errno(r, "KVM_SET_FPU on vCPU %u failed: %m", v->index);
        if (v->index > 0) {
                /* guest-abi.md: APs start at the entry point themselves, no INIT/SIPI. */
                r = kvm_set_mp_state(v->fd, KVM_MP_STATE_RUNNABLE);
                if (r < 0)
                        return log_error_errno(r, "KVM_SET_MP_STATE(RUNNABLE) on vCPU %u failed: %m",
                                               v->index);
        }
        return 0;
}

static bool vcpu_log_unhandled(Vcpu *v)
{
        return v->unhandled_logged++ < UNHANDLED_LOG_MAX;
}

static void vcpu_handle_io(Vcpu *v)
{
        struct kvm_run *run = v->run;
        uint8_t *data = (uint8_t *) run + run->io.data_offset;
        unsigned size = run->io.size;

        /* The data area is inside the kvm_run page(s); KVM guarantees the bounds, we check anyway. */
        if (size == 0 || size > 4 || run->io.data_offset + (uint64_t) size * run->io.count > v->run_size) {
                log_error("vCPU %u: malformed I/O exit (port 0x%x size %u count %u)", v->index, run->io.port,
                          size, run->io.count);
                return;
        }
        for (uint32_t i = 0; i < run->io.count; i++, data += size)
                devices_pio(v, run->io.port, run->io.direction == KVM_EXIT_IO_OUT, data, size);
}

static void vcpu_handle_mmio(Vcpu *v)
{
        struct kvm_run *run = v->run;

        if (vcpu_log_unhandled(v))
                log_warning("vCPU %u: %s of %u bytes at unassigned guest physical 0x%" PRIx64 " ignored",
                            v->index, run->mmio.is_write ? "write" : "read", run->mmio.len,
                            (uint64_t) run->mmio.phys_addr);
        if (!run->mmio.is_write)
                memset(run->mmio.data, 0xff, sizeof(run->mmio.data));
}

static void vcpu_dump(Vcpu *v)
{
        struct kvm_regs regs;
        struct kvm_sregs sregs;

        if (kvm_get_regs(v->fd, &regs) < 0 || kvm_get_sregs(v->fd, &sregs) < 0)
                return;
        log_error("vCPU %u: rip=0x%llx rsp=0x%llx rflags=0x%llx rax=0x%llx cr0=0x%llx cr3=0x%llx cr4=0x%llx "
                  "efer=0x%llx cs=0x%x",
                  v->index, regs.rip, regs.rsp, regs.rflags, regs.rax, sregs.cr0, sregs.cr3, sregs.cr4,
                  sregs.efer, sregs.cs.selector);
}

/*
 * One exit the agent did not consume. Returns true to keep running, false
 * when this vCPU stops the VM with *ret_status as the VMM's exit status.
 */
static bool vcpu_handle_exit_reason(Vcpu *v, int *ret_status)
{
        struct kvm_run *run = v->run;

        switch (run->exit_reason) {
        case KVM_EXIT_IO:
                vcpu_handle_io(v);
                return true;

        case KVM_EXIT_MMIO:
                vcpu_handle_mmio(v);
                return true;

        case KVM_EXIT_HLT:
                /* Only without an in-kernel LAPIC; ours halts in the kernel. Just run again. */
                return true;

        case KVM_EXIT_INTR:
                return true;

        case KVM_EXIT_SHUTDOWN:
                log_error("vCPU %u: guest triple fault (KVM_EXIT_SHUTDOWN); stopping the VM", v->index);
                vcpu_dump(v);
                *ret_status = VMM_EXIT_GUEST_CRASH;
                return false;

        case KVM_EXIT_FAIL_ENTRY:
                log_error("vCPU %u: VM entry failed, hardware reason 0x%llx", v->index,
                          (unsigned long long) run->fail_entry.hardware_entry_failure_reason);
                vcpu_dump(v);
                *ret_status = VMM_EXIT_GUEST_CRASH;
                return false;

        case KVM_EXIT_INTERNAL_ERROR:
                log_error("vCPU %u: KVM internal error, suberror %u", v->index, run->internal.suberror);
                vcpu_dump(v);
                *ret_status = VMM_EXIT_GUEST_CRASH;
                return false;

        case KVM_EXIT_SYSTEM_EVENT:
                switch (run->system_event.type) {
                case KVM_SYSTEM_EVENT_SHUTDOWN:
                        log_info("vCPU %u: guest powered off", v->index);
                        *ret_status = VMM_EXIT_OK;
                        return false;
                case KVM_SYSTEM_EVENT_RESET:
                        log_info(
                                "vCPU %u: guest asked for a reset, which dirtyrep-vmm does not do; stopping",
                                v->index);
                        *ret_status = VMM_EXIT_OK;
                        return false;
                case KVM_SYSTEM_EVENT_CRASH:
                        log_error("vCPU %u: guest reported a crash", v->index);
                        *ret_status = VMM_EXIT_GUEST_CRASH;
                        return false;
                default:
                        log_warning("vCPU %u: system event %u ignored", v->index, run->system_event.type);
                        return true;
                }

        default:
                log_error("vCPU %u: unexpected exit reason %u; stopping the VM", v->index, run->exit_reason);
                vcpu_dump(v);
                *ret_status = VMM_EXIT_FAILURE;
                return false;
        }
}

static void *vcpu_thread(void *userdata)
{
        Vcpu *v = userdata;
        Vm *vm = v->vm;
        int r, status;

        r = dr_agent_vcpu_thread_init(vm->agent, v->index);
        if (r < 0) {
                log_error_errno(r, "vCPU %u: agent thread init failed: %m", v->index);
                vm_request_exit(vm, VMM_EXIT_FAILURE);
                return NULL;
        }

        for (;;) {
                r = dr_agent_vcpu_before_run(vm->agent, v->index);
                if (r == -ESHUTDOWN)
                        break;
                if (r == -EDEADLK) {
                        /* The agent logged why; the VMM keeps serving the control socket. */
                        log_error("vCPU %u stopped: its dirty ring jammed (use --tracking bitmap on this "
                                  "host)",
                                  v->index);
                        break;
                }
                if (r < 0) {
                        log_error_errno(r, "vCPU %u: agent refused to run: %m", v->index);
                        vm_request_exit(vm, VMM_EXIT_FAILURE);
                        break;
                }

                r = dr_agent_vcpu_handle_exit(vm->agent, v->index, kvm_run(v->fd));
                if (r > 0)
                        continue; /* the agent's (a kick, a full ring) */
                if (r < 0) {
                        log_error_errno(r, "vCPU %u: KVM_RUN failed: %m", v->index);
                        vcpu_dump(v);
                        vm_request_exit(vm, VMM_EXIT_FAILURE);
                        break;
                }

                if (!vcpu_handle_exit_reason(v, &status)) {
                        vm_request_exit(vm, status);
                        break;
                }
                if (atomic_load(&vm->exit_status) >= 0)
                        break; /* the debug-exit port (or another vCPU) asked to stop */
        }
        /* This thread will not call before_run() again: a Pause must not wait for it. */
        dr_agent_vcpu_thread_exit(vm->agent, v->index);
        return NULL;
}

int vcpu_start(Vcpu *v)
{
        int r = -pthread_create(&v->thread, NULL, vcpu_thread, v);
        if (r < 0)
                return log_error_errno(r, "Failed to start vCPU %u thread: %m", v->index);
        v->thread_started = true;
        {
                /* "vcpu0", ...: what top -H and /proc/PID/task/TID/comm show. */
                char name[16];
                snprintf(name, sizeof(name), "vcpu%u", v->index);
                (void) pthread_setname_np(v->thread, name);
        }
        return 0;
}

void vcpu_join(Vcpu *v)
{
        if (!v->thread_started)
                return;
        pthread_join(v->thread, NULL);
        v->thread_started = false;
}

void vcpu_destroy(Vcpu *v)
{
        if (v->run)
                munmap(v->run, v->run_size);
        v->run = NULL;
        v->fd = safe_close(v->fd);
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Writes seeds for fuzz-vmstate into DIR: encoded VmState messages of one
 * and two vCPUs, with and without the optional parts (PIT, clock, irqchip,
 * LAPIC, device blob).
 *
 *   gen-state-seeds DIR
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "state.h"

static void fill(VmSnapshot *s, int full)
{
        for (unsigned i = 0; i < s->n_vcpus; i++) {
                VcpuSnapshot *v = &s->vcpus[i];

                v->n_cpuid = 2;
                v->cpuid = calloc(2, sizeof(*v->cpuid));
                v->cpuid[0] = (struct kvm_cpuid_entry2){.function = 0, .eax = 0xd, .ebx = 0x756e6547};
                v->cpuid[1] = (struct kvm_cpuid_entry2){.function = 1, .index = i, .eax = 0x306a9};
                v->mp_state.mp_state = i ? KVM_MP_STATE_HALTED : KVM_MP_STATE_RUNNABLE;
                v->regs.rip = 0x100000 + i;
                v->regs.rflags = 0x202;
                v->sregs.cs = (struct kvm_segment){.limit = 0xffffffff,
                                                   .selector = 0x10,
                                                   .type = 11,
                                                   .present = 1,
                                                   .l = 1,
                                                   .g = 1,
                                                   .s = 1};
                v->sregs.ldt.unusable = 1;
                v->sregs.cr0 = 0x80050033;
                v->sregs.efer = 0xd01;
                v->xsave_len = 4096;
                v->xsave = calloc(1, v->xsave_len);
                v->xsave[0] = 0x7f;
                v->xcrs.nr_xcrs = 1;
                v->xcrs.xcrs[0].value = 7;
                v->debugregs.dr7 = 0x400;
                v->has_lapic = full;
                v->lapic.regs[0x20] = (char) i;
                v->n_msrs = 1;
                v->msrs = calloc(1, sizeof(*v->msrs));
                v->msrs[0] = (struct kvm_msr_entry){.index = 0xc0000080, .data = 0xd01};
                v->events.flags = full ? KVM_VCPUEVENT_VALID_SHADOW : 0;
                v->tsc_khz = full ? 2500000 : 0;
        }
        if (!full)
                return;
        s->has_pit = 1;
        for (unsigned k = 0; k < 3; k++)
                s->pit.channels[k] =
                        (struct kvm_pit_channel_state){.count = 65536, .mode = 2, .rw_mode = 3, .gate = 1};
        s->has_clock = 1;
        s->clock.clock = 123456789;
        s->has_irqchip = 1;
        s->pic[0] = (struct kvm_pic_state){.irq_base = 0x20, .imr = 0xfb};
        s->pic[1] = (struct kvm_pic_state){.irq_base = 0x28, .imr = 0xff};
        s->ioapic.base_address = 0xfec00000;
        s->devices_len = 16;
        s->devices = calloc(1, 16);
}

int main(int argc, char **argv)
{
        static const struct {
                const char *name;
                unsigned n_vcpus;
                int full;
        } seeds[] = {{"one-vcpu-minimal", 1, 0}, {"two-vcpus-full", 2, 1}};

        if (argc != 2) {
                fprintf(stderr, "usage: %s DIR\n", argv[0]);
                return 1;
        }
        for (size_t i = 0; i < sizeof(seeds) / sizeof(seeds[0]); i++) {
                _cleanup_(vm_snapshot_freep) VmSnapshot *s = NULL;
                _cleanup_free_ uint8_t *buf = NULL;
                char path[4096];
                size_t len;
                int fd;

                if (vm_snapshot_new(seeds[i].n_vcpus, &s) < 0)
                        return 1;
                fill(s, seeds[i].full);
                if (state_encode(s, &buf, &len) < 0)
                        return 1;
                snprintf(path, sizeof(path), "%s/%s", argv[1], seeds[i].name);
                fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
                if (fd < 0 || write(fd, buf, len) != (ssize_t) len) {
                        fprintf(stderr, "%s: %s\n", path, strerror(errno));
                        return 1;
                }
                close(fd);
        }
        return 0;
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/* The VM as dirtyrep-vmm sees it: what every subsystem file needs to reach. */

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <linux/kvm.h>

#include "dr-agent.h"
#include "memory.h"
#include "service.h"
#include "uart.h"

/* Exit statuses of dirtyrep-vmm (documented in --help). */
#define VMM_EXIT_OK          0
#define VMM_EXIT_FAILURE     1
#define VMM_EXIT_GUEST_CRASH 3 /* triple fault, KVM internal error, failed entry */

#define COM1_BASE       0x3f8
#define COM1_IRQ        4
#define COM2_BASE       0x2f8
#define COM2_IRQ        3
#define DEBUG_EXIT_PORT 0x501

/* Output-commit channels of the agent. */
#define CHANNEL_CONSOLE 0
#define CHANNEL_SERVICE 1

typedef struct Vm Vm;

typedef struct Vcpu {
        Vm *vm;
        unsigned index;
        int fd;
        struct kvm_run *run;
        size_t run_size;
        pthread_t thread;
        bool thread_started;
        uint64_t unhandled_logged; /* rate limit for unknown port/MMIO logs */
} Vcpu;

struct Vm {
        int kvm_fd;
        int vm_fd;
        GuestRam *ram;
        unsigned n_vcpus;
        Vcpu vcpus[DR_AGENT_MAX_VCPUS];
        DrAgent *agent;

        Uart *com1;
        Uart *com2;
        Service *service;
        int console_fd;      /* COM1 output */
        bool console_commit; /* COM1 output through channel 0 of the output queue */

        /* A vCPU asks the main thread to stop the VM: first status wins. */
        int done_fd;            /* eventfd the main thread polls */
        atomic_int exit_status; /* -1 until someone asks */
};

/* Asks the main thread to stop the VMM with `status` (first caller wins). Any thread. */
void vm_request_exit(Vm *vm, int status);

/* vcpu.c */
int vcpu_create(Vm *vm, unsigned index, const struct kvm_cpuid2 *supported);
/* Multiboot entry state: BSP gets (eax, ebx) = (0x2BADB002, info), APs ("DRAP", index) and RUNNABLE. */
int vcpu_setup_boot(Vcpu *v, uint32_t entry, uint32_t eax, uint32_t ebx, uint32_t esp);
int vcpu_start(Vcpu *v);
void vcpu_join(Vcpu *v);
void vcpu_destroy(Vcpu *v);

/* devices.c: port I/O dispatch and device state (proto/devices.proto). */
void devices_pio(Vcpu *v, uint16_t port, bool out, uint8_t *data, unsigned size);
int devices_save(Vm *vm, uint8_t **ret_buf, size_t *ret_len);
int devices_restore(Vm *vm, const uint8_t *buf, size_t len);

/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * Guest RAM: one memfd, mapped once MAP_SHARED, cut into at most two KVM
 * slots so nothing lands in the 32-bit MMIO hole:
 *   slot 0: guest [0, min(size, 3 GiB))          at memfd offset 0
 *   slot 1: guest [4 GiB, 4 GiB + size - 3 GiB)  at memfd offset 3 GiB
 * The memfd is therefore the plain concatenation of the slots, which is
 * also the layout of a RAM file given to --restore.
 */

#include <stdbool.h>
#include <stdint.h>

#include "dr-agent.h"
#include "macros.h"

#define RAM_LOW_LIMIT 0xC0000000ULL  /* 3 GiB: LAPIC/IOAPIC/PCI hole above */
#define RAM_HIGH_BASE 0x100000000ULL /* 4 GiB */
#define RAM_SIZE_MIN  (4ULL << 20)
#define RAM_SIZE_MAX  (1ULL << 40) /* 1 TiB: a sanity bound, not a KVM limit */

typedef struct GuestRam {
        int memfd;
        uint64_t size;
        uint8_t *map;
        unsigned n_regions;
        DrAgentRegion regions[2];
} GuestRam;

/* Checks a RAM size: within [RAM_SIZE_MIN, RAM_SIZE_MAX] and page aligned. 0 or -EINVAL/-ERANGE. */
int guest_ram_check_size(uint64_t size);

/* Creates fresh, zeroed guest RAM of `size` bytes in a new memfd. */
int guest_ram_new(uint64_t size, GuestRam **ret);

/*
 * Guest RAM from an existing fd (its whole size). When `fd` is a memfd or
 * another shmem file it is mapped directly and ownership passes to the
 * GuestRam (a failover starts on the replica without copying); otherwise
 * its contents are copied into a fresh memfd and fd stays the caller's.
 * *ret_direct says which happened. expected_size 0 means "whatever it is".
 */
int guest_ram_from_fd(int fd, uint64_t expected_size, GuestRam **ret, bool *ret_direct);

/* Registers the slots with KVM (no dirty logging: the agent turns it on). */
int guest_ram_register(GuestRam *ram, int vm_fd);

/* Host pointer for guest physical [gpa, gpa+len) if it lies within one slot, else NULL. */
void *guest_ram_ptr(GuestRam *ram, uint64_t gpa, uint64_t len);

GuestRam *guest_ram_free(GuestRam *ram);
DEFINE_TRIVIAL_CLEANUP_FUNC(GuestRam *, guest_ram_free);

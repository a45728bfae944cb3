/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * Multiboot v1 loader for ELF32 images. The image is untrusted: every
 * header, offset and size is checked before anything is copied, and no
 * segment may leave guest RAM or touch the boot area where the loader puts
 * its GDT, the multiboot info and the command line.
 */

#include <stddef.h>
#include <stdint.h>

#include "memory.h"

#define MULTIBOOT_HEADER_MAGIC     0x1BADB002U
#define MULTIBOOT_BOOTLOADER_MAGIC 0x2BADB002U
#define MULTIBOOT_SEARCH           8192
#define MULTIBOOT_IMAGE_MAX        (256U << 20)
#define MULTIBOOT_CMDLINE_MAX      4096 /* including the NUL */

/* Boot area in low memory (below the EBDA at 0x9fc00). */
#define BOOT_AREA_START 0x6000U
#define BOOT_GDT_ADDR   0x6000U /* flat null/code(0x08)/data(0x10) */
#define BOOT_STACK_TOP  0x6000U /* an initial ESP (multiboot leaves it undefined) */
#define BOOT_INFO_ADDR  0x7000U /* struct multiboot_info, mmap, loader name */
#define BOOT_CMDLINE    0x8000U
#define BOOT_AREA_END   (BOOT_CMDLINE + MULTIBOOT_CMDLINE_MAX)

#define BOOT_CS 0x08
#define BOOT_DS 0x10

typedef struct MultibootBoot {
        uint32_t entry;      /* physical entry point */
        uint32_t info_addr;  /* EBX for the BSP */
        uint64_t load_start; /* lowest / highest guest physical byte loaded (for logs) */
        uint64_t load_end;
} MultibootBoot;

/*
 * Validates `image` (len bytes) and loads it into `ram`, builds the
 * multiboot info with `cmdline` (at most MULTIBOOT_CMDLINE_MAX - 1 bytes).
 * Returns 0, or -ENOEXEC (not multiboot / bad ELF), -ERANGE (something
 * outside RAM or overlapping the boot area), -E2BIG (command line too long),
 * with *ret_why set to a static string saying what was wrong.
 */
int multiboot_load(GuestRam *ram, const uint8_t *image, size_t len, const char *cmdline, MultibootBoot *ret,
                   const char **ret_why);

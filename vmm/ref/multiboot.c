/* SPDX-License-Identifier: GPL-2.0-or-later */
#include <elf.h>
#include <errno.h>
#include <string.h>

#include "macros.h"
#include "multiboot.h"

/* Multiboot v1 header flags we understand; any other bit in 0..15 must make us refuse. */
#define MB_FLAG_PAGE_ALIGN  0x00000001U
#define MB_FLAG_MEMORY      0x00000002U
#define MB_FLAG_VIDEO       0x00000004U /* we have no framebuffer; ignored, as QEMU does */
#define MB_FLAG_AOUT_KLUDGE 0x00010000U

/* multiboot_info flags */
#define MBI_MEMORY  (1U << 0)
#define MBI_CMDLINE (1U << 2)
#define MBI_MMAP    (1U << 6)
#define MBI_LOADER  (1U << 9)

#define EBDA_START 0x9fc00ULL
#define MAX_PHDRS  64

struct mb_info {
        uint32_t flags;
        uint32_t mem_lower;
        uint32_t mem_upper;
        uint32_t boot_device;
        uint32_t cmdline;
        uint32_t mods_count;
        uint32_t mods_addr;
        uint32_t syms[4];
        uint32_t mmap_length;
        uint32_t mmap_addr;
        uint32_t drives_length;
        uint32_t drives_addr;
        uint32_t config_table;
        uint32_t boot_loader_name;
        uint32_t apm_table;
        uint32_t vbe[6];
        uint8_t framebuffer[22];
} __attribute__((packed));

struct mb_mmap_entry {
        uint32_t size; /* of the rest of the entry: 20 */
        uint64_t addr;
        uint64_t len;
        uint32_t type;
} __attribute__((packed));

static inline uint32_t rd32(const uint8_t *p)
{
        uint32_t v;
        memcpy(&v, p, sizeof(v));
        return v; /* x86 host: little endian like the image */
}

static int fail(const char **ret_why, const char *why, int err)
{
        *ret_why = why;
        return err;
}

static int find_header(const uint8_t *image, size_t len, uint32_t *ret_flags)
{
        size_t search = MIN(len, (size_t) MULTIBOOT_SEARCH);

        for (size_t off = 0; off + 12 <= search; off += 4) {
                uint32_t magic = rd32(image + off), flags, sum;

                if (magic != MULTIBOOT_HEADER_MAGIC)
                        continue;
                flags = rd32(image + off + 4);
                sum = rd32(image + off + 8);
                if ((uint32_t) (magic + flags + sum) != 0)
                        continue; /* a stray magic number; keep looking */
                *ret_flags = flags;
                return 0;
        }
        return -ENOENT;
}

static bool ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
        return a < b + blen && b < a + alen;
}

static int build_boot_area(GuestRam *ram, const char *cmdline, uint32_t *ret_info)
{
        static const uint64_t gdt[3] = {
                0, 0x00cf9b000000ffffULL, /* 0x08: code, base 0, limit 4 GiB, 32-bit */
                0x00cf93000000ffffULL,    /* 0x10: data, base 0, limit 4 GiB */
        };
        static const char loader_name[] = "dirtyrep-vmm";
        struct mb_mmap_entry mmap[5];
        struct mb_info info = {};
        uint8_t *area;
        size_t n = 0, cl = strlen(cmdline);
        uint64_t low = ram->regions[0].size;
        uint32_t p;

        if (cl >= MULTIBOOT_CMDLINE_MAX)
                return -E2BIG;
        area = guest_ram_ptr(ram, BOOT_AREA_START, BOOT_AREA_END - BOOT_AREA_START);
        if (!area)
                return -ERANGE; /* cannot happen: RAM_SIZE_MIN covers it */
        memset(area, 0, BOOT_AREA_END - BOOT_AREA_START);
        memcpy(area + (BOOT_GDT_ADDR - BOOT_AREA_START), gdt, sizeof(gdt));
        memcpy(area + (BOOT_CMDLINE - BOOT_AREA_START), cmdline, cl + 1);

        mmap[n++] = (struct mb_mmap_entry){20, 0, EBDA_START, 1};
        mmap[n++] = (struct mb_mmap_entry){20, EBDA_START, 0x100000ULL - EBDA_START, 2};
        mmap[n++] = (struct mb_mmap_entry){20, 0x100000ULL, low - 0x100000ULL, 1};
        if (ram->n_regions > 1)
                mmap[n++] = (struct mb_mmap_entry){20, ram->regions[1].guest_phys, ram->regions[1].size, 1};

        info.flags = MBI_MEMORY | MBI_CMDLINE | MBI_MMAP | MBI_LOADER;
        info.mem_lower = (uint32_t) (EBDA_START / 1024);
        /* mem_upper: KiB from 1 MiB up to the first hole, as the spec defines it. */
        info.mem_upper = (uint32_t) ((low - 0x100000ULL) / 1024);
        info.cmdline = BOOT_CMDLINE;
        p = BOOT_INFO_ADDR + (uint32_t) ALIGN_TO(sizeof(info), 16);
        info.mmap_addr = p;
        info.mmap_length = (uint32_t) (n * sizeof(mmap[0]));
        memcpy(area + (p - BOOT_AREA_START), mmap, n * sizeof(mmap[0]));
        p += (uint32_t) ALIGN_TO(n * sizeof(mmap[0]), 16);
        info.boot_loader_name = p;
        memcpy(area + (p - BOOT_AREA_START), loader_name, sizeof(loader_name));
        memcpy(area + (BOOT_INFO_ADDR - BOOT_AREA_START), &info, sizeof(info));
        *ret_info = BOOT_INFO_ADDR;
        return 0;
}

int multiboot_load(GuestRam *ram, const uint8_t *image, size_t len, const char *cmdline, MultibootBoot *ret,
                   const char **ret_why)
{
        const Elf32_Ehdr *eh;
        Elf32_Phdr ph[MAX_PHDRS];
        MultibootBoot b = {.load_start = UINT64_MAX};
        uint32_t flags, entry = 0;
        bool have_entry = false;
        unsigned n_load = 0;
        int r;

        if (len > MULTIBOOT_IMAGE_MAX)
                return fail(ret_why, "image larger than 256 MiB", -EFBIG);
        if (find_header(image, len, &flags) < 0)
                return fail(
                        ret_why,
                        "no multiboot v1 header (magic 0x1BADB002 with valid checksum) in the first 8 KiB",
                        -ENOEXEC);
        if (flags & 0xffffU & ~(MB_FLAG_PAGE_ALIGN | MB_FLAG_MEMORY | MB_FLAG_VIDEO))
                return fail(ret_why, "multiboot header requests a feature this loader does not provide",
                            -ENOEXEC);

        if (len < sizeof(Elf32_Ehdr) || memcmp(image, ELFMAG, SELFMAG) != 0)
                return fail(ret_why,
                            flags & MB_FLAG_AOUT_KLUDGE
                                    ? "not an ELF image (a.out-kludge images are not supported)"
                                    : "not an ELF image",
                            -ENOEXEC);
        eh = (const Elf32_Ehdr *) image;
        if (eh->e_ident[EI_CLASS] != ELFCLASS32 || eh->e_ident[EI_DATA] != ELFDATA2LSB)
                return fail(ret_why,
                            "not a little-endian ELF32 image (wrap ELF64 with objcopy -O elf32-i386)",
                            -ENOEXEC);
        if (eh->e_type != ET_EXEC || (eh->e_machine != EM_386 && eh->e_machine != EM_X86_64))
                return fail(ret_why, "not an x86 ELF executable", -ENOEXEC);
        if (eh->e_phentsize != sizeof(Elf32_Phdr) || eh->e_phnum == 0 || eh->e_phnum > MAX_PHDRS)
                return fail(ret_why, "bad ELF program header table (entry size or count)", -ENOEXEC);
        if ((uint64_t) eh->e_phoff + (uint64_t) eh->e_phnum * sizeof(Elf32_Phdr) > len)
                return fail(ret_why, "ELF program headers beyond the end of the file", -ENOEXEC);
        memcpy(ph, image + eh->e_phoff, eh->e_phnum * sizeof(Elf32_Phdr));

        /* Validate everything before writing anything. */
        for (unsigned i = 0; i < eh->e_phnum; i++) {
                const Elf32_Phdr *p = &ph[i];

                if (p->p_type != PT_LOAD || p->p_memsz == 0)
                        continue;
                if (p->p_filesz > p->p_memsz)
                        return fail(ret_why, "PT_LOAD segment with filesz > memsz", -ENOEXEC);
                if ((uint64_t) p->p_offset + p->p_filesz > len)
                        return fail(ret_why, "PT_LOAD segment data beyond the end of the file", -ENOEXEC);
                if (!guest_ram_ptr(ram, p->p_paddr, p->p_memsz))
                        return fail(ret_why, "PT_LOAD segment outside guest RAM", -ERANGE);
                if (ranges_overlap(p->p_paddr, p->p_memsz, BOOT_AREA_START, BOOT_AREA_END - BOOT_AREA_START))
                        return fail(ret_why,
                                    "PT_LOAD segment overlaps the loader's boot area (0x6000-0x9000)",
                                    -ERANGE);
                if (!have_entry && eh->e_entry >= p->p_vaddr && eh->e_entry - p->p_vaddr < p->p_memsz) {
                        entry = p->p_paddr + (eh->e_entry - p->p_vaddr);
                        have_entry = true;
                }
                b.load_start = MIN(b.load_start, (uint64_t) p->p_paddr);
                b.load_end = MAX(b.load_end, (uint64_t) p->p_paddr + p->p_memsz);
                n_load++;
        }
        if (n_load == 0)
                return fail(ret_why, "no loadable segment", -ENOEXEC);
        if (!have_entry)
                return fail(ret_why, "ELF entry point is not inside a loaded segment", -ENOEXEC);

        for (unsigned i = 0; i < eh->e_phnum; i++) {
                const Elf32_Phdr *p = &ph[i];
                uint8_t *dst;

                if (p->p_type != PT_LOAD || p->p_memsz == 0)
                        continue;
                dst = guest_ram_ptr(ram, p->p_paddr, p->p_memsz);
                memcpy(dst, image + p->p_offset, p->p_filesz);
                memset(dst + p->p_filesz, 0, p->p_memsz - p->p_filesz);
        }

        r = build_boot_area(ram, cmdline, &b.info_addr);
        if (r < 0)
                return fail(ret_why, r == -E2BIG ? "command line too long" : "no room for the boot area", r);
        b.entry = entry;
        *ret = b;
        return 0;
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Writes the seed corpus of fuzz-image into DIR (tests/fuzz/corpus/fuzz-image):
 * real images written by the image library (a full one, raw and LZ4, and an
 * incremental one) in the three input forms fuzz-image.c takes. Run by hand
 * when the format changes: build/tests/fuzz/gen-image-seeds tests/fuzz/corpus/fuzz-image
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "imagefile.h"
#include "vmstate.pb-c.h"

static const char *outdir;

static void put(const char *name, const uint8_t *buf, size_t len)
{
        char p[4096];
        FILE *f;

        snprintf(p, sizeof(p), "%s/%s", outdir, name);
        f = fopen(p, "we");
        if (!f || fwrite(buf, 1, len, f) != len) {
                perror(p);
                exit(1);
        }
        fclose(f);
}

static uint8_t *slurp(const char *path, size_t *len)
{
        FILE *f = fopen(path, "re");
        uint8_t *b;
        long n;

        if (!f || fseek(f, 0, SEEK_END) < 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) < 0)
                exit(1);
        b = malloc((size_t) n + 1);
        if (!b || fread(b, 1, (size_t) n, f) != (size_t) n)
                exit(1);
        fclose(f);
        *len = (size_t) n;
        return b;
}

static uint8_t *state(size_t *len)
{
        Dr__Vmstate__VmState s = DR__VMSTATE__VM_STATE__INIT;
        Dr__Vmstate__VcpuState v = DR__VMSTATE__VCPU_STATE__INIT, *vp = &v;
        Dr__Vmstate__Regs regs = DR__VMSTATE__REGS__INIT;
        Dr__Vmstate__Sregs sregs = DR__VMSTATE__SREGS__INIT;
        Dr__Vmstate__Segment seg = DR__VMSTATE__SEGMENT__INIT;
        Dr__Vmstate__DescriptorTable dt = DR__VMSTATE__DESCRIPTOR_TABLE__INIT;
        Dr__Vmstate__DebugRegs dr = DR__VMSTATE__DEBUG_REGS__INIT;
        Dr__Vmstate__VcpuEvents ev = DR__VMSTATE__VCPU_EVENTS__INIT;
        static uint8_t xsave[64];
        uint8_t *b;

        sregs.cs = sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.tr = sregs.ldt = &seg;
        sregs.gdt = sregs.idt = &dt;
        v.regs = &regs;
        v.sregs = &sregs;
        v.debugregs = &dr;
        v.events = &ev;
        v.xsave = (ProtobufCBinaryData){.len = sizeof(xsave), .data = xsave};
        s.format_version = 1;
        s.n_vcpus = 1;
        s.vcpus = &vp;
        *len = dr__vmstate__vm_state__get_packed_size(&s);
        b = malloc(*len);
        dr__vmstate__vm_state__pack(&s, b);
        return b;
}

/* Emits the three seed forms of one image directory. */
static void emit(const char *tmp, const char *img, const char *tag)
{
        static const char *const names[] = {"inventory.img", "state.img", "pagemap.img", "pages.img"};
        uint8_t *all = NULL, *f[4];
        size_t len[4], total = 1;
        char p[4096], name[128];

        for (int i = 0; i < 4; i++) {
                snprintf(p, sizeof(p), "%s/%s/%s", tmp, img, names[i]);
                f[i] = slurp(p, &len[i]);
                total += 4 + len[i];
        }
        all = malloc(total);
        all[0] = 2;
        for (size_t i = 0, off = 1; i < 4; i++) {
                uint32_t l = (uint32_t) len[i];
                memcpy(all + off, &l, 4);
                memcpy(all + off + 4, f[i], len[i]);
                off += 4 + len[i];
        }
        snprintf(name, sizeof(name), "dir-%s", tag);
        put(name, all, total);
        /* inventory.img alone */
        all[0] = 0;
        memcpy(all + 1, f[0], len[0]);
        snprintf(name, sizeof(name), "inventory-%s", tag);
        put(name, all, 1 + len[0]);
        /* page map payload with pages.img's payload size */
        {
                uint64_t pl = len[3] - IMAGE_PAGES_DATA_OFF;
                all[0] = 1;
                all[1] = strcmp(tag, "incremental") == 0;
                memcpy(all + 2, &pl, 8);
                memcpy(all + 10, f[2] + IMAGE_HEADER_SIZE, len[2] - IMAGE_HEADER_SIZE);
                snprintf(name, sizeof(name), "pagemap-%s", tag);
                put(name, all, 10 + len[2] - IMAGE_HEADER_SIZE);
        }
        for (int i = 0; i < 4; i++)
                free(f[i]);
        free(all);
}

int main(int argc, char **argv)
{
        ImageLayout lay = {
                .page_size = IMAGE_PAGE_SIZE,
                .regions = {{.slot = 0, .guest_phys = 0, .size = 4U << 20, .fd_offset = 0},
                            {.slot = 1, .guest_phys = 1ULL << 32, .size = 4U << 20, .fd_offset = 4U << 20}},
                .n_regions = 2,
                .total_pages = 2048,
        };
        char tmp[] = "/tmp/gen-image-seeds-XXXXXX", d[4096], parent[4096], err[IMAGE_ERR_MAX];
        uint64_t covered[32] = {};
        const uint8_t *ptrs[2];
        uint8_t *ram;
        size_t slen;
        uint8_t *st;

        if (argc != 2) {
                fprintf(stderr, "usage: gen-image-seeds DIR\n");
                return 2;
        }
        outdir = argv[1];
        if (!mkdtemp(tmp))
                return 1;
        ram = mmap(NULL, 8U << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        /* A few pages of text-like (compressible) and counter (less so) data in both regions. */
        for (unsigned p = 0; p < 2048; p += 97)
                for (unsigned w = 0; w < 4096; w++)
                        ram[(size_t) p * 4096 + w] =
                                p % 2 ? (uint8_t) "dirtyrep"[w % 8] : (uint8_t) (w * 7 + p);
        ptrs[0] = ram;
        ptrs[1] = ram + (4U << 20);
        st = state(&slen);
        for (int k = 0; k < 3; k++) {
                ImageCapture *c;
                ImageWriteOptions o = {
                        .vm_name = "seed", .state = st, .state_len = slen, .compress = k == 1};

                if (image_capture_new(&lay, ptrs, &c) < 0)
                        return 1;
                if (k == 2) {
                        for (unsigned p = 5; p < 2048; p += 301) {
                                ram[(size_t) p * 4096] ^= 0xff;
                                covered[p / 64] |= 1ULL << (p % 64);
                        }
                        snprintf(parent, sizeof(parent), "%s/full-raw", tmp);
                        o.covered = covered;
                        o.parent = parent;
                }
                image_capture_copy(c, o.covered);
                snprintf(d, sizeof(d), "%s/%s", tmp,
                         k == 0   ? "full-raw"
                         : k == 1 ? "full-lz4"
                                  : "incremental");
                if (image_capture_write(c, d, &o, NULL, err, sizeof(err)) < 0) {
                        fprintf(stderr, "%s\n", err);
                        return 1;
                }
                image_capture_free(c);
        }
        emit(tmp, "full-raw", "full-raw");
        emit(tmp, "full-lz4", "full-lz4");
        emit(tmp, "incremental", "incremental");
        snprintf(d, sizeof(d), "rm -rf '%s'", tmp);
        return system(d) == 0 ? 0 : 1;
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Checkpoint images without KVM: synthetic RAM in a memfd, a full image and
 * a chain of incrementals, restore compared byte for byte, a flipped byte
 * in every file of every image of the chain, a missing or swapped parent,
 * the capture protocol, and SIGKILL in the middle of a write. Then
 * `dirtyrepctl image show|verify --json` on images whose paths are UTF-8 (and
 * not UTF-8): the JSON must parse strictly and carry the path as it is.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <json-c/json.h>

#include "imagefile.h"
#include "tests.h"
#include "util.h"
#include "vmstate.pb-c.h"

#define MIB (1ULL << 20)

static char tmpdir[] = "/tmp/dr-test-image-XXXXXX";

typedef struct Vm {
        ImageLayout lay;
        uint8_t *ram; /* memfd layout */
        uint64_t ram_size;
} Vm;

static uint64_t rng = 0x9E3779B97F4A7C15ULL;
static uint64_t xorshift(void)
{
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        return rng;
}

static void vm_init(Vm *vm, uint64_t low, uint64_t high)
{
        int fd;

        vm->lay = (ImageLayout){.page_size = IMAGE_PAGE_SIZE};
        vm->lay.regions[0] = (ImageRegion){.slot = 0, .guest_phys = 0, .size = low, .fd_offset = 0};
        vm->lay.n_regions = 1;
        if (high) {
                vm->lay.regions[1] =
                        (ImageRegion){.slot = 1, .guest_phys = 1ULL << 32, .size = high, .fd_offset = low};
                vm->lay.n_regions = 2;
        }
        vm->lay.total_pages = (low + high) / IMAGE_PAGE_SIZE;
        ASSERT_OK(image_layout_check(&vm->lay));
        vm->ram_size = low + high;
        fd = memfd_new_sized("test-ram", vm->ram_size);
        ASSERT_OK(fd);
        vm->ram = mmap(NULL, vm->ram_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        ASSERT_TRUE(vm->ram != MAP_FAILED);
        close(fd);
}

static void vm_ptrs(Vm *vm, const uint8_t *ptrs[])
{
        for (size_t i = 0; i < vm->lay.n_regions; i++)
                ptrs[i] = vm->ram + vm->lay.regions[i].fd_offset;
}

/* A VmState with one vCPU whose rip is `rip`: enough for the image code, which only checks it decodes. */
static uint8_t *make_state(uint64_t rip, size_t *ret_len)
{
        Dr__Vmstate__VmState s = DR__VMSTATE__VM_STATE__INIT;
        Dr__Vmstate__VcpuState v = DR__VMSTATE__VCPU_STATE__INIT, *vp = &v;
        Dr__Vmstate__Regs regs = DR__VMSTATE__REGS__INIT;
        Dr__Vmstate__Sregs sregs = DR__VMSTATE__SREGS__INIT;
        Dr__Vmstate__Segment seg = DR__VMSTATE__SEGMENT__INIT;
        Dr__Vmstate__DescriptorTable dt = DR__VMSTATE__DESCRIPTOR_TABLE__INIT;
        Dr__Vmstate__DebugRegs dr = DR__VMSTATE__DEBUG_REGS__INIT;
        Dr__Vmstate__VcpuEvents ev = DR__VMSTATE__VCPU_EVENTS__INIT;
        uint8_t xsave[4096] = {};
        uint8_t *buf;

        regs.rip = rip;
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
        *ret_len = dr__vmstate__vm_state__get_packed_size(&s);
        buf = malloc(*ret_len);
        ASSERT_TRUE(buf);
        dr__vmstate__vm_state__pack(&s, buf);
        return buf;
}

static void page_fill(Vm *vm, uint64_t page, int mode)
{
        /* page index -> memfd offset */
        uint64_t first = 0;
        for (size_t i = 0; i < vm->lay.n_regions; i++) {
                uint64_t n = vm->lay.regions[i].size / IMAGE_PAGE_SIZE;
                if (page < first + n) {
                        uint64_t *p = (uint64_t *) (vm->ram + vm->lay.regions[i].fd_offset +
                                                    (page - first) * IMAGE_PAGE_SIZE);
                        for (unsigned w = 0; w < IMAGE_PAGE_SIZE / 8; w++)
                                /* mode 0: zero; 1: random (incompressible); 2: compressible */
                                p[w] = mode == 0 ? 0 : mode == 1 ? xorshift() : page * 31 + (w & 7);
                        return;
                }
                first += n;
        }
        abort();
}

/* Dirties n random pages and records them in covered (also zeroes some). */
static void dirty_some(Vm *vm, uint64_t *covered, unsigned n)
{
        for (unsigned i = 0; i < n; i++) {
                uint64_t page = xorshift() % vm->lay.total_pages;
                page_fill(vm, page, (int) (xorshift() % 3));
                covered[page / 64] |= 1ULL << (page % 64);
        }
}

static int take(Vm *vm, const char *dir, const uint64_t *covered, const char *parent, bool compress,
                uint64_t rip, ImageWriteStats *st, char *err)
{
        _cleanup_(image_capture_freep) ImageCapture *c = NULL;
        const uint8_t *ptrs[IMAGE_MAX_REGIONS];
        _cleanup_free_ uint8_t *state = NULL;
        size_t state_len;
        ImageWriteOptions o;

        vm_ptrs(vm, ptrs);
        ASSERT_OK(image_capture_new(&vm->lay, ptrs, &c));
        ASSERT_OK(image_capture_copy(c, covered));
        state = make_state(rip, &state_len);
        o = (ImageWriteOptions){.vm_name = "testvm",
                                .state = state,
                                .state_len = state_len,
                                .covered = covered,
                                .parent = parent,
                                .compress = compress,
                                .epoch = rip};
        return image_capture_write(c, dir, &o, st, err, IMAGE_ERR_MAX);
}

static void restore_and_compare(Vm *vm, const char *dir, const uint8_t *expect, uint64_t rip)
{
        _cleanup_(image_freep) Image *img = NULL;
        char err[IMAGE_ERR_MAX] = "";
        uint8_t *ram;
        Dr__Vmstate__VmState *vs;
        int fd, r;

        r = image_open(dir, IMAGE_OPEN_CHAIN | IMAGE_OPEN_VERIFY_DATA, &img, err, sizeof(err));
        if (r < 0)
                fprintf(stderr, "open %s: %s\n", dir, err);
        ASSERT_OK(r);
        fd = memfd_new_sized("restore", vm->ram_size);
        ram = mmap(NULL, vm->ram_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        ASSERT_TRUE(ram != MAP_FAILED);
        close(fd);
        ASSERT_OK(image_restore(img, ram, vm->ram_size, true, err, sizeof(err)));
        ASSERT_TRUE(memcmp(ram, expect, vm->ram_size) == 0);
        munmap(ram, vm->ram_size);
        vs = dr__vmstate__vm_state__unpack(NULL, img->state_len, img->state);
        ASSERT_TRUE(vs);
        ASSERT_EQ(vs->vcpus[0]->regs->rip, rip);
        dr__vmstate__vm_state__free_unpacked(vs, NULL);
}

static char *path(const char *name)
{
        char *p;
        ASSERT_TRUE(asprintf(&p, "%s/%s", tmpdir, name) > 0);
        return p;
}

static uint8_t *snapshot(const Vm *vm)
{
        uint8_t *s = malloc(vm->ram_size);
        ASSERT_TRUE(s);
        memcpy(s, vm->ram, vm->ram_size);
        return s;
}

/* Builds a full image and three incrementals; returns the RAM after each. */
static void build_chain(Vm *vm, const char *prefix, bool compress, uint8_t *snaps[4])
{
        uint64_t words = (vm->lay.total_pages + 63) / 64;
        char err[IMAGE_ERR_MAX] = "";
        ImageWriteStats st;
        char name[64];

        for (uint64_t p = 0; p < vm->lay.total_pages; p += 3)
                page_fill(vm, p, p % 2 ? 1 : 2);
        snprintf(name, sizeof(name), "%s0", prefix);
        _cleanup_free_ char *d0 = path(name);
        ASSERT_OK(take(vm, d0, NULL, NULL, compress, 100, &st, err));
        ASSERT_EQ(st.parent_pages, 0);
        ASSERT_TRUE(st.present_pages > 0 && st.zero_pages > 0);
        snaps[0] = snapshot(vm);
        for (int k = 1; k <= 3; k++) {
                _cleanup_free_ uint64_t *covered = calloc(words, sizeof(uint64_t));
                _cleanup_free_ char *parent = NULL, *d = NULL;

                dirty_some(vm, covered, 50);
                snprintf(name, sizeof(name), "%s%d", prefix, k - 1);
                parent = path(name);
                snprintf(name, sizeof(name), "%s%d", prefix, k);
                d = path(name);
                if (take(vm, d, covered, parent, compress, 100 + k, &st, err) < 0) {
                        fprintf(stderr, "take %s: %s\n", d, err);
                        abort();
                }
                /* Small: only what was dirtied is stored. */
                ASSERT_TRUE(st.present_pages + st.zero_pages <= 50);
                ASSERT_TRUE(st.parent_pages >= vm->lay.total_pages - 50);
                snaps[k] = snapshot(vm);
        }
}

static void chain_restore(void)
{
        Vm vm;
        uint8_t *snaps[4];

        vm_init(&vm, 8 * MIB, 4 * MIB);
        build_chain(&vm, "raw", false, snaps);
        for (int k = 0; k <= 3; k++) {
                char name[16];
                snprintf(name, sizeof(name), "raw%d", k);
                _cleanup_free_ char *d = path(name);
                restore_and_compare(&vm, d, snaps[k], 100 + k);
                free(snaps[k]);
        }
        build_chain(&vm, "lz4", true, snaps);
        for (int k = 0; k <= 3; k++) {
                char name[16];
                snprintf(name, sizeof(name), "lz4%d", k);
                _cleanup_free_ char *d = path(name);
                restore_and_compare(&vm, d, snaps[k], 100 + k);
                free(snaps[k]);
        }
        munmap(vm.ram, vm.ram_size);
}

static void flip(const char *file, off_t off)
{
        int fd = open(file, O_RDWR | O_CLOEXEC);
        uint8_t b;

        ASSERT_TRUE(fd >= 0);
        ASSERT_EQ(pread(fd, &b, 1, off), 1);
        b ^= 0x20;
        ASSERT_EQ(pwrite(fd, &b, 1, off), 1);
        close(fd);
}

/* Every file of the newest image and of its parent: a flipped byte anywhere is caught and the file named. */
static void flipped_byte_everywhere(void)
{
        static const char *const files[] = {"inventory.img", "state.img", "pagemap.img", "pages.img"};
        Vm vm;
        uint8_t *snaps[4];
        char err[IMAGE_ERR_MAX];

        vm_init(&vm, 4 * MIB, 0);
        build_chain(&vm, "flip", true, snaps);
        for (int k = 0; k < 4; k++)
                free(snaps[k]);
        for (int img = 3; img >= 1; img -= 2) /* the newest and a parent in the middle of the chain */
                for (size_t f = 0; f < ELEMENTSOF(files); f++) {
                        char name[64];
                        struct stat st;
                        off_t offs[8];
                        size_t n = 0;

                        snprintf(name, sizeof(name), "flip%d/%s", img, files[f]);
                        _cleanup_free_ char *file = path(name);
                        ASSERT_OK(stat(file, &st));
                        /* header bytes, first payload byte, middle, last */
                        offs[n++] = 0;
                        offs[n++] = 9;
                        offs[n++] = 20;
                        offs[n++] = 33;
                        offs[n++] = 44;
                        if (st.st_size > 48)
                                offs[n++] = streq(files[f], "pages.img") && st.st_size > 4096 ? 4096 : 48;
                        offs[n++] = st.st_size / 2;
                        offs[n++] = st.st_size - 1;
                        for (size_t i = 0; i < n; i++) {
                                _cleanup_(image_freep) Image *im = NULL;
                                _cleanup_free_ char *top = path("flip3");
                                int r;

                                flip(file, offs[i]);
                                /* verify: everything */
                                r = image_open(top, IMAGE_OPEN_CHAIN | IMAGE_OPEN_VERIFY_DATA, &im, err,
                                               sizeof(err));
                                if (r >= 0 || !strstr(err, name))
                                        fprintf(stderr, "flip %s @%lld: r=%d err=%s\n", name,
                                                (long long) offs[i], r, err);
                                ASSERT_TRUE(r < 0);
                                ASSERT_TRUE(strstr(err, name) != NULL);
                                /* restore: open the chain (metadata), then restore checks the data */
                                r = image_open(top, IMAGE_OPEN_CHAIN, &im, err, sizeof(err));
                                if (r >= 0) {
                                        uint8_t *ram = calloc(1, vm.ram_size);
                                        ASSERT_TRUE(ram);
                                        r = image_restore(im, ram, vm.ram_size, true, err, sizeof(err));
                                        free(ram);
                                        im = image_free(im);
                                }
                                if (r >= 0 || !strstr(err, name))
                                        fprintf(stderr, "restore flip %s @%lld: r=%d err=%s\n", name,
                                                (long long) offs[i], r, err);
                                ASSERT_TRUE(r < 0);
                                ASSERT_TRUE(strstr(err, name) != NULL);
                                flip(file, offs[i]); /* back */
                                ASSERT_OK(image_open(top, IMAGE_OPEN_CHAIN | IMAGE_OPEN_VERIFY_DATA, &im,
                                                     err, sizeof(err)));
                        }
                }
        munmap(vm.ram, vm.ram_size);
}

static void parent_missing_or_swapped(void)
{
        _cleanup_free_ char *d1 = path("raw1"), *d0 = path("raw0"), *moved = path("raw0-moved"),
                            *d2 = path("raw2"), *l1 = path("lz41"), *l0 = path("lz40");
        _cleanup_(image_freep) Image *im = NULL;
        char err[IMAGE_ERR_MAX];

        ASSERT_OK(rename(d0, moved));
        ASSERT_TRUE(image_open(d2, IMAGE_OPEN_CHAIN, &im, err, sizeof(err)) == -ENOENT);
        ASSERT_TRUE(strstr(err, "parent image") && strstr(err, "missing"));
        /* Without the chain the image alone still opens (what `image show` decodes first). */
        ASSERT_OK(image_open(d2, 0, &im, err, sizeof(err)));
        im = image_free(im);
        ASSERT_OK(rename(moved, d0));
        /* Another image in the parent's place: the id / inventory hash does not match. */
        ASSERT_OK(rename(d0, moved));
        ASSERT_OK(symlink(l0, d0));
        ASSERT_TRUE(image_open(d1, IMAGE_OPEN_CHAIN, &im, err, sizeof(err)) == -EBADMSG);
        ASSERT_TRUE(strstr(err, "not the image this one was taken on"));
        ASSERT_OK(unlink(d0));
        ASSERT_OK(rename(moved, d0));
        ASSERT_OK(image_open(d2, IMAGE_OPEN_CHAIN, &im, err, sizeof(err)));
        im = image_free(im);
        /* A file from another image is refused even with a valid checksum. */
        {
                _cleanup_free_ char *a = path("raw1/state.img"), *b = path("lz41/state.img"),
                                    *keep = path("keep");
                ASSERT_OK(rename(a, keep));
                ASSERT_OK(link(b, a));
                ASSERT_TRUE(image_open(d1, 0, &im, err, sizeof(err)) < 0);
                ASSERT_TRUE(strstr(err, "raw1/state.img") && strstr(err, "another image"));
                ASSERT_OK(unlink(a));
                ASSERT_OK(rename(keep, a));
        }
        (void) l1;
}

static void capture_protocol(void)
{
        _cleanup_free_ char *d = path("proto"), *p0 = path("raw0");
        _cleanup_(image_capture_freep) ImageCapture *c = NULL;
        const uint8_t *ptrs[IMAGE_MAX_REGIONS];
        _cleanup_free_ uint8_t *state = NULL;
        char err[IMAGE_ERR_MAX];
        uint64_t covered[2048] = {}, copied[2048] = {};
        size_t len;
        Vm vm;
        ImageWriteOptions o;

        vm_init(&vm, 8 * MIB, 4 * MIB);
        vm_ptrs(&vm, ptrs);
        state = make_state(1, &len);
        ASSERT_OK(image_capture_new(&vm.lay, ptrs, &c));
        covered[0] = 0xff;
        copied[0] = 0x7f; /* page 7 covered but never copied */
        ASSERT_OK(image_capture_copy(c, copied));
        o = (ImageWriteOptions){
                .vm_name = "testvm", .state = state, .state_len = len, .covered = covered, .parent = p0};
        ASSERT_TRUE(image_capture_write(c, d, &o, NULL, err, sizeof(err)) == -EINVAL);
        ASSERT_TRUE(access(d, F_OK) < 0);
        /* A parent of another layout is refused. */
        {
                Vm small;
                _cleanup_(image_capture_freep) ImageCapture *c2 = NULL;
                vm_init(&small, 4 * MIB, 0);
                vm_ptrs(&small, ptrs);
                ASSERT_OK(image_capture_new(&small.lay, ptrs, &c2));
                ASSERT_OK(image_capture_copy(c2, NULL));
                o.covered = covered;
                ASSERT_TRUE(image_capture_write(c2, d, &o, NULL, err, sizeof(err)) == -EINVAL);
                ASSERT_TRUE(strstr(err, "another VM or RAM layout"));
                munmap(small.ram, small.ram_size);
        }
        /* A parent that is not the image `covered` counts from. */
        {
                uint8_t other[16] = {1};
                ASSERT_OK(image_capture_copy(c, covered));
                o.parent_id = other;
                ASSERT_TRUE(image_capture_write(c, d, &o, NULL, err, sizeof(err)) == -ESTALE);
                ASSERT_TRUE(strstr(err, "not the last image taken"));
                ASSERT_TRUE(access(d, F_OK) < 0);
                o.parent_id = NULL;
        }
        /* Existing target. */
        o.covered = NULL;
        o.parent = NULL;
        ASSERT_OK(image_capture_copy(c, NULL));
        ASSERT_TRUE(image_capture_write(c, p0, &o, NULL, err, sizeof(err)) == -EEXIST);
        munmap(vm.ram, vm.ram_size);
}

/* SIGKILL at random points of a write: the target is either absent or a complete valid image. */
static void killed_mid_write(void)
{
        Vm vm;
        unsigned absent = 0, complete = 0;

        vm_init(&vm, 64 * MIB, 0);
        for (uint64_t p = 0; p < vm.lay.total_pages; p++)
                page_fill(&vm, p, 1);
        uint64_t t0 = now_usec(), full_us;
        {
                _cleanup_free_ char *d = path("kill-timing");
                char err[IMAGE_ERR_MAX];
                ASSERT_OK(take(&vm, d, NULL, NULL, false, 1, NULL, err));
                full_us = now_usec() - t0;
        }
        for (int round = 0; round < 12; round++) {
                char name[32], err[IMAGE_ERR_MAX];
                pid_t pid;

                snprintf(name, sizeof(name), "kill%d", round);
                _cleanup_free_ char *d = path(name);
                pid = fork();
                ASSERT_TRUE(pid >= 0);
                if (pid == 0) {
                        ImageWriteStats st;
                        _exit(take(&vm, d, NULL, NULL, false, 1, &st, err) < 0 ? 1 : 0);
                }
                /* from right away to past the end of a whole write */
                usleep((useconds_t) (xorshift() % (full_us + 1)));
                kill(pid, SIGKILL);
                waitpid(pid, NULL, 0);
                if (access(d, F_OK) < 0)
                        absent++;
                else {
                        _cleanup_(image_freep) Image *im = NULL;
                        ASSERT_OK(image_open(d, IMAGE_OPEN_CHAIN | IMAGE_OPEN_VERIFY_DATA, &im, err,
                                             sizeof(err)));
                        complete++;
                }
        }
        printf("killed writes: %u left no image, %u had completed\n", absent, complete);
        ASSERT_TRUE(absent > 0);
        munmap(vm.ram, vm.ram_size);
}

/* One sequence: later steps use the images earlier ones wrote. */
TEST(images)
{
        chain_restore();
        flipped_byte_everywhere();
        parent_missing_or_swapped();
        capture_protocol();
        killed_mid_write();
}

/* Runs `$DR_DIRTYREPCTL image VERB --json DIR`; returns its stdout (malloc()ed) and exit status. */
static char *ctl_json(const char *verb, const char *dir, int *ret_status)
{
        const char *ctl = getenv("DR_DIRTYREPCTL");
        size_t len = 0, cap = 1 << 16;
        char *out = malloc(cap);
        int pfd[2], st;
        pid_t pid;
        ssize_t n;

        if (!ctl) {
                fprintf(stderr, "DR_DIRTYREPCTL is not set (run through meson test)\n");
                exit(1);
        }
        ASSERT_TRUE(out);
        ASSERT_OK(pipe(pfd));
        pid = fork();
        ASSERT_OK(pid);
        if (pid == 0) {
                dup2(pfd[1], STDOUT_FILENO);
                close(pfd[0]);
                execl(ctl, ctl, "image", verb, "--json", dir, (char *) NULL);
                _exit(127);
        }
        close(pfd[1]);
        while ((n = read(pfd[0], out + len, cap - 1 - len)) > 0) {
                len += (size_t) n;
                ASSERT_TRUE(len < cap - 1);
        }
        close(pfd[0]);
        out[len] = 0;
        ASSERT_EQ(waitpid(pid, &st, 0), pid);
        ASSERT_TRUE(WIFEXITED(st));
        *ret_status = WEXITSTATUS(st);
        return out;
}

/* Parses strictly, UTF-8 checked, the whole output as one object. */
static json_object *parse_strict(const char *text)
{
        json_tokener *tok = json_tokener_new();
        json_object *o;

        ASSERT_TRUE(tok);
        json_tokener_set_flags(tok, JSON_TOKENER_STRICT | JSON_TOKENER_VALIDATE_UTF8);
        o = json_tokener_parse_ex(tok, text, (int) strlen(text));
        if (!o || json_tokener_get_error(tok) != json_tokener_success) {
                fprintf(stderr, "not strict JSON (%s): %s\n",
                        json_tokener_error_desc(json_tokener_get_error(tok)), text);
                exit(1);
        }
        ASSERT_TRUE(json_object_is_type(o, json_type_object));
        json_tokener_free(tok);
        return o;
}

static const char *jstr(json_object *o, const char *key)
{
        json_object *v;

        ASSERT_TRUE(json_object_object_get_ex(o, key, &v));
        ASSERT_TRUE(json_object_is_type(v, json_type_string));
        return json_object_get_string(v);
}

TEST(json_paths_utf8)
{
        /* "grüße-镜像", and a name that is not UTF-8: 0xff, a lone continuation byte, a cut sequence. */
        static const char good[] = "gr\xc3\xbc\xc3\x9f"
                                   "e-\xe9\x95\x9c\xe5\x83\x8f";
        static const char bad[] = "bad-\xff-\x80-\xe9\x95";
        _cleanup_free_ char *d0 = NULL, *d1 = NULL, *db = NULL, *ppath = NULL, *out = NULL;
        _cleanup_free_ uint64_t *covered = NULL;
        char err[IMAGE_ERR_MAX] = "", name[128];
        json_object *o, *parent, *chain;
        int status;
        Vm vm;

        vm_init(&vm, 4 * MIB, 0);
        covered = calloc((vm.lay.total_pages + 63) / 64, sizeof(uint64_t));
        ASSERT_TRUE(covered);
        for (uint64_t p = 0; p < vm.lay.total_pages; p += 7)
                page_fill(&vm, p, 1);
        snprintf(name, sizeof(name), "%s-0", good);
        d0 = path(name);
        snprintf(name, sizeof(name), "%s-1", good);
        d1 = path(name);
        db = path(bad);
        if (take(&vm, d0, NULL, NULL, false, 1, NULL, err) < 0 ||
            (dirty_some(&vm, covered, 20), take(&vm, d1, covered, d0, true, 2, NULL, err)) < 0 ||
            take(&vm, db, NULL, NULL, false, 3, NULL, err) < 0) {
                fprintf(stderr, "take: %s\n", err);
                exit(1);
        }

        /* show: the path, the parent's path (stored as "../NAME") and the chain's paths, byte for byte. */
        out = ctl_json("show", d1, &status);
        ASSERT_EQ(status, 0);
        ASSERT_TRUE(strstr(out, good)); /* UTF-8 as it is, not escaped byte by byte */
        o = parse_strict(out);
        ASSERT_TRUE(streq(jstr(o, "path"), d1));
        ASSERT_TRUE(json_object_object_get_ex(o, "parent", &parent));
        ASSERT_TRUE(asprintf(&ppath, "../%s-0", good) > 0);
        ASSERT_TRUE(streq(jstr(parent, "path"), ppath));
        ASSERT_TRUE(json_object_object_get_ex(o, "chain", &chain));
        ASSERT_EQ(json_object_array_length(chain), 2);
        ASSERT_TRUE(streq(jstr(json_object_array_get_idx(chain, 1), "path"), d0));
        json_object_put(o);
        out = mfree(out);

        out = ctl_json("verify", d1, &status);
        ASSERT_EQ(status, 0);
        o = parse_strict(out);
        ASSERT_TRUE(streq(jstr(o, "path"), d1));
        json_object_put(o);
        out = mfree(out);

        /* Not UTF-8: still strict JSON, each bad byte one U+FFFD, the rest kept. */
        out = ctl_json("show", db, &status);
        ASSERT_EQ(status, 0);
        o = parse_strict(out);
        ASSERT_TRUE(strstr(jstr(o, "path"), "bad-\xef\xbf\xbd-\xef\xbf\xbd-\xef\xbf\xbd\xef\xbf\xbd"));
        json_object_put(o);
        out = mfree(out);

        /* A failure's JSON too: verify of a directory that is not an image, named in UTF-8. */
        snprintf(name, sizeof(name), "%s-none", good);
        free(d0);
        d0 = path(name);
        ASSERT_OK(mkdir(d0, 0700));
        out = ctl_json("verify", d0, &status);
        ASSERT_EQ(status, 1);
        o = parse_strict(out);
        ASSERT_TRUE(streq(jstr(o, "path"), d0));
        ASSERT_TRUE(strstr(jstr(o, "error"), good));
        json_object_put(o);
        munmap(vm.ram, vm.ram_size);
}

static int setup(void)
{
        ASSERT_TRUE(mkdtemp(tmpdir));
        return 0;
}

int main(void)
{
        int r;
        char cmd[256];

        setup();
        r = tests_run();
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
        if (system(cmd) != 0)
                fprintf(stderr, "could not remove %s\n", tmpdir);
        return r;
}

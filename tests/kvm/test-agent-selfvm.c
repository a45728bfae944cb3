/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * libdirtyrep-agent against a real KVM VM, without dirtyrep-vmm: this test
 * is its own tiny VMM (one vCPU, 32-bit flat protected mode, a loop that
 * bumps a counter, dirties pages and writes to I/O port 0x10) and talks to
 * the embedded agent over the control socket as a raw peer. Runs once with
 * dirty rings and once with the bitmap.
 *
 * Prints the PAUSE -> RESUME round trip it measures.
 *
 * Exit 77 only when /dev/kvm is missing.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "agent-client.h"
#include "dr-agent.h"
#include "log.h"
#include "state.h"
#include "util.h"

#define RAM_SIZE    (4u << 20)
#define CODE_GPA    0x1000
#define COUNTER_GPA 0x8000
/* Large enough that the harvest loop keeps up; a full ring of CPL0 (emulated) stores can jam
 * (docs/kvm-host.md). */
#define RING_ENTRIES 65536
#define PORT         0x10

/*
 * 32-bit code at CODE_GPA:
 *   mov ebx, 0x10000
 * loop:
 *   mov eax, [0x8000]; inc eax; mov [0x8000], eax   ; the counter
 *   mov [ebx], eax; add ebx, 0x1000                  ; dirty the next page
 *   cmp ebx, 0x100000; jb 1f; mov ebx, 0x10000
 * 1:test eax, 0xff; jnz loop
 *   out 0x10, al; jmp loop                           ; every 256 rounds
 */
static const uint8_t guest_code[] = {
        0xbb, 0x00, 0x00, 0x01, 0x00,       /* 0: mov ebx, 0x10000 */
        0xa1, 0x00, 0x80, 0x00, 0x00,       /* 5: mov eax, [0x8000] */
        0x40,                               /* 10: inc eax */
        0xa3, 0x00, 0x80, 0x00, 0x00,       /* 11: mov [0x8000], eax */
        0x89, 0x03,                         /* 16: mov [ebx], eax */
        0x81, 0xc3, 0x00, 0x10, 0x00, 0x00, /* 18: add ebx, 0x1000 */
        0x81, 0xfb, 0x00, 0x00, 0x10, 0x00, /* 24: cmp ebx, 0x100000 */
        0x72, 0x05,                         /* 30: jb +5 */
        0xbb, 0x00, 0x00, 0x01, 0x00,       /* 32: mov ebx, 0x10000 */
        0xa9, 0xff, 0x00, 0x00, 0x00,       /* 37: test eax, 0xff */
        0x75, 0xd9,                         /* 42: jnz 5 */
        0xe6, PORT,                         /* 44: out 0x10, al */
        0xeb, 0xd5,                         /* 46: jmp 5 */
};

typedef struct Vm {
        int kvm, vm, vcpu, memfd;
        struct kvm_run *run;
        size_t run_size;
        uint8_t *ram;
        DrTrackingMode mode;
        DrAgent *agent;
        pthread_t thread;
        atomic_ulong io_exits;
        atomic_ulong released_bytes;
        atomic_int vcpu_result;
        atomic_int wedged_calls;
        uint64_t fetch; /* the test client's ring fetch index */
        char sock[108];
} Vm;

static void on_release(void *userdata, unsigned channel, const void *buf, size_t len)
{
        Vm *vm = userdata;
        atomic_fetch_add(&vm->released_bytes, len);
}

static void on_wedged(void *userdata, unsigned vcpu)
{
        Vm *vm = userdata;
        atomic_fetch_add(&vm->wedged_calls, 1);
}

static void *vcpu_thread(void *userdata)
{
        Vm *vm = userdata;
        int r;

        CHECK(dr_agent_vcpu_thread_init(vm->agent, 0) >= 0);
        for (;;) {
                r = dr_agent_vcpu_before_run(vm->agent, 0);
                if (r < 0)
                        break;
                r = ioctl(vm->vcpu, KVM_RUN, 0) < 0 ? -errno : 0;
                r = dr_agent_vcpu_handle_exit(vm->agent, 0, r);
                if (r > 0)
                        continue;
                if (r < 0)
                        break;
                if (vm->run->exit_reason == KVM_EXIT_IO && vm->run->io.port == PORT) {
                        atomic_fetch_add(&vm->io_exits, 1);
                        (void) dr_agent_output_submit(vm->agent, 0, "tick\n", 5);
                        continue;
                }
                fprintf(stderr, "unexpected exit %u\n", vm->run->exit_reason);
                r = -EIO;
                break;
        }
        atomic_store(&vm->vcpu_result, r);
        return NULL;
}

static uint32_t counter(Vm *vm)
{
        return __atomic_load_n((uint32_t *) (vm->ram + COUNTER_GPA), __ATOMIC_RELAXED);
}

/* True when the guest's counter moves within ~1 s. */
static bool guest_progresses(Vm *vm)
{
        uint32_t c0 = counter(vm);
        for (int i = 0; i < 100; i++) {
                usleep(10000);
                if (counter(vm) != c0)
                        return true;
        }
        return false;
}

static void vm_start(Vm *vm, DrTrackingMode mode)
{
        struct kvm_sregs sregs;
        struct kvm_regs regs = {.rip = CODE_GPA, .rflags = 0x2};
        struct kvm_pit_config pit = {};
        _cleanup_free_ struct kvm_cpuid2 *cpuid = NULL;
        struct kvm_userspace_memory_region mr;
        DrAgentRegion region;
        DrAgentConfig cfg;

        *vm = (Vm){.mode = mode};
        vm->kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
        if (vm->kvm < 0 && (errno == ENOENT || errno == ENODEV)) {
                printf("no /dev/kvm: skipping\n");
                exit(77);
        }
        CHECK(vm->kvm >= 0);
        vm->vm = ioctl(vm->kvm, KVM_CREATE_VM, 0);
        CHECK(vm->vm >= 0);
        (void) ioctl(vm->vm, KVM_SET_TSS_ADDR, 0xfffbd000UL);
        CHECK(ioctl(vm->vm, KVM_CREATE_IRQCHIP, 0) == 0);
        CHECK(ioctl(vm->vm, KVM_CREATE_PIT2, &pit) == 0);

        if (mode == DR_TRACKING_RING) {
                struct kvm_enable_cap cap = {.cap = KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
                                             .args[0] = RING_ENTRIES * sizeof(struct kvm_dirty_gfn)};
                if (ioctl(vm->vm, KVM_ENABLE_CAP, &cap) < 0) {
                        cap.cap = KVM_CAP_DIRTY_LOG_RING;
                        CHECK(ioctl(vm->vm, KVM_ENABLE_CAP, &cap) == 0);
                }
        }

        vm->memfd = memfd_new_sized("selfvm-ram", RAM_SIZE);
        CHECK(vm->memfd >= 0);
        vm->ram = mmap(NULL, RAM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, vm->memfd, 0);
        CHECK(vm->ram != MAP_FAILED);
        memcpy(vm->ram + CODE_GPA, guest_code, sizeof(guest_code));
        mr = (struct kvm_userspace_memory_region){.slot = 0,
                                                  .guest_phys_addr = 0,
                                                  .memory_size = RAM_SIZE,
                                                  .userspace_addr = (uintptr_t) vm->ram};
        CHECK(ioctl(vm->vm, KVM_SET_USER_MEMORY_REGION, &mr) == 0);

        vm->vcpu = ioctl(vm->vm, KVM_CREATE_VCPU, 0);
        CHECK(vm->vcpu >= 0);
        vm->run_size = (size_t) ioctl(vm->kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
        vm->run = mmap(NULL, vm->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vm->vcpu, 0);
        CHECK(vm->run != MAP_FAILED);
        cpuid = calloc(1, sizeof(*cpuid) + 256 * sizeof(struct kvm_cpuid_entry2));
        cpuid->nent = 256;
        CHECK(ioctl(vm->kvm, KVM_GET_SUPPORTED_CPUID, cpuid) == 0);
        CHECK(ioctl(vm->vcpu, KVM_SET_CPUID2, cpuid) == 0);

        CHECK(ioctl(vm->vcpu, KVM_GET_SREGS, &sregs) == 0);
        sregs.cs = (struct kvm_segment){
                .limit = 0xffffffff, .selector = 8, .type = 0xb, .present = 1, .db = 1, .s = 1, .g = 1};
        sregs.ds = (struct kvm_segment){
                .limit = 0xffffffff, .selector = 0x10, .type = 0x3, .present = 1, .db = 1, .s = 1, .g = 1};
        sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
        sregs.tr = (struct kvm_segment){.limit = 0xffff, .type = 0xb, .present = 1};
        sregs.ldt = (struct kvm_segment){.limit = 0xffff, .type = 0x2, .present = 1};
        sregs.cr0 = 0x11;
        sregs.cr4 = sregs.efer = 0;
        CHECK(ioctl(vm->vcpu, KVM_SET_SREGS, &sregs) == 0);
        CHECK(ioctl(vm->vcpu, KVM_SET_REGS, &regs) == 0);

        snprintf(vm->sock, sizeof(vm->sock), "/tmp/dr-agent-selfvm-%d.sock", (int) getpid());
        region = (DrAgentRegion){
                .slot = 0, .guest_phys = 0, .size = RAM_SIZE, .memfd = vm->memfd, .host_addr = vm->ram};
        cfg = (DrAgentConfig){
                .socket_path = vm->sock,
                .kvm_fd = vm->kvm,
                .vm_fd = vm->vm,
                .vm_name = "selfvm",
                .mode = mode,
                .ring_entries = mode == DR_TRACKING_RING ? RING_ENTRIES : 0,
                .regions = &region,
                .n_regions = 1,
                .n_vcpus = 1,
                .output_limit = 1 << 20,
                .cb = {.output_release = on_release, .vcpu_wedged = on_wedged},
                .userdata = vm,
        };
        CHECK(dr_agent_new(&cfg, &vm->agent) >= 0);
        CHECK(dr_agent_add_vcpu(vm->agent, 0, vm->vcpu, vm->run) >= 0);
        CHECK(dr_agent_start(vm->agent) >= 0);
        CHECK(pthread_create(&vm->thread, NULL, vcpu_thread, vm) == 0);
        CHECK(guest_progresses(vm));
}

static void vm_stop(Vm *vm, int expect_vcpu_result)
{
        dr_agent_stop(vm->agent);
        pthread_join(vm->thread, NULL);
        CHECK_EQ(atomic_load(&vm->vcpu_result), expect_vcpu_result);
        vm->agent = dr_agent_free(vm->agent);
        CHECK(access(vm->sock, F_OK) < 0); /* socket removed */
        munmap(vm->run, vm->run_size);
        munmap(vm->ram, RAM_SIZE);
        close(vm->vcpu);
        close(vm->memfd);
        close(vm->vm);
        close(vm->kvm);
}

static Dr__Control__StatusReply *status_get(int fd, Dr__Control__Reply **ret)
{
        Dr__Control__Request r = peer_empty_request(DR__CONTROL__REQUEST__BODY_GET_STATUS);
        CHECK_EQ(peer_simple(fd, &r, ret), 0);
        CHECK((*ret)->body_case == DR__CONTROL__REPLY__BODY_STATUS);
        return (*ret)->status;
}

/* Sends raw bytes (and optionally an fd) and returns the error of the reply, whose id must be 0. */
static int send_raw(int fd, const void *buf, size_t len, int pass_fd)
{
        Dr__Control__Reply *rep;
        int e;

        CHECK(fdpass_send(fd, buf, len, pass_fd >= 0 ? &pass_fd : NULL, pass_fd >= 0 ? 1 : 0) == 0);
        rep = peer_recv(fd, NULL, 0, NULL);
        CHECK(rep);
        CHECK_EQ(rep->id, 0);
        CHECK(rep->error_message && *rep->error_message);
        e = rep->error;
        dr__control__reply__free_unpacked(rep, NULL);
        return e;
}

static void test_bad_input(Vm *vm, int fd)
{
        static uint8_t big[70000];
        uint8_t garbage[64];
        int p[2];
        char c;

        memset(garbage, 0xff, sizeof(garbage));
        CHECK_EQ(send_raw(fd, garbage, sizeof(garbage), -1), -EBADMSG);
        CHECK_EQ(send_raw(fd, garbage, 3, -1), -EBADMSG);
        CHECK_EQ(send_raw(fd, big, sizeof(big), -1), -EMSGSIZE);
        CHECK_EQ(send_raw(fd, "", 0, -1), -EBADMSG);

        /* fds sent to the agent are closed: the pipe's read end sees EOF once ours is closed too. */
        CHECK(pipe2(p, O_CLOEXEC) == 0);
        CHECK_EQ(send_raw(fd, garbage, 5, p[1]), -EBADMSG);
        close(p[1]);
        CHECK_EQ(read(p[0], &c, 1), 0);
        close(p[0]);

        /* A truncated valid request. */
        {
                Dr__Control__Request r = peer_empty_request(DR__CONTROL__REQUEST__BODY_GET_STATUS);
                uint8_t buf[64];
                size_t len;

                r.id = 77;
                len = dr__control__request__get_packed_size(&r);
                dr__control__request__pack(&r, buf);
                CHECK_EQ(send_raw(fd, buf, len - 1, -1), -EBADMSG);
        }
        CHECK(guest_progresses(vm));
}

static void test_other_uid(Vm *vm)
{
        pid_t pid;
        int status;

        for (int round = 0; round < 2; round++) {
                /* Round 0: the socket's mode 0600 refuses. Round 1: opened up, SO_PEERCRED must refuse. */
                if (round == 1)
                        CHECK(chmod(vm->sock, 0666) == 0);
                pid = fork();
                CHECK(pid >= 0);
                if (pid == 0) {
                        Dr__Control__Reply *rep;
                        int fd;

                        if (setresgid(65534, 65534, 65534) < 0 || setresuid(65534, 65534, 65534) < 0)
                                _exit(2);
                        fd = peer_connect(vm->sock);
                        if (round == 0)
                                _exit(fd == -EACCES ? 0 : 3);
                        if (fd < 0)
                                _exit(4);
                        rep = peer_recv(fd, NULL, 0, NULL);
                        if (!rep || rep->error != -EPERM)
                                _exit(5);
                        /* ... and closed. */
                        _exit(peer_recv(fd, NULL, 0, NULL) == NULL ? 0 : 6);
                }
                CHECK(waitpid(pid, &status, 0) == pid);
                CHECK(WIFEXITED(status));
                CHECK_EQ(WEXITSTATUS(status), 0);
        }
        CHECK(chmod(vm->sock, 0600) == 0);
}

static void test_layout(Vm *vm, int fd, int *ret_fds, size_t *ret_n, Dr__Control__Reply **ret_layout)
{
        Dr__Control__Request r = peer_empty_request(DR__CONTROL__REQUEST__BODY_GET_LAYOUT);
        Dr__Control__Reply *rep = peer_call_fds(fd, &r, ret_fds, 16, ret_n);
        Dr__Control__Layout *l;
        uint8_t *ram;

        CHECK(rep);
        CHECK_EQ(rep->error, 0);
        CHECK(rep->body_case == DR__CONTROL__REPLY__BODY_LAYOUT);
        l = rep->layout;
        CHECK_EQ(*ret_n, 5);
        CHECK_EQ(l->n_regions, 1);
        CHECK_EQ(l->n_vcpus, 1);
        CHECK_EQ(l->page_size, 4096);
        CHECK_EQ(l->regions[0]->size, RAM_SIZE);
        CHECK_EQ(l->regions[0]->fd_index, 0);
        CHECK_EQ(l->vcpus[0]->fd_index, 1);
        CHECK_EQ(l->vmm_dirty_fd_index, 3);
        CHECK_EQ(l->state_fd_index, 4);
        if (vm->mode == DR_TRACKING_RING) {
                CHECK(l->mode == DR__CONTROL__TRACKING_MODE__TRACKING_MODE_RING);
                CHECK_EQ(l->ring_entries, RING_ENTRIES);
                CHECK(l->has_ring_full_fd_index && l->ring_full_fd_index == 2);
        } else {
                CHECK(l->mode == DR__CONTROL__TRACKING_MODE__TRACKING_MODE_BITMAP);
                CHECK(l->has_bitmap_fd_index && l->bitmap_fd_index == 2);
                CHECK_EQ(l->bitmap_size, 4096); /* 1024 pages = 128 bytes, rounded to a page */
        }
        /* The region memfd maps, and shows the guest's counter. */
        ram = mmap(NULL, RAM_SIZE, PROT_READ, MAP_SHARED, ret_fds[0], 0);
        CHECK(ram != MAP_FAILED);
        CHECK(*(volatile uint32_t *) (ram + COUNTER_GPA) != 0);
        munmap(ram, RAM_SIZE);
        *ret_layout = rep;
}

/* Ring mode: harvest like the daemon does, for ~400 ms, resetting after each batch. */
static void test_ring_harvest(Vm *vm, int fd, int vcpu_fd, int efd)
{
        struct kvm_dirty_gfn *ring;
        uint64_t fetch = vm->fetch, harvested = 0, reset_total = 0, t_end = now_usec() + 400000,
                 ring_full_events = 0;
        uint32_t c0 = counter(vm);
        bool saw_counter = false;

        ring = mmap(NULL, RING_ENTRIES * sizeof(*ring), PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd,
                    (off_t) KVM_DIRTY_LOG_PAGE_OFFSET * 4096);
        CHECK(ring != MAP_FAILED);

        while (now_usec() < t_end) {
                struct pollfd p = {.fd = efd, .events = POLLIN};
                Dr__Control__Request r = peer_empty_request(DR__CONTROL__REQUEST__BODY_RESET_RINGS);
                Dr__Control__Reply *rep;
                uint64_t batch = 0, v;

                if (poll(&p, 1, 5) > 0 && read(efd, &v, sizeof(v)) == sizeof(v))
                        ring_full_events += v;
                for (;;) {
                        struct kvm_dirty_gfn *e = &ring[fetch % RING_ENTRIES];
                        if (__atomic_load_n(&e->flags, __ATOMIC_ACQUIRE) != KVM_DIRTY_GFN_F_DIRTY)
                                break;
                        if (e->slot == 0 && e->offset == COUNTER_GPA / 4096)
                                saw_counter = true;
                        __atomic_store_n(&e->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
                        fetch++;
                        batch++;
                }
                harvested += batch;
                CHECK_EQ(peer_simple(fd, &r, &rep), 0);
                reset_total += rep->reset_rings->count;
                dr__control__reply__free_unpacked(rep, NULL);
        }
        /* Every harvested entry was reset, and the guest kept running through full rings. */
        vm->fetch = fetch;
        CHECK_EQ(reset_total, harvested);
        CHECK(harvested > 10000);
        CHECK(saw_counter);
        CHECK(counter(vm) != c0);
        printf("  ring: harvested %llu entries, %llu ring-full signals\n", (unsigned long long) harvested,
               (unsigned long long) ring_full_events);
        munmap(ring, RING_ENTRIES * sizeof(*ring));
}

static void test_bitmap(Vm *vm, int fd, int bitmap_fd)
{
        Dr__Control__GetDirtyLog g = DR__CONTROL__GET_DIRTY_LOG__INIT;
        Dr__Control__ClearDirtyLog cl = DR__CONTROL__CLEAR_DIRTY_LOG__INIT;
        Dr__Control__Request r = DR__CONTROL__REQUEST__INIT;
        Dr__Control__Reply *rep;
        uint64_t *bm;

        bm = mmap(NULL, 4096, PROT_READ, MAP_SHARED, bitmap_fd, 0);
        CHECK(bm != MAP_FAILED);

        r.body_case = DR__CONTROL__REQUEST__BODY_GET_DIRTY_LOG;
        r.get_dirty_log = &g;
        g.slot = 0;
        g.has_clear = true;
        g.clear = true;
        CHECK_EQ(peer_simple(fd, &r, &rep), 0);
        /* INITIALLY_SET: the first harvest reports every page. */
        CHECK_EQ(rep->get_dirty_log->dirty_pages, RAM_SIZE / 4096);
        dr__control__reply__free_unpacked(rep, NULL);

        usleep(100000);
        CHECK_EQ(peer_simple(fd, &r, &rep), 0);
        CHECK(rep->get_dirty_log->dirty_pages >= 2);
        CHECK(rep->get_dirty_log->dirty_pages < RAM_SIZE / 4096);
        CHECK(bm[0] & (1ULL << (COUNTER_GPA / 4096)));
        CHECK(!(bm[0] & (1ULL << 0))); /* page 0 is never written */
        dr__control__reply__free_unpacked(rep, NULL);

        g.slot = 9;
        CHECK_EQ(peer_simple(fd, &r, NULL), -ENOENT);

        r.body_case = DR__CONTROL__REQUEST__BODY_CLEAR_DIRTY_LOG;
        r.clear_dirty_log = &cl;
        cl.slot = 0;
        cl.first_page = 3;
        cl.num_pages = 64;
        CHECK_EQ(peer_simple(fd, &r, NULL), -EINVAL);
        cl.first_page = 0;
        cl.num_pages = 2000;
        CHECK_EQ(peer_simple(fd, &r, NULL), -EINVAL);
        cl.num_pages = 65;
        CHECK_EQ(peer_simple(fd, &r, NULL), -EINVAL);
        cl.first_page = 960;
        cl.num_pages = 64; /* ends the slot */
        CHECK_EQ(peer_simple(fd, &r, NULL), 0);
        cl.first_page = 0;
        cl.num_pages = 1024;
        CHECK_EQ(peer_simple(fd, &r, NULL), 0);
        munmap(bm, 4096);
}

static void test_vmm_dirty(Vm *vm, int vmm_dirty_fd, uint64_t offset)
{
        uint64_t *m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, vmm_dirty_fd, 0);
        uint64_t seq0, *bits;

        CHECK(m != MAP_FAILED);
        CHECK(memcmp(m, "DRVMDIRT", 8) == 0);
        bits = (uint64_t *) ((uint8_t *) m + offset);
        seq0 = __atomic_load_n(&m[1], __ATOMIC_ACQUIRE);
        dr_agent_note_guest_write(vm->agent, 0x3000, 0x2000);   /* pages 3, 4 */
        dr_agent_note_guest_write(vm->agent, 0x3fff00, 0x1000); /* page 1023 + beyond RAM */
        dr_agent_note_guest_write(vm->agent, 0x10000000, 4096); /* outside RAM: ignored */
        CHECK_EQ(__atomic_load_n(&m[1], __ATOMIC_ACQUIRE), seq0 + 2);
        CHECK_EQ(__atomic_exchange_n(&bits[0], 0, __ATOMIC_ACQ_REL), (1ULL << 3) | (1ULL << 4));
        CHECK_EQ(__atomic_exchange_n(&bits[15], 0, __ATOMIC_ACQ_REL), 1ULL << 63);
        for (int i = 0; i < 16; i++)
                CHECK_EQ(bits[i], 0);
        munmap(m, 4096);
}

static void test_save_state(Vm *vm, int fd, int state_fd)
{
        Dr__Control__Request r = peer_empty_request(DR__CONTROL__REQUEST__BODY_SAVE_STATE);
        _cleanup_(vm_snapshot_freep) VmSnapshot *s = NULL;
        _cleanup_free_ uint8_t *buf = NULL;
        Dr__Control__Reply *rep;
        uint64_t len;

        CHECK_EQ(peer_simple(fd, &r, &rep), 0);
        len = rep->save_state->length;
        dr__control__reply__free_unpacked(rep, NULL);
        CHECK(len > 4096);
        buf = malloc(len);
        CHECK(pread(state_fd, buf, len, 0) == (ssize_t) len);
        CHECK(state_decode(buf, len, &s) >= 0);
        CHECK_EQ(s->n_vcpus, 1);
        CHECK(s->vcpus[0].regs.rip >= CODE_GPA && s->vcpus[0].regs.rip < CODE_GPA + sizeof(guest_code));
        CHECK_EQ(s->vcpus[0].sregs.cr0 & 1, 1);
        CHECK(s->has_irqchip && s->has_pit && s->vcpus[0].has_lapic);
        CHECK(s->vcpus[0].n_msrs > 0);
        printf("  state: %llu bytes, %zu MSRs, XSAVE %zu bytes, rip 0x%llx\n", (unsigned long long) len,
               s->vcpus[0].n_msrs, s->vcpus[0].xsave_len, (unsigned long long) s->vcpus[0].regs.rip);
}

/*
 * A seal in two round trips: Pause{save_state} parks the vCPU and saves its
 * state in the same reply; the client harvests while paused; Resume{reset_rings}
 * re-protects before the vCPU runs and returns what KVM reset, which must be
 * exactly what was harvested. Bitmap mode refuses reset_rings and stays paused.
 */
static void test_fused_seal(Vm *vm, int fd, int vcpu_fd, int state_fd, DrTrackingMode mode)
{
        struct kvm_dirty_gfn *ring = NULL;
        uint64_t harvested_total = 0;

        if (mode == DR_TRACKING_RING) {
                ring = mmap(NULL, RING_ENTRIES * sizeof(*ring), PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd,
                            (off_t) KVM_DIRTY_LOG_PAGE_OFFSET * 4096);
                CHECK(ring != MAP_FAILED);
        }
        for (unsigned round = 0; round < 20; round++) {
                Dr__Control__Pause p = DR__CONTROL__PAUSE__INIT;
                Dr__Control__Resume m = DR__CONTROL__RESUME__INIT;
                Dr__Control__Request r = DR__CONTROL__REQUEST__INIT;
                Dr__Control__Reply *rep = NULL;
                _cleanup_(vm_snapshot_freep) VmSnapshot *snap = NULL;
                _cleanup_free_ uint8_t *buf = NULL;
                uint64_t len, harvested = 0, t_sent, t_back;
                uint32_t c;

                usleep(2000);
                t_sent = now_nsec();
                p.has_save_state = p.save_state = true;
                r.body_case = DR__CONTROL__REQUEST__BODY_PAUSE;
                r.pause = &p;
                CHECK_EQ(peer_simple(fd, &r, &rep), 0);
                CHECK(rep->body_case == DR__CONTROL__REPLY__BODY_PAUSE && rep->pause->has_state_length);
                len = rep->pause->state_length;
                dr__control__reply__free_unpacked(rep, NULL);
                CHECK(len > 4096);
                buf = malloc(len);
                CHECK(pread(state_fd, buf, len, 0) == (ssize_t) len);
                CHECK(state_decode(buf, len, &snap) >= 0);
                CHECK(snap->vcpus[0].regs.rip >= CODE_GPA &&
                      snap->vcpus[0].regs.rip < CODE_GPA + sizeof(guest_code));
                c = counter(vm);

                if (ring)
                        for (;;) {
                                struct kvm_dirty_gfn *e = &ring[vm->fetch % RING_ENTRIES];
                                if (__atomic_load_n(&e->flags, __ATOMIC_ACQUIRE) != KVM_DIRTY_GFN_F_DIRTY)
                                        break;
                                __atomic_store_n(&e->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
                                vm->fetch++;
                                harvested++;
                        }
                usleep(1000);
                CHECK_EQ(counter(vm), c); /* still parked while we harvested */

                r = (Dr__Control__Request) DR__CONTROL__REQUEST__INIT;
                m.has_reset_rings = m.reset_rings = true;
                r.body_case = DR__CONTROL__REQUEST__BODY_RESUME;
                r.resume = &m;
                if (!ring) {
                        CHECK_EQ(peer_simple(fd, &r, NULL), -EOPNOTSUPP);
                        usleep(1000);
                        CHECK_EQ(counter(vm), c); /* refused: still paused */
                        CHECK_EQ(peer_resume(fd, false, 0), 0);
                        continue;
                }
                CHECK_EQ(peer_simple(fd, &r, &rep), 0);
                t_back = now_nsec();
                CHECK(rep->body_case == DR__CONTROL__REPLY__BODY_RESUME && rep->resume->has_reset_count);
                CHECK_EQ(rep->resume->reset_count, harvested);
                /* The agent's stopped time covers our 1 ms sleep while parked and
                 * fits inside our PAUSE-sent to RESUME-answered interval. */
                CHECK(rep->resume->has_paused_ns);
                CHECK(rep->resume->paused_ns >= 1000000u && rep->resume->paused_ns <= t_back - t_sent);
                dr__control__reply__free_unpacked(rep, NULL);
                harvested_total += harvested;
        }
        if (ring) {
                CHECK(harvested_total > 0);
                printf("  fused seal: 20 rounds, %llu entries reset by Resume\n",
                       (unsigned long long) harvested_total);
                munmap(ring, RING_ENTRIES * sizeof(*ring));
        }
}

/*
 * Ring mode, last: let the ring fill up with nobody harvesting. A ring of
 * CPL0 (emulated) stores may jam; then a correct harvester finds nothing
 * it can reset and the agent must declare the vCPU wedged instead of
 * spinning. If it does not jam, the harvester simply catches up.
 * Returns the vCPU thread's expected final result.
 */
/* The DIRTY entry whose predecessor is not DIRTY; 0 if all are DIRTY; UINT64_MAX if none. */
static uint64_t ring_run_start(const struct kvm_dirty_gfn *ring)
{
        for (uint64_t i = 0; i < RING_ENTRIES; i++)
                if (ring[i].flags == KVM_DIRTY_GFN_F_DIRTY &&
                    ring[(i + RING_ENTRIES - 1) % RING_ENTRIES].flags != KVM_DIRTY_GFN_F_DIRTY)
                        return i;
        return ring[0].flags == KVM_DIRTY_GFN_F_DIRTY ? 0 : UINT64_MAX;
}

static int test_ring_fill(Vm *vm, int fd, int vcpu_fd)
{
        struct kvm_dirty_gfn *ring;
        Dr__Control__Request r = peer_empty_request(DR__CONTROL__REQUEST__BODY_START_TRACKING);
        Dr__Control__StatusReply *st;
        Dr__Control__Reply *st_rep;
        int state = 0, resets = 0;
        uint64_t fetch = UINT64_MAX;

        ring = mmap(NULL, RING_ENTRIES * sizeof(*ring), PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd,
                    (off_t) KVM_DIRTY_LOG_PAGE_OFFSET * 4096);
        CHECK(ring != MAP_FAILED);
        CHECK_EQ(peer_simple(fd, &r, NULL), 0);
        for (int i = 0; i < 500 && state != DR__CONTROL__VCPU_RUN_STATE__VCPU_RUN_STATE_RING_FULL; i++) {
                usleep(10000);
                st = status_get(fd, &st_rep);
                state = st->vcpus[0]->state;
                dr__control__reply__free_unpacked(st_rep, NULL);
        }
        CHECK_EQ(state, DR__CONTROL__VCPU_RUN_STATE__VCPU_RUN_STATE_RING_FULL);
        usleep(50000);

        /* Our index is unknown after the agent drained the ring at StopTracking, and
         * stays unknown after a lap over a ring that was DIRTY all the way round:
         * find the run's start before every harvest (the same rule as
         * daemon/track-ring.c). */
        fetch = ring_run_start(ring);
        CHECK(fetch != UINT64_MAX);

        for (resets = 0; resets < 200; resets++) {
                Dr__Control__Request rr = peer_empty_request(DR__CONTROL__REQUEST__BODY_RESET_RINGS);
                Dr__Control__Reply *rr_rep;
                uint64_t start = ring_run_start(ring), marked = 0, reset;

                if (start != UINT64_MAX)
                        fetch = start;
                for (uint64_t lap = 0; lap < RING_ENTRIES; lap++) {
                        struct kvm_dirty_gfn *e = &ring[fetch % RING_ENTRIES];
                        if (__atomic_load_n(&e->flags, __ATOMIC_ACQUIRE) != KVM_DIRTY_GFN_F_DIRTY)
                                break;
                        __atomic_store_n(&e->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
                        fetch++;
                        marked++;
                }
                CHECK_EQ(peer_simple(fd, &rr, &rr_rep), 0);
                reset = rr_rep->reset_rings->count;
                dr__control__reply__free_unpacked(rr_rep, NULL);
                if (reset != marked) {
                        /* The other face of the jam: emulated stores overwrote entries not yet
                         * reset, so KVM resets fewer than we harvested (daemon/track-ring.c
                         * reports this as -EUCLEAN). The ring cannot be trusted any more. */
                        munmap(ring, RING_ENTRIES * sizeof(*ring));
                        printf("  ring overflowed: KVM reset %" PRIu64 " of %" PRIu64 " harvested entries\n",
                               reset, marked);
                        return -ESHUTDOWN;
                }
                usleep(2000);
                st = status_get(fd, &st_rep);
                state = st->vcpus[0]->state;
                dr__control__reply__free_unpacked(st_rep, NULL);
                if (state == DR__CONTROL__VCPU_RUN_STATE__VCPU_RUN_STATE_WEDGED)
                        break;
        }
        munmap(ring, RING_ENTRIES * sizeof(*ring));
        if (state == DR__CONTROL__VCPU_RUN_STATE__VCPU_RUN_STATE_WEDGED) {
                printf("  ring filled and jammed: vCPU declared wedged after %d resets\n", resets + 1);
                CHECK_EQ(atomic_load(&vm->wedged_calls), 1);
                CHECK(resets + 1 >= 60);
                return -EDEADLK;
        }
        printf("  ring filled without jamming; harvest caught up\n");
        CHECK_EQ(atomic_load(&vm->wedged_calls), 0);
        CHECK(guest_progresses(vm));
        return -ESHUTDOWN;
}

static int cmp_u64(const void *a, const void *b)
{
        uint64_t x = *(const uint64_t *) a, y = *(const uint64_t *) b;
        return x < y ? -1 : x > y;
}

static void measure_round_trips(int fd, uint64_t epoch0)
{
        enum { N = 300 };
        static uint64_t rt[N], pause_ns[N];

        for (int i = 0; i < N; i++) {
                uint64_t t0 = now_nsec();
                CHECK_EQ(peer_pause(fd, &pause_ns[i]), 0);
                CHECK_EQ(peer_resume(fd, true, epoch0 + i), 0);
                rt[i] = now_nsec() - t0;
                usleep(2000);
        }
        qsort(rt, N, sizeof(uint64_t), cmp_u64);
        qsort(pause_ns, N, sizeof(uint64_t), cmp_u64);
        printf("  PAUSE->RESUME round trip (client side, %d runs): min %llu us, median %llu us, p99 %llu "
               "us, "
               "max %llu us; agent pause_ns median %llu us, p99 %llu us\n",
               N, (unsigned long long) rt[0] / 1000, (unsigned long long) rt[N / 2] / 1000,
               (unsigned long long) rt[N * 99 / 100] / 1000, (unsigned long long) rt[N - 1] / 1000,
               (unsigned long long) pause_ns[N / 2] / 1000,
               (unsigned long long) pause_ns[N * 99 / 100] / 1000);
}

static void run(DrTrackingMode mode)
{
        Vm vm;
        int fd, fd2, fds[16];
        size_t n_fds = 0;
        Dr__Control__Reply *layout, *st_rep;
        Dr__Control__StatusReply *st;
        Dr__Control__ReleaseOutput ro = DR__CONTROL__RELEASE_OUTPUT__INIT;
        Dr__Control__Request r;
        uint64_t released0, pause_ns;
        int expect = -ESHUTDOWN;
        uint32_t c;

        printf("mode %s\n", mode == DR_TRACKING_RING ? "ring" : "bitmap");
        vm_start(&vm, mode);
        CHECK_EQ(dr_agent_attached(vm.agent), false);

        fd = peer_connect(vm.sock);
        CHECK(fd >= 0);
        /* Hello first. */
        r = peer_empty_request(DR__CONTROL__REQUEST__BODY_GET_STATUS);
        CHECK_EQ(peer_simple(fd, &r, NULL), -EPROTO);
        test_bad_input(&vm, fd);
        CHECK_EQ(peer_hello(fd), 0);
        CHECK(dr_agent_attached(vm.agent));

        /* One client at a time. */
        fd2 = peer_connect(vm.sock);
        CHECK(fd2 >= 0);
        {
                Dr__Control__Reply *rep = peer_recv(fd2, NULL, 0, NULL);
                CHECK(rep && rep->error == -EBUSY);
                dr__control__reply__free_unpacked(rep, NULL);
                CHECK(peer_recv(fd2, NULL, 0, NULL) == NULL);
                close(fd2);
        }
        test_other_uid(&vm);
        test_bad_input(&vm, fd); /* the session survived all that */

        test_layout(&vm, fd, fds, &n_fds, &layout);

        /* Not paused: SaveState refuses. */
        r = peer_empty_request(DR__CONTROL__REQUEST__BODY_SAVE_STATE);
        CHECK_EQ(peer_simple(fd, &r, NULL), -EBUSY);

        r = peer_empty_request(DR__CONTROL__REQUEST__BODY_START_TRACKING);
        CHECK_EQ(peer_simple(fd, &r, NULL), 0);
        if (mode == DR_TRACKING_RING)
                test_ring_harvest(&vm, fd, fds[1], fds[2]);
        else
                test_bitmap(&vm, fd, fds[2]);
        test_vmm_dirty(&vm, fds[3], layout->layout->regions[0]->vmm_dirty_offset);

        test_fused_seal(&vm, fd, fds[1], fds[4], mode);

        /* Pause: the guest stops, twice is fine, state can be saved. */
        CHECK_EQ(peer_pause(fd, &pause_ns), 0);
        CHECK_EQ(peer_pause(fd, NULL), 0);
        if (mode == DR_TRACKING_RING) {
                /* Reset whatever is pending so the paused vCPU is not waiting on a full ring later. */
                r = peer_empty_request(DR__CONTROL__REQUEST__BODY_RESET_RINGS);
                CHECK_EQ(peer_simple(fd, &r, NULL), 0);
        }
        c = counter(&vm);
        usleep(50000);
        CHECK_EQ(counter(&vm), c);
        st = status_get(fd, &st_rep);
        CHECK(st->paused && st->tracking);
        CHECK(st->vcpus[0]->state == DR__CONTROL__VCPU_RUN_STATE__VCPU_RUN_STATE_PARKED ||
              st->vcpus[0]->state == DR__CONTROL__VCPU_RUN_STATE__VCPU_RUN_STATE_RING_FULL);
        dr__control__reply__free_unpacked(st_rep, NULL);
        test_save_state(&vm, fd, fds[4]);

        /* Resume under epoch 1: output is now held until ReleaseOutput(1). */
        released0 = atomic_load(&vm.released_bytes);
        CHECK_EQ(peer_resume(fd, true, 1), 0);
        if (mode == DR_TRACKING_RING) {
                /* Keep the ring drained while the guest runs (it fills one in ~20 ms). */
                test_ring_harvest(&vm, fd, fds[1], fds[2]);
        } else
                usleep(300000);
        CHECK_EQ(atomic_load(&vm.released_bytes), released0);
        st = status_get(fd, &st_rep);
        CHECK(!st->paused);
        CHECK(st->held_output_bytes > 0);
        CHECK(st->has_epoch && st->epoch == 1);
        dr__control__reply__free_unpacked(st_rep, NULL);
        r = (Dr__Control__Request) DR__CONTROL__REQUEST__INIT;
        r.body_case = DR__CONTROL__REQUEST__BODY_RELEASE_OUTPUT;
        r.release_output = &ro;
        ro.epoch = 0;
        {
                Dr__Control__Reply *rep;
                CHECK_EQ(peer_simple(fd, &r, &rep), 0);
                CHECK_EQ(rep->release_output->bytes, 0);
                dr__control__reply__free_unpacked(rep, NULL);
                ro.epoch = 1;
                CHECK_EQ(peer_simple(fd, &r, &rep), 0);
                CHECK(rep->release_output->bytes > 0);
                CHECK(atomic_load(&vm.released_bytes) >= released0 + rep->release_output->bytes);
                dr__control__reply__free_unpacked(rep, NULL);
        }

        /* Round trips are measured without tracking (ring-full waits would dominate). */
        r = peer_empty_request(DR__CONTROL__REQUEST__BODY_STOP_TRACKING);
        CHECK_EQ(peer_simple(fd, &r, NULL), 0);
        CHECK(guest_progresses(&vm));
        measure_round_trips(fd, 2);
        CHECK(guest_progresses(&vm));

        /* A peer that pauses and vanishes while output is held (a crashed dirtyrepd) leaves the
         * VM running and tracking off, but its output held: the standby may be failing over
         * from an older epoch. The next client's release (or STOP_TRACKING) lets it out. */
        r = peer_empty_request(DR__CONTROL__REQUEST__BODY_START_TRACKING);
        CHECK_EQ(peer_simple(fd, &r, NULL), 0);
        CHECK_EQ(peer_resume(fd, true, 5000), 0);
        {
                Dr__Control__Pause p = DR__CONTROL__PAUSE__INIT;
                r = (Dr__Control__Request) DR__CONTROL__REQUEST__INIT;
                r.id = 1;
                r.body_case = DR__CONTROL__REQUEST__BODY_PAUSE;
                r.pause = &p;
                CHECK(peer_send(fd, &r) == 0);
                close(fd);
        }
        usleep(100000);
        CHECK(guest_progresses(&vm));
        released0 = atomic_load(&vm.released_bytes);
        CHECK(guest_progresses(&vm));
        usleep(100000);
        CHECK_EQ(atomic_load(&vm.released_bytes), released0); /* still held */
        CHECK_EQ(dr_agent_attached(vm.agent), false);

        /* The next client is welcome and finds the VM running, untracked, output held; a
         * release of its first epoch lets the orphaned output out. */
        fd = peer_connect(vm.sock);
        CHECK(fd >= 0);
        CHECK_EQ(peer_hello(fd), 0);
        st = status_get(fd, &st_rep);
        CHECK(!st->paused && !st->tracking);
        CHECK(st->held_output_bytes > 0);
        CHECK(st->vcpus[0]->state == DR__CONTROL__VCPU_RUN_STATE__VCPU_RUN_STATE_RUNNING);
        dr__control__reply__free_unpacked(st_rep, NULL);
        r = (Dr__Control__Request) DR__CONTROL__REQUEST__INIT;
        r.body_case = DR__CONTROL__REQUEST__BODY_RELEASE_OUTPUT;
        r.release_output = &ro;
        ro.epoch = 1;
        {
                Dr__Control__Reply *rep;
                CHECK_EQ(peer_simple(fd, &r, &rep), 0);
                CHECK(rep->release_output->bytes > 0);
                dr__control__reply__free_unpacked(rep, NULL);
        }
        CHECK(atomic_load(&vm.released_bytes) > released0);
        /* STOP_TRACKING gives up protection: nothing stays held, output passes straight through. */
        r = peer_empty_request(DR__CONTROL__REQUEST__BODY_STOP_TRACKING);
        CHECK_EQ(peer_simple(fd, &r, NULL), 0);
        released0 = atomic_load(&vm.released_bytes);
        CHECK(guest_progresses(&vm));
        usleep(100000);
        CHECK(atomic_load(&vm.released_bytes) > released0);
        st = status_get(fd, &st_rep);
        CHECK_EQ(st->held_output_bytes, 0);
        dr__control__reply__free_unpacked(st_rep, NULL);

        /* Wrong protocol version: refused and closed. */
        {
                Dr__Control__Hello h = DR__CONTROL__HELLO__INIT;
                h.version = 99;
                r = (Dr__Control__Request) DR__CONTROL__REQUEST__INIT;
                r.body_case = DR__CONTROL__REQUEST__BODY_HELLO;
                r.hello = &h;
                CHECK_EQ(peer_simple(fd, &r, NULL), -EPROTONOSUPPORT);
                CHECK(peer_recv(fd, NULL, 0, NULL) == NULL);
                close(fd);
        }

        fd = peer_connect(vm.sock);
        CHECK(fd >= 0);
        CHECK_EQ(peer_hello(fd), 0);
        if (mode == DR_TRACKING_RING)
                expect = test_ring_fill(&vm, fd, fds[1]);
        /* Stop while a client holds the VM paused: the vCPU thread ends with -ESHUTDOWN. */
        CHECK_EQ(peer_pause(fd, NULL), 0);
        vm_stop(&vm, expect);
        close(fd);
        dr__control__reply__free_unpacked(layout, NULL);
        fdpass_close_all(fds, n_fds);
}

int main(void)
{
        signal(SIGPIPE, SIG_IGN);
        run(DR_TRACKING_RING);
        run(DR_TRACKING_BITMAP);
        printf("ok\n");
        return 0;
}

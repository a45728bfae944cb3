/* SPDX-License-Identifier: GPL-2.0-or-later */
/* libdirtyrep-agent without KVM: VM state encoding and the output-commit queue. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "agent-internal.h"
#include "dr-agent.h"
#include "log.h"
#include "output.h"
#include "state.h"
#include "util.h"
#include "tests.h"
#include "util.h"

static void fill_snapshot(VmSnapshot *s)
{
        for (unsigned i = 0; i < s->n_vcpus; i++) {
                VcpuSnapshot *v = &s->vcpus[i];

                v->n_cpuid = 3;
                v->cpuid = calloc(3, sizeof(*v->cpuid));
                ASSERT_TRUE(v->cpuid);
                for (unsigned k = 0; k < 3; k++)
                        v->cpuid[k] = (struct kvm_cpuid_entry2){.function = k,
                                                                .index = i,
                                                                .flags = 1,
                                                                .eax = 0x1000 + k,
                                                                .ebx = 2,
                                                                .ecx = 3,
                                                                .edx = 0xffffffffu};
                v->mp_state.mp_state = KVM_MP_STATE_HALTED;
                v->regs.rax = 0x1122334455667788ULL + i;
                v->regs.r15 = 15;
                v->regs.rip = 0xffffffff81000000ULL;
                v->regs.rflags = 0x202;
                v->sregs.cs = (struct kvm_segment){.base = 0,
                                                   .limit = 0xffffffff,
                                                   .selector = 0x10,
                                                   .type = 11,
                                                   .present = 1,
                                                   .dpl = 0,
                                                   .l = 1,
                                                   .g = 1,
                                                   .s = 1};
                v->sregs.ss = (struct kvm_segment){.selector = 0x23, .dpl = 3, .type = 3, .present = 1};
                v->sregs.tr = (struct kvm_segment){.base = 0x5000, .limit = 0x67, .type = 11, .present = 1};
                v->sregs.ldt.unusable = 1;
                v->sregs.gdt = (struct kvm_dtable){.base = 0x1000, .limit = 0x3f};
                v->sregs.idt = (struct kvm_dtable){.base = 0x2000, .limit = 0xfff};
                v->sregs.cr0 = 0x80050033;
                v->sregs.cr3 = 0x9000;
                v->sregs.cr4 = 0x6a0;
                v->sregs.efer = 0xd01;
                v->sregs.apic_base = 0xfee00900;
                v->sregs.interrupt_bitmap[3] = 1ULL << 63;
                v->xsave_len = 4096 + 64 * i;
                v->xsave = malloc(v->xsave_len);
                ASSERT_TRUE(v->xsave);
                for (size_t k = 0; k < v->xsave_len; k++)
                        v->xsave[k] = (uint8_t) (k * 7 + i);
                v->xcrs.nr_xcrs = 1;
                v->xcrs.xcrs[0].value = 7;
                v->debugregs.db[2] = 0xdead;
                v->debugregs.dr6 = 0xffff0ff0;
                v->debugregs.dr7 = 0x400;
                v->has_lapic = 1;
                for (size_t k = 0; k < sizeof(v->lapic.regs); k++)
                        v->lapic.regs[k] = (char) (k ^ i);
                v->n_msrs = 2;
                v->msrs = calloc(2, sizeof(*v->msrs));
                ASSERT_TRUE(v->msrs);
                v->msrs[0] = (struct kvm_msr_entry){.index = 0x10, .data = 123456789};
                v->msrs[1] = (struct kvm_msr_entry){.index = 0xc0000080, .data = 0xd01};
                v->events.exception.injected = 1;
                v->events.exception.nr = 14;
                v->events.exception.has_error_code = 1;
                v->events.exception.error_code = 6;
                v->events.interrupt.nr = 0x30;
                v->events.interrupt.shadow = 1;
                v->events.nmi.masked = 1;
                v->events.flags = KVM_VCPUEVENT_VALID_SHADOW | KVM_VCPUEVENT_VALID_SMM;
                v->events.smi.latched_init = 1;
                v->tsc_khz = 2500000;
        }
        s->has_pit = 1;
        for (unsigned k = 0; k < 3; k++)
                s->pit.channels[k] = (struct kvm_pit_channel_state){
                        .count = 65536 - k, .mode = 2, .rw_mode = 3, .gate = 1, .count_load_time = -5};
        s->pit.flags = KVM_PIT_FLAGS_HPET_LEGACY;
        s->has_clock = 1;
        s->clock.clock = 987654321;
        s->has_irqchip = 1;
        s->pic[0] = (struct kvm_pic_state){.irq_base = 0x20, .imr = 0xfb, .elcr_mask = 0xf8, .init4 = 1};
        s->pic[1] = (struct kvm_pic_state){.irq_base = 0x28, .imr = 0xff, .elcr_mask = 0xde};
        s->ioapic.base_address = 0xfec00000;
        s->ioapic.id = 2;
        for (unsigned k = 0; k < KVM_IOAPIC_NUM_PINS; k++)
                s->ioapic.redirtbl[k].bits = 0x10000ULL | (0x30 + k);
        s->devices_len = 100;
        s->devices = malloc(100);
        ASSERT_TRUE(s->devices);
        memset(s->devices, 0xab, 100);
}

static void assert_same(const VmSnapshot *a, const VmSnapshot *b)
{
        ASSERT_EQ(a->n_vcpus, b->n_vcpus);
        for (unsigned i = 0; i < a->n_vcpus; i++) {
                const VcpuSnapshot *x = &a->vcpus[i], *y = &b->vcpus[i];

                ASSERT_EQ(x->n_cpuid, y->n_cpuid);
                ASSERT_TRUE(memcmp(x->cpuid, y->cpuid, x->n_cpuid * sizeof(*x->cpuid)) == 0);
                ASSERT_EQ(x->mp_state.mp_state, y->mp_state.mp_state);
                ASSERT_TRUE(memcmp(&x->regs, &y->regs, sizeof(x->regs)) == 0);
                ASSERT_TRUE(memcmp(&x->sregs, &y->sregs, sizeof(x->sregs)) == 0);
                ASSERT_EQ(x->xsave_len, y->xsave_len);
                ASSERT_TRUE(memcmp(x->xsave, y->xsave, x->xsave_len) == 0);
                ASSERT_TRUE(memcmp(&x->xcrs, &y->xcrs, sizeof(x->xcrs)) == 0);
                ASSERT_TRUE(memcmp(&x->debugregs, &y->debugregs, sizeof(x->debugregs)) == 0);
                ASSERT_EQ(x->has_lapic, y->has_lapic);
                ASSERT_TRUE(memcmp(&x->lapic, &y->lapic, sizeof(x->lapic)) == 0);
                ASSERT_EQ(x->n_msrs, y->n_msrs);
                ASSERT_TRUE(memcmp(x->msrs, y->msrs, x->n_msrs * sizeof(*x->msrs)) == 0);
                ASSERT_TRUE(memcmp(&x->events, &y->events, sizeof(x->events)) == 0);
                ASSERT_EQ(x->tsc_khz, y->tsc_khz);
        }
        ASSERT_EQ(a->has_pit, b->has_pit);
        ASSERT_TRUE(memcmp(&a->pit, &b->pit, sizeof(a->pit)) == 0);
        ASSERT_EQ(a->clock.clock, b->clock.clock);
        ASSERT_TRUE(memcmp(a->pic, b->pic, sizeof(a->pic)) == 0);
        ASSERT_TRUE(memcmp(&a->ioapic, &b->ioapic, sizeof(a->ioapic)) == 0);
        ASSERT_EQ(a->devices_len, b->devices_len);
        ASSERT_TRUE(memcmp(a->devices, b->devices, a->devices_len) == 0);
}

TEST(state_round_trip)
{
        _cleanup_(vm_snapshot_freep) VmSnapshot *s = NULL, *d = NULL;
        _cleanup_free_ uint8_t *buf = NULL;
        size_t len;

        ASSERT_OK(vm_snapshot_new(3, &s));
        fill_snapshot(s);
        ASSERT_OK(state_encode(s, &buf, &len));
        ASSERT_TRUE(len > 3 * 4096);
        ASSERT_OK(state_decode(buf, len, &d));
        assert_same(s, d);
}

TEST(state_rejects_bad_input)
{
        _cleanup_(vm_snapshot_freep) VmSnapshot *s = NULL;
        _cleanup_free_ uint8_t *buf = NULL;
        size_t len;
        VmSnapshot *d = NULL;
        uint8_t garbage[4096];
        uint64_t x = 88172645463325252ULL;

        log_set_max_level(LOG_CRIT); /* thousands of expected "Invalid VM state" lines */
        ASSERT_OK(vm_snapshot_new(2, &s));
        fill_snapshot(s);
        ASSERT_OK(state_encode(s, &buf, &len));

        /* Every truncation is refused, never crashes. */
        for (size_t cut = 0; cut < len; cut += (cut < 512 ? 1 : 97)) {
                ASSERT_EQ(state_decode(buf, cut, &d), -EBADMSG);
                ASSERT_TRUE(d == NULL);
        }
        /* Random bytes. */
        for (int round = 0; round < 200; round++) {
                for (size_t k = 0; k < sizeof(garbage); k++) {
                        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
                        garbage[k] = (uint8_t) x;
                }
                ASSERT_EQ(state_decode(garbage, 1 + (x % sizeof(garbage)), &d), -EBADMSG);
        }
        /* Bit flips in a valid buffer: either refused or decoded, never a crash. */
        for (size_t k = 0; k < len; k += 13) {
                VmSnapshot *t = NULL;
                buf[k] ^= 0x5a;
                if (state_decode(buf, len, &t) >= 0)
                        vm_snapshot_free(t);
                buf[k] ^= 0x5a;
        }
        /* Semantically wrong but well-formed: a bad LAPIC length, a segment selector over 16 bits. */
        {
                _cleanup_(vm_snapshot_freep) VmSnapshot *t = NULL;
                _cleanup_free_ uint8_t *b2 = NULL;
                size_t l2;

                ASSERT_OK(vm_snapshot_new(1, &t));
                fill_snapshot(t);
                t->vcpus[0].xsave_len = 100; /* shorter than the legacy area */
                ASSERT_OK(state_encode(t, &b2, &l2));
                ASSERT_EQ(state_decode(b2, l2, &d), -EBADMSG);
        }
        ASSERT_EQ(dr_state_restore(0, 0, (const int[]){0}, 1, garbage, 10, NULL, NULL), -EBADMSG);
}

typedef struct Sink {
        char buf[4][4096];
        size_t len[4];
        unsigned calls;
} Sink;

static void sink_release(void *userdata, unsigned channel, const void *buf, size_t len)
{
        Sink *s = userdata;

        ASSERT_TRUE(channel < 4);
        ASSERT_TRUE(s->len[channel] + len <= sizeof(s->buf[channel]));
        memcpy(s->buf[channel] + s->len[channel], buf, len);
        s->len[channel] += len;
        s->calls++;
}

#define SUBMIT(q, ch, str) output_queue_submit((q), (ch), (str), strlen(str))

TEST(output_queue_orphan_stays_held)
{
        /* A client that vanished while holding: its output, and new output, stays held and
         * goes out at the next client's first release, whatever its epoch numbers. */
        _cleanup_(output_queue_freep) OutputQueue *q = NULL;
        Sink s = {};

        ASSERT_OK(output_queue_new(2, 64, sink_release, &s, &q));
        output_queue_hold(q, 500);
        ASSERT_OK(SUBMIT(q, 0, "ab"));
        ASSERT_EQ(output_queue_orphan(q), 2);
        ASSERT_TRUE(output_queue_holding(q));
        ASSERT_OK(SUBMIT(q, 0, "c"));
        ASSERT_EQ(s.len[0], 0);
        ASSERT_EQ(output_queue_held_bytes(q), 3);
        /* The next client starts its own numbering at 1. */
        output_queue_hold(q, 1);
        ASSERT_OK(SUBMIT(q, 0, "d"));
        ASSERT_EQ(output_queue_release(q, 0), 3);
        ASSERT_EQ(s.len[0], 3);
        ASSERT_TRUE(memcmp(s.buf[0], "abc", 3) == 0);
        ASSERT_EQ(output_queue_release(q, 1), 1);
        ASSERT_EQ(s.len[0], 4);
}

TEST(output_queue_holds_until_release)
{
        _cleanup_(output_queue_freep) OutputQueue *q = NULL;
        Sink s = {};

        ASSERT_OK(output_queue_new(4, 16, sink_release, &s, &q));

        /* Not holding: straight through. */
        ASSERT_OK(SUBMIT(q, 0, "a"));
        ASSERT_EQ(s.len[0], 1);
        ASSERT_EQ(output_queue_submit(q, 4, "x", 1), -EINVAL);

        output_queue_hold(q, 5);
        ASSERT_OK(SUBMIT(q, 0, "bc"));
        ASSERT_OK(SUBMIT(q, 1, "X"));
        output_queue_hold(q, 6);
        ASSERT_OK(SUBMIT(q, 0, "d"));
        output_queue_hold(q, 7);
        ASSERT_OK(SUBMIT(q, 0, "ef"));
        ASSERT_EQ(s.len[0], 1);
        ASSERT_EQ(output_queue_held_bytes(q), 6);

        /* Earlier epoch than anything held: nothing. */
        ASSERT_EQ(output_queue_release(q, 4), 0);
        /* Epochs <= 6, in order, per channel. */
        ASSERT_EQ(output_queue_release(q, 6), 4);
        ASSERT_EQ(s.len[0], 4);
        ASSERT_TRUE(memcmp(s.buf[0], "abcd", 4) == 0);
        ASSERT_EQ(s.len[1], 1);
        ASSERT_EQ(output_queue_held_bytes(q), 2);

        /* Limit: 16 bytes per channel, nothing queued on -ENOBUFS. */
        ASSERT_EQ(output_queue_space(q, 0), 14);
        ASSERT_EQ(SUBMIT(q, 0, "0123456789abcdef"), -ENOBUFS);
        ASSERT_OK(SUBMIT(q, 0, "0123456789abcd"));
        ASSERT_EQ(output_queue_space(q, 0), 0);
        ASSERT_EQ(SUBMIT(q, 0, "!"), -ENOBUFS);
        ASSERT_EQ(output_queue_space(q, 2), 16); /* other channels unaffected */
        ASSERT_OK(SUBMIT(q, 2, "zz"));

        /* Unhold releases everything, in order, and passes through afterwards. */
        ASSERT_EQ(output_queue_unhold(q), 18);
        ASSERT_EQ(s.len[0], 4 + 16);
        ASSERT_TRUE(memcmp(s.buf[0], "abcdef0123456789abcd", 20) == 0);
        ASSERT_TRUE(memcmp(s.buf[2], "zz", 2) == 0);
        ASSERT_EQ(output_queue_held_bytes(q), 0);
        ASSERT_OK(SUBMIT(q, 0, "g"));
        ASSERT_EQ(s.len[0], 21);
}

TEST(output_queue_many_small_chunks)
{
        _cleanup_(output_queue_freep) OutputQueue *q = NULL;
        Sink s = {};
        size_t total = 0;

        ASSERT_OK(output_queue_new(4, 4000, sink_release, &s, &q));
        for (uint64_t e = 1; e <= 300; e++) {
                output_queue_hold(q, e);
                for (int k = 0; k < 10; k++) {
                        char c = (char) ('A' + (e + k) % 26);
                        ASSERT_OK(output_queue_submit(q, 3, &c, 1));
                }
        }
        /* Release in uneven steps; the stream comes out exactly as submitted. */
        for (uint64_t e = 7; e <= 307; e += 7)
                total += output_queue_release(q, e);
        ASSERT_EQ(total, 3000);
        ASSERT_EQ(s.len[3], 3000);
        for (uint64_t e = 1; e <= 300; e++)
                for (int k = 0; k < 10; k++)
                        ASSERT_EQ(s.buf[3][(e - 1) * 10 + k], (char) ('A' + (e + k) % 26));
}

static bool wait_attached(DrAgent *a, bool want)
{
        for (int i = 0; i < 2000; i++) {
                if (dr_agent_attached(a) == want)
                        return true;
                usleep(5000);
        }
        return false;
}

TEST(set_regions_only_while_detached)
{
        /* No KVM needed: ring mode does no KVM ioctl until a client asks. */
        char path[] = "/tmp/dr-test-agent-XXXXXX";
        _cleanup_close_ int memfd = -EBADF, devnull = -EBADF, client = -EBADF;
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        struct kvm_run *run;
        DrAgent *a = NULL;
        uint8_t *ram;
        DrAgentRegion regions[3];
        DrAgentConfig cfg = {};

        ASSERT_TRUE(mkdtemp(path));
        memfd = memfd_new_sized("test-ram", 4 << 20);
        ASSERT_TRUE(memfd >= 0);
        ram = mmap(NULL, 4 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
        ASSERT_TRUE(ram != MAP_FAILED);
        run = calloc(1, 4096);
        ASSERT_TRUE(run);
        devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
        ASSERT_TRUE(devnull >= 0);

        /* A PC before and after its firmware shadowed the BIOS: slots come and go. */
        regions[0] = (DrAgentRegion){
                .slot = 0, .guest_phys = 0, .size = 0xa0000, .memfd = memfd, .host_addr = ram};
        regions[1] = (DrAgentRegion){.slot = 1,
                                     .guest_phys = 0x100000,
                                     .size = 0x300000,
                                     .memfd = memfd,
                                     .memfd_offset = 0x100000,
                                     .host_addr = ram + 0x100000};
        regions[2] = (DrAgentRegion){.slot = 5,
                                     .guest_phys = 0xf0000,
                                     .size = 0x10000,
                                     .memfd = memfd,
                                     .memfd_offset = 0xf0000,
                                     .host_addr = ram + 0xf0000,
                                     .kvm_flags = KVM_MEM_READONLY};
        ASSERT_TRUE(strlen(path) + 10 < sizeof(sa.sun_path));
        snprintf(sa.sun_path, sizeof(sa.sun_path), "%s/a.sock", path);
        cfg = (DrAgentConfig){.socket_path = sa.sun_path,
                              .kvm_fd = devnull,
                              .vm_fd = devnull,
                              .vm_name = "t",
                              .mode = DR_TRACKING_RING,
                              .ring_entries = 4096,
                              .regions = regions,
                              .n_regions = 2,
                              .n_vcpus = 1};
        ASSERT_OK(dr_agent_new(&cfg, &a));
        ASSERT_OK(dr_agent_add_vcpu(a, 0, devnull, run));

        /* Bad lists are refused and change nothing. */
        ASSERT_EQ(dr_agent_set_regions(a, regions, 0), -EINVAL);
        regions[2].guest_phys = 0x9f000; /* overlaps slot 0 */
        ASSERT_EQ(dr_agent_set_regions(a, regions, 3), -EINVAL);
        regions[2].guest_phys = 0xf0000;
        regions[2].kvm_flags = KVM_MEM_LOG_DIRTY_PAGES; /* the agent's own flag */
        ASSERT_EQ(dr_agent_set_regions(a, regions, 3), -EINVAL);
        regions[2].kvm_flags = KVM_MEM_READONLY;
        ASSERT_OK(dr_agent_set_regions(a, regions, 3));

        /* With a client attached the layout it holds must not change under it. */
        ASSERT_OK(dr_agent_start(a));
        client = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
        ASSERT_TRUE(client >= 0);
        ASSERT_TRUE(connect(client, (struct sockaddr *) &sa, sizeof(sa)) == 0);
        ASSERT_TRUE(wait_attached(a, true));
        ASSERT_EQ(dr_agent_set_regions(a, regions, 2), -EBUSY);
        client = safe_close(client);
        ASSERT_TRUE(wait_attached(a, false));
        ASSERT_OK(dr_agent_set_regions(a, regions, 2));

        a = dr_agent_free(a);
        ASSERT_TRUE(access(sa.sun_path, F_OK) < 0);
        munmap(ram, 4 << 20);
        free(run);
        ASSERT_TRUE(rmdir(path) == 0);
}

/* An agent without KVM: any open fd passes for kvm_fd and vm_fd until an ioctl is made. */
static void agent_without_kvm(Sink *s, char *sock, DrAgent **ret, int *ret_null_fd, int *ret_memfd,
                              void **ret_map)
{
        DrAgentRegion region = {.slot = 0, .size = 16 * 4096};
        DrAgentConfig cfg = {
                .socket_path = sock,
                .vm_name = "t",
                .mode = DR_TRACKING_RING,
                .ring_entries = 256,
                .regions = &region,
                .n_regions = 1,
                .n_vcpus = 1,
                .cb = {.output_release = sink_release},
                .userdata = s,
        };

        *ret_null_fd = open("/dev/null", O_RDWR | O_CLOEXEC);
        ASSERT_TRUE(*ret_null_fd >= 0);
        *ret_memfd = memfd_new_sized("test-ram", region.size);
        ASSERT_TRUE(*ret_memfd >= 0);
        *ret_map = mmap(NULL, region.size, PROT_READ | PROT_WRITE, MAP_SHARED, *ret_memfd, 0);
        ASSERT_TRUE(*ret_map != MAP_FAILED);
        region.memfd = *ret_memfd;
        region.host_addr = *ret_map;
        cfg.kvm_fd = cfg.vm_fd = *ret_null_fd;
        ASSERT_OK(dr_agent_new(&cfg, ret));
}

TEST(agent_free_drops_held_output)
{
        /* The VMM exits while output waits for a standby's acknowledgement (a client that
         * stopped with hold_output or vanished, or a suspended VM): it must not be released
         * on the way out, the standby may fail over from an older epoch. */
        for (int suspended = 0; suspended <= 1; suspended++) {
                char dir[] = "/tmp/test-agent-XXXXXX", sock[64];
                int null_fd, memfd;
                void *map;
                DrAgent *a = NULL;
                Sink s = {};

                ASSERT_TRUE(mkdtemp(dir));
                snprintf(sock, sizeof(sock), "%s/control", dir);
                agent_without_kvm(&s, sock, &a, &null_fd, &memfd, &map);
                /* What Resume{epoch 7} does for a client, then that client goes away holding. */
                output_queue_hold(a->outq, 7);
                a->suspended = suspended;
                ASSERT_OK(dr_agent_output_submit(a, 1, "reply", 5));
                ASSERT_EQ(output_queue_orphan(a->outq), 5);
                ASSERT_OK(dr_agent_output_submit(a, 1, "more", 4));
                ASSERT_EQ(s.len[1], 0);
                a = dr_agent_free(a);
                ASSERT_EQ(s.len[1], 0);
                ASSERT_EQ(s.calls, 0);
                munmap(map, 16 * 4096);
                close(memfd);
                close(null_fd);
                (void) unlink(sock);
                (void) rmdir(dir);
        }
}

int main(void)
{
        return tests_run();
}

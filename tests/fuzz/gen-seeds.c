/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Writes the seed corpora for fuzz-frame and fuzz-control into DIR
 * (tests/fuzz/corpus): one valid example of every message, so the fuzzers
 * start from inputs that reach deep into the decoders. Run by hand when the
 * protocol changes: build/tests/fuzz/gen-seeds tests/fuzz/corpus
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "control.pb-c.h"
#include "frame.h"
#include "pages.h"
#include "replication.pb-c.h"

static const char *outdir;

static void put(const char *target, const char *name, const void *buf, size_t len)
{
        char p[4096];
        FILE *f;

        snprintf(p, sizeof(p), "%s/%s", outdir, target);
        mkdir(p, 0755);
        snprintf(p, sizeof(p), "%s/%s/%s", outdir, target, name);
        f = fopen(p, "we");
        if (!f || fwrite(buf, 1, len, f) != len) {
                perror(p);
                exit(1);
        }
        fclose(f);
}

/* fuzz-standby records: [type u8][length le16][payload]. */
static size_t rec(uint8_t *out, uint8_t type, const void *payload, size_t len)
{
        out[0] = type;
        out[1] = (uint8_t) len;
        out[2] = (uint8_t) (len >> 8);
        memcpy(out + 3, payload, len);
        return 3 + len;
}

static size_t rec_message(uint8_t *out, uint8_t type, const ProtobufCMessage *m)
{
        uint8_t buf[256];
        size_t len = protobuf_c_message_pack(m, buf);
        return rec(out, type, buf, len);
}

/* One whole epoch for fuzz-standby: BEGIN, one PAGES batch of the given pages, STATE, END. */
static size_t standby_epoch(uint8_t *out, uint64_t epoch, uint64_t base, const uint64_t *pages, size_t n)
{
        static uint8_t batch[PAGE_BATCH_HEADER + 4 * PAGE_RECORD_MAX], page[PAGE_BYTES];
        Dr__Repl__EpochBegin b = DR__REPL__EPOCH_BEGIN__INIT;
        Dr__Repl__EpochState st = DR__REPL__EPOCH_STATE__INIT;
        Dr__Repl__EpochEnd e = DR__REPL__EPOCH_END__INIT;
        uint8_t vmstate[16] = {8, 1};
        size_t at = 0, len;
        PageBatch pb;

        for (size_t i = 0; i < PAGE_BYTES; i += 61)
                page[i] = (uint8_t) (i + epoch);
        b.epoch = epoch;
        b.full = base == 0;
        b.has_base_epoch = base != 0;
        b.base_epoch = base;
        at += rec_message(out + at, DR__REPL__FRAME_TYPE__FRAME_EPOCH_BEGIN, &b.base);
        page_batch_init(&pb, epoch, batch, sizeof(batch), 4, true, NULL);
        for (size_t i = 0; i < n; i++)
                if (i % 2)
                        page_batch_add_zero(&pb, pages[i]);
                else
                        page_batch_add(&pb, pages[i], page);
        len = page_batch_finish(&pb);
        at += rec(out + at, DR__REPL__FRAME_TYPE__FRAME_PAGES, batch, len);
        st.epoch = epoch;
        st.vmstate = (ProtobufCBinaryData){sizeof(vmstate), vmstate};
        at += rec_message(out + at, DR__REPL__FRAME_TYPE__FRAME_STATE, &st.base);
        e.epoch = epoch;
        e.page_records = n;
        e.distinct_pages = n;
        at += rec_message(out + at, DR__REPL__FRAME_TYPE__FRAME_EPOCH_END, &e.base);
        return at;
}

/* fuzz-vmm-link: appends one agent reply as [length le16][packed Reply]. */
static size_t vmm_reply(uint8_t *out, Dr__Control__Reply *r)
{
        size_t len = dr__control__reply__pack(r, out + 2);
        out[0] = (uint8_t) len;
        out[1] = (uint8_t) (len >> 8);
        return 2 + len;
}

/* A layout over the harness's fds (0, 1 RAM, 2, 3 vCPU, 4 bitmap, 5 VMM-dirty, 6 state, 7 eventfd). */
static size_t vmm_open_replies(uint8_t *out, bool ring, uint64_t vmm_dirty_offset, uint64_t bitmap_offset,
                               uint64_t shared_size)
{
        Dr__Control__Reply r = DR__CONTROL__REPLY__INIT;
        Dr__Control__HelloReply h = DR__CONTROL__HELLO_REPLY__INIT;
        Dr__Control__Layout lay = DR__CONTROL__LAYOUT__INIT;
        Dr__Control__Region r0 = DR__CONTROL__REGION__INIT, r1 = DR__CONTROL__REGION__INIT;
        Dr__Control__Vcpu v0 = DR__CONTROL__VCPU__INIT, v1 = DR__CONTROL__VCPU__INIT;
        Dr__Control__Region *regions[] = {&r0, &r1};
        Dr__Control__Vcpu *vcpus[] = {&v0, &v1};
        size_t at = 0;

        h.version = DR__CONTROL__CONTROL_VERSION__CONTROL_VERSION_CURRENT;
        h.has_features = true;
        h.features = DR__CONTROL__FEATURE__FEATURE_PAUSE_SAVES_STATE |
                     DR__CONTROL__FEATURE__FEATURE_RESUME_RESETS_RINGS;
        r.id = 1;
        r.body_case = DR__CONTROL__REPLY__BODY_HELLO;
        r.hello = &h;
        at += vmm_reply(out + at, &r);

        r0.slot = 0;
        r0.size = 64 * 4096;
        r0.has_bitmap_offset = r0.has_vmm_dirty_offset = true;
        r0.bitmap_offset = bitmap_offset;
        r0.vmm_dirty_offset = vmm_dirty_offset;
        r1.slot = 1;
        r1.guest_phys = 1 << 20;
        r1.size = 16 * 4096;
        r1.fd_index = 1;
        r1.fd_offset = 64 * 4096;
        r1.has_bitmap_offset = r1.has_vmm_dirty_offset = true;
        r1.bitmap_offset = 8;
        r1.vmm_dirty_offset = 72;
        v0.index = 0;
        v0.fd_index = 2;
        v1.index = 1;
        v1.fd_index = 3;
        lay.n_regions = 2;
        lay.regions = regions;
        lay.n_vcpus = ring ? 2 : 1;
        lay.vcpus = vcpus;
        lay.page_size = 4096;
        lay.vmm_dirty_fd_index = 5;
        lay.vmm_dirty_size = shared_size;
        lay.state_fd_index = 6;
        if (ring) {
                lay.mode = DR__CONTROL__TRACKING_MODE__TRACKING_MODE_RING;
                lay.has_ring_entries = lay.has_ring_full_fd_index = true;
                lay.ring_entries = 64;
                lay.ring_full_fd_index = 7;
        } else {
                lay.mode = DR__CONTROL__TRACKING_MODE__TRACKING_MODE_BITMAP;
                lay.has_bitmap_fd_index = lay.has_bitmap_size = true;
                lay.bitmap_fd_index = 4;
                lay.bitmap_size = shared_size;
        }
        r.id = 2;
        r.body_case = DR__CONTROL__REPLY__BODY_LAYOUT;
        r.layout = &lay;
        at += vmm_reply(out + at, &r);
        return at;
}

static void put_request(const char *name, Dr__Control__Request *r)
{
        uint8_t buf[4096];
        size_t len = dr__control__request__get_packed_size(r);
        buf[0] = 1;
        dr__control__request__pack(r, buf + 1);
        put("fuzz-control", name, buf, len + 1);
}

static void put_reply(const char *name, Dr__Control__Reply *r)
{
        uint8_t buf[4096];
        size_t len = dr__control__reply__get_packed_size(r);
        buf[0] = 0;
        dr__control__reply__pack(r, buf + 1);
        put("fuzz-control", name, buf, len + 1);
}

int main(int argc, char **argv)
{
        if (argc != 2) {
                fprintf(stderr, "usage: gen-seeds DIR\n");
                return 2;
        }
        outdir = argv[1];

        {
                uint8_t buf[FRAME_HEADER_SIZE * 3 + 64];
                const char *p = "epoch payload";
                frame_header_build(buf, 1, p, (uint32_t) strlen(p));
                memcpy(buf + FRAME_HEADER_SIZE, p, strlen(p));
                put("fuzz-frame", "one-frame", buf, FRAME_HEADER_SIZE + strlen(p));
                frame_header_build(buf + FRAME_HEADER_SIZE + strlen(p), 2, NULL, 0);
                put("fuzz-frame", "two-frames", buf, 2 * FRAME_HEADER_SIZE + strlen(p));
        }

        {
                static uint8_t buf[PAGE_BATCH_HEADER + 4 * PAGE_RECORD_MAX], page[PAGE_BYTES];
                PageBatch b;
                size_t len;

                for (size_t i = 0; i < PAGE_BYTES; i += 97)
                        page[i] = (uint8_t) i;
                page_batch_init(&b, 3, buf, sizeof(buf), 8, true, NULL);
                page_batch_add(&b, 5, page);
                page_batch_add_zero(&b, 6);
                len = page_batch_finish(&b);
                put("fuzz-pages", "lz4-and-zero", buf, len);
                page_batch_init(&b, 4, buf, sizeof(buf), 8, false, NULL);
                page_batch_add(&b, 9, page);
                len = page_batch_finish(&b);
                put("fuzz-pages", "raw", buf, len);
        }

        {
                Dr__Control__Request r = DR__CONTROL__REQUEST__INIT;
                Dr__Control__Hello h = DR__CONTROL__HELLO__INIT;
                Dr__Control__Pause pa = DR__CONTROL__PAUSE__INIT;
                Dr__Control__Resume re = DR__CONTROL__RESUME__INIT;
                Dr__Control__GetDirtyLog gd = DR__CONTROL__GET_DIRTY_LOG__INIT;
                Dr__Control__ClearDirtyLog cd = DR__CONTROL__CLEAR_DIRTY_LOG__INIT;
                Dr__Control__ReleaseOutput ro = DR__CONTROL__RELEASE_OUTPUT__INIT;

                r.id = 1;
                h.version = 1;
                h.client = "seed";
                r.body_case = DR__CONTROL__REQUEST__BODY_HELLO;
                r.hello = &h;
                put_request("req-hello", &r);
                pa.has_timeout_ms = 1;
                pa.timeout_ms = 500;
                r.body_case = DR__CONTROL__REQUEST__BODY_PAUSE;
                r.pause = &pa;
                put_request("req-pause", &r);
                re.has_epoch = 1;
                re.epoch = 7;
                r.body_case = DR__CONTROL__REQUEST__BODY_RESUME;
                r.resume = &re;
                put_request("req-resume", &r);
                gd.slot = 1;
                gd.has_clear = 1;
                gd.clear = 1;
                r.body_case = DR__CONTROL__REQUEST__BODY_GET_DIRTY_LOG;
                r.get_dirty_log = &gd;
                put_request("req-get-dirty-log", &r);
                cd.slot = 0;
                cd.first_page = 64;
                cd.num_pages = 128;
                r.body_case = DR__CONTROL__REQUEST__BODY_CLEAR_DIRTY_LOG;
                r.clear_dirty_log = &cd;
                put_request("req-clear-dirty-log", &r);
                ro.epoch = 9;
                r.body_case = DR__CONTROL__REQUEST__BODY_RELEASE_OUTPUT;
                r.release_output = &ro;
                put_request("req-release-output", &r);
        }

        {
                Dr__Control__Reply r = DR__CONTROL__REPLY__INIT;
                Dr__Control__Layout l = DR__CONTROL__LAYOUT__INIT;
                Dr__Control__Region reg = DR__CONTROL__REGION__INIT, *regs[1] = {&reg};
                Dr__Control__Vcpu v = DR__CONTROL__VCPU__INIT, *vs[1] = {&v};
                Dr__Control__StatusReply st = DR__CONTROL__STATUS_REPLY__INIT;
                Dr__Control__VcpuStatus vst = DR__CONTROL__VCPU_STATUS__INIT, *vsts[1] = {&vst};

                r.id = 2;
                reg.slot = 0;
                reg.guest_phys = 0;
                reg.size = 256 << 20;
                reg.fd_index = 0;
                v.index = 0;
                v.fd_index = 1;
                l.n_regions = 1;
                l.regions = regs;
                l.n_vcpus = 1;
                l.vcpus = vs;
                l.mode = DR__CONTROL__TRACKING_MODE__TRACKING_MODE_RING;
                l.page_size = 4096;
                l.has_ring_entries = 1;
                l.ring_entries = 4096;
                l.vmm_dirty_fd_index = 3;
                l.vmm_dirty_size = 8256;
                l.state_fd_index = 4;
                r.body_case = DR__CONTROL__REPLY__BODY_LAYOUT;
                r.layout = &l;
                put_reply("reply-layout", &r);
                vst.index = 0;
                vst.state = DR__CONTROL__VCPU_RUN_STATE__VCPU_RUN_STATE_WEDGED;
                st.n_vcpus = 1;
                st.vcpus = vsts;
                r.body_case = DR__CONTROL__REPLY__BODY_STATUS;
                r.status = &st;
                put_reply("reply-status", &r);
                r.body_case = DR__CONTROL__REPLY__BODY__NOT_SET;
                r.error = -16;
                r.error_message = "busy";
                put_reply("reply-error", &r);
        }
        {
                /* fuzz-link: what a stranger may send a standby. */
                static uint8_t nonce[32], uuid[16], session[16], buf[4096];
                Dr__Repl__Hello h = DR__REPL__HELLO__INIT;
                Dr__Repl__MemRegion mr = DR__REPL__MEM_REGION__INIT, *mrs[] = {&mr};
                Dr__Repl__Auth a = DR__REPL__AUTH__INIT;
                size_t n, m;

                h.version = DR__REPL__REPL_VERSION__REPL_VERSION_CURRENT;
                h.vm_name = "vm0";
                h.vm_uuid = (ProtobufCBinaryData){16, uuid};
                h.session = (ProtobufCBinaryData){16, session};
                h.nonce = (ProtobufCBinaryData){32, nonce};
                h.page_size = 4096;
                mr.size = 1 << 20;
                h.n_regions = 1;
                h.regions = mrs;
                n = dr__repl__hello__pack(&h, buf + FRAME_HEADER_SIZE);
                frame_header_build(buf, 1, buf + FRAME_HEADER_SIZE, (uint32_t) n);
                put("fuzz-link", "hello", buf, FRAME_HEADER_SIZE + n);
                /* Hello followed by an Auth with a made-up proof. */
                a.proof = (ProtobufCBinaryData){32, nonce};
                m = dr__repl__auth__pack(&a, buf + 2 * FRAME_HEADER_SIZE + n);
                frame_header_build(buf + FRAME_HEADER_SIZE + n, 3, buf + 2 * FRAME_HEADER_SIZE + n,
                                   (uint32_t) m);
                put("fuzz-link", "hello-auth", buf, 2 * FRAME_HEADER_SIZE + n + m);
                /* Data before the handshake. */
                frame_header_build(buf, 6, NULL, 0);
                put("fuzz-link", "pages-first", buf, FRAME_HEADER_SIZE);
                put("fuzz-link", "garbage", "GET / HTTP/1.1\r\n\r\n\x00\xff", 20);
        }
        {
                static uint8_t buf[4 * (PAGE_BATCH_HEADER + 4 * PAGE_RECORD_MAX + 1024)];
                static const uint64_t p1[] = {0, 3, 15}, p2[] = {4, 17, 19}, p3[] = {5};
                Dr__Repl__EpochEnd e = DR__REPL__EPOCH_END__INIT;
                size_t at;

                /* Layout byte, then frames. */
                buf[0] = 0;
                at = 1 + standby_epoch(buf + 1, 1, 0, p1, 3);
                put("fuzz-standby", "full-epoch", buf, at);
                buf[0] = 1; /* two regions: pages 16..19 are the second */
                at = 1 + standby_epoch(buf + 1, 1, 0, p1, 3);
                at += standby_epoch(buf + at, 2, 1, p2, 3);
                at += standby_epoch(buf + at, 3, 2, p3, 1);
                put("fuzz-standby", "full-then-incremental", buf, at);
                buf[0] = 0;
                e.epoch = 1;
                at = 1 + rec_message(buf + 1, DR__REPL__FRAME_TYPE__FRAME_EPOCH_END, &e.base);
                put("fuzz-standby", "end-first", buf, at);
        }
        {
                static uint8_t buf[4096];
                Dr__Control__Reply r = DR__CONTROL__REPLY__INIT;
                Dr__Control__GetDirtyLogReply dl = DR__CONTROL__GET_DIRTY_LOG_REPLY__INIT;
                Dr__Control__PauseReply pr = DR__CONTROL__PAUSE_REPLY__INIT;
                Dr__Control__ResumeReply rr = DR__CONTROL__RESUME_REPLY__INIT;
                Dr__Control__ResetRingsReply rs = DR__CONTROL__RESET_RINGS_REPLY__INIT;
                size_t at;

                /* Bitmap: walk the layout, sync (GET_DIRTY_LOG per slot), VMM-dirty pages,
                 * pause with state, resume. Operation numbers: see fuzz-vmm-link.c. */
                buf[0] = 5;
                memcpy(buf + 1, (const uint8_t[]){12, 0, 11, 6, 2}, 5);
                at = 6 + vmm_open_replies(buf + 6, false, 64, 0, 4096);
                dl.dirty_pages = 3;
                r.body_case = DR__CONTROL__REPLY__BODY_GET_DIRTY_LOG;
                r.get_dirty_log = &dl;
                r.id = 3;
                at += vmm_reply(buf + at, &r);
                r.id = 4;
                at += vmm_reply(buf + at, &r);
                pr.pause_ns = 1000;
                pr.has_state_length = true;
                pr.state_length = 100;
                r.body_case = DR__CONTROL__REPLY__BODY_PAUSE;
                r.pause = &pr;
                r.id = 5;
                at += vmm_reply(buf + at, &r);
                r.body_case = DR__CONTROL__REPLY__BODY__NOT_SET;
                r.id = 6;
                at += vmm_reply(buf + at, &r);
                put("fuzz-vmm-link", "bitmap", buf, at);

                /* Ring: sync (harvest, RESET_RINGS), pause, resume with reset. */
                buf[0] = 3;
                memcpy(buf + 1, (const uint8_t[]){0, 5, 2}, 3);
                at = 4 + vmm_open_replies(buf + 4, true, 64, 0, 4096);
                rs.count = 8;
                r.body_case = DR__CONTROL__REPLY__BODY_RESET_RINGS;
                r.reset_rings = &rs;
                r.id = 3;
                at += vmm_reply(buf + at, &r);
                pr.has_state_length = false;
                r.body_case = DR__CONTROL__REPLY__BODY_PAUSE;
                r.id = 4;
                at += vmm_reply(buf + at, &r);
                rr.has_reset_count = true;
                rr.reset_count = 0;
                r.body_case = DR__CONTROL__REPLY__BODY_RESUME;
                r.resume = &rr;
                r.id = 5;
                at += vmm_reply(buf + at, &r);
                put("fuzz-vmm-link", "ring", buf, at);

                /* Crashers of layout_adopt(): offsets that wrap around 2^64 passed the bounds
                 * checks (the daemon then read and zeroed memory outside the mapping), and
                 * sizes beyond the memfd passed too (SIGBUS on the first access). */
                buf[0] = 2;
                memcpy(buf + 1, (const uint8_t[]){11, 0}, 2);
                at = 3 + vmm_open_replies(buf + 3, false, UINT64_MAX - 7, 0, 4096);
                put("fuzz-vmm-link", "crash-vmm-dirty-offset-wrap", buf, at);
                r.body_case = DR__CONTROL__REPLY__BODY_GET_DIRTY_LOG;
                r.get_dirty_log = &dl;
                at = 3 + vmm_open_replies(buf + 3, false, 64, UINT64_MAX - 7, 4096);
                r.id = 3;
                at += vmm_reply(buf + at, &r);
                put("fuzz-vmm-link", "crash-bitmap-offset-wrap", buf, at);
                at = 3 + vmm_open_replies(buf + 3, false, (1ULL << 30) - 64, (1ULL << 30) - 64, 1ULL << 30);
                r.id = 3;
                at += vmm_reply(buf + at, &r);
                put("fuzz-vmm-link", "crash-shared-size-beyond-memfd", buf, at);

                /* An agent that errors out of the hello. */
                r = (Dr__Control__Reply) DR__CONTROL__REPLY__INIT;
                r.id = 1;
                r.error = -EPERM;
                r.error_message = (char *) "not allowed";
                buf[0] = 0;
                at = 1 + vmm_reply(buf + 1, &r);
                put("fuzz-vmm-link", "hello-error", buf, at);
        }
        return 0;
}

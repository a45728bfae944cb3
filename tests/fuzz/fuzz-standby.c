/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * What a standby does with the frames of an AUTHENTICATED primary (a
 * compromised or buggy one): EPOCH_BEGIN / PAGES / STATE / EPOCH_END in any
 * order and content, staging, commits and ACKs, incremental epochs on the
 * replica a full one made. fuzz-link covers the unauthenticated half.
 *
 * Each input gets a fresh Standby (daemon/standby.c, unchanged code) on a
 * socketpair; the harness plays the primary's handshake by hand (HELLO,
 * CHALLENGE, AUTH with link_proof(), as tests/unit/test-link.c does), then
 * writes the input's frames with valid headers, CRCs and MACs under the
 * session keys (link-mac.h; sequence numbers in order), closes its write
 * side and runs the loop until the standby's link is down.
 *
 * Input: byte 0 picks the RAM layout of the HELLO (bit 0: one region of 16
 * pages, or two regions with a hole in the memfd); then records of
 * [type u8][length le16][payload], the payload cut short at the end of input.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <syslog.h>
#include <unistd.h>

#include "config.h"
#include "frame.h"
#include "link-mac.h"
#include "link.h"
#include "log.h"
#include "pages.h"
#include "replication.pb-c.h"
#include "role.h"
#include "standby-internal.h"
#include "util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define VM_NAME "fuzz"
static const uint8_t secret[] = "fuzz secret";
static const uint8_t uuid[16] = {0xf0, 0x0f};
static const uint8_t session[16] = {0x5e, 0x55};
static const char vm_text[] = "[VM]\nRole=standby\nListen=127.0.0.1:0\nSecretFile=/fuzz.key\n";
/* Heartbeats that do not expire while a loaded machine runs the fuzzer slowly. */
static const char daemon_text[] = "[Daemon]\nHeartbeatIntervalMs=10000\nHeartbeatMisses=100\n";

static sd_event *event;
static VmConfig *vm;
static DaemonConfig *daemon_config;
static Standby *standby; /* of the input being run */
static bool up;          /* its connection authenticated */
/* This primary's session (link-mac.h): frames it sends after AUTH are sealed with tx, the
 * standby's after CHALLENGE are checked with rx. */
static LinkMac *tx, *rx;
static uint64_t tx_seq, rx_seq;

static bool standby_link_up(void)
{
        ReplStatus st;

        standby_get_status(standby, &st);
        return st.link_up;
}

/* Writes all of buf to the (non-blocking) socket, running the loop while it is full. */
static int put(int fd, const void *buf, size_t len)
{
        const uint8_t *p = buf;
        uint8_t sink[65536];

        while (len > 0) {
                ssize_t n = send(fd, p, len, MSG_DONTWAIT | MSG_NOSIGNAL);
                if (n < 0 && errno != EAGAIN)
                        return -errno; /* the standby closed: it refused something */
                if (n > 0) {
                        p += n;
                        len -= (size_t) n;
                        continue;
                }
                (void) recv(fd, sink, sizeof(sink), MSG_DONTWAIT); /* its ACKs and heartbeats */
                if (up && !standby_link_up())
                        return -EPIPE; /* it failed the link and reads no more */
                if (sd_event_run(event, 1000) < 0)
                        return -EIO;
        }
        return 0;
}

static int put_frame(int fd, uint16_t type, const void *payload, size_t len)
{
        uint8_t h[FRAME_HEADER_SIZE], t[LINK_MAC_TRAILER_BYTES];
        int r;

        frame_header_build(h, type, payload, (uint32_t) len);
        r = put(fd, h, sizeof(h));
        if (r >= 0)
                r = put(fd, payload, len);
        if (r >= 0 && tx) {
                if (link_mac_seal(tx, tx_seq++, h, payload, len, t) < 0)
                        abort();
                r = put(fd, t, sizeof(t));
        }
        return r;
}

static int put_message(int fd, uint16_t type, const ProtobufCMessage *m)
{
        uint8_t buf[1024];
        size_t len = protobuf_c_message_get_packed_size(m);

        if (len > sizeof(buf))
                abort();
        protobuf_c_message_pack(m, buf);
        return put_frame(fd, type, buf, len);
}

/* Reads one frame while running the loop. Returns its type, or a negative errno. */
static int get_frame(int fd, uint8_t *buf, size_t cap, size_t *ret_len)
{
        uint8_t h[FRAME_HEADER_SIZE], t[LINK_MAC_TRAILER_BYTES];
        size_t got = 0, need = FRAME_HEADER_SIZE;
        FrameHeader fh = {};

        /* Under libFuzzer's -timeout=10. The standby's own handshake timeout is 5 s;
         * no answer at all after 4 s has only been seen on a starved machine (nice 19
         * at load average 30 on 2 CPUs). Logged, so a run's log shows how often. */
        for (uint64_t end = now_usec() + 4 * USEC_PER_SEC; got < need;) {
                ssize_t n;

                if (now_usec() > end) {
                        fprintf(stderr, "the standby did not answer the handshake within 4 s\n");
                        return -ETIMEDOUT;
                }
                if (sd_event_run(event, 1000) < 0)
                        return -EIO;
                if (got < FRAME_HEADER_SIZE)
                        n = recv(fd, h + got, need - got, MSG_DONTWAIT);
                else if (got < FRAME_HEADER_SIZE + fh.length)
                        n = recv(fd, buf + (got - FRAME_HEADER_SIZE), FRAME_HEADER_SIZE + fh.length - got,
                                 MSG_DONTWAIT);
                else
                        n = recv(fd, t + (got - FRAME_HEADER_SIZE - fh.length), need - got, MSG_DONTWAIT);
                if (n < 0 && errno == EAGAIN)
                        continue;
                if (n <= 0)
                        return -ECONNRESET;
                got += (size_t) n;
                if (got == FRAME_HEADER_SIZE) {
                        if (frame_header_parse(h, (uint32_t) cap, &fh) < 0)
                                abort(); /* the standby sends well-formed frames */
                        need += fh.length + (rx ? LINK_MAC_TRAILER_BYTES : 0);
                }
        }
        if (frame_verify_payload(h, &fh, buf) < 0)
                abort();
        if (rx && link_mac_check(rx, rx_seq++, h, buf, fh.length, t, NULL) < 0)
                abort(); /* the standby seals what it sends */
        *ret_len = fh.length;
        return fh.type;
}

/*
 * The standby answered our honest handshake with something else. Not what
 * this target is about (fuzz-link is), but never expected: say what it was,
 * so the run's log shows it, and skip the input.
 */
static bool refused(const char *what, int type, const uint8_t *buf, size_t len)
{
        Dr__Repl__Error *e;

        if (type < 0) {
                /* It closed right after its ERROR frame, before we read it. */
                fprintf(stderr, "%s answered with %s\n", what, strerror(-type));
                return false;
        }
        if (type != DR__REPL__FRAME_TYPE__FRAME_ERROR) {
                fprintf(stderr, "%s answered with frame type %d\n", what, type);
                abort();
        }
        e = dr__repl__error__unpack(NULL, len, buf);
        fprintf(stderr, "%s refused by the standby: %d %s\n", what, e ? e->code : 0,
                e ? e->message : "(undecodable)");
        if (e)
                dr__repl__error__free_unpacked(e, NULL);
        return false;
}

/*
 * Says why the standby refused the handshake (an ERROR frame), or aborts on
 * anything else. Returns true when the connection is up.
 */
static bool handshake(int fd, bool two_regions)
{
        Dr__Repl__MemRegion r0 = DR__REPL__MEM_REGION__INIT, r1 = DR__REPL__MEM_REGION__INIT;
        Dr__Repl__MemRegion *regions[] = {&r0, &r1};
        Dr__Repl__Hello h = DR__REPL__HELLO__INIT;
        Dr__Repl__Auth a = DR__REPL__AUTH__INIT;
        uint8_t nonce[32] = {1, 2, 3}, proof[32], buf[4096];
        Dr__Repl__Challenge *c;
        size_t len;
        int type;

        r0 = (Dr__Repl__MemRegion){.base = r0.base, .slot = 0, .guest_phys = 0, .size = 16 * PAGE_BYTES};
        r1 = (Dr__Repl__MemRegion){.base = r1.base,
                                   .slot = 1,
                                   .guest_phys = 1ULL << 32,
                                   .size = 4 * PAGE_BYTES,
                                   .memfd_offset = 32 * PAGE_BYTES};
        h.version = DR__REPL__REPL_VERSION__REPL_VERSION_CURRENT;
        h.vm_name = (char *) VM_NAME;
        h.vm_uuid = (ProtobufCBinaryData){sizeof(uuid), (uint8_t *) uuid};
        h.n_regions = two_regions ? 2 : 1;
        h.regions = regions;
        h.page_size = PAGE_BYTES;
        h.nonce = (ProtobufCBinaryData){sizeof(nonce), nonce};
        h.session = (ProtobufCBinaryData){sizeof(session), (uint8_t *) session};
        if (put_message(fd, DR__REPL__FRAME_TYPE__FRAME_HELLO, &h.base) < 0)
                abort();
        type = get_frame(fd, buf, sizeof(buf), &len);
        if (type != DR__REPL__FRAME_TYPE__FRAME_CHALLENGE)
                return refused("HELLO", type, buf, len);
        c = dr__repl__challenge__unpack(NULL, len, buf);
        if (!c || c->nonce.len != 32)
                abort();
        if (link_proof(secret, sizeof(secret), "dirtyrep-primary", c->nonce.data, nonce, VM_NAME, uuid, NULL,
                       0, proof) < 0)
                abort();
        {
                uint8_t p2s[LINK_KEY_BYTES], s2p[LINK_KEY_BYTES];
                if (link_session_keys(secret, sizeof(secret), nonce, c->nonce.data, 32, VM_NAME, uuid,
                                      sizeof(uuid), NULL, 0, p2s, s2p) < 0 ||
                    link_mac_new(s2p, &rx) < 0)
                        abort();
                /* AUTH itself goes out unsealed; tx from the frame after it. */
                a.proof = (ProtobufCBinaryData){sizeof(proof), proof};
                if (put_message(fd, DR__REPL__FRAME_TYPE__FRAME_AUTH, &a.base) < 0)
                        abort();
                if (link_mac_new(p2s, &tx) < 0)
                        abort();
        }
        dr__repl__challenge__free_unpacked(c, NULL);
        type = get_frame(fd, buf, sizeof(buf), &len);
        if (type != DR__REPL__FRAME_TYPE__FRAME_WELCOME)
                return refused("AUTH", type, buf, len);
        up = true;
        return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        _cleanup_(standby_freep) Standby *s = NULL;
        uint8_t sink[65536];
        size_t at = 1;
        int sv[2];

        if (size < 1 || size > 1024 * 1024)
                return 0;
        if (!event) {
                char *errors = NULL;
                /* FUZZ_DEBUG=1: the standby's log, to see how far an input gets. */
                log_set_max_level(getenv("FUZZ_DEBUG") ? LOG_DEBUG : LOG_CRIT);
                if (sd_event_new(&event) < 0 ||
                    config_parse_vm_file("fuzz.conf", VM_NAME, vm_text, strlen(vm_text), &vm, &errors) < 0 ||
                    config_parse_daemon_text("fuzz-daemon.conf", daemon_text, strlen(daemon_text),
                                             &daemon_config, &errors) < 0)
                        abort();
        }
        if (standby_new(event, daemon_config, vm, secret, sizeof(secret), &s) < 0)
                abort();
        standby = s;
        up = false;
        tx = link_mac_free(tx);
        rx = link_mac_free(rx);
        tx_seq = rx_seq = 0;
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) < 0)
                abort();
        if (standby_accept_fd(s, sv[0]) < 0)
                abort();
        if (!handshake(sv[1], data[0] & 1)) {
                close(sv[1]);
                return 0;
        }

        while (at + 3 <= size) {
                uint8_t type = data[at];
                size_t len = MIN((size_t) (data[at + 1] | data[at + 2] << 8), size - at - 3);

                if (put_frame(sv[1], type, data + at + 3, len) < 0)
                        break;
                at += 3 + len;
        }
        (void) shutdown(sv[1], SHUT_WR);
        /* Done when the standby failed the link, or read every byte and has nothing
         * more to do (it need not notice the end of file: that is heartbeat work). */
        for (uint64_t end = now_usec() + 8 * USEC_PER_SEC;;) {
                int unread = 0;

                if (!standby_link_up())
                        break;
                if (ioctl(sv[0], FIONREAD, &unread) >= 0 && unread == 0 && sd_event_run(event, 0) == 0)
                        break;
                if (now_usec() > end) {
                        /* Logged, not fatal: seen only on a starved machine so far; the run's
                         * log counts them (a real hang would show up there every time). */
                        fprintf(stderr, "the standby neither finished nor failed the connection in 8 s\n");
                        break;
                }
                (void) recv(sv[1], sink, sizeof(sink), MSG_DONTWAIT);
                if (sd_event_run(event, 1000) < 0)
                        abort();
        }
        close(sv[1]);
        return 0;
}

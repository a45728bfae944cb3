/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * What the per-frame MAC of the replication link costs (daemon/link-mac.h).
 *
 *   dr-link-bench [MIB [FRAME_KIB]]
 *
 * 1. The MAC alone: AES-256-GMAC over 4 MiB (a full PAGES frame) and over a
 *    small frame (an EPOCH_END or ACK), next to CRC32C over the same bytes,
 *    which every frame already pays.
 * 2. A primary Link and a standby Link over TCP on 127.0.0.1 in this process
 *    (one sd-event loop reads for both, each has its writer thread): MIB MiB
 *    of PAGES-sized frames (FRAME_KIB, default 4096) from primary to standby,
 *    as a full sync sends them; wall time, MB/s and the CPU time of the
 *    process.
 *
 * Part 2 uses only the Link API, so the same source also builds against a
 * tree without MACs (it then skips part 1: no link-mac.h): that is the
 * "without" figure. Built as build/tests/unit/dr-link-bench; not a test.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "crc32c.h"
#include "frame.h"
#include "link.h"
#if __has_include("link-mac.h")
#include "link-mac.h"
#define HAVE_LINK_MAC 1
#endif
#include "util.h"

static const uint8_t SECRET[] = "link bench secret, not a real one";
static const uint8_t UUID[16] = {1, 2, 3};

static double now_s(void)
{
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

static double cpu_s(void)
{
        struct rusage ru;
        getrusage(RUSAGE_SELF, &ru);
        return (double) ru.ru_utime.tv_sec + (double) ru.ru_utime.tv_usec / 1e6 +
               (double) ru.ru_stime.tv_sec + (double) ru.ru_stime.tv_usec / 1e6;
}

#ifdef HAVE_LINK_MAC
static void bench_mac(void)
{
        static uint8_t key[LINK_KEY_BYTES] = {7};
        size_t big = 4u << 20;
        uint8_t *buf = malloc(big), hdr[FRAME_HEADER_SIZE], t[LINK_MAC_TRAILER_BYTES];
        volatile uint32_t sink = 0;
        LinkMac *m = NULL;
        double t0, dt;
        unsigned n;

        if (!buf || link_mac_new(key, &m) < 0)
                exit(1);
        for (size_t i = 0; i < big; i++)
                buf[i] = (uint8_t) (i * 2654435761u >> 13);
        frame_header_build(hdr, 6, buf, (uint32_t) big);

        n = 128;
        t0 = now_s();
        for (unsigned i = 0; i < n; i++)
                if (link_mac_seal(m, i, hdr, buf, big, t) < 0)
                        exit(1);
        dt = now_s() - t0;
        printf("gmac   4 MiB frame: %8.0f MB/s  (%.3f ms per frame)\n", n * (double) big / dt / 1e6,
               dt / n * 1e3);
        t0 = now_s();
        for (unsigned i = 0; i < n; i++)
                sink += crc32c(0, buf, big);
        dt = now_s() - t0;
        printf("crc32c 4 MiB frame: %8.0f MB/s  (%.3f ms per frame)\n", n * (double) big / dt / 1e6,
               dt / n * 1e3);

        n = 200000;
        t0 = now_s();
        for (unsigned i = 0; i < n; i++)
                if (link_mac_seal(m, i, hdr, buf, 24, t) < 0)
                        exit(1);
        dt = now_s() - t0;
        printf("gmac   24-byte frame (EPOCH_END, ACK): %.0f ns per frame\n", dt / n * 1e9);
        t0 = now_s();
        for (unsigned i = 0; i < n; i++)
                sink += crc32c(0, buf, 24);
        dt = now_s() - t0;
        printf("crc32c 24-byte frame: %.0f ns per frame\n", dt / n * 1e9);
        link_mac_free(m);
        free(buf);
        (void) sink;
}
#endif

typedef struct Bench {
        sd_event *e;
        Link *standby, *primary;
        LinkListener *ll;
        unsigned ups, downs;
        uint64_t received;
        size_t frame;
        uint64_t total;
        bool sender_done;
        int sender_error;
} Bench;

static int on_up(Link *l, const Dr__Repl__Welcome *w, void *userdata)
{
        ((Bench *) userdata)->ups++;
        return 0;
}

static int on_frame(Link *l, uint16_t type, const uint8_t *payload, size_t len, void *userdata)
{
        ((Bench *) userdata)->received += len;
        return 0;
}

static void on_down(Link *l, int error, const char *reason, void *userdata)
{
        ((Bench *) userdata)->downs++;
        fprintf(stderr, "link down: %s\n", reason);
}

static const LinkCallbacks cb = {.on_up = on_up, .on_frame = on_frame, .on_down = on_down};

static int on_accept(LinkListener *ll, int fd, const char *peer, void *userdata)
{
        Bench *b = userdata;
        LinkParams p = {.side = LINK_STANDBY,
                        .secret = SECRET,
                        .secret_len = sizeof(SECRET),
                        .listener = ll,
                        .heartbeat_misses = 100};
        return link_accept(b->e, fd, &p, &cb, b, &b->standby);
}

static void *sender(void *userdata)
{
        Bench *b = userdata;
        uint8_t *buf = malloc(b->frame);

        for (size_t i = 0; buf && i < b->frame; i++)
                buf[i] = (uint8_t) (i * 2654435761u >> 13);
        for (uint64_t sent = 0; buf && sent < b->total; sent += b->frame) {
                int r = link_send(b->primary, 6, buf, b->frame, true);
                if (r < 0) {
                        b->sender_error = r;
                        break;
                }
        }
        free(buf);
        __atomic_store_n(&b->sender_done, true, __ATOMIC_RELEASE);
        return NULL;
}

int main(int argc, char **argv)
{
        struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        uint8_t session[16] = {9};
        Dr__Repl__Hello h = DR__REPL__HELLO__INIT;
        struct sockaddr_storage ss;
        socklen_t sl;
        Bench b = {};
        pthread_t t;
        double t0, c0, dt, dc;

        b.total = (uint64_t) (argc > 1 ? atoi(argv[1]) : 2048) << 20;
        b.frame = (size_t) (argc > 2 ? atoi(argv[2]) : 4096) << 10;
#ifdef HAVE_LINK_MAC
        bench_mac();
#else
        printf("(built without link-mac.h: no per-frame MAC in this tree)\n");
#endif
        if (sd_event_new(&b.e) < 0 ||
            link_listener_new(b.e, (struct sockaddr *) &sin, sizeof(sin), 4, on_accept, &b, &b.ll) < 0 ||
            link_listener_address(b.ll, &ss, &sl) < 0)
                return 1;
        h.vm_name = (char *) "bench";
        h.vm_uuid = (ProtobufCBinaryData){16, (uint8_t *) UUID};
        h.session = (ProtobufCBinaryData){16, session};
        h.page_size = 4096;
        LinkParams p = {.side = LINK_PRIMARY,
                        .secret = SECRET,
                        .secret_len = sizeof(SECRET),
                        .hello = &h,
                        .heartbeat_misses = 100};
        if (link_connect(b.e, (struct sockaddr *) &ss, sl, &p, &cb, &b, &b.primary) < 0)
                return 1;
        while (b.ups < 2 && b.downs == 0)
                sd_event_run(b.e, 100000);
        if (b.downs)
                return 1;

        t0 = now_s();
        c0 = cpu_s();
        pthread_create(&t, NULL, sender, &b);
        while (b.received < b.total && b.downs == 0)
                sd_event_run(b.e, 100000);
        dt = now_s() - t0;
        dc = cpu_s() - c0;
        pthread_join(t, NULL);
        printf("link   %llu MiB in %zu KiB frames over 127.0.0.1: %.2f s, %.0f MB/s, CPU %.2f s (%.2f s per "
               "GB)\n",
               (unsigned long long) (b.total >> 20), b.frame >> 10, dt, (double) b.received / dt / 1e6, dc,
               dc / ((double) b.received / 1e9));
        link_free(b.primary);
        link_free(b.standby);
        link_listener_free(b.ll);
        sd_event_unref(b.e);
        return b.downs || b.sender_error ? 1 : 0;
}

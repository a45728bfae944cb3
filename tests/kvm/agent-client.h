/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * A raw control-protocol peer for the agent's kvm tests: connect, send a
 * Request (or any bytes), receive a Reply with its fds. Test code: it
 * exits on a broken invariant rather than returning errors.
 */
#include <errno.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "control.pb-c.h"
#include "fdpass.h"
#include "macros.h"

#define CHECK(expr)                                                                                         \
        do {                                                                                                \
                if (!(expr)) {                                                                              \
                        fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #expr);            \
                        exit(1);                                                                            \
                }                                                                                           \
        } while (0)

#define CHECK_EQ(a, b)                                                                                      \
        do {                                                                                                \
                long long _a = (long long) (a), _b = (long long) (b);                                       \
                if (_a != _b) {                                                                             \
                        fprintf(stderr, "%s:%d: %s == %s failed: %lld != %lld\n", __FILE__, __LINE__, #a,   \
                                #b, _a, _b);                                                                \
                        exit(1);                                                                            \
                }                                                                                           \
        } while (0)

static inline int peer_connect(const char *path)
{
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);

        if (fd < 0)
                return -errno;
        if (strlen(path) >= sizeof(sa.sun_path)) {
                close(fd);
                return -ENAMETOOLONG;
        }
        memcpy(sa.sun_path, path, strlen(path) + 1);
        if (connect(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0) {
                int r = -errno;
                close(fd);
                return r;
        }
        return fd;
}

/* Connects, retrying for up to timeout_ms while the socket does not exist yet. */
static inline int peer_connect_wait(const char *path, unsigned timeout_ms)
{
        for (unsigned t = 0;; t += 20) {
                int fd = peer_connect(path);
                if (fd >= 0 || t >= timeout_ms)
                        return fd;
                usleep(20000);
        }
}

/* Receives one Reply (timeout 10 s). fds (if any) go to fds/n_fds, else are closed. */
static inline Dr__Control__Reply *peer_recv(int fd, int *fds, size_t max_fds, size_t *n_fds)
{
        static uint8_t buf[65536];
        int tmp[FDPASS_MAX_FDS];
        size_t n = 0;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        ssize_t len;

        if (poll(&p, 1, 10000) <= 0)
                return NULL;
        len = fdpass_recv(fd, buf, sizeof(buf), tmp, ELEMENTSOF(tmp), &n);
        if (len <= 0)
                return NULL;
        for (size_t i = 0; i < n; i++) {
                if (fds && i < max_fds)
                        fds[i] = tmp[i];
                else
                        close(tmp[i]);
        }
        if (n_fds)
                *n_fds = MIN(n, max_fds);
        return dr__control__reply__unpack(NULL, (size_t) len, buf);
}

static inline int peer_send(int fd, Dr__Control__Request *req)
{
        uint8_t buf[4096];
        size_t len = dr__control__request__get_packed_size(req);

        CHECK(len <= sizeof(buf));
        dr__control__request__pack(req, buf);
        return fdpass_send(fd, buf, len, NULL, 0);
}

/* Sends req with a fresh id and returns its reply (NULL on EOF/timeout). Checks the id echo. */
static inline Dr__Control__Reply *peer_call_fds(int fd, Dr__Control__Request *req, int *fds, size_t max_fds,
                                                size_t *n_fds)
{
        static uint64_t next_id = 1000;
        Dr__Control__Reply *rep;

        req->id = next_id++;
        if (peer_send(fd, req) < 0)
                return NULL;
        rep = peer_recv(fd, fds, max_fds, n_fds);
        if (rep)
                CHECK_EQ(rep->id, req->id);
        return rep;
}

static inline Dr__Control__Reply *peer_call(int fd, Dr__Control__Request *req)
{
        return peer_call_fds(fd, req, NULL, 0, NULL);
}

/* Calls and returns the reply's error (0 or -errno); the reply is freed unless ret is given. */
static inline int peer_simple(int fd, Dr__Control__Request *req, Dr__Control__Reply **ret)
{
        Dr__Control__Reply *rep = peer_call(fd, req);
        int e;

        CHECK(rep);
        e = rep->error;
        if (ret)
                *ret = rep;
        else
                dr__control__reply__free_unpacked(rep, NULL);
        return e;
}

static inline int peer_hello(int fd)
{
        Dr__Control__Hello h = DR__CONTROL__HELLO__INIT;
        Dr__Control__Request r = DR__CONTROL__REQUEST__INIT;

        h.version = DR__CONTROL__CONTROL_VERSION__CONTROL_VERSION_CURRENT;
        h.client = (char *) "agent test";
        r.body_case = DR__CONTROL__REQUEST__BODY_HELLO;
        r.hello = &h;
        return peer_simple(fd, &r, NULL);
}

static inline int peer_pause(int fd, uint64_t *ret_ns)
{
        Dr__Control__Pause p = DR__CONTROL__PAUSE__INIT;
        Dr__Control__Request r = DR__CONTROL__REQUEST__INIT;
        Dr__Control__Reply *rep = NULL;
        int e;

        r.body_case = DR__CONTROL__REQUEST__BODY_PAUSE;
        r.pause = &p;
        e = peer_simple(fd, &r, &rep);
        if (e == 0 && ret_ns) {
                CHECK(rep->body_case == DR__CONTROL__REPLY__BODY_PAUSE);
                *ret_ns = rep->pause->pause_ns;
        }
        dr__control__reply__free_unpacked(rep, NULL);
        return e;
}

static inline int peer_resume(int fd, bool with_epoch, uint64_t epoch)
{
        Dr__Control__Resume m = DR__CONTROL__RESUME__INIT;
        Dr__Control__Request r = DR__CONTROL__REQUEST__INIT;

        m.has_epoch = with_epoch;
        m.epoch = epoch;
        r.body_case = DR__CONTROL__REQUEST__BODY_RESUME;
        r.resume = &m;
        return peer_simple(fd, &r, NULL);
}

/* A request with an empty body message (GetLayout, StartTracking, ...). */
static inline Dr__Control__Request peer_empty_request(Dr__Control__Request__BodyCase c)
{
        static Dr__Control__GetLayout gl = DR__CONTROL__GET_LAYOUT__INIT;
        static Dr__Control__StartTracking st = DR__CONTROL__START_TRACKING__INIT;
        static Dr__Control__StopTracking sp = DR__CONTROL__STOP_TRACKING__INIT;
        static Dr__Control__ResetRings rr = DR__CONTROL__RESET_RINGS__INIT;
        static Dr__Control__SaveState ss = DR__CONTROL__SAVE_STATE__INIT;
        static Dr__Control__GetStatus gs = DR__CONTROL__GET_STATUS__INIT;
        Dr__Control__Request r = DR__CONTROL__REQUEST__INIT;

        r.body_case = c;
        switch (c) {
        case DR__CONTROL__REQUEST__BODY_GET_LAYOUT:
                r.get_layout = &gl;
                break;
        case DR__CONTROL__REQUEST__BODY_START_TRACKING:
                r.start_tracking = &st;
                break;
        case DR__CONTROL__REQUEST__BODY_STOP_TRACKING:
                r.stop_tracking = &sp;
                break;
        case DR__CONTROL__REQUEST__BODY_RESET_RINGS:
                r.reset_rings = &rr;
                break;
        case DR__CONTROL__REQUEST__BODY_SAVE_STATE:
                r.save_state = &ss;
                break;
        case DR__CONTROL__REQUEST__BODY_GET_STATUS:
                r.get_status = &gs;
                break;
        default:
                CHECK(!"not an empty request");
        }
        return r;
}

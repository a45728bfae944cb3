/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The byte stream a standby's Link receives from an unauthenticated peer:
 * framing, the length cap, CRC, protobuf decoding and the handshake state
 * machine. The bytes go through the same parser the socket handler feeds;
 * the Link's own replies (CHALLENGE, ERROR) go to a socketpair nobody reads.
 */
#include <stdint.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include "link-internal.h"
#include "link.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const uint8_t secret[] = "fuzz secret";

static int on_hello(Link *l, const Dr__Repl__Hello *h, const char **ret_reason, void *userdata)
{
        /* Refuse one VM name, so the refusal path is reachable too. */
        if (h->vm_name[0] == 'X') {
                *ret_reason = "refused";
                return -ENOENT;
        }
        return 0;
}

static int on_frame(Link *l, uint16_t type, const uint8_t *payload, size_t len, void *userdata)
{
        /* Unreachable without the secret: a frame after the handshake from a stranger. */
        abort();
}

static void on_down(Link *l, int error, const char *reason, void *userdata)
{
        if (error >= 0 || !reason)
                abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        static sd_event *e;
        static const LinkCallbacks cb = {.on_hello = on_hello, .on_frame = on_frame, .on_down = on_down};
        LinkParams p = {
                .side = LINK_STANDBY, .secret = secret, .secret_len = sizeof(secret), .peer_name = "fuzz"};
        Link *l = NULL;
        int sv[2];

        if (!e && sd_event_new(&e) < 0)
                abort();
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) < 0)
                abort();
        if (link_accept(e, sv[0], &p, &cb, NULL, &l) < 0)
                abort();
        (void) link_feed_for_fuzzing(l, data, size);
        link_free(l);
        close(sv[1]);
        return 0;
}

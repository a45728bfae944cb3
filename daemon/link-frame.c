/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The replication link's incremental frame parser (link-internal.h): the
 * frame header, the length cap (HANDSHAKE_MAX_FRAME until up) checked before
 * anything is allocated, then the CRC and, once keyed, the sequence number
 * and MAC (link-mac.h); only a frame that passed all of them is dispatched.
 * Loop thread only, like everything that reads.
 */
#include <inttypes.h>
#include <string.h>

#include "frame.h"
#include "link-internal.h"
#include "link-mac.h"
#include "util.h"

const char *link_frame_type_name(uint16_t type)
{
        static const char *const names[] = {
                [DR__REPL__FRAME_TYPE__FRAME_HELLO] = "HELLO",
                [DR__REPL__FRAME_TYPE__FRAME_CHALLENGE] = "CHALLENGE",
                [DR__REPL__FRAME_TYPE__FRAME_AUTH] = "AUTH",
                [DR__REPL__FRAME_TYPE__FRAME_WELCOME] = "WELCOME",
                [DR__REPL__FRAME_TYPE__FRAME_EPOCH_BEGIN] = "EPOCH_BEGIN",
                [DR__REPL__FRAME_TYPE__FRAME_PAGES] = "PAGES",
                [DR__REPL__FRAME_TYPE__FRAME_STATE] = "STATE",
                [DR__REPL__FRAME_TYPE__FRAME_EPOCH_END] = "EPOCH_END",
                [DR__REPL__FRAME_TYPE__FRAME_ACK] = "ACK",
                [DR__REPL__FRAME_TYPE__FRAME_HEARTBEAT] = "HEARTBEAT",
                [DR__REPL__FRAME_TYPE__FRAME_ERROR] = "ERROR",
        };
        if (type < ELEMENTSOF(names) && names[type])
                return names[type];
        return "unknown";
}

/* ---- incremental parser (loop thread) ------------------------------------------------- */

static int link_parse_header(Link *l)
{
        uint32_t cap = l->state == LINK_UP ? l->max_frame : MIN(l->max_frame, HANDSHAKE_MAX_FRAME);
        int r;

        r = frame_header_parse(l->rx_header, cap, &l->rx_frame);
        if (r == -EMSGSIZE)
                return PROTO_FAIL(l, -EMSGSIZE, "frame from %s announces %u payload bytes, limit is %u",
                                  l->peer_name, get_le32(l->rx_header + 8), cap);
        if (r < 0) {
                /* A TLS record header: handshake (22), version 3.x. */
                if (l->rx_header[0] == 22 && l->rx_header[1] == 3 && !l->ssl)
                        return PROTO_FAIL(
                                l, -EPROTO,
                                "peer %s started a TLS handshake, but TLS is off for this link here "
                                "(TLS= must be the same on both hosts)",
                                l->peer_name);
                if (get_le32(l->rx_header) == FRAME_MAGIC && get_le16(l->rx_header + 4) != FRAME_VERSION)
                        return PROTO_FAIL(l, -EPROTONOSUPPORT,
                                          "peer %s uses frame version %u, this side only %u", l->peer_name,
                                          get_le16(l->rx_header + 4), FRAME_VERSION);
                return PROTO_FAIL(l, -EBADMSG, "bad frame header from %s (magic, version or reserved bytes)",
                                  l->peer_name);
        }

        /* Only now, with the length checked, is anything allocated for the payload. */
        if (l->rx_frame.length > l->rx_payload_cap) {
                free(l->rx_payload);
                l->rx_payload_cap = 0;
                l->rx_payload = malloc(l->rx_frame.length);
                if (!l->rx_payload)
                        return PROTO_FAIL(l, -ENOMEM, "out of memory for a %u byte frame",
                                          l->rx_frame.length);
                l->rx_payload_cap = l->rx_frame.length;
        }
        l->rx_have_header = true;
        l->rx_payload_got = 0;
        l->rx_trailer_got = 0;
        return 0;
}

int link_frame_complete(Link *l)
{
        FrameHeader h = l->rx_frame;

        l->rx_have_header = false;
        l->rx_header_got = 0;
        if (frame_verify_payload(l->rx_header, &h, l->rx_payload) < 0)
                return PROTO_FAIL(l, -EBADMSG, "CRC mismatch in %s frame (%u bytes) from %s",
                                  link_frame_type_name(h.type), h.length, l->peer_name);
        if (l->rx_mac) {
                /* A CRC anyone can recompute; the tag only a holder of this session's key. */
                uint64_t seq = 0;
                int r = link_mac_check(l->rx_mac, l->rx_seq, l->rx_header, l->rx_payload, h.length,
                                       l->rx_trailer, &seq);
                if (r == -ERANGE)
                        return PROTO_FAIL(l, -EBADMSG,
                                          "frame out of sequence from %s: %s frame numbered %" PRIu64
                                          " where %" PRIu64 " was due (replayed, dropped or reordered "
                                          "on the way); link closed, nothing of it applied",
                                          l->peer_name, link_frame_type_name(h.type), seq, l->rx_seq);
                if (r == -EBADMSG)
                        return PROTO_FAIL(l, -EBADMSG,
                                          "authentication failed for %s frame %" PRIu64
                                          " (%u bytes) from %s: its MAC does not match (altered on the "
                                          "way, or not sent by the peer); link closed, nothing of it "
                                          "applied",
                                          link_frame_type_name(h.type), seq, h.length, l->peer_name);
                if (r < 0)
                        return PROTO_FAIL(l, r, "failed to check the MAC of a %s frame from %s: %s",
                                          link_frame_type_name(h.type), l->peer_name, strerror(-r));
                l->rx_seq++;
        }
        pthread_mutex_lock(&l->mutex);
        l->stats.frames_received++;
        pthread_mutex_unlock(&l->mutex);
        return link_dispatch(l, h.type, l->rx_payload, h.length);
}

/* Consumes len bytes of stream. 0 when all were consumed, negative when the link went down. */
int link_feed(Link *l, const uint8_t *data, size_t len)
{
        int r;

        while (!l->freed && l->state != LINK_DOWN) {
                size_t n;

                if (!l->rx_have_header) {
                        if (len == 0)
                                return 0;
                        n = MIN(len, FRAME_HEADER_SIZE - l->rx_header_got);
                        memcpy(l->rx_header + l->rx_header_got, data, n);
                        l->rx_header_got += n;
                        data += n;
                        len -= n;
                        if (l->rx_header_got < FRAME_HEADER_SIZE)
                                return 0;
                        r = link_parse_header(l);
                        if (r < 0)
                                return r;
                }
                if (l->rx_payload_got < l->rx_frame.length) {
                        if (len == 0)
                                return 0;
                        n = MIN(len, l->rx_frame.length - l->rx_payload_got);
                        memcpy(l->rx_payload + l->rx_payload_got, data, n);
                        l->rx_payload_got += n;
                        data += n;
                        len -= n;
                        if (l->rx_payload_got < l->rx_frame.length)
                                return 0;
                }
                if (l->rx_mac && l->rx_trailer_got < LINK_MAC_TRAILER_BYTES) {
                        if (len == 0)
                                return 0;
                        n = MIN(len, LINK_MAC_TRAILER_BYTES - l->rx_trailer_got);
                        memcpy(l->rx_trailer + l->rx_trailer_got, data, n);
                        l->rx_trailer_got += n;
                        data += n;
                        len -= n;
                        if (l->rx_trailer_got < LINK_MAC_TRAILER_BYTES)
                                return 0;
                }
                r = link_frame_complete(l);
                if (r < 0)
                        return r;
        }
        return -ENOTCONN;
}

int link_feed_for_fuzzing(Link *l, const void *data, size_t len)
{
        _cleanup_(link_unrefp) _unused_ Link *ref = link_ref(l);
        return link_feed(l, data, len);
}

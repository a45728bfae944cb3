/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * Link: one authenticated replication connection (proto/replication.proto),
 * either side. A Link is one TCP connection's life: connect or accept,
 * handshake (Hello / Challenge / Auth / Welcome with HMAC-SHA256 proofs),
 * frames both ways, heartbeats, then down. Reconnecting is the owner's job
 * (it makes a new Link).
 *
 * Threads: the Link reads on the caller's sd-event loop (non-blocking,
 * incremental frame parser, length capped before allocation, CRC checked
 * before dispatch) and writes on a writer thread of its own from a bounded
 * queue. Callbacks run on the sd-event thread. link_send*() may be called
 * from any thread; with block=true it waits while the queue is over its
 * limit (that is how a slow link back-pressures the epoch pipeline and
 * keeps memory bounded), with block=false it returns -EAGAIN instead.
 *
 * Heartbeats: the Link sends HEARTBEAT every heartbeat_ms (fields from
 * cb.fill_heartbeat) and declares the peer lost when nothing at all (any
 * frame counts) arrived for heartbeat_ms * heartbeat_misses: on_down with
 * -ETIMEDOUT. During the handshake a separate handshake_timeout_ms applies.
 *
 * TLS (LinkParams.tls): the TLS 1.3 handshake runs first (within
 * handshake_timeout_ms), then the replication handshake inside it. A failed
 * certificate check ends the link with -EKEYREJECTED and the verifier's
 * reason; a TLS record error (corruption, a peer's alert) with -EBADMSG, as
 * a CRC mismatch does in plaintext. Reads and writes keep their threads:
 * the SSL object is shared under a mutex of its own.
 *
 * Per-frame authentication (link-mac.h): every frame after the handshake, in
 * both directions (WELCOME, ACK, HEARTBEAT and ERROR included), carries a
 * sequence number and an AES-GMAC tag under session keys derived from the
 * secret, both nonces and (with TLS) the TLS exporter. A frame out of
 * sequence or with a wrong tag ends the link with -EBADMSG before any of it
 * is dispatched.
 *
 * Errors end the link, never the process: a bad frame (magic, version,
 * length, CRC, MAC, sequence, undecodable protobuf, unexpected type for the state) calls
 * on_down with -EBADMSG/-EPROTO and a message naming what was wrong; an
 * authentication failure with -EACCES ("wrong shared secret?"). The owner
 * logs it (once) and decides what next.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <openssl/types.h>
#include <sys/socket.h>
#include <systemd/sd-event.h>

#include "macros.h"
#include "replication.pb-c.h"

typedef struct Link Link;

typedef enum LinkSide {
        LINK_PRIMARY = 1, /* connects, sends Hello and proves itself second */
        LINK_STANDBY = 2, /* accepts, challenges, proves itself first */
} LinkSide;

typedef enum LinkState {
        LINK_CONNECTING = 1,
        LINK_HANDSHAKE,
        LINK_UP,
        LINK_DOWN,
} LinkState;

typedef struct LinkStats {
        uint64_t frames_sent, frames_received;
        uint64_t bytes_sent, bytes_received;
        uint64_t queued_bytes; /* in the send queue now */
        uint64_t queue_high_water;
        uint64_t heartbeats_sent, heartbeats_received;
} LinkStats;

typedef struct LinkCallbacks {
        /* Standby: the primary's Hello arrived (not yet authenticated). Check VM
         * name, UUID, layout; return <0 (and set *ret_reason) to refuse. */
        int (*on_hello)(Link *l, const Dr__Repl__Hello *hello, const char **ret_reason, void *userdata);
        /* Standby: fill the Welcome sent once the primary proved itself. */
        void (*fill_welcome)(Link *l, Dr__Repl__Welcome *w, void *userdata);
        /* Both: the handshake is complete. Primary: `welcome` is the standby's
         * Welcome; standby: NULL. Return <0 to drop the link. */
        int (*on_up)(Link *l, const Dr__Repl__Welcome *welcome, void *userdata);
        /* Both: a frame after the handshake (never HELLO..WELCOME, never
         * HEARTBEAT, which the Link consumes). payload valid during the call. */
        int (*on_frame)(Link *l, uint16_t type, const uint8_t *payload, size_t len, void *userdata);
        /* Both: fill the next outgoing heartbeat (seq is set by the Link). Optional. */
        void (*fill_heartbeat)(Link *l, Dr__Repl__Heartbeat *hb, void *userdata);
        /* Both: the peer's heartbeat arrived. Optional. */
        void (*on_heartbeat)(Link *l, const Dr__Repl__Heartbeat *hb, void *userdata);
        /* Both: the link went down (once). `error` is a negative errno, `reason`
         * says what happened for a log line. The Link stays valid until freed. */
        void (*on_down)(Link *l, int error, const char *reason, void *userdata);
} LinkCallbacks;

typedef struct LinkParams {
        LinkSide side;
        const uint8_t *secret; /* shared secret, borrowed for the Link's life */
        size_t secret_len;
        uint32_t heartbeat_ms;         /* default 50 */
        uint32_t heartbeat_misses;     /* default 4 */
        uint32_t handshake_timeout_ms; /* default 5000 */
        size_t send_queue_limit;       /* bytes; default 32 MiB */
        uint32_t max_frame;            /* payload cap; default REPL_MAX_FRAME */
        /* Primary: the Hello to send (the Link fills in nonce and version). */
        const Dr__Repl__Hello *hello;
        const char *peer_name; /* for messages, e.g. "10.0.0.2:7788" */
        /* Standby, optional: the listener the fd came from. The Link then counts
         * against its max_pending until the handshake ends (up, down or freed). */
        struct LinkListener *listener;
        /* Optional: TLS (daemon/tls.h) under the replication handshake. NULL: plaintext. Borrowed;
         * each connection holds its own reference. Both ends must agree: a TLS side refuses a
         * plaintext peer and the other way round, each with a message that says so. */
        SSL_CTX *tls;
} LinkParams;

/* Primary: starts a non-blocking connect; progress and failure arrive through callbacks. */
int link_connect(sd_event *e, const struct sockaddr *sa, socklen_t salen, const LinkParams *p,
                 const LinkCallbacks *cb, void *userdata, Link **ret);

/* Standby: adopts an accepted socket (takes ownership of fd) and waits for Hello. */
int link_accept(sd_event *e, int fd, const LinkParams *p, const LinkCallbacks *cb, void *userdata,
                Link **ret);

/* Closes the connection (no callback), joins the writer thread, frees. Accepts NULL. */
Link *link_free(Link *l);
DEFINE_TRIVIAL_CLEANUP_FUNC(Link *, link_free);

/* Queues a frame of `type` with a copy of payload. 0, -EAGAIN (!block and full), -ENOTCONN (not up yet, or
 * down), -EMSGSIZE. */
int link_send(Link *l, uint16_t type, const void *payload, size_t len, bool block);
/* Packs a protobuf message and queues it. */
int link_send_message(Link *l, uint16_t type, const ProtobufCMessage *m, bool block);
/* Sends ERROR{code, message} and then takes the link down (on_down is called). */
void link_fail(Link *l, int code, const char *fmt, ...) _printf_(3, 4);

LinkState link_state(const Link *l);
void link_get_stats(const Link *l, LinkStats *ret);
/* Waits (blocking, at most timeout_usec) until the writer has sent everything queued, such as the
 * ERROR frame link_fail() queued. 0, -ETIMEDOUT, or -ENOTCONN when it never will (no writer, write
 * error). Accepts NULL. */
int link_wait_sent(Link *l, uint64_t timeout_usec);
/* Tolerate up to usec of silence from the peer (0: the heartbeat window
 * only), e.g. while it applies a full sync. Any thread; the Link must be alive. */
void link_set_patience(Link *l, uint64_t usec);
/* The patience both sides use during a full sync. */
#define SYNC_PATIENCE_USEC (2u * 1000u * 1000u)
const char *link_peer_name(const Link *l);
/* Whether the link went down because the peer said so (its ERROR frame), not from this side. */
bool link_down_by_peer(const Link *l);
/* Whether the link was closed by the pre-authentication limits (evicted, silent, handshake timed
 * out): a stranger, already counted in the listener's rate-limited warning, not to be logged again. */
bool link_preauth_dropped(const Link *l);
/* The session id from the primary's Hello (standby side, after on_hello), 16 bytes. */
const uint8_t *link_peer_session(const Link *l);

/*
 * Standby: a listening socket on the event loop that hands every accepted
 * connection to on_accept (which typically calls link_accept). Bounded
 * before authentication: at most `max_pending` connections in handshake at
 * once and at most 2 from one source address (more are closed at once); when
 * all are taken, a connection from an address with nothing pending evicts the
 * oldest silent one (else the oldest), one from an address that has a
 * handshake pending is closed. A standby connection that sends nothing within
 * 1 s is closed, one that has not authenticated within handshake_timeout_ms
 * too. Drops are counted and logged as one warning per 10 s naming the
 * latest source. Links count against the limits only when link_accept gets
 * the listener in LinkParams.listener. on_accept owns fd whatever it returns.
 */
typedef struct LinkListener LinkListener;
int link_listener_new(sd_event *e, const struct sockaddr *sa, socklen_t salen, unsigned max_pending,
                      int (*on_accept)(LinkListener *ll, int fd, const char *peer, void *userdata),
                      void *userdata, LinkListener **ret);
LinkListener *link_listener_free(LinkListener *ll);
DEFINE_TRIVIAL_CLEANUP_FUNC(LinkListener *, link_listener_free);
/* The bound address (useful with port 0). */
int link_listener_address(const LinkListener *ll, struct sockaddr_storage *ret, socklen_t *ret_len);

/*
 * HMAC-SHA256 proof as the protocol defines it (exported for tests). out: 32 bytes.
 * The HMAC key is the secret; the message is six fields, each a le32 byte
 * count followed by that many bytes, in this order:
 *
 *   label    "dirtyrep-standby" or "dirtyrep-primary" (no NUL)
 *   nonce_a  REPL_NONCE_BYTES  (standby proof: P nonce; primary proof: S nonce)
 *   nonce_b  REPL_NONCE_BYTES  (standby proof: S nonce; primary proof: P nonce)
 *   vm_name  the Hello's vm_name (no NUL)
 *   vm_uuid  16 bytes
 *   binding  the TLS exporter (link-mac.h) with TLS, empty (0 bytes) in plaintext
 *
 * The length prefixes make the encoding injective, so no two different
 * (label, nonces, identity) tuples hash the same bytes. Returns 0, -EINVAL
 * (empty secret, no name) or -EIO (libcrypto failed).
 */
int link_proof(const uint8_t *secret, size_t secret_len, const char *label, const uint8_t *nonce_a,
               const uint8_t *nonce_b, const char *vm_name, const uint8_t *vm_uuid, const uint8_t *binding,
               size_t binding_len, uint8_t out[32]);

/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * Internal to the replication link (daemon/link*.c) and its tests: not part
 * of the Link API (link.h). The Link is one module in several files that
 * share struct Link below; which thread owns which of its fields is said at
 * the top of link.c and next to the fields. The files:
 *
 *   link.c            the connection's state machine (loop thread): accessors,
 *                     going down, lifetime, timers, frame dispatch, socket
 *                     events, construction
 *   link-frame.c      the incremental frame parser: header, length cap,
 *                     CRC and MAC checks before dispatch (loop thread)
 *   link-handshake.c  the proofs, session keys and the HELLO / CHALLENGE /
 *                     AUTH / WELCOME handlers (loop thread)
 *   link-transport.c  bytes in and out, plaintext or TLS, and the TLS
 *                     handshake (the loop thread reads, the writer writes)
 *   link-writer.c     the send queue (any thread) and the writer thread
 *   link-listener.c   the standby's listener and its pre-authentication
 *                     limits (loop thread)
 */

#include <netinet/in.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "frame.h"
#include "link-mac.h"
#include "link.h"
#include "macros.h"
#include "util.h"

#define NONCE_BYTES         32u
#define UUID_BYTES          16u
#define SESSION_BYTES       16u
#define VM_NAME_MAX         255u
#define HANDSHAKE_MAX_FRAME (64u * 1024u)
#define SOCKET_BUFFER_BYTES (4 * 1024 * 1024)
#define TLS_RECORD_MAX      16384u /* plaintext bytes per TLS record */

static inline void protobuf_c_message_freep(ProtobufCMessage **m)
{
        if (*m)
                protobuf_c_message_free_unpacked(*m, NULL);
}

typedef enum HandshakeStep {
        STEP_NONE,
        STEP_TLS,            /* both, with TLS: the TLS handshake */
        STEP_WAIT_HELLO,     /* standby */
        STEP_WAIT_AUTH,      /* standby */
        STEP_WAIT_CHALLENGE, /* primary */
        STEP_WAIT_WELCOME,   /* primary */
} HandshakeStep;

typedef struct TxFrame {
        struct TxFrame *next;
        size_t len;     /* header + payload (+ the MAC trailer when mac) */
        bool mac;       /* decided under `mutex` when queued; the writer seals it just before sending */
        bool sealed;    /* writer: the trailer is written */
        uint8_t data[]; /* room for header, payload and a trailer */
} TxFrame;

struct LinkListener {
        sd_event *event;
        int fd;
        sd_event_source *io;
        unsigned max_pending;
        Link *pending; /* Links in handshake that count against max_pending */
        unsigned n_pending;
        uint64_t refused;
        /* The rate-limited warning: when it may be logged next, and what was dropped since. */
        uint64_t warn_next_usec;
        uint64_t dropped_since_warn;
        int (*on_accept)(LinkListener *ll, int fd, const char *peer, void *userdata);
        void *userdata;
};

struct Link {
        unsigned n_ref; /* loop thread only: keeps memory alive while a handler runs */
        bool freed;
        sd_event *event;
        LinkSide side;
        LinkState state; /* written on the loop thread, read anywhere (relaxed) */
        HandshakeStep step;
        LinkCallbacks cb;
        void *userdata;

        const uint8_t *secret;
        size_t secret_len;
        uint32_t heartbeat_ms, heartbeat_misses, handshake_timeout_ms, max_frame;
        size_t send_queue_limit;
        char *peer_name;
        char down_reason[512];
        bool down_by_peer; /* the peer's ERROR frame took the link down */

        LinkListener *listener; /* while counted against listener->max_pending */
        Link *listener_next;
        char peer_host[INET6_ADDRSTRLEN]; /* standby: the source address, for the per-source cap */
        uint64_t accepted_usec;           /* standby: when accepted (the handshake deadline runs from it) */
        bool rx_any;                      /* a byte arrived */
        bool preauth_dropped;             /* closed by the pre-authentication limits (link.h) */

        /* TLS (NULL: plaintext). Under link_tls_lock(): every SSL_* call on ssl, tls_up, tls_failed.
         * A ticket lock: tls_next is the next ticket, tls_serving the one that holds it. */
        SSL *ssl;
        pthread_mutex_t tls_mutex;
        pthread_cond_t tls_cond;
        uint64_t tls_next, tls_serving;
        bool tls_up;                     /* handshake done: records may flow, close_notify may be sent */
        bool tls_failed;                 /* a fatal TLS error: no SSL_shutdown() any more */
        bool tls_peeked;                 /* loop thread: the first bytes were checked for plaintext frames */
        bool tls_read_wants_write;       /* loop thread: SSL_read() needs the socket writable */
        bool tls_pending;                /* loop thread: decrypted or buffered bytes wait inside ssl */
        sd_event_source *rx_more_source; /* TLS: reads on for what ssl holds (epoll cannot see it) */
        uint8_t *tls_txbuf;              /* writer: small frames gathered into one record */

        int fd, wake_fd, stop_fd;
        sd_event_source *io_source, *wake_source, *deadline_source, *heartbeat_source, *connect_fail_source;
        int connect_error;
        uint64_t last_rx_usec;
        uint64_t peer_loop_beats, peer_loop_usec; /* the peer loop's last progress, and when seen */
        _Atomic uint64_t patience_usec;           /* link_set_patience(); any thread */

        /* Reader. */
        uint8_t rx_header[FRAME_HEADER_SIZE];
        size_t rx_header_got;
        bool rx_have_header;
        FrameHeader rx_frame;
        uint8_t *rx_payload;
        size_t rx_payload_cap, rx_payload_got;
        uint8_t *rx_buf; /* RX_BUFFER_BYTES */

        /* Per-frame MACs (link-mac.h). rx_mac: loop thread, set once the peer's next frames are
         * keyed. tx_mac: set under `mutex` by the loop thread (frames queued from then on are
         * sealed), used by the writer only; tx_seq is the writer's. */
        LinkMac *rx_mac, *tx_mac;
        uint64_t rx_seq, tx_seq;
        uint8_t rx_trailer[LINK_MAC_TRAILER_BYTES];
        size_t rx_trailer_got;
        LinkMac *rx_pending_mac; /* standby: the receive key between CHALLENGE and AUTH */
        /* TLS channel binding (the exporter), empty in plaintext; in the proofs and the keys. */
        uint8_t binding[LINK_BINDING_MAX];
        size_t binding_len;

        /* Handshake. */
        uint8_t nonce_local[NONCE_BYTES], nonce_peer[NONCE_BYTES];
        char *vm_name;
        uint8_t vm_uuid[UUID_BYTES];
        uint8_t session[SESSION_BYTES];
        bool have_session;
        uint8_t *hello_payload; /* primary: the packed Hello, sent once connected */
        size_t hello_len;

        /* Writer and queue: everything below is under `mutex`. */
        pthread_t writer;
        bool writer_started;
        pthread_mutex_t mutex;
        pthread_cond_t cond_work;  /* writer: queue non-empty, closing or stop */
        pthread_cond_t cond_space; /* senders: space or down; link_free: a waiter left */
        TxFrame *q_head, **q_tail;
        size_t queued_bytes; /* includes the batch the writer is sending */
        bool accepting;      /* link_send() allowed: up and not down */
        bool closing;        /* down: writer drains (a final ERROR), shuts the write side, exits */
        bool stop;           /* link_free(): writer exits now */
        int write_error;
        unsigned n_waiters;
        LinkStats stats;
        /* Heartbeats: the loop refreshes hb (content and loop_beats) every
         * heartbeat_ms; the writer sends it when hb_next (CLOCK_MONOTONIC) is due. */
        bool hb_on;
        uint64_t hb_next, hb_seq;
        Dr__Repl__Heartbeat hb;
};

/* Takes the link down with an ERROR to the peer; evaluates to code. */
#define PROTO_FAIL(l, code, ...)                                                                            \
        ({                                                                                                  \
                link_down((l), (code), true, __VA_ARGS__);                                                  \
                (code);                                                                                     \
        })

/* link.c: the state machine (loop thread). */
/* Takes the link down once (a no-op when it is down): stops reading and the timers, drops the
 * queue, with tell_peer sends a last ERROR{error, reason}, calls on_down. error < 0. */
_printf_(4, 5) void link_down(Link *l, int error, bool tell_peer, const char *fmt, ...);
/* An ERROR{code, message} frame, packed and with its header; NULL on failure (out of memory). */
TxFrame *link_error_frame(Link *l, int code, const char *message);
/* Loop thread: keeps the memory of l alive while a handler runs (link_free() may be called in it). */
Link *link_ref(Link *l);
void link_unref(Link *l);
DEFINE_TRIVIAL_CLEANUP_FUNC_VOID(Link *, link_unref);
/* The handshake is over (welcome: the standby's, on the primary; NULL on the standby): starts
 * heartbeats and the liveness watch, lets senders in, calls on_up. 0 or negative (link down). */
int link_go_up(Link *l, const Dr__Repl__Welcome *welcome);
/* A complete, checked frame: to the handler its type and the step allow, or the link goes down. */
int link_dispatch(Link *l, uint16_t type, const uint8_t *payload, size_t len);
/* Reads what the socket (or OpenSSL) has, within the dispatch budget, and feeds the parser. */
void link_read(Link *l);
void link_socket_tune(int fd);
/* The address without the port ("?" for other families): what the per-source limit counts. */
void link_format_host(const struct sockaddr *sa, socklen_t len, char *buf, size_t size);
/* "ADDR:PORT" or "[V6]:PORT", for messages. */
void link_format_sockaddr(const struct sockaddr *sa, socklen_t len, char *buf, size_t size);

/* link-frame.c: the parser (loop thread). */
const char *link_frame_type_name(uint16_t type);
/* The frame in rx_header/rx_payload/rx_trailer is all there: checks CRC, sequence and MAC, then
 * dispatches it. 0, or negative when the link went down. */
int link_frame_complete(Link *l);
/* Consumes len bytes of stream. 0 when all were consumed, negative when the link went down. */
int link_feed(Link *l, const uint8_t *data, size_t len);

/* link-handshake.c (loop thread). Each handler returns 0 or negative (the link is then down). */
int link_handle_hello(Link *l, const uint8_t *payload, size_t len);
int link_handle_challenge(Link *l, const uint8_t *payload, size_t len);
int link_handle_auth(Link *l, const uint8_t *payload, size_t len);
int link_handle_welcome(Link *l, const uint8_t *payload, size_t len);
/* Primary: queues its HELLO, the first frame once the connection (and TLS) is up. */
int link_queue_hello(Link *l);

/* link-transport.c: plaintext or TLS. */
/* Attaches fd (not owned) to ssl through a socket BIO that writes with MSG_NOSIGNAL. */
int link_tls_set_fd(SSL *ssl, int fd);
/* The TLS lock (FIFO) around every call into l->ssl, by either thread; never held while waiting. */
void link_tls_lock(Link *l);
void link_tls_unlock(Link *l);
/* Loop thread: >0 bytes, 0 at the end of the stream, -EAGAIN, -EINTR or another negative errno;
 * with TLS, a failure leaves its message in why. */
ssize_t link_transport_recv(Link *l, void *buf, size_t len, char *why, size_t why_size);
/* Writer thread: bytes of iov[0..n) sent, or negative; on -EAGAIN *ret_events says what to wait for. */
ssize_t link_transport_sendv(Link *l, const struct iovec *iov, size_t n, short *ret_events);
/* Writer thread, at the end: close_notify with TLS (best effort). */
void link_transport_close_notify(Link *l);
/* Loop thread: one step of the TLS handshake each time the socket allows; then HELLO or its wait. */
void link_tls_handshake(Link *l);

/* link-writer.c: the send queue (any thread, under `mutex`) and the writer thread. */
/* A frame with room for payload_len bytes after the header and for a MAC trailer; NULL: ENOMEM. */
TxFrame *txframe_new(size_t payload_len);
void txframe_free_list(TxFrame *f);
/* Under `mutex`, as f is queued: once this side's frames are keyed, f gets a trailer. */
void txframe_mark_locked(Link *l, TxFrame *f);
/* Builds f's header and appends it (takes f in every case). internal: the Link's own frames,
 * which bypass the limit and the "up" check. 0, -ENOTCONN, -EAGAIN (!block and full). */
int link_queue(Link *l, uint16_t type, TxFrame *f, bool block, bool internal);
/* Packs m into a new TxFrame (no header yet). 0, -EMSGSIZE, -ENOMEM, -EIO. */
int link_pack(Link *l, const ProtobufCMessage *m, TxFrame **ret);
/* Loop thread: packs and queues a handshake frame, never blocking. */
int link_send_internal(Link *l, uint16_t type, const ProtobufCMessage *m);
/* The writer thread's body (userdata: the Link). */
void *link_writer_main(void *userdata);

/* link-listener.c (loop thread). */
/* l stops counting against its listener's pending handshakes (no-op without one). */
void link_listener_release(Link *l);
/* A stranger from host was dropped before authenticating: counted, and one rate-limited warning. */
void link_listener_note_drop(LinkListener *ll, const char *host, const char *why);

/*
 * Feeds len bytes to the Link's frame parser exactly as if they had been read
 * from its socket (same checks, same dispatch, same callbacks). Returns 0 when
 * all were consumed, a negative errno once the link is down. For the fuzzer.
 */
int link_feed_for_fuzzing(Link *l, const void *data, size_t len);

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The replication link (link.h). Three parties touch a Link:
 *
 *  - the sd-event thread owns everything except the send queue: the socket's
 *    read side, the parser, the state machine, the timers and all callbacks;
 *  - the writer thread owns the socket's write side and drains the queue;
 *  - any thread may call link_send*(), which only touches the queue.
 *
 * The queue (and the counters next to it) is protected by `mutex`. The writer
 * never calls back: a write error is stored in `write_error` and signalled
 * through `wake_fd` (an eventfd on the loop), whose handler takes the link
 * down. link_free() stops the writer through `stop_fd`, so a writer stuck on
 * a stalled peer wakes up at once.
 *
 * Handshake (proto/replication.proto):
 *
 *   standby: WAIT_HELLO --Hello--> WAIT_AUTH --Auth ok--> UP (sends Challenge, then Welcome)
 *   primary: (connect) --> WAIT_CHALLENGE --Challenge ok--> WAIT_WELCOME --Welcome--> UP (sends Hello, Auth)
 *
 * With TLS, both sides first run the TLS handshake (STEP_TLS) and only then
 * the above, inside it. The SSL object is used by the loop thread (handshake,
 * reads) and the writer (writes, the final close_notify), never at the same
 * time: every call into it holds the TLS lock (tls_lock(): first come, first
 * served, so a reader decrypting a full sync cannot starve the writer's
 * heartbeats, or the other way round, as an unfair mutex can), which is never held while
 * waiting. The plaintext path takes none of this.
 *
 * Any other frame before UP is -EPROTO; ERROR is accepted in every state.
 * Frames are limited to HANDSHAKE_MAX_FRAME until UP, so a stranger cannot
 * make the standby allocate max_frame bytes per connection.
 */
#include <arpa/inet.h>
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/uio.h>
#include <unistd.h>

#include "frame.h"
#include "link-internal.h"
#include "link-mac.h"
#include "link.h"
#include "log.h"
#include "tls.h"
#include "util.h"

#define NONCE_BYTES               32u
#define PROOF_BYTES               32u
#define UUID_BYTES                16u
#define SESSION_BYTES             16u
#define VM_NAME_MAX               255u
#define HANDSHAKE_MAX_FRAME       (64u * 1024u)
#define SOCKET_BUFFER_BYTES       (4 * 1024 * 1024)
#define RX_BUFFER_BYTES           (64u * 1024u)
#define RX_READS_PER_DISPATCH     16u
#define RX_TLS_READS_PER_DISPATCH 64u    /* a TLS read returns one record, at most 16 KiB */
#define TLS_RECORD_MAX            16384u /* plaintext bytes per TLS record */
/* Work one dispatch may do before the loop gets back to its timers. Reads
 * are counted in wire bytes, but a compressed PAGES frame of 16 KiB can
 * expand to 1 MiB of pages to apply: 16 reads of LZ4'd zero-tailed pages
 * once took the standby's loop past the peer's 200 ms liveness window, and
 * its heartbeats were not sent (the full-sync link flap). */
#define RX_DISPATCH_BUDGET_USEC 2000u
#define LOOP_STALL_FACTOR       5u
#define LOOP_STALL_MIN_USEC     (2u * USEC_PER_SEC)
#define TX_IOV_MAX              64u
#define PEER_MESSAGE_MAX        200u
#define LISTEN_BACKLOG          64
#define TIMER_ACCURACY_USEC     1000u

#define DEFAULT_HEARTBEAT_MS 50u
#define DEFAULT_MISSES       4u
#define DEFAULT_HANDSHAKE_MS 5000u
/* Pre-authentication limits of a listener (see link.h). A stranger that sends nothing is closed
 * after FIRST_BYTES_MS; at most MAX_PER_SOURCE connections of one address are in handshake; the
 * warning about dropped strangers is logged at most once per WARN_INTERVAL. */
#define FIRST_BYTES_MS              1000u
#define LISTENER_MAX_PER_SOURCE     2u
#define LISTENER_WARN_INTERVAL_USEC (10u * USEC_PER_SEC)
#define DEFAULT_QUEUE_LIMIT         ((size_t) 32 << 20)

static void protobuf_c_message_freep(ProtobufCMessage **m)
{
        if (*m)
                protobuf_c_message_free_unpacked(*m, NULL);
}

static const char LABEL_STANDBY[] = "dirtyrep-standby";
static const char LABEL_PRIMARY[] = "dirtyrep-primary";

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

        /* TLS (NULL: plaintext). Under tls_lock(): every SSL_* call on ssl, tls_up, tls_failed.
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

static const char *frame_type_name(uint16_t type)
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

static void link_set_state(Link *l, LinkState s)
{
        /* Relaxed: link_state() from another thread is advisory; the queue's
         * own flags (under mutex) decide what link_send() does. */
        __atomic_store_n(&l->state, s, __ATOMIC_RELAXED);
}

LinkState link_state(const Link *l)
{
        return __atomic_load_n(&l->state, __ATOMIC_RELAXED);
}

bool link_down_by_peer(const Link *l)
{
        return l->down_by_peer;
}

bool link_preauth_dropped(const Link *l)
{
        return l->preauth_dropped;
}

const char *link_peer_name(const Link *l)
{
        return l->peer_name;
}

const uint8_t *link_peer_session(const Link *l)
{
        return l->have_session ? l->session : NULL;
}

void link_get_stats(const Link *l, LinkStats *ret)
{
        Link *m = (Link *) l; /* the mutex is not part of the logical state */

        pthread_mutex_lock(&m->mutex);
        *ret = m->stats;
        ret->queued_bytes = m->queued_bytes;
        pthread_mutex_unlock(&m->mutex);
}

int link_wait_sent(Link *l, uint64_t timeout_usec)
{
        struct timespec ts;
        uint64_t deadline;
        int r = 0;

        if (!l)
                return 0;
        /* cond_space runs on CLOCK_REALTIME (link_new()): the writer broadcasts it
         * whenever frames leave the queue, and on a write error or stop. */
        clock_gettime(CLOCK_REALTIME, &ts);
        deadline = (uint64_t) ts.tv_sec * USEC_PER_SEC + (uint64_t) ts.tv_nsec / 1000 + timeout_usec;
        ts.tv_sec = (time_t) (deadline / USEC_PER_SEC);
        ts.tv_nsec = (long) (deadline % USEC_PER_SEC) * 1000L;
        pthread_mutex_lock(&l->mutex);
        while (l->queued_bytes > 0) {
                if (!l->writer_started || l->stop || l->write_error < 0) {
                        r = -ENOTCONN; /* nobody will send the rest */
                        break;
                }
                if (pthread_cond_timedwait(&l->cond_space, &l->mutex, &ts) == ETIMEDOUT) {
                        r = l->queued_bytes > 0 ? -ETIMEDOUT : 0;
                        break;
                }
        }
        pthread_mutex_unlock(&l->mutex);
        return r;
}

int link_proof(const uint8_t *secret, size_t secret_len, const char *label, const uint8_t *nonce_a,
               const uint8_t *nonce_b, const char *vm_name, const uint8_t *vm_uuid, const uint8_t *binding,
               size_t binding_len, uint8_t out[32])
{
        _cleanup_free_ uint8_t *buf = NULL;
        size_t label_len, name_len, n = 0;
        unsigned out_len = 0;

        if (!secret || secret_len == 0 || secret_len > INT_MAX || !label || !nonce_a || !nonce_b ||
            !vm_name || !vm_uuid || binding_len > LINK_BINDING_MAX || (binding_len > 0 && !binding))
                return -EINVAL;
        label_len = strlen(label);
        name_len = strlen(vm_name);
        if (label_len > 64 || name_len > VM_NAME_MAX)
                return -EINVAL;

        buf = malloc(6 * 4 + label_len + 2 * NONCE_BYTES + name_len + UUID_BYTES + binding_len);
        if (!buf)
                return -ENOMEM;
#define APPEND(p, len)                                                                                      \
        do {                                                                                                \
                put_le32(buf + n, (uint32_t) (len));                                                        \
                if ((len) > 0)                                                                              \
                        memcpy(buf + n + 4, (p), (len));                                                    \
                n += 4 + (len);                                                                             \
        } while (0)
        APPEND(label, label_len);
        APPEND(nonce_a, NONCE_BYTES);
        APPEND(nonce_b, NONCE_BYTES);
        APPEND(vm_name, name_len);
        APPEND(vm_uuid, UUID_BYTES);
        APPEND(binding, binding_len);
#undef APPEND

        if (!HMAC(EVP_sha256(), secret, (int) secret_len, buf, n, out, &out_len) || out_len != PROOF_BYTES)
                return -EIO;
        return 0;
}

/* ---- transport: plaintext or TLS ------------------------------------------------------ */

/* OpenSSL's socket BIO writes with write(): a peer that closed would raise SIGPIPE in
 * whichever thread wrote (the daemon blocks it, a program linking the Link may not). This
 * BIO is the socket BIO with send(MSG_NOSIGNAL) for writes. */
static BIO_METHOD *nosigpipe_method;

static int nosigpipe_write(BIO *b, const char *in, int inl)
{
        int fd = -1, n;

        if (BIO_get_fd(b, &fd) < 0 || fd < 0)
                return -1;
        errno = 0;
        n = (int) send(fd, in, (size_t) inl, MSG_NOSIGNAL | MSG_DONTWAIT);
        BIO_clear_retry_flags(b);
        if (n <= 0 && BIO_sock_should_retry(n))
                BIO_set_retry_write(b);
        return n;
}

static void nosigpipe_init(void)
{
        const BIO_METHOD *sock = BIO_s_socket();
        BIO_METHOD *m = BIO_meth_new(BIO_TYPE_SOCKET, "dirtyrep socket");

        if (!m)
                return;
        if (BIO_meth_set_write(m, nosigpipe_write) != 1 ||
            BIO_meth_set_read(m, BIO_meth_get_read(sock)) != 1 ||
            BIO_meth_set_puts(m, BIO_meth_get_puts(sock)) != 1 ||
            BIO_meth_set_ctrl(m, BIO_meth_get_ctrl(sock)) != 1 ||
            BIO_meth_set_create(m, BIO_meth_get_create(sock)) != 1 ||
            BIO_meth_set_destroy(m, BIO_meth_get_destroy(sock)) != 1) {
                BIO_meth_free(m);
                return;
        }
        nosigpipe_method = m;
}

/* Attaches fd (not owned) to ssl through the no-SIGPIPE socket BIO. */
static int tls_set_fd(SSL *ssl, int fd)
{
        static pthread_once_t once = PTHREAD_ONCE_INIT;
        BIO *b;

        pthread_once(&once, nosigpipe_init);
        if (!nosigpipe_method)
                return -ENOMEM;
        b = BIO_new(nosigpipe_method);
        if (!b)
                return -ENOMEM;
        BIO_set_fd(b, fd, BIO_NOCLOSE);
        SSL_set_bio(ssl, b, b);
        return 0;
}

/* The TLS lock: FIFO between the loop thread and the writer. A plain mutex lets the thread
 * that just unlocked take it again before the woken one runs, and on a loaded host a reader
 * busy with a full sync kept the writer (and with it the heartbeats) out for long. */
static void tls_lock(Link *l)
{
        uint64_t ticket;

        pthread_mutex_lock(&l->tls_mutex);
        ticket = l->tls_next++;
        while (ticket != l->tls_serving)
                pthread_cond_wait(&l->tls_cond, &l->tls_mutex);
        pthread_mutex_unlock(&l->tls_mutex);
}

static void tls_unlock(Link *l)
{
        pthread_mutex_lock(&l->tls_mutex);
        l->tls_serving++;
        if (l->tls_next != l->tls_serving) /* someone waits */
                pthread_cond_broadcast(&l->tls_cond);
        pthread_mutex_unlock(&l->tls_mutex);
}

/*
 * A TLS failure as a negative errno and a message that names the peer.
 * Called with the TLS lock held, right after the failed call (the error queue
 * is per thread). `up`: after the TLS handshake (record errors there are
 * corruption, -EBADMSG, as a CRC mismatch is in plaintext).
 */
static int tls_explain(Link *l, bool up, char *buf, size_t size)
{
        unsigned long e = ERR_peek_last_error();
        int reason = e ? ERR_GET_REASON(e) : 0;
        const char *what = e ? ERR_reason_error_string(e) : NULL;

        what = what ?: "TLS error";
        if (reason == SSL_R_CERTIFICATE_VERIFY_FAILED) {
                long v = SSL_get_verify_result(l->ssl);
                snprintf(buf, size, "the certificate of %s was refused: %s", l->peer_name,
                         v != X509_V_OK ? X509_verify_cert_error_string(v) : what);
                return -EKEYREJECTED;
        }
        if (reason == SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE) {
                snprintf(buf, size, "%s presented no TLS certificate", l->peer_name);
                return -EKEYREJECTED;
        }
        if (reason > SSL_AD_REASON_OFFSET) {
                /* An alert the peer sent: name it, and say what the usual ones mean here. */
                switch (reason - SSL_AD_REASON_OFFSET) {
                case SSL_AD_BAD_CERTIFICATE:
                case SSL_AD_UNSUPPORTED_CERTIFICATE:
                case SSL_AD_CERTIFICATE_REVOKED:
                case SSL_AD_CERTIFICATE_EXPIRED:
                case SSL_AD_CERTIFICATE_UNKNOWN:
                case SSL_AD_UNKNOWN_CA:
                case SSL_AD_ACCESS_DENIED:
                case SSL_AD_CERTIFICATE_REQUIRED:
                        snprintf(buf, size, "%s refused this side's TLS certificate (its alert: %s)",
                                 l->peer_name, what);
                        return -EKEYREJECTED;
                case SSL_AD_PROTOCOL_VERSION:
                        snprintf(buf, size, "%s offers no TLS 1.3 (its alert: %s)", l->peer_name, what);
                        return -EPROTO;
                default:
                        snprintf(buf, size, "%s sent the TLS alert: %s", l->peer_name, what);
                        return up ? -EBADMSG : -EPROTO;
                }
        }
        if (reason == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
                snprintf(buf, size, "%s closed the connection during the TLS handshake", l->peer_name);
                return -ECONNRESET;
        }
        if (!up && (reason == SSL_R_WRONG_VERSION_NUMBER || reason == SSL_R_PACKET_LENGTH_TOO_LONG)) {
                snprintf(buf, size, "%s does not speak TLS (%s)", l->peer_name, what);
                return -EPROTO;
        }
        snprintf(buf, size, "TLS error with %s: %s", l->peer_name, what);
        return up ? -EBADMSG : -EPROTO;
}

/*
 * Loop thread: up to len bytes of the stream. >0 bytes, 0 at its end,
 * -EAGAIN, -EINTR, or another negative errno; with TLS, a failure leaves its
 * message in `why` (empty otherwise).
 */
static ssize_t transport_recv(Link *l, void *buf, size_t len, char *why, size_t why_size)
{
        size_t got = 0;
        int err, saved_errno;
        ssize_t r;

        if (!l->ssl) {
                ssize_t n = recv(l->fd, buf, len, MSG_DONTWAIT);
                return n < 0 ? -errno : n;
        }

        tls_lock(l);
        ERR_clear_error();
        errno = 0;
        err = SSL_read_ex(l->ssl, buf, len, &got) == 1 ? SSL_ERROR_NONE : SSL_get_error(l->ssl, 0);
        saved_errno = errno;
        switch (err) {
        case SSL_ERROR_NONE:
                r = (ssize_t) got;
                break;
        case SSL_ERROR_WANT_READ:
        case SSL_ERROR_WANT_WRITE:
                r = -EAGAIN;
                break;
        case SSL_ERROR_ZERO_RETURN: /* close_notify: the end of the stream, as a FIN is in plaintext */
                r = 0;
                break;
        case SSL_ERROR_SYSCALL:
                l->tls_failed = true;
                r = saved_errno > 0 ? -saved_errno : 0;
                break;
        default:
                l->tls_failed = true;
                if (ERR_GET_REASON(ERR_peek_last_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING)
                        r = 0; /* a FIN without close_notify: to the Link, a closed connection */
                else
                        r = tls_explain(l, l->state == LINK_UP, why, why_size);
                break;
        }
        l->tls_pending = SSL_has_pending(l->ssl);
        tls_unlock(l);
        l->tls_read_wants_write = err == SSL_ERROR_WANT_WRITE;
        return r;
}

/* Writer thread, TLS: one record's worth. Small frames (headers, heartbeats, acks) are gathered
 * into one record; a large one goes from where it is. A retry after -EAGAIN passes the same bytes
 * again (the batch has not moved), as SSL_write() requires. */
static ssize_t tls_sendv(Link *l, const struct iovec *iov, size_t n, short *ret_events)
{
        const void *p = iov[0].iov_base;
        size_t len = iov[0].iov_len, written = 0;
        int err, saved_errno;

        if (len < TLS_RECORD_MAX && n > 1) {
                len = 0;
                for (size_t i = 0; i < n && len < TLS_RECORD_MAX; i++) {
                        size_t k = MIN(iov[i].iov_len, TLS_RECORD_MAX - len);
                        memcpy(l->tls_txbuf + len, iov[i].iov_base, k);
                        len += k;
                }
                p = l->tls_txbuf;
        }

        tls_lock(l);
        ERR_clear_error();
        errno = 0;
        err = SSL_write_ex(l->ssl, p, len, &written) == 1 ? SSL_ERROR_NONE : SSL_get_error(l->ssl, 0);
        saved_errno = errno;
        if (err == SSL_ERROR_SSL || err == SSL_ERROR_SYSCALL)
                l->tls_failed = true;
        tls_unlock(l);

        switch (err) {
        case SSL_ERROR_NONE:
                return (ssize_t) written;
        case SSL_ERROR_WANT_WRITE:
                return -EAGAIN;
        case SSL_ERROR_WANT_READ: /* not in TLS 1.3 after the handshake; waits on the reader */
                *ret_events = POLLIN;
                return -EAGAIN;
        case SSL_ERROR_SYSCALL:
                return saved_errno > 0 ? -saved_errno : -EPIPE;
        default:
                return -EPROTO;
        }
}

/* Writer thread: bytes of iov[0..n) sent (>0), or a negative errno; on -EAGAIN *ret_events
 * says what to wait for. */
static ssize_t transport_sendv(Link *l, const struct iovec *iov, size_t n, short *ret_events)
{
        *ret_events = POLLOUT;
        if (!l->ssl) {
                struct msghdr mh = {.msg_iov = (struct iovec *) iov, .msg_iovlen = n};
                ssize_t sent = sendmsg(l->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
                return sent < 0 ? -errno : sent;
        }
        return tls_sendv(l, iov, n, ret_events);
}

/* Writer thread, at the end: TLS says goodbye with close_notify (best effort, non-blocking). */
static void transport_close_notify(Link *l)
{
        if (!l->ssl)
                return;
        tls_lock(l);
        if (l->tls_up && !l->tls_failed) {
                ERR_clear_error();
                (void) SSL_shutdown(l->ssl);
                ERR_clear_error();
        }
        tls_unlock(l);
}

/* ---- send queue (any thread) ---------------------------------------------------------- */

static TxFrame *txframe_new(size_t payload_len)
{
        TxFrame *f = malloc(sizeof(TxFrame) + FRAME_HEADER_SIZE + payload_len + LINK_MAC_TRAILER_BYTES);
        if (!f)
                return NULL;
        f->next = NULL;
        f->mac = f->sealed = false;
        f->len = FRAME_HEADER_SIZE + payload_len;
        return f;
}

static void txframe_free_list(TxFrame *f)
{
        while (f) {
                TxFrame *next = f->next;
                free(f);
                f = next;
        }
}

/* Under `mutex`, as f is queued: once this side's frames are keyed, f gets a trailer. The order
 * of the queue is the order of the sequence numbers the writer gives them. */
static void txframe_mark_locked(Link *l, TxFrame *f)
{
        if (l->tx_mac && !f->mac) {
                f->mac = true;
                f->len += LINK_MAC_TRAILER_BYTES;
        }
}

/*
 * Seals f (builds its header over the payload already in place) and appends
 * it. Takes ownership of f in every case. `internal` frames (handshake,
 * heartbeats are not) bypass the limit and the "up" check: the Link sends
 * them itself, on the loop thread, and must never block there.
 */
static int link_queue(Link *l, uint16_t type, TxFrame *f, bool block, bool internal)
{
        int r;

        /* The CRC over up to max_frame bytes is computed outside the lock. */
        frame_header_build(f->data, type, f->data + FRAME_HEADER_SIZE,
                           (uint32_t) (f->len - FRAME_HEADER_SIZE));

        pthread_mutex_lock(&l->mutex);
        for (;;) {
                if (l->closing || l->stop || (!internal && !l->accepting)) {
                        r = -ENOTCONN;
                        break;
                }
                /* An empty queue takes any frame, so a frame larger than the
                 * limit cannot wait forever; memory stays below limit + one frame. */
                if (internal || l->queued_bytes == 0 || l->queued_bytes + f->len <= l->send_queue_limit) {
                        r = 0;
                        break;
                }
                if (!block) {
                        r = -EAGAIN;
                        break;
                }
                l->n_waiters++;
                pthread_cond_wait(&l->cond_space, &l->mutex);
                l->n_waiters--;
                if (l->stop && l->n_waiters == 0)
                        pthread_cond_broadcast(&l->cond_space); /* link_free() waits for this */
        }
        if (r == 0) {
                txframe_mark_locked(l, f);
                *l->q_tail = f;
                l->q_tail = &f->next;
                l->queued_bytes += f->len;
                l->stats.queue_high_water = MAX(l->stats.queue_high_water, l->queued_bytes);
                if (type == DR__REPL__FRAME_TYPE__FRAME_HEARTBEAT)
                        l->stats.heartbeats_sent++;
                pthread_cond_signal(&l->cond_work);
                f = NULL;
        }
        pthread_mutex_unlock(&l->mutex);
        free(f);
        return r;
}

int link_send(Link *l, uint16_t type, const void *payload, size_t len, bool block)
{
        TxFrame *f;

        if (!l || (len > 0 && !payload))
                return -EINVAL;
        if (len > l->max_frame)
                return -EMSGSIZE;
        f = txframe_new(len);
        if (!f)
                return -ENOMEM;
        if (len > 0)
                memcpy(f->data + FRAME_HEADER_SIZE, payload, len);
        return link_queue(l, type, f, block, false);
}

static int link_pack(Link *l, const ProtobufCMessage *m, TxFrame **ret)
{
        size_t len = protobuf_c_message_get_packed_size(m);
        TxFrame *f;

        if (len > l->max_frame)
                return -EMSGSIZE;
        f = txframe_new(len);
        if (!f)
                return -ENOMEM;
        if (protobuf_c_message_pack(m, f->data + FRAME_HEADER_SIZE) != len) {
                free(f);
                return -EIO;
        }
        *ret = f;
        return 0;
}

int link_send_message(Link *l, uint16_t type, const ProtobufCMessage *m, bool block)
{
        TxFrame *f;
        int r;

        if (!l || !m)
                return -EINVAL;
        r = link_pack(l, m, &f);
        if (r < 0)
                return r;
        return link_queue(l, type, f, block, false);
}

static int link_send_internal(Link *l, uint16_t type, const ProtobufCMessage *m)
{
        TxFrame *f;
        int r = link_pack(l, m, &f);
        if (r < 0)
                return r;
        return link_queue(l, type, f, false, true);
}

/* ---- writer thread -------------------------------------------------------------------- */

/* Waits until the socket is writable (or, for TLS, `events` says readable: then the reader, not this
 * thread, consumes the input, so it only waits a moment). -ECANCELED when link_free() asks the
 * writer to stop. */
static int writer_wait(Link *l, short events)
{
        struct pollfd p[2] = {
                {.fd = l->fd, .events = events},
                {.fd = l->stop_fd, .events = POLLIN},
        };

        for (;;) {
                if (poll(p, 2, events == POLLOUT ? -1 : 1) < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (p[1].revents)
                        return -ECANCELED;
                return 0; /* writable, or an error the next sendmsg() reports */
        }
}

/*
 * Writer thread: the trailer of a keyed frame, once, just before it is first handed to the
 * socket. Frames are sealed in queue order (the sequence numbers the peer expects), each when
 * the writer reaches it, so a batch of large frames is not all MACed before the first byte
 * leaves; the MAC is computed here, not under the lock and not on the thread that queued it.
 */
static int writer_seal(Link *l, TxFrame *f)
{
        size_t payload_len;
        int r;

        if (!f->mac || f->sealed)
                return 0;
        payload_len = f->len - FRAME_HEADER_SIZE - LINK_MAC_TRAILER_BYTES;
        r = link_mac_seal(l->tx_mac, l->tx_seq, f->data, f->data + FRAME_HEADER_SIZE, payload_len,
                          f->data + FRAME_HEADER_SIZE + payload_len);
        if (r < 0)
                return r;
        f->sealed = true;
        l->tx_seq++;
        return 0;
}

/* Sends a private list of frames; frees them. 0 or negative errno. */
static int writer_send_batch(Link *l, TxFrame *batch)
{
        size_t off = 0; /* bytes of batch's first frame already sent */
        int r = 0;

        while (batch) {
                struct iovec iov[TX_IOV_MAX];
                size_t n = 0, done_bytes = 0, k, gathered;
                uint64_t done_frames = 0;
                short events;
                ssize_t sent;

                r = writer_seal(l, batch);
                if (r < 0)
                        break;
                iov[n++] = (struct iovec){batch->data + off, batch->len - off};
                gathered = batch->len - off;
                /* Gather what one sendmsg() can take (about the socket buffer), sealing as we go. */
                for (TxFrame *f = batch->next;
                     f && n < TX_IOV_MAX && gathered < (size_t) SOCKET_BUFFER_BYTES; f = f->next) {
                        r = writer_seal(l, f);
                        if (r < 0)
                                break;
                        iov[n++] = (struct iovec){f->data, f->len};
                        gathered += f->len;
                }
                if (r < 0)
                        break;

                sent = transport_sendv(l, iov, n, &events);
                if (sent < 0) {
                        if (sent == -EINTR)
                                continue;
                        if (sent == -EAGAIN) {
                                r = writer_wait(l, events);
                                if (r < 0)
                                        break;
                                continue;
                        }
                        r = (int) sent;
                        break;
                }

                for (k = (size_t) sent; batch && k >= batch->len - off;) {
                        TxFrame *next = batch->next;
                        k -= batch->len - off;
                        done_bytes += batch->len;
                        done_frames++;
                        free(batch);
                        batch = next;
                        off = 0;
                }
                off += k;

                pthread_mutex_lock(&l->mutex);
                l->queued_bytes -= done_bytes;
                l->stats.frames_sent += done_frames;
                l->stats.bytes_sent += (uint64_t) sent;
                if (done_frames > 0)
                        pthread_cond_broadcast(&l->cond_space);
                pthread_mutex_unlock(&l->mutex);
        }

        if (batch) {
                size_t left = 0;
                for (TxFrame *f = batch; f; f = f->next)
                        left += f->len;
                txframe_free_list(batch);
                pthread_mutex_lock(&l->mutex);
                l->queued_bytes -= left;
                pthread_cond_broadcast(&l->cond_space);
                pthread_mutex_unlock(&l->mutex);
        }
        return r;
}

/* Under the mutex: queues a heartbeat when one is due; returns when the next is. */
static uint64_t writer_heartbeat_locked(Link *l)
{
        uint64_t now = now_usec(), interval = (uint64_t) l->heartbeat_ms * USEC_PER_MSEC;
        Dr__Repl__Heartbeat hb;
        size_t len;
        TxFrame *f;

        if (!l->hb_on || !l->accepting || interval == 0)
                return UINT64_MAX;
        if (now < l->hb_next)
                return l->hb_next;
        /* Not a catch-up burst after a stall: one heartbeat, the next one interval later. */
        l->hb_next = now + interval;
        hb = l->hb;
        hb.seq = ++l->hb_seq;
        len = protobuf_c_message_get_packed_size(&hb.base);
        f = txframe_new(len);
        if (!f)
                return l->hb_next; /* out of memory: the peer will notice if it lasts */
        protobuf_c_message_pack(&hb.base, f->data + FRAME_HEADER_SIZE);
        frame_header_build(f->data, DR__REPL__FRAME_TYPE__FRAME_HEARTBEAT, f->data + FRAME_HEADER_SIZE,
                           (uint32_t) len);
        txframe_mark_locked(l, f);
        *l->q_tail = f;
        l->q_tail = &f->next;
        l->queued_bytes += f->len;
        l->stats.queue_high_water = MAX(l->stats.queue_high_water, l->queued_bytes);
        l->stats.heartbeats_sent++;
        return l->hb_next;
}

/*
 * The writer also sends the heartbeats. A thread that sleeps most of the time
 * is scheduled promptly when it wakes, even on a loaded machine, while the
 * loop thread of a daemon busy with a full sync competes for CPU like any
 * busy thread: 200 ms without a heartbeat were common on 2 CPUs (the
 * full-sync link flap). The loop's own liveness still travels in them
 * (loop_beats), checked by the peer over a longer window.
 */
static void *writer_main(void *userdata)
{
        Link *l = userdata;

        pthread_mutex_lock(&l->mutex);
        for (;;) {
                TxFrame *batch;
                int r;

                for (;;) {
                        uint64_t due = writer_heartbeat_locked(l);
                        struct timespec ts;

                        if (l->stop || l->q_head || l->closing)
                                break;
                        if (due == UINT64_MAX) {
                                pthread_cond_wait(&l->cond_work, &l->mutex);
                                continue;
                        }
                        ts.tv_sec = (time_t) (due / USEC_PER_SEC);
                        ts.tv_nsec = (long) (due % USEC_PER_SEC) * 1000L;
                        (void) pthread_cond_timedwait(&l->cond_work, &l->mutex, &ts);
                }
                if (l->stop)
                        break;
                if (!l->q_head) {
                        /* Down and drained (a final ERROR went out): tell the peer. */
                        transport_close_notify(l);
                        (void) shutdown(l->fd, SHUT_WR);
                        break;
                }
                batch = l->q_head;
                l->q_head = NULL;
                l->q_tail = &l->q_head;
                pthread_mutex_unlock(&l->mutex);

                r = writer_send_batch(l, batch);

                pthread_mutex_lock(&l->mutex);
                if (r == -ECANCELED)
                        break;
                if (r < 0) {
                        l->write_error = r;
                        l->accepting = false;
                        pthread_cond_broadcast(&l->cond_space);
                        /* Wakes the loop, which takes the link down (the writer never calls back). */
                        (void) eventfd_write(l->wake_fd, 1);
                        break;
                }
        }
        pthread_mutex_unlock(&l->mutex);
        return NULL;
}

/* ---- going down ----------------------------------------------------------------------- */

static void listener_release(Link *l);
static void listener_note_drop(LinkListener *ll, const char *peer, const char *why);

static TxFrame *error_frame(Link *l, int code, const char *message)
{
        Dr__Repl__Error e = DR__REPL__ERROR__INIT;
        TxFrame *f = NULL;

        e.code = code;
        e.message = (char *) message;
        if (link_pack(l, &e.base, &f) < 0)
                return NULL;
        frame_header_build(f->data, DR__REPL__FRAME_TYPE__FRAME_ERROR, f->data + FRAME_HEADER_SIZE,
                           (uint32_t) (f->len - FRAME_HEADER_SIZE));
        return f;
}

/*
 * Takes the link down once: stops reading and the timers, drops what is
 * still queued, optionally sends a last ERROR{error, reason} to the peer,
 * then lets the writer shut the write side. Calls on_down.
 */
_printf_(4, 5) static void link_down(Link *l, int error, bool tell_peer, const char *fmt, ...)
{
        TxFrame *dropped, *err = NULL;
        va_list ap;

        if (l->state == LINK_DOWN)
                return;
        assert(error < 0);
        if (l->ssl) {
                /* Before the TLS handshake there is no channel for an ERROR frame (OpenSSL sent
                 * its alert), and after a fatal TLS error there is none any more. */
                tls_lock(l);
                if (!l->tls_up || l->tls_failed)
                        tell_peer = false;
                tls_unlock(l);
        }

        va_start(ap, fmt);
        vsnprintf(l->down_reason, sizeof(l->down_reason), fmt, ap);
        va_end(ap);
        link_set_state(l, LINK_DOWN);
        l->step = STEP_NONE;
        listener_release(l);

        sd_event_source *sources[] = {l->io_source, l->deadline_source, l->heartbeat_source,
                                      l->connect_fail_source, l->rx_more_source};
        FOREACH_ARRAY (s, sources, ELEMENTSOF(sources))
                if (*s)
                        (void) sd_event_source_set_enabled(*s, SD_EVENT_OFF);

        if (tell_peer)
                err = error_frame(l, error, l->down_reason);

        pthread_mutex_lock(&l->mutex);
        l->accepting = false;
        dropped = l->q_head;
        for (TxFrame *f = dropped; f; f = f->next)
                l->queued_bytes -= f->len;
        l->q_head = NULL;
        l->q_tail = &l->q_head;
        if (err && l->write_error == 0) {
                txframe_mark_locked(l, err);
                *l->q_tail = err;
                l->q_tail = &err->next;
                l->queued_bytes += err->len;
                err = NULL;
        }
        l->closing = true;
        pthread_cond_signal(&l->cond_work);
        pthread_cond_broadcast(&l->cond_space);
        pthread_mutex_unlock(&l->mutex);
        txframe_free_list(dropped);
        free(err);

        if (l->cb.on_down)
                l->cb.on_down(l, error, l->down_reason, l->userdata);
}

void link_fail(Link *l, int code, const char *fmt, ...)
{
        char msg[sizeof(l->down_reason)];
        va_list ap;

        if (!l)
                return;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
        link_down(l, code < 0 ? code : -EPROTO, true, "%s", msg);
}

/* ---- lifetime ------------------------------------------------------------------------- */

static Link *link_ref(Link *l)
{
        l->n_ref++;
        return l;
}

static void link_release(Link *l)
{
        link_mac_free(l->rx_mac);
        link_mac_free(l->rx_pending_mac);
        link_mac_free(l->tx_mac);
        SSL_free(l->ssl);
        pthread_mutex_destroy(&l->tls_mutex);
        pthread_cond_destroy(&l->tls_cond);
        free(l->tls_txbuf);
        pthread_mutex_destroy(&l->mutex);
        pthread_cond_destroy(&l->cond_work);
        pthread_cond_destroy(&l->cond_space);
        free(l->rx_payload);
        free(l->rx_buf);
        free(l->vm_name);
        free(l->hello_payload);
        free(l->peer_name);
        free(l);
}

static void link_unref(Link *l)
{
        assert(l->n_ref > 0);
        if (--l->n_ref == 0)
                link_release(l);
}
DEFINE_TRIVIAL_CLEANUP_FUNC_VOID(Link *, link_unref);

Link *link_free(Link *l)
{
        if (!l)
                return NULL;
        assert(!l->freed);
        l->freed = true;
        link_set_state(l, LINK_DOWN);
        listener_release(l);

        l->io_source = sd_event_source_disable_unref(l->io_source);
        l->wake_source = sd_event_source_disable_unref(l->wake_source);
        l->deadline_source = sd_event_source_disable_unref(l->deadline_source);
        l->heartbeat_source = sd_event_source_disable_unref(l->heartbeat_source);
        l->connect_fail_source = sd_event_source_disable_unref(l->connect_fail_source);
        l->rx_more_source = sd_event_source_disable_unref(l->rx_more_source);

        pthread_mutex_lock(&l->mutex);
        l->stop = true;
        l->accepting = false;
        pthread_cond_signal(&l->cond_work);
        pthread_cond_broadcast(&l->cond_space);
        pthread_mutex_unlock(&l->mutex);
        if (l->stop_fd >= 0)
                (void) eventfd_write(l->stop_fd, 1); /* a writer in poll() on a stalled peer */
        if (l->writer_started)
                pthread_join(l->writer, NULL);

        /* Blocked senders were woken above; wait until the last one has left
         * the condition variable before it is destroyed. */
        pthread_mutex_lock(&l->mutex);
        while (l->n_waiters > 0)
                pthread_cond_wait(&l->cond_space, &l->mutex);
        txframe_free_list(l->q_head);
        l->q_head = NULL;
        l->q_tail = &l->q_head;
        l->queued_bytes = 0;
        pthread_mutex_unlock(&l->mutex);

        l->fd = safe_close(l->fd);
        l->wake_fd = safe_close(l->wake_fd);
        l->stop_fd = safe_close(l->stop_fd);
        l->event = sd_event_unref(l->event);

        /* Called from inside one of this Link's callbacks the memory lives on
         * until that handler returns (it holds a reference). */
        link_unref(l);
        return NULL;
}

/* ---- timers --------------------------------------------------------------------------- */

static uint64_t loop_now(Link *l)
{
        uint64_t t;
        if (sd_event_now(l->event, CLOCK_MONOTONIC, &t) < 0)
                t = now_usec();
        return t;
}

static uint64_t liveness_window_usec(const Link *l)
{
        return (uint64_t) l->heartbeat_ms * l->heartbeat_misses * USEC_PER_MSEC;
}

/* The silence tolerated before the peer counts as lost: the liveness window,
 * or the patience asked for, whichever is longer. */
static uint64_t silence_window_usec(Link *l)
{
        return MAX(liveness_window_usec(l), atomic_load_explicit(&l->patience_usec, memory_order_relaxed));
}

void link_set_patience(Link *l, uint64_t usec)
{
        if (l)
                atomic_store_explicit(&l->patience_usec, usec, memory_order_relaxed);
}

/* How long the peer's event loop may show no progress in its heartbeats:
 * longer than the liveness window, as a loop busy with bulk input on a loaded
 * machine runs late, but bounded, as a hung loop behind a live writer must
 * not pass for a live peer. */
static uint64_t loop_window_usec(const Link *l)
{
        return MAX(LOOP_STALL_FACTOR * liveness_window_usec(l), LOOP_STALL_MIN_USEC);
}

static int on_deadline(sd_event_source *s, uint64_t usec, void *userdata)
{
        _cleanup_(link_unrefp) Link *l = link_ref(userdata);
        uint64_t rx_due, loop_due;

        if (l->state != LINK_UP) {
                uint64_t hs_end = l->accepted_usec + (uint64_t) l->handshake_timeout_ms * USEC_PER_MSEC;

                if (l->side == LINK_STANDBY && usec < hs_end) {
                        if (!l->rx_any) {
                                /* A connection that says nothing holds a handshake slot for nothing. */
                                l->preauth_dropped = true;
                                listener_note_drop(l->listener, l->peer_host, "it sent nothing within 1 s");
                                link_down(l, -ETIMEDOUT, false, "%s sent nothing within %u ms of connecting",
                                          l->peer_name, FIRST_BYTES_MS);
                                return 0;
                        }
                        (void) sd_event_source_set_time(s, hs_end);
                        (void) sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
                        return 0;
                }
                if (l->side == LINK_STANDBY) {
                        /* A stranger, as far as this side knows: counted, not logged one by one. */
                        l->preauth_dropped = true;
                        listener_note_drop(l->listener, l->peer_host, "its handshake timed out");
                }
                link_down(l, -ETIMEDOUT, true, "handshake with %s timed out after %u ms", l->peer_name,
                          l->handshake_timeout_ms);
                return 0;
        }
        /* This loop ran late by more than a heartbeat: the host did not run us,
         * and likely not the peer either (both daemons on one loaded machine, or
         * a stalled hypervisor). Silence seen while we could not look proves
         * nothing: give the peer two more heartbeats from now. */
        {
                uint64_t now = now_usec(), hb = (uint64_t) l->heartbeat_ms * USEC_PER_MSEC;
                if (now > usec + hb) {
                        log_debug("link %s: liveness check ran %" PRIu64
                                  " ms late; waiting 2 heartbeats more",
                                  l->peer_name, (uint64_t) ((now - usec) / USEC_PER_MSEC));
                        l->last_rx_usec = MAX(l->last_rx_usec, now + 2 * hb - silence_window_usec(l));
                        if (l->peer_loop_usec > 0)
                                l->peer_loop_usec =
                                        MAX(l->peer_loop_usec, now + 2 * hb - loop_window_usec(l));
                }
        }
        if (usec >= l->last_rx_usec + silence_window_usec(l)) {
                /* Bytes waiting in the socket mean the peer is alive and this
                 * loop was late (the timer can dispatch before the read). */
                struct pollfd pfd = {.fd = l->fd, .events = POLLIN};
                if (poll(&pfd, 1, 0) > 0 && (pfd.revents & POLLIN))
                        l->last_rx_usec = usec;
        }
        rx_due = l->last_rx_usec + silence_window_usec(l);
        loop_due = l->peer_loop_usec > 0 ? l->peer_loop_usec + loop_window_usec(l) : UINT64_MAX;
        if (usec >= rx_due) {
                if (silence_window_usec(l) > liveness_window_usec(l))
                        link_down(l, -ETIMEDOUT, true,
                                  "peer %s lost: nothing received for %u ms (patience %u ms)", l->peer_name,
                                  (unsigned) ((usec - l->last_rx_usec) / USEC_PER_MSEC),
                                  (unsigned) (silence_window_usec(l) / USEC_PER_MSEC));
                else
                        link_down(l, -ETIMEDOUT, true,
                                  "peer %s lost: nothing received for %u ms (%u heartbeats of %u ms missed)",
                                  l->peer_name, (unsigned) ((usec - l->last_rx_usec) / USEC_PER_MSEC),
                                  l->heartbeat_misses, l->heartbeat_ms);
                return 0;
        }
        if (usec >= loop_due) {
                link_down(
                        l, -ETIMEDOUT, true,
                        "peer %s lost: its heartbeats arrive, but its event loop made no progress for %u ms",
                        l->peer_name, (unsigned) ((usec - l->peer_loop_usec) / USEC_PER_MSEC));
                return 0;
        }
        /* Something arrived since the timer was armed: move it, do not fire. */
        (void) sd_event_source_set_time(s, MIN(rx_due, loop_due));
        (void) sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
        return 0;
}

/* Refreshes what the writer's heartbeats say; each run is one loop beat. */
static int on_heartbeat_timer(sd_event_source *s, uint64_t usec, void *userdata)
{
        _cleanup_(link_unrefp) Link *l = link_ref(userdata);
        Dr__Repl__Heartbeat hb = DR__REPL__HEARTBEAT__INIT;

        if (l->state != LINK_UP)
                return 0;
        if (l->cb.fill_heartbeat)
                l->cb.fill_heartbeat(l, &hb, l->userdata);
        if (l->freed || l->state != LINK_UP)
                return 0;
        pthread_mutex_lock(&l->mutex);
        hb.has_loop_beats = true;
        hb.loop_beats = l->hb.loop_beats + 1;
        l->hb = hb;
        pthread_mutex_unlock(&l->mutex);

        (void) sd_event_source_set_time(s,
                                        MAX(usec, loop_now(l)) + (uint64_t) l->heartbeat_ms * USEC_PER_MSEC);
        (void) sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
        return 0;
}

/* The handshake is over: start heartbeats and the liveness watch, let senders in. */
static int link_go_up(Link *l, const Dr__Repl__Welcome *welcome)
{
        uint64_t now = loop_now(l);
        int r;

        link_set_state(l, LINK_UP);
        l->step = STEP_NONE;
        listener_release(l);
        l->last_rx_usec = now;

        Dr__Repl__Heartbeat hb = DR__REPL__HEARTBEAT__INIT;
        if (l->cb.fill_heartbeat)
                l->cb.fill_heartbeat(l, &hb, l->userdata);
        if (l->freed || l->state == LINK_DOWN)
                return -ENOTCONN;
        hb.has_loop_beats = true;

        pthread_mutex_lock(&l->mutex);
        l->accepting = !l->closing && l->write_error == 0;
        /* The writer sends heartbeats from now on. */
        l->hb = hb;
        l->hb_next = now_usec() + (uint64_t) l->heartbeat_ms * USEC_PER_MSEC;
        l->hb_on = l->heartbeat_ms > 0;
        pthread_cond_signal(&l->cond_work);
        pthread_mutex_unlock(&l->mutex);

        r = sd_event_source_set_time(l->deadline_source, now + liveness_window_usec(l));
        if (r >= 0)
                r = sd_event_source_set_enabled(l->deadline_source, SD_EVENT_ONESHOT);
        if (r >= 0)
                r = sd_event_add_time(l->event, &l->heartbeat_source, CLOCK_MONOTONIC,
                                      now + (uint64_t) l->heartbeat_ms * USEC_PER_MSEC, TIMER_ACCURACY_USEC,
                                      on_heartbeat_timer, l);
        /* The loop beat runs before more bulk input is read: sd-event dispatches
         * one source per iteration, and a link busy with a full sync keeps its
         * socket readable all the time. */
        if (r >= 0)
                r = sd_event_source_set_priority(l->heartbeat_source, SD_EVENT_PRIORITY_IMPORTANT);
        if (r < 0) {
                link_down(l, r, false, "failed to arm heartbeat timers: %s", strerror(-r));
                return r;
        }

        if (l->cb.on_up) {
                r = l->cb.on_up(l, welcome, l->userdata);
                if (l->freed || l->state == LINK_DOWN)
                        return -ENOTCONN;
                if (r < 0) {
                        link_down(l, r, true, "link to %s refused after the handshake: %s", l->peer_name,
                                  strerror(-r));
                        return r;
                }
        }
        return 0;
}

/* ---- frame dispatch (loop thread) ----------------------------------------------------- */

#define PROTO_FAIL(l, code, ...)                                                                            \
        ({                                                                                                  \
                link_down((l), (code), true, __VA_ARGS__);                                                  \
                (code);                                                                                     \
        })

static void sanitize(char *dst, size_t size, const char *src)
{
        size_t i = 0;
        for (; src && src[i] && i + 1 < size; i++)
                dst[i] = (src[i] >= 0x20 && src[i] < 0x7f) ? src[i] : '?';
        dst[i] = 0;
}

static int handle_peer_error(Link *l, const uint8_t *payload, size_t len)
{
        _cleanup_(protobuf_c_message_freep) ProtobufCMessage *m = NULL;
        char msg[PEER_MESSAGE_MAX + 1];
        Dr__Repl__Error *e;
        int code;

        m = (ProtobufCMessage *) dr__repl__error__unpack(NULL, len, payload);
        if (!m)
                return PROTO_FAIL(l, -EBADMSG, "undecodable ERROR frame from %s", l->peer_name);
        e = (Dr__Repl__Error *) m;
        /* The peer's code is input too: only a plausible negative errno passes. */
        code = (e->code < 0 && e->code > -4096) ? e->code : -EPROTO;
        sanitize(msg, sizeof(msg), e->message);
        l->down_by_peer = true;
        link_down(l, code, false, "peer %s reported: %s", l->peer_name, msg);
        return code;
}

/*
 * Both nonces are known: derives the session keys (link-mac.h) into a MAC for each
 * direction. The caller installs each at the frame where that direction becomes keyed.
 */
static int link_keys_derive(Link *l, LinkMac **ret_rx, LinkMac **ret_tx)
{
        _cleanup_(link_mac_freep) LinkMac *rx = NULL, *tx = NULL;
        uint8_t p2s[LINK_KEY_BYTES], s2p[LINK_KEY_BYTES];
        const uint8_t *np = l->side == LINK_PRIMARY ? l->nonce_local : l->nonce_peer;
        const uint8_t *ns = l->side == LINK_PRIMARY ? l->nonce_peer : l->nonce_local;
        int r;

        r = link_session_keys(l->secret, l->secret_len, np, ns, NONCE_BYTES, l->vm_name, l->vm_uuid,
                              UUID_BYTES, l->binding, l->binding_len, p2s, s2p);
        if (r >= 0)
                r = link_mac_new(l->side == LINK_PRIMARY ? s2p : p2s, &rx);
        if (r >= 0)
                r = link_mac_new(l->side == LINK_PRIMARY ? p2s : s2p, &tx);
        OPENSSL_cleanse(p2s, sizeof(p2s));
        OPENSSL_cleanse(s2p, sizeof(s2p));
        if (r < 0)
                return r;
        *ret_rx = TAKE_PTR(rx);
        *ret_tx = TAKE_PTR(tx);
        return 0;
}

/* Frames this side queues from now on carry a MAC (the writer seals them in queue order). */
static void link_tx_keyed(Link *l, LinkMac *tx)
{
        pthread_mutex_lock(&l->mutex);
        assert(!l->tx_mac);
        l->tx_mac = tx;
        pthread_mutex_unlock(&l->mutex);
}

static int handle_hello(Link *l, const uint8_t *payload, size_t len)
{
        _cleanup_(protobuf_c_message_freep) ProtobufCMessage *m = NULL;
        _cleanup_(link_mac_freep) LinkMac *tx = NULL;
        Dr__Repl__Challenge c = DR__REPL__CHALLENGE__INIT;
        uint8_t proof[PROOF_BYTES];
        const char *reason = NULL;
        Dr__Repl__Hello *h;
        int r;

        m = (ProtobufCMessage *) dr__repl__hello__unpack(NULL, len, payload);
        if (!m)
                return PROTO_FAIL(l, -EBADMSG, "undecodable HELLO from %s", l->peer_name);
        h = (Dr__Repl__Hello *) m;
        if (h->version != DR__REPL__REPL_VERSION__REPL_VERSION_CURRENT)
                return PROTO_FAIL(l, -EPROTONOSUPPORT,
                                  "peer %s speaks replication protocol version %u, this side only %u",
                                  l->peer_name, h->version,
                                  (unsigned) DR__REPL__REPL_VERSION__REPL_VERSION_CURRENT);
        if (h->nonce.len != NONCE_BYTES || h->vm_uuid.len != UUID_BYTES || h->session.len != SESSION_BYTES)
                return PROTO_FAIL(l, -EBADMSG,
                                  "malformed HELLO from %s: nonce %zu, vm_uuid %zu, session %zu bytes "
                                  "(want %u, %u, %u)",
                                  l->peer_name, h->nonce.len, h->vm_uuid.len, h->session.len, NONCE_BYTES,
                                  UUID_BYTES, SESSION_BYTES);
        if (!h->vm_name || strlen(h->vm_name) == 0 || strlen(h->vm_name) > VM_NAME_MAX)
                return PROTO_FAIL(l, -EBADMSG, "malformed HELLO from %s: vm_name empty or over %u bytes",
                                  l->peer_name, VM_NAME_MAX);

        memcpy(l->nonce_peer, h->nonce.data, NONCE_BYTES);
        memcpy(l->vm_uuid, h->vm_uuid.data, UUID_BYTES);
        memcpy(l->session, h->session.data, SESSION_BYTES);
        l->have_session = true;
        l->vm_name = strdup(h->vm_name);
        if (!l->vm_name)
                return PROTO_FAIL(l, -ENOMEM, "out of memory");

        if (l->cb.on_hello) {
                r = l->cb.on_hello(l, h, &reason, l->userdata);
                if (l->freed || l->state == LINK_DOWN)
                        return -ENOTCONN;
                if (r < 0)
                        return PROTO_FAIL(l, r, "standby refused HELLO from %s for VM '%s': %s",
                                          l->peer_name, l->vm_name, reason ?: strerror(-r));
        }

        if (getrandom(l->nonce_local, NONCE_BYTES, 0) != NONCE_BYTES)
                return PROTO_FAIL(l, -EIO, "getrandom() failed");
        r = link_proof(l->secret, l->secret_len, LABEL_STANDBY, l->nonce_peer, l->nonce_local, l->vm_name,
                       l->vm_uuid, l->binding, l->binding_len, proof);
        if (r < 0)
                return PROTO_FAIL(l, r, "failed to compute the standby proof: %s", strerror(-r));
        r = link_keys_derive(l, &l->rx_pending_mac, &tx);
        if (r < 0)
                return PROTO_FAIL(l, r, "failed to derive the session keys: %s", strerror(-r));

        c.nonce = (ProtobufCBinaryData){NONCE_BYTES, l->nonce_local};
        c.proof = (ProtobufCBinaryData){PROOF_BYTES, proof};
        r = link_send_internal(l, DR__REPL__FRAME_TYPE__FRAME_CHALLENGE, &c.base);
        if (r < 0)
                return PROTO_FAIL(l, r, "failed to queue CHALLENGE: %s", strerror(-r));
        /* Everything after CHALLENGE (WELCOME, or an ERROR) is keyed: a primary that checked the
         * proof holds the same keys, and nobody else can forge a WELCOME. The primary's frames
         * are keyed only after its AUTH (rx_pending_mac until then). */
        link_tx_keyed(l, TAKE_PTR(tx));
        l->step = STEP_WAIT_AUTH;
        return 0;
}

static int handle_challenge(Link *l, const uint8_t *payload, size_t len)
{
        _cleanup_(protobuf_c_message_freep) ProtobufCMessage *m = NULL;
        _cleanup_(link_mac_freep) LinkMac *tx = NULL;
        Dr__Repl__Auth a = DR__REPL__AUTH__INIT;
        uint8_t expected[PROOF_BYTES], proof[PROOF_BYTES];
        Dr__Repl__Challenge *c;
        int r;

        m = (ProtobufCMessage *) dr__repl__challenge__unpack(NULL, len, payload);
        if (!m)
                return PROTO_FAIL(l, -EBADMSG, "undecodable CHALLENGE from %s", l->peer_name);
        c = (Dr__Repl__Challenge *) m;
        if (c->nonce.len != NONCE_BYTES || c->proof.len != PROOF_BYTES)
                return PROTO_FAIL(l, -EBADMSG, "malformed CHALLENGE from %s: nonce %zu, proof %zu bytes",
                                  l->peer_name, c->nonce.len, c->proof.len);
        memcpy(l->nonce_peer, c->nonce.data, NONCE_BYTES);

        r = link_proof(l->secret, l->secret_len, LABEL_STANDBY, l->nonce_local, l->nonce_peer, l->vm_name,
                       l->vm_uuid, l->binding, l->binding_len, expected);
        if (r < 0)
                return PROTO_FAIL(l, r, "failed to compute the standby proof: %s", strerror(-r));
        if (CRYPTO_memcmp(expected, c->proof.data, PROOF_BYTES) != 0) {
                if (l->ssl)
                        return PROTO_FAIL(l, -EACCES,
                                          "authentication failed: the standby %s does not know the shared "
                                          "secret, or the handshake was relayed through another TLS "
                                          "connection (check SecretFile= on both hosts, and that nothing "
                                          "terminates TLS on the way)",
                                          l->peer_name);
                return PROTO_FAIL(l, -EACCES,
                                  "authentication failed: the standby %s does not know the shared secret "
                                  "(check SecretFile= on both hosts)",
                                  l->peer_name);
        }

        r = link_proof(l->secret, l->secret_len, LABEL_PRIMARY, l->nonce_peer, l->nonce_local, l->vm_name,
                       l->vm_uuid, l->binding, l->binding_len, proof);
        if (r < 0)
                return PROTO_FAIL(l, r, "failed to compute the primary proof: %s", strerror(-r));
        r = link_keys_derive(l, &l->rx_mac, &tx);
        if (r < 0)
                return PROTO_FAIL(l, r, "failed to derive the session keys: %s", strerror(-r));
        a.proof = (ProtobufCBinaryData){PROOF_BYTES, proof};
        r = link_send_internal(l, DR__REPL__FRAME_TYPE__FRAME_AUTH, &a.base);
        if (r < 0)
                return PROTO_FAIL(l, r, "failed to queue AUTH: %s", strerror(-r));
        /* The standby's frames are keyed from its WELCOME on (rx_mac, installed above), ours from
         * the one after AUTH. */
        link_tx_keyed(l, TAKE_PTR(tx));
        l->step = STEP_WAIT_WELCOME;
        return 0;
}

static int handle_auth(Link *l, const uint8_t *payload, size_t len)
{
        _cleanup_(protobuf_c_message_freep) ProtobufCMessage *m = NULL;
        Dr__Repl__Welcome w = DR__REPL__WELCOME__INIT;
        uint8_t expected[PROOF_BYTES];
        Dr__Repl__Auth *a;
        int r;

        m = (ProtobufCMessage *) dr__repl__auth__unpack(NULL, len, payload);
        if (!m)
                return PROTO_FAIL(l, -EBADMSG, "undecodable AUTH from %s", l->peer_name);
        a = (Dr__Repl__Auth *) m;
        r = link_proof(l->secret, l->secret_len, LABEL_PRIMARY, l->nonce_local, l->nonce_peer, l->vm_name,
                       l->vm_uuid, l->binding, l->binding_len, expected);
        if (r < 0)
                return PROTO_FAIL(l, r, "failed to compute the primary proof: %s", strerror(-r));
        if (a->proof.len != PROOF_BYTES || CRYPTO_memcmp(expected, a->proof.data, PROOF_BYTES) != 0)
                return PROTO_FAIL(l, -EACCES,
                                  "authentication failed: the peer %s does not know the shared secret "
                                  "(check SecretFile=)%s",
                                  l->peer_name,
                                  l->ssl ? ", or the handshake was relayed through another TLS connection"
                                         : "");
        /* From the frame after AUTH on, the primary's frames are keyed. */
        l->rx_mac = TAKE_PTR(l->rx_pending_mac);

        if (l->cb.fill_welcome)
                l->cb.fill_welcome(l, &w, l->userdata);
        if (l->freed || l->state == LINK_DOWN)
                return -ENOTCONN;
        r = link_send_internal(l, DR__REPL__FRAME_TYPE__FRAME_WELCOME, &w.base);
        if (r < 0)
                return PROTO_FAIL(l, r, "failed to queue WELCOME: %s", strerror(-r));
        return link_go_up(l, NULL);
}

static int handle_welcome(Link *l, const uint8_t *payload, size_t len)
{
        _cleanup_(protobuf_c_message_freep) ProtobufCMessage *m = NULL;
        Dr__Repl__Welcome *w;

        m = (ProtobufCMessage *) dr__repl__welcome__unpack(NULL, len, payload);
        if (!m)
                return PROTO_FAIL(l, -EBADMSG, "undecodable WELCOME from %s", l->peer_name);
        w = (Dr__Repl__Welcome *) m;
        if (w->has_session && w->session.len != 0 && w->session.len != SESSION_BYTES)
                return PROTO_FAIL(l, -EBADMSG, "malformed WELCOME from %s: session is %zu bytes",
                                  l->peer_name, w->session.len);
        return link_go_up(l, w);
}

static int handle_heartbeat(Link *l, const uint8_t *payload, size_t len)
{
        _cleanup_(protobuf_c_message_freep) ProtobufCMessage *m = NULL;

        m = (ProtobufCMessage *) dr__repl__heartbeat__unpack(NULL, len, payload);
        if (!m)
                return PROTO_FAIL(l, -EBADMSG, "undecodable HEARTBEAT from %s", l->peer_name);
        pthread_mutex_lock(&l->mutex);
        l->stats.heartbeats_received++;
        pthread_mutex_unlock(&l->mutex);
        /* A peer that sends loop_beats gets its loop watched from its first beat on. */
        {
                const Dr__Repl__Heartbeat *hb = (const Dr__Repl__Heartbeat *) m;
                if (hb->has_loop_beats && (l->peer_loop_usec == 0 || hb->loop_beats != l->peer_loop_beats)) {
                        l->peer_loop_beats = hb->loop_beats;
                        l->peer_loop_usec = loop_now(l);
                }
        }
        if (l->cb.on_heartbeat)
                l->cb.on_heartbeat(l, (Dr__Repl__Heartbeat *) m, l->userdata);
        return (l->freed || l->state == LINK_DOWN) ? -ENOTCONN : 0;
}

/* What the peer may send once up: the primary sends epochs, the standby acks them. */
static bool data_frame_allowed(const Link *l, uint16_t type)
{
        if (l->side == LINK_STANDBY)
                return type == DR__REPL__FRAME_TYPE__FRAME_EPOCH_BEGIN ||
                       type == DR__REPL__FRAME_TYPE__FRAME_PAGES ||
                       type == DR__REPL__FRAME_TYPE__FRAME_STATE ||
                       type == DR__REPL__FRAME_TYPE__FRAME_EPOCH_END;
        return type == DR__REPL__FRAME_TYPE__FRAME_ACK;
}

static int link_dispatch(Link *l, uint16_t type, const uint8_t *payload, size_t len)
{
        static const char *const step_names[] = {
                [STEP_NONE] = "up",
                [STEP_TLS] = "in the TLS handshake",
                [STEP_WAIT_HELLO] = "waiting for HELLO",
                [STEP_WAIT_AUTH] = "waiting for AUTH",
                [STEP_WAIT_CHALLENGE] = "waiting for CHALLENGE",
                [STEP_WAIT_WELCOME] = "waiting for WELCOME",
        };
        int r;

        if (type == DR__REPL__FRAME_TYPE__FRAME_ERROR)
                return handle_peer_error(l, payload, len);

        switch (l->step) {
        case STEP_TLS: /* frames only flow inside TLS */
                break;
        case STEP_WAIT_HELLO:
                if (type == DR__REPL__FRAME_TYPE__FRAME_HELLO)
                        return handle_hello(l, payload, len);
                break;
        case STEP_WAIT_AUTH:
                if (type == DR__REPL__FRAME_TYPE__FRAME_AUTH)
                        return handle_auth(l, payload, len);
                break;
        case STEP_WAIT_CHALLENGE:
                if (type == DR__REPL__FRAME_TYPE__FRAME_CHALLENGE)
                        return handle_challenge(l, payload, len);
                break;
        case STEP_WAIT_WELCOME:
                if (type == DR__REPL__FRAME_TYPE__FRAME_WELCOME)
                        return handle_welcome(l, payload, len);
                break;
        case STEP_NONE:
                if (l->state != LINK_UP)
                        break;
                if (type == DR__REPL__FRAME_TYPE__FRAME_HEARTBEAT)
                        return handle_heartbeat(l, payload, len);
                if (!data_frame_allowed(l, type))
                        break;
                if (!l->cb.on_frame)
                        return 0;
                r = l->cb.on_frame(l, type, payload, len, l->userdata);
                if (l->freed || l->state == LINK_DOWN)
                        return -ENOTCONN;
                if (r < 0)
                        return PROTO_FAIL(l, r, "%s frame from %s rejected: %s", frame_type_name(type),
                                          l->peer_name, strerror(-r));
                return 0;
        }

        return PROTO_FAIL(l, -EPROTO, "unexpected %s frame (type %u) from %s while %s",
                          frame_type_name(type), type, l->peer_name, step_names[l->step]);
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

static int link_frame_complete(Link *l)
{
        FrameHeader h = l->rx_frame;

        l->rx_have_header = false;
        l->rx_header_got = 0;
        if (frame_verify_payload(l->rx_header, &h, l->rx_payload) < 0)
                return PROTO_FAIL(l, -EBADMSG, "CRC mismatch in %s frame (%u bytes) from %s",
                                  frame_type_name(h.type), h.length, l->peer_name);
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
                                          l->peer_name, frame_type_name(h.type), seq, l->rx_seq);
                if (r == -EBADMSG)
                        return PROTO_FAIL(l, -EBADMSG,
                                          "authentication failed for %s frame %" PRIu64
                                          " (%u bytes) from %s: its MAC does not match (altered on the "
                                          "way, or not sent by the peer); link closed, nothing of it "
                                          "applied",
                                          frame_type_name(h.type), seq, h.length, l->peer_name);
                if (r < 0)
                        return PROTO_FAIL(l, r, "failed to check the MAC of a %s frame from %s: %s",
                                          frame_type_name(h.type), l->peer_name, strerror(-r));
                l->rx_seq++;
        }
        pthread_mutex_lock(&l->mutex);
        l->stats.frames_received++;
        pthread_mutex_unlock(&l->mutex);
        return link_dispatch(l, h.type, l->rx_payload, h.length);
}

/* Consumes len bytes of stream. 0 when all were consumed, negative when the link went down. */
static int link_feed(Link *l, const uint8_t *data, size_t len)
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

/* ---- socket events (loop thread) ------------------------------------------------------ */

/* Liveness counts bytes, not whole frames: a 4 MiB frame on a slow link is
 * progress long before it is complete. */
static void link_note_rx(Link *l, size_t n)
{
        l->rx_any = true;
        l->last_rx_usec = loop_now(l);
        pthread_mutex_lock(&l->mutex);
        l->stats.bytes_received += n;
        pthread_mutex_unlock(&l->mutex);
}

static void link_read(Link *l)
{
        unsigned max_reads = l->ssl ? RX_TLS_READS_PER_DISPATCH : RX_READS_PER_DISPATCH;
        uint64_t start = now_usec();

        for (unsigned i = 0; i < max_reads && !l->freed && l->state != LINK_DOWN; i++) {
                size_t want = l->rx_have_header ? l->rx_frame.length - l->rx_payload_got : 0;
                bool direct = want >= RX_BUFFER_BYTES;
                char why[256] = "";
                ssize_t n;

                /* Large payloads are read straight into place, small frames in bulk. */
                if (direct)
                        n = transport_recv(l, l->rx_payload + l->rx_payload_got, want, why, sizeof(why));
                else
                        n = transport_recv(l, l->rx_buf, RX_BUFFER_BYTES, why, sizeof(why));
                if (n < 0) {
                        if (n == -EINTR)
                                continue;
                        if (n == -EAGAIN)
                                break;
                        if (why[0])
                                link_down(l, (int) n, false, "%s", why);
                        else
                                link_down(l, (int) n, false, "reading from %s failed: %s", l->peer_name,
                                          strerror((int) -n));
                        return;
                }
                if (n == 0) {
                        link_down(l, -ECONNRESET, false, "peer %s closed the connection%s", l->peer_name,
                                  (l->rx_header_got > 0 || l->rx_have_header) ? " in the middle of a frame"
                                                                              : "");
                        return;
                }
                link_note_rx(l, (size_t) n);
                if (direct) {
                        l->rx_payload_got += (size_t) n;
                        /* A keyed frame's trailer follows: the next read gets it through link_feed(). */
                        if (l->rx_payload_got == l->rx_frame.length && !l->rx_mac &&
                            link_frame_complete(l) < 0)
                                return;
                } else if (link_feed(l, l->rx_buf, (size_t) n) < 0)
                        return;
                /* The socket stays readable: the loop comes back after its timers. */
                if (now_usec() - start >= RX_DISPATCH_BUDGET_USEC)
                        return;
        }
        if (l->ssl && !l->freed && l->state != LINK_DOWN) {
                /* What epoll cannot see: records OpenSSL already holds, and a read that must write
                 * first (a TLS 1.3 key update answered from inside SSL_read()). */
                (void) sd_event_source_set_io_events(l->io_source,
                                                     EPOLLIN | (l->tls_read_wants_write ? EPOLLOUT : 0));
                if (l->tls_pending)
                        (void) sd_event_source_set_enabled(l->rx_more_source, SD_EVENT_ONESHOT);
        }
}

static int on_rx_more(sd_event_source *s, void *userdata)
{
        _cleanup_(link_unrefp) Link *l = link_ref(userdata);

        if (l->state != LINK_DOWN && l->step != STEP_TLS)
                link_read(l);
        return 0;
}

/* Queues the primary's Hello: the first frame, once the connection (and TLS) is up. */
static int link_queue_hello(Link *l)
{
        TxFrame *f;
        int r;

        l->step = STEP_WAIT_CHALLENGE;
        f = txframe_new(l->hello_len);
        if (!f) {
                link_down(l, -ENOMEM, false, "out of memory");
                return -ENOMEM;
        }
        memcpy(f->data + FRAME_HEADER_SIZE, l->hello_payload, l->hello_len);
        r = link_queue(l, DR__REPL__FRAME_TYPE__FRAME_HELLO, f, false, true);
        if (r < 0) {
                link_down(l, r, false, "failed to queue HELLO: %s", strerror(-r));
                return r;
        }
        return 0;
}

/* A TLS side found replication frames where a TLS record should be. */
static void link_tls_plaintext_peer(Link *l)
{
        if (l->side == LINK_STANDBY) {
                /* Told in its own language, so the primary's log says why. */
                TxFrame *f =
                        error_frame(l, -EPROTO,
                                    "this standby requires TLS for the VM (TLS=yes), the primary connected "
                                    "in plaintext (TLS= must be the same on both hosts)");
                if (f)
                        (void) send(l->fd, f->data, f->len, MSG_DONTWAIT | MSG_NOSIGNAL);
                free(f);
                link_down(
                        l, -EPROTO, false,
                        "peer %s speaks plaintext replication, but TLS=yes here: refused (TLS= must be the "
                        "same on both hosts)",
                        l->peer_name);
        } else
                link_down(l, -EPROTO, false,
                          "peer %s answered in plaintext replication frames: TLS is off there, TLS=yes here "
                          "(TLS= must be the same on both hosts)",
                          l->peer_name);
}

/* Loop thread: the TLS handshake, one step each time the socket allows. */
static void link_tls_handshake(Link *l)
{
        char why[256] = "", version[32] = "", cipher[64] = "";
        int ok, err, r = 0;

        if (!l->tls_peeked) {
                uint8_t head[4], magic[4];
                ssize_t n = recv(l->fd, head, sizeof(head), MSG_PEEK | MSG_DONTWAIT);

                put_le32(magic, FRAME_MAGIC);
                if (n > 0) {
                        /* The peer spoke (the listener's first-bytes limit is met: what follows
                         * goes to OpenSSL, not through link_note_rx()). */
                        l->rx_any = true;
                        /* A short prefix is left to OpenSSL: waiting here for the rest would spin. */
                        l->tls_peeked = true;
                        if (n == (ssize_t) sizeof(head) && memcmp(head, magic, sizeof(head)) == 0) {
                                link_tls_plaintext_peer(l);
                                return;
                        }
                }
        }

        tls_lock(l);
        ERR_clear_error();
        ok = SSL_do_handshake(l->ssl);
        err = ok == 1 ? SSL_ERROR_NONE : SSL_get_error(l->ssl, ok);
        if (err == SSL_ERROR_NONE) {
                static const char label[] = "EXPORTER-dirtyrep-link";
                l->tls_up = true;
                /* Channel binding: the proofs and session keys cover this TLS connection's
                 * exporter, so a TLS terminator cannot relay the handshake into another
                 * connection (its two connections have different exporters). */
                if (SSL_export_keying_material(l->ssl, l->binding, LINK_BINDING_MAX, label,
                                               sizeof(label) - 1, NULL, 0, 0) == 1)
                        l->binding_len = LINK_BINDING_MAX;
                else {
                        l->tls_failed = true;
                        snprintf(why, sizeof(why), "no TLS exporter for the channel binding");
                        r = -EIO;
                        err = SSL_ERROR_SSL;
                }
                snprintf(version, sizeof(version), "%s", SSL_get_version(l->ssl));
                snprintf(cipher, sizeof(cipher), "%s", SSL_get_cipher_name(l->ssl) ?: "?");
        } else if (err != SSL_ERROR_WANT_READ && err != SSL_ERROR_WANT_WRITE) {
                l->tls_failed = true;
                r = tls_explain(l, false, why, sizeof(why));
        }
        l->tls_pending = SSL_has_pending(l->ssl);
        tls_unlock(l);

        switch (err) {
        case SSL_ERROR_WANT_READ:
                (void) sd_event_source_set_io_events(l->io_source, EPOLLIN);
                return;
        case SSL_ERROR_WANT_WRITE:
                (void) sd_event_source_set_io_events(l->io_source, EPOLLOUT);
                return;
        case SSL_ERROR_NONE:
                break;
        default:
                link_down(l, r, false, "TLS handshake with %s failed: %s", l->peer_name, why);
                return;
        }

        log_debug("Replication link with %s: %s, %s, peer certificate verified.", l->peer_name, version,
                  cipher);
        (void) sd_event_source_set_io_events(l->io_source, EPOLLIN);
        if (l->side == LINK_PRIMARY) {
                if (link_queue_hello(l) < 0)
                        return;
        } else
                l->step = STEP_WAIT_HELLO;
        /* Records that came with the handshake's last flight are inside OpenSSL already. */
        link_read(l);
}

static int link_connected(Link *l)
{
        int r, err = 0;
        socklen_t sl = sizeof(err);

        if (getsockopt(l->fd, SOL_SOCKET, SO_ERROR, &err, &sl) < 0)
                err = errno;
        if (err != 0) {
                link_down(l, -err, false, "connecting to %s failed: %s", l->peer_name, strerror(err));
                return -err;
        }
        r = sd_event_source_set_io_events(l->io_source, EPOLLIN);
        if (r < 0) {
                link_down(l, r, false, "failed to watch the connection to %s: %s", l->peer_name,
                          strerror(-r));
                return r;
        }
        link_set_state(l, LINK_HANDSHAKE);
        if (l->ssl) {
                l->step = STEP_TLS;
                link_tls_handshake(l); /* sends the ClientHello */
                return 0;
        }
        return link_queue_hello(l);
}

static int on_io(sd_event_source *s, int fd, uint32_t revents, void *userdata)
{
        _cleanup_(link_unrefp) Link *l = link_ref(userdata);

        if (l->state == LINK_CONNECTING) {
                (void) link_connected(l);
                return 0;
        }
        if (l->step == STEP_TLS) {
                link_tls_handshake(l);
                return 0;
        }
        link_read(l);
        return 0;
}

static int on_writer_wake(sd_event_source *s, int fd, uint32_t revents, void *userdata)
{
        _cleanup_(link_unrefp) Link *l = link_ref(userdata);
        eventfd_t v;
        int r;

        (void) eventfd_read(fd, &v);
        pthread_mutex_lock(&l->mutex);
        r = l->write_error;
        pthread_mutex_unlock(&l->mutex);
        if (r < 0)
                link_down(l, r, false, "sending to %s failed: %s", l->peer_name, strerror(-r));
        return 0;
}

static int on_connect_failed(sd_event_source *s, void *userdata)
{
        _cleanup_(link_unrefp) Link *l = link_ref(userdata);
        link_down(l, l->connect_error, false, "connecting to %s failed: %s", l->peer_name,
                  strerror(-l->connect_error));
        return 0;
}

/* ---- construction --------------------------------------------------------------------- */

static void socket_tune(int fd)
{
        int one = 1, size = SOCKET_BUFFER_BYTES;

        /* Best effort: the kernel clamps the buffers to net.core.[rw]mem_max. */
        (void) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        (void) setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
        (void) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
}

/* The address without the port ("?" for other families): what the per-source limit counts. */
static void format_host(const struct sockaddr *sa, socklen_t len, char *buf, size_t size)
{
        snprintf(buf, size, "?");
        if (sa->sa_family == AF_INET && len >= sizeof(struct sockaddr_in))
                inet_ntop(AF_INET, &((const struct sockaddr_in *) sa)->sin_addr, buf, size);
        else if (sa->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6))
                inet_ntop(AF_INET6, &((const struct sockaddr_in6 *) sa)->sin6_addr, buf, size);
}

static void format_sockaddr(const struct sockaddr *sa, socklen_t len, char *buf, size_t size)
{
        char host[INET6_ADDRSTRLEN] = "?";

        if (sa->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
                const struct sockaddr_in *in = (const struct sockaddr_in *) sa;
                inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
                snprintf(buf, size, "%s:%u", host, ntohs(in->sin_port));
        } else if (sa->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
                const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *) sa;
                inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
                snprintf(buf, size, "[%s]:%u", host, ntohs(in6->sin6_port));
        } else
                snprintf(buf, size, "(address family %u)", sa->sa_family);
}

static int link_new(sd_event *e, int fd, const LinkParams *p, const LinkCallbacks *cb, void *userdata,
                    const char *peer, Link **ret)
{
        _cleanup_(link_freep) Link *l = NULL;
        int r;

        l = calloc(1, sizeof(*l));
        if (!l) {
                safe_close(fd);
                return -ENOMEM;
        }
        l->n_ref = 1;
        l->fd = fd;
        l->wake_fd = l->stop_fd = -EBADF;
        l->q_tail = &l->q_head;
        pthread_mutex_init(&l->mutex, NULL);
        pthread_mutex_init(&l->tls_mutex, NULL);
        pthread_cond_init(&l->tls_cond, NULL);
        {
                /* The writer's timed waits (heartbeats) run on CLOCK_MONOTONIC, like now_usec(). */
                pthread_condattr_t ca;
                pthread_condattr_init(&ca);
                pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
                pthread_cond_init(&l->cond_work, &ca);
                pthread_condattr_destroy(&ca);
        }
        pthread_cond_init(&l->cond_space, NULL);
        l->event = sd_event_ref(e);
        l->side = p->side;
        l->state = LINK_CONNECTING;
        l->cb = *cb;
        l->userdata = userdata;
        l->secret = p->secret;
        l->secret_len = p->secret_len;
        l->heartbeat_ms = p->heartbeat_ms ?: DEFAULT_HEARTBEAT_MS;
        l->heartbeat_misses = p->heartbeat_misses ?: DEFAULT_MISSES;
        l->handshake_timeout_ms = p->handshake_timeout_ms ?: DEFAULT_HANDSHAKE_MS;
        l->send_queue_limit = p->send_queue_limit ?: DEFAULT_QUEUE_LIMIT;
        l->max_frame = MIN(p->max_frame ?: (uint32_t) DR__REPL__REPL_LIMIT__REPL_MAX_FRAME,
                           (uint32_t) DR__REPL__REPL_LIMIT__REPL_MAX_FRAME);
        l->peer_name = strdup(p->peer_name ?: peer);
        l->rx_buf = malloc(RX_BUFFER_BYTES);
        if (!l->peer_name || !l->rx_buf)
                return -ENOMEM;

        if (p->tls) {
                l->ssl = SSL_new(p->tls);
                l->tls_txbuf = malloc(TLS_RECORD_MAX);
                if (!l->ssl || !l->tls_txbuf)
                        return -ENOMEM;
                r = tls_set_fd(l->ssl, l->fd);
                if (r < 0)
                        return r;
                if (p->side == LINK_PRIMARY)
                        SSL_set_connect_state(l->ssl);
                else
                        SSL_set_accept_state(l->ssl);
                r = sd_event_add_defer(e, &l->rx_more_source, on_rx_more, l);
                if (r < 0)
                        return r;
                r = sd_event_source_set_enabled(l->rx_more_source, SD_EVENT_OFF);
                if (r < 0)
                        return r;
        }

        l->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        l->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (l->wake_fd < 0 || l->stop_fd < 0)
                return -errno;

        r = sd_event_add_io(e, &l->wake_source, l->wake_fd, EPOLLIN, on_writer_wake, l);
        if (r < 0)
                return r;
        r = sd_event_add_io(e, &l->io_source, l->fd, p->side == LINK_PRIMARY ? EPOLLOUT : EPOLLIN, on_io, l);
        if (r < 0)
                return r;
        r = sd_event_add_time(e, &l->deadline_source, CLOCK_MONOTONIC,
                              loop_now(l) + (uint64_t) l->handshake_timeout_ms * USEC_PER_MSEC,
                              TIMER_ACCURACY_USEC, on_deadline, l);
        if (r < 0)
                return r;

        r = -pthread_create(&l->writer, NULL, writer_main, l);
        if (r < 0)
                return r;
        l->writer_started = true;

        *ret = TAKE_PTR(l);
        return 0;
}

static int params_check(const LinkParams *p, const LinkCallbacks *cb, LinkSide side)
{
        if (!p || !cb || p->side != side || !p->secret || p->secret_len == 0 || p->secret_len > INT_MAX)
                return -EINVAL;
        if (side == LINK_PRIMARY) {
                const Dr__Repl__Hello *h = p->hello;
                if (!h || isempty(h->vm_name) || strlen(h->vm_name) > VM_NAME_MAX ||
                    h->vm_uuid.len != UUID_BYTES || h->session.len != SESSION_BYTES)
                        return -EINVAL;
        }
        return 0;
}

int link_connect(sd_event *e, const struct sockaddr *sa, socklen_t salen, const LinkParams *p,
                 const LinkCallbacks *cb, void *userdata, Link **ret)
{
        _cleanup_(link_freep) Link *l = NULL;
        _cleanup_close_ int fd = -EBADF;
        Dr__Repl__Hello h;
        char peer[64];
        int r;

        if (!e || !sa || !ret)
                return -EINVAL;
        r = params_check(p, cb, LINK_PRIMARY);
        if (r < 0)
                return r;

        fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        socket_tune(fd); /* before connect(), so the window scale covers the large buffers */

        format_sockaddr(sa, salen, peer, sizeof(peer));
        r = link_new(e, TAKE_FD(fd), p, cb, userdata, peer, &l);
        if (r < 0)
                return r;

        l->vm_name = strdup(p->hello->vm_name);
        if (!l->vm_name)
                return -ENOMEM;
        memcpy(l->vm_uuid, p->hello->vm_uuid.data, UUID_BYTES);
        memcpy(l->session, p->hello->session.data, SESSION_BYTES);
        l->have_session = true;
        if (getrandom(l->nonce_local, NONCE_BYTES, 0) != NONCE_BYTES)
                return -EIO;

        /* A shallow copy: the caller's Hello is only borrowed for this call. */
        h = *p->hello;
        h.version = DR__REPL__REPL_VERSION__REPL_VERSION_CURRENT;
        h.nonce = (ProtobufCBinaryData){NONCE_BYTES, l->nonce_local};
        l->hello_len = dr__repl__hello__get_packed_size(&h);
        if (l->hello_len > HANDSHAKE_MAX_FRAME)
                return -EMSGSIZE;
        l->hello_payload = malloc(l->hello_len);
        if (!l->hello_payload)
                return -ENOMEM;
        dr__repl__hello__pack(&h, l->hello_payload);

        if (connect(l->fd, sa, salen) < 0) {
                if (errno != EINPROGRESS) {
                        /* Failure is reported like any other: through on_down, from the loop. */
                        l->connect_error = -errno;
                        r = sd_event_add_defer(e, &l->connect_fail_source, on_connect_failed, l);
                        if (r < 0)
                                return r;
                        (void) sd_event_source_set_enabled(l->io_source, SD_EVENT_OFF);
                }
        }
        /* On success or EINPROGRESS, EPOLLOUT on io_source says the connection is ready. */
        *ret = TAKE_PTR(l);
        return 0;
}

int link_accept(sd_event *e, int fd, const LinkParams *p, const LinkCallbacks *cb, void *userdata,
                Link **ret)
{
        _cleanup_close_ int owned = fd;
        _cleanup_(link_freep) Link *l = NULL;
        struct sockaddr_storage ss;
        socklen_t sl = sizeof(ss);
        char peer[64] = "peer";
        int r;

        if (!e || fd < 0 || !ret)
                return -EINVAL;
        r = params_check(p, cb, LINK_STANDBY);
        if (r < 0)
                return r;

        /* The fd may come from anywhere (socket activation, a test): make it ours. */
        r = fcntl(fd, F_GETFL);
        if (r < 0 || fcntl(fd, F_SETFL, r | O_NONBLOCK) < 0 || fcntl(fd, F_SETFD, FD_CLOEXEC) < 0)
                return -errno;
        socket_tune(fd);
        if (!p->peer_name && getpeername(fd, (struct sockaddr *) &ss, &sl) >= 0)
                format_sockaddr((struct sockaddr *) &ss, sl, peer, sizeof(peer));

        r = link_new(e, TAKE_FD(owned), p, cb, userdata, peer, &l);
        if (r < 0)
                return r;
        link_set_state(l, LINK_HANDSHAKE);
        l->step = l->ssl ? STEP_TLS : STEP_WAIT_HELLO;
        sl = sizeof(ss);
        if (getpeername(l->fd, (struct sockaddr *) &ss, &sl) >= 0)
                format_host((struct sockaddr *) &ss, sl, l->peer_host, sizeof(l->peer_host));
        /* The first bytes are due soon (a primary sends HELLO, or its TLS ClientHello, at once);
         * the whole handshake within handshake_timeout_ms. */
        l->accepted_usec = loop_now(l);
        r = sd_event_source_set_time(
                l->deadline_source,
                l->accepted_usec + (uint64_t) MIN(FIRST_BYTES_MS, l->handshake_timeout_ms) * USEC_PER_MSEC);
        if (r < 0)
                return r;

        if (p->listener) {
                l->listener = p->listener;
                l->listener_next = p->listener->pending;
                p->listener->pending = l;
                p->listener->n_pending++;
        }
        *ret = TAKE_PTR(l);
        return 0;
}

/* ---- listener ------------------------------------------------------------------------- */

static void listener_release(Link *l)
{
        LinkListener *ll = l->listener;

        if (!ll)
                return;
        for (Link **p = &ll->pending; *p; p = &(*p)->listener_next)
                if (*p == l) {
                        *p = l->listener_next;
                        ll->n_pending--;
                        break;
                }
        l->listener = NULL;
        l->listener_next = NULL;
}

/*
 * A stranger was dropped before authenticating (evicted, silent, timed out). One warning per
 * LISTENER_WARN_INTERVAL names the latest source and counts the others, so a flood cannot flood
 * the journal, and an operator still learns where it comes from.
 */
static void listener_note_drop(LinkListener *ll, const char *host, const char *why)
{
        uint64_t now = now_usec();
        char local[64] = "?";
        struct sockaddr_storage ss;
        socklen_t sl = sizeof(ss);

        if (!ll)
                return;
        ll->refused++;
        ll->dropped_since_warn++;
        if (now < ll->warn_next_usec) {
                log_debug("Dropped replication connection from %s before authentication: %s.", host, why);
                return;
        }
        if (getsockname(ll->fd, (struct sockaddr *) &ss, &sl) >= 0)
                format_sockaddr((struct sockaddr *) &ss, sl, local, sizeof(local));
        log_warning("Replication listener %s: dropped a connection from %s before authentication: %s "
                    "(%" PRIu64 " dropped in the last %u s, %" PRIu64 " in all). Something there connects "
                    "without completing the handshake: check that host, or filter it.",
                    local, host, why, ll->dropped_since_warn,
                    (unsigned) (LISTENER_WARN_INTERVAL_USEC / USEC_PER_SEC), ll->refused);
        ll->dropped_since_warn = 0;
        ll->warn_next_usec = now + LISTENER_WARN_INTERVAL_USEC;
}

/* The oldest pending connection from host (NULL: from anywhere); with silent_only, only one that
 * has not sent a byte yet. The list is newest first. */
static Link *listener_oldest(LinkListener *ll, const char *host, bool silent_only)
{
        Link *found = NULL;

        for (Link *l = ll->pending; l; l = l->listener_next)
                if ((!host || streq(l->peer_host, host)) && (!silent_only || !l->rx_any))
                        found = l;
        return found;
}

static unsigned listener_count_source(LinkListener *ll, const char *host)
{
        unsigned n = 0;
        for (Link *l = ll->pending; l; l = l->listener_next)
                n += streq(l->peer_host, host);
        return n;
}

/* Closes a pending connection to make room for a new one. */
static void listener_evict(LinkListener *ll, Link *victim, const char *why)
{
        _cleanup_(link_unrefp) _unused_ Link *ref = link_ref(victim);

        victim->preauth_dropped = true;
        listener_note_drop(ll, victim->peer_host, why);
        link_down(victim, -ECONNREFUSED, false, "%s dropped before authentication: %s", victim->peer_name,
                  why);
}

/*
 * Makes room for a new connection from host, or says why not (NULL: room made). An address
 * gets at most LISTENER_MAX_PER_SOURCE handshakes at once (2: a host reconnecting while a
 * half-open attempt lingers still gets in); more are refused at once, before a Link (and its
 * thread) exists, so a flood from a few addresses costs an accept() and a close() each. When
 * all max_pending are taken, an address with nothing pending evicts the oldest connection that
 * has not sent a byte (else the oldest); one that already has a handshake pending waits its
 * turn: evicting for it would let a flood from many addresses churn through Links for ever.
 * A primary sends its HELLO within a round trip of connecting and normally has nothing else
 * pending, so a flood of silent connections gives way to it.
 */
static const char *listener_make_room(LinkListener *ll, const char *host)
{
        unsigned mine = listener_count_source(ll, host);
        Link *victim;

        if (mine >= LISTENER_MAX_PER_SOURCE)
                return "2 handshakes from that address are pending already";
        if (ll->n_pending < ll->max_pending)
                return NULL;
        if (mine > 0)
                return "all handshake slots are taken and that address holds one";
        victim = listener_oldest(ll, NULL, true) ?: listener_oldest(ll, NULL, false);
        if (victim)
                listener_evict(ll, victim, "the oldest handshake, evicted to make room for another address");
        return ll->n_pending < ll->max_pending ? NULL : "no handshake slot could be freed";
}

static int on_listener_io(sd_event_source *s, int fd, uint32_t revents, void *userdata)
{
        LinkListener *ll = userdata;

        for (unsigned i = 0; i < 32; i++) {
                struct sockaddr_storage ss;
                socklen_t sl = sizeof(ss);
                char peer[64], host[INET6_ADDRSTRLEN];
                const char *why;
                int cfd;

                cfd = accept4(fd, (struct sockaddr *) &ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (cfd < 0) {
                        if (errno == EINTR || errno == ECONNABORTED)
                                continue;
                        if (errno != EAGAIN)
                                /* EMFILE and friends: the listener is where this is decided. */
                                log_warning_errno(-errno, "Failed to accept a replication connection: %m");
                        return 0;
                }
                format_sockaddr((struct sockaddr *) &ss, sl, peer, sizeof(peer));
                format_host((struct sockaddr *) &ss, sl, host, sizeof(host));
                why = listener_make_room(ll, host);
                if (why) {
                        listener_note_drop(ll, host, why);
                        safe_close(cfd);
                        continue;
                }
                socket_tune(cfd);
                (void) ll->on_accept(ll, cfd, peer, ll->userdata);
        }
        return 0;
}

int link_listener_new(sd_event *e, const struct sockaddr *sa, socklen_t salen, unsigned max_pending,
                      int (*on_accept)(LinkListener *ll, int fd, const char *peer, void *userdata),
                      void *userdata, LinkListener **ret)
{
        _cleanup_(link_listener_freep) LinkListener *ll = NULL;
        int one = 1, size = SOCKET_BUFFER_BYTES, r;

        if (!e || !sa || !on_accept || !ret || max_pending == 0)
                return -EINVAL;
        ll = calloc(1, sizeof(*ll));
        if (!ll)
                return -ENOMEM;
        ll->fd = -EBADF;
        ll->event = sd_event_ref(e);
        ll->max_pending = max_pending;
        ll->on_accept = on_accept;
        ll->userdata = userdata;

        ll->fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (ll->fd < 0)
                return -errno;
        if (setsockopt(ll->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0)
                return -errno;
        /* Accepted sockets inherit the receive buffer, and with it the window scale. */
        (void) setsockopt(ll->fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
        if (bind(ll->fd, sa, salen) < 0 || listen(ll->fd, LISTEN_BACKLOG) < 0)
                return -errno;
        r = sd_event_add_io(e, &ll->io, ll->fd, EPOLLIN, on_listener_io, ll);
        if (r < 0)
                return r;
        /* The default priority, on purpose: sd-event never dispatches a lower one while a source
         * above it is pending, and one VM's link applying a full sync is pending for as long as
         * the sync lasts (its socket never runs dry), so another VM's primary could not connect
         * meanwhile. At the same priority sources take turns; a flood costs at most 32 accept()s
         * and close()s per turn (on_listener_io()). */
        *ret = TAKE_PTR(ll);
        return 0;
}

LinkListener *link_listener_free(LinkListener *ll)
{
        if (!ll)
                return NULL;
        /* Links outlive their listener; they just stop counting against it. */
        while (ll->pending) {
                Link *l = ll->pending;
                ll->pending = l->listener_next;
                l->listener = NULL;
                l->listener_next = NULL;
        }
        ll->io = sd_event_source_disable_unref(ll->io);
        safe_close(ll->fd);
        sd_event_unref(ll->event);
        free(ll);
        return NULL;
}

int link_listener_address(const LinkListener *ll, struct sockaddr_storage *ret, socklen_t *ret_len)
{
        struct sockaddr_storage ss;
        socklen_t sl = sizeof(ss);

        if (getsockname(ll->fd, (struct sockaddr *) &ss, &sl) < 0)
                return -errno;
        *ret = ss;
        *ret_len = sl;
        return 0;
}

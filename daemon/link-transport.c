/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The replication link's byte stream, plaintext or TLS (link-internal.h), and
 * the TLS handshake. The loop thread reads (link_transport_recv()) and runs the
 * handshake, the writer thread writes (link_transport_sendv(),
 * link_transport_close_notify()); with TLS both go through the one SSL object,
 * each call under the TLS lock (link_tls_lock(), FIFO), never held while waiting.
 */
#include <errno.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "frame.h"
#include "link-internal.h"
#include "log.h"
#include "util.h"

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
int link_tls_set_fd(SSL *ssl, int fd)
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
void link_tls_lock(Link *l)
{
        uint64_t ticket;

        pthread_mutex_lock(&l->tls_mutex);
        ticket = l->tls_next++;
        while (ticket != l->tls_serving)
                pthread_cond_wait(&l->tls_cond, &l->tls_mutex);
        pthread_mutex_unlock(&l->tls_mutex);
}

void link_tls_unlock(Link *l)
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
ssize_t link_transport_recv(Link *l, void *buf, size_t len, char *why, size_t why_size)
{
        size_t got = 0;
        int err, saved_errno;
        ssize_t r;

        if (!l->ssl) {
                ssize_t n = recv(l->fd, buf, len, MSG_DONTWAIT);
                return n < 0 ? -errno : n;
        }

        link_tls_lock(l);
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
        link_tls_unlock(l);
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

        link_tls_lock(l);
        ERR_clear_error();
        errno = 0;
        err = SSL_write_ex(l->ssl, p, len, &written) == 1 ? SSL_ERROR_NONE : SSL_get_error(l->ssl, 0);
        saved_errno = errno;
        if (err == SSL_ERROR_SSL || err == SSL_ERROR_SYSCALL)
                l->tls_failed = true;
        link_tls_unlock(l);

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
ssize_t link_transport_sendv(Link *l, const struct iovec *iov, size_t n, short *ret_events)
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
void link_transport_close_notify(Link *l)
{
        if (!l->ssl)
                return;
        link_tls_lock(l);
        if (l->tls_up && !l->tls_failed) {
                ERR_clear_error();
                (void) SSL_shutdown(l->ssl);
                ERR_clear_error();
        }
        link_tls_unlock(l);
}

/* A TLS side found replication frames where a TLS record should be. */
static void link_tls_plaintext_peer(Link *l)
{
        if (l->side == LINK_STANDBY) {
                /* Told in its own language, so the primary's log says why. */
                TxFrame *f = link_error_frame(
                        l, -EPROTO,
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
void link_tls_handshake(Link *l)
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

        link_tls_lock(l);
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
        link_tls_unlock(l);

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

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
 * time: every call into it holds the TLS lock (link_tls_lock(): first come, first
 * served, so a reader decrypting a full sync cannot starve the writer's
 * heartbeats, or the other way round, as an unfair mutex can), which is never held while
 * waiting. The plaintext path takes none of this.
 *
 * Any other frame before UP is -EPROTO; ERROR is accepted in every state.
 * Frames are limited to HANDSHAKE_MAX_FRAME until UP, so a stranger cannot
 * make the standby allocate max_frame bytes per connection.
 *
 * This file is the state machine; the parser, the handshake, the transport,
 * the writer and the listener are in link-*.c (link-internal.h lists them).
 */
#include <arpa/inet.h>
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <unistd.h>

#include "frame.h"
#include "link-internal.h"
#include "link-mac.h"
#include "link.h"
#include "log.h"
#include "util.h"

#define RX_BUFFER_BYTES           (64u * 1024u)
#define RX_READS_PER_DISPATCH     16u
#define RX_TLS_READS_PER_DISPATCH 64u /* a TLS read returns one record, at most 16 KiB */
/* Work one dispatch may do before the loop gets back to its timers. Reads
 * are counted in wire bytes, but a compressed PAGES frame of 16 KiB can
 * expand to 1 MiB of pages to apply: 16 reads of LZ4'd zero-tailed pages
 * once took the standby's loop past the peer's 200 ms liveness window, and
 * its heartbeats were not sent (the full-sync link flap). */
#define RX_DISPATCH_BUDGET_USEC 2000u
#define LOOP_STALL_FACTOR       5u
#define LOOP_STALL_MIN_USEC     (2u * USEC_PER_SEC)
#define PEER_MESSAGE_MAX        200u
#define TIMER_ACCURACY_USEC     1000u

#define DEFAULT_HEARTBEAT_MS 50u
#define DEFAULT_MISSES       4u
#define DEFAULT_HANDSHAKE_MS 5000u
/* A pre-authentication limit (see link.h; the listener's own are in link-listener.c): a stranger
 * that sends nothing is closed after FIRST_BYTES_MS. */
#define FIRST_BYTES_MS      1000u
#define DEFAULT_QUEUE_LIMIT ((size_t) 32 << 20)

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

/* ---- going down ----------------------------------------------------------------------- */

TxFrame *link_error_frame(Link *l, int code, const char *message)
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
void link_down(Link *l, int error, bool tell_peer, const char *fmt, ...)
{
        TxFrame *dropped, *err = NULL;
        va_list ap;

        if (l->state == LINK_DOWN)
                return;
        assert(error < 0);
        if (l->ssl) {
                /* Before the TLS handshake there is no channel for an ERROR frame (OpenSSL sent
                 * its alert), and after a fatal TLS error there is none any more. */
                link_tls_lock(l);
                if (!l->tls_up || l->tls_failed)
                        tell_peer = false;
                link_tls_unlock(l);
        }

        va_start(ap, fmt);
        vsnprintf(l->down_reason, sizeof(l->down_reason), fmt, ap);
        va_end(ap);
        link_set_state(l, LINK_DOWN);
        l->step = STEP_NONE;
        link_listener_release(l);

        sd_event_source *sources[] = {l->io_source, l->deadline_source, l->heartbeat_source,
                                      l->connect_fail_source, l->rx_more_source};
        FOREACH_ARRAY (s, sources, ELEMENTSOF(sources))
                if (*s)
                        (void) sd_event_source_set_enabled(*s, SD_EVENT_OFF);

        if (tell_peer)
                err = link_error_frame(l, error, l->down_reason);

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

Link *link_ref(Link *l)
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

void link_unref(Link *l)
{
        assert(l->n_ref > 0);
        if (--l->n_ref == 0)
                link_release(l);
}

Link *link_free(Link *l)
{
        if (!l)
                return NULL;
        assert(!l->freed);
        l->freed = true;
        link_set_state(l, LINK_DOWN);
        link_listener_release(l);

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
                                link_listener_note_drop(l->listener, l->peer_host,
                                                        "it sent nothing within 1 s");
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
                        link_listener_note_drop(l->listener, l->peer_host, "its handshake timed out");
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
int link_go_up(Link *l, const Dr__Repl__Welcome *welcome)
{
        uint64_t now = loop_now(l);
        int r;

        link_set_state(l, LINK_UP);
        l->step = STEP_NONE;
        link_listener_release(l);
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

int link_dispatch(Link *l, uint16_t type, const uint8_t *payload, size_t len)
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
                        return link_handle_hello(l, payload, len);
                break;
        case STEP_WAIT_AUTH:
                if (type == DR__REPL__FRAME_TYPE__FRAME_AUTH)
                        return link_handle_auth(l, payload, len);
                break;
        case STEP_WAIT_CHALLENGE:
                if (type == DR__REPL__FRAME_TYPE__FRAME_CHALLENGE)
                        return link_handle_challenge(l, payload, len);
                break;
        case STEP_WAIT_WELCOME:
                if (type == DR__REPL__FRAME_TYPE__FRAME_WELCOME)
                        return link_handle_welcome(l, payload, len);
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
                        return PROTO_FAIL(l, r, "%s frame from %s rejected: %s", link_frame_type_name(type),
                                          l->peer_name, strerror(-r));
                return 0;
        }

        return PROTO_FAIL(l, -EPROTO, "unexpected %s frame (type %u) from %s while %s",
                          link_frame_type_name(type), type, l->peer_name, step_names[l->step]);
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

void link_read(Link *l)
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
                        n = link_transport_recv(l, l->rx_payload + l->rx_payload_got, want, why,
                                                sizeof(why));
                else
                        n = link_transport_recv(l, l->rx_buf, RX_BUFFER_BYTES, why, sizeof(why));
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

void link_socket_tune(int fd)
{
        int one = 1, size = SOCKET_BUFFER_BYTES;

        /* Best effort: the kernel clamps the buffers to net.core.[rw]mem_max. */
        (void) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        (void) setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
        (void) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
}

/* The address without the port ("?" for other families): what the per-source limit counts. */
void link_format_host(const struct sockaddr *sa, socklen_t len, char *buf, size_t size)
{
        snprintf(buf, size, "?");
        if (sa->sa_family == AF_INET && len >= sizeof(struct sockaddr_in))
                inet_ntop(AF_INET, &((const struct sockaddr_in *) sa)->sin_addr, buf, size);
        else if (sa->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6))
                inet_ntop(AF_INET6, &((const struct sockaddr_in6 *) sa)->sin6_addr, buf, size);
}

void link_format_sockaddr(const struct sockaddr *sa, socklen_t len, char *buf, size_t size)
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
                r = link_tls_set_fd(l->ssl, l->fd);
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

        r = -pthread_create(&l->writer, NULL, link_writer_main, l);
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
        link_socket_tune(fd); /* before connect(), so the window scale covers the large buffers */

        link_format_sockaddr(sa, salen, peer, sizeof(peer));
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
        link_socket_tune(fd);
        if (!p->peer_name && getpeername(fd, (struct sockaddr *) &ss, &sl) >= 0)
                link_format_sockaddr((struct sockaddr *) &ss, sl, peer, sizeof(peer));

        r = link_new(e, TAKE_FD(owned), p, cb, userdata, peer, &l);
        if (r < 0)
                return r;
        link_set_state(l, LINK_HANDSHAKE);
        l->step = l->ssl ? STEP_TLS : STEP_WAIT_HELLO;
        sl = sizeof(ss);
        if (getpeername(l->fd, (struct sockaddr *) &ss, &sl) >= 0)
                link_format_host((struct sockaddr *) &ss, sl, l->peer_host, sizeof(l->peer_host));
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

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The replication link's send side (link-internal.h): the send queue, which
 * any thread may fill (link_send*(); the queue and the counters next to it
 * are under `mutex`), and the writer thread, which drains it, seals keyed
 * frames (link-mac.h) in queue order just before they leave, and sends the
 * heartbeats. The writer never calls back: a write error is stored in
 * `write_error` and signalled through `wake_fd`, and the loop takes the link
 * down.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>

#include "frame.h"
#include "link-internal.h"
#include "link-mac.h"
#include "util.h"

#define TX_IOV_MAX 64u

/* ---- send queue (any thread) ---------------------------------------------------------- */

TxFrame *txframe_new(size_t payload_len)
{
        TxFrame *f = malloc(sizeof(TxFrame) + FRAME_HEADER_SIZE + payload_len + LINK_MAC_TRAILER_BYTES);
        if (!f)
                return NULL;
        f->next = NULL;
        f->mac = f->sealed = false;
        f->len = FRAME_HEADER_SIZE + payload_len;
        return f;
}

void txframe_free_list(TxFrame *f)
{
        while (f) {
                TxFrame *next = f->next;
                free(f);
                f = next;
        }
}

/* Under `mutex`, as f is queued: once this side's frames are keyed, f gets a trailer. The order
 * of the queue is the order of the sequence numbers the writer gives them. */
void txframe_mark_locked(Link *l, TxFrame *f)
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
int link_queue(Link *l, uint16_t type, TxFrame *f, bool block, bool internal)
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

int link_pack(Link *l, const ProtobufCMessage *m, TxFrame **ret)
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

int link_send_internal(Link *l, uint16_t type, const ProtobufCMessage *m)
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

                sent = link_transport_sendv(l, iov, n, &events);
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
void *link_writer_main(void *userdata)
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
                        link_transport_close_notify(l);
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

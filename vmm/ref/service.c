/* SPDX-License-Identifier: GPL-2.0-or-later */
#include <arpa/inet.h>
#include <assert.h>
#include <inttypes.h>
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "log.h"
#include "service.h"
#include "util.h"

/*
 * When the active client leaves in the middle of a transaction the guest
 * may still be answering it (its bytes are dropped) or hold a partial
 * request. The next client waits until the guest's turnaround marker, or
 * until COM2 has been quiet for DRAIN_QUIET_USEC (at most DRAIN_MAX_USEC).
 * Then a guest that has ever sent a marker gets a hangup (DCD low) and
 * HANGUP_MAX_USEC to acknowledge it; a guest that never did is switched
 * as is (today's one-client-at-a-time behaviour).
 */
#define DRAIN_QUIET_USEC (50 * USEC_PER_MSEC)
#define DRAIN_MAX_USEC   (1000 * USEC_PER_MSEC)
#define HANGUP_MAX_USEC  (1000 * USEC_PER_MSEC)

typedef struct Client {
        int fd;             /* -EBADF: free slot */
        uint64_t id;        /* unique for the process lifetime; 0 is "nobody" */
        const char *doomed; /* set by service_send(): the I/O thread drops the client for this reason */
        bool eof;           /* the peer finished sending: dropped once its input has been fed */
        uint8_t *in;        /* SERVICE_IN_MAX: read from the socket, not yet fed to COM2 */
        size_t in_len;
        uint8_t *out; /* released bytes the socket has not taken yet */
        size_t out_len, out_cap;
} Client;

/* `len` bytes the guest wrote while `client` was active, in submit order. */
typedef struct Segment {
        uint64_t client;
        unsigned slot;
        size_t len;
} Segment;

struct Service {
        pthread_mutex_t lock;
        int listen_fd;
        int wake_fd; /* eventfd */
        Uart *uart;
        Uart *console;
        pthread_t thread;
        bool thread_started;
        bool stopping;

        Client clients[SERVICE_CLIENTS_MAX];
        unsigned n_clients;
        uint64_t next_id;
        size_t out_total; /* sum of out_len: COM2 back pressure */

        /* The line. active/active_slot change only under the Uart lock too (in the tap), or when 0. */
        uint64_t active; /* client whose bytes feed COM2 and who hears THR; 0: none */
        unsigned active_slot;
        bool in_txn;       /* bytes were fed since the guest's last turnaround */
        bool markers_seen; /* the guest has written SERVICE_TURNAROUND at least once */
        bool orphaned;     /* the active client left with in_txn set */
        uint64_t orphan_since;
        bool hangup; /* DCD is (being) dropped: feed nothing until the guest acknowledges */
        uint64_t hangup_since;
        uint64_t last_output; /* CLOCK_MONOTONIC usec of the last THR byte */

        Segment *seg; /* ring of SERVICE_SEGMENTS_MAX */
        size_t seg_head, seg_len;
        bool drop_logged;
};

static Client *service_client(Service *s, uint64_t id, unsigned slot)
{
        Client *c;

        if (id == 0 || slot >= SERVICE_CLIENTS_MAX)
                return NULL;
        c = &s->clients[slot];
        return c->fd >= 0 && c->id == id && !c->doomed ? c : NULL;
}

int service_new(const char *addr, uint16_t port, Service **ret)
{
        struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
        _cleanup_close_ int fd = -EBADF, wfd = -EBADF;
        struct addrinfo *res = NULL;
        struct sockaddr_storage ss;
        socklen_t sl = sizeof(ss);
        char portstr[8], host[NI_MAXHOST], serv[NI_MAXSERV];
        Service *s;
        int r, one = 1;

        if (!addr)
                goto no_listener;
        snprintf(portstr, sizeof(portstr), "%u", port);
        r = getaddrinfo(addr, portstr, &hints, &res);
        if (r != 0)
                return log_error_errno(-EADDRNOTAVAIL, "Cannot resolve service address '%s': %s", addr,
                                       gai_strerror(r));
        fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0) {
                r = -errno;
                freeaddrinfo(res);
                return log_error_errno(r, "Failed to create service socket: %m");
        }
        (void) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, res->ai_addr, res->ai_addrlen) < 0 || listen(fd, SERVICE_CLIENTS_MAX) < 0) {
                r = -errno;
                freeaddrinfo(res);
                return log_error_errno(r, "Failed to listen on %s:%u: %m", addr, port);
        }
        freeaddrinfo(res);
        if (getsockname(fd, (struct sockaddr *) &ss, &sl) < 0)
                return log_error_errno(-errno, "getsockname() failed: %m");
        if (getnameinfo((struct sockaddr *) &ss, sl, host, sizeof(host), serv, sizeof(serv),
                        NI_NUMERICHOST | NI_NUMERICSERV) != 0)
                return log_error_errno(-EINVAL, "getnameinfo() failed on the service socket");

no_listener:
        wfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (wfd < 0)
                return log_error_errno(-errno, "eventfd() failed: %m");

        s = calloc(1, sizeof(*s));
        if (!s)
                return log_oom();
        s->seg = calloc(SERVICE_SEGMENTS_MAX, sizeof(Segment));
        if (!s->seg) {
                free(s);
                return log_oom();
        }
        for (unsigned i = 0; i < SERVICE_CLIENTS_MAX; i++)
                s->clients[i].fd = -EBADF;
        pthread_mutex_init(&s->lock, NULL);
        s->listen_fd = TAKE_FD(fd);
        s->wake_fd = TAKE_FD(wfd);

        if (s->listen_fd < 0)
                goto done;
        /* Tests look for exactly this line to learn the port. */
        fprintf(stderr, "dirtyrep-vmm: service port listening on %s%s%s:%s\n", strchr(host, ':') ? "[" : "",
                host, strchr(host, ':') ? "]" : "", serv);
        fflush(stderr);
done:
        *ret = s;
        return 0;
}

/* --- the UART tap (called with the Uart lock held) --------------------------- */

static void service_wake_internal(Service *s);

/* Called with s->lock held. Switches only at a turnaround, never mid-transaction. */
static void service_maybe_switch_locked(Service *s, bool rx_empty)
{
        unsigned start;

        if (s->in_txn || s->hangup || !rx_empty)
                return;
        /* A new client opens a segment: without room, stay with the current one (it is allowed to). */
        if (s->seg_len >= SERVICE_SEGMENTS_MAX)
                return;
        start = s->active ? s->active_slot + 1 : 0;
        for (unsigned k = 0; k < SERVICE_CLIENTS_MAX; k++) {
                unsigned i = (start + k) % SERVICE_CLIENTS_MAX;
                Client *c = &s->clients[i];

                if (c->fd < 0 || c->doomed || c->in_len == 0)
                        continue;
                if (c->id != s->active)
                        log_debug("Service port: client %" PRIu64 " now active", c->id);
                s->active = c->id;
                s->active_slot = i;
                return;
        }
        if (!service_client(s, s->active, s->active_slot))
                s->active = 0; /* the active client is gone and nobody waits */
}

static void tap_tx_enqueue(void *userdata)
{
        Service *s = userdata;
        Segment *t;

        pthread_mutex_lock(&s->lock);
        s->last_output = now_usec();
        t = s->seg_len > 0 ? &s->seg[(s->seg_head + s->seg_len - 1) % SERVICE_SEGMENTS_MAX] : NULL;
        if (t && t->client == s->active && t->slot == s->active_slot)
                t->len++;
        else if (s->seg_len < SERVICE_SEGMENTS_MAX) {
                s->seg[(s->seg_head + s->seg_len) % SERVICE_SEGMENTS_MAX] =
                        (Segment){.client = s->active, .slot = s->active_slot, .len = 1};
                s->seg_len++;
        } else {
                /*
                 * Full (a switch needs a free entry, but a departing client clears `active` without
                 * one): never deliver a byte to the wrong client; the tail's bytes go to nobody.
                 */
                log_warning("Service port: output attribution queue full; dropping held output");
                t->client = 0;
                t->len++;
        }
        pthread_mutex_unlock(&s->lock);
}

static void tap_tx_cancel(void *userdata)
{
        Service *s = userdata;
        Segment *t;

        pthread_mutex_lock(&s->lock);
        /* The cancelled byte was never submitted, so no release consumed it: it is the tail's last. */
        assert(s->seg_len > 0);
        t = &s->seg[(s->seg_head + s->seg_len - 1) % SERVICE_SEGMENTS_MAX];
        assert(t->len > 0);
        if (--t->len == 0)
                s->seg_len--;
        pthread_mutex_unlock(&s->lock);
}

static void tap_scratch_write(void *userdata, uint8_t value, bool rx_empty)
{
        Service *s = userdata;

        if (value != SERVICE_TURNAROUND)
                return;
        pthread_mutex_lock(&s->lock);
        if (!s->markers_seen)
                log_info("Service port: the guest marks turnarounds; serving clients concurrently");
        s->markers_seen = true;
        /* Bytes still in the FIFO belong to the next transaction of the same client: not a turnaround yet.
         */
        if (rx_empty) {
                s->in_txn = false;
                if (!s->hangup)
                        s->orphaned = false;
        }
        pthread_mutex_unlock(&s->lock);
        if (rx_empty)
                service_wake_internal(s);
}

static size_t tap_rx_pull(void *userdata, uint8_t *buf, size_t room, bool rx_empty)
{
        Service *s = userdata;
        size_t n = 0;
        Client *c;

        pthread_mutex_lock(&s->lock);
        service_maybe_switch_locked(s, rx_empty);
        c = s->hangup ? NULL : service_client(s, s->active, s->active_slot);
        if (c && c->in_len > 0) {
                n = MIN(room, c->in_len);
                memcpy(buf, c->in, n);
                memmove(c->in, c->in + n, c->in_len - n);
                c->in_len -= n;
                s->in_txn = true;
        }
        pthread_mutex_unlock(&s->lock);
        return n;
}

static const UartTap service_tap = {
        .tx_enqueue = tap_tx_enqueue,
        .tx_cancel = tap_tx_cancel,
        .scratch_write = tap_scratch_write,
        .rx_pull = tap_rx_pull,
};

void service_set_uarts(Service *s, Uart *service, Uart *console)
{
        s->uart = service;
        s->console = console;
        /* Without a listener nothing is submitted for anybody (com2_tx), so there is nothing to attribute.
         */
        if (s->listen_fd >= 0)
                uart_set_tap(service, &service_tap, s);
}

bool service_listening(const Service *s)
{
        return s && s->listen_fd >= 0;
}

static void service_wake_internal(Service *s)
{
        uint64_t one = 1;

        /* EAGAIN means the counter is saturated: the thread will wake anyway. */
        (void) !write(s->wake_fd, &one, sizeof(one));
}

void service_wake(Service *s)
{
        service_wake_internal(s);
}

/* --- clients -------------------------------------------------------------- */

/* Called with s->lock held, on the I/O thread only (it owns the fds). */
static void service_drop_client_locked(Service *s, unsigned slot, const char *why)
{
        Client *c = &s->clients[slot];

        if (c->fd < 0)
                return;
        log_info("Service client %" PRIu64 " disconnected (%s)%s", c->id, why,
                 c->out_len > 0 ? "; unsent output dropped" : "");
        if (c->id == s->active && s->active_slot == slot) {
                if (s->in_txn && !s->orphaned) {
                        /* The guest may be mid-answer or hold a partial request: see DRAIN_QUIET_USEC. */
                        s->orphaned = true;
                        s->orphan_since = now_usec();
                } else if (!s->in_txn)
                        s->active = 0;
        }
        c->fd = safe_close(c->fd);
        s->out_total -= c->out_len;
        c->out_len = c->in_len = 0;
        c->doomed = NULL;
        s->n_clients--;
}

/* Sends from a client's out buffer; called with s->lock held on the I/O thread. */
static void service_flush_locked(Service *s, unsigned slot)
{
        Client *c = &s->clients[slot];
        size_t done = 0;

        while (c->fd >= 0 && done < c->out_len) {
                ssize_t n = send(c->fd, c->out + done, c->out_len - done, MSG_NOSIGNAL | MSG_DONTWAIT);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        if (errno != EAGAIN)
                                service_drop_client_locked(s, slot, strerror(errno));
                        break;
                }
                done += (size_t) n;
        }
        if (c->fd < 0 || done == 0)
                return;
        memmove(c->out, c->out + done, c->out_len - done);
        c->out_len -= done;
        s->out_total -= done;
}

/* Called with s->lock held: queues bytes for a client; false if it had to be dropped. */
static bool service_queue_locked(Service *s, Client *c, const uint8_t *buf, size_t len)
{
        if (len > SERVICE_OUT_MAX - c->out_len) {
                /* Only reachable when the guest ignores THRE; a slow client cannot stall the guest. */
                log_error("Service client %" PRIu64 " too slow (%zu bytes buffered); disconnecting it",
                          c->id, c->out_len);
                c->doomed = "output buffer full";
                return false;
        }
        if (c->out_len + len > c->out_cap) {
                size_t cap = MAX(MAX(c->out_cap * 2, c->out_len + len), (size_t) 4096);
                uint8_t *p = realloc(c->out, MIN(cap, (size_t) SERVICE_OUT_MAX));

                if (!p) {
                        log_oom();
                        c->doomed = "out of memory";
                        return false;
                }
                c->out = p;
                c->out_cap = MIN(cap, (size_t) SERVICE_OUT_MAX);
        }
        memcpy(c->out + c->out_len, buf, len);
        c->out_len += len;
        s->out_total += len;
        return true;
}

void service_send(Service *s, const void *buf, size_t len)
{
        const uint8_t *p = buf;
        bool wake = false;

        pthread_mutex_lock(&s->lock);
        if (s->listen_fd < 0)
                goto out; /* no service port configured: output goes nowhere by design */
        while (len > 0) {
                Segment *g;
                Client *c;
                size_t n;

                if (s->seg_len == 0) {
                        /* Bytes the guest wrote before this process attributed anything (e.g. restored in
                         * THR). */
                        log_debug("Service port: %zu released bytes without a writer; dropped", len);
                        break;
                }
                g = &s->seg[s->seg_head];
                n = MIN(len, g->len);
                c = service_client(s, g->client, g->slot);
                if (c)
                        wake |= service_queue_locked(s, c, p, n);
                else if (g->client == 0) {
                        if (!s->drop_logged)
                                log_error("Service port output dropped: no client connected");
                        s->drop_logged = true;
                } else
                        log_debug("Service port: %zu bytes for departed client %" PRIu64 " dropped", n,
                                  g->client);
                if (c && c->doomed)
                        wake = true;
                p += n;
                len -= n;
                g->len -= n;
                if (g->len == 0) {
                        s->seg_head = (s->seg_head + 1) % SERVICE_SEGMENTS_MAX;
                        s->seg_len--;
                }
        }
out:
        pthread_mutex_unlock(&s->lock);
        /*
         * Only queue: the I/O thread sends. Bytes released one at a time (the
         * guest writes THR per byte) then leave in batches instead of one
         * TCP segment per byte.
         */
        if (wake)
                service_wake_internal(s);
}

bool service_can_send(Service *s)
{
        bool ok;

        pthread_mutex_lock(&s->lock);
        ok = s->out_total < SERVICE_OUT_MAX / 2;
        pthread_mutex_unlock(&s->lock);
        return ok;
}

static void service_accept(Service *s)
{
        int fd = accept4(s->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK), one = 1;
        uint8_t *in;
        unsigned i;

        if (fd < 0) {
                if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
                        log_warning_errno(-errno, "accept() on the service port failed: %m");
                return;
        }
        /* Replies are small and latency matters more than segment count. */
        (void) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        in = malloc(SERVICE_IN_MAX);
        pthread_mutex_lock(&s->lock);
        for (i = 0; i < SERVICE_CLIENTS_MAX && s->clients[i].fd >= 0; i++)
                ;
        if (i == SERVICE_CLIENTS_MAX || !in) {
                pthread_mutex_unlock(&s->lock);
                if (in)
                        log_notice("Service port busy: %u clients connected, refusing another",
                                   SERVICE_CLIENTS_MAX);
                else
                        log_oom();
                free(in);
                safe_close(fd);
                return;
        }
        free(s->clients[i].in);
        s->clients[i] = (Client){
                .fd = fd,
                .id = ++s->next_id,
                .in = in,
                .out = s->clients[i].out, /* keep the buffer: the next client likely needs one too */
                .out_cap = s->clients[i].out_cap,
        };
        s->n_clients++;
        s->drop_logged = false;
        log_info("Service client %" PRIu64 " connected (%u connected)", s->next_id, s->n_clients);
        pthread_mutex_unlock(&s->lock);
}

/* Reads what the client's input buffer has room for; called with s->lock held on the I/O thread. */
static void service_read_client_locked(Service *s, unsigned slot)
{
        Client *c = &s->clients[slot];
        ssize_t n;

        if (c->in_len >= SERVICE_IN_MAX || c->eof)
                return;
        n = recv(c->fd, c->in + c->in_len, SERVICE_IN_MAX - c->in_len, MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
                return;
        if (n == 0 && c->in_len > 0) {
                c->eof = true; /* a request sent just before closing still reaches the guest */
                return;
        }
        if (n <= 0) {
                service_drop_client_locked(s, slot, n == 0 ? "end of stream" : strerror(errno));
                return;
        }
        c->in_len += (size_t) n;
}

/*
 * Called with s->lock held: the orphan/hangup timers. Returns the poll
 * timeout in ms (-1: none) and in *ret_carrier what to do with DCD
 * outside the lock: -1 nothing, 0 drop it, 1 raise it.
 */
static int service_line_timer_locked(Service *s, int *ret_carrier)
{
        uint64_t now = now_usec(), end;

        *ret_carrier = -1;
        if (s->hangup) {
                end = s->hangup_since + HANGUP_MAX_USEC;
                if (!s->in_txn || now >= end) {
                        if (s->in_txn)
                                log_warning("Service port: the guest did not acknowledge the hangup; "
                                            "serving the next client anyway");
                        *ret_carrier = 1;
                        return 0;
                }
                return (int) DIV_ROUND_UP(end - now, USEC_PER_MSEC);
        }
        if (!s->orphaned)
                return -1;
        if (!s->in_txn) {
                s->orphaned = false;
                return 0; /* feed the next client now */
        }
        end = MIN(MAX(s->last_output, s->orphan_since) + DRAIN_QUIET_USEC, s->orphan_since + DRAIN_MAX_USEC);
        if (now < end)
                return (int) DIV_ROUND_UP(end - now, USEC_PER_MSEC);
        if (s->markers_seen) {
                log_info("Service port: client left mid-transaction; signalling a hangup to the guest");
                s->hangup = true; /* before DCD drops: nothing is fed until it is up again */
                s->hangup_since = now;
                *ret_carrier = 0;
                return 0;
        }
        /* A guest without markers: switch once the line is quiet, as with one client at a time. */
        s->in_txn = false;
        s->orphaned = false;
        s->active = 0;
        return 0; /* feed the next client now */
}

static void *service_thread(void *userdata)
{
        Service *s = userdata;

        for (;;) {
                struct pollfd p[2 + SERVICE_CLIENTS_MAX];
                unsigned slot_of[SERVICE_CLIENTS_MAX], n = 2;
                int timeout, carrier;
                bool stopping, kick;

                p[0] = (struct pollfd){.fd = s->wake_fd, .events = POLLIN};
                p[1] = (struct pollfd){.fd = s->listen_fd, .events = POLLIN}; /* -1 without a listener */

                pthread_mutex_lock(&s->lock);
                stopping = s->stopping;
                timeout = service_line_timer_locked(s, &carrier);
                for (unsigned i = 0; i < SERVICE_CLIENTS_MAX; i++) {
                        Client *c = &s->clients[i];
                        short ev = 0;

                        if (c->fd < 0)
                                continue;
                        if (c->doomed) {
                                service_drop_client_locked(s, i, c->doomed);
                                timeout = 0; /* the line timer may have something to do now */
                                continue;
                        }
                        if (c->eof && c->in_len == 0) {
                                service_drop_client_locked(s, i, "end of stream");
                                timeout = 0;
                                continue;
                        }
                        if (c->in_len < SERVICE_IN_MAX && !c->eof)
                                ev |= POLLIN;
                        if (c->out_len > 0)
                                ev |= POLLOUT;
                        /* Nothing to wait for (input buffer full, nothing to send): leave it out, or a
                         * hang-up would make poll() spin until the guest drains the buffer. */
                        if (ev == 0)
                                continue;
                        slot_of[n - 2] = i;
                        p[n++] = (struct pollfd){.fd = c->fd, .events = ev};
                }
                pthread_mutex_unlock(&s->lock);
                if (stopping)
                        break;

                if (carrier == 0) {
                        uart_set_carrier(s->uart, false);
                        continue;
                }
                if (carrier == 1) {
                        uart_set_carrier(s->uart, true); /* up before the next client's first byte */
                        pthread_mutex_lock(&s->lock);
                        s->hangup = s->orphaned = s->in_txn = false;
                        if (!service_client(s, s->active, s->active_slot))
                                s->active = 0;
                        pthread_mutex_unlock(&s->lock);
                        (void) uart_rx_fill(s->uart);
                        continue;
                }

                if (poll(p, n, timeout) < 0) {
                        if (errno == EINTR)
                                continue;
                        log_error_errno(-errno, "poll() in the service thread failed: %m");
                        break;
                }
                if (p[0].revents & POLLIN) {
                        uint64_t v;
                        (void) !read(s->wake_fd, &v, sizeof(v));
                        /* Output space may be back: let the UARTs send a held byte / signal THR empty. */
                        uart_tx_kick(s->uart);
                        if (s->console)
                                uart_tx_kick(s->console);
                }

                pthread_mutex_lock(&s->lock);
                for (unsigned k = 2; k < n; k++) {
                        unsigned i = slot_of[k - 2];

                        if (p[k].revents & (POLLIN | POLLHUP | POLLERR))
                                service_read_client_locked(s, i);
                }
                /* Flush everything pending, not only what poll() reported: service_send() only queues. */
                for (unsigned i = 0; i < SERVICE_CLIENTS_MAX; i++)
                        if (s->clients[i].fd >= 0 && s->clients[i].out_len > 0)
                                service_flush_locked(s, i);
                kick = s->out_total < SERVICE_OUT_MAX / 2;
                pthread_mutex_unlock(&s->lock);

                if (p[1].fd >= 0 && (p[1].revents & POLLIN))
                        service_accept(s);
                /* Feed COM2 from the active client (or switch to another at a turnaround). */
                (void) uart_rx_fill(s->uart);
                if (kick)
                        uart_tx_kick(s->uart);
        }
        return NULL;
}

int service_start(Service *s)
{
        int r;

        if (!s->uart)
                return -EINVAL;
        r = -pthread_create(&s->thread, NULL, service_thread, s);
        if (r < 0)
                return r;
        s->thread_started = true;
        return 0;
}

void service_stop(Service *s)
{
        if (!s || !s->thread_started)
                return;
        pthread_mutex_lock(&s->lock);
        s->stopping = true;
        pthread_mutex_unlock(&s->lock);
        service_wake_internal(s);
        pthread_join(s->thread, NULL);
        s->thread_started = false;
}

Service *service_free(Service *s)
{
        if (!s)
                return NULL;
        service_stop(s);
        for (unsigned i = 0; i < SERVICE_CLIENTS_MAX; i++) {
                Client *c = &s->clients[i];

                /* Last chance for released output to reach the client. */
                if (c->fd >= 0 && c->out_len > 0)
                        (void) !send(c->fd, c->out, c->out_len, MSG_NOSIGNAL | MSG_DONTWAIT);
                safe_close(c->fd);
                free(c->in);
                free(c->out);
        }
        safe_close(s->listen_fd);
        safe_close(s->wake_fd);
        pthread_mutex_destroy(&s->lock);
        free(s->seg);
        free(s);
        return NULL;
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
#include <arpa/inet.h>
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
 * A serial line has no connections: when a client leaves, the guest may
 * still be answering its last requests. Bytes of that answer must not
 * reach the next client, so after a disconnect the port drains: released
 * output is discarded and the next client waits in the backlog until COM2
 * has been quiet for DRAIN_QUIET_USEC (at most DRAIN_MAX_USEC).
 */
#define DRAIN_QUIET_USEC (50 * USEC_PER_MSEC)
#define DRAIN_MAX_USEC   (1000 * USEC_PER_MSEC)

struct Service {
        pthread_mutex_t lock;
        int listen_fd;
        int client_fd;
        int wake_fd; /* eventfd */
        Uart *uart;
        Uart *console;
        pthread_t thread;
        bool thread_started;
        bool stopping;

        uint8_t *out; /* released bytes the socket has not taken yet */
        size_t out_len;
        bool drop_logged;

        bool draining;        /* the last client left; discarding its late output */
        uint64_t drain_start; /* CLOCK_MONOTONIC usec */
        uint64_t last_output; /* when service_send() last saw bytes */
};

int service_new(const char *addr, uint16_t port, Service **ret)
{
        struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE | AI_NUMERICSERV };
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
        if (bind(fd, res->ai_addr, res->ai_addrlen) < 0 || listen(fd, 4) < 0) {
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
        s->out = malloc(SERVICE_OUT_MAX);
        if (!s->out) {
                free(s);
                return log_oom();
        }
        pthread_mutex_init(&s->lock, NULL);
        s->listen_fd = TAKE_FD(fd);
        s->wake_fd = TAKE_FD(wfd);
        s->client_fd = -EBADF;

        if (s->listen_fd < 0)
                goto done;
        /* Tests look for exactly this line to learn the port. */
        fprintf(stderr, "dirtyrep-vmm: service port listening on %s%s%s:%s\n", strchr(host, ':') ? "[" : "", host,
                strchr(host, ':') ? "]" : "", serv);
        fflush(stderr);
done:
        *ret = s;
        return 0;
}

void service_set_uarts(Service *s, Uart *service, Uart *console)
{
        s->uart = service;
        s->console = console;
}

bool service_listening(const Service *s)
{
        return s && s->listen_fd >= 0;
}

void service_wake(Service *s)
{
        uint64_t one = 1;

        /* EAGAIN means the counter is saturated: the thread will wake anyway. */
        (void) !write(s->wake_fd, &one, sizeof(one));
}

/* Called with s->lock held. */
static void service_drop_client_locked(Service *s, const char *why)
{
        if (s->client_fd < 0)
                return;
        log_info("Service client disconnected (%s)%s", why, s->out_len > 0 ? "; unsent output dropped" : "");
        s->client_fd = safe_close(s->client_fd);
        s->out_len = 0;
        s->drop_logged = false;
        s->draining = true;
        s->drain_start = now_usec();
}

/* Called with s->lock held: -1 to wait for clients, else ms until the drain may end. */
static int service_drain_timeout_locked(Service *s)
{
        uint64_t now = now_usec(), end;

        if (!s->draining)
                return -1;
        end = MIN(s->last_output + DRAIN_QUIET_USEC, s->drain_start + DRAIN_MAX_USEC);
        if (now >= end) {
                s->draining = false;
                return -1;
        }
        return (int) DIV_ROUND_UP(end - now, USEC_PER_MSEC);
}

/* Sends from the out buffer; called with s->lock held. */
static void service_flush_locked(Service *s)
{
        while (s->client_fd >= 0 && s->out_len > 0) {
                ssize_t n = send(s->client_fd, s->out, s->out_len, MSG_NOSIGNAL | MSG_DONTWAIT);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        if (errno == EAGAIN)
                                return;
                        service_drop_client_locked(s, strerror(errno));
                        return;
                }
                memmove(s->out, s->out + n, s->out_len - (size_t) n);
                s->out_len -= (size_t) n;
        }
}

void service_send(Service *s, const void *buf, size_t len)
{
        bool wake = false;

        pthread_mutex_lock(&s->lock);
        if (s->listen_fd < 0)
                goto out; /* no service port configured: output goes nowhere by design */
        s->last_output = now_usec();
        if (s->client_fd < 0) {
                if (!s->draining && !s->drop_logged)
                        log_error("Service port output dropped: no client connected");
                s->drop_logged = true;
                goto out;
        }
        if (len > SERVICE_OUT_MAX - s->out_len) {
                /* Only reachable when the guest ignores THRE; a slow client cannot stall the guest. */
                log_error("Service client too slow (%zu bytes buffered); disconnecting it", s->out_len);
                service_drop_client_locked(s, "output buffer full");
                goto out;
        }
        /*
         * Only queue: the I/O thread sends. Bytes released one at a time (the
         * guest writes THR per byte) then leave in batches instead of one
         * TCP segment per byte.
         */
        wake = s->out_len == 0;
        memcpy(s->out + s->out_len, buf, len);
        s->out_len += len;
out:
        pthread_mutex_unlock(&s->lock);
        if (wake)
                service_wake(s);
}

bool service_can_send(Service *s)
{
        bool ok;

        pthread_mutex_lock(&s->lock);
        ok = s->out_len < SERVICE_OUT_MAX / 2;
        pthread_mutex_unlock(&s->lock);
        return ok;
}

/* Called with s->lock held: is the current client gone (EOF or error) without us having read it yet? */
static bool service_client_dead_locked(Service *s)
{
        char c;
        ssize_t n = recv(s->client_fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);

        return n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR);
}

static void service_accept(Service *s)
{
        int fd = accept4(s->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK), one = 1;

        if (fd < 0) {
                if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
                        log_warning_errno(-errno, "accept() on the service port failed: %m");
                return;
        }
        /* Replies are small and latency matters more than segment count. */
        (void) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        pthread_mutex_lock(&s->lock);
        /* A client that closed right before the next one connected (redis-benchmark does) is not "busy". */
        if (s->client_fd >= 0 && service_client_dead_locked(s))
                service_drop_client_locked(s, "end of stream");
        if (s->client_fd >= 0) {
                pthread_mutex_unlock(&s->lock);
                log_notice("Service port busy: refusing a second client");
                safe_close(fd);
                return;
        }
        s->client_fd = fd;
        s->out_len = 0;
        s->drop_logged = false;
        pthread_mutex_unlock(&s->lock);
        log_info("Service client connected");
}

/* Reads what COM2's FIFO has room for. Never holds s->lock while calling the Uart. */
static void service_read_client(Service *s, int fd)
{
        uint8_t buf[UART_RX_FIFO_MAX];
        size_t room = uart_rx_space(s->uart);
        ssize_t n;

        if (room == 0)
                return;
        n = recv(fd, buf, MIN(room, sizeof(buf)), MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
                return;
        if (n <= 0) {
                pthread_mutex_lock(&s->lock);
                if (s->client_fd == fd)
                        service_drop_client_locked(s, n == 0 ? "end of stream" : strerror(errno));
                pthread_mutex_unlock(&s->lock);
                return;
        }
        /* Only this thread pushes, so the room we measured is still there. */
        (void) uart_rx_push(s->uart, buf, (size_t) n);
}

static void *service_thread(void *userdata)
{
        Service *s = userdata;

        for (;;) {
                struct pollfd p[3] = {
                        { .fd = s->wake_fd, .events = POLLIN },
                        { .fd = s->listen_fd, .events = POLLIN }, /* -1 without a listener: ignored */
                        { .fd = -1 },
                };
                int client, timeout;
                bool stopping;

                pthread_mutex_lock(&s->lock);
                stopping = s->stopping;
                client = s->client_fd;
                timeout = service_drain_timeout_locked(s);
                if (timeout >= 0)
                        p[1].fd = -1; /* let the next client wait until the old answer drained */
                p[2].fd = client;
                p[2].events = s->out_len > 0 ? POLLOUT : 0;
                pthread_mutex_unlock(&s->lock);
                if (stopping)
                        break;
                if (client >= 0 && uart_rx_space(s->uart) > 0)
                        p[2].events |= POLLIN;
                /* Nothing to wait for on the client (FIFO full, nothing to send): leave it out, or a
                 * hang-up would make poll() spin until the guest drains the FIFO. */
                if (p[2].events == 0)
                        p[2].fd = -1;

                if (poll(p, 3, timeout) < 0) {
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
                if (p[2].fd >= 0 && (p[2].revents & (POLLIN | POLLHUP | POLLERR)))
                        service_read_client(s, client);
                if (p[1].revents & POLLIN)
                        service_accept(s);
                if (p[0].revents & POLLIN || (p[2].fd >= 0 && (p[2].revents & POLLOUT))) {
                        bool drained;

                        pthread_mutex_lock(&s->lock);
                        service_flush_locked(s);
                        drained = s->out_len < SERVICE_OUT_MAX / 2;
                        pthread_mutex_unlock(&s->lock);
                        if (drained)
                                uart_tx_kick(s->uart);
                }
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
        service_wake(s);
        pthread_join(s->thread, NULL);
        s->thread_started = false;
}

Service *service_free(Service *s)
{
        if (!s)
                return NULL;
        service_stop(s);
        /* Last chance for released output to reach the client. */
        if (s->client_fd >= 0 && s->out_len > 0)
                (void) !send(s->client_fd, s->out, s->out_len, MSG_NOSIGNAL | MSG_DONTWAIT);
        safe_close(s->client_fd);
        safe_close(s->listen_fd);
        safe_close(s->wake_fd);
        pthread_mutex_destroy(&s->lock);
        free(s->out);
        free(s);
        return NULL;
}

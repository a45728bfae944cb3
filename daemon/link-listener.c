/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The standby's replication listener (link.h) and its pre-authentication
 * limits: at most max_pending connections in handshake, at most
 * LISTENER_MAX_PER_SOURCE from one address, eviction of the oldest silent
 * one, and one rate-limited warning for all that is dropped. Loop thread
 * only: the listener and the Links it counts (their listener fields) live on
 * the sd-event loop.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <sys/socket.h>

#include "link-internal.h"
#include "log.h"
#include "util.h"

#define LISTEN_BACKLOG 64
/* Pre-authentication limits of a listener (see link.h). At most MAX_PER_SOURCE connections of one
 * address are in handshake; the warning about dropped strangers is logged at most once per
 * WARN_INTERVAL. (A stranger that sends nothing is closed after FIRST_BYTES_MS, in link.c.) */
#define LISTENER_MAX_PER_SOURCE     2u
#define LISTENER_WARN_INTERVAL_USEC (10u * USEC_PER_SEC)

/* ---- listener ------------------------------------------------------------------------- */

void link_listener_release(Link *l)
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
void link_listener_note_drop(LinkListener *ll, const char *host, const char *why)
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
                link_format_sockaddr((struct sockaddr *) &ss, sl, local, sizeof(local));
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
        link_listener_note_drop(ll, victim->peer_host, why);
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
                link_format_sockaddr((struct sockaddr *) &ss, sl, peer, sizeof(peer));
                link_format_host((struct sockaddr *) &ss, sl, host, sizeof(host));
                why = listener_make_room(ll, host);
                if (why) {
                        link_listener_note_drop(ll, host, why);
                        safe_close(cfd);
                        continue;
                }
                link_socket_tune(cfd);
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

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The loop side of the replication link: the Link's callbacks, reconnects
 * with back-off, and telling the standby why replication stopped. Runs on
 * the sd-event loop only.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "primary-internal.h"
#include "util.h"

/* ---- the loop side: link ---------------------------------------------------------------- */

static int schedule_reconnect(Primary *p);

/*
 * link_free() stops the writer at once, and the ERROR frame that link_fail()
 * queued (why this primary stopped) would never reach the standby, which then
 * sees a closed connection, a loss, and fails over while the VM may still run
 * here. So give the writer a moment (bounded: the loop waits) to send it:
 * the Link's writer signals each frame that leaves its queue.
 */
#define FLUSH_WAIT_USEC (200 * USEC_PER_MSEC)
static void link_flush(Link *l)
{
        (void) link_wait_sent(l, FLUSH_WAIT_USEC);
}

void primary_drop_link(Primary *p)
{
        Command c = {.type = CMD_LINK};
        bool changed;
        Link *l;

        pthread_mutex_lock(&p->mutex);
        l = p->link;
        p->link = NULL;
        changed = p->link_up;
        if (changed)
                p->link_gen++;
        p->link_up = false;
        c.link.gen = p->link_gen;
        /* The epoch thread's sends on a down Link return at once; wait for them to leave. */
        while (p->link_users > 0)
                pthread_cond_wait(&p->cond, &p->mutex);
        pthread_mutex_unlock(&p->mutex);
        if (changed)
                (void) primary_push(p, &c); /* cannot fail: a link change always fits */
        else
                wake(p->wake_fd);
        link_flush(l);
        link_free(l);
}

static int on_up(Link *l, const Dr__Repl__Welcome *w, void *userdata)
{
        Primary *p = userdata;
        bool ours = w && w->has_session && w->session.len == sizeof(p->session) &&
                    memcmp(w->session.data, p->session, sizeof(p->session)) == 0;
        Command c = {
                .type = CMD_LINK,
                .link.up = true,
                .link.ours = ours,
                .link.last = w && w->has_last_committed ? w->last_committed : 0,
        };

        pthread_mutex_lock(&p->mutex);
        p->link_up = true;
        c.link.gen = ++p->link_gen;
        p->syncing = true; /* until the resync epoch the thread starts now is acked */
        p->sync_epoch = UINT64_MAX;
        /* The standby committed that epoch of ours: its output may go (an ACK may have
         * been lost with the old link). Release pairs with epoch_handle_acks(). */
        if (ours && c.link.last <= p->pub.last_sealed &&
            c.link.last > atomic_load_explicit(&p->acked, memory_order_relaxed))
                atomic_store_explicit(&p->acked, c.link.last, memory_order_release);
        snprintf(p->detail, sizeof(p->detail), "connected to %s", link_peer_name(l));
        /* A standby again: output waits for its ACKs (the resync's first), a suspended
         * VM resumes (the epoch thread sees both with the new link generation). */
        if (p->guard != GUARD_NONE)
                log_notice("VM %s: standby %s connected: output commit resumes", p->vm->name,
                           link_peer_name(l));
        p->guard = GUARD_NONE;
        pthread_mutex_unlock(&p->mutex);
        p->split_timer = sd_event_source_disable_unref(p->split_timer);
        p->backoff_ms = BACKOFF_MIN_MS;
        log_info("VM %s: replication link to %s up (standby holds epoch %" PRIu64 "%s)", p->vm->name,
                 link_peer_name(l), w && w->has_last_committed ? w->last_committed : 0,
                 ours ? " of this session" : "");
        (void) primary_push(p, &c); /* cannot fail: a link change always fits */
        return 0;
}

/* Under mutex: the inter-commit gap histogram (role.h) gets the time since the last commit. */
static void note_commit(Primary *p, uint64_t t)
{
        static const uint64_t edges_ms[] = COMMIT_GAP_EDGES_MS;
        uint64_t gap;
        size_t b = 0;

        _Static_assert(ELEMENTSOF(edges_ms) == COMMIT_GAP_BUCKETS - 1, "one edge per bucket but the last");
        if (p->last_commit_usec > 0 && t >= p->last_commit_usec) {
                gap = t - p->last_commit_usec;
                while (b < ELEMENTSOF(edges_ms) && gap > edges_ms[b] * 1000)
                        b++;
                p->commit_gaps[b]++;
                p->commit_gap_max_usec = MAX(p->commit_gap_max_usec, gap);
        }
        p->last_commit_usec = t;
}

static int on_frame(Link *l, uint16_t type, const uint8_t *payload, size_t len, void *userdata)
{
        Primary *p = userdata;
        Dr__Repl__Ack *a;
        uint64_t sealed;

        if (type != DR__REPL__FRAME_TYPE__FRAME_ACK)
                return 0;
        a = dr__repl__ack__unpack(NULL, len, payload);
        if (!a) {
                link_fail(l, -EBADMSG, "undecodable ACK");
                return -EBADMSG;
        }
        pthread_mutex_lock(&p->mutex);
        sealed = p->pub.last_sealed;
        pthread_mutex_unlock(&p->mutex);
        if (a->epoch > sealed || a->epoch < atomic_load_explicit(&p->acked, memory_order_relaxed)) {
                link_fail(l, -EPROTO, "ACK for epoch %" PRIu64 " (last sealed %" PRIu64 ")", a->epoch,
                          sealed);
                dr__repl__ack__free_unpacked(a, NULL);
                return -EPROTO;
        }
        pthread_mutex_lock(&p->mutex);
        if (a->epoch > atomic_load_explicit(&p->acked, memory_order_relaxed)) {
                p->epochs_committed++;
                note_commit(p, now_usec());
        }
        if (p->syncing && a->epoch >= p->sync_epoch) {
                link_set_patience(l, 0);
                p->syncing = false;
                p->last_sync_usec = now_usec() - p->pub.sync_start_usec;
                p->last_sync_full = p->pub.sync_full;
        }
        p->had_standby = true;
        pthread_mutex_unlock(&p->mutex);
        /* Release pairs with the acquire load in epoch_handle_acks(). */
        atomic_store_explicit(&p->acked, a->epoch, memory_order_release);
        dr__repl__ack__free_unpacked(a, NULL);
        wake(p->wake_fd);
        return 0;
}

static void fill_heartbeat(Link *l, Dr__Repl__Heartbeat *hb, void *userdata)
{
        Primary *p = userdata;

        pthread_mutex_lock(&p->mutex);
        hb->has_last_sealed = true;
        hb->last_sealed = p->pub.last_sealed;
        pthread_mutex_unlock(&p->mutex);
}

static void on_down(Link *l, int error, const char *reason, void *userdata)
{
        Primary *p = userdata;
        bool stopping, guard, maintenance;

        log_warning_errno(error, "VM %s: replication link to %s down: %s", p->vm->name, link_peer_name(l),
                          reason);
        pthread_mutex_lock(&p->mutex);
        stopping = p->stop || p->failed;
        snprintf(p->detail, sizeof(p->detail), "link to %s down: %s", link_peer_name(l), reason);
        guard = p->had_standby && p->guard == GUARD_NONE;
        maintenance = link_down_by_peer(l) && error == STANDBY_MAINTENANCE_CODE;
        if (maintenance) {
                /* The authenticated standby said it goes down for planned maintenance and
                 * will not promote until it has resynced: no split brain to guard against,
                 * so run on (unprotected) instead of holding output and suspending. */
                guard = false;
                p->guard = GUARD_UNPROTECTED;
                snprintf(p->detail, sizeof(p->detail),
                         "standby %s in planned maintenance: running UNPROTECTED until it resyncs",
                         link_peer_name(l));
        }
        if (guard)
                p->guard = GUARD_HOLDING;
        pthread_mutex_unlock(&p->mutex);
        if (maintenance)
                log_warning(
                        "VM %s: the standby went down for planned maintenance: output is released without "
                        "a standby's ACK, the VM runs UNPROTECTED until it is back and resynced",
                        p->vm->name);
        primary_drop_link(p);
        if (!stopping)
                (void) schedule_reconnect(p);
        if (guard && !stopping)
                primary_guard_arm(p);
}

static const LinkCallbacks link_callbacks = {
        .on_up = on_up,
        .on_frame = on_frame,
        .fill_heartbeat = fill_heartbeat,
        .on_down = on_down,
};

int primary_connect(Primary *p)
{
        LinkParams lp = {
                .side = LINK_PRIMARY,
                .secret = p->secret,
                .secret_len = p->secret_len,
                .heartbeat_ms = p->dcfg->heartbeat_interval_ms,
                .heartbeat_misses = p->dcfg->heartbeat_misses,
                .hello = &p->hello,
                .peer_name = p->vm->peer.text,
                .tls = p->tls,
        };
        Link *l = NULL;
        int r;

        r = link_connect(p->event, (const struct sockaddr *) &p->vm->peer.sa, p->vm->peer.len, &lp,
                         &link_callbacks, p, &l);
        if (r < 0) {
                pthread_mutex_lock(&p->mutex);
                snprintf(p->detail, sizeof(p->detail), "connecting to %s failed: %s", p->vm->peer.text,
                         strerror(-r));
                pthread_mutex_unlock(&p->mutex);
                return schedule_reconnect(p);
        }
        pthread_mutex_lock(&p->mutex);
        p->link = l;
        snprintf(p->peer, sizeof(p->peer), "%s", p->vm->peer.text);
        pthread_mutex_unlock(&p->mutex);
        return 0;
}

static int on_reconnect_timer(sd_event_source *s, uint64_t usec, void *userdata)
{
        Primary *p = userdata;

        p->reconnect_timer = sd_event_source_disable_unref(p->reconnect_timer);
        return primary_connect(p);
}

static int schedule_reconnect(Primary *p)
{
        uint64_t delay = p->backoff_ms;

        p->backoff_ms = MIN(p->backoff_ms * 2, BACKOFF_MAX_MS);
        p->reconnect_timer = sd_event_source_disable_unref(p->reconnect_timer);
        return sd_event_add_time_relative(p->event, &p->reconnect_timer, CLOCK_MONOTONIC,
                                          delay * USEC_PER_MSEC, 1000, on_reconnect_timer, p);
}

/* Whether the VMM still serves its control socket: a dead VMM leaves the
 * file, but nobody accepts (ECONNREFUSED), or the file is gone. */
static int on_gone_timer(sd_event_source *s, uint64_t usec, void *userdata);

/*
 * Tells the standby why replication stopped. -EHOSTDOWN says the VM is gone
 * here, so it may fail over; anything else (the VM may still run here,
 * unprotected) must not make it do so. A VMM that is being killed resets its
 * control connection before its listening socket is closed: the kernel
 * closes a dying process's fds one by one, after tearing down its memory,
 * and closing the KVM fds destroys the VM, which took long enough here that
 * a connect() in between still succeeded (bench/load-bench.py --churn: the
 * standby heard -EIO and never failed over). So a VMM that still answers is
 * asked again every GONE_CHECK_USEC, GONE_CHECKS times, before -EIO.
 */
static void report_stop(Primary *p)
{
        char detail[sizeof(p->detail)];
        Link *l;

        pthread_mutex_lock(&p->mutex);
        l = p->link;
        snprintf(detail, sizeof(detail), "%s", p->detail);
        pthread_mutex_unlock(&p->mutex);
        if (!l)
                return;
        if (!vmm_link_listening(p->vm->control_socket)) {
                log_error("VM %s: the VMM is gone (%s): telling the standby", p->vm->name, detail);
                link_fail(l, -EHOSTDOWN, "the primary's VM is gone: %s", detail); /* on_down drops it */
                return;
        }
        if (p->gone_checks++ < GONE_CHECKS &&
            sd_event_add_time_relative(p->event, &p->gone_timer, CLOCK_MONOTONIC, GONE_CHECK_USEC, 1000,
                                       on_gone_timer, p) >= 0)
                return;
        link_fail(l, -EIO, "primary stopped replicating: %s", detail);
}

static int on_gone_timer(sd_event_source *s, uint64_t usec, void *userdata)
{
        Primary *p = userdata;

        p->gone_timer = sd_event_source_disable_unref(p->gone_timer);
        report_stop(p);
        return 0;
}

/* The epoch thread stopped (tracking error, VMM lost): stop shipping, tell the standby. */
int primary_on_notify(sd_event_source *s, int fd, uint32_t revents, void *userdata)
{
        Primary *p = userdata;
        eventfd_t v;
        bool failed;

        (void) eventfd_read(fd, &v);
        primary_image_deliver(p, false);
        pthread_mutex_lock(&p->mutex);
        failed = p->failed;
        pthread_mutex_unlock(&p->mutex);
        if (!failed || p->fail_reported)
                return 0;
        p->fail_reported = true;
        p->reconnect_timer = sd_event_source_disable_unref(p->reconnect_timer);
        report_stop(p);
        return 0;
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Commands from the loop to the epoch thread (primary-internal.h, "The
 * boundary"): a small bounded queue the loop pushes and the epoch thread
 * drains at one place in its loop, and the synchronous requests built on it
 * (checkpoint, freeze, thaw, page hashes), which wait on p->cond for the
 * epoch thread's completion.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "primary-internal.h"
#include "util.h"

void command_done(Command *c)
{
        switch (c->type) {
        case CMD_HASH:
                c->hash.path = mfree(c->hash.path);
                break;
        case CMD_IMAGE:
                c->image.dir = mfree(c->image.dir);
                c->image.parent = mfree(c->image.parent);
                break;
        default:
                break;
        }
}

void command_queue_init(CommandQueue *q)
{
        pthread_mutex_init(&q->mutex, NULL);
        q->head = q->n = 0;
}

void command_queue_done(CommandQueue *q)
{
        Command c;

        while (command_queue_take(q, &c, 1) > 0)
                command_done(&c);
        pthread_mutex_destroy(&q->mutex);
}

int primary_push(Primary *p, Command *c)
{
        CommandQueue *q = &p->commands;
        int r = 0;

        pthread_mutex_lock(&q->mutex);
        if (c->type == CMD_LINK)
                /* Only the newest link generation matters: it replaces one still queued. */
                for (size_t i = 0; i < q->n; i++) {
                        Command *old = &q->ring[(q->head + i) % COMMAND_QUEUE_MAX];
                        if (old->type == CMD_LINK) {
                                *old = *c;
                                goto done;
                        }
                }
        /* The last slot is kept for a link change, so one always fits. */
        if (q->n >= COMMAND_QUEUE_MAX - (c->type == CMD_LINK ? 0u : 1u)) {
                r = -EBUSY;
                goto done;
        }
        q->ring[(q->head + q->n) % COMMAND_QUEUE_MAX] = *c;
        q->n++;
done:
        pthread_mutex_unlock(&q->mutex);
        if (r < 0)
                return r;
        *c = (Command){}; /* the queue owns its strings now */
        wake(p->wake_fd);
        return 0;
}

size_t command_queue_take(CommandQueue *q, Command *ret, size_t max)
{
        size_t n;

        pthread_mutex_lock(&q->mutex);
        n = MIN(q->n, max);
        for (size_t i = 0; i < n; i++)
                ret[i] = q->ring[(q->head + i) % COMMAND_QUEUE_MAX];
        q->head = (q->head + n) % COMMAND_QUEUE_MAX;
        q->n -= n;
        pthread_mutex_unlock(&q->mutex);
        return n;
}

/* ---- synchronous requests (loop thread) ----------------------------------------------- */

/* Waits on the condition variable until pred holds, the thread failed, or the timeout. */
#define WAIT_FOR(p, pred)                                                                                   \
        ({                                                                                                  \
                struct timespec _ts;                                                                        \
                int _r = 0;                                                                                 \
                clock_gettime(CLOCK_REALTIME, &_ts);                                                        \
                _ts.tv_sec += REQUEST_TIMEOUT_USEC / USEC_PER_SEC;                                          \
                while (!(pred)) {                                                                           \
                        if ((p)->failed || !(p)->attached) {                                                \
                                _r = -ESTALE;                                                               \
                                break;                                                                      \
                        }                                                                                   \
                        if (pthread_cond_timedwait(&(p)->cond, &(p)->mutex, &_ts) == ETIMEDOUT) {           \
                                _r = (pred) ? 0 : -ETIMEDOUT;                                               \
                                break;                                                                      \
                        }                                                                                   \
                }                                                                                           \
                _r;                                                                                         \
        })

/*
 * Checkpoint and freeze wait on the loop thread for the epoch thread to seal.
 * The loop is what delivers ACKs and link changes, so wait only for what can
 * happen without it: with no link, or with the one extra in-flight epoch a
 * synchronous request may take already used (by an earlier request whose
 * ACKs are still queued on the loop), the seal cannot come; answer at once
 * (-ENOTCONN, -EBUSY) and let the caller retry after the loop ran.
 * Called with p->mutex held.
 */
int primary_seal_request_possible_locked(Primary *p)
{
        if (!p->link_up)
                return -ENOTCONN;
        if (p->pub.inflight >= MAX(p->vm->max_inflight_epochs, 1u) + 1u)
                return -EBUSY;
        return 0;
}

int primary_checkpoint(Primary *p, uint64_t *ret_epoch)
{
        Command c = {.type = CMD_CHECKPOINT};
        int r;

        pthread_mutex_lock(&p->mutex);
        r = p->frozen ? -EBUSY : primary_seal_request_possible_locked(p);
        pthread_mutex_unlock(&p->mutex);
        if (r < 0)
                return r;
        c.checkpoint.seq = ++p->checkpoint_seq;
        r = primary_push(p, &c);
        if (r < 0)
                return r;
        pthread_mutex_lock(&p->mutex);
        r = WAIT_FOR(p, p->checkpoint_done >= p->checkpoint_seq);
        if (r == 0 && ret_epoch)
                *ret_epoch = p->checkpoint_epoch;
        pthread_mutex_unlock(&p->mutex);
        return r;
}

int primary_freeze(Primary *p, uint64_t *ret_epoch)
{
        Command c = {.type = CMD_FREEZE};
        int r;

        pthread_mutex_lock(&p->mutex);
        if (p->frozen) {
                if (ret_epoch)
                        *ret_epoch = p->frozen_epoch;
                pthread_mutex_unlock(&p->mutex);
                return 0;
        }
        r = primary_seal_request_possible_locked(p);
        pthread_mutex_unlock(&p->mutex);
        if (r < 0)
                return r;
        r = primary_push(p, &c);
        if (r < 0)
                return r;
        pthread_mutex_lock(&p->mutex);
        r = WAIT_FOR(p, p->frozen);
        if (r == 0 && ret_epoch)
                *ret_epoch = p->frozen_epoch;
        pthread_mutex_unlock(&p->mutex);
        if (r < 0) {
                /* Given up: a freeze still pending on the epoch thread is dropped. */
                c = (Command){.type = CMD_FREEZE_CANCEL};
                (void) primary_push(p, &c);
        }
        return r;
}

int primary_thaw(Primary *p)
{
        Command c = {.type = CMD_THAW};
        bool frozen;
        int r;

        pthread_mutex_lock(&p->mutex);
        frozen = p->frozen;
        pthread_mutex_unlock(&p->mutex);
        if (!frozen) {
                /* Nothing to resume; a freeze still pending is dropped. */
                c.type = CMD_FREEZE_CANCEL;
                (void) primary_push(p, &c);
                return 0;
        }
        r = primary_push(p, &c);
        if (r < 0)
                return r;
        pthread_mutex_lock(&p->mutex);
        r = WAIT_FOR(p, !p->frozen);
        pthread_mutex_unlock(&p->mutex);
        return r;
}

int primary_hash_ram(Primary *p, const char *path)
{
        Command c = {.type = CMD_HASH};
        bool frozen;
        int r;

        if (!path)
                return -EINVAL;
        pthread_mutex_lock(&p->mutex);
        frozen = p->frozen;
        pthread_mutex_unlock(&p->mutex);
        if (!frozen)
                return -EBUSY;
        c.hash.path = strdup(path);
        if (!c.hash.path)
                return -ENOMEM;
        c.hash.seq = ++p->hash_seq;
        r = primary_push(p, &c);
        if (r < 0) {
                command_done(&c);
                return r;
        }
        pthread_mutex_lock(&p->mutex);
        r = WAIT_FOR(p, p->hash_done >= p->hash_seq);
        if (r == 0)
                r = p->hash_result;
        pthread_mutex_unlock(&p->mutex);
        return r;
}

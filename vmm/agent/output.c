/* SPDX-License-Identifier: GPL-2.0-or-later */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "output.h"

typedef struct Chunk {
        struct Chunk *next;
        uint64_t epoch;
        size_t len, cap;
        uint8_t data[];
} Chunk;

typedef struct Channel {
        Chunk *head;
        Chunk **tail_link; /* the pointer that points at the last chunk (or &head) */
        size_t held;
} Channel;

struct OutputQueue {
        /*
         * Lock order: release_lock, then lock. release_lock is held across
         * every call of fn, so callbacks are serialized and in order.
         */
        pthread_mutex_t release_lock;
        pthread_mutex_t lock;
        bool holding;
        uint64_t epoch;
        size_t limit;
        OutputReleaseFn fn;
        void *userdata;
        unsigned n_channels;
        Channel ch[];
};

#define CHUNK_MIN 64

int output_queue_new(unsigned n_channels, size_t limit, OutputReleaseFn fn, void *userdata,
                     OutputQueue **ret)
{
        OutputQueue *q;

        if (n_channels == 0 || n_channels > 64 || limit == 0 || !ret)
                return -EINVAL;
        q = calloc(1, sizeof(*q) + n_channels * sizeof(Channel));
        if (!q)
                return -ENOMEM;
        pthread_mutex_init(&q->release_lock, NULL);
        pthread_mutex_init(&q->lock, NULL);
        q->limit = limit;
        q->fn = fn;
        q->userdata = userdata;
        q->n_channels = n_channels;
        for (unsigned i = 0; i < n_channels; i++)
                q->ch[i].tail_link = &q->ch[i].head;
        *ret = q;
        return 0;
}

static void chunk_list_free(Chunk *c)
{
        while (c) {
                Chunk *n = c->next;
                free(c);
                c = n;
        }
}

OutputQueue *output_queue_free(OutputQueue *q)
{
        if (!q)
                return NULL;
        for (unsigned i = 0; i < q->n_channels; i++)
                chunk_list_free(q->ch[i].head);
        pthread_mutex_destroy(&q->lock);
        pthread_mutex_destroy(&q->release_lock);
        free(q);
        return NULL;
}

/* Appends under q->lock. Coalesces with the last chunk when it has the same epoch. */
static int channel_append(Channel *ch, uint64_t epoch, const void *buf, size_t len)
{
        Chunk *t = ch->head ? *ch->tail_link : NULL;

        if (t && t->epoch == epoch) {
                if (t->cap - t->len < len) {
                        size_t cap = MAX(t->cap * 2, t->len + len);
                        Chunk *n = realloc(t, sizeof(Chunk) + cap);
                        if (!n)
                                return -ENOMEM;
                        n->cap = cap;
                        *ch->tail_link = n;
                        t = n;
                }
                memcpy(t->data + t->len, buf, len);
                t->len += len;
                return 0;
        }

        size_t cap = MAX(len, (size_t) CHUNK_MIN);
        Chunk *c = malloc(sizeof(Chunk) + cap);
        if (!c)
                return -ENOMEM;
        *c = (Chunk){.epoch = epoch, .len = len, .cap = cap};
        memcpy(c->data, buf, len);
        if (t) {
                t->next = c;
                ch->tail_link = &t->next;
        } else {
                ch->head = c;
                ch->tail_link = &ch->head;
        }
        return 0;
}

int output_queue_submit(OutputQueue *q, unsigned channel, const void *buf, size_t len)
{
        int r;

        if (!q || channel >= q->n_channels || (len > 0 && !buf))
                return -EINVAL;
        if (len == 0)
                return 0;

        pthread_mutex_lock(&q->lock);
        if (q->holding) {
                Channel *ch = &q->ch[channel];
                if (len > q->limit || ch->held > q->limit - len)
                        r = -ENOBUFS;
                else {
                        r = channel_append(ch, q->epoch, buf, len);
                        if (r >= 0)
                                ch->held += len;
                }
                pthread_mutex_unlock(&q->lock);
                return r;
        }
        pthread_mutex_unlock(&q->lock);

        /* Pass-through. Re-check under both locks: holding may have begun meanwhile. */
        pthread_mutex_lock(&q->release_lock);
        pthread_mutex_lock(&q->lock);
        if (q->holding) {
                pthread_mutex_unlock(&q->lock);
                pthread_mutex_unlock(&q->release_lock);
                return output_queue_submit(q, channel, buf, len);
        }
        pthread_mutex_unlock(&q->lock);
        if (q->fn)
                q->fn(q->userdata, channel, buf, len);
        pthread_mutex_unlock(&q->release_lock);
        return 0;
}

void output_queue_hold(OutputQueue *q, uint64_t epoch)
{
        pthread_mutex_lock(&q->lock);
        q->holding = true;
        q->epoch = epoch;
        pthread_mutex_unlock(&q->lock);
}

/* Called with release_lock held; takes lock itself; calls fn with only release_lock held. */
static uint64_t release_locked(OutputQueue *q, uint64_t epoch, bool all, bool unhold)
{
        Chunk *taken[64] = {}; /* n_channels <= 64 */
        uint64_t bytes = 0;

        pthread_mutex_lock(&q->lock);
        if (unhold)
                q->holding = false;
        for (unsigned i = 0; i < q->n_channels; i++) {
                Channel *ch = &q->ch[i];
                Chunk **link = &ch->head;

                while (*link && (all || (*link)->epoch <= epoch)) {
                        ch->held -= (*link)->len;
                        link = &(*link)->next;
                }
                if (link == &ch->head)
                        continue; /* nothing due on this channel */

                /* Cut the list at *link: [head, *link) is released, the rest stays. */
                if (ch->tail_link == link)
                        ch->tail_link = &ch->head; /* the tail becomes the new head */
                taken[i] = ch->head;
                ch->head = *link;
                *link = NULL;
                if (!ch->head)
                        ch->tail_link = &ch->head;
        }
        pthread_mutex_unlock(&q->lock);

        for (unsigned i = 0; i < q->n_channels; i++) {
                for (Chunk *c = taken[i]; c; c = c->next) {
                        bytes += c->len;
                        if (q->fn)
                                q->fn(q->userdata, i, c->data, c->len);
                }
                chunk_list_free(taken[i]);
        }
        return bytes;
}

uint64_t output_queue_release(OutputQueue *q, uint64_t epoch)
{
        uint64_t b;

        pthread_mutex_lock(&q->release_lock);
        b = release_locked(q, epoch, false, false);
        pthread_mutex_unlock(&q->release_lock);
        return b;
}

uint64_t output_queue_unhold(OutputQueue *q)
{
        uint64_t b;

        pthread_mutex_lock(&q->release_lock);
        b = release_locked(q, 0, true, true);
        pthread_mutex_unlock(&q->release_lock);
        return b;
}

uint64_t output_queue_orphan(OutputQueue *q)
{
        uint64_t b = 0;

        pthread_mutex_lock(&q->lock);
        q->epoch = 0;
        for (unsigned i = 0; i < q->n_channels; i++) {
                for (Chunk *c = q->ch[i].head; c; c = c->next)
                        c->epoch = 0;
                b += q->ch[i].held;
        }
        pthread_mutex_unlock(&q->lock);
        return b;
}

bool output_queue_holding(OutputQueue *q)
{
        bool h;

        pthread_mutex_lock(&q->lock);
        h = q->holding;
        pthread_mutex_unlock(&q->lock);
        return h;
}

uint64_t output_queue_held_bytes(OutputQueue *q)
{
        uint64_t b = 0;

        pthread_mutex_lock(&q->lock);
        for (unsigned i = 0; i < q->n_channels; i++)
                b += q->ch[i].held;
        pthread_mutex_unlock(&q->lock);
        return b;
}

size_t output_queue_space(OutputQueue *q, unsigned channel)
{
        size_t s;

        if (!q || channel >= q->n_channels)
                return 0;
        pthread_mutex_lock(&q->lock);
        /* Not holding: anything is accepted; report the limit as a sane chunk size. */
        s = q->holding ? q->limit - q->ch[channel].held : q->limit;
        pthread_mutex_unlock(&q->lock);
        return s;
}

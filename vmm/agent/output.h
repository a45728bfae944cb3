/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * Output-commit queue (internal to libdirtyrep-agent; no KVM, unit-tested).
 *
 * Per channel, a FIFO of byte chunks tagged with the epoch that was running
 * when they were submitted. While the queue is "holding", submissions are
 * queued; otherwise they go straight to the release function. Release hands
 * chunks on in submission order, stopping at the first chunk of a later
 * epoch, so output never overtakes older output on its channel.
 *
 * All release callbacks, pass-through ones included, run under one mutex,
 * so a pass-through submit cannot overtake a release in progress. The
 * release function must therefore not call back into the queue.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "macros.h"

typedef struct OutputQueue OutputQueue;
typedef void (*OutputReleaseFn)(void *userdata, unsigned channel, const void *buf, size_t len);

/* limit: bytes held per channel. fn may be NULL (output discarded). */
int output_queue_new(unsigned n_channels, size_t limit, OutputReleaseFn fn, void *userdata,
                     OutputQueue **ret);
OutputQueue *output_queue_free(OutputQueue *q);
DEFINE_TRIVIAL_CLEANUP_FUNC(OutputQueue *, output_queue_free);

/*
 * 0 (queued, or released at once when not holding), -EINVAL (bad channel),
 * -ENOBUFS (the channel would hold more than the limit; nothing queued),
 * -ENOMEM.
 */
int output_queue_submit(OutputQueue *q, unsigned channel, const void *buf, size_t len);

/* Start (or keep) holding; output submitted from now on is tagged `epoch`. */
void output_queue_hold(OutputQueue *q, uint64_t epoch);

/* Stop holding and release everything held. Returns the bytes released. */
uint64_t output_queue_unhold(OutputQueue *q);

/* Keeps holding, but everything held (and submitted from now on, until the next
 * output_queue_hold()) is tagged epoch 0: the first release of the next client's session
 * lets it out. For a client that vanished without giving up protection. Returns the
 * bytes held. */
uint64_t output_queue_orphan(OutputQueue *q);

/* Releases every chunk of epoch <= `epoch`, in order. Returns the bytes released. */
uint64_t output_queue_release(OutputQueue *q, uint64_t epoch);

bool output_queue_holding(OutputQueue *q);
uint64_t output_queue_held_bytes(OutputQueue *q);
size_t output_queue_space(OutputQueue *q, unsigned channel);

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Checkpoint images taken by the primary at its seals (docs/images.md): one
 * at a time. The loop queues a request (primary_checkpoint_image()); the
 * epoch thread pre-copies RAM while the VM runs, copies the epoch's own pages
 * in the seal's pause, and a writer thread writes the image (fsyncs take a
 * while; harvesting goes on). The result goes back to the loop, which runs
 * the caller's callback.
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

typedef struct ImageJob {
        Epoch *e;
        ImageCapture *cap;
        DirtySet *covered; /* NULL: full image */
        uint8_t *state;
        size_t state_len;
        char *dir, *parent;
        bool compress, has_parent_id;
        uint8_t parent_id[16];
        uint64_t epoch, pause_ns;
        int result;
        ImageWriteStats stats;
        char err[256];
} ImageJob;

static void image_job_free(ImageJob *j);
DEFINE_TRIVIAL_CLEANUP_FUNC_VOID(ImageJob *, image_job_free);

/* ---- checkpoint images ---------------------------------------------------------------------- */

static void image_job_free(ImageJob *j)
{
        if (!j)
                return;
        image_capture_free(j->cap);
        dirtyset_free(j->covered);
        free(j->state);
        free(j->dir);
        free(j->parent);
        free(j);
}

/* Epoch thread: hands an image result to the loop (primary_checkpoint_image's callback). */
static void image_post(Epoch *e, int r, uint64_t epoch, uint64_t pause_ns, const ImageWriteStats *st,
                       const char *err)
{
        Primary *p = e->p;

        pthread_mutex_lock(&p->mutex);
        p->image_result = r;
        p->image_epoch = epoch;
        p->image_pause_ns = pause_ns;
        p->image_stats = st ? *st : (ImageWriteStats){};
        snprintf(p->image_err, sizeof(p->image_err), "%s", r < 0 ? (err && *err ? err : strerror(-r)) : "");
        p->image_ready = true;
        pthread_mutex_unlock(&p->mutex);
        wake(p->notify_fd);
}

/* The writer: fsyncs can take a while, so not on the epoch thread (harvesting goes on). */
static void *image_writer(void *userdata)
{
        ImageJob *j = userdata;
        ImageWriteOptions o = {
                .vm_name = j->e->p->vm->name,
                .vm_uuid = j->e->p->uuid,
                .state = j->state,
                .state_len = j->state_len,
                .covered = j->parent ? j->covered->w : NULL,
                .parent = j->parent,
                .parent_id = j->has_parent_id ? j->parent_id : NULL,
                .compress = j->compress,
                .epoch = j->epoch,
        };

        j->result = image_capture_write(j->cap, j->dir, &o, &j->stats, j->err, sizeof(j->err));
        atomic_store(&j->e->image_written, true);
        wake(j->e->p->wake_fd);
        return NULL;
}

/* Epoch thread: collects a finished writer (waits for it when `wait`). */
void epoch_image_collect(Epoch *e, bool wait)
{
        ImageJob *j;

        if (!e->image_thread_started || (!wait && !atomic_load(&e->image_written)))
                return;
        pthread_join(e->image_thread, NULL);
        e->image_thread_started = false;
        atomic_store(&e->image_written, false);
        j = TAKE_PTR(e->image_job);
        if (j->result >= 0) {
                memcpy(e->last_image_id, j->stats.image_id, sizeof(e->last_image_id));
                e->image_chain = true;
                log_info("VM %s: image %s written at epoch %" PRIu64 ": %" PRIu64 " pages stored, %" PRIu64
                         " bytes, seal pause %.3f ms",
                         e->p->vm->name, j->dir, j->epoch, j->stats.present_pages, j->stats.total_bytes,
                         (double) j->pause_ns / 1e6);
        } else {
                /* Nothing is lost for the next image: its pages count from the last good one. */
                (void) dirtyset_merge(&e->since_image, j->covered);
                log_error_errno(j->result, "VM %s: writing image %s failed: %s", e->p->vm->name, j->dir,
                                j->err);
        }
        image_post(e, j->result, j->epoch, j->pause_ns, &j->stats, j->err);
        image_job_free(j);
}

/* Epoch thread: takes up a request: pre-copies now (VM running), the rest at the next seal. */
void epoch_image_start(Epoch *e)
{
        _cleanup_free_ char *dir = NULL, *parent = NULL;
        _cleanup_(image_capture_freep) ImageCapture *cap = NULL;
        const uint8_t *ram[IMAGE_MAX_REGIONS];
        ImageLayout il;
        bool compress;
        int64_t n;
        int r;

        if (e->image_cap || e->image_thread_started || !e->image_req.dir)
                return;
        dir = TAKE_PTR(e->image_req.dir);
        parent = TAKE_PTR(e->image_req.parent);
        compress = e->image_req.compress;

        if (parent && !e->image_chain)
                return image_post(
                        e, -ESTALE, 0, 0, NULL,
                        "no image was taken since dirtyrepd attached to this VMM: take a full one first "
                        "(without a parent)");
        r = image_layout_from_vmm(e->lay, &il, ram);
        if (r >= 0)
                r = image_capture_new(&il, ram, &cap);
        if (r < 0)
                return image_post(e, r, 0, 0, NULL, "cannot set up image staging for this VM's layout");
        /* Pages of since_image were reset at their seals (collect -> reset -> copy); a
         * full image copies all of RAM. Either way, a page written after its copy is
         * logged in the running epoch and copied again at its seal, paused. */
        n = image_capture_copy(cap, parent ? e->since_image.w : NULL);
        if (n < 0)
                return image_post(e, (int) n, 0, 0, NULL, "copying pages into image staging failed");
        e->image_cap = TAKE_PTR(cap);
        e->image_dir = TAKE_PTR(dir);
        e->image_parent = TAKE_PTR(parent);
        e->image_compress = compress;
}

/*
 * At the seal, RESUME done: the epoch's pages are in the capture (copied in
 * the pause); hand it to a writer thread. since_image restarts empty: the
 * next image counts from this one. Otherwise the epoch's pages join it.
 */
void epoch_image_seal_done(Epoch *e, uint64_t sealed, uint64_t pause_ns, const uint8_t *state,
                           size_t state_len, int copy_result)
{
        _cleanup_(image_job_freep) ImageJob *j = NULL;
        int r;

        if (!e->image_cap) {
                (void) dirtyset_merge(&e->since_image, e->run);
                return;
        }
        j = calloc(1, sizeof(*j));
        if (j)
                j->covered = dirtyset_new(e->lay->total_pages);
        if (j && j->covered && state_len > 0)
                j->state = memdup(state, state_len);
        if (!j || !j->covered || !j->state || copy_result < 0) {
                r = copy_result < 0 ? copy_result : -ENOMEM;
                (void) dirtyset_merge(&e->since_image, e->run);
                e->image_cap = image_capture_free(e->image_cap);
                e->image_dir = mfree(e->image_dir);
                e->image_parent = mfree(e->image_parent);
                return image_post(e, r, sealed, pause_ns, NULL, "taking the image at the seal failed");
        }
        (void) dirtyset_merge(j->covered, &e->since_image);
        (void) dirtyset_merge(j->covered, e->run);
        dirtyset_clear(&e->since_image);
        j->e = e;
        j->cap = TAKE_PTR(e->image_cap);
        j->dir = TAKE_PTR(e->image_dir);
        j->parent = TAKE_PTR(e->image_parent);
        j->compress = e->image_compress;
        j->state_len = state_len;
        j->epoch = sealed;
        j->pause_ns = pause_ns;
        if (j->parent) {
                j->has_parent_id = true;
                memcpy(j->parent_id, e->last_image_id, sizeof(j->parent_id));
        }
        atomic_store(&e->image_written, false);
        r = -pthread_create(&e->image_thread, NULL, image_writer, j);
        if (r < 0) {
                (void) dirtyset_merge(&e->since_image, j->covered);
                return image_post(e, r, sealed, pause_ns, NULL, "cannot start the image writer thread");
        }
        e->image_thread_started = true;
        e->image_job = TAKE_PTR(j);
}

/* Epoch thread exiting: finish or fail what is pending, so every request is answered. */
void epoch_image_shutdown(Epoch *e)
{
        epoch_image_collect(e, true);
        if (e->image_cap) {
                e->image_cap = image_capture_free(e->image_cap);
                e->image_dir = mfree(e->image_dir);
                e->image_parent = mfree(e->image_parent);
                image_post(e, -ESTALE, 0, 0, NULL,
                           "replication stopped before the image's epoch was sealed");
        }
        if (e->image_req.dir) {
                e->image_req.dir = mfree(e->image_req.dir);
                e->image_req.parent = mfree(e->image_req.parent);
                image_post(e, -ESTALE, 0, 0, NULL, "replication stopped before the image was taken");
        }
}

void epoch_image_request(Epoch *e, Command *c)
{
        if (e->image_req.dir)
                /* The loop sends one at a time (image_busy): not reached. */
                return image_post(e, -EBUSY, 0, 0, NULL, "an image is being taken");
        e->image_req.dir = TAKE_PTR(c->image.dir);
        e->image_req.parent = TAKE_PTR(c->image.parent);
        e->image_req.compress = c->image.compress;
}

/* Loop thread: runs a finished image's callback (or, when the Primary goes away, a cancelled one). */
void primary_image_deliver(Primary *p, bool cancel)
{
        primary_image_done_t cb;
        PrimaryImageResult res = {};
        char err[sizeof(p->image_err)];
        _cleanup_free_ char *dir = NULL;
        void *userdata;

        pthread_mutex_lock(&p->mutex);
        if (!p->image_cb || (!p->image_ready && !cancel)) {
                pthread_mutex_unlock(&p->mutex);
                return;
        }
        if (p->image_ready) {
                res.result = p->image_result;
                res.epoch = p->image_epoch;
                res.pause_ns = p->image_pause_ns;
                res.present_pages = p->image_stats.present_pages;
                res.stored_bytes = p->image_stats.stored_bytes;
                res.total_bytes = p->image_stats.total_bytes;
                res.write_ns = p->image_stats.write_ns;
                snprintf(err, sizeof(err), "%s", p->image_err);
        } else {
                res.result = -ECANCELED;
                snprintf(err, sizeof(err), "the VM's primary role was stopped");
        }
        res.error = err;
        cb = p->image_cb;
        userdata = p->image_userdata;
        dir = TAKE_PTR(p->image_req_dir);
        res.dir = dir;
        p->image_cb = NULL;
        p->image_ready = p->image_busy = false;
        pthread_mutex_unlock(&p->mutex);
        cb(p, &res, userdata);
}

int primary_checkpoint_image(Primary *p, const char *dir, const char *parent, bool compress,
                             primary_image_done_t done, void *userdata)
{
        _cleanup_(command_done) Command c = {
                .type = CMD_IMAGE,
                .image.compress = compress,
        };
        _cleanup_free_ char *req_dir = NULL;
        int r;

        if (!dir || !*dir || !done)
                return -EINVAL;
        pthread_mutex_lock(&p->mutex);
        if (p->image_busy || p->frozen)
                r = -EBUSY;
        else
                r = primary_seal_request_possible_locked(p);
        pthread_mutex_unlock(&p->mutex);
        if (r < 0)
                return r;
        c.image.dir = strdup(dir);
        c.image.parent = parent ? strdup(parent) : NULL;
        req_dir = strdup(dir);
        if (!c.image.dir || !req_dir || (parent && !c.image.parent))
                return -ENOMEM;
        /* Before the push: the epoch thread may answer at once. */
        pthread_mutex_lock(&p->mutex);
        p->image_req_dir = TAKE_PTR(req_dir);
        p->image_busy = true;
        p->image_ready = false;
        p->image_cb = done;
        p->image_userdata = userdata;
        pthread_mutex_unlock(&p->mutex);
        r = primary_push(p, &c);
        if (r < 0) {
                pthread_mutex_lock(&p->mutex);
                p->image_req_dir = mfree(p->image_req_dir);
                p->image_busy = false;
                p->image_cb = NULL;
                pthread_mutex_unlock(&p->mutex);
        }
        return r;
}

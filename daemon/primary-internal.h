/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * Internal to daemon/primary*.c: the Primary (role.h) and its epoch thread.
 *
 * Files. primary.c: the epoch thread's pipeline (send, harvest, history,
 * resync, pre-copy, seal, ship), its loop, and the Primary's life
 * (new/start/free). primary-command.c: the command queue and the
 * synchronous requests built on it. primary-image.c: checkpoint images
 * taken at a seal. primary-guard.c: the split-brain guard and how a primary
 * stops its VMM. primary-link.c: the replication Link's callbacks,
 * reconnects and telling the standby why replication stopped.
 * primary-attach.c: attaching to the VMM (on a worker thread of its own)
 * and starting the epoch thread.
 * primary-status.c: the status snapshot.
 *
 * The boundary. Two threads per VM:
 *
 *   loop thread (sd-event, the caller's)        epoch thread (one per VM)
 *   owns: the Link, the timers, the Hello,      owns: the VmmLink, the Tracker,
 *         image callbacks, request counters           the Epoch (dirty sets, history,
 *                                                      staging, image capture)
 *        |  commands: Command in p->commands, then wake_fd     ^
 *        +-----------------------------------------------------+
 *        ^  completions and status: fields under p->mutex,     |
 *        |  p->cond for the synchronous requests, notify_fd    |
 *        +-----------------------------------------------------+
 *
 * Commands in (primary_push(), loop thread only): link generation (up with
 * the standby's Welcome, or down), checkpoint, freeze, freeze cancel, thaw,
 * page hashes, checkpoint image. The epoch thread takes them all at one
 * place, the top of its loop (epoch_take_commands()), and acts on them in
 * order; a link change replaces one still queued (only the newest
 * generation matters). The queue is bounded (COMMAND_QUEUE_MAX, one slot
 * kept for a link change): a full queue answers -EBUSY.
 *
 * Out, under p->mutex: the completions (checkpoint_done/epoch, frozen,
 * hash_done/result, the image result) with a broadcast on p->cond, which
 * the synchronous requests wait on (at most REQUEST_TIMEOUT_USEC); the
 * image result and a failure also wake the loop through notify_fd. Status
 * out: the epoch thread publishes its counters, pauses, in-flight count and
 * sync progress in one struct, p->pub (EpochStats), which
 * primary_get_status() copies whole under the mutex: a snapshot, never
 * fields of two different seals.
 *
 * Shared state that is neither: `stop` (the loop sets it once, in
 * primary_free()); `link`, `link_up`, `link_gen` and `link_users` (the
 * loop writes them, the thread reads them in ep_send(), see below); `guard`
 * (the loop decides it, the thread applies it to the VM); `acked`
 * (atomic, release/acquire) and `draining` (atomic hint). The loop never
 * calls into the VmmLink; the thread never touches an sd-event source.
 *
 * Sending from the epoch thread. link_send() may be called from any thread,
 * but the Link is freed on the loop thread when it goes down. The thread
 * takes the pointer under the mutex and counts itself in link_users; the
 * loop, before link_free(), clears p->link and waits until link_users is 0.
 * That wait is short: a Link that is down refuses every send at once
 * (-ENOTCONN), and the thread only ever sends non-blocking (-EAGAIN: it
 * keeps harvesting for a millisecond and tries again), so nothing the
 * thread does waits for the loop while it holds a use.
 */

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <openssl/types.h>
#include <systemd/sd-event.h>

#include "dirtyset.h"
#include "image-take.h"
#include "imagefile.h"
#include "link.h"
#include "macros.h"
#include "pages.h"
#include "role.h"
#include "track.h"
#include "vmm-link.h"

#define ATTACH_RETRY_USEC    (1 * USEC_PER_SEC)
#define GONE_CHECK_USEC      (50 * 1000ULL) /* report_stop(): is a VMM that still answers dying? */
#define GONE_CHECKS          20u
#define BACKOFF_MIN_MS       100u
#define BACKOFF_MAX_MS       2000u
#define RING_HARVEST_USEC    1000u /* ring: collect every millisecond */
#define PRECOPY_RESET_USEC   2000u /* pre-copy: re-protect at least this often so pages become copyable */
#define PAUSE_TIMEOUT_MS     2000u
#define PAUSE_TIMEOUTS_MAX   5u    /* in a row, each followed by RESUME, before protection ends */
#define PAUSE_WINDOW         1024u /* seals the pause percentiles are computed over */
#define BATCH_RECORDS        256u  /* per PAGES frame: ~1 MiB raw, well under REPL_MAX_FRAME */
#define BATCH_CAP            (PAGE_BATCH_HEADER + BATCH_RECORDS * PAGE_RECORD_MAX)
#define PRECOPY_BATCHES      4u /* per harvest tick, so seals and requests are not starved */
#define REQUEST_TIMEOUT_USEC (30 * USEC_PER_SEC)

/*
 * Split-brain guard (output side). Once a standby has committed an epoch of
 * this primary, losing it means the standby may promote itself: from then on
 * no output is released (nothing is acked) until SplitBrainTimeoutMs= has
 * passed; then SplitBrainPolicy= decides: continue unprotected (held output
 * goes out, and new output at once) or suspend the VM. A standby that
 * connects again ends either (the resync is protected again: output waits
 * for its ACK).
 */
typedef enum Guard {
        GUARD_NONE,        /* output follows ACKs */
        GUARD_HOLDING,     /* standby lost: output held, timer running */
        GUARD_UNPROTECTED, /* output released at once (policy continue, or promoted) */
        GUARD_SUSPENDED,   /* VM paused (policy suspend) */
} Guard;

typedef struct History {
        uint64_t epoch;
        bool full;      /* a full epoch: the standby's content before it is unknown */
        DirtySet *bits; /* pages sent in that epoch */
} History;

/* A command from the loop to the epoch thread (the boundary above). */
typedef enum CommandType {
        CMD_NONE,          /* no command (a placeholder) */
        CMD_LINK,          /* the Link went up (with the standby's Welcome) or down */
        CMD_CHECKPOINT,    /* seal now; completion: checkpoint_done >= seq */
        CMD_FREEZE,        /* seal and stay paused; completion: frozen */
        CMD_FREEZE_CANCEL, /* a freeze whose caller gave up: do not freeze */
        CMD_THAW,          /* resume a frozen VM; completion: !frozen */
        CMD_HASH,          /* page hashes of frozen RAM; completion: hash_done >= seq */
        CMD_IMAGE,         /* a checkpoint image at the next seal; completion: image_ready */
} CommandType;

typedef struct Command {
        CommandType type;
        union {
                struct {
                        uint64_t gen; /* p->link_gen after the change */
                        bool up;
                        bool ours;     /* the Welcome names our session */
                        uint64_t last; /* the standby's last committed epoch */
                } link;
                struct {
                        uint64_t seq;
                } checkpoint;
                struct {
                        char *path; /* owned */
                        uint64_t seq;
                } hash;
                struct {
                        char *dir, *parent; /* owned; parent NULL: a full image */
                        bool compress;
                } image;
        };
} Command;

#define COMMAND_QUEUE_MAX 16u

typedef struct CommandQueue {
        pthread_mutex_t mutex; /* only the queue's: never held with p->mutex */
        Command ring[COMMAND_QUEUE_MAX];
        size_t head, n;
} CommandQueue;

/*
 * Status out: the epoch thread's side of primary_get_status(). Written by the epoch thread
 * only (the loop resets n_pauses), under p->mutex, at its publish points: each seal (seal_publish),
 * each ACK it processes (inflight), the start of a resync and the walk of a full one. The loop
 * copies it whole under the mutex and derives the status from the copy, outside the lock.
 */
typedef struct EpochStats {
        uint64_t last_sealed;
        uint64_t full_syncs, incremental_syncs;
        uint64_t pauses[PAUSE_WINDOW];    /* seal pauses as dirtyrepd measured them, ns */
        uint64_t vm_pauses[PAUSE_WINDOW]; /* the agent's view of the same seals; 0: not reported */
        uint64_t n_pauses;
        uint64_t pages_last_epoch;
        double dirty_rate;
        uint64_t inflight, staging_bytes;
        uint64_t page_bytes_in, page_bytes_out;
        bool sync_full;             /* the running resync is a full one */
        uint64_t sync_start_usec;   /* when it began */
        uint64_t sync_walked_pages; /* full sync: pages of RAM walked and handed to the link */
} EpochStats;

struct Primary {
        sd_event *event;
        const DaemonConfig *dcfg;
        const VmConfig *vm;
        uint8_t *secret;
        size_t secret_len;
        SSL_CTX *tls; /* or NULL: plaintext */
        uint8_t session[16];
        uint8_t uuid[16];
        char host[64];

        /* Loop thread only. */
        sd_event_source *attach_timer, *reconnect_timer, *notify_source, *split_timer, *gone_timer;
        /* The attach worker (primary-attach.c): at most one runs; it owns job until it
         * signals attach_fd, then the loop joins it and takes job back. */
        sd_event_source *attach_source;
        int attach_fd; /* attach worker -> loop */
        pthread_t attach_thread;
        bool attach_running;
        struct AttachJob *attach_job;
        primary_attach_done_t attach_cb;
        void *attach_userdata;
        unsigned gone_checks; /* vmm_link_listening() re-checks after the epoch thread stopped */
        unsigned backoff_ms;
        bool started;
        Dr__Repl__Hello hello;
        Dr__Repl__MemRegion *regions;
        Dr__Repl__MemRegion **region_ptrs;
        uint64_t total_pages;
        bool fail_reported;
        primary_image_done_t image_cb; /* loop only */
        void *image_userdata;

        /* Loop thread only: the last sequence numbers handed out (Command). */
        uint64_t checkpoint_seq, hash_seq;
        CommandQueue commands; /* loop -> epoch thread */

        pthread_t thread;
        bool thread_started;
        int wake_fd;   /* loop -> epoch thread */
        int notify_fd; /* epoch thread -> loop */

        pthread_mutex_t mutex;
        pthread_cond_t cond; /* requests done, link_users dropped */

        /* --- under mutex. Who writes: (L) the loop, (E) the epoch thread, (L,E) both. --- */
        /* The shared link handshake (see "Sending from the epoch thread"). */
        bool stop;           /* (L) once, in primary_free() */
        Link *link;          /* (L) NULL when no Link is up or connecting */
        unsigned link_users; /* (E, L waits for 0) epoch-thread sends in progress on link */
        uint64_t link_gen;   /* (L) bumped at every up and down; the thread learns it by CMD_LINK */
        bool link_up;        /* (L) */
        char peer[80];       /* (L) */
        /* State and its explanation. */
        bool attached;    /* (L at attach, E when the pipeline ends) */
        bool failed;      /* (L,E) */
        char detail[256]; /* (L,E) */
        Guard guard;      /* (L) decided by the loop, applied by the epoch thread */
        bool suspended;   /* (E; L at attach) the VM is paused for GUARD_SUSPENDED */
        bool had_standby; /* (L) a standby committed an epoch of this primary */
        bool promoted;    /* (L) */
        uint64_t promoted_from;
        /* Resyncs: started by the epoch thread, completed by the loop on their ACK. */
        uint64_t sync_epoch;     /* (L,E) epoch of the running resync; protected once acked */
        bool syncing;            /* (L,E) */
        uint64_t last_sync_usec; /* (L) how long the last completed one took, to its ACK */
        bool last_sync_full;     /* (L) */
        /* Status out: what the epoch thread publishes (E; L only resets pub.n_pauses), read by
         * primary_get_status() as one copy; and the loop's own ACK counters (L). */
        EpochStats pub;
        uint64_t epochs_committed; /* (L) */
        uint64_t last_commit_usec; /* (L) when an ACK last advanced the committed epoch */
        uint64_t commit_gap_max_usec;
        uint64_t commit_gaps[COMMIT_GAP_BUCKETS];
        /* Completions of commands (E), with a broadcast on cond (the boundary above). */
        uint64_t checkpoint_done, checkpoint_epoch;
        bool frozen;
        uint64_t frozen_epoch;
        int hash_result;
        uint64_t hash_done;
        /* Checkpoint images: one at a time. The loop pushes CMD_IMAGE; the epoch
         * thread pre-copies, takes the image at its next seal, and a writer
         * thread writes it; the result goes back to the loop (image_ready, notify_fd). */
        bool image_busy;     /* (L) a request is out */
        char *image_req_dir; /* (L) kept for the result */
        bool image_ready;    /* (E, L clears it) the result below is there */
        int image_result;
        uint64_t image_epoch;
        ImageWriteStats image_stats;
        uint64_t image_pause_ns;
        char image_err[256];

        /* Written by the loop on ACK, read by the epoch thread: the standby
         * committed every epoch <= acked. Release/acquire pairs the two. */
        _Atomic uint64_t acked;
        /* primary_drain(): the daemon is stopping; no new seals (only a hint, relaxed). */
        _Atomic bool draining;
        uint64_t drain_target; /* loop only: the last epoch sealed when the drain began */
};

/* The epoch thread's own state. */
typedef struct Epoch {
        Primary *p;
        VmmLink *vmm;
        Tracker t;
        const VmmLayout *lay;
        /* Dirty sets cost what is in them, not what RAM is (dirtyset.h): nothing
         * below walks a RAM-sized bitmap between two seals. */
        DirtySet col;   /* collected, ring entries not yet reset */
        DirtySet fresh; /* collected and re-protected: may be copied */
        DirtySet *run;  /* sent (or to be sent) in the running epoch */
        History *hist;  /* sealed, not acked, oldest first */
        size_t n_hist;
        DirtySet **pool; /* spare sets */
        size_t n_pool;
        uint64_t cur;            /* the running epoch */
        unsigned pause_timeouts; /* PAUSEs in a row that timed out (seal postponed) */
        bool cur_full;
        uint64_t last_sealed;
        uint64_t released;   /* output released up to here */
        uint64_t acked_seen; /* history pruned up to here */
        uint64_t epoch_start_us, last_collect_us, last_reset_us;
        /* The link session the running epoch is being sent on. */
        uint64_t gen;
        bool session; /* EPOCH_BEGIN(cur) went out on link generation gen */
        uint64_t page_records;
        /* Staging: page contents copied in the pause, shipped after resume. */
        uint64_t *stage_pages;
        uint8_t *stage_data;
        size_t stage_cap, stage_n;
        uint8_t *batch_buf;
        PageBatchStats pstats;
        uint64_t dirty_since_seal;
        uint64_t seals_handled_ckpt;
        /* Checkpoint images. since_image: pages dirtied in the epochs sealed since
         * the last image (or since attach); an incremental image stores those plus
         * its own epoch's. The first image after attach must be full: pages written
         * before tracking started are in no set. */
        DirtySet since_image;
        bool image_chain; /* an image was written since attach */
        uint8_t last_image_id[16];
        ImageCapture *image_cap; /* pre-copied, taken at the next seal */
        char *image_dir, *image_parent;
        bool image_compress;
        /* The writer thread of the last image; joined before the next one and at exit. */
        pthread_t image_thread;
        bool image_thread_started;
        _Atomic bool image_written; /* the writer finished; the epoch thread collects it */
        struct ImageJob *image_job;
        bool suspended; /* paused by the split-brain guard */
        /* Requests taken from the command queue. */
        bool frozen, freeze_pending;
        uint64_t checkpoint_want, checkpoint_done;
        struct {
                char *dir, *parent; /* dir NULL: none */
                bool compress;
        } image_req; /* waiting for epoch_image_start() */
} Epoch;

/* ---- shared helpers (primary.c) ------------------------------------------------------- */

static inline void wake(int fd)
{
        (void) eventfd_write(fd, 1);
}

/* Under p->mutex: the Primary failed; detail says why. */
void primary_set_failed_locked(Primary *p, const char *fmt, ...) _printf_(2, 3);
/* The same, taking p->mutex. */
void primary_fail(Primary *p, const char *fmt, ...) _printf_(2, 3);

/* ---- epoch thread (primary.c) --------------------------------------------------------- */

/* Allocates the Epoch's sets and buffers for its VmmLink's layout; -ENOMEM. */
int epoch_init(Epoch *e);
/* Frees what the Epoch holds (answering pending image requests), not e itself. */
void epoch_free(Epoch *e);
/* pthread entry: runs the epoch loop, stops the VMM, frees e. */
void *epoch_thread(void *userdata);
/* Acks arrived: releases held output and forgets committed epochs. */
int epoch_handle_acks(Epoch *e);

/* Called with p->mutex held: -ENOTCONN, -EBUSY when a synchronous seal request cannot be served now. */
int primary_seal_request_possible_locked(Primary *p);

/* ---- the command queue (primary-command.c) -------------------------------------------- */

void command_queue_init(CommandQueue *q);
/* Frees what is still queued. */
void command_queue_done(CommandQueue *q);
/* Moves up to max commands, oldest first, to ret (the caller owns them now). Returns how many. */
size_t command_queue_take(CommandQueue *q, Command *ret, size_t max);
/* Frees what a command owns. */
void command_done(Command *c);
/* Loop thread: queues c and wakes the epoch thread. On success the queue owns c's strings and c
 * is zeroed; -EBUSY (queue full) leaves c to the caller. */
int primary_push(Primary *p, Command *c);

/* ---- checkpoint images (primary-image.c), epoch thread -------------------------------- */

/* Takes up an image command (its strings move into e); answered at once when one is pending. */
void epoch_image_request(Epoch *e, Command *c);

void epoch_image_collect(Epoch *e, bool wait);
void epoch_image_start(Epoch *e);
void epoch_image_seal_done(Epoch *e, uint64_t sealed, uint64_t pause_ns, const uint8_t *state,
                           size_t state_len, int copy_result);
void epoch_image_shutdown(Epoch *e);
/* Loop thread: runs a finished image's callback (or a cancelled one). */
void primary_image_deliver(Primary *p, bool cancel);

/* ---- the split-brain guard (primary-guard.c) ------------------------------------------ */

/* Epoch thread: applies the guard's state to the VM (suspend, unsuspend, release). */
int epoch_guard_apply(Epoch *e, bool *frozen);
/* Epoch thread, exiting: stops tracking, releasing only what is safe. */
void epoch_stop_vmm(Epoch *e, int loop_result);
/* Loop thread: the standby was lost: hold output, arm the policy timer. */
void primary_guard_arm(Primary *p);

/* ---- the loop side: link (primary-link.c) and attach (primary-attach.c) ---------------- */

int primary_connect(Primary *p);
void primary_drop_link(Primary *p);
int primary_on_notify(sd_event_source *s, int fd, uint32_t revents, void *userdata);
/* Starts an attach worker (none may run); its result comes back on the loop through attach_fd. */
int primary_attach(Primary *p);
/* primary_free(): waits for a running attach worker and frees what it built. */
void primary_attach_cancel(Primary *p);

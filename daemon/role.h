/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * The two roles a VM has in dirtyrepd, as the daemon's main loop (main.c,
 * manager) drives them. Both run on the caller's sd-event loop; the primary
 * adds one epoch thread per VM (harvest, pre-copy, seal, ship). Every
 * failure is an error value and a status that says what happened: a role
 * never exits the process, and one VM's failure never touches another's.
 */

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <openssl/types.h>
#include <systemd/sd-event.h>

#include "config.h"
#include "macros.h"

#define COMMIT_GAP_BUCKETS 8
#define COMMIT_GAP_EDGES_MS                                                                                 \
        {                                                                                                   \
                30, 50, 100, 200, 500, 1000, 2000                                                           \
        }

typedef struct ReplStatus {
        const char *role; /* "primary" or "standby" */
        /* One word an operator can act on:
         * primary: "attaching" (waiting for the VMM), "connecting" (no standby),
         *          "syncing" (full or incremental resync running), "protected"
         *          (epochs committing), "failed" (see detail);
         * standby: "listening" (no primary), "syncing", "protected", "failed". */
        const char *state;
        char detail[256]; /* last error, or what it is waiting for */
        bool link_up;
        char peer[80];
        uint64_t last_sealed;    /* primary */
        uint64_t last_committed; /* primary: acked by the standby; standby: applied */
        uint64_t epochs_committed;
        uint64_t full_syncs, incremental_syncs;
        uint64_t pause_ns_p50, pause_ns_p99, pause_ns_max; /* primary: seal pauses, recent window */
        /* primary: the same seals as the agent saw the VM stopped (Pause arrival
         * to vCPU release); 0 when the agent does not report it */
        uint64_t vm_pause_ns_p50, vm_pause_ns_p99, vm_pause_ns_max;
        uint64_t pages_last_epoch;
        double dirty_pages_per_s;
        uint64_t bytes_sent, bytes_received;
        uint64_t inflight;
        double compression_ratio; /* page bytes in / bytes on the wire */
        uint64_t staging_bytes;   /* memory held for epochs not yet acked/committed */
        uint64_t ram_bytes;       /* guest RAM (0 until known) */
        /* primary: the last completed resync, from its EPOCH_BEGIN to the standby's
         * ACK of it (full: every non-zero page of RAM; incremental: what changed). */
        uint64_t last_sync_usec;
        bool last_sync_full;
        /* primary: time between two ACKs that advanced the committed epoch, over the
         * Primary's life (a resync after a lost link is one long gap): the longest, and a
         * histogram with the upper bounds COMMIT_GAP_EDGES_MS (the last bucket: above). */
        uint64_t commit_gap_max_usec;
        uint64_t commit_gaps[COMMIT_GAP_BUCKETS];
        /* primary, while a full sync runs (0 otherwise): RAM walked and shipped so far, all
         * of RAM, and the time since it began (what is left after the walk is the ACK). */
        uint64_t sync_done_bytes, sync_total_bytes, sync_elapsed_usec;
} ReplStatus;

/*
 * Page hash files (test and diagnostic hooks): one little-endian u32 CRC32C
 * per guest page, in VM-wide page order (regions in layout order), nothing
 * else. The primary's at a frozen seal and the standby's after committing
 * that epoch must be byte-identical.
 */

typedef struct Primary Primary;

/* Borrowed: d, vm (for the Primary's life); secret is copied. */
int primary_new(sd_event *e, const DaemonConfig *d, const VmConfig *vm, const uint8_t *secret,
                size_t secret_len, Primary **ret);
/*
 * Starts attaching to the VMM and returns at once: the attach (connect, Hello, mapping the
 * layout, StartTracking) runs on a worker thread, so a slow or hung VMM never stalls the loop.
 * It retries every second while nothing can be attached; once attached, the primary connects to
 * the peer. The attach callback, if set, learns each attach's outcome.
 */
int primary_start(Primary *p);
/*
 * Runs on the loop thread when an attach ends: r = 0 attached (suspended: the VMM said the VM is
 * SUSPENDED by the split-brain guard, so another host may serve it), or a final failure (-EINVAL
 * for a tracking mode other than Tracking=, other -errno for a VMM that failed during setup; the
 * status is then "failed" and says why). Not called for attempts that will be retried (no VMM
 * yet, a refused socket). Set before primary_start(); must not free p.
 */
typedef void (*primary_attach_done_t)(Primary *p, int r, bool suspended, void *userdata);
void primary_set_attach_callback(Primary *p, primary_attach_done_t done, void *userdata);
/* TLS on the replication link (daemon/tls.h), before primary_start(); takes its own reference.
 * NULL: plaintext (the default). */
int primary_set_tls(Primary *p, SSL_CTX *tls);
Primary *primary_free(Primary *p);
DEFINE_TRIVIAL_CLEANUP_FUNC(Primary *, primary_free);
void primary_get_status(Primary *p, ReplStatus *ret);
/*
 * Stopping the daemon: stop sealing and let the standby acknowledge what is in
 * flight (its output is then released when the primary is freed); the caller
 * polls primary_drained() for a bounded time. primary_free() never releases
 * output the standby has not acknowledged, drained or not.
 */
void primary_drain(Primary *p);
/* The split-brain guard suspends the VM (also: it came back suspended at attach). */
bool primary_suspended(Primary *p);
bool primary_drained(Primary *p);
/*
 * The operator's way out of the split-brain guard (`dirtyrepctl resume`): a
 * suspended VM resumes, held output is released, the VM runs unprotected
 * until a standby connects. -EBUSY while a standby is connected, -EALREADY
 * when already unprotected, -ENOTCONN when not attached.
 */
int primary_resume_unprotected(Primary *p);

/* Seals an epoch now instead of at the next interval; returns its number once sealed. */
int primary_checkpoint(Primary *p, uint64_t *ret_epoch);

/*
 * Checkpoint images (image/imagefile.h) of the running VM, taken at an epoch
 * seal: the pages of the seal's pause are only the epoch's own (everything
 * else is pre-copied while the VM runs), and the image directory is written
 * by a thread of its own after RESUME. With parent == NULL a full image;
 * otherwise an incremental one on `parent`, which must be the last image
 * this primary took since attaching (-ESTALE otherwise). Returns 0 once
 * queued (-EBUSY: one is being taken; -ENOTCONN: no standby, epochs are not
 * sealing); `done` then runs on the loop thread exactly once, also on failure
 * and when the Primary is freed first.
 */
typedef struct PrimaryImageResult {
        int result;        /* 0 or -errno */
        const char *error; /* message when result < 0 */
        const char *dir;
        uint64_t epoch;         /* the seal the image reflects */
        uint64_t pause_ns;      /* that seal's pause, image copy included */
        uint64_t present_pages; /* pages stored in this image */
        uint64_t stored_bytes, total_bytes;
        uint64_t write_ns;
} PrimaryImageResult;
typedef void (*primary_image_done_t)(Primary *p, const PrimaryImageResult *res, void *userdata);
int primary_checkpoint_image(Primary *p, const char *dir, const char *parent, bool compress,
                             primary_image_done_t done, void *userdata);

/* Test hooks. freeze: seal now and leave the VM paused after that seal
 * (epochs stop); thaw: resume. hash_ram: while frozen, write the page
 * hash file of guest RAM (= RAM at the frozen seal). */
int primary_freeze(Primary *p, uint64_t *ret_epoch);
int primary_thaw(Primary *p);
int primary_hash_ram(Primary *p, const char *path);
/* Benchmark hook: forget the seals recorded so far, so that the pause
 * percentiles of the status cover only the seals from now on. */
int primary_reset_pauses(Primary *p);

typedef struct Standby Standby;

int standby_new(sd_event *e, const DaemonConfig *d, const VmConfig *vm, const uint8_t *secret,
                size_t secret_len, Standby **ret);
/* Starts listening on vm->listen. */
int standby_start(Standby *s);
/* TLS on the replication link, as primary_set_tls(). */
int standby_set_tls(Standby *s, SSL_CTX *tls);
Standby *standby_free(Standby *s);
DEFINE_TRIVIAL_CLEANUP_FUNC(Standby *, standby_free);
void standby_get_status(Standby *s, ReplStatus *ret);

/* Test hooks on the committed replica: its page hash file, and its RAM (memfd
 * layout) and VmState written to files (for dirtyrep-memcheck and
 * dirtyrep-vmm --restore). Both report the epoch they reflect. */
int standby_hash_replica(Standby *s, const char *path, uint64_t *ret_epoch);
int standby_dump_replica(Standby *s, const char *ram_path, const char *state_path, uint64_t *ret_epoch);
/* The bound listen address (useful with port 0). */
int standby_listen_address(Standby *s, char *buf, size_t len);

/* ---- failover (daemon/failover.h, main.c) ---- */

/*
 * Called when the authenticated primary went away without saying why
 * (heartbeats missed HeartbeatMisses times, connection reset or closed):
 * the trigger for failover; also for a primary that reported its VM gone
 * (-EHOSTDOWN), and for one that reported its own side of the link broken
 * (heartbeats missed, reset) and did not reconnect within 2 s plus one
 * heartbeat timeout. Not called for a primary that reported another error
 * (a clean shutdown, a tracking error) or that this standby refused. The
 * callback runs inside a Link callback: it must not free the Standby
 * (defer that to the loop).
 */
typedef void (*StandbyLostFn)(Standby *s, int error, const char *reason, void *userdata);
void standby_set_lost_callback(Standby *s, StandbyLostFn fn, void *userdata);
/* Whether an authenticated primary is connected now. */
bool standby_primary_connected(Standby *s);
/* Whether a committed replica exists, and its epoch. */
bool standby_replica_epoch(Standby *s, uint64_t *ret_epoch);
/* Shown in the status while a promotion runs: state word (static string, or NULL to clear) and detail. */
void standby_set_note(Standby *s, const char *state, const char *note);

/*
 * The replica outside a Standby: kept across a reload that restarts the
 * role, a daemon stop (saved to a file, restored at start), an activation
 * that failed before the guest ran, and planned maintenance. It is the only
 * copy of the VM once the primary is gone: nothing here ever drops it
 * unless the caller frees it.
 */
typedef struct StandbyReplica StandbyReplica;

/* ERROR code a standby sends its primary when it goes down for planned
 * maintenance (dirtyrepctl maintenance): it will not promote until it has
 * resynced, so the primary runs on unprotected instead of holding output. */
#define STANDBY_MAINTENANCE_CODE (-ENOLINK)

/*
 * Takes the committed replica out of s: every connection is closed (code != 0:
 * the active one first gets an ERROR frame with code and reason, given up to
 * 200 ms to leave) and the listener stops. -ENODATA (and nothing closed) when
 * there is no committed replica.
 */
int standby_release_replica(Standby *s, int code, const char *reason, StandbyReplica **ret);
/* Gives s the replica (taken) before standby_start(); -EBUSY once started or holding one. */
int standby_adopt_replica(Standby *s, StandbyReplica *rep);
StandbyReplica *standby_replica_free(StandbyReplica *rep);
DEFINE_TRIVIAL_CLEANUP_FUNC(StandbyReplica *, standby_replica_free);
uint64_t standby_replica_get_epoch(const StandbyReplica *rep);
/* Stale: the primary ran unprotected since (maintenance), so promoting from it would lose
 * what the primary released meanwhile. Cleared by the next committed epoch. */
bool standby_replica_is_stale(const StandbyReplica *rep);
void standby_replica_set_stale(StandbyReplica *rep, bool stale);
/* Whether the Standby's replica is stale (see above). */
bool standby_replica_stale(Standby *s);
/* A new fd of the replica's memfd (for the VMM's --ram-fd) and its VmState (borrowed). */
int standby_replica_activation(const StandbyReplica *rep, int *ret_fd, const uint8_t **ret_state,
                               size_t *ret_state_len);
/*
 * The replica as a file: dir/NAME.replica, written to a temporary file, fsync()ed,
 * renamed, the directory fsync()ed (a crash leaves the old file or the new one). Header,
 * layout and state are checksummed, the RAM too (CRC32C of every byte, sparse on disk).
 * load: -ENOENT when there is none; every field is bounded before use and any mismatch is
 * -EBADMSG with a reason.
 */
int standby_replica_save(const StandbyReplica *rep, const char *dir, const char *name);
int standby_replica_load(const char *dir, const char *name, StandbyReplica **ret, char *why,
                         size_t why_size);
int standby_replica_remove(const char *dir, const char *name);

/*
 * A primary started on a replica by failover: it starts unprotected
 * (output released at once: there is no standby, and the old primary was
 * fenced) until a standby connects, and says from which epoch it came.
 * Call before primary_start().
 */
void primary_set_promoted(Primary *p, uint64_t from_epoch);

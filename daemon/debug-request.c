/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The debug socket's protocol: framing, parsing, which request fits which
 * role, the status JSON. See debug-request.h; the socket is daemon/debug.c.
 */
#include <assert.h>
#include <errno.h>
#include <float.h>
#include <inttypes.h>
#include <json-c/json.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "debug-request.h"
#include "macros.h"

/* Each verb, the words it takes (the verb and the VM included) and the roles it serves. */
static const struct {
        const char *name;
        DebugVerb verb;
        size_t min_words, max_words;
        unsigned roles;
} verbs[] = {
        {"status", DEBUG_STATUS, 1, DEBUG_WORDS_MAX, 0},
        {"stall", DEBUG_STALL, 2, 2, 0},
        {"checkpoint", DEBUG_CHECKPOINT, 2, DEBUG_WORDS_MAX, DEBUG_ROLE_PRIMARY},
        {"freeze", DEBUG_FREEZE, 2, DEBUG_WORDS_MAX, DEBUG_ROLE_PRIMARY},
        {"thaw", DEBUG_THAW, 2, DEBUG_WORDS_MAX, DEBUG_ROLE_PRIMARY},
        {"reset-pauses", DEBUG_RESET_PAUSES, 2, 2, DEBUG_ROLE_PRIMARY},
        {"resume", DEBUG_RESUME, 2, 2, DEBUG_ROLE_PRIMARY},
        {"hash", DEBUG_HASH, 3, 3, DEBUG_ROLE_PRIMARY | DEBUG_ROLE_STANDBY},
        {"dump", DEBUG_DUMP, 4, 4, DEBUG_ROLE_STANDBY},
        {"image", DEBUG_IMAGE, 3, 4, DEBUG_ROLE_PRIMARY},
        /* vm_promote() and vm_demote() say why a VM in another role cannot. */
        {"promote", DEBUG_PROMOTE, 2, 3, DEBUG_ROLE_PRIMARY | DEBUG_ROLE_STANDBY | DEBUG_ROLE_FAILED},
        {"demote", DEBUG_DEMOTE, 2, 2, DEBUG_ROLE_PRIMARY | DEBUG_ROLE_STANDBY | DEBUG_ROLE_FAILED},
};

int debug_line_add(DebugLine *l, size_t n, char **ret_line)
{
        char *nl;

        assert(n <= sizeof(l->buf) - 1 - l->len);
        l->len += n;
        l->buf[l->len] = 0;
        nl = strchr(l->buf, '\n');
        if (!nl)
                return l->len >= sizeof(l->buf) - 1 ? -E2BIG : 0;
        *nl = 0;
        *ret_line = l->buf;
        return 1;
}

int debug_request_parse(char *line, DebugRequest *ret, char *error, size_t error_size)
{
        DebugRequest req = {.verb = DEBUG_UNKNOWN};
        char *save = NULL;

        for (char *w = strtok_r(line, " \t", &save); w && req.n_words < DEBUG_WORDS_MAX;
             w = strtok_r(NULL, " \t", &save))
                req.words[req.n_words++] = w;
        if (req.n_words == 0) {
                snprintf(error, error_size, "empty request");
                return -EINVAL;
        }
        for (size_t i = 0; i < ELEMENTSOF(verbs); i++)
                if (streq(req.words[0], verbs[i].name))
                        req.verb = verbs[i].verb;
        if (req.n_words > 1)
                req.vm = req.words[1];

        if (req.verb == DEBUG_STATUS) {
                *ret = req;
                return 0;
        }
        if (req.verb == DEBUG_STALL) {
                unsigned long sec = ULONG_MAX;
                char *end = NULL;

                errno = 0;
                if (req.n_words == 2)
                        sec = strtoul(req.words[1], &end, 10);
                if (req.n_words != 2 || errno != 0 || *end || sec > DEBUG_STALL_MAX_SEC) {
                        snprintf(error, error_size, "stall needs a number of seconds, 0..%d",
                                 DEBUG_STALL_MAX_SEC);
                        return -EINVAL;
                }
                req.stall_sec = (unsigned) sec;
                req.vm = NULL;
                *ret = req;
                return 0;
        }
        if (req.n_words < 2) {
                snprintf(error, error_size, "'%s' needs a VM name", req.words[0]);
                return -EINVAL;
        }
        req.force = req.verb == DEBUG_PROMOTE && req.n_words == 3 && streq(req.words[2], "force");
        *ret = req;
        return 0;
}

bool debug_request_fits(const DebugRequest *req, DebugRole role)
{
        for (size_t i = 0; i < ELEMENTSOF(verbs); i++) {
                if (verbs[i].verb != req->verb)
                        continue;
                if (req->n_words < verbs[i].min_words || req->n_words > verbs[i].max_words ||
                    !(verbs[i].roles & role))
                        return false;
                /* The third word of promote can only be "force". */
                return req->verb != DEBUG_PROMOTE || req->n_words == 2 || req->force;
        }
        return false;
}

static bool add(json_object *o, const char *key, json_object *v, bool null_ok)
{
        if (!v && !null_ok)
                return false;
        if (json_object_object_add(o, key, v) < 0) {
                json_object_put(v);
                return false;
        }
        return true;
}

static bool add_u64(json_object *o, const char *key, uint64_t v)
{
        return add(o, key, json_object_new_uint64(v), false);
}

static bool add_str(json_object *o, const char *key, const char *s)
{
        return add(o, key, json_object_new_string(s), false);
}

static bool add_bool(json_object *o, const char *key, bool b)
{
        return add(o, key, json_object_new_boolean(b), false);
}

/* A double printed with that many decimals (as before json-c); JSON has no NaN or infinity: null. */
static bool add_double(json_object *o, const char *key, double d, int decimals)
{
        char text[DBL_MAX_10_EXP + 32]; /* "%.3f" of DBL_MAX: 309 digits, the point, 3 decimals */

        if (!isfinite(d))
                return add(o, key, NULL, true);
        snprintf(text, sizeof(text), "%.*f", decimals, d);
        return add(o, key, json_object_new_double_s(d, text), false);
}

int debug_status_json(const char *name, const ReplStatus *st, char **ret)
{
        json_object *o = json_object_new_object(), *gaps = json_object_new_array();
        const char *s;
        bool ok;

        ok = o && gaps && add_str(o, "vm", name) && add_str(o, "role", st->role ?: "?") &&
             add_str(o, "state", st->state ?: "?") && add_str(o, "detail", st->detail) &&
             add_bool(o, "link_up", st->link_up) && add_str(o, "peer", st->peer) &&
             add_u64(o, "last_sealed", st->last_sealed) &&
             add_u64(o, "last_committed", st->last_committed) &&
             add_u64(o, "epochs_committed", st->epochs_committed) &&
             add_u64(o, "full_syncs", st->full_syncs) &&
             add_u64(o, "incremental_syncs", st->incremental_syncs) &&
             add_u64(o, "pause_ns_p50", st->pause_ns_p50) && add_u64(o, "pause_ns_p99", st->pause_ns_p99) &&
             add_u64(o, "pause_ns_max", st->pause_ns_max) &&
             add_u64(o, "vm_pause_ns_p50", st->vm_pause_ns_p50) &&
             add_u64(o, "vm_pause_ns_p99", st->vm_pause_ns_p99) &&
             add_u64(o, "vm_pause_ns_max", st->vm_pause_ns_max) &&
             add_u64(o, "pages_last_epoch", st->pages_last_epoch) &&
             add_double(o, "dirty_pages_per_s", st->dirty_pages_per_s, 1) &&
             add_u64(o, "bytes_sent", st->bytes_sent) && add_u64(o, "bytes_received", st->bytes_received) &&
             add_u64(o, "inflight", st->inflight) &&
             add_double(o, "compression_ratio", st->compression_ratio, 3) &&
             add_u64(o, "staging_bytes", st->staging_bytes) && add_u64(o, "ram_bytes", st->ram_bytes) &&
             add_u64(o, "last_sync_usec", st->last_sync_usec) &&
             add_bool(o, "last_sync_full", st->last_sync_full) &&
             add_u64(o, "commit_gap_max_usec", st->commit_gap_max_usec);
        for (size_t i = 0; ok && i < COMMIT_GAP_BUCKETS; i++) {
                json_object *v = json_object_new_uint64(st->commit_gaps[i]);
                if (!v || json_object_array_add(gaps, v) < 0) {
                        json_object_put(v);
                        ok = false;
                }
        }
        if (ok)
                ok = add(o, "commit_gaps", gaps, false);
        else
                json_object_put(gaps);
        s = ok ? json_object_to_json_string_ext(o, JSON_C_TO_STRING_SPACED | JSON_C_TO_STRING_NOSLASHESCAPE)
               : NULL;
        if (!s || asprintf(ret, "%s\n", s) < 0) {
                json_object_put(o);
                return -ENOMEM;
        }
        json_object_put(o);
        return 0;
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The debug socket's protocol (daemon/debug-request.c): the bytes a client
 * sends, in recv()-sized pieces, through the line framing and the request
 * parser; which requests fit which role; and the `status` JSON of a
 * ReplStatus whose strings and doubles come from the input. Input: byte 0
 * is the piece size (0: all at once); the rest is what the client sends.
 * Every rejection says why, a parsed request is well formed, and the JSON
 * parses back (json-c) to the same strings, on one line.
 */
#include <errno.h>
#include <json-c/json.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "debug-request.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_request(const DebugRequest *req)
{
        static const DebugRole roles[] = {DEBUG_ROLE_PRIMARY, DEBUG_ROLE_STANDBY, DEBUG_ROLE_FAILED};

        if (req->n_words < 1 || req->n_words > DEBUG_WORDS_MAX)
                abort();
        for (size_t i = 0; i < req->n_words; i++)
                if (!req->words[i][0] || strpbrk(req->words[i], " \t"))
                        abort();
        if (req->verb == DEBUG_STALL && (req->vm || req->stall_sec > DEBUG_STALL_MAX_SEC))
                abort();
        if (req->verb != DEBUG_STALL && req->verb != DEBUG_STATUS &&
            (req->n_words < 2 || req->vm != req->words[1]))
                abort();
        for (size_t i = 0; i < sizeof(roles) / sizeof(roles[0]); i++) {
                if (!debug_request_fits(req, roles[i]))
                        continue;
                /* What debug.c then reads must be there. */
                if (req->verb == DEBUG_UNKNOWN || req->verb == DEBUG_STATUS || req->verb == DEBUG_STALL)
                        abort();
                if ((req->verb == DEBUG_HASH || req->verb == DEBUG_IMAGE) && req->n_words < 3)
                        abort();
                if (req->verb == DEBUG_DUMP && req->n_words != 4)
                        abort();
                if (req->verb == DEBUG_PROMOTE && req->n_words == 3 && !req->force)
                        abort();
        }
}

static void check_string(json_object *o, const char *key, const char *want)
{
        json_object *v = NULL;

        if (!json_object_object_get_ex(o, key, &v) || !json_object_is_type(v, json_type_string) ||
            strcmp(json_object_get_string(v), want) != 0)
                abort();
}

static void check_status(const uint8_t *data, size_t size)
{
        ReplStatus st = {.role = "primary", .state = "protected"};
        json_object *o, *v;
        char *out = NULL;
        size_t n;

        n = size < sizeof(st.detail) - 1 ? size : sizeof(st.detail) - 1;
        memcpy(st.detail, data, n);
        n = size < sizeof(st.peer) - 1 ? size : sizeof(st.peer) - 1;
        memcpy(st.peer, data + size - n, n);
        if (size >= 2 * sizeof(double)) {
                memcpy(&st.dirty_pages_per_s, data, sizeof(double));
                memcpy(&st.compression_ratio, data + sizeof(double), sizeof(double));
        }
        st.commit_gaps[COMMIT_GAP_BUCKETS - 1] = UINT64_MAX;

        if (debug_status_json("fuzz", &st, &out) < 0)
                return; /* -ENOMEM only */
        n = strlen(out);
        if (n == 0 || out[n - 1] != '\n' || memchr(out, '\n', n - 1))
                abort(); /* one line */
        o = json_tokener_parse(out);
        if (!o || !json_object_is_type(o, json_type_object))
                abort();
        check_string(o, "vm", "fuzz");
        check_string(o, "detail", st.detail);
        check_string(o, "peer", st.peer);
        if (!json_object_object_get_ex(o, "compression_ratio", &v) ||
            (isfinite(st.compression_ratio) ? !json_object_is_type(v, json_type_double) : v != NULL))
                abort();
        if (!json_object_object_get_ex(o, "commit_gaps", &v) ||
            json_object_array_length(v) != COMMIT_GAP_BUCKETS)
                abort();
        json_object_put(o);
        free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        DebugLine line = {};
        size_t piece, off = 1;

        if (size < 1)
                return 0;
        piece = data[0] ? data[0] : SIZE_MAX;
        /* As on_debug_client(): pieces until a line, or the buffer full without one. */
        while (off < size) {
                DebugRequest req;
                char error[256] = "", *l = NULL, *tail;
                size_t room, k;
                int r;

                tail = debug_line_tail(&line, &room);
                k = size - off;
                if (k > piece)
                        k = piece;
                if (k > room)
                        k = room;
                memcpy(tail, data + off, k);
                off += k;
                r = debug_line_add(&line, k, &l);
                if (r == -E2BIG) {
                        if (line.len != DEBUG_LINE_MAX - 1)
                                abort();
                        break;
                }
                if (r == 0)
                        continue;
                if (r != 1 || l != line.buf || strlen(l) >= DEBUG_LINE_MAX)
                        abort();
                if (debug_request_parse(l, &req, error, sizeof(error)) < 0) {
                        if (!error[0])
                                abort(); /* a rejection always says why */
                } else
                        check_request(&req);
                break; /* one request per connection */
        }
        check_status(data + 1, size - 1);
        return 0;
}

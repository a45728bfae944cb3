/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Control-protocol messages as the agent (Request) and the daemon (Reply)
 * decode them from a peer. The first byte picks which; the rest is the
 * packet. Decoded messages without unknown fields at the top level are
 * re-encoded and decoded again, and must keep their id and body. protobuf-c
 * accepts the invalid field number 0 (at any depth) and re-encodes it in a
 * form it then rejects; this fuzzer found that twice (corpus
 * crash-unknown-field-0, crash-nested-field-0). We never re-serialize a
 * peer's message, so a failed re-decode is tolerated; a crash is not.
 */
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "control.pb-c.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        uint8_t *buf;
        size_t len;

        if (size < 1 || size > DR__CONTROL__CONTROL_LIMIT__CONTROL_MAX_MESSAGE + 1)
                return 0;
        if (data[0] & 1) {
                Dr__Control__Request *m = dr__control__request__unpack(NULL, size - 1, data + 1), *m2;
                if (!m)
                        return 0;
                if (m->base.n_unknown_fields) {
                        dr__control__request__free_unpacked(m, NULL);
                        return 0;
                }
                len = dr__control__request__get_packed_size(m);
                buf = malloc(len ? len : 1);
                assert(buf);
                dr__control__request__pack(m, buf);
                m2 = dr__control__request__unpack(NULL, len, buf);
                if (m2) {
                        assert(m2->id == m->id && m2->body_case == m->body_case);
                        dr__control__request__free_unpacked(m2, NULL);
                }
                dr__control__request__free_unpacked(m, NULL);
        } else {
                Dr__Control__Reply *m = dr__control__reply__unpack(NULL, size - 1, data + 1), *m2;
                if (!m)
                        return 0;
                if (m->base.n_unknown_fields) {
                        dr__control__reply__free_unpacked(m, NULL);
                        return 0;
                }
                len = dr__control__reply__get_packed_size(m);
                buf = malloc(len ? len : 1);
                assert(buf);
                dr__control__reply__pack(m, buf);
                m2 = dr__control__reply__unpack(NULL, len, buf);
                if (m2) {
                        assert(m2->id == m->id && m2->error == m->error && m2->body_case == m->body_case);
                        dr__control__reply__free_unpacked(m2, NULL);
                }
                dr__control__reply__free_unpacked(m, NULL);
        }
        free(buf);
        return 0;
}

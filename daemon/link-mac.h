/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * Per-frame authentication of the replication link (proto/replication.proto,
 * "Session keys and frame MACs").
 *
 * Once the handshake has shown that both sides hold the shared secret, every
 * later frame in either direction carries a 24-byte trailer after its
 * payload:
 *
 *   offset size  field
 *   0      8     seq  le64: this direction's frame number, 0 for the first keyed frame
 *   8      16    tag  AES-256-GMAC over the 20-byte frame header and the payload,
 *                     nonce = 4 zero bytes | le64 seq, key = this direction's key
 *
 * The frame header's length counts the payload only. The receiver checks the
 * CRC (corruption), then that seq is the next one due (replay, drop, reorder),
 * then the tag (forgery); nothing of a frame is used before all three passed.
 *
 * Keys: HKDF-SHA256 (RFC 5869) with the shared secret as input keying
 * material, salt "dirtyrep-link-v2", and as info the length-prefixed fields
 * (each le32 byte count, then the bytes):
 *
 *   label "dirtyrep-session" | primary nonce | standby nonce | vm_name | vm_uuid | binding
 *
 * `binding` is the TLS exporter (RFC 8446 7.5, label "EXPORTER-dirtyrep-link",
 * no context, 32 bytes) when the link runs over TLS, empty in plaintext. The
 * 64 output bytes are the primary-to-standby key, then the standby-to-primary
 * key: a frame reflected back to its sender fails its tag.
 *
 * GMAC because it is the fastest MAC libcrypto has on hosts with AES-NI and
 * carry-less multiply (several GB/s per core): it is computed once per frame
 * (up to 4 MiB), not per page. A (key, nonce) pair is never reused: the keys
 * are new for every connection (fresh nonces on both sides) and seq only
 * grows; a link that reached 2^64 frames would be refused (-EOVERFLOW).
 *
 * A LinkMac is one direction's state; it is not thread-safe (each direction
 * has one user: the writer thread seals, the loop thread checks).
 */

#include <stddef.h>
#include <stdint.h>

#include "frame.h"
#include "macros.h"

#define LINK_KEY_BYTES         32u
#define LINK_MAC_TAG_BYTES     16u
#define LINK_MAC_TRAILER_BYTES (8u + LINK_MAC_TAG_BYTES)
#define LINK_BINDING_MAX       32u

/*
 * Derives both directions' keys as described above. Returns 0, -EINVAL (no
 * secret, name empty or too long, binding over LINK_BINDING_MAX), -EIO
 * (libcrypto failed).
 */
int link_session_keys(const uint8_t *secret, size_t secret_len, const uint8_t *nonce_primary,
                      const uint8_t *nonce_standby, size_t nonce_len, const char *vm_name,
                      const uint8_t *vm_uuid, size_t uuid_len, const uint8_t *binding, size_t binding_len,
                      uint8_t ret_primary_to_standby[LINK_KEY_BYTES],
                      uint8_t ret_standby_to_primary[LINK_KEY_BYTES]);

typedef struct LinkMac LinkMac;

/* A MAC context for one direction's key (copied; the caller may wipe its copy). 0, -ENOMEM, -EIO. */
int link_mac_new(const uint8_t key[LINK_KEY_BYTES], LinkMac **ret);
/* Wipes and frees. Accepts NULL. */
LinkMac *link_mac_free(LinkMac *m);
DEFINE_TRIVIAL_CLEANUP_FUNC(LinkMac *, link_mac_free);

/* Writes the trailer of frame number seq (header built, payload in place). 0 or -EIO. */
int link_mac_seal(LinkMac *m, uint64_t seq, const uint8_t header[FRAME_HEADER_SIZE], const void *payload,
                  size_t len, uint8_t ret_trailer[LINK_MAC_TRAILER_BYTES]);

/*
 * Checks a received trailer against the frame number that is due. Returns 0,
 * -ERANGE when the trailer names another frame number (*ret_seq says which:
 * a replayed, dropped or reordered frame), -EBADMSG when the tag does not
 * match (altered, or not sealed with this session's key), -EIO.
 */
int link_mac_check(LinkMac *m, uint64_t expected_seq, const uint8_t header[FRAME_HEADER_SIZE],
                   const void *payload, size_t len, const uint8_t trailer[LINK_MAC_TRAILER_BYTES],
                   uint64_t *ret_seq);

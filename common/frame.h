/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * Stream framing for the replication link (and any other byte stream).
 *
 * Every frame is a 20-byte header followed by `length` payload bytes:
 *
 *   offset size  field
 *   0      4     magic    "DRPF" (0x46505244 little-endian)
 *   4      2     version  FRAME_VERSION
 *   6      2     type     caller-defined
 *   8      4     length   payload bytes, <= the cap the reader passes
 *   12     4     crc      CRC32C over header bytes 0..11 and the payload
 *   16     4     reserved must be zero
 *
 * All integers little-endian. The reader checks magic, version, reserved
 * and the length cap before it allocates anything for the payload.
 */

#include <stddef.h>
#include <stdint.h>

#define FRAME_MAGIC       0x46505244u
#define FRAME_VERSION     1u
#define FRAME_HEADER_SIZE 20u

typedef struct FrameHeader {
        uint16_t version;
        uint16_t type;
        uint32_t length;
        uint32_t crc;
} FrameHeader;

/* Writes the header for (type, payload) into out[FRAME_HEADER_SIZE]. */
void frame_header_build(uint8_t out[FRAME_HEADER_SIZE], uint16_t type, const void *payload, uint32_t length);

/*
 * Parses and validates a header. Returns 0, -EBADMSG (bad magic, version or
 * reserved bytes) or -EMSGSIZE (length above max_length). The CRC is only
 * checked by frame_verify_payload(), once the payload has been read.
 */
int frame_header_parse(const uint8_t in[FRAME_HEADER_SIZE], uint32_t max_length, FrameHeader *ret);

/* Returns 0 when the payload matches the header's CRC, -EBADMSG otherwise. */
int frame_verify_payload(const uint8_t in[FRAME_HEADER_SIZE], const FrameHeader *h, const void *payload);

static inline void put_le16(uint8_t *p, uint16_t v)
{
        p[0] = v;
        p[1] = v >> 8;
}
static inline void put_le32(uint8_t *p, uint32_t v)
{
        put_le16(p, v);
        put_le16(p + 2, v >> 16);
}
static inline void put_le64(uint8_t *p, uint64_t v)
{
        put_le32(p, v);
        put_le32(p + 4, v >> 32);
}
static inline uint16_t get_le16(const uint8_t *p)
{
        return (uint16_t) (p[0] | (p[1] << 8));
}
static inline uint32_t get_le32(const uint8_t *p)
{
        return get_le16(p) | ((uint32_t) get_le16(p + 2) << 16);
}
static inline uint64_t get_le64(const uint8_t *p)
{
        return get_le32(p) | ((uint64_t) get_le32(p + 4) << 32);
}

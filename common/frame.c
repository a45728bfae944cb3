/* SPDX-License-Identifier: GPL-2.0-or-later */
#include <errno.h>
#include <string.h>

#include "crc32c.h"
#include "frame.h"

void frame_header_build(uint8_t out[FRAME_HEADER_SIZE], uint16_t type, const void *payload, uint32_t length)
{
        uint32_t crc;

        put_le32(out + 0, FRAME_MAGIC);
        put_le16(out + 4, FRAME_VERSION);
        put_le16(out + 6, type);
        put_le32(out + 8, length);
        crc = crc32c(0, out, 12);
        if (length)
                crc = crc32c(crc, payload, length);
        put_le32(out + 12, crc);
        put_le32(out + 16, 0);
}

int frame_header_parse(const uint8_t in[FRAME_HEADER_SIZE], uint32_t max_length, FrameHeader *ret)
{
        FrameHeader h;

        if (get_le32(in) != FRAME_MAGIC || get_le32(in + 16) != 0)
                return -EBADMSG;
        h.version = get_le16(in + 4);
        if (h.version != FRAME_VERSION)
                return -EBADMSG;
        h.type = get_le16(in + 6);
        h.length = get_le32(in + 8);
        h.crc = get_le32(in + 12);
        if (h.length > max_length)
                return -EMSGSIZE;
        *ret = h;
        return 0;
}

int frame_verify_payload(const uint8_t in[FRAME_HEADER_SIZE], const FrameHeader *h, const void *payload)
{
        uint32_t crc = crc32c(0, in, 12);

        if (h->length)
                crc = crc32c(crc, payload, h->length);
        return crc == h->crc ? 0 : -EBADMSG;
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Replication-link frames: header parse with a cap, then CRC verification. */
#include <stdint.h>
#include <string.h>

#include "frame.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        FrameHeader h;

        while (size >= FRAME_HEADER_SIZE) {
                if (frame_header_parse(data, 1 << 20, &h) < 0)
                        return 0;
                if (size - FRAME_HEADER_SIZE < h.length)
                        return 0;
                (void) frame_verify_payload(data, &h, data + FRAME_HEADER_SIZE);
                data += FRAME_HEADER_SIZE + h.length;
                size -= FRAME_HEADER_SIZE + h.length;
        }
        return 0;
}

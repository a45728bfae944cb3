/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

#include <stddef.h>
#include <stdint.h>

/*
 * CRC32C (Castagnoli, reflected polynomial 0x82F63B78) as used by iSCSI,
 * ext4 and SCTP. crc32c(0, "123456789", 9) == 0xE3069283.
 * Pass the previous result as `crc` to continue over several buffers.
 * Uses the SSE4.2 instruction when the CPU has it.
 */
uint32_t crc32c(uint32_t crc, const void *buf, size_t len);

/* The portable table-driven implementation, always available (tests compare the two). */
uint32_t crc32c_portable(uint32_t crc, const void *buf, size_t len);

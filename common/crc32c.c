/* SPDX-License-Identifier: GPL-2.0-or-later */
#include <pthread.h>

#include "crc32c.h"

static uint32_t table[8][256];
static pthread_once_t table_once = PTHREAD_ONCE_INIT;

static void table_init(void)
{
        for (uint32_t i = 0; i < 256; i++) {
                uint32_t c = i;
                for (int k = 0; k < 8; k++)
                        c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1)));
                table[0][i] = c;
        }
        for (uint32_t i = 0; i < 256; i++)
                for (int t = 1; t < 8; t++)
                        table[t][i] = (table[t - 1][i] >> 8) ^ table[0][table[t - 1][i] & 0xff];
}

/* Slicing-by-8 software fallback. */
static uint32_t crc32c_sw(uint32_t crc, const uint8_t *p, size_t len)
{
        pthread_once(&table_once, table_init);
        while (len && ((uintptr_t) p & 7)) {
                crc = table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
                len--;
        }
        while (len >= 8) {
                uint64_t v = *(const uint64_t *) p ^ crc;
                crc = table[7][v & 0xff] ^ table[6][(v >> 8) & 0xff] ^ table[5][(v >> 16) & 0xff] ^
                      table[4][(v >> 24) & 0xff] ^ table[3][(v >> 32) & 0xff] ^ table[2][(v >> 40) & 0xff] ^
                      table[1][(v >> 48) & 0xff] ^ table[0][v >> 56];
                p += 8;
                len -= 8;
        }
        while (len--)
                crc = table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
        return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t crc32c_hw(uint32_t crc, const uint8_t *p, size_t len)
{
        uint64_t c = crc;
        while (len && ((uintptr_t) p & 7)) {
                c = __builtin_ia32_crc32qi((uint32_t) c, *p++);
                len--;
        }
        while (len >= 8) {
                c = __builtin_ia32_crc32di(c, *(const uint64_t *) p);
                p += 8;
                len -= 8;
        }
        while (len--)
                c = __builtin_ia32_crc32qi((uint32_t) c, *p++);
        return (uint32_t) c;
}
#endif

uint32_t crc32c(uint32_t crc, const void *buf, size_t len)
{
        const uint8_t *p = buf;

        crc = ~crc;
#if defined(__x86_64__)
        if (__builtin_cpu_supports("sse4.2"))
                return ~crc32c_hw(crc, p, len);
#endif
        return ~crc32c_sw(crc, p, len);
}

uint32_t crc32c_portable(uint32_t crc, const void *buf, size_t len)
{
        return ~crc32c_sw(~crc, buf, len);
}

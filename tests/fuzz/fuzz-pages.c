/* SPDX-License-Identifier: GPL-2.0-or-later */
/* PAGES frame payloads as a standby decodes them from a (hostile) peer. */
#include <stdint.h>
#include <string.h>

#include "pages.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int sink(void *userdata, uint64_t page, const uint8_t *d)
{
        uint64_t *acc = userdata;
        *acc += page + (d ? d[0] + d[PAGE_BYTES - 1] : 0);
        return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        uint64_t epoch, acc = 0;
        (void) page_batch_decode(data, size, 1u << 20, &epoch, sink, &acc);
        return 0;
}

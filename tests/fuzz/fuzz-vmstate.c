/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * VM state (dr.vmstate.VmState) as the agent decodes it before restoring it
 * into KVM: on a standby the bytes come from the primary (EpochState), on a
 * restore from an image file. state_decode() must refuse anything it cannot
 * represent; what it accepts must re-encode and decode again to the same
 * bytes (a lossy or inconsistent decoder would restore a different CPU).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>

#include "log.h"
#include "state.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        _cleanup_(vm_snapshot_freep) VmSnapshot *s = NULL, *s2 = NULL;
        _cleanup_free_ uint8_t *buf = NULL, *buf2 = NULL;
        size_t len, len2;

        log_set_max_level(LOG_CRIT);
        if (state_decode(data, size, &s) < 0)
                return 0;
        if (!s || s->n_vcpus == 0)
                abort();
        if (state_encode(s, &buf, &len) < 0)
                abort();
        if (state_decode(buf, len, &s2) < 0)
                abort(); /* what we accept, we must be able to send on */
        if (state_encode(s2, &buf2, &len2) < 0)
                abort();
        if (len != len2 || memcmp(buf, buf2, len) != 0)
                abort(); /* decode and encode are not inverse */
        return 0;
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
/* dirtyrepd's capability drop (caps.h): prctl() and capset(), no library. */
#include <errno.h>
#include <linux/capability.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "caps.h"

#ifndef CAP_SETPCAP
#define CAP_SETPCAP 8
#endif

static int cap_last(void)
{
        FILE *f = fopen("/proc/sys/kernel/cap_last_cap", "re");
        int last = -1;

        if (f) {
                if (fscanf(f, "%d", &last) != 1)
                        last = -1;
                fclose(f);
        }
        if (last < 0 || last > 63) {
                /* No /proc: probe the bounding set, which knows every capability the kernel has. */
                for (last = 0; last < 63 && prctl(PR_CAPBSET_READ, (unsigned long) last + 1, 0, 0, 0) >= 0;
                     last++)
                        ;
        }
        return last;
}

int caps_drop(bool keep_bounding, bool *ret_bounding_reduced)
{
        struct __user_cap_header_struct h = {.version = _LINUX_CAPABILITY_VERSION_3, .pid = 0};
        struct __user_cap_data_struct d[2] = {};
        uint64_t permitted, keep;
        int last = cap_last();

        *ret_bounding_reduced = false;
        if (syscall(SYS_capget, &h, d) < 0)
                return -errno;
        permitted = (uint64_t) d[0].permitted | ((uint64_t) d[1].permitted << 32);
        if (permitted == 0)
                return 0; /* an unprivileged daemon: nothing to drop */

        /* The bounding set first: dropping from it needs CAP_SETPCAP, which goes below. */
        if (!keep_bounding && (permitted & (UINT64_C(1) << CAP_SETPCAP))) {
                for (int c = 0; c <= last; c++)
                        if (!(DAEMON_CAPABILITIES & (UINT64_C(1) << c)) &&
                            prctl(PR_CAPBSET_READ, (unsigned long) c, 0, 0, 0) == 1 &&
                            prctl(PR_CAPBSET_DROP, (unsigned long) c, 0, 0, 0) < 0)
                                return -errno;
                *ret_bounding_reduced = true;
        }
        if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL)
                return -errno;

        keep = permitted & DAEMON_CAPABILITIES;
        d[0].permitted = d[0].effective = (uint32_t) keep;
        d[1].permitted = d[1].effective = (uint32_t) (keep >> 32);
        d[0].inheritable = d[1].inheritable = 0;
        if (syscall(SYS_capset, &h, d) < 0)
                return -errno;
        return 0;
}

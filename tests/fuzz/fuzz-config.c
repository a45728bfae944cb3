/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * dirtyrepd configuration text (daemon/config.c, config-parse.c). The first byte picks what
 * the rest is: even = a dirtyrep.conf, odd = a vm.d file. Accepted VM files
 * also go through config_validate() (as two VMs, so the cross-checks find
 * something) and config_find_vm(); rejected input must come with an error
 * message, and the whole message is walked so ASan sees every byte.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_errors(int r, char *errors)
{
        if (r >= 0) {
                if (errors)
                        abort(); /* untouched on success */
                return;
        }
        if (r != -EINVAL && r != -ENOMEM)
                abort(); /* pure parsing: only content errors or OOM */
        if (r == -EINVAL && (!errors || !*errors))
                abort(); /* a rejection always says why */
        if (errors && strlen(errors) > 1024 * 1024)
                abort(); /* bounded */
        free(errors);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        char *errors = NULL;
        int r;

        if (size < 1)
                return 0;

        if ((data[0] & 1) == 0) {
                DaemonConfig *d = NULL;
                r = config_parse_daemon_text("fuzz.conf", (const char *) data + 1, size - 1, &d, &errors);
                check_errors(r, errors);
                if (r >= 0 && (!d || !d->state_directory || !d->runtime_directory))
                        abort();
                daemon_config_free(d);
        } else {
                VmConfig *v = NULL;
                r = config_parse_vm_file("vm.d/fuzz.conf", "fuzz", (const char *) data + 1, size - 1, &v,
                                         &errors);
                check_errors(r, errors);
                if (r >= 0) {
                        VmConfig *vms[2] = {v, v};
                        Config c = {.daemon = NULL, .vms = vms, .n_vms = 2};
                        if (!v || !v->secret_file || !v->control_socket || !v->vmm_args ||
                            v->vmm_args[v->n_vmm_args] != NULL)
                                abort();
                        if (config_find_vm(&c, "fuzz") != v)
                                abort();
                        errors = NULL;
                        r = config_validate(&c, &errors);
                        /* The same VM twice always shares its control socket. */
                        if (r != -EINVAL && r != -ENOMEM)
                                abort();
                        free(errors);
                        /* The sandbox check walks ControlSocket= and VmmArgs= (getopt's reading of them). */
                        errors = NULL;
                        r = config_check_sandbox(&c, &errors);
                        check_errors(r, errors);
                        vm_config_free(v);
                }
        }
        return 0;
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * dirtyrepd's command-line VMs: "--vm NAME" followed by --role/--peer/...
 * and "--set KEY=VALUE", applied with config_apply_vm_settings() over the
 * configuration the files gave, then config_validate(), as manager_load()
 * does. Input: byte 0 picks the files' part (bit 0: a file already defines
 * VM "web"; bit 1: the main file sets RuntimeDirectory=); the rest is
 * NUL-separated arguments, where "@NAME" starts a --vm block and anything
 * else is one KEY=VALUE of the current block. A rejection must say why, and
 * an accepted VM must be found under its name afterwards.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define ARGS_MAX 64 /* == MANAGER_CLI_SETTINGS_MAX */
#define VMS_MAX  8

static const char daemon_text[] = "[Daemon]\nRuntimeDirectory=/run/fuzz\n";
static const char web_text[] = "[VM]\nRole=primary\nPeer=192.0.2.1:7000\nSecretFile=/etc/web.key\n";

static void check_errors(int r, char *errors)
{
        if (r >= 0) {
                if (errors)
                        abort(); /* untouched on success */
                return;
        }
        if (r != -EINVAL && r != -ENOMEM)
                abort();
        if (r == -EINVAL && (!errors || !*errors))
                abort(); /* a rejection always says why */
        if (errors && strlen(errors) > 1024 * 1024)
                abort();
        free(errors);
}

static void apply(Config *c, const char *name, char **args, size_t n)
{
        char *errors = NULL;
        int r;

        r = config_apply_vm_settings(c, name, args, n, "command line (--vm)", &errors);
        check_errors(r, errors);
        if (r >= 0) {
                const VmConfig *v = config_find_vm(c, name);
                if (!v || strcmp(v->name, name) != 0 || !v->control_socket || !v->secret_file)
                        abort();
        }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        _cleanup_(config_freep) Config *c = NULL;
        _cleanup_free_ char *text = NULL;
        char *args[ARGS_MAX], *name = NULL, *errors = NULL;
        size_t n = 0, n_vms = 0;
        int r;

        if (size < 1 || size > 64 * 1024)
                return 0;
        c = calloc(1, sizeof(*c));
        if (!c)
                return 0;
        r = config_parse_daemon_text("fuzz.conf", data[0] & 2 ? daemon_text : "",
                                     data[0] & 2 ? strlen(daemon_text) : 0, &c->daemon, &errors);
        if (r < 0)
                abort();
        if (data[0] & 1) {
                c->vms = calloc(1, sizeof(VmConfig *));
                if (!c->vms)
                        return 0;
                r = config_parse_vm_file("vm.d/web.conf", "web", web_text, strlen(web_text), &c->vms[0],
                                         &errors);
                if (r < 0)
                        abort();
                c->n_vms = 1;
        }

        /* A NUL-terminated copy: every argument is a C string, as in argv. */
        text = malloc(size);
        if (!text)
                return 0;
        memcpy(text, data + 1, size - 1);
        text[size - 1] = 0;
        for (char *p = text, *end = text + size - 1; p < end; p += strlen(p) + 1) {
                if (p[0] == '@') {
                        if (name)
                                apply(c, name, args, n);
                        if (++n_vms > VMS_MAX)
                                return 0;
                        name = p + 1;
                        n = 0;
                } else if (name && n < ARGS_MAX)
                        args[n++] = p;
        }
        if (name)
                apply(c, name, args, n);

        errors = NULL;
        r = config_validate(c, &errors);
        check_errors(r, errors);
        return 0;
}

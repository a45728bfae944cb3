/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * daemon/config.[ch] for dirtyrepd's command line and reload:
 * config_apply_vm_settings() (a VM from --vm NAME options, or options over a
 * VM file, through the file's own validators), vm_config_equal(),
 * daemon_config_equal(), daemon_config_copy().
 */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.h"
#include "macros.h"
#include "tests.h"

#define ASSERT_STREQ(a, b)                                                                                  \
        do {                                                                                                \
                const char *_a = (a), *_b = (b);                                                            \
                if (!_a || !_b || strcmp(_a, _b) != 0) {                                                    \
                        fprintf(stderr,                                                                     \
                                "%s:%d: %s == %s failed:\n  got:      \"%s\"\n  expected: \"%s\"\n",        \
                                __FILE__, __LINE__, #a, #b, _a ? _a : "(null)", _b ? _b : "(null)");        \
                        exit(1);                                                                            \
                }                                                                                           \
        } while (0)

#define ORIGIN "command line (--vm web)"

static char tmp_root[64];

static int rm_cb(const char *p, const struct stat *st, int flag, struct FTW *ftw)
{
        return remove(p);
}

static void write_file(const char *name, const char *text)
{
        char p[256];
        int fd;

        snprintf(p, sizeof(p), "%s/%s", tmp_root, name);
        fd = open(p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        ASSERT_TRUE(fd >= 0);
        ASSERT_EQ(write(fd, text, strlen(text)), (ssize_t) strlen(text));
        close(fd);
}

/* A Config loaded from a temp dir with the given main file and web.conf (NULL: absent). */
static Config *load(const char *main_text, const char *web_text)
{
        char main_path[128], vm_dir[128];
        Config *c = NULL;
        char *errors = NULL;

        strcpy(tmp_root, "/tmp/test-config-cli-XXXXXX");
        ASSERT_TRUE(mkdtemp(tmp_root) != NULL);
        snprintf(main_path, sizeof(main_path), "%s/dirtyrep.conf", tmp_root);
        snprintf(vm_dir, sizeof(vm_dir), "%s/vm.d", tmp_root);
        ASSERT_OK(mkdir(vm_dir, 0755));
        if (main_text)
                write_file("dirtyrep.conf", main_text);
        if (web_text)
                write_file("vm.d/web.conf", web_text);
        if (config_load(main_path, vm_dir, &c, &errors) < 0) {
                fprintf(stderr, "load failed:\n%s\n", errors);
                exit(1);
        }
        ASSERT_OK(nftw(tmp_root, rm_cb, 16, FTW_DEPTH | FTW_PHYS));
        return c;
}

/* Applies settings that must be rejected; returns the error text (caller frees). */
static char *apply_errors(Config *c, char **settings, size_t n)
{
        char *errors = NULL;

        ASSERT_EQ(config_apply_vm_settings(c, "web", settings, n, ORIGIN, &errors), -EINVAL);
        ASSERT_TRUE(errors != NULL);
        return errors;
}

TEST(new_vm_from_the_command_line)
{
        _cleanup_(config_freep) Config *c = load(NULL, NULL);
        char *s[] = {"Role=primary",
                     "Peer=10.0.0.2:7000",
                     "SecretFile=/etc/dirtyrep/web.key",
                     "EpochMs=35",
                     "Tracking=bitmap",
                     "MaxInflightEpochs=7",
                     "Compression=none",
                     "ControlSocket=/run/vmm/web.sock",
                     "PreCopy=no"};
        const VmConfig *v;

        ASSERT_OK(config_apply_vm_settings(c, "web", s, ELEMENTSOF(s), ORIGIN, NULL));
        ASSERT_EQ(c->n_vms, 1);
        v = config_find_vm(c, "web");
        ASSERT_TRUE(v != NULL);
        ASSERT_STREQ(v->path, ORIGIN);
        ASSERT_EQ(v->role, VM_ROLE_PRIMARY);
        ASSERT_STREQ(v->peer.text, "10.0.0.2:7000");
        ASSERT_STREQ(v->secret_file, "/etc/dirtyrep/web.key");
        ASSERT_EQ(v->epoch_ms, 35);
        ASSERT_EQ(v->tracking, CONFIG_TRACKING_BITMAP);
        ASSERT_EQ(v->max_inflight_epochs, 7);
        ASSERT_EQ(v->compression, CONFIG_COMPRESSION_NONE);
        ASSERT_STREQ(v->control_socket, "/run/vmm/web.sock");
        ASSERT_TRUE(v->control_socket_set);
        ASSERT_TRUE(!v->pre_copy);
        /* Untouched keys have the file defaults. */
        ASSERT_EQ(v->max_staging_mb, 256);
        ASSERT_TRUE(v->output_commit);
        ASSERT_OK(config_validate(c, NULL));
}

TEST(new_vm_default_control_socket_follows_runtime_directory)
{
        _cleanup_(config_freep) Config *c = load("[Daemon]\nRuntimeDirectory=/run/elsewhere\n", NULL);
        char *s[] = {"Role=standby", "Listen=0.0.0.0:7001", "SecretFile=/k"};

        ASSERT_OK(config_apply_vm_settings(c, "web", s, ELEMENTSOF(s), ORIGIN, NULL));
        ASSERT_STREQ(c->vms[0]->control_socket, "/run/elsewhere/web.sock");
        ASSERT_TRUE(!c->vms[0]->control_socket_set);
}

TEST(new_vms_are_kept_sorted)
{
        _cleanup_(config_freep) Config *c =
                load(NULL, "[VM]\nRole=standby\nListen=127.0.0.1:7001\nSecretFile=/k\n");
        char *s[] = {"Role=standby", "Listen=127.0.0.1:7002", "SecretFile=/k", "ControlSocket=/run/a.sock"};
        char *t[] = {"Role=standby", "Listen=127.0.0.1:7003", "SecretFile=/k", "ControlSocket=/run/z.sock"};

        ASSERT_OK(config_apply_vm_settings(c, "zeta", t, ELEMENTSOF(t), "command line (--vm zeta)", NULL));
        ASSERT_OK(config_apply_vm_settings(c, "alpha", s, ELEMENTSOF(s), "command line (--vm alpha)", NULL));
        ASSERT_EQ(c->n_vms, 3);
        ASSERT_STREQ(c->vms[0]->name, "alpha");
        ASSERT_STREQ(c->vms[1]->name, "web");
        ASSERT_STREQ(c->vms[2]->name, "zeta");
        ASSERT_OK(config_validate(c, NULL));
}

TEST(options_override_a_vm_file)
{
        _cleanup_(config_freep) Config *c = load(
                NULL,
                "[VM]\nRole=standby\nListen=127.0.0.1:7001\nSecretFile=/k\nEpochMs=50\nCompression=none\n");
        char *s[] = {"EpochMs=10", "Listen=127.0.0.1:7100"};
        const VmConfig *v;

        ASSERT_OK(config_apply_vm_settings(c, "web", s, ELEMENTSOF(s), ORIGIN, NULL));
        ASSERT_EQ(c->n_vms, 1);
        v = c->vms[0];
        ASSERT_EQ(v->epoch_ms, 10);                             /* overridden */
        ASSERT_STREQ(v->listen.text, "127.0.0.1:7100");         /* overridden */
        ASSERT_EQ(v->compression, CONFIG_COMPRESSION_NONE);     /* from the file */
        ASSERT_STREQ(v->secret_file, "/k");                     /* from the file */
        ASSERT_TRUE(strstr(v->path, "/vm.d/web.conf") != NULL); /* still the file's VM */
}

TEST(role_override_needs_what_the_new_role_needs)
{
        _cleanup_(config_freep) Config *c =
                load(NULL, "[VM]\nRole=standby\nListen=127.0.0.1:7001\nSecretFile=/k\n");
        char *bad[] = {"Role=primary"};
        char *good[] = {"Role=primary", "Peer=127.0.0.1:9"};
        _cleanup_free_ char *err = NULL;

        err = apply_errors(c, bad, ELEMENTSOF(bad));
        ASSERT_STREQ(err, ORIGIN ": Role=primary requires Peer=ADDRESS:PORT");
        ASSERT_EQ(c->vms[0]->role, VM_ROLE_STANDBY); /* a failed application changes nothing */
        ASSERT_OK(config_apply_vm_settings(c, "web", good, ELEMENTSOF(good), ORIGIN, NULL));
        ASSERT_EQ(c->vms[0]->role, VM_ROLE_PRIMARY);
}

TEST(errors_read_like_file_errors_and_are_all_reported)
{
        _cleanup_(config_freep) Config *c = load(NULL, NULL);
        char *s[] = {"Role=primary",
                     "EpochMs=0",
                     "Tracking=foo",
                     "Peer=0.0.0.0:7000",
                     "Compression=zstd",
                     "MaxInflightEpochs=65",
                     "epochms=5",
                     "Bogus=1",
                     "NoEquals",
                     "EpochMs=20",
                     "SecretFile=relative",
                     "ControlSocket="};
        _cleanup_free_ char *err = NULL;

        err = apply_errors(c, s, ELEMENTSOF(s));
        ASSERT_STREQ(err, ORIGIN ": EpochMs=0: must be between 1 and 10000\n" ORIGIN
                                 ": Tracking=foo: must be one of: auto, ring, bitmap\n" ORIGIN
                                 ": Peer=0.0.0.0:7000: a wildcard address cannot be connected to\n" ORIGIN
                                 ": Compression=zstd: must be one of: lz4, none\n" ORIGIN
                                 ": MaxInflightEpochs=65: must be between 1 and 64\n" ORIGIN
                                 ": unknown key epochms= in section [VM], did you mean EpochMs=?\n" ORIGIN
                                 ": unknown key Bogus= in section [VM]\n" ORIGIN
                                 ": expected Key=Value, got \"NoEquals\"\n" ORIGIN
                                 ": EpochMs= given twice\n" ORIGIN
                                 ": SecretFile=relative: must be an absolute path\n" ORIGIN
                                 ": ControlSocket=: empty value");
        ASSERT_EQ(c->n_vms, 0); /* nothing added */
}

TEST(required_keys_for_a_new_vm)
{
        _cleanup_(config_freep) Config *c = load(NULL, NULL);
        char *s[] = {"EpochMs=20"};
        char *standby[] = {"Role=standby", "SecretFile=/k"};
        _cleanup_free_ char *e1 = NULL, *e2 = NULL;

        e1 = apply_errors(c, s, ELEMENTSOF(s));
        ASSERT_STREQ(e1,
                     ORIGIN ": Role= is required (primary or standby)\n" ORIGIN ": SecretFile= is required");
        e2 = apply_errors(c, standby, ELEMENTSOF(standby));
        ASSERT_STREQ(e2, ORIGIN ": Role=standby requires Listen=ADDRESS:PORT");
}

TEST(bad_names_and_hostile_values)
{
        _cleanup_(config_freep) Config *c = load(NULL, NULL);
        char *s[] = {"Role=primary"};
        char *ctl[] = {"Role=primary\nSecretFile=/x"};
        _cleanup_free_ char *e1 = NULL, *e2 = NULL, *e3 = NULL, *big = NULL;
        char *long_value[1];

        ASSERT_EQ(config_apply_vm_settings(c, ".hidden", s, 1, "command line (--vm .hidden)", &e1), -EINVAL);
        ASSERT_STREQ(e1,
                     "command line (--vm .hidden): invalid VM name \".hidden\": must be 1..64 characters of "
                     "A-Z a-z 0-9 _ . - and not start with a dot");
        e2 = apply_errors(c, ctl, 1);
        ASSERT_TRUE(strstr(e2, "Role=: value contains control characters") != NULL);
        ASSERT_TRUE(strchr(e2, '\n') != NULL); /* plus "Role= is required": one error per line */

        big = malloc(CONFIG_LINE_MAX + 32);
        ASSERT_TRUE(big != NULL);
        strcpy(big, "SecretFile=/");
        memset(big + 12, 'a', CONFIG_LINE_MAX + 10);
        big[CONFIG_LINE_MAX + 22] = 0;
        long_value[0] = big;
        e3 = apply_errors(c, long_value, 1);
        ASSERT_TRUE(strstr(e3, "SecretFile=: value is longer than 4096 bytes") != NULL);
        ASSERT_EQ(c->n_vms, 0);
}

TEST(cross_checks_see_command_line_vms)
{
        _cleanup_(config_freep) Config *c =
                load(NULL, "[VM]\nRole=standby\nListen=127.0.0.1:7001\nSecretFile=/k\n");
        char *s[] = {"Role=standby", "Listen=0.0.0.0:7001", "SecretFile=/k", "ControlSocket=/run/o.sock"};
        _cleanup_free_ char *err = NULL;

        ASSERT_OK(config_apply_vm_settings(c, "other", s, ELEMENTSOF(s), "command line (--vm other)", NULL));
        ASSERT_EQ(config_validate(c, &err), -EINVAL);
        /* Sorted by name, "other" comes first: web's file is named, with the command line as the other side.
         */
        ASSERT_TRUE(strstr(err,
                           "/vm.d/web.conf: Listen=127.0.0.1:7001 collides with Listen=0.0.0.0:7001 of VM "
                           "other (command line (--vm other))") != NULL);
}

TEST(equality_and_copies)
{
        _cleanup_(config_freep) Config *a =
                load(NULL, "[VM]\nRole=standby\nListen=127.0.0.1:7001\nSecretFile=/k\n"
                           "VmmArgs=--ring-entries 2 'a b'\n");
        _cleanup_(config_freep) Config *b =
                load(NULL, "[VM]\nRole=standby\nListen=127.0.0.1:7001\nSecretFile=/k\n"
                           "VmmArgs=--ring-entries 2 'a b'\n");
        _cleanup_(daemon_config_freep) DaemonConfig *d = NULL;
        char *s[] = {"EpochMs=21"};
        char *t[] = {"LogLevel=debug"};

        ASSERT_TRUE(vm_config_equal(a->vms[0], b->vms[0]));
        ASSERT_TRUE(daemon_config_equal(a->daemon, b->daemon));
        ASSERT_OK(config_apply_vm_settings(b, "web", s, 1, ORIGIN, NULL));
        ASSERT_TRUE(!vm_config_equal(a->vms[0], b->vms[0]));
        /* The copy made by an override of nothing relevant is equal, deep. */
        ASSERT_EQ(config_apply_vm_settings(a, "web", t, 1, ORIGIN, NULL), -EINVAL); /* a daemon key */

        d = daemon_config_copy(a->daemon);
        ASSERT_TRUE(d != NULL);
        ASSERT_TRUE(d->runtime_directory != a->daemon->runtime_directory);
        ASSERT_TRUE(daemon_config_equal(d, a->daemon));
        d->heartbeat_misses++;
        ASSERT_TRUE(!daemon_config_equal(d, a->daemon));
        d->heartbeat_misses--;
        d->log_level = 7; /* applied in place, not a reason to restart VMs */
        ASSERT_TRUE(daemon_config_equal(d, a->daemon));
        ASSERT_TRUE(vm_config_equal(NULL, NULL));
        ASSERT_TRUE(!vm_config_equal(a->vms[0], NULL));
}

TEST(override_keeps_vmm_args)
{
        _cleanup_(config_freep) Config *c =
                load(NULL, "[VM]\nRole=standby\nListen=127.0.0.1:7001\nSecretFile=/k\n"
                           "VmmArgs=--ring-entries 2 'a b'\n");
        char *s[] = {"EpochMs=21"};

        ASSERT_OK(config_apply_vm_settings(c, "web", s, 1, ORIGIN, NULL));
        ASSERT_EQ(c->vms[0]->n_vmm_args, 3);
        ASSERT_STREQ(c->vms[0]->vmm_args[2], "a b");
        ASSERT_TRUE(c->vms[0]->vmm_args[3] == NULL);
        ASSERT_TRUE(config_vm_key_is_valid("EpochMs"));
        ASSERT_TRUE(!config_vm_key_is_valid("epochms"));
        ASSERT_TRUE(!config_vm_key_is_valid("LogLevel"));
}

DEFINE_TEST_MAIN

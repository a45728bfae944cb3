/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The configuration key tables (daemon/config-parse.c) against what they
 * drive: dirtyrep.conf(5) documents exactly the keys of each table, in its
 * [Daemon] and [VM] sections, and every [VM] key's field is copied and
 * compared (config_apply_vm_settings() copies, vm_config_equal() compares).
 */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config-internal.h"
#include "config.h"
#include "macros.h"
#include "tests.h"

#define MAN_KEYS_MAX 64

typedef struct ManKeys {
        char *daemon[MAN_KEYS_MAX], *vm[MAN_KEYS_MAX];
        size_t n_daemon, n_vm;
} ManKeys;

static void man_keys_done(ManKeys *m)
{
        for (size_t i = 0; i < m->n_daemon; i++)
                free(m->daemon[i]);
        for (size_t i = 0; i < m->n_vm; i++)
                free(m->vm[i]);
}

/*
 * The keys dirtyrep.conf(5) documents: in the sections ".SH [Daemon] ..." and
 * ".SH [VM] ...", each key is a ".TP" paragraph whose tag line is
 * ".BI Key= value" (or .B/.BR). Returns the number of keys found.
 */
static size_t read_man_keys(const char *path, ManKeys *ret)
{
        FILE *f = fopen(path, "re");
        char line[1024], **keys = NULL;
        size_t *n = NULL;
        bool after_tp = false;

        if (!f) {
                fprintf(stderr, "cannot open %s: %m\n", path);
                exit(1);
        }
        while (fgets(line, sizeof(line), f)) {
                line[strcspn(line, "\n")] = 0;
                if (strncmp(line, ".SH ", 4) == 0) {
                        keys = NULL;
                        n = NULL;
                        if (strncmp(line + 4, "[Daemon] ", 9) == 0) {
                                keys = ret->daemon;
                                n = &ret->n_daemon;
                        } else if (strncmp(line + 4, "[VM] ", 5) == 0) {
                                keys = ret->vm;
                                n = &ret->n_vm;
                        }
                        after_tp = false;
                        continue;
                }
                if (streq(line, ".TP")) {
                        after_tp = true;
                        continue;
                }
                if (after_tp && keys &&
                    (strncmp(line, ".BI ", 4) == 0 || strncmp(line, ".BR ", 4) == 0 ||
                     strncmp(line, ".B ", 3) == 0)) {
                        const char *w = line + strcspn(line, " ") + 1;
                        size_t l = strcspn(w, "= ");
                        if (w[l] == '=') {
                                ASSERT_TRUE(*n < MAN_KEYS_MAX);
                                keys[*n] = strndup(w, l);
                                ASSERT_TRUE(keys[*n] != NULL);
                                (*n)++;
                        }
                }
                after_tp = false;
        }
        fclose(f);
        return ret->n_daemon + ret->n_vm;
}

static bool in_list(char *const *l, size_t n, const char *s)
{
        for (size_t i = 0; i < n; i++)
                if (streq(l[i], s))
                        return true;
        return false;
}

/* Both ways: every key of the table documented once, every documented key in the table. */
static unsigned compare(const SectionDef *sec, char *const *doc, size_t n_doc, FILE *report)
{
        unsigned bad = 0;

        for (size_t i = 0; i < sec->n_keys; i++)
                if (!in_list(doc, n_doc, sec->keys[i].name)) {
                        fprintf(report, "[%s] %s= is in the key table but not in dirtyrep.conf(5)\n",
                                sec->name, sec->keys[i].name);
                        bad++;
                }
        for (size_t i = 0; i < n_doc; i++) {
                size_t ki;
                if (!find_key(sec, doc[i], false, &ki)) {
                        fprintf(report, "[%s] %s= is in dirtyrep.conf(5) but not in the key table\n",
                                sec->name, doc[i]);
                        bad++;
                }
                if (in_list(doc, i, doc[i])) {
                        fprintf(report, "[%s] %s= is documented twice in dirtyrep.conf(5)\n", sec->name,
                                doc[i]);
                        bad++;
                }
        }
        return bad;
}

TEST(man_page_documents_the_key_tables)
{
        const char *src = getenv("DR_SRCDIR");
        _cleanup_free_ char *path = NULL;
        ManKeys m = {};
        unsigned bad;

        ASSERT_TRUE(src != NULL);
        ASSERT_TRUE(asprintf(&path, "%s/docs/man/dirtyrep.conf.5", src) > 0);
        ASSERT_TRUE(read_man_keys(path, &m) > 0);
        /* The parser of the page itself: it finds the sections' first keys. */
        ASSERT_TRUE(m.n_daemon > 0 && streq(m.daemon[0], "ListenAddress"));
        ASSERT_TRUE(m.n_vm > 0 && streq(m.vm[0], "Role"));
        bad = compare(&daemon_section, m.daemon, m.n_daemon, stderr) +
              compare(&vm_section, m.vm, m.n_vm, stderr);
        man_keys_done(&m);
        ASSERT_EQ(bad, 0);
}

TEST(man_page_parser_sees_a_missing_key)
{
        char *doc[] = {"Role", "NoSuchKey"};
        _cleanup_free_ char *text = NULL;
        size_t size = 0;
        FILE *report = open_memstream(&text, &size);

        /* Every table key but Role missing, and one the table does not have. */
        ASSERT_TRUE(report != NULL);
        ASSERT_EQ(compare(&vm_section, doc, ELEMENTSOF(doc), report), vm_section.n_keys - 1 + 1);
        fclose(report);
        ASSERT_TRUE(strstr(text, "[VM] Peer= is in the key table but not in dirtyrep.conf(5)") != NULL);
        ASSERT_TRUE(strstr(text, "[VM] NoSuchKey= is in dirtyrep.conf(5) but not in the key table") != NULL);
}

/*
 * A value other than the default for each [VM] key, valid on a standby
 * that has the keys it needs. A key added to the table without one here
 * fails the test below: its copy and comparison must be exercised.
 */
static const struct {
        const char *key, *value;
} other_values[] = {
        {"Role", "standby"}, /* the base is a primary: Listen= is in the base too */
        {"ControlSocket", "/run/other.sock"},
        {"Peer", "192.0.2.2:7000"},
        {"Listen", "127.0.0.1:7002"},
        {"EpochMs", "21"},
        {"Tracking", "bitmap"},
        {"SecretFile", "/other"},
        {"MaxInflightEpochs", "5"},
        {"Compression", "none"},
        {"PreCopy", "no"},
        {"MaxStagingMB", "512"},
        {"Vmm", "/usr/bin/other-vmm"},
        {"VmmArgs", "--ring-entries 8"},
        {"VmmType", "qemu"},
        {"FenceCommand", "/bin/true"},
        {"FailoverPolicy", "auto"},
        {"ServiceAddress", "10.0.0.11/24"},
        {"ServiceInterface", "eth1"},
        {"SplitBrainTimeoutMs", "6000"},
        {"SplitBrainPolicy", "continue"},
        {"OutputCommit", "no"},
        {"ConsoleCommit", "yes"},
        {"TLS", "yes"},
        {"TLSCertificateFile", "/other.crt"},
        {"TLSKeyFile", "/other.key"},
        {"TLSCAFile", "/other-ca.crt"},
        {"TLSPeerName", "other.example"},
};

static Config *base_config(void)
{
        _cleanup_(config_freep) Config *c = calloc(1, sizeof(Config));
        char *base[] = {"Role=primary",
                        "Peer=192.0.2.1:7000",
                        "Listen=127.0.0.1:7001",
                        "SecretFile=/k",
                        "ServiceAddress=10.0.0.10/24",
                        "ServiceInterface=eth0",
                        "TLSCertificateFile=/c.crt",
                        "TLSKeyFile=/c.key",
                        "TLSCAFile=/ca.crt",
                        "TLSPeerName=peer.example",
                        "FenceCommand=/bin/false",
                        "VmmArgs=--ring-entries 4 'a b'"};
        _cleanup_free_ char *errors = NULL;
        int r;

        ASSERT_TRUE(c != NULL);
        c->daemon = daemon_config_new_default();
        ASSERT_TRUE(c->daemon != NULL);
        r = config_apply_vm_settings(c, "web", base, ELEMENTSOF(base), "base", &errors);
        if (r < 0)
                fprintf(stderr, "%s\n", errors);
        ASSERT_OK(r);
        return TAKE_PTR(c);
}

TEST(every_vm_key_is_copied_and_compared)
{
        ASSERT_EQ(ELEMENTSOF(other_values), vm_section.n_keys);
        for (size_t i = 0; i < vm_section.n_keys; i++) {
                const KeyDef *k = &vm_section.keys[i];
                _cleanup_(config_freep) Config *a = base_config(), *b = base_config();
                _cleanup_free_ char *set = NULL, *errors = NULL;
                char *settings[3];
                size_t n = 0, j = 0;
                int r;

                while (j < ELEMENTSOF(other_values) && !streq(other_values[j].key, k->name))
                        j++;
                if (j == ELEMENTSOF(other_values)) {
                        fprintf(stderr, "%s= has no value in other_values[]\n", k->name);
                        exit(1);
                }
                ASSERT_TRUE(asprintf(&set, "%s=%s", k->name, other_values[j].value) > 0);
                settings[n++] = set;
                /* What some values need to be valid on their own. */
                if (streq(k->name, "VmmType"))
                        settings[n++] = "VmmArgs=-m 1 %r %s %f %c";
                if (streq(k->name, "SplitBrainPolicy"))
                        settings[n++] = "FailoverPolicy=manual";
                r = config_apply_vm_settings(b, "web", settings, n, "other", &errors);
                if (r < 0)
                        fprintf(stderr, "%s: %s\n", set, errors);
                ASSERT_OK(r);
                /* b's VM is a copy of the base with one key changed; a is the base. */
                ASSERT_TRUE(vm_config_equal(a->vms[0], a->vms[0]));
                if (vm_config_equal(a->vms[0], b->vms[0])) {
                        fprintf(stderr, "%s: vm_config_equal() does not see the change\n", set);
                        exit(1);
                }
        }
}

TEST(a_copy_is_equal_and_deep)
{
        _cleanup_(config_freep) Config *a = base_config(), *c = base_config();
        const VmConfig *before = c->vms[0];
        char *same[] = {"EpochMs=20"}; /* the default: the copy changes nothing */

        ASSERT_OK(config_apply_vm_settings(c, "web", same, 1, "same", NULL));
        ASSERT_TRUE(c->vms[0] != before);
        ASSERT_TRUE(vm_config_equal(a->vms[0], c->vms[0]));
        ASSERT_EQ(c->vms[0]->n_vmm_args, 3);
        ASSERT_TRUE(streq(c->vms[0]->vmm_args[2], "a b") && c->vms[0]->vmm_args[3] == NULL);
        ASSERT_TRUE(c->vms[0]->tls_peer_name != a->vms[0]->tls_peer_name);
        ASSERT_TRUE(streq(c->vms[0]->tls_peer_name, "peer.example"));
}

DEFINE_TEST_MAIN

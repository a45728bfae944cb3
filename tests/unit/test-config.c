/* SPDX-License-Identifier: GPL-2.0-or-later */
/* daemon/config.[ch]: values, defaults, every class of error with its file:line message, loading, secrets.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdarg.h>
#include <sys/stat.h>
#include <syslog.h>
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

#define ASSERT_CONTAINS(hay, needle)                                                                        \
        do {                                                                                                \
                const char *_h = (hay), *_n = (needle);                                                     \
                if (!_h || !strstr(_h, _n)) {                                                               \
                        fprintf(stderr, "%s:%d: \"%s\" not found in:\n%s\n", __FILE__, __LINE__, _n,        \
                                _h ? _h : "(null)");                                                        \
                        exit(1);                                                                            \
                }                                                                                           \
        } while (0)

#define VM_PATH "/etc/dirtyrep/vm.d/web.conf"

static char *mfree_str(char *p)
{
        free(p);
        return NULL;
}

static unsigned count_lines(const char *s)
{
        unsigned n = 1;
        for (; *s; s++)
                n += *s == '\n';
        return n;
}

/* Parses a VM file that must be rejected; returns its error message (caller frees). */
static char *vm_errors(const char *text)
{
        VmConfig *v = NULL;
        char *errors = NULL;

        ASSERT_EQ(config_parse_vm_file(VM_PATH, "web", text, strlen(text), &v, &errors), -EINVAL);
        ASSERT_TRUE(v == NULL);
        ASSERT_TRUE(errors != NULL);
        return errors;
}

static void assert_vm_error(const char *text, const char *expected)
{
        _cleanup_free_ char *errors = vm_errors(text);
        ASSERT_STREQ(errors, expected);
}

static VmConfig *vm_ok(const char *text)
{
        VmConfig *v = NULL;
        _cleanup_free_ char *errors = NULL;
        int r;

        r = config_parse_vm_file(VM_PATH, "web", text, strlen(text), &v, &errors);
        if (r < 0)
                fprintf(stderr, "unexpected errors:\n%s\n", errors ? errors : "(none)");
        ASSERT_OK(r);
        ASSERT_TRUE(errors == NULL);
        return v;
}

#define PRIMARY_MIN "[VM]\nRole=primary\nPeer=192.0.2.1:7000\nSecretFile=/etc/dirtyrep/web.key\n"

TEST(vm_defaults)
{
        _cleanup_(vm_config_freep) VmConfig *v = vm_ok(PRIMARY_MIN);
        const struct sockaddr_in *sin = (const struct sockaddr_in *) &v->peer.sa;

        ASSERT_STREQ(v->name, "web");
        ASSERT_STREQ(v->path, VM_PATH);
        ASSERT_EQ(v->role, VM_ROLE_PRIMARY);
        ASSERT_STREQ(v->control_socket, "/run/dirtyrep/web.sock");
        ASSERT_TRUE(!v->control_socket_set);
        ASSERT_EQ(v->peer.len, sizeof(struct sockaddr_in));
        ASSERT_EQ(sin->sin_family, AF_INET);
        ASSERT_EQ(ntohs(sin->sin_port), 7000);
        ASSERT_EQ(ntohl(sin->sin_addr.s_addr), 0xC0000201u);
        ASSERT_STREQ(v->peer.text, "192.0.2.1:7000");
        ASSERT_EQ(v->listen.len, 0);
        ASSERT_EQ(v->epoch_ms, 20);
        ASSERT_EQ(v->tracking, CONFIG_TRACKING_AUTO);
        ASSERT_STREQ(v->secret_file, "/etc/dirtyrep/web.key");
        ASSERT_EQ(v->max_inflight_epochs, 4);
        ASSERT_EQ(v->compression, CONFIG_COMPRESSION_LZ4);
        ASSERT_TRUE(v->pre_copy);
        ASSERT_EQ(v->max_staging_mb, 256);
        ASSERT_TRUE(strlen(v->vmm) > strlen("/dirtyrep-vmm"));
        ASSERT_STREQ(v->vmm + strlen(v->vmm) - strlen("/dirtyrep-vmm"), "/dirtyrep-vmm");
        ASSERT_TRUE(v->vmm[0] == '/');
        ASSERT_TRUE(v->vmm_args_string == NULL);
        ASSERT_TRUE(v->vmm_args != NULL && v->vmm_args[0] == NULL);
        ASSERT_EQ(v->n_vmm_args, 0);
        ASSERT_TRUE(v->fence_command == NULL);
        ASSERT_EQ(v->failover_policy, FAILOVER_POLICY_MANUAL);
        ASSERT_EQ(v->service_address.family, AF_UNSPEC);
        ASSERT_TRUE(v->service_interface == NULL);
        ASSERT_EQ(v->split_brain_timeout_ms, 5000);
        ASSERT_EQ(v->split_brain_policy, SPLIT_BRAIN_POLICY_SUSPEND);
        ASSERT_TRUE(v->output_commit);
        ASSERT_TRUE(!v->console_commit);
}

TEST(vm_vmm_type_qemu)
{
        static const VmmArgValues val = {.ram = "/proc/self/fd/3",
                                         .state = "/proc/self/fd/4",
                                         .ready_fd = "5",
                                         .control = "/run/dirtyrep/web.sock",
                                         .name = "web"};
        _cleanup_(vm_config_freep) VmConfig *d = vm_ok(PRIMARY_MIN);
        _cleanup_(vm_config_freep) VmConfig *v = NULL;
        _cleanup_free_ char *x = NULL, *e = NULL;
        unsigned seen = 0;
        char bad = 0;

        ASSERT_EQ(d->vmm_type, VMM_TYPE_DIRTYREP_VMM);
        ASSERT_STREQ(vmm_type_to_string(VMM_TYPE_QEMU), "qemu");

        v = vm_ok(PRIMARY_MIN
                  "Vmm=/usr/bin/qemu-system-x86_64\nVmmType=qemu\n"
                  "VmmArgs=-S -object memory-backend-file,id=m0,size=256M,mem-path=%r,share=on "
                  "-object 'dirtyrep-agent,id=dr0,path=%c,name=%n,restore=%s,ready-fd=%f' -name 100%%\n");
        ASSERT_EQ(v->vmm_type, VMM_TYPE_QEMU);
        ASSERT_EQ(v->n_vmm_args, 7);
        ASSERT_OK(vmm_arg_expand(v->vmm_args[4], &val, &x, &bad, &seen));
        ASSERT_STREQ(x, "dirtyrep-agent,id=dr0,path=/run/dirtyrep/web.sock,name=web,restore=/proc/self/fd/4,"
                        "ready-fd=5");
        ASSERT_EQ(seen, 0xe);
        x = mfree_str(x);
        ASSERT_OK(vmm_arg_expand(v->vmm_args[6], &val, &x, NULL, NULL));
        ASSERT_STREQ(x, "100%");
        x = mfree_str(x);
        ASSERT_EQ(vmm_arg_expand("a%xb", &val, &x, &bad, NULL), -EINVAL);
        ASSERT_EQ(bad, 'x');
        ASSERT_EQ(vmm_arg_expand("end%", &val, &x, &bad, NULL), -EINVAL);
        ASSERT_TRUE(x == NULL);

        /* Failover could not start this QEMU on the replica: refused at load, naming what is missing. */
        e = vm_errors(PRIMARY_MIN
                      "VmmType=qemu\nVmmArgs=-object dirtyrep-agent,path=%c,restore=%s,ready-fd=%f\n");
        ASSERT_TRUE(strstr(e, "VmmType=qemu: VmmArgs= lacks %r (the replica's RAM)") != NULL);
        e = mfree_str(e);
        e = vm_errors(PRIMARY_MIN "VmmType=qemu\nVmmArgs=%r %s %f %c %q\n");
        ASSERT_TRUE(strstr(e, "unknown placeholder %q") != NULL);
        e = mfree_str(e);
        e = vm_errors(PRIMARY_MIN "VmmType=kvmtool\n");
        ASSERT_TRUE(strstr(e, "VmmType=") != NULL);
}

TEST(vm_all_keys)
{
        static const char text[] =
                "\xEF\xBB\xBF# a standby with every key set\n"
                "; another comment\n"
                "\n"
                "  [VM]  \r\n"
                "Role = standby\r\n"
                "ControlSocket=/run/x/web.sock\n"
                "Peer=[2001:db8::1]:7001\n"
                "\tListen =  [::]:0 \t\n"
                "EpochMs=10000\n"
                "Tracking=bitmap\n"
                "SecretFile=/etc/dirtyrep/secret\n"
                "MaxInflightEpochs=64\n"
                "Compression=none\n"
                "PreCopy=no\n"
                "MaxStagingMB=65536\n"
                "Vmm=/opt/bin/my-vmm\n"
                "VmmArgs=--ring-entries 1024  --console '/run/dirtyrep/web console' \"a b\"c\n"
                "FenceCommand=/usr/local/bin/fence --host old\n"
                "FailoverPolicy=auto\n"
                "ServiceAddress=2001:db8::10/64\n"
                "ServiceInterface=eth0\n"
                "SplitBrainTimeoutMs=100\n"
                "SplitBrainPolicy=continue\n"
                "OutputCommit=no\n"
                "ConsoleCommit=yes"; /* no final newline */
        _cleanup_(vm_config_freep) VmConfig *v = vm_ok(text);
        const struct sockaddr_in6 *peer = (const struct sockaddr_in6 *) &v->peer.sa;
        struct in6_addr expect;

        ASSERT_EQ(v->role, VM_ROLE_STANDBY);
        ASSERT_STREQ(v->control_socket, "/run/x/web.sock");
        ASSERT_TRUE(v->control_socket_set);
        ASSERT_EQ(peer->sin6_family, AF_INET6);
        ASSERT_EQ(v->peer.len, sizeof(struct sockaddr_in6));
        ASSERT_EQ(ntohs(peer->sin6_port), 7001);
        ASSERT_EQ(inet_pton(AF_INET6, "2001:db8::1", &expect), 1);
        ASSERT_TRUE(memcmp(&peer->sin6_addr, &expect, sizeof(expect)) == 0);
        ASSERT_STREQ(v->peer.text, "[2001:db8::1]:7001");
        ASSERT_STREQ(v->listen.text, "[::]:0");
        ASSERT_EQ(v->epoch_ms, 10000);
        ASSERT_EQ(v->tracking, CONFIG_TRACKING_BITMAP);
        ASSERT_EQ(v->max_inflight_epochs, 64);
        ASSERT_EQ(v->compression, CONFIG_COMPRESSION_NONE);
        ASSERT_TRUE(!v->pre_copy);
        ASSERT_EQ(v->max_staging_mb, 65536);
        ASSERT_STREQ(v->vmm, "/opt/bin/my-vmm");
        ASSERT_STREQ(v->vmm_args_string,
                     "--ring-entries 1024  --console '/run/dirtyrep/web console' \"a b\"c");
        ASSERT_EQ(v->n_vmm_args, 5);
        ASSERT_STREQ(v->vmm_args[0], "--ring-entries");
        ASSERT_STREQ(v->vmm_args[1], "1024");
        ASSERT_STREQ(v->vmm_args[2], "--console");
        ASSERT_STREQ(v->vmm_args[3], "/run/dirtyrep/web console");
        ASSERT_STREQ(v->vmm_args[4], "a bc");
        ASSERT_TRUE(v->vmm_args[5] == NULL);
        ASSERT_STREQ(v->fence_command, "/usr/local/bin/fence --host old");
        ASSERT_EQ(v->failover_policy, FAILOVER_POLICY_AUTO);
        ASSERT_EQ(v->service_address.family, AF_INET6);
        ASSERT_EQ(v->service_address.prefixlen, 64);
        ASSERT_STREQ(v->service_interface, "eth0");
        ASSERT_EQ(v->split_brain_timeout_ms, 100);
        ASSERT_EQ(v->split_brain_policy, SPLIT_BRAIN_POLICY_CONTINUE);
        ASSERT_TRUE(!v->output_commit);
        ASSERT_TRUE(v->console_commit);

        ASSERT_STREQ(vm_role_to_string(v->role), "standby");
        ASSERT_STREQ(config_tracking_to_string(v->tracking), "bitmap");
        ASSERT_STREQ(config_compression_to_string(v->compression), "none");
        ASSERT_STREQ(failover_policy_to_string(v->failover_policy), "auto");
        ASSERT_STREQ(split_brain_policy_to_string(v->split_brain_policy), "continue");
        ASSERT_TRUE(vm_role_to_string((VmRole) 7) == NULL);
}

TEST(vm_empty_value_unsets_optional_keys)
{
        _cleanup_(vm_config_freep) VmConfig *v =
                vm_ok(PRIMARY_MIN "VmmArgs=\nFenceCommand=\nServiceAddress=\n");

        ASSERT_TRUE(v->vmm_args_string == NULL);
        ASSERT_EQ(v->n_vmm_args, 0);
        ASSERT_TRUE(v->fence_command == NULL);
        ASSERT_EQ(v->service_address.family, AF_UNSPEC);
}

TEST(vm_error_classes)
{
        /* The example from the issue, word for word. */
        assert_vm_error(PRIMARY_MIN "EpochMs=0\n", VM_PATH ":5: EpochMs=0: must be between 1 and 10000");
        assert_vm_error(PRIMARY_MIN "EpochMs=10001\n",
                        VM_PATH ":5: EpochMs=10001: must be between 1 and 10000");
        assert_vm_error(PRIMARY_MIN "EpochMs=99999999999999999999999\n",
                        VM_PATH ":5: EpochMs=99999999999999999999999: must be between 1 and 10000");
        assert_vm_error(PRIMARY_MIN "EpochMs=0x10\n",
                        VM_PATH ":5: EpochMs=0x10: not a time span (20ms, 2s; a bare number is "
                                "milliseconds), must be between 1 and 10000");
        assert_vm_error(PRIMARY_MIN "EpochMs=-1\n",
                        VM_PATH ":5: EpochMs=-1: not a time span (20ms, 2s; a bare number is milliseconds), "
                                "must be between 1 and 10000");
        assert_vm_error(PRIMARY_MIN "EpochMs=20 # inline comment\n",
                        VM_PATH ":5: EpochMs=20 # inline comment: not a time span (20ms, 2s; a bare number "
                                "is milliseconds), must be "
                                "between 1 and 10000");
        assert_vm_error(PRIMARY_MIN "[Network]\nFoo=1\nBar=2\n",
                        VM_PATH ":5: unknown section [Network], expected [VM]");
        assert_vm_error(PRIMARY_MIN "[VM\n", VM_PATH ":5: invalid section header \"[VM\"");
        assert_vm_error(PRIMARY_MIN "[VM]x\n", VM_PATH ":5: invalid section header \"[VM]x\"");
        assert_vm_error(PRIMARY_MIN "[VM]\n", VM_PATH ":5: duplicate section [VM] (first on line 1)");
        assert_vm_error(PRIMARY_MIN "Bogus=1\n", VM_PATH ":5: unknown key Bogus= in section [VM]");
        assert_vm_error(PRIMARY_MIN "epochms=5\n",
                        VM_PATH ":5: unknown key epochms= in section [VM], did you mean EpochMs=?");
        assert_vm_error(PRIMARY_MIN "LogLevel=debug\n", VM_PATH ":5: unknown key LogLevel= in section [VM]");
        assert_vm_error(PRIMARY_MIN "EpochMs=5\nEpochMs=6\n",
                        VM_PATH ":6: duplicate key EpochMs= (first set on line 5)");
        assert_vm_error("Role=primary\n" PRIMARY_MIN,
                        VM_PATH ":1: Role= outside of a section, expected [VM] first");
        assert_vm_error(PRIMARY_MIN "EpochMs\n", VM_PATH ":5: expected Key=Value, got \"EpochMs\"");
        assert_vm_error(PRIMARY_MIN "=5\n", VM_PATH ":5: missing key before '='");
        assert_vm_error(PRIMARY_MIN "EpochMs=\n", VM_PATH ":5: EpochMs=: empty value");
        assert_vm_error(PRIMARY_MIN "EpochMs=1\x1b[31m\n", VM_PATH ":5: line contains control characters");
        assert_vm_error(PRIMARY_MIN "Tracking=dirty\n",
                        VM_PATH ":5: Tracking=dirty: must be one of: auto, ring, bitmap");
        assert_vm_error(PRIMARY_MIN "PreCopy=maybe\n", VM_PATH ":5: PreCopy=maybe: must be yes or no");
        assert_vm_error(PRIMARY_MIN "Vmm=bin/vmm\n", VM_PATH ":5: Vmm=bin/vmm: must be an absolute path");
        assert_vm_error(PRIMARY_MIN "Vmm=/usr/../bin/vmm\n",
                        VM_PATH ":5: Vmm=/usr/../bin/vmm: path must not contain \".\" or \"..\" components");
        assert_vm_error(PRIMARY_MIN "VmmArgs=--x 'oops\n",
                        VM_PATH ":5: VmmArgs=--x 'oops: unterminated ' quote");
        assert_vm_error(PRIMARY_MIN "FenceCommand=fence-it\n",
                        VM_PATH ":5: FenceCommand=fence-it: must start with the absolute path of a program");
        assert_vm_error(PRIMARY_MIN "ServiceAddress=10.0.0.10/33\nServiceInterface=eth0\n",
                        VM_PATH ":5: ServiceAddress=10.0.0.10/33: prefix length must be between 1 and 32");
        assert_vm_error(PRIMARY_MIN "ServiceAddress=10.0.0.10\nServiceInterface=eth0\n", VM_PATH
                        ":5: ServiceAddress=10.0.0.10: expected ADDRESS/PREFIXLEN, e.g. 10.0.0.10/24");
        assert_vm_error(PRIMARY_MIN "ServiceAddress=10.0.0.10/24\n",
                        VM_PATH ":5: ServiceAddress= requires ServiceInterface=");
        assert_vm_error(PRIMARY_MIN "ServiceInterface=eth0\n",
                        VM_PATH ":5: ServiceInterface= is only meaningful with ServiceAddress=");
        assert_vm_error(PRIMARY_MIN "ServiceAddress=10.0.0.10/24\nServiceInterface=a/b\n", VM_PATH
                        ":6: ServiceInterface=a/b: not a valid interface name (1..15 bytes, no '/', ':' "
                        "or blanks)");

        /* Addresses: syntax, port range, wildcard peers. */
        assert_vm_error("[VM]\nRole=primary\nPeer=192.0.2.1:0\nSecretFile=/k\n",
                        VM_PATH ":3: Peer=192.0.2.1:0: port must be between 1 and 65535");
        assert_vm_error("[VM]\nRole=primary\nPeer=0.0.0.0:7000\nSecretFile=/k\n",
                        VM_PATH ":3: Peer=0.0.0.0:7000: a wildcard address cannot be connected to");
        assert_vm_error("[VM]\nRole=primary\nPeer=peer.example.com:7000\nSecretFile=/k\n", VM_PATH
                        ":3: Peer=peer.example.com:7000: expected IPV4:PORT or [IPV6]:PORT with a numeric "
                        "address");
        assert_vm_error("[VM]\nRole=standby\nListen=10.0.0.1:65536\nSecretFile=/k\n", VM_PATH
                        ":3: Listen=10.0.0.1:65536: port must be between 0 and 65535 (0: any free port)");

        /* Required keys. */
        assert_vm_error("[VM]\nPeer=192.0.2.1:1\n",
                        VM_PATH ":1: Role= is required (primary or standby)\n" VM_PATH
                                ":1: SecretFile= is required");
        assert_vm_error("[VM]\nRole=primary\nSecretFile=/k\n",
                        VM_PATH ":2: Role=primary requires Peer=ADDRESS:PORT");
        assert_vm_error("[VM]\nSecretFile=/k\nRole=standby\n",
                        VM_PATH ":3: Role=standby requires Listen=ADDRESS:PORT");
        assert_vm_error("[VM]\nRole=leader\nSecretFile=/k\n",
                        VM_PATH ":2: Role=leader: must be one of: primary, standby");
        assert_vm_error("", VM_PATH ": no [VM] section");
        assert_vm_error("# only a comment\n", VM_PATH ": no [VM] section");
}

TEST(vm_failover_policy_cluster)
{
        _cleanup_(vm_config_freep) VmConfig *v = vm_ok(PRIMARY_MIN "FailoverPolicy=cluster\n");

        ASSERT_EQ(v->failover_policy, FAILOVER_POLICY_CLUSTER);
        ASSERT_STREQ(failover_policy_to_string(v->failover_policy), "cluster");
        ASSERT_EQ(v->split_brain_policy, SPLIT_BRAIN_POLICY_SUSPEND);
        /* An isolated primary that released output on its own would lose acknowledged writes. */
        assert_vm_error(PRIMARY_MIN "FailoverPolicy=cluster\nSplitBrainPolicy=continue\n", VM_PATH
                        ":6: SplitBrainPolicy=continue cannot be combined with FailoverPolicy=cluster "
                        "(use suspend)");
        assert_vm_error(PRIMARY_MIN "FailoverPolicy=pacemaker\n",
                        VM_PATH ":5: FailoverPolicy=pacemaker: must be one of: manual, auto, cluster");
}

TEST(vm_control_socket_must_fit_sun_path)
{
        char text[512], expect[512];

        /* sun_path holds 107 bytes and the NUL. */
        snprintf(text, sizeof(text), PRIMARY_MIN "ControlSocket=/%0107d\n", 0);
        snprintf(expect, sizeof(expect),
                 VM_PATH ":5: ControlSocket=/%063d...: path is too long (at most 107 bytes)", 0);
        assert_vm_error(text, expect);
        snprintf(text, sizeof(text), PRIMARY_MIN "ControlSocket=/%0106d\n", 0);
        vm_config_free(vm_ok(text));
}

TEST(vm_limits)
{
        _cleanup_free_ char *big = NULL, *errors = NULL;
        VmConfig *v = NULL;
        size_t n;

        /* Overlong line: 4097 bytes; exactly 4096 is fine (a comment here). */
        big = malloc(2 * CONFIG_LINE_MAX + 100);
        ASSERT_TRUE(big);
        n = (size_t) sprintf(big, PRIMARY_MIN "#");
        memset(big + n, 'x', CONFIG_LINE_MAX - 1);
        n += CONFIG_LINE_MAX - 1;
        big[n++] = '\n';
        ASSERT_OK(config_parse_vm_file(VM_PATH, "web", big, n, &v, NULL));
        v = vm_config_free(v);
        big[n - 1] = 'x';
        big[n++] = '\n';
        ASSERT_EQ(config_parse_vm_file(VM_PATH, "web", big, n, &v, &errors), -EINVAL);
        ASSERT_STREQ(errors, VM_PATH ":5: line is longer than 4096 bytes");
        errors = mfree_str(errors);

        /* NUL byte. */
        {
                static const char t[] = PRIMARY_MIN "Epoch\0Ms=5\n";
                ASSERT_EQ(config_parse_vm_file(VM_PATH, "web", t, sizeof(t) - 1, &v, &errors), -EINVAL);
                ASSERT_STREQ(errors, VM_PATH ":5: line contains a NUL byte");
                errors = mfree_str(errors);
        }

        /* More than 1 MiB: refused before anything is parsed. */
        {
                _cleanup_free_ char *huge = calloc(1, CONFIG_FILE_MAX + 1);
                ASSERT_TRUE(huge);
                memset(huge, '\n', CONFIG_FILE_MAX + 1);
                ASSERT_EQ(config_parse_vm_file(VM_PATH, "web", huge, CONFIG_FILE_MAX + 1, &v, &errors),
                          -EINVAL);
                ASSERT_STREQ(errors, VM_PATH ": file is larger than 1048576 bytes");
                errors = mfree_str(errors);
                /* Exactly 1 MiB of comments and a valid file is fine. */
                memset(huge, '#', CONFIG_FILE_MAX);
                for (size_t i = 63; i < CONFIG_FILE_MAX; i += 64)
                        huge[i] = '\n';
                memcpy(huge, PRIMARY_MIN, strlen(PRIMARY_MIN));
                ASSERT_OK(config_parse_vm_file(VM_PATH, "web", huge, CONFIG_FILE_MAX, &v, NULL));
                v = vm_config_free(v);
        }

        /* Too many VmmArgs. */
        {
                char t[1024];
                int o = sprintf(t, PRIMARY_MIN "VmmArgs=");
                for (int i = 0; i < 65; i++)
                        o += sprintf(t + o, "a ");
                strcpy(t + o, "\n");
                errors = vm_errors(t);
                ASSERT_CONTAINS(errors, ": more than 64 arguments");
                errors = mfree_str(errors);
        }

        /* A value quoted in a message is truncated and escaped. */
        {
                char t[512];
                snprintf(t, sizeof(t), PRIMARY_MIN "Tracking=%s\\\xff\n",
                         "0123456789012345678901234567890123456789012345678901234567890");
                errors = vm_errors(t);
                ASSERT_STREQ(errors, VM_PATH
                             ":5: Tracking=0123456789012345678901234567890123456789012345678901234567890"
                             "\\x5c\\xff: must be one of: auto, ring, bitmap");
                errors = mfree_str(errors);
                snprintf(t, sizeof(t), PRIMARY_MIN "Tracking=%s\n",
                         "01234567890123456789012345678901234567890123456789012345678901234567890");
                errors = vm_errors(t);
                ASSERT_CONTAINS(
                        errors,
                        "Tracking=0123456789012345678901234567890123456789012345678901234567890123...:");
        }
}

TEST(vm_all_errors_reported)
{
        _cleanup_free_ char *errors = NULL, *many = NULL;
        size_t o = 0;

        errors = vm_errors("[VM]\n"
                           "Role=primary\n"
                           "EpochMs=0\n"
                           "Bogus=1\n"
                           "Tracking=x\n"
                           "Tracking=ring\n"
                           "SecretFile=/k\n");
        ASSERT_STREQ(errors, VM_PATH ":3: EpochMs=0: must be between 1 and 10000\n" VM_PATH
                                     ":4: unknown key Bogus= in section [VM]\n" VM_PATH
                                     ":5: Tracking=x: must be one of: auto, ring, bitmap\n" VM_PATH
                                     ":6: duplicate key Tracking= (first set on line 5)\n" VM_PATH
                                     ":2: Role=primary requires Peer=ADDRESS:PORT");

        /* 60 bad lines: the first 50 are shown, then how many were not. */
        many = malloc(4096);
        ASSERT_TRUE(many);
        o = (size_t) sprintf(many, PRIMARY_MIN);
        for (int i = 0; i < 60; i++)
                o += (size_t) sprintf(many + o, "Bad%d=1\n", i);
        free(errors);
        errors = vm_errors(many);
        ASSERT_EQ(count_lines(errors), CONFIG_ERRORS_MAX + 1);
        ASSERT_CONTAINS(errors, VM_PATH ":5: unknown key Bad0= in section [VM]\n");
        ASSERT_CONTAINS(errors, VM_PATH ":54: unknown key Bad49= in section [VM]\n");
        ASSERT_TRUE(!strstr(errors, "Bad50="));
        ASSERT_CONTAINS(errors, "\n" VM_PATH ": 10 more errors not shown");
}

TEST(vm_name_validation)
{
        VmConfig *v = NULL;
        _cleanup_free_ char *errors = NULL;
        char name65[66];

        ASSERT_TRUE(config_vm_name_is_valid("web"));
        ASSERT_TRUE(config_vm_name_is_valid("web-1.prod_A"));
        ASSERT_TRUE(!config_vm_name_is_valid(""));
        ASSERT_TRUE(!config_vm_name_is_valid(".web"));
        ASSERT_TRUE(!config_vm_name_is_valid("we b"));
        ASSERT_TRUE(!config_vm_name_is_valid("web/1"));
        ASSERT_TRUE(!config_vm_name_is_valid("w\xc3\xa9"));
        memset(name65, 'a', 65);
        name65[65] = 0;
        ASSERT_TRUE(!config_vm_name_is_valid(name65));
        name65[64] = 0;
        ASSERT_TRUE(config_vm_name_is_valid(name65));

        ASSERT_EQ(
                config_parse_vm_file("/x/.web.conf", ".web", PRIMARY_MIN, strlen(PRIMARY_MIN), &v, &errors),
                -EINVAL);
        ASSERT_STREQ(errors,
                     "/x/.web.conf: invalid VM name \".web\": must be 1..64 characters of A-Z a-z 0-9 _ . - "
                     "and not start with a dot");
}

#define BAD_DAEMON "[Daemon]\nLogLevel=verbose\nHeartbeatIntervalMs=4\n[VM]\nRole=primary\n"

TEST(daemon_text)
{
        static const char full[] = "[Daemon]\n"
                                   "ListenAddress=[::1]:7100\n"
                                   "LogLevel=debug\n"
                                   "StateDirectory=/srv/dirtyrep\n"
                                   "RuntimeDirectory=/run/dr\n"
                                   "HeartbeatIntervalMs=5\n"
                                   "HeartbeatMisses=100\n";
        _cleanup_(daemon_config_freep) DaemonConfig *d = NULL;
        _cleanup_free_ char *errors = NULL;

        ASSERT_OK(config_parse_daemon_text("/etc/dirtyrep/dirtyrep.conf", "", 0, &d, &errors));
        ASSERT_EQ(d->listen_address.len, 0);
        ASSERT_EQ(d->log_level, LOG_INFO);
        ASSERT_STREQ(d->state_directory, "/var/lib/dirtyrep");
        ASSERT_STREQ(d->runtime_directory, "/run/dirtyrep");
        ASSERT_TRUE(!d->runtime_directory_set);
        ASSERT_EQ(d->heartbeat_interval_ms, 50);
        ASSERT_EQ(d->heartbeat_misses, 4);
        d = daemon_config_free(d);

        ASSERT_OK(config_parse_daemon_text("/etc/dirtyrep/dirtyrep.conf", full, strlen(full), &d, &errors));
        ASSERT_STREQ(d->listen_address.text, "[::1]:7100");
        ASSERT_EQ(d->log_level, LOG_DEBUG);
        ASSERT_STREQ(d->state_directory, "/srv/dirtyrep");
        ASSERT_STREQ(d->runtime_directory, "/run/dr");
        ASSERT_TRUE(d->runtime_directory_set);
        ASSERT_EQ(d->heartbeat_interval_ms, 5);
        ASSERT_EQ(d->heartbeat_misses, 100);
        d = daemon_config_free(d);

        ASSERT_EQ(config_parse_daemon_text("/d.conf", BAD_DAEMON, strlen(BAD_DAEMON), &d, &errors), -EINVAL);
        ASSERT_TRUE(d == NULL);
        ASSERT_STREQ(errors,
                     "/d.conf:2: LogLevel=verbose: must be one of: debug, info, notice, warning, err\n"
                     "/d.conf:3: HeartbeatIntervalMs=4: must be between 5 and 10000\n"
                     "/d.conf:4: unknown section [VM], expected [Daemon]");
}

TEST(socket_addresses)
{
        struct sockaddr_storage ss;
        socklen_t len = 0;
        char buf[CONFIG_ADDRESS_STRING_MAX];

        ASSERT_OK(parse_socket_address("127.0.0.1:1", &ss, &len, false));
        ASSERT_EQ(len, sizeof(struct sockaddr_in));
        ASSERT_OK(format_socket_address(&ss, len, buf, sizeof(buf)));
        ASSERT_STREQ(buf, "127.0.0.1:1");
        ASSERT_OK(parse_socket_address("[fe80::1:2]:65535", &ss, &len, false));
        ASSERT_EQ(len, sizeof(struct sockaddr_in6));
        ASSERT_OK(format_socket_address(&ss, len, buf, sizeof(buf)));
        ASSERT_STREQ(buf, "[fe80::1:2]:65535");
        ASSERT_OK(parse_socket_address("[::ffff:1.2.3.4]:80", &ss, &len, false));
        ASSERT_EQ(format_socket_address(&ss, len, buf, 8), -ENOBUFS);

        ASSERT_EQ(parse_socket_address("0.0.0.0:0", &ss, &len, false), -ERANGE);
        ASSERT_OK(parse_socket_address("0.0.0.0:0", &ss, &len, true));
        ASSERT_EQ(parse_socket_address("1.2.3.4:65536", &ss, &len, true), -ERANGE);
        ASSERT_EQ(parse_socket_address("1.2.3.4:000080", &ss, &len, true), -ERANGE);
        ASSERT_OK(parse_socket_address("1.2.3.4:00080", &ss, &len, true));

        static const char *const bad[] = {
                "",
                "1.2.3.4",
                "1.2.3.4:",
                ":80",
                "1.2.3:80",
                "1.2.3.4.5:80",
                "::1:80",
                "[::1]",
                "[::1]80",
                "[::1]:",
                "[1.2.3.4]:80",
                "localhost:80",
                "1.2.3.4:-1",
                "1.2.3.4:+80",
                "1.2.3.4:0x50",
                "1.2.3.4: 80",
                " 1.2.3.4:80",
                "[fe80::1%eth0]:80",
                "[::1]:80x",
                "1.2.3.4:80:90",
        };
        for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
                int r = parse_socket_address(bad[i], &ss, &len, true);
                if (r != -EINVAL)
                        fprintf(stderr, "accepted or wrong error for \"%s\": %d\n", bad[i], r);
                ASSERT_EQ(r, -EINVAL);
        }
}

/* ---- on disk ---- */

static char tmp_root[64];

static int rm_cb(const char *p, const struct stat *st, int flag, struct FTW *ftw)
{
        return remove(p);
}

static void tmp_setup(void)
{
        strcpy(tmp_root, "/tmp/test-config-XXXXXX");
        ASSERT_TRUE(mkdtemp(tmp_root) != NULL);
}

static void tmp_cleanup(void)
{
        ASSERT_OK(nftw(tmp_root, rm_cb, 16, FTW_DEPTH | FTW_PHYS));
}

static void write_file(const char *dir, const char *name, const char *text, mode_t mode)
{
        char p[512];
        int fd;

        snprintf(p, sizeof(p), "%s/%s", dir, name);
        fd = open(p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
        ASSERT_TRUE(fd >= 0);
        ASSERT_EQ(write(fd, text, strlen(text)), (ssize_t) strlen(text));
        ASSERT_OK(fchmod(fd, mode));
        close(fd);
}

static char *path_in(const char *name)
{
        char *p;
        ASSERT_TRUE(asprintf(&p, "%s/%s", tmp_root, name) > 0);
        return p;
}

TEST(load_missing_files_give_defaults)
{
        _cleanup_(config_freep) Config *c = NULL;
        _cleanup_free_ char *main_path = NULL, *vm_dir = NULL;

        tmp_setup();
        main_path = path_in("nope.conf");
        vm_dir = path_in("vm.d");
        ASSERT_OK(config_load(main_path, vm_dir, &c, NULL));
        ASSERT_TRUE(c->daemon != NULL);
        ASSERT_EQ(c->daemon->heartbeat_interval_ms, 50);
        ASSERT_EQ(c->n_vms, 0);
        ASSERT_TRUE(config_find_vm(c, "web") == NULL);
        tmp_cleanup();
}

TEST(load_directory)
{
        _cleanup_(config_freep) Config *c = NULL;
        _cleanup_free_ char *main_path = NULL, *vm_dir = NULL;
        const VmConfig *v;

        tmp_setup();
        main_path = path_in("dirtyrep.conf");
        vm_dir = path_in("vm.d");
        write_file(tmp_root, "dirtyrep.conf",
                   "[Daemon]\nListenAddress=0.0.0.0:7000\nRuntimeDirectory=/run/other\n", 0644);
        ASSERT_OK(mkdir(vm_dir, 0755));
        write_file(vm_dir, "web.conf", PRIMARY_MIN, 0644);
        write_file(vm_dir, "db.conf",
                   "[VM]\nRole=standby\nListen=10.0.0.2:7001\nSecretFile=/k\nControlSocket=/run/db.sock\n",
                   0644);
        write_file(vm_dir, "README", "not a config", 0644);
        write_file(vm_dir, "web.conf~", "[garbage", 0644);
        write_file(vm_dir, "web.conf.dpkg-old", "[garbage", 0644);

        ASSERT_OK(config_load(main_path, vm_dir, &c, NULL));
        ASSERT_STREQ(c->daemon->listen_address.text, "0.0.0.0:7000");
        ASSERT_EQ(c->n_vms, 2);
        ASSERT_STREQ(c->vms[0]->name, "db"); /* sorted */
        ASSERT_STREQ(c->vms[1]->name, "web");
        v = config_find_vm(c, "web");
        ASSERT_TRUE(v == c->vms[1]);
        ASSERT_TRUE(strstr(v->path, "/vm.d/web.conf") != NULL);
        /* Default control socket follows RuntimeDirectory=; an explicit one stays. */
        ASSERT_STREQ(v->control_socket, "/run/other/web.sock");
        ASSERT_STREQ(config_find_vm(c, "db")->control_socket, "/run/db.sock");
        ASSERT_TRUE(config_find_vm(c, "nope") == NULL);
        ASSERT_TRUE(config_find_vm(c, NULL) == NULL);
        tmp_cleanup();
}

TEST(load_reports_errors_of_all_files)
{
        _cleanup_(config_freep) Config *c = NULL;
        _cleanup_free_ char *main_path = NULL, *vm_dir = NULL, *errors = NULL, *expect = NULL;

        tmp_setup();
        main_path = path_in("dirtyrep.conf");
        vm_dir = path_in("vm.d");
        write_file(tmp_root, "dirtyrep.conf", "[Daemon]\nHeartbeatMisses=0\n", 0644);
        ASSERT_OK(mkdir(vm_dir, 0755));
        write_file(vm_dir, "a.conf", PRIMARY_MIN "EpochMs=0\n", 0644);
        write_file(vm_dir, ".hidden.conf", PRIMARY_MIN, 0644);
        write_file(vm_dir, "bad name.conf", PRIMARY_MIN, 0644);
        write_file(vm_dir, "ok.conf", PRIMARY_MIN, 0644);
        {
                char d[512];
                snprintf(d, sizeof(d), "%s/dir.conf", vm_dir);
                ASSERT_OK(mkdir(d, 0755));
                snprintf(d, sizeof(d), "%s/fifo.conf", vm_dir);
                ASSERT_OK(mkfifo(d, 0644));
        }

        ASSERT_EQ(config_load(main_path, vm_dir, &c, &errors), -EINVAL);
        ASSERT_TRUE(c == NULL);
        ASSERT_TRUE(
                asprintf(&expect,
                         "%1$s:2: HeartbeatMisses=0: must be between 1 and 100\n"
                         "%2$s/.hidden.conf: invalid VM name \".hidden\": must be 1..64 characters of A-Z "
                         "a-z "
                         "0-9 _ . - and not start with a dot\n"
                         "%2$s/a.conf:5: EpochMs=0: must be between 1 and 10000\n"
                         "%2$s/bad name.conf: invalid VM name \"bad name\": must be 1..64 characters of A-Z "
                         "a-z 0-9 _ . - and not start with a dot\n"
                         "%2$s/dir.conf: cannot read: Is a directory\n"
                         "%2$s/fifo.conf: not a regular file",
                         main_path, vm_dir) > 0);
        ASSERT_STREQ(errors, expect);
        tmp_cleanup();
}

TEST(load_file_name_cannot_forge_lines)
{
        _cleanup_(config_freep) Config *c = NULL;
        _cleanup_free_ char *vm_dir = NULL, *errors = NULL, *expect = NULL;

        tmp_setup();
        vm_dir = path_in("vm.d");
        ASSERT_OK(mkdir(vm_dir, 0755));
        write_file(vm_dir, "x\ny.conf", PRIMARY_MIN, 0644);
        ASSERT_EQ(config_load(NULL, vm_dir, &c, &errors), -EINVAL);
        ASSERT_TRUE(
                asprintf(&expect,
                         "%s/x\\x0ay.conf: invalid VM name \"x\\x0ay\": must be 1..64 characters of A-Z a-z "
                         "0-9 _ . - and not start with a dot",
                         vm_dir) > 0);
        ASSERT_STREQ(errors, expect);
        ASSERT_EQ(count_lines(errors), 1);
        tmp_cleanup();
}

TEST(load_cross_checks_skip_broken_files)
{
        _cleanup_(config_freep) Config *c = NULL;
        _cleanup_free_ char *vm_dir = NULL, *errors = NULL, *expect = NULL;

        tmp_setup();
        vm_dir = path_in("vm.d");
        ASSERT_OK(mkdir(vm_dir, 0755));
        write_file(vm_dir, "a.conf", PRIMARY_MIN "ControlSocket=/run/x.sock\nEpochMs=0\n", 0644);
        write_file(vm_dir, "b.conf", PRIMARY_MIN "ControlSocket=/run/x.sock\n", 0644);
        ASSERT_EQ(config_load(NULL, vm_dir, &c, &errors), -EINVAL);
        ASSERT_TRUE(asprintf(&expect, "%s/a.conf:6: EpochMs=0: must be between 1 and 10000", vm_dir) > 0);
        ASSERT_STREQ(errors, expect);
        errors = mfree_str(errors);
        expect = mfree_str(expect);

        /* Once a.conf is fixed, config_load() runs the cross-checks on both. */
        write_file(vm_dir, "a.conf", PRIMARY_MIN "ControlSocket=/run/x.sock\n", 0644);
        ASSERT_EQ(config_load(NULL, vm_dir, &c, &errors), -EINVAL);
        ASSERT_TRUE(asprintf(&expect,
                             "%1$s/b.conf: ControlSocket=/run/x.sock is also used by VM a (%1$s/a.conf)",
                             vm_dir) > 0);
        ASSERT_STREQ(errors, expect);
        tmp_cleanup();
}

TEST(load_too_many_vm_files)
{
        _cleanup_(config_freep) Config *c = NULL;
        _cleanup_free_ char *vm_dir = NULL, *errors = NULL, *expect = NULL;
        char name[32];

        tmp_setup();
        vm_dir = path_in("vm.d");
        ASSERT_OK(mkdir(vm_dir, 0755));
        for (unsigned i = 0; i < CONFIG_VMS_MAX; i++) {
                snprintf(name, sizeof(name), "vm%03u.conf", i);
                write_file(vm_dir, name, "[VM]\nRole=standby\nListen=127.0.0.1:0\nSecretFile=/k\n", 0644);
        }
        ASSERT_OK(config_load(NULL, vm_dir, &c, &errors));
        ASSERT_EQ(c->n_vms, CONFIG_VMS_MAX);
        c = config_free(c);

        write_file(vm_dir, "vm256.conf", "[VM]\n", 0644);
        ASSERT_EQ(config_load(NULL, vm_dir, &c, &errors), -EINVAL);
        ASSERT_TRUE(asprintf(&expect, "%s: 257 VM files (*.conf), at most 256 are supported", vm_dir) > 0);
        ASSERT_STREQ(errors, expect);
        tmp_cleanup();
}

TEST(load_file_too_large)
{
        _cleanup_(config_freep) Config *c = NULL;
        _cleanup_free_ char *main_path = NULL, *errors = NULL, *expect = NULL;
        int fd;

        tmp_setup();
        main_path = path_in("dirtyrep.conf");
        fd = open(main_path, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
        ASSERT_TRUE(fd >= 0);
        ASSERT_OK(ftruncate(fd, CONFIG_FILE_MAX + 1));
        close(fd);
        ASSERT_EQ(config_load(main_path, NULL, &c, &errors), -EINVAL);
        ASSERT_TRUE(asprintf(&expect, "%s: file is larger than 1048576 bytes", main_path) > 0);
        ASSERT_STREQ(errors, expect);
        tmp_cleanup();
}

static VmConfig *vm_named(const char *name, const char *text)
{
        VmConfig *v = NULL;
        char path[128];

        snprintf(path, sizeof(path), "/vm.d/%s.conf", name);
        ASSERT_OK(config_parse_vm_file(path, name, text, strlen(text), &v, NULL));
        return v;
}

TEST(validate_cross_checks)
{
        _cleanup_(daemon_config_freep) DaemonConfig *d = NULL;
        VmConfig *vms[4];
        Config c = {};
        _cleanup_free_ char *errors = NULL;

        ASSERT_OK(config_parse_daemon_text("/d.conf", "[Daemon]\nListenAddress=[::]:7000\n",
                                           strlen("[Daemon]\nListenAddress=[::]:7000\n"), &d, NULL));
        vms[0] = vm_named("a", "[VM]\nRole=standby\nListen=10.0.0.1:7001\nSecretFile=/k\n");
        vms[1] = vm_named(
                "b", "[VM]\nRole=standby\nListen=0.0.0.0:7001\nSecretFile=/k\nControlSocket=/run/a.sock\n");
        vms[2] = vm_named(
                "c", "[VM]\nRole=standby\nListen=10.0.0.3:7000\nSecretFile=/k\nControlSocket=/run/a.sock\n");
        vms[3] = vm_named("d", "[VM]\nRole=standby\nListen=10.0.0.1:0\nSecretFile=/k\n");
        c.daemon = d;
        c.vms = vms;

        c.n_vms = 1;
        ASSERT_OK(config_validate(&c, &errors));
        c.n_vms = 4;
        ASSERT_EQ(config_validate(&c, &errors), -EINVAL);
        ASSERT_STREQ(errors,
                     "/vm.d/b.conf: Listen=0.0.0.0:7001 collides with Listen=10.0.0.1:7001 of VM a "
                     "(/vm.d/a.conf)\n"
                     "/vm.d/c.conf: Listen=10.0.0.3:7000 collides with ListenAddress=[::]:7000 of /d.conf\n"
                     "/vm.d/c.conf: ControlSocket=/run/a.sock is also used by VM b (/vm.d/b.conf)");
        for (size_t i = 0; i < 4; i++)
                vm_config_free(vms[i]);
}

TEST(validate_service_address)
{
        VmConfig *vms[2];
        Config c = {.vms = vms, .n_vms = 2};
        _cleanup_free_ char *errors = NULL;

        vms[0] = vm_named("a", PRIMARY_MIN "ServiceAddress=10.0.0.10/24\nServiceInterface=eth0\n");
        vms[1] = vm_named("b", PRIMARY_MIN "ServiceAddress=10.0.0.10/16\nServiceInterface=eth1\n");
        ASSERT_EQ(config_validate(&c, &errors), -EINVAL);
        ASSERT_STREQ(errors, "/vm.d/b.conf: ServiceAddress= is also used by VM a (/vm.d/a.conf)");
        vm_config_free(vms[0]);
        vm_config_free(vms[1]);
}

/* ---- secrets ---- */

static int load_secret(const char *name, uint8_t **s, size_t *n, char **err)
{
        _cleanup_free_ char *p = path_in(name);
        return config_load_secret(p, s, n, err);
}

TEST(secret_file_checks)
{
        static const char secret[] = "0123456789abcdef-secret\n";
        uint8_t *s = NULL;
        size_t n = 0;
        char *err = NULL, big[CONFIG_SECRET_MAX + 2];

        tmp_setup();
        write_file(tmp_root, "ok.key", secret, 0600);
        ASSERT_OK(load_secret("ok.key", &s, &n, &err));
        ASSERT_TRUE(err == NULL);
        ASSERT_EQ(n, strlen(secret));
        ASSERT_TRUE(memcmp(s, secret, n) == 0);
        config_secret_free(s, n);
        s = NULL;

        write_file(tmp_root, "ro.key", secret, 0400);
        ASSERT_OK(load_secret("ro.key", &s, &n, NULL));
        config_secret_free(s, n);
        s = NULL;

        write_file(tmp_root, "open.key", secret, 0644);
        ASSERT_EQ(load_secret("open.key", &s, &n, &err), -EPERM);
        ASSERT_TRUE(s == NULL);
        ASSERT_CONTAINS(err,
                        "/open.key: secret file has mode 0644, must not be accessible by group or others "
                        "(chmod 0600)");
        err = mfree_str(err);
        write_file(tmp_root, "group.key", secret, 0640);
        ASSERT_EQ(load_secret("group.key", &s, &n, &err), -EPERM);
        err = mfree_str(err);
        write_file(tmp_root, "gw.key", secret, 0620);
        ASSERT_EQ(load_secret("gw.key", &s, &n, &err), -EPERM);
        err = mfree_str(err);

        write_file(tmp_root, "short.key", "0123456789abcde", 0600);
        ASSERT_EQ(load_secret("short.key", &s, &n, &err), -EMSGSIZE);
        ASSERT_CONTAINS(err, "/short.key: secret is too short (15 bytes, at least 16 needed)");
        err = mfree_str(err);
        write_file(tmp_root, "min.key", "0123456789abcdef", 0600);
        ASSERT_OK(load_secret("min.key", &s, &n, NULL));
        ASSERT_EQ(n, 16);
        config_secret_free(s, n);
        s = NULL;

        memset(big, 'k', sizeof(big) - 1);
        big[CONFIG_SECRET_MAX + 1] = 0;
        write_file(tmp_root, "long.key", big, 0600);
        ASSERT_EQ(load_secret("long.key", &s, &n, &err), -EMSGSIZE);
        ASSERT_CONTAINS(err, "/long.key: secret is too long (more than 4096 bytes)");
        err = mfree_str(err);
        big[CONFIG_SECRET_MAX] = 0;
        write_file(tmp_root, "max.key", big, 0600);
        ASSERT_OK(load_secret("max.key", &s, &n, NULL));
        ASSERT_EQ(n, CONFIG_SECRET_MAX);
        config_secret_free(s, n);
        s = NULL;

        ASSERT_EQ(load_secret("", &s, &n, &err), -EISDIR); /* the directory itself */
        ASSERT_CONTAINS(err, ": secret file is a directory");
        err = mfree_str(err);
        {
                _cleanup_free_ char *fifo = path_in("fifo.key");
                ASSERT_OK(mkfifo(fifo, 0600));
        }
        ASSERT_EQ(load_secret("fifo.key", &s, &n, &err), -EBADFD); /* and open() did not hang */
        ASSERT_CONTAINS(err, "/fifo.key: secret file is not a regular file");
        err = mfree_str(err);
        ASSERT_EQ(load_secret("missing.key", &s, &n, &err), -ENOENT);
        ASSERT_CONTAINS(err, "/missing.key: cannot open secret file: No such file or directory");
        err = mfree_str(err);

        /* Owned by someone else: only root can set that up. */
        if (geteuid() == 0) {
                _cleanup_free_ char *p = path_in("nobody.key");
                write_file(tmp_root, "nobody.key", secret, 0600);
                ASSERT_OK(chown(p, 65534, 65534));
                ASSERT_EQ(load_secret("nobody.key", &s, &n, &err), -EPERM);
                ASSERT_CONTAINS(
                        err,
                        "/nobody.key: secret file is owned by uid 65534, must be owned by root or uid 0");
                err = mfree_str(err);
        } else
                printf("(skipping the ownership check: not root)\n");
        ASSERT_TRUE(s == NULL);
        tmp_cleanup();
}

TEST(systemd_booleans)
{
        static const char *const yes[] = {"yes", "true", "on", "1", "YES", "True", "y", "t"};
        static const char *const no[] = {"no", "false", "off", "0", "No", "OFF", "n", "f"};
        static const char *const bad[] = {"maybe", "2", "", "yess", "on off", "-1"};

        for (size_t i = 0; i < ELEMENTSOF(yes); i++)
                ASSERT_EQ(config_parse_boolean(yes[i]), 1);
        for (size_t i = 0; i < ELEMENTSOF(no); i++)
                ASSERT_EQ(config_parse_boolean(no[i]), 0);
        for (size_t i = 0; i < ELEMENTSOF(bad); i++)
                ASSERT_EQ(config_parse_boolean(bad[i]), -EINVAL);
        {
                _cleanup_(vm_config_freep) VmConfig *v =
                        vm_ok(PRIMARY_MIN "PreCopy=off\nOutputCommit=false\nConsoleCommit=on\n");
                ASSERT_TRUE(!v->pre_copy);
                ASSERT_TRUE(!v->output_commit);
                ASSERT_TRUE(v->console_commit);
        }
}

TEST(systemd_time_spans)
{
        static const struct {
                const char *s;
                uint64_t ms;
        } ok[] = {
                {"20", 20},         {"20ms", 20},    {"2s", 2000},  {"1.5s", 1500}, {"1min 30s", 90000},
                {"1min30s", 90000}, {"500 ms", 500}, {"2000us", 2}, {"0.25s", 250}, {"1h", 3600000},
                {"3sec", 3000},     {"20msec", 20},  {" 7 ", 7},
        };
        static const char *const bad[] = {"", "ms", "20 parsecs", "-1s", "0x10", "2s-", "1..5s"};
        uint64_t v;

        for (size_t i = 0; i < ELEMENTSOF(ok); i++) {
                v = 0;
                ASSERT_OK(config_parse_msec(ok[i].s, &v));
                ASSERT_EQ(v, ok[i].ms);
        }
        for (size_t i = 0; i < ELEMENTSOF(bad); i++)
                ASSERT_TRUE(config_parse_msec(bad[i], &v) < 0);
        ASSERT_EQ(config_parse_msec("1500us", &v), -EDOM);
        ASSERT_EQ(config_parse_msec("99999999999999999999h", &v), -ERANGE);
        {
                _cleanup_(vm_config_freep) VmConfig *c =
                        vm_ok(PRIMARY_MIN "EpochMs=20ms\nSplitBrainTimeoutMs=2s\n");
                ASSERT_EQ(c->epoch_ms, 20);
                ASSERT_EQ(c->split_brain_timeout_ms, 2000);
        }
        assert_vm_error(PRIMARY_MIN "EpochMs=11s\n", VM_PATH ":5: EpochMs=11s: must be between 1 and 10000");
        assert_vm_error(PRIMARY_MIN "EpochMs=1500us\n",
                        VM_PATH ":5: EpochMs=1500us: must be a whole number of milliseconds");
}

TEST(did_you_mean_edit_distance)
{
        /* Not only case: a letter missing, one too many, two swapped. */
        assert_vm_error(PRIMARY_MIN "EpocMs=5\n",
                        VM_PATH ":5: unknown key EpocMs= in section [VM], did you mean EpochMs=?");
        assert_vm_error(PRIMARY_MIN "Trackking=ring\n",
                        VM_PATH ":5: unknown key Trackking= in section [VM], did you mean Tracking=?");
        assert_vm_error(PRIMARY_MIN "FailoverPolciy=auto\n", VM_PATH
                        ":5: unknown key FailoverPolciy= in section [VM], did you mean FailoverPolicy=?");
        assert_vm_error(PRIMARY_MIN "secretfile=/x\n",
                        VM_PATH ":5: unknown key secretfile= in section [VM], did you mean SecretFile=?");
        /* Nothing close: no guess. */
        assert_vm_error(PRIMARY_MIN "Bandwidth=5\n", VM_PATH ":5: unknown key Bandwidth= in section [VM]");
}

#define STANDBY_MIN "[VM]\nRole=standby\nListen=0.0.0.0:7000\nSecretFile=/etc/dirtyrep/web.key\n"

TEST(failover_needs)
{
        _cleanup_free_ char *errors = NULL;

        /* The man page's old example: an automatic standby with nowhere to replicate to after failover. */
        assert_vm_error(STANDBY_MIN "FailoverPolicy=auto\n", VM_PATH
                        ":5: FailoverPolicy=auto requires Peer=ADDRESS:PORT: after a failover this host is "
                        "the primary and replicates to the old primary's host (set Peer= to its Listen=)");
        vm_config_free(vm_ok(STANDBY_MIN "FailoverPolicy=auto\nPeer=192.0.2.1:7000\n"));
        vm_config_free(vm_ok(STANDBY_MIN "FailoverPolicy=manual\n"));

        /* VmmArgs= as getopt_long() reads them: abbreviations, '=', short clusters. */
        assert_vm_error(STANDBY_MIN "VmmArgs=--mem 2G\n", VM_PATH
                        ":5: VmmArgs=: --mem is read by the VMM as --memory, which must not be set here: "
                        "the RAM size is the replica's");
        assert_vm_error(STANDBY_MIN "VmmArgs=--memory=2G\n", VM_PATH
                        ":5: VmmArgs=: --memory=2G (--memory) must not be set here: the RAM size is the "
                        "replica's");
        assert_vm_error(STANDBY_MIN "VmmArgs=-m2G\n", VM_PATH
                        ":5: VmmArgs=: -m2G (--memory) must not be set here: the RAM size is the replica's");
        assert_vm_error(STANDBY_MIN "VmmArgs=--contr /run/x.sock\n", VM_PATH
                        ":5: VmmArgs=: --contr is read by the VMM as --control, which must not be set here: "
                        "activation passes --control with ControlSocket=");
        errors = vm_errors(STANDBY_MIN "VmmArgs=--cpus 2 --kernel /k --ram-fd 7\n");
        ASSERT_CONTAINS(errors, "--cpus (--cpus) must not be set here: the vCPU count is the replica's");
        ASSERT_CONTAINS(errors, "--kernel (--kernel) must not be set here");
        ASSERT_CONTAINS(errors, "--ram-fd (--ram-fd) must not be set here");
        /* An option's value is not an option; ambiguous prefixes are the VMM's own --check's business. */
        vm_config_free(vm_ok(STANDBY_MIN "VmmArgs=--console --memory --co x --tracking ring\n"));
        vm_config_free(vm_ok(STANDBY_MIN "VmmArgs=--console-commit --service-listen 0.0.0.0:6379\n"));
}

DEFINE_TEST_MAIN

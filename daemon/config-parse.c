/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The dirtyrepd configuration's INI layer: the value parsers (one per kind
 * of value), the key tables ([Daemon] and [VM]: one KeyDef per key, which
 * says how to parse it and where the result goes) with the names of the
 * enum values, and the line parser that applies them to a file. What the
 * keys of a file mean together, the objects and loading are daemon/config.c;
 * both share daemon/config-internal.h.
 */
#include <arpa/inet.h>
#include <assert.h>
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <syslog.h>

#include "config-internal.h"
#include "config.h"
#include "macros.h"
#include "util.h"

#define IFNAME_MAX 15U /* IFNAMSIZ - 1 */

/* Enum fields are parsed through an int pointer. */
static_assert(sizeof(VmRole) == sizeof(int), "enum size");
static_assert(sizeof(ConfigTracking) == sizeof(int), "enum size");
static_assert(sizeof(ConfigCompression) == sizeof(int), "enum size");
static_assert(sizeof(FailoverPolicy) == sizeof(int), "enum size");
static_assert(sizeof(VmmType) == sizeof(int), "enum size");
static_assert(sizeof(SplitBrainPolicy) == sizeof(int), "enum size");

/* ---------------------------------------------------------------------- */
/* Value parsers */

/* Strict decimal: digits only, no sign, no base prefixes (strtoul would read "010" as octal). */
static int parse_decimal(const char *s, uint64_t *ret)
{
        uint64_t v = 0;

        if (!*s)
                return -EINVAL;
        for (; *s; s++) {
                if (*s < '0' || *s > '9')
                        return -EINVAL;
                if (v > (UINT64_MAX - 9) / 10)
                        return -ERANGE;
                v = v * 10 + (uint64_t) (*s - '0');
        }
        *ret = v;
        return 0;
}

int parse_socket_address(const char *s, struct sockaddr_storage *ret, socklen_t *ret_len, bool allow_port0)
{
        char host[INET6_ADDRSTRLEN];
        const char *port_str, *h;
        size_t hl;
        uint64_t port;
        bool v6;
        int r;

        if (!s || strnlen(s, CONFIG_ADDRESS_STRING_MAX) >= CONFIG_ADDRESS_STRING_MAX)
                return -EINVAL;

        if (s[0] == '[') {
                const char *end = strchr(s, ']');
                if (!end || end[1] != ':')
                        return -EINVAL;
                h = s + 1;
                hl = (size_t) (end - h);
                port_str = end + 2;
                v6 = true;
        } else {
                const char *colon = strchr(s, ':');
                /* A bare IPv6 address is ambiguous ("::1:80"): brackets are required. */
                if (!colon || strchr(colon + 1, ':'))
                        return -EINVAL;
                h = s;
                hl = (size_t) (colon - s);
                port_str = colon + 1;
                v6 = false;
        }
        if (hl == 0 || hl >= sizeof(host))
                return -EINVAL;
        memcpy(host, h, hl);
        host[hl] = 0;

        /* At most 5 digits, so "00000000080" and friends are not ports. */
        if (strlen(port_str) > 5)
                return parse_decimal(port_str, &port) < 0 ? -EINVAL : -ERANGE;
        r = parse_decimal(port_str, &port);
        if (r < 0)
                return -EINVAL;
        if (port > 65535 || (port == 0 && !allow_port0))
                return -ERANGE;

        struct sockaddr_storage ss = {};
        if (v6) {
                struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *) &ss;
                sin6->sin6_family = AF_INET6;
                sin6->sin6_port = htons((uint16_t) port);
                if (inet_pton(AF_INET6, host, &sin6->sin6_addr) != 1)
                        return -EINVAL;
                *ret_len = sizeof(struct sockaddr_in6);
        } else {
                struct sockaddr_in *sin = (struct sockaddr_in *) &ss;
                sin->sin_family = AF_INET;
                sin->sin_port = htons((uint16_t) port);
                /* inet_pton(AF_INET) takes only the dotted quad: no "1", "0x7f.1", octal. */
                if (inet_pton(AF_INET, host, &sin->sin_addr) != 1)
                        return -EINVAL;
                *ret_len = sizeof(struct sockaddr_in);
        }
        *ret = ss;
        return 0;
}

int format_socket_address(const struct sockaddr_storage *sa, socklen_t len, char *buf, size_t size)
{
        char a[INET6_ADDRSTRLEN];
        int n;

        if (sa->ss_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
                const struct sockaddr_in *sin = (const struct sockaddr_in *) sa;
                if (!inet_ntop(AF_INET, &sin->sin_addr, a, sizeof(a)))
                        return -EAFNOSUPPORT;
                n = snprintf(buf, size, "%s:%u", a, ntohs(sin->sin_port));
        } else if (sa->ss_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
                const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *) sa;
                if (!inet_ntop(AF_INET6, &sin6->sin6_addr, a, sizeof(a)))
                        return -EAFNOSUPPORT;
                n = snprintf(buf, size, "[%s]:%u", a, ntohs(sin6->sin6_port));
        } else
                return -EAFNOSUPPORT;
        if (n < 0 || (size_t) n >= size)
                return -ENOBUFS;
        return 0;
}

bool config_vm_name_is_valid(const char *name)
{
        size_t n;

        if (!name || name[0] == 0 || name[0] == '.')
                return false;
        for (n = 0; name[n]; n++) {
                char c = name[n];
                if (n >= CONFIG_VM_NAME_MAX)
                        return false;
                if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                      c == '_' || c == '.' || c == '-'))
                        return false;
        }
        return true;
}

static int parse_uint32_range(const KeyDef *k, const char *value, void *field, char *problem, size_t psize)
{
        uint64_t v;

        int r;

        r = parse_decimal(value, &v);
        if (r == -EINVAL) {
                snprintf(problem, psize, "not a decimal number, must be between %" PRIu64 " and %" PRIu64,
                         k->min, k->max);
                return -EINVAL;
        }
        /* -ERANGE from parse_decimal: beyond uint64_t, certainly beyond max. */
        if (r < 0 || v < k->min || v > k->max) {
                snprintf(problem, psize, "must be between %" PRIu64 " and %" PRIu64, k->min, k->max);
                return -ERANGE;
        }
        *(uint32_t *) field = (uint32_t) v;
        return 0;
}

static int parse_choice(const KeyDef *k, const char *value, void *field, char *problem, size_t psize)
{
        size_t o = 0;

        for (int i = 0; k->choices[i]; i++)
                if (streq(value, k->choices[i])) {
                        *(int *) field = i;
                        return 0;
                }
        o += (size_t) snprintf(problem, psize, "must be one of:");
        for (int i = 0; k->choices[i] && o < psize; i++)
                o += (size_t) snprintf(problem + o, psize - o, "%s %s", i ? "," : "", k->choices[i]);
        return -EINVAL;
}

/* systemd's booleans (parse_boolean()): yes/no, true/false, on/off, 1/0, y/n, t/f, any case. */
int config_parse_boolean(const char *v)
{
        static const char *const yes[] = {"1", "yes", "y", "true", "t", "on"};
        static const char *const no[] = {"0", "no", "n", "false", "f", "off"};

        for (size_t i = 0; i < ELEMENTSOF(yes); i++)
                if (strcasecmp(v, yes[i]) == 0)
                        return 1;
        for (size_t i = 0; i < ELEMENTSOF(no); i++)
                if (strcasecmp(v, no[i]) == 0)
                        return 0;
        return -EINVAL;
}

static int parse_yes_no(const KeyDef *k, const char *value, void *field, char *problem, size_t psize)
{
        int b = config_parse_boolean(value);

        if (b < 0) {
                snprintf(problem, psize, "must be yes or no");
                return -EINVAL;
        }
        *(bool *) field = b;
        return 0;
}

/*
 * systemd-style time spans (parse_sec()): "20ms", "2s", "1.5s", "1min 30s",
 * a sum of NUMBER[UNIT] terms, with or without blanks between them. A bare
 * number is milliseconds, the unit these keys always had ("EpochMs=20").
 */
int config_parse_msec(const char *s, uint64_t *ret)
{
        static const struct {
                const char *suffix;
                uint64_t usec;
        } units[] = {
                /* Longest first where one is a prefix of another ("msec" before "ms" before "m"). */
                {"usec", 1},
                {"us", 1},
                {"msec", 1000},
                {"ms", 1000},
                {"seconds", 1000000},
                {"second", 1000000},
                {"sec", 1000000},
                {"s", 1000000},
                {"minutes", 60000000},
                {"minute", 60000000},
                {"min", 60000000},
                {"m", 60000000},
                {"hours", 3600000000ULL},
                {"hour", 3600000000ULL},
                {"hr", 3600000000ULL},
                {"h", 3600000000ULL},
        };
        uint64_t total = 0; /* microseconds */
        bool any = false;

        for (const char *p = s;;) {
                uint64_t whole = 0, frac = 0, frac_div = 1, unit = 1000;
                bool digits = false;
                size_t ul;

                while (*p == ' ' || *p == '\t')
                        p++;
                if (!*p)
                        break;
                for (; *p >= '0' && *p <= '9'; p++, digits = true) {
                        if (whole > (UINT64_MAX / 10) - 10)
                                return -ERANGE;
                        whole = whole * 10 + (uint64_t) (*p - '0');
                }
                if (*p == '.') {
                        p++;
                        for (; *p >= '0' && *p <= '9'; p++, digits = true)
                                if (frac_div < 1000000000ULL) {
                                        frac = frac * 10 + (uint64_t) (*p - '0');
                                        frac_div *= 10;
                                }
                }
                if (!digits)
                        return -EINVAL;
                while (*p == ' ' || *p == '\t')
                        p++;
                ul = 0;
                for (size_t i = 0; i < ELEMENTSOF(units); i++) {
                        size_t l = strlen(units[i].suffix);
                        if (strncmp(p, units[i].suffix, l) == 0 && !((p[l] >= 'a' && p[l] <= 'z'))) {
                                unit = units[i].usec;
                                ul = l;
                                break;
                        }
                }
                if (ul == 0 && *p && !(*p >= '0' && *p <= '9'))
                        return -EINVAL; /* an unknown unit */
                p += ul;
                if (whole > UINT64_MAX / unit || total > UINT64_MAX - whole * unit)
                        return -ERANGE;
                total += whole * unit + frac * unit / frac_div;
                any = true;
        }
        if (!any)
                return -EINVAL;
        if (total % 1000 != 0)
                return -EDOM; /* finer than a millisecond */
        *ret = total / 1000;
        return 0;
}

static int parse_msec_range(const KeyDef *k, const char *value, void *field, char *problem, size_t psize)
{
        uint64_t v;
        int r;

        r = config_parse_msec(value, &v);
        if (r == -EINVAL) {
                snprintf(problem, psize,
                         "not a time span (20ms, 2s; a bare number is milliseconds), must be "
                         "between %" PRIu64 " and %" PRIu64,
                         k->min, k->max);
                return -EINVAL;
        }
        if (r == -EDOM) {
                snprintf(problem, psize, "must be a whole number of milliseconds");
                return -EINVAL;
        }
        if (r < 0 || v < k->min || v > k->max) {
                snprintf(problem, psize, "must be between %" PRIu64 " and %" PRIu64, k->min, k->max);
                return -ERANGE;
        }
        *(uint32_t *) field = (uint32_t) v;
        return 0;
}

static int parse_log_level(const KeyDef *k, const char *value, void *field, char *problem, size_t psize)
{
        static const struct {
                const char *name;
                int level;
        } levels[] = {
                /* "error" too, as DIRTYREP_LOG_LEVEL= accepts it (common/log.c). */
                {"debug", LOG_DEBUG},     {"info", LOG_INFO}, {"notice", LOG_NOTICE},
                {"warning", LOG_WARNING}, {"err", LOG_ERR},   {"error", LOG_ERR},
        };

        for (size_t i = 0; i < ELEMENTSOF(levels); i++)
                if (streq(value, levels[i].name)) {
                        *(int *) field = levels[i].level;
                        return 0;
                }
        snprintf(problem, psize, "must be one of: debug, info, notice, warning, err");
        return -EINVAL;
}

/* Absolute, no "." or ".." components, at most k->max bytes. */
static int check_path(const KeyDef *k, const char *value, char *problem, size_t psize)
{
        if (value[0] != '/') {
                snprintf(problem, psize, "must be an absolute path");
                return -EINVAL;
        }
        if (strlen(value) > k->max) {
                snprintf(problem, psize, "path is too long (at most %" PRIu64 " bytes)", k->max);
                return -ENAMETOOLONG;
        }
        for (const char *p = value; *p;) {
                size_t n;
                while (*p == '/')
                        p++;
                n = strcspn(p, "/");
                if ((n == 1 && p[0] == '.') || (n == 2 && p[0] == '.' && p[1] == '.')) {
                        snprintf(problem, psize, "path must not contain \".\" or \"..\" components");
                        return -EINVAL;
                }
                p += n;
        }
        return 0;
}

int set_string(char **field, const char *value)
{
        char *s = NULL;

        if (value) {
                s = strdup(value);
                if (!s)
                        return -ENOMEM;
        }
        free(*field);
        *field = s;
        return 0;
}

static int parse_path(const KeyDef *k, const char *value, void *field, char *problem, size_t psize)
{
        int r;

        if (!*value && (k->flags & KEY_EMPTY_UNSETS))
                return set_string(field, NULL);
        r = check_path(k, value, problem, psize);
        if (r < 0)
                return r;
        return set_string(field, value);
}

static int parse_address(const KeyDef *k, const char *value, void *field, char *problem, size_t psize)
{
        ConfigAddress *a = field, n = {};
        int r;

        if (!*value && (k->flags & KEY_EMPTY_UNSETS)) {
                *a = (ConfigAddress){};
                return 0;
        }
        r = parse_socket_address(value, &n.sa, &n.len, k->min == 0);
        if (r == -ERANGE) {
                snprintf(problem, psize, "port must be between %" PRIu64 " and 65535%s", k->min,
                         k->min == 0 ? " (0: any free port)" : "");
                return r;
        }
        if (r < 0) {
                snprintf(problem, psize, "expected IPV4:PORT or [IPV6]:PORT with a numeric address");
                return r;
        }
        if (k->flags & KEY_NO_WILDCARD) {
                bool wild = n.sa.ss_family == AF_INET
                                    ? ((struct sockaddr_in *) &n.sa)->sin_addr.s_addr == htonl(INADDR_ANY)
                                    : IN6_IS_ADDR_UNSPECIFIED(&((struct sockaddr_in6 *) &n.sa)->sin6_addr);
                if (wild) {
                        snprintf(problem, psize, "a wildcard address cannot be connected to");
                        return -EINVAL;
                }
        }
        r = format_socket_address(&n.sa, n.len, n.text, sizeof(n.text));
        if (r < 0) {
                snprintf(problem, psize, "cannot format address");
                return r;
        }
        *a = n;
        return 0;
}

/* Optional free text (a command line); the first word must be an absolute path. */
static int parse_command(const KeyDef *k, const char *value, void *field, char *problem, size_t psize)
{
        if (!*value)
                return set_string(field, NULL);
        if (value[0] != '/') {
                snprintf(problem, psize, "must start with the absolute path of a program");
                return -EINVAL;
        }
        return set_string(field, value);
}

void strv_free(char **l)
{
        if (!l)
                return;
        for (char **p = l; *p; p++)
                free(*p);
        free(l);
}

/*
 * Splits VmmArgs=: words separated by blanks; '...' and "..." quote blanks
 * (no escapes, as in neither form anything else is special). Bounded by the
 * line length and CONFIG_VMM_ARGS_MAX.
 */
static int split_args(const char *value, char ***ret, size_t *ret_n, char *problem, size_t psize)
{
        char **l;
        size_t n = 0;
        const char *p = value;

        l = calloc(CONFIG_VMM_ARGS_MAX + 1, sizeof(char *));
        if (!l)
                return -ENOMEM;
        for (;;) {
                char *w, *o;

                p += strspn(p, " \t");
                if (!*p)
                        break;
                if (n >= CONFIG_VMM_ARGS_MAX) {
                        snprintf(problem, psize, "more than %u arguments", CONFIG_VMM_ARGS_MAX);
                        strv_free(l);
                        return -E2BIG;
                }
                w = o = malloc(strlen(p) + 1);
                if (!w) {
                        strv_free(l);
                        return -ENOMEM;
                }
                l[n++] = w;
                while (*p && *p != ' ' && *p != '\t') {
                        if (*p == '\'' || *p == '"') {
                                char q = *p++;
                                const char *end = strchr(p, q);
                                if (!end) {
                                        snprintf(problem, psize, "unterminated %c quote", q);
                                        strv_free(l);
                                        return -EINVAL;
                                }
                                memcpy(o, p, (size_t) (end - p));
                                o += end - p;
                                p = end + 1;
                        } else
                                *o++ = *p++;
                }
                *o = 0;
        }
        *ret = l;
        *ret_n = n;
        return 0;
}

static int parse_vmm_args(const KeyDef *k, const char *value, void *field, char *problem, size_t psize)
{
        VmConfig *v = (VmConfig *) ((char *) field - offsetof(VmConfig, vmm_args_string));
        char **l = NULL;
        size_t n = 0;
        int r;

        r = split_args(value, &l, &n, problem, psize);
        if (r < 0)
                return r;
        r = set_string(&v->vmm_args_string, *value ? value : NULL);
        if (r < 0) {
                strv_free(l);
                return r;
        }
        strv_free(v->vmm_args);
        v->vmm_args = l;
        v->n_vmm_args = n;
        return 0;
}

static int parse_cidr(const KeyDef *k, const char *value, void *field, char *problem, size_t psize)
{
        ConfigCidr *c = field, n = {};
        char host[INET6_ADDRSTRLEN];
        const char *slash;
        uint64_t prefix;
        unsigned max;

        if (!*value) {
                *c = (ConfigCidr){.family = AF_UNSPEC};
                return 0;
        }
        slash = strchr(value, '/');
        if (!slash || (size_t) (slash - value) >= sizeof(host) || slash == value) {
                snprintf(problem, psize, "expected ADDRESS/PREFIXLEN, e.g. 10.0.0.10/24");
                return -EINVAL;
        }
        memcpy(host, value, (size_t) (slash - value));
        host[slash - value] = 0;
        n.family = strchr(host, ':') ? AF_INET6 : AF_INET;
        if (inet_pton(n.family, host, &n.addr) != 1) {
                snprintf(problem, psize,
                         "expected ADDRESS/PREFIXLEN with a numeric address, e.g. 10.0.0.10/24");
                return -EINVAL;
        }
        max = n.family == AF_INET ? 32 : 128;
        if (strlen(slash + 1) > 3 || parse_decimal(slash + 1, &prefix) < 0 || prefix < 1 || prefix > max) {
                snprintf(problem, psize, "prefix length must be between 1 and %u", max);
                return -EINVAL;
        }
        n.prefixlen = (unsigned) prefix;
        *c = n;
        return 0;
}

/* Network interface names as the kernel's dev_valid_name() accepts them. */
static int parse_ifname(const KeyDef *k, const char *value, void *field, char *problem, size_t psize)
{
        if (!*value)
                return set_string(field, NULL);
        if (strlen(value) > IFNAME_MAX || streq(value, ".") || streq(value, "..") ||
            value[strcspn(value, "/: \t")] != 0) {
                snprintf(problem, psize, "not a valid interface name (1..%u bytes, no '/', ':' or blanks)",
                         IFNAME_MAX);
                return -EINVAL;
        }
        return set_string(field, value);
}

/* A DNS name as certificates carry it: labels of [A-Za-z0-9-] (a leading "*." is the
 * certificate's business, not ours), dot-separated, 1..CONFIG_HOSTNAME_MAX bytes. */
static int parse_hostname(const KeyDef *k, const char *value, void *field, char *problem, size_t psize)
{
        size_t label = 0;

        if (!*value)
                return set_string(field, NULL);
        if (strlen(value) > CONFIG_HOSTNAME_MAX)
                goto bad;
        for (const char *c = value; *c; c++) {
                if (*c == '.') {
                        if (label == 0)
                                goto bad;
                        label = 0;
                } else if ((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') ||
                           (*c >= '0' && *c <= '9') || *c == '-') {
                        if (++label > 63)
                                goto bad;
                } else
                        goto bad;
        }
        if (label == 0)
                goto bad;
        return set_string(field, value);
bad:
        snprintf(problem, psize,
                 "not a DNS name (labels of A-Z a-z 0-9 -, at most 63 bytes each, %u in all)",
                 CONFIG_HOSTNAME_MAX);
        return -EINVAL;
}

/* ---------------------------------------------------------------------- */
/* Key tables */

static const char *const role_names[] = {[VM_ROLE_PRIMARY] = "primary", [VM_ROLE_STANDBY] = "standby", NULL};
static const char *const tracking_names[] = {[CONFIG_TRACKING_AUTO] = "auto",
                                             [CONFIG_TRACKING_RING] = "ring",
                                             [CONFIG_TRACKING_BITMAP] = "bitmap",
                                             NULL};
static const char *const compression_names[] = {
        [CONFIG_COMPRESSION_LZ4] = "lz4", [CONFIG_COMPRESSION_NONE] = "none", NULL};
static const char *const failover_names[] = {[FAILOVER_POLICY_MANUAL] = "manual",
                                             [FAILOVER_POLICY_AUTO] = "auto",
                                             [FAILOVER_POLICY_CLUSTER] = "cluster",
                                             NULL};
static const char *const vmm_type_names[] = {
        [VMM_TYPE_DIRTYREP_VMM] = "dirtyrep-vmm", [VMM_TYPE_QEMU] = "qemu", NULL};
static const char *const split_brain_names[] = {
        [SPLIT_BRAIN_POLICY_SUSPEND] = "suspend", [SPLIT_BRAIN_POLICY_CONTINUE] = "continue", NULL};

#define D(f) offsetof(DaemonConfig, f)
static const KeyDef daemon_keys[_DK_MAX] = {
        [DK_LISTEN_ADDRESS] = {"ListenAddress", parse_address, D(listen_address), .min = 0,
                               .flags = KEY_EMPTY_UNSETS},
        /* KEY_LIVE: the daemon applies it at a reload without touching a VM. */
        [DK_LOG_LEVEL] = {"LogLevel", parse_log_level, D(log_level), .flags = KEY_LIVE},
        [DK_STATE_DIRECTORY] = {"StateDirectory", parse_path, D(state_directory), .max = PATH_MAX - 1},
        [DK_RUNTIME_DIRECTORY] = {"RuntimeDirectory", parse_path, D(runtime_directory), .max = PATH_MAX - 1},
        [DK_HEARTBEAT_INTERVAL] = {"HeartbeatIntervalMs", parse_msec_range, D(heartbeat_interval_ms), 5,
                                   10000},
        [DK_HEARTBEAT_MISSES] = {"HeartbeatMisses", parse_uint32_range, D(heartbeat_misses), 1, 100},
        [DK_IMAGE_DIRECTORY] = {"ImageDirectory", parse_path, D(image_directory), .max = PATH_MAX - 1},
};
#undef D

#define V(f) offsetof(VmConfig, f)
static const KeyDef vm_keys[_VK_MAX] = {
        [VK_ROLE] = {"Role", parse_choice, V(role), .choices = role_names},
        [VK_CONTROL_SOCKET] = {"ControlSocket", parse_path, V(control_socket), .max = SUN_PATH_MAX},
        [VK_PEER] = {"Peer", parse_address, V(peer), .min = 1, .flags = KEY_NO_WILDCARD},
        [VK_LISTEN] = {"Listen", parse_address, V(listen), .min = 0},
        [VK_EPOCH_MS] = {"EpochMs", parse_msec_range, V(epoch_ms), 1, 10000},
        [VK_TRACKING] = {"Tracking", parse_choice, V(tracking), .choices = tracking_names},
        [VK_SECRET_FILE] = {"SecretFile", parse_path, V(secret_file), .max = PATH_MAX - 1},
        [VK_MAX_INFLIGHT] = {"MaxInflightEpochs", parse_uint32_range, V(max_inflight_epochs), 1, 64},
        [VK_COMPRESSION] = {"Compression", parse_choice, V(compression), .choices = compression_names},
        [VK_PRE_COPY] = {"PreCopy", parse_yes_no, V(pre_copy)},
        [VK_MAX_STAGING] = {"MaxStagingMB", parse_uint32_range, V(max_staging_mb), 16, 65536},
        [VK_VMM] = {"Vmm", parse_path, V(vmm), .max = PATH_MAX - 1},
        [VK_VMM_ARGS] = {"VmmArgs", parse_vmm_args, V(vmm_args_string), .flags = KEY_EMPTY_UNSETS},
        [VK_VMM_TYPE] = {"VmmType", parse_choice, V(vmm_type), .choices = vmm_type_names},
        [VK_FENCE_COMMAND] = {"FenceCommand", parse_command, V(fence_command), .flags = KEY_EMPTY_UNSETS},
        [VK_FAILOVER_POLICY] = {"FailoverPolicy", parse_choice, V(failover_policy),
                                .choices = failover_names},
        [VK_SERVICE_ADDRESS] = {"ServiceAddress", parse_cidr, V(service_address), .flags = KEY_EMPTY_UNSETS},
        [VK_SERVICE_INTERFACE] = {"ServiceInterface", parse_ifname, V(service_interface),
                                  .flags = KEY_EMPTY_UNSETS},
        [VK_SPLIT_BRAIN_TIMEOUT] = {"SplitBrainTimeoutMs", parse_msec_range, V(split_brain_timeout_ms), 100,
                                    600000},
        [VK_SPLIT_BRAIN_POLICY] = {"SplitBrainPolicy", parse_choice, V(split_brain_policy),
                                   .choices = split_brain_names},
        [VK_OUTPUT_COMMIT] = {"OutputCommit", parse_yes_no, V(output_commit)},
        [VK_CONSOLE_COMMIT] = {"ConsoleCommit", parse_yes_no, V(console_commit)},
        [VK_TLS] = {"TLS", parse_yes_no, V(tls)},
        [VK_TLS_CERT] = {"TLSCertificateFile", parse_path, V(tls_cert_file), .max = PATH_MAX - 1,
                         .flags = KEY_EMPTY_UNSETS},
        [VK_TLS_KEY] = {"TLSKeyFile", parse_path, V(tls_key_file), .max = PATH_MAX - 1,
                        .flags = KEY_EMPTY_UNSETS},
        [VK_TLS_CA] = {"TLSCAFile", parse_path, V(tls_ca_file), .max = PATH_MAX - 1,
                       .flags = KEY_EMPTY_UNSETS},
        [VK_TLS_PEER_NAME] = {"TLSPeerName", parse_hostname, V(tls_peer_name), .flags = KEY_EMPTY_UNSETS},
};
#undef V

static_assert(_DK_MAX <= KEYS_MAX && _VK_MAX <= KEYS_MAX, "KEYS_MAX");

const SectionDef daemon_section = {"Daemon", daemon_keys, _DK_MAX};
const SectionDef vm_section = {"VM", vm_keys, _VK_MAX};

/* ---------------------------------------------------------------------- */
/* Storage: free, copy and compare a key's field by the kind of its parser */

typedef enum FieldKind {
        FIELD_STRING,   /* char *, NULL: unset */
        FIELD_VMM_ARGS, /* VmConfig's vmm_args_string with vmm_args and n_vmm_args */
        FIELD_ADDRESS,  /* ConfigAddress */
        FIELD_CIDR,     /* ConfigCidr */
        FIELD_U32,      /* uint32_t */
        FIELD_INT,      /* int (an enum, a log level) */
        FIELD_BOOL,     /* bool */
} FieldKind;

static const struct {
        ValueParser parse;
        FieldKind kind;
} parser_kinds[] = {
        {parse_path, FIELD_STRING},     {parse_command, FIELD_STRING},    {parse_ifname, FIELD_STRING},
        {parse_hostname, FIELD_STRING}, {parse_vmm_args, FIELD_VMM_ARGS}, {parse_address, FIELD_ADDRESS},
        {parse_cidr, FIELD_CIDR},       {parse_uint32_range, FIELD_U32},  {parse_msec_range, FIELD_U32},
        {parse_choice, FIELD_INT},      {parse_log_level, FIELD_INT},     {parse_yes_no, FIELD_BOOL},
};

static FieldKind key_kind(const KeyDef *k)
{
        for (size_t i = 0; i < ELEMENTSOF(parser_kinds); i++)
                if (parser_kinds[i].parse == k->parse)
                        return parser_kinds[i].kind;
        assert(!"a value parser without a FieldKind in parser_kinds[]");
        return FIELD_INT;
}

static VmConfig *vmm_args_owner(const KeyDef *k, const void *target)
{
        /* parse_vmm_args() writes VmConfig's vmm_args_string, vmm_args and n_vmm_args together. */
        assert(k->offset == offsetof(VmConfig, vmm_args_string));
        return (VmConfig *) target;
}

static bool str_eq_null(const char *a, const char *b)
{
        return (!a && !b) || (a && b && streq(a, b));
}

void section_fields_free(const SectionDef *sec, void *target)
{
        for (size_t i = 0; i < sec->n_keys; i++) {
                const KeyDef *k = &sec->keys[i];
                void *field = (char *) target + k->offset;

                switch (key_kind(k)) {
                case FIELD_STRING:
                        *(char **) field = mfree(*(char **) field);
                        break;
                case FIELD_VMM_ARGS: {
                        VmConfig *v = vmm_args_owner(k, target);
                        v->vmm_args_string = mfree(v->vmm_args_string);
                        strv_free(v->vmm_args);
                        v->vmm_args = NULL;
                        v->n_vmm_args = 0;
                        break;
                }
                default:
                        break;
                }
        }
}

static int vmm_args_copy(VmConfig *n, const VmConfig *v)
{
        n->vmm_args = NULL;
        n->n_vmm_args = 0;
        n->vmm_args_string = NULL;
        if (set_string(&n->vmm_args_string, v->vmm_args_string) < 0)
                return -ENOMEM;
        n->vmm_args = calloc(v->n_vmm_args + 1, sizeof(char *));
        if (!n->vmm_args)
                return -ENOMEM;
        for (size_t i = 0; i < v->n_vmm_args; i++) {
                n->vmm_args[i] = strdup(v->vmm_args[i]);
                if (!n->vmm_args[i])
                        return -ENOMEM;
                n->n_vmm_args++;
        }
        return 0;
}

int section_fields_copy(const SectionDef *sec, void *dst, const void *src)
{
        int r = 0;

        /* First detach every pointer from src's memory, so a failure leaves dst freeable. */
        for (size_t i = 0; i < sec->n_keys; i++) {
                const KeyDef *k = &sec->keys[i];
                if (key_kind(k) == FIELD_STRING)
                        *(char **) ((char *) dst + k->offset) = NULL;
                else if (key_kind(k) == FIELD_VMM_ARGS) {
                        VmConfig *n = vmm_args_owner(k, dst);
                        n->vmm_args_string = NULL;
                        n->vmm_args = NULL;
                        n->n_vmm_args = 0;
                }
        }
        for (size_t i = 0; i < sec->n_keys && r >= 0; i++) {
                const KeyDef *k = &sec->keys[i];

                if (key_kind(k) == FIELD_STRING)
                        r = set_string((char **) ((char *) dst + k->offset),
                                       *(char *const *) ((const char *) src + k->offset));
                else if (key_kind(k) == FIELD_VMM_ARGS)
                        r = vmm_args_copy(vmm_args_owner(k, dst), vmm_args_owner(k, src));
        }
        return r;
}

static bool address_equal(const ConfigAddress *a, const ConfigAddress *b)
{
        return a->len == b->len && (a->len == 0 || streq(a->text, b->text));
}

static bool cidr_equal(const ConfigCidr *a, const ConfigCidr *b)
{
        return a->family == b->family &&
               (a->family == AF_UNSPEC ||
                (a->prefixlen == b->prefixlen &&
                 memcmp(&a->addr, &b->addr,
                        a->family == AF_INET ? sizeof(struct in_addr) : sizeof(struct in6_addr)) == 0));
}

static bool field_equal(const KeyDef *k, const void *a, const void *b)
{
        const void *fa = (const char *) a + k->offset, *fb = (const char *) b + k->offset;

        switch (key_kind(k)) {
        case FIELD_STRING:
        case FIELD_VMM_ARGS: /* the split words follow from the string */
                return str_eq_null(*(char *const *) fa, *(char *const *) fb);
        case FIELD_ADDRESS:
                return address_equal(fa, fb);
        case FIELD_CIDR:
                return cidr_equal(fa, fb);
        case FIELD_U32:
                return *(const uint32_t *) fa == *(const uint32_t *) fb;
        case FIELD_INT:
                return *(const int *) fa == *(const int *) fb;
        case FIELD_BOOL:
                return *(const bool *) fa == *(const bool *) fb;
        }
        return false;
}

bool section_fields_equal(const SectionDef *sec, const void *a, const void *b)
{
        for (size_t i = 0; i < sec->n_keys; i++)
                if (!(sec->keys[i].flags & KEY_LIVE) && !field_equal(&sec->keys[i], a, b))
                        return false;
        return true;
}

/* ---------------------------------------------------------------------- */
/* The line parser */

static bool is_blank(char c)
{
        return c == ' ' || c == '\t' || c == '\r';
}

static char *strip(char *s)
{
        size_t n;

        while (is_blank(*s))
                s++;
        n = strlen(s);
        while (n > 0 && is_blank(s[n - 1]))
                s[--n] = 0;
        return s;
}

const KeyDef *find_key(const SectionDef *sec, const char *key, bool ignore_case, size_t *ret_index)
{
        for (size_t i = 0; i < sec->n_keys; i++)
                if (ignore_case ? strcasecmp(key, sec->keys[i].name) == 0 : streq(key, sec->keys[i].name)) {
                        *ret_index = i;
                        return &sec->keys[i];
                }
        return NULL;
}

/* Levenshtein distance, case-insensitive, of two short strings (keys are < 64 bytes). */
static size_t edit_distance(const char *a, const char *b)
{
        size_t la = strlen(a), lb = strlen(b), row[65];

        if (la > 64 || lb > 64)
                return SIZE_MAX;
        for (size_t j = 0; j <= lb; j++)
                row[j] = j;
        for (size_t i = 1; i <= la; i++) {
                size_t diag = row[0];
                row[0] = i;
                for (size_t j = 1; j <= lb; j++) {
                        size_t up = row[j];
                        size_t cost = tolower((unsigned char) a[i - 1]) == tolower((unsigned char) b[j - 1])
                                              ? 0
                                              : 1;
                        row[j] = MIN(MIN(row[j] + 1, row[j - 1] + 1), diag + cost);
                        diag = up;
                }
        }
        return row[lb];
}

/* The key a misspelling most likely meant: same letters in another case, or the closest
 * one within an edit distance of 1 for short keys, up to 3 for long ones. NULL: none. */
const KeyDef *find_similar_key(const SectionDef *sec, const char *key)
{
        const KeyDef *best = NULL;
        size_t best_d = SIZE_MAX, limit = strlen(key) <= 4 ? 1 : strlen(key) <= 10 ? 2 : 3;

        for (size_t i = 0; i < sec->n_keys; i++) {
                size_t d = edit_distance(key, sec->keys[i].name);
                if (d < best_d) {
                        best_d = d;
                        best = &sec->keys[i];
                }
        }
        return best_d <= limit ? best : NULL;
}

int key_assign(const SectionDef *sec, void *target, const char *key, const char *value, const char *path,
               unsigned line, ParseResult *pr, ErrorList *e)
{
        char esc[ESCAPE_BUF_SIZE], problem[256] = "";
        const KeyDef *k;
        size_t ki;
        int r;

        k = find_key(sec, key, false, &ki);
        if (!k) {
                const KeyDef *similar = find_similar_key(sec, key);
                if (similar)
                        error_add(e, path, line, "unknown key %s= in section [%s], did you mean %s=?",
                                  escape_value(key, esc, sizeof(esc)), sec->name, similar->name);
                else
                        error_add(e, path, line, "unknown key %s= in section [%s]",
                                  escape_value(key, esc, sizeof(esc)), sec->name);
                return 0;
        }
        if (pr->given[ki]) {
                if (pr->line[ki] > 0)
                        error_add(e, path, line, "duplicate key %s= (first set on line %u)", k->name,
                                  pr->line[ki]);
                else
                        error_add(e, path, line, "%s= given twice", k->name);
                return 0;
        }
        pr->given[ki] = true;
        pr->line[ki] = line;
        if (!*value && !(k->flags & KEY_EMPTY_UNSETS)) {
                error_add(e, path, line, "%s=: empty value", k->name);
                return 0;
        }
        r = k->parse(k, value, (char *) target + k->offset, problem, sizeof(problem));
        if (r == -ENOMEM)
                return r;
        if (r < 0) {
                error_add(e, path, line, "%s=%s: %s", k->name, escape_value(value, esc, sizeof(esc)),
                          problem[0] ? problem : "invalid value");
                return 0;
        }
        pr->valid[ki] = true;
        return 0;
}

/*
 * Parses text into target (a DaemonConfig or VmConfig already holding the
 * defaults) as sec describes. Content errors go to e; returns 0 or -ENOMEM.
 */
int ini_parse(const char *path, const char *text, size_t len, const SectionDef *sec, void *target,
              ParseResult *pr, ErrorList *e)
{
        enum { NO_SECTION, IN_SECTION, IN_UNKNOWN } state = NO_SECTION;
        char esc[ESCAPE_BUF_SIZE];
        size_t off = 0;
        unsigned lineno = 0;
        _cleanup_free_ char *buf = NULL;

        *pr = (ParseResult){};
        if (len > CONFIG_FILE_MAX) {
                error_add(e, path, 0, "file is larger than %u bytes", CONFIG_FILE_MAX);
                return 0;
        }
        buf = malloc(CONFIG_LINE_MAX + 1);
        if (!buf)
                return -ENOMEM;
        /* A UTF-8 byte order mark some editors write. */
        if (len >= 3 && memcmp(text, "\xEF\xBB\xBF", 3) == 0)
                off = 3;

        while (off < len) {
                const char *l = text + off, *nl = memchr(l, '\n', len - off);
                size_t n = nl ? (size_t) (nl - l) : len - off;
                char *s, *eq, *key, *value;
                bool bad = false;
                int r;

                off += n + (nl ? 1 : 0);
                lineno++;

                if (n > CONFIG_LINE_MAX) {
                        error_add(e, path, lineno, "line is longer than %u bytes", CONFIG_LINE_MAX);
                        continue;
                }
                if (memchr(l, 0, n)) {
                        error_add(e, path, lineno, "line contains a NUL byte");
                        continue;
                }
                memcpy(buf, l, n);
                buf[n] = 0;
                s = strip(buf);
                if (!*s || *s == '#' || *s == ';')
                        continue;
                for (const char *p = s; *p; p++)
                        if (((unsigned char) *p < 0x20 && *p != '\t') || *p == 0x7f)
                                bad = true;
                if (bad) {
                        error_add(e, path, lineno, "line contains control characters");
                        continue;
                }

                if (*s == '[') {
                        char *end = strchr(s, ']');
                        if (!end || end[1] != 0) {
                                error_add(e, path, lineno, "invalid section header \"%s\"",
                                          escape_value(s, esc, sizeof(esc)));
                                state = IN_UNKNOWN;
                                continue;
                        }
                        *end = 0;
                        if (!streq(s + 1, sec->name)) {
                                error_add(e, path, lineno, "unknown section [%s], expected [%s]",
                                          escape_value(s + 1, esc, sizeof(esc)), sec->name);
                                state = IN_UNKNOWN;
                                continue;
                        }
                        if (pr->section_line > 0)
                                error_add(e, path, lineno, "duplicate section [%s] (first on line %u)",
                                          sec->name, pr->section_line);
                        else
                                pr->section_line = lineno;
                        state = IN_SECTION;
                        continue;
                }

                eq = strchr(s, '=');
                if (!eq) {
                        error_add(e, path, lineno, "expected Key=Value, got \"%s\"",
                                  escape_value(s, esc, sizeof(esc)));
                        continue;
                }
                *eq = 0;
                key = strip(s);
                value = strip(eq + 1);
                if (!*key) {
                        error_add(e, path, lineno, "missing key before '='");
                        continue;
                }
                if (state == NO_SECTION) {
                        error_add(e, path, lineno, "%s= outside of a section, expected [%s] first",
                                  escape_value(key, esc, sizeof(esc)), sec->name);
                        continue;
                }
                if (state == IN_UNKNOWN) /* already reported once, at its header */
                        continue;

                r = key_assign(sec, target, key, value, path, lineno, pr, e);
                if (r < 0)
                        return r;
        }
        return 0;
}

/* ---------------------------------------------------------------------- */
/* Names of the enum values (the key tables' choices) */

const char *vm_role_to_string(VmRole r)
{
        return (unsigned) r < ELEMENTSOF(role_names) - 1 ? role_names[r] : NULL;
}

const char *config_tracking_to_string(ConfigTracking t)
{
        return (unsigned) t < ELEMENTSOF(tracking_names) - 1 ? tracking_names[t] : NULL;
}

const char *config_compression_to_string(ConfigCompression c)
{
        return (unsigned) c < ELEMENTSOF(compression_names) - 1 ? compression_names[c] : NULL;
}

const char *failover_policy_to_string(FailoverPolicy p)
{
        return (unsigned) p < ELEMENTSOF(failover_names) - 1 ? failover_names[p] : NULL;
}

const char *vmm_type_to_string(VmmType t)
{
        return (unsigned) t < ELEMENTSOF(vmm_type_names) - 1 ? vmm_type_names[t] : NULL;
}

const char *split_brain_policy_to_string(SplitBrainPolicy p)
{
        return (unsigned) p < ELEMENTSOF(split_brain_names) - 1 ? split_brain_names[p] : NULL;
}

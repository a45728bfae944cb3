/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * dirtyrepd configuration. The parser is table driven (one KeyDef per key,
 * systemd's ConfigTableItem in miniature): a key's table entry says how to
 * parse it and where the result goes, so adding a key is one line plus a
 * default. Everything the files contain is hostile input: every line, value,
 * file and directory entry is bounded, and errors are collected (bounded)
 * instead of stopping at the first.
 */
#include <arpa/inet.h>
#include <assert.h>
#include <dirent.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <syslog.h>
#include <unistd.h>

#include "config-internal.h"
#include "config.h"
#include "macros.h"
#include "util.h"

#include "dirtyrep-build.h"

#define DEFAULT_VMM               BINDIR "/dirtyrep-vmm"
#define SUN_PATH_MAX              (sizeof(((struct sockaddr_un *) NULL)->sun_path) - 1)
#define IFNAME_MAX                15U                      /* IFNAMSIZ - 1 */
#define ERRORS_TOTAL_MAX          (CONFIG_ERRORS_MAX * 4U) /* over all files of one load */

/* Enum fields are parsed through an int pointer. */
static_assert(sizeof(VmRole) == sizeof(int), "enum size");
static_assert(sizeof(ConfigTracking) == sizeof(int), "enum size");
static_assert(sizeof(ConfigCompression) == sizeof(int), "enum size");
static_assert(sizeof(FailoverPolicy) == sizeof(int), "enum size");
static_assert(sizeof(VmmType) == sizeof(int), "enum size");
static_assert(sizeof(SplitBrainPolicy) == sizeof(int), "enum size");

/* ---------------------------------------------------------------------- */
/* Error collection */

void error_list_done(ErrorList *e)
{
        free(e->buf);
        *e = (ErrorList){};
}

static void error_append_line(ErrorList *e, const char *line)
{
        size_t l = strlen(line);
        char *n;

        if (e->oom)
                return;
        n = realloc(e->buf, e->len + l + 2);
        if (!n) {
                e->oom = true;
                return;
        }
        e->buf = n;
        if (e->len > 0)
                e->buf[e->len++] = '\n';
        memcpy(e->buf + e->len, line, l + 1);
        e->len += l;
}

static bool has_control(const char *s)
{
        for (; *s; s++)
                if ((unsigned char) *s < 0x20 || *s == 0x7f)
                        return true;
        return false;
}

/* A copy of s with control characters written as \xNN. NULL on OOM. */
static char *escape_control(const char *s)
{
        char *r = malloc(strlen(s) * 4 + 1), *o = r;

        if (!r)
                return NULL;
        for (; *s; s++) {
                unsigned char c = (unsigned char) *s;
                if (c < 0x20 || c == 0x7f)
                        o += sprintf(o, "\\x%02x", c);
                else
                        *o++ = (char) c;
        }
        *o = 0;
        return r;
}

/* Records "PATH:LINE: message" (or "PATH: message" for line 0). */
_printf_(4, 5) void error_add(ErrorList *e, const char *path, unsigned line, const char *fmt, ...)
{
        _cleanup_free_ char *msg = NULL, *full = NULL;
        va_list ap;
        int r;

        e->any = true;
        e->errors_file++;
        if (e->n_file >= CONFIG_ERRORS_MAX) {
                e->dropped_file++;
                return;
        }
        if (e->n_total >= ERRORS_TOTAL_MAX) {
                e->dropped_total++;
                return;
        }
        e->n_file++;
        e->n_total++;

        va_start(ap, fmt);
        r = vasprintf(&msg, fmt, ap);
        va_end(ap);
        if (r < 0) {
                msg = NULL;
                e->oom = true;
                return;
        }
        /* A file name is directory content: a newline in it must not forge a line of the report. */
        if (has_control(path)) {
                _cleanup_free_ char *esc = escape_control(path);
                if (!esc) {
                        e->oom = true;
                        return;
                }
                r = line > 0 ? asprintf(&full, "%s:%u: %s", esc, line, msg)
                             : asprintf(&full, "%s: %s", esc, msg);
        } else
                r = line > 0 ? asprintf(&full, "%s:%u: %s", path, line, msg)
                             : asprintf(&full, "%s: %s", path, msg);
        if (r < 0) {
                full = NULL;
                e->oom = true;
                return;
        }
        error_append_line(e, full);
}

/* Ends a file: says how many of its errors were not kept. */
void error_file_done(ErrorList *e, const char *path)
{
        unsigned dropped = e->dropped_file;

        e->n_file = 0;
        e->dropped_file = 0;
        e->errors_file = 0;
        if (dropped > 0 && e->n_total < ERRORS_TOTAL_MAX) {
                _cleanup_free_ char *s = NULL;
                if (asprintf(&s, "%s: %u more errors not shown", path, dropped) < 0) {
                        e->oom = true;
                        return;
                }
                error_append_line(e, s);
        }
}

/*
 * Hands the collected message to *ret_errors (when wanted) and returns r,
 * or -ENOMEM when the message could not be built.
 */
int error_list_finish(ErrorList *e, int r, char **ret_errors)
{
        if (e->dropped_total > 0 && !e->oom) {
                _cleanup_free_ char *s = NULL;
                if (asprintf(&s, "%u more errors not shown", e->dropped_total) < 0)
                        e->oom = true;
                else
                        error_append_line(e, s);
        }
        if (e->oom) {
                if (ret_errors)
                        *ret_errors = NULL;
                error_list_done(e);
                return -ENOMEM;
        }
        if (ret_errors)
                *ret_errors = TAKE_PTR(e->buf);
        error_list_done(e);
        return r;
}

/*
 * Copies at most VALUE_QUOTE_MAX bytes of s into buf for an error message,
 * escaping anything that is not printable ASCII as \xNN, so no value can
 * put control sequences or invalid UTF-8 into the log.
 */
const char *escape_value(const char *s, char *buf, size_t size)
{
        size_t o = 0, i;

        assert(size >= VALUE_QUOTE_MAX * 4 + 4);
        for (i = 0; s[i] && i < VALUE_QUOTE_MAX; i++) {
                unsigned char c = (unsigned char) s[i];
                if (c >= 0x20 && c < 0x7f && c != '\\')
                        buf[o++] = (char) c;
                else
                        o += (size_t) snprintf(buf + o, size - o, "\\x%02x", c);
        }
        if (s[i])
                o += (size_t) snprintf(buf + o, size - o, "...");
        buf[o] = 0;
        return buf;
}

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

typedef struct KeyDef KeyDef;

/*
 * A value parser writes the parsed value to field (the key's member of the
 * config struct) and returns 0, -ENOMEM, or another negative errno with a
 * human-readable problem in `problem`.
 */
typedef int (*ValueParser)(const KeyDef *k, const char *value, void *field, char *problem, size_t psize);

enum {
        KEY_EMPTY_UNSETS = 1 << 0, /* "Key=" sets the field back to unset */
        KEY_NO_WILDCARD = 1 << 1,  /* address: 0.0.0.0 / :: are refused (a peer) */
};

struct KeyDef {
        const char *name;
        ValueParser parse;
        size_t offset;
        uint64_t min, max;          /* numbers; paths: max length; addresses: min port */
        const char *const *choices; /* enums: index == value, NULL-terminated */
        unsigned flags;
};

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

static int set_string(char **field, const char *value)
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

static void strv_free(char **l)
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
static const char *const failover_names[] = {
        [FAILOVER_POLICY_MANUAL] = "manual", [FAILOVER_POLICY_AUTO] = "auto",
        [FAILOVER_POLICY_CLUSTER] = "cluster", NULL};
static const char *const vmm_type_names[] = {
        [VMM_TYPE_DIRTYREP_VMM] = "dirtyrep-vmm", [VMM_TYPE_QEMU] = "qemu", NULL};
static const char *const split_brain_names[] = {
        [SPLIT_BRAIN_POLICY_SUSPEND] = "suspend", [SPLIT_BRAIN_POLICY_CONTINUE] = "continue", NULL};

#define KEYS_MAX 32

enum {
        DK_LISTEN_ADDRESS,
        DK_LOG_LEVEL,
        DK_STATE_DIRECTORY,
        DK_RUNTIME_DIRECTORY,
        DK_HEARTBEAT_INTERVAL,
        DK_HEARTBEAT_MISSES,
        DK_IMAGE_DIRECTORY,
        _DK_MAX,
};

#define D(f) offsetof(DaemonConfig, f)
static const KeyDef daemon_keys[_DK_MAX] = {
        [DK_LISTEN_ADDRESS] = {"ListenAddress", parse_address, D(listen_address), .min = 0,
                               .flags = KEY_EMPTY_UNSETS},
        [DK_LOG_LEVEL] = {"LogLevel", parse_log_level, D(log_level)},
        [DK_STATE_DIRECTORY] = {"StateDirectory", parse_path, D(state_directory), .max = PATH_MAX - 1},
        [DK_RUNTIME_DIRECTORY] = {"RuntimeDirectory", parse_path, D(runtime_directory), .max = PATH_MAX - 1},
        [DK_HEARTBEAT_INTERVAL] = {"HeartbeatIntervalMs", parse_msec_range, D(heartbeat_interval_ms), 5,
                                   10000},
        [DK_HEARTBEAT_MISSES] = {"HeartbeatMisses", parse_uint32_range, D(heartbeat_misses), 1, 100},
        [DK_IMAGE_DIRECTORY] = {"ImageDirectory", parse_path, D(image_directory), .max = PATH_MAX - 1},
};
#undef D

enum {
        VK_ROLE,
        VK_CONTROL_SOCKET,
        VK_PEER,
        VK_LISTEN,
        VK_EPOCH_MS,
        VK_TRACKING,
        VK_SECRET_FILE,
        VK_MAX_INFLIGHT,
        VK_COMPRESSION,
        VK_PRE_COPY,
        VK_MAX_STAGING,
        VK_VMM,
        VK_VMM_ARGS,
        VK_VMM_TYPE,
        VK_FENCE_COMMAND,
        VK_FAILOVER_POLICY,
        VK_SERVICE_ADDRESS,
        VK_SERVICE_INTERFACE,
        VK_SPLIT_BRAIN_TIMEOUT,
        VK_SPLIT_BRAIN_POLICY,
        VK_OUTPUT_COMMIT,
        VK_CONSOLE_COMMIT,
        VK_TLS,
        VK_TLS_CERT,
        VK_TLS_KEY,
        VK_TLS_CA,
        VK_TLS_PEER_NAME,
        _VK_MAX,
};

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

typedef struct SectionDef {
        const char *name;
        const KeyDef *keys;
        size_t n_keys;
} SectionDef;

static const SectionDef daemon_section = {"Daemon", daemon_keys, _DK_MAX};
static const SectionDef vm_section = {"VM", vm_keys, _VK_MAX};

/* What the line parser saw, for the checks that span keys. */
typedef struct ParseResult {
        unsigned section_line;   /* 0: the section never appeared */
        unsigned line[KEYS_MAX]; /* where each key was set, 0: not set */
        bool valid[KEYS_MAX];    /* and whether its value parsed */
} ParseResult;

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

static const KeyDef *find_key(const SectionDef *sec, const char *key, bool ignore_case, size_t *ret_index)
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
static const KeyDef *find_similar_key(const SectionDef *sec, const char *key)
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

/*
 * Parses text into target (a DaemonConfig or VmConfig already holding the
 * defaults) as sec describes. Content errors go to e; returns 0 or -ENOMEM.
 */
static int ini_parse(const char *path, const char *text, size_t len, const SectionDef *sec, void *target,
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
                char *s, *eq, *key, *value, problem[256];
                const KeyDef *k;
                size_t ki;
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

                k = find_key(sec, key, false, &ki);
                if (!k) {
                        const KeyDef *similar = find_similar_key(sec, key);
                        if (similar)
                                error_add(e, path, lineno,
                                          "unknown key %s= in section [%s], did you mean %s=?",
                                          escape_value(key, esc, sizeof(esc)), sec->name, similar->name);
                        else
                                error_add(e, path, lineno, "unknown key %s= in section [%s]",
                                          escape_value(key, esc, sizeof(esc)), sec->name);
                        continue;
                }
                if (pr->line[ki] > 0) {
                        error_add(e, path, lineno, "duplicate key %s= (first set on line %u)", k->name,
                                  pr->line[ki]);
                        continue;
                }
                pr->line[ki] = lineno;
                if (!*value && !(k->flags & KEY_EMPTY_UNSETS)) {
                        error_add(e, path, lineno, "%s=: empty value", k->name);
                        continue;
                }

                problem[0] = 0;
                r = k->parse(k, value, (char *) target + k->offset, problem, sizeof(problem));
                if (r == -ENOMEM)
                        return r;
                if (r < 0) {
                        error_add(e, path, lineno, "%s=%s: %s", k->name,
                                  escape_value(value, esc, sizeof(esc)),
                                  problem[0] ? problem : "invalid value");
                        continue;
                }
                pr->valid[ki] = true;
        }
        return 0;
}

/* ---------------------------------------------------------------------- */
/* Daemon and VM configs */

DaemonConfig *daemon_config_free(DaemonConfig *d)
{
        if (!d)
                return NULL;
        free(d->path);
        free(d->state_directory);
        free(d->runtime_directory);
        free(d->image_directory);
        free(d);
        return NULL;
}

DaemonConfig *daemon_config_new_default(void)
{
        _cleanup_(daemon_config_freep) DaemonConfig *d = NULL;

        d = calloc(1, sizeof(*d));
        if (!d)
                return NULL;
        d->log_level = LOG_INFO;
        d->heartbeat_interval_ms = 50;
        d->heartbeat_misses = 4;
        d->state_directory = strdup(DEFAULT_STATE_DIRECTORY);
        d->runtime_directory = strdup(DEFAULT_RUNTIME_DIRECTORY);
        if (!d->state_directory || !d->runtime_directory)
                return NULL;
        return TAKE_PTR(d);
}

int config_parse_daemon_text(const char *path, const char *text, size_t len, DaemonConfig **ret,
                             char **ret_errors)
{
        _cleanup_(daemon_config_freep) DaemonConfig *d = NULL;
        ErrorList e = {};
        ParseResult pr;
        int r;

        d = daemon_config_new_default();
        if (!d)
                return error_list_finish(&e, -ENOMEM, ret_errors);
        d->path = strdup(path);
        if (!d->path)
                return error_list_finish(&e, -ENOMEM, ret_errors);

        r = ini_parse(path, text, len, &daemon_section, d, &pr, &e);
        if (r < 0)
                return error_list_finish(&e, r, ret_errors);
        d->runtime_directory_set = pr.valid[DK_RUNTIME_DIRECTORY];
        error_file_done(&e, path);
        if (e.any)
                return error_list_finish(&e, -EINVAL, ret_errors);
        error_list_done(&e);
        *ret = TAKE_PTR(d);
        return 0;
}

VmConfig *vm_config_free(VmConfig *v)
{
        if (!v)
                return NULL;
        free(v->name);
        free(v->path);
        free(v->control_socket);
        free(v->secret_file);
        free(v->vmm);
        free(v->vmm_args_string);
        strv_free(v->vmm_args);
        free(v->fence_command);
        free(v->service_interface);
        free(v->tls_cert_file);
        free(v->tls_key_file);
        free(v->tls_ca_file);
        free(v->tls_peer_name);
        free(v);
        return NULL;
}

static int vm_config_new_default(const char *path, const char *name, VmConfig **ret)
{
        _cleanup_(vm_config_freep) VmConfig *v = NULL;

        v = calloc(1, sizeof(*v));
        if (!v)
                return -ENOMEM;
        v->role = VM_ROLE_PRIMARY; /* only meaningful once Role= was given: it is required */
        v->epoch_ms = 20;
        v->tracking = CONFIG_TRACKING_AUTO;
        v->max_inflight_epochs = 4;
        v->compression = CONFIG_COMPRESSION_LZ4;
        v->pre_copy = true;
        v->max_staging_mb = 256;
        v->failover_policy = FAILOVER_POLICY_MANUAL;
        v->service_address.family = AF_UNSPEC;
        v->split_brain_timeout_ms = 5000;
        v->split_brain_policy = SPLIT_BRAIN_POLICY_SUSPEND;
        v->output_commit = true;
        v->console_commit = false;
        v->vmm_type = VMM_TYPE_DIRTYREP_VMM;
        v->name = strdup(name);
        v->path = strdup(path);
        v->vmm = strdup(DEFAULT_VMM);
        v->vmm_args = calloc(1, sizeof(char *));
        if (!v->name || !v->path || !v->vmm || !v->vmm_args ||
            asprintf(&v->control_socket, DEFAULT_RUNTIME_DIRECTORY "/%s.sock", name) < 0)
                return -ENOMEM;
        *ret = TAKE_PTR(v);
        return 0;
}

/* With TLS=yes: the first of the three files that is missing (and was not
 * given with a bad value, reported already), or NULL. */
static const char *tls_missing(const VmConfig *v, bool cert_given, bool key_given, bool ca_given)
{
        if (!v->tls_cert_file && !cert_given)
                return "TLSCertificateFile=";
        if (!v->tls_key_file && !key_given)
                return "TLSKeyFile=";
        if (!v->tls_ca_file && !ca_given)
                return "TLSCAFile=";
        return NULL;
}

/* Parses one VM file into e; returns 0 (check e->any), or -ENOMEM. */
static int vm_parse(const char *path, const char *name, const char *text, size_t len, VmConfig **ret,
                    ErrorList *e)
{
        _cleanup_(vm_config_freep) VmConfig *v = NULL;
        ParseResult pr;
        int r;

        if (!config_vm_name_is_valid(name)) {
                char esc[ESCAPE_BUF_SIZE];
                error_add(e, path, 0,
                          "invalid VM name \"%s\": must be 1..%u characters of A-Z a-z 0-9 _ . - "
                          "and not start with a dot",
                          escape_value(name ? name : "", esc, sizeof(esc)), CONFIG_VM_NAME_MAX);
                return 0;
        }
        r = vm_config_new_default(path, name, &v);
        if (r < 0)
                return r;
        r = ini_parse(path, text, len, &vm_section, v, &pr, e);
        if (r < 0)
                return r;

        if (len <= CONFIG_FILE_MAX && pr.section_line == 0)
                error_add(e, path, 0, "no [VM] section");
        else if (pr.section_line > 0) {
                if (pr.line[VK_ROLE] == 0)
                        error_add(e, path, pr.section_line, "Role= is required (primary or standby)");
                if (pr.line[VK_SECRET_FILE] == 0)
                        error_add(e, path, pr.section_line, "SecretFile= is required");
                if (pr.valid[VK_ROLE] && v->role == VM_ROLE_PRIMARY && pr.line[VK_PEER] == 0)
                        error_add(e, path, pr.line[VK_ROLE], "Role=primary requires Peer=ADDRESS:PORT");
                if (pr.valid[VK_ROLE] && v->role == VM_ROLE_STANDBY && pr.line[VK_LISTEN] == 0)
                        error_add(e, path, pr.line[VK_ROLE], "Role=standby requires Listen=ADDRESS:PORT");
                /* The pair must come together; a half given as an invalid value was reported already. */
                bool sa_bad = pr.line[VK_SERVICE_ADDRESS] > 0 && !pr.valid[VK_SERVICE_ADDRESS];
                bool si_bad = pr.line[VK_SERVICE_INTERFACE] > 0 && !pr.valid[VK_SERVICE_INTERFACE];
                if (v->service_address.family != AF_UNSPEC && !v->service_interface && !si_bad)
                        error_add(e, path, pr.line[VK_SERVICE_ADDRESS],
                                  "ServiceAddress= requires ServiceInterface=");
                if (v->service_interface && v->service_address.family == AF_UNSPEC && !sa_bad)
                        error_add(e, path, pr.line[VK_SERVICE_INTERFACE],
                                  "ServiceInterface= is only meaningful with ServiceAddress=");
                if (pr.valid[VK_ROLE] && !(pr.line[VK_PEER] > 0 && !pr.valid[VK_PEER]))
                        check_failover_needs(v, e, path,
                                             pr.line[VK_FAILOVER_POLICY] ? pr.line[VK_FAILOVER_POLICY]
                                                                         : pr.line[VK_ROLE],
                                             pr.line[VK_VMM_ARGS]);
                if (v->vmm_type == VMM_TYPE_QEMU && pr.valid[VK_VMM_TYPE] &&
                    !(pr.line[VK_VMM_ARGS] > 0 && !pr.valid[VK_VMM_ARGS])) {
                        char b[128];
                        const char *problem = config_qemu_args_problem(v, b, sizeof(b));
                        if (problem)
                                error_add(e, path, pr.line[VK_VMM_TYPE], "VmmType=qemu: %s", problem);
                }
                /* The cluster fences an isolated primary; one that released output on its own before
                 * that would lose what it acknowledged when the cluster promotes the replica. */
                if (v->failover_policy == FAILOVER_POLICY_CLUSTER &&
                    v->split_brain_policy == SPLIT_BRAIN_POLICY_CONTINUE)
                        error_add(e, path, pr.line[VK_SPLIT_BRAIN_POLICY],
                                  "SplitBrainPolicy=continue cannot be combined with FailoverPolicy=cluster "
                                  "(use suspend)");
                if (v->tls) {
                        const char *missing =
                                tls_missing(v, pr.line[VK_TLS_CERT] > 0 && !pr.valid[VK_TLS_CERT],
                                            pr.line[VK_TLS_KEY] > 0 && !pr.valid[VK_TLS_KEY],
                                            pr.line[VK_TLS_CA] > 0 && !pr.valid[VK_TLS_CA]);
                        if (missing)
                                error_add(e, path, pr.line[VK_TLS], "TLS=yes requires %s", missing);
                }
        }
        v->control_socket_set = pr.valid[VK_CONTROL_SOCKET];
        *ret = TAKE_PTR(v);
        return 0;
}

int config_parse_vm_file(const char *path, const char *name, const char *text, size_t len, VmConfig **ret,
                         char **ret_errors)
{
        _cleanup_(vm_config_freep) VmConfig *v = NULL;
        ErrorList e = {};
        int r;

        r = vm_parse(path, name, text, len, &v, &e);
        if (r < 0)
                return error_list_finish(&e, r, ret_errors);
        error_file_done(&e, path);
        if (e.any)
                return error_list_finish(&e, -EINVAL, ret_errors);
        error_list_done(&e);
        *ret = TAKE_PTR(v);
        return 0;
}

/* ---------------------------------------------------------------------- */
/* Settings from the command line */

bool config_vm_key_is_valid(const char *key)
{
        size_t ki;
        return key && find_key(&vm_section, key, false, &ki);
}

/* Deep copy of a VmConfig, so a failed application leaves the original alone. */
static int vm_config_copy(const VmConfig *v, VmConfig **ret)
{
        _cleanup_(vm_config_freep) VmConfig *n = NULL;

        n = calloc(1, sizeof(*n));
        if (!n)
                return -ENOMEM;
        *n = *v;
        n->name = n->path = n->control_socket = n->secret_file = n->vmm = n->vmm_args_string = NULL;
        n->fence_command = n->service_interface = NULL;
        n->tls_cert_file = n->tls_key_file = n->tls_ca_file = n->tls_peer_name = NULL;
        n->vmm_args = NULL;
        n->n_vmm_args = 0;
        if (set_string(&n->name, v->name) < 0 || set_string(&n->path, v->path) < 0 ||
            set_string(&n->control_socket, v->control_socket) < 0 ||
            set_string(&n->secret_file, v->secret_file) < 0 || set_string(&n->vmm, v->vmm) < 0 ||
            set_string(&n->vmm_args_string, v->vmm_args_string) < 0 ||
            set_string(&n->fence_command, v->fence_command) < 0 ||
            set_string(&n->service_interface, v->service_interface) < 0 ||
            set_string(&n->tls_cert_file, v->tls_cert_file) < 0 ||
            set_string(&n->tls_key_file, v->tls_key_file) < 0 ||
            set_string(&n->tls_ca_file, v->tls_ca_file) < 0 ||
            set_string(&n->tls_peer_name, v->tls_peer_name) < 0)
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
        *ret = TAKE_PTR(n);
        return 0;
}

DaemonConfig *daemon_config_copy(const DaemonConfig *d)
{
        _cleanup_(daemon_config_freep) DaemonConfig *n = NULL;

        n = calloc(1, sizeof(*n));
        if (!n)
                return NULL;
        *n = *d;
        n->path = n->state_directory = n->runtime_directory = n->image_directory = NULL;
        if (set_string(&n->path, d->path) < 0 || set_string(&n->state_directory, d->state_directory) < 0 ||
            set_string(&n->runtime_directory, d->runtime_directory) < 0 ||
            (d->image_directory && set_string(&n->image_directory, d->image_directory) < 0))
                return NULL;
        return TAKE_PTR(n);
}

static bool str_eq_null(const char *a, const char *b)
{
        return (!a && !b) || (a && b && streq(a, b));
}

static bool address_equal(const ConfigAddress *a, const ConfigAddress *b)
{
        return a->len == b->len && (a->len == 0 || streq(a->text, b->text));
}

bool vm_config_equal(const VmConfig *a, const VmConfig *b)
{
        if (!a || !b)
                return a == b;
        return streq(a->name, b->name) && a->role == b->role && str_eq_null(a->control_socket, b->control_socket) &&
               address_equal(&a->peer, &b->peer) && address_equal(&a->listen, &b->listen) &&
               a->epoch_ms == b->epoch_ms && a->tracking == b->tracking &&
               str_eq_null(a->secret_file, b->secret_file) && a->max_inflight_epochs == b->max_inflight_epochs &&
               a->compression == b->compression && a->pre_copy == b->pre_copy &&
               a->max_staging_mb == b->max_staging_mb && str_eq_null(a->vmm, b->vmm) &&
               str_eq_null(a->vmm_args_string, b->vmm_args_string) && a->vmm_type == b->vmm_type &&
               str_eq_null(a->fence_command, b->fence_command) && a->failover_policy == b->failover_policy &&
               a->service_address.family == b->service_address.family &&
               (a->service_address.family == AF_UNSPEC ||
                (a->service_address.prefixlen == b->service_address.prefixlen &&
                 memcmp(&a->service_address.addr, &b->service_address.addr,
                        a->service_address.family == AF_INET ? sizeof(struct in_addr)
                                                             : sizeof(struct in6_addr)) == 0)) &&
               str_eq_null(a->service_interface, b->service_interface) &&
               a->split_brain_timeout_ms == b->split_brain_timeout_ms &&
               a->split_brain_policy == b->split_brain_policy && a->output_commit == b->output_commit &&
               a->console_commit == b->console_commit && a->tls == b->tls &&
               str_eq_null(a->tls_cert_file, b->tls_cert_file) &&
               str_eq_null(a->tls_key_file, b->tls_key_file) &&
               str_eq_null(a->tls_ca_file, b->tls_ca_file) &&
               str_eq_null(a->tls_peer_name, b->tls_peer_name);
}

bool daemon_config_equal(const DaemonConfig *a, const DaemonConfig *b)
{
        if (!a || !b)
                return a == b;
        /* LogLevel= is not compared: the daemon applies it without touching a VM. */
        return address_equal(&a->listen_address, &b->listen_address) &&
               str_eq_null(a->state_directory, b->state_directory) &&
               str_eq_null(a->runtime_directory, b->runtime_directory) &&
               str_eq_null(a->image_directory, b->image_directory) &&
               a->heartbeat_interval_ms == b->heartbeat_interval_ms &&
               a->heartbeat_misses == b->heartbeat_misses;
}

int config_apply_vm_settings(Config *c, const char *name, char *const *assignments, size_t n_assignments,
                             const char *origin, char **ret_errors)
{
        _cleanup_(vm_config_freep) VmConfig *v = NULL;
        bool given[KEYS_MAX] = {}, valid[KEYS_MAX] = {};
        char esc[ESCAPE_BUF_SIZE];
        ErrorList e = {};
        size_t idx = SIZE_MAX;
        bool is_new;
        int r;

        assert(c && c->daemon && origin);

        if (!config_vm_name_is_valid(name)) {
                error_add(&e, origin, 0,
                          "invalid VM name \"%s\": must be 1..%u characters of A-Z a-z 0-9 _ . - "
                          "and not start with a dot",
                          escape_value(name ? name : "", esc, sizeof(esc)), CONFIG_VM_NAME_MAX);
                error_file_done(&e, origin);
                return error_list_finish(&e, -EINVAL, ret_errors);
        }
        for (size_t i = 0; i < c->n_vms; i++)
                if (streq(c->vms[i]->name, name))
                        idx = i;
        is_new = idx == SIZE_MAX;
        if (is_new) {
                if (c->n_vms >= CONFIG_VMS_MAX) {
                        error_add(&e, origin, 0, "more than %u VMs", CONFIG_VMS_MAX);
                        error_file_done(&e, origin);
                        return error_list_finish(&e, -EINVAL, ret_errors);
                }
                r = vm_config_new_default(origin, name, &v);
                if (r >= 0 && c->daemon->runtime_directory_set) {
                        free(v->control_socket);
                        if (asprintf(&v->control_socket, "%s/%s.sock", c->daemon->runtime_directory, name) < 0) {
                                v->control_socket = NULL;
                                r = -ENOMEM;
                        }
                }
        } else
                r = vm_config_copy(c->vms[idx], &v);
        if (r < 0)
                return error_list_finish(&e, r, ret_errors);

        for (size_t i = 0; i < n_assignments; i++) {
                _cleanup_free_ char *copy = strdup(assignments[i]);
                char problem[256] = "", *eq, *key, *value;
                const KeyDef *k;
                size_t ki;

                if (!copy)
                        return error_list_finish(&e, -ENOMEM, ret_errors);
                eq = strchr(copy, '=');
                if (!eq || eq == copy) {
                        error_add(&e, origin, 0, "expected Key=Value, got \"%s\"",
                                  escape_value(copy, esc, sizeof(esc)));
                        continue;
                }
                *eq = 0;
                key = copy;
                value = eq + 1;
                if (strlen(value) > CONFIG_LINE_MAX) {
                        error_add(&e, origin, 0, "%s=: value is longer than %u bytes",
                                  escape_value(key, esc, sizeof(esc)), CONFIG_LINE_MAX);
                        continue;
                }
                if (has_control(value)) {
                        error_add(&e, origin, 0, "%s=: value contains control characters",
                                  escape_value(key, esc, sizeof(esc)));
                        continue;
                }
                k = find_key(&vm_section, key, false, &ki);
                if (!k) {
                        const KeyDef *similar = find_similar_key(&vm_section, key);
                        if (similar)
                                error_add(&e, origin, 0, "unknown key %s= in section [VM], did you mean %s=?",
                                          escape_value(key, esc, sizeof(esc)), similar->name);
                        else
                                error_add(&e, origin, 0, "unknown key %s= in section [VM]",
                                          escape_value(key, esc, sizeof(esc)));
                        continue;
                }
                if (given[ki]) {
                        error_add(&e, origin, 0, "%s= given twice", k->name);
                        continue;
                }
                given[ki] = true;
                if (!*value && !(k->flags & KEY_EMPTY_UNSETS)) {
                        error_add(&e, origin, 0, "%s=: empty value", k->name);
                        continue;
                }
                r = k->parse(k, value, (char *) v + k->offset, problem, sizeof(problem));
                if (r == -ENOMEM)
                        return error_list_finish(&e, r, ret_errors);
                if (r < 0) {
                        error_add(&e, origin, 0, "%s=%s: %s", k->name, escape_value(value, esc, sizeof(esc)),
                                  problem[0] ? problem : "invalid value");
                        continue;
                }
                valid[ki] = true;
        }

        /* The checks a file gets, on the result: for a VM from a file, the file's values count. */
        if (is_new && !given[VK_ROLE])
                error_add(&e, origin, 0, "Role= is required (primary or standby)");
        if (!v->secret_file && !given[VK_SECRET_FILE])
                error_add(&e, origin, 0, "SecretFile= is required");
        if ((!is_new || valid[VK_ROLE]) && !(given[VK_PEER] && !valid[VK_PEER]) &&
            !(given[VK_LISTEN] && !valid[VK_LISTEN])) {
                if (v->role == VM_ROLE_PRIMARY && v->peer.len == 0)
                        error_add(&e, origin, 0, "Role=primary requires Peer=ADDRESS:PORT");
                if (v->role == VM_ROLE_STANDBY && v->listen.len == 0)
                        error_add(&e, origin, 0, "Role=standby requires Listen=ADDRESS:PORT");
        }
        if (!(given[VK_SERVICE_ADDRESS] && !valid[VK_SERVICE_ADDRESS]) &&
            !(given[VK_SERVICE_INTERFACE] && !valid[VK_SERVICE_INTERFACE])) {
                if (v->service_address.family != AF_UNSPEC && !v->service_interface)
                        error_add(&e, origin, 0, "ServiceAddress= requires ServiceInterface=");
                if (v->service_interface && v->service_address.family == AF_UNSPEC)
                        error_add(&e, origin, 0, "ServiceInterface= is only meaningful with ServiceAddress=");
        }
        if ((!is_new || valid[VK_ROLE]) && !(given[VK_PEER] && !valid[VK_PEER]) &&
            !(given[VK_VMM_ARGS] && !valid[VK_VMM_ARGS]))
                check_failover_needs(v, &e, origin, 0, 0);
        if (v->vmm_type == VMM_TYPE_QEMU && !(given[VK_VMM_TYPE] && !valid[VK_VMM_TYPE]) &&
            !(given[VK_VMM_ARGS] && !valid[VK_VMM_ARGS])) {
                char b[128];
                const char *problem = config_qemu_args_problem(v, b, sizeof(b));
                if (problem)
                        error_add(&e, origin, 0, "VmmType=qemu: %s", problem);
        }
        if (v->failover_policy == FAILOVER_POLICY_CLUSTER && v->split_brain_policy == SPLIT_BRAIN_POLICY_CONTINUE)
                error_add(&e, origin, 0,
                          "SplitBrainPolicy=continue cannot be combined with FailoverPolicy=cluster (use suspend)");
        if (v->tls) {
                const char *missing = tls_missing(v, given[VK_TLS_CERT] && !valid[VK_TLS_CERT],
                                                  given[VK_TLS_KEY] && !valid[VK_TLS_KEY],
                                                  given[VK_TLS_CA] && !valid[VK_TLS_CA]);
                if (missing)
                        error_add(&e, origin, 0, "TLS=yes requires %s", missing);
        }
        error_file_done(&e, origin);
        if (e.any)
                return error_list_finish(&e, -EINVAL, ret_errors);
        error_list_done(&e);

        if (given[VK_CONTROL_SOCKET])
                v->control_socket_set = true;
        if (is_new) {
                VmConfig **l = realloc(c->vms, (c->n_vms + 1) * sizeof(VmConfig *));
                size_t at = 0;

                if (!l)
                        return -ENOMEM;
                c->vms = l;
                while (at < c->n_vms && strcmp(c->vms[at]->name, name) < 0)
                        at++;
                memmove(c->vms + at + 1, c->vms + at, (c->n_vms - at) * sizeof(VmConfig *));
                c->vms[at] = TAKE_PTR(v);
                c->n_vms++;
        } else {
                vm_config_free(c->vms[idx]);
                c->vms[idx] = TAKE_PTR(v);
        }
        return 0;
}

/* ---------------------------------------------------------------------- */
/* Loading from disk */

Config *config_free(Config *c)
{
        if (!c)
                return NULL;
        daemon_config_free(c->daemon);
        for (size_t i = 0; i < c->n_vms; i++)
                vm_config_free(c->vms[i]);
        free(c->vms);
        free(c);
        return NULL;
}

const VmConfig *config_find_vm(const Config *c, const char *name)
{
        if (!c || !name)
                return NULL;
        for (size_t i = 0; i < c->n_vms; i++)
                if (streq(c->vms[i]->name, name))
                        return c->vms[i];
        return NULL;
}

/*
 * Reads a config file of at most CONFIG_FILE_MAX bytes. O_NONBLOCK so a FIFO
 * put in place of a file cannot hang the daemon in open(); fstat() then
 * refuses it. Returns 0, -EISDIR, -EBADFD (not a regular file), -EFBIG, or
 * the open/read error.
 */
static int read_config_file(int dir_fd, const char *name, char **ret, size_t *ret_len)
{
        _cleanup_close_ int fd = -EBADF;
        _cleanup_free_ char *buf = NULL;
        struct stat st;
        size_t n = 0;

        fd = openat(dir_fd, name, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
        if (fd < 0)
                return -errno;
        if (fstat(fd, &st) < 0)
                return -errno;
        if (S_ISDIR(st.st_mode))
                return -EISDIR;
        if (!S_ISREG(st.st_mode))
                return -EBADFD;
        if (st.st_size > (off_t) CONFIG_FILE_MAX)
                return -EFBIG;
        buf = malloc(CONFIG_FILE_MAX + 1);
        if (!buf)
                return -ENOMEM;
        /* Read to EOF but never past the cap: the file may grow under us. */
        while (n <= CONFIG_FILE_MAX) {
                ssize_t k = read(fd, buf + n, CONFIG_FILE_MAX + 1 - n);
                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (k == 0)
                        break;
                n += (size_t) k;
        }
        if (n > CONFIG_FILE_MAX)
                return -EFBIG;
        *ret = TAKE_PTR(buf);
        *ret_len = n;
        return 0;
}

static void error_add_read(ErrorList *e, const char *path, int r)
{
        if (r == -EFBIG)
                error_add(e, path, 0, "file is larger than %u bytes", CONFIG_FILE_MAX);
        else if (r == -EBADFD)
                error_add(e, path, 0, "not a regular file");
        else
                error_add(e, path, 0, "cannot read: %s", strerror(-r));
}

static int cmp_strp(const void *a, const void *b)
{
        return strcmp(*(char *const *) a, *(char *const *) b);
}

typedef struct NameList {
        char **names;
        size_t n;
} NameList;

static void name_list_done(NameList *l)
{
        for (size_t i = 0; i < l->n; i++)
                free(l->names[i]);
        free(l->names);
        *l = (NameList){};
}

static bool has_conf_suffix(const char *s)
{
        size_t n = strlen(s);
        return n >= 5 && streq(s + n - 5, ".conf");
}

/*
 * Lists the *.conf entries of d, sorted. More than CONFIG_VMS_MAX is an
 * error (-E2BIG, *ret_count says how many there are), found before any file
 * is read.
 */
static int list_vm_files(DIR *d, NameList *ret, size_t *ret_count)
{
        NameList l = {};
        size_t count = 0;

        l.names = calloc(CONFIG_VMS_MAX, sizeof(char *));
        if (!l.names)
                return -ENOMEM;
        for (;;) {
                struct dirent *de;

                errno = 0;
                de = readdir(d);
                if (!de) {
                        if (errno != 0) {
                                int r = -errno;
                                name_list_done(&l);
                                return r;
                        }
                        break;
                }
                if (!has_conf_suffix(de->d_name))
                        continue;
                count++;
                if (l.n >= CONFIG_VMS_MAX)
                        continue; /* keep counting for the message */
                l.names[l.n] = strdup(de->d_name);
                if (!l.names[l.n]) {
                        name_list_done(&l);
                        return -ENOMEM;
                }
                l.n++;
        }
        *ret_count = count;
        if (count > CONFIG_VMS_MAX) {
                name_list_done(&l);
                return -E2BIG;
        }
        qsort(l.names, l.n, sizeof(char *), cmp_strp);
        *ret = l;
        return 0;
}

static int load_vm_dir(const char *vm_dir, Config *c, ErrorList *e, int *first_io_error)
{
        _cleanup_close_ int dir_fd = -EBADF;
        NameList files = {};
        size_t count = 0;
        DIR *d;
        int r;

        dir_fd = open(vm_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dir_fd < 0) {
                if (errno == ENOENT)
                        return 0;
                r = -errno;
                error_add(e, vm_dir, 0, "cannot open directory: %s", strerror(-r));
                if (*first_io_error == 0)
                        *first_io_error = r;
                return 0;
        }
        d = fdopendir(dir_fd);
        if (!d)
                return -errno;
        dir_fd = -EBADF; /* owned by d now */
        r = list_vm_files(d, &files, &count);
        if (r == -E2BIG)
                error_add(e, vm_dir, 0, "%zu VM files (*.conf), at most %u are supported", count,
                          CONFIG_VMS_MAX);
        else if (r == -ENOMEM) {
                closedir(d);
                return r;
        } else if (r < 0) {
                error_add(e, vm_dir, 0, "cannot list directory: %s", strerror(-r));
                if (*first_io_error == 0)
                        *first_io_error = r;
        }
        if (r < 0) {
                closedir(d);
                return 0;
        }

        c->vms = calloc(files.n ? files.n : 1, sizeof(VmConfig *));
        if (!c->vms) {
                closedir(d);
                name_list_done(&files);
                return -ENOMEM;
        }
        for (size_t i = 0; i < files.n; i++) {
                _cleanup_free_ char *path = NULL, *name = NULL, *text = NULL;
                VmConfig *v = NULL;
                size_t len = 0;

                if (asprintf(&path, "%s/%s", vm_dir, files.names[i]) < 0) {
                        path = NULL;
                        r = -ENOMEM;
                        break;
                }
                name = strndup(files.names[i], strlen(files.names[i]) - 5);
                if (!name) {
                        r = -ENOMEM;
                        break;
                }
                /* Check the name before opening anything. */
                if (config_vm_name_is_valid(name)) {
                        r = read_config_file(dirfd(d), files.names[i], &text, &len);
                        if (r == -ENOMEM)
                                break;
                        if (r < 0) {
                                error_add_read(e, path, r);
                                if (*first_io_error == 0 && r != -EFBIG && r != -EBADFD && r != -EISDIR)
                                        *first_io_error = r;
                                error_file_done(e, path);
                                r = 0;
                                continue;
                        }
                }
                r = vm_parse(path, name, text ? text : "", len, &v, e);
                if (r < 0)
                        break;
                /* A file with errors stays out of the cross-checks: its values are half there. */
                if (v && e->errors_file == 0)
                        c->vms[c->n_vms++] = v;
                else
                        vm_config_free(v);
                error_file_done(e, path);
                r = 0;
        }
        closedir(d);
        name_list_done(&files);
        return r;
}

int config_load(const char *main_path, const char *vm_dir, Config **ret, char **ret_errors)
{
        _cleanup_(config_freep) Config *c = NULL;
        ErrorList e = {};
        int io_error = 0, r;

        c = calloc(1, sizeof(*c));
        if (!c)
                return error_list_finish(&e, -ENOMEM, ret_errors);

        if (main_path) {
                _cleanup_free_ char *text = NULL;
                size_t len = 0;

                r = read_config_file(AT_FDCWD, main_path, &text, &len);
                if (r == -ENOMEM)
                        return error_list_finish(&e, r, ret_errors);
                if (r < 0 && r != -ENOENT) {
                        error_add_read(&e, main_path, r);
                        if (r != -EFBIG && r != -EBADFD && r != -EISDIR)
                                io_error = r;
                } else if (r >= 0) {
                        ParseResult pr;
                        c->daemon = daemon_config_new_default();
                        if (!c->daemon || !(c->daemon->path = strdup(main_path)))
                                return error_list_finish(&e, -ENOMEM, ret_errors);
                        r = ini_parse(main_path, text, len, &daemon_section, c->daemon, &pr, &e);
                        if (r < 0)
                                return error_list_finish(&e, r, ret_errors);
                        c->daemon->runtime_directory_set = pr.valid[DK_RUNTIME_DIRECTORY];
                }
                error_file_done(&e, main_path);
        }
        if (!c->daemon) {
                c->daemon = daemon_config_new_default();
                if (!c->daemon)
                        return error_list_finish(&e, -ENOMEM, ret_errors);
        }

        if (vm_dir) {
                r = load_vm_dir(vm_dir, c, &e, &io_error);
                if (r < 0)
                        return error_list_finish(&e, r, ret_errors);
        }

        /* The default control socket follows RuntimeDirectory= when that was set. */
        if (c->daemon->runtime_directory_set)
                for (size_t i = 0; i < c->n_vms; i++) {
                        VmConfig *v = c->vms[i];
                        char *s;

                        if (v->control_socket_set)
                                continue;
                        if (asprintf(&s, "%s/%s.sock", c->daemon->runtime_directory, v->name) < 0)
                                return error_list_finish(&e, -ENOMEM, ret_errors);
                        free(v->control_socket);
                        v->control_socket = s;
                        if (strlen(s) > SUN_PATH_MAX)
                                error_add(&e, v->path, 0,
                                          "the default ControlSocket=%s (from RuntimeDirectory=) is longer "
                                          "than "
                                          "%zu bytes; set ControlSocket= explicitly",
                                          s, SUN_PATH_MAX);
                }

        validate_into(c, &e);
        error_file_done(&e, "cross-file checks");

        if (e.any)
                return error_list_finish(&e, io_error < 0 ? io_error : -EINVAL, ret_errors);
        error_list_done(&e);
        *ret = TAKE_PTR(c);
        return 0;
}

/* ---------------------------------------------------------------------- */
/* Secrets */

void config_secret_free(uint8_t *secret, size_t len)
{
        if (!secret)
                return;
        explicit_bzero(secret, len);
        free(secret);
}

static void secret_bufp(uint8_t **p)
{
        config_secret_free(*p, CONFIG_SECRET_MAX + 1);
}

static _printf_(3, 4) int secret_error(char **ret_error, int r, const char *fmt, ...)
{
        va_list ap;

        if (!ret_error)
                return r;
        va_start(ap, fmt);
        if (vasprintf(ret_error, fmt, ap) < 0)
                *ret_error = NULL;
        va_end(ap);
        return r;
}

int config_load_secret(const char *path, uint8_t **ret, size_t *ret_len, char **ret_error)
{
        _cleanup_close_ int fd = -EBADF;
        _cleanup_(secret_bufp) uint8_t *buf = NULL;
        uint8_t *out;
        struct stat st;
        size_t n = 0;

        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
        if (fd < 0)
                return secret_error(ret_error, -errno, "%s: cannot open secret file: %m", path);
        if (fstat(fd, &st) < 0)
                return secret_error(ret_error, -errno, "%s: cannot stat secret file: %m", path);
        if (S_ISDIR(st.st_mode))
                return secret_error(ret_error, -EISDIR, "%s: secret file is a directory", path);
        if (!S_ISREG(st.st_mode))
                return secret_error(ret_error, -EBADFD, "%s: secret file is not a regular file", path);
        if (st.st_uid != 0 && st.st_uid != geteuid())
                return secret_error(ret_error, -EPERM,
                                    "%s: secret file is owned by uid %u, must be owned by root or uid %u",
                                    path, (unsigned) st.st_uid, (unsigned) geteuid());
        if (st.st_mode & 077)
                return secret_error(
                        ret_error, -EPERM,
                        "%s: secret file has mode %04o, must not be accessible by group or others "
                        "(chmod 0600)",
                        path, (unsigned) (st.st_mode & 07777));

        buf = malloc(CONFIG_SECRET_MAX + 1);
        if (!buf)
                return secret_error(ret_error, -ENOMEM, "%s: out of memory", path);
        {
                ssize_t k = loop_read_upto(fd, buf, CONFIG_SECRET_MAX + 1);
                if (k < 0)
                        return secret_error(ret_error, (int) k, "%s: cannot read secret file: %s", path,
                                            strerror((int) -k));
                n = (size_t) k;
        }
        if (n < CONFIG_SECRET_MIN)
                return secret_error(ret_error, -EMSGSIZE,
                                    "%s: secret is too short (%zu bytes, at least %u needed)", path, n,
                                    CONFIG_SECRET_MIN);
        if (n > CONFIG_SECRET_MAX)
                return secret_error(ret_error, -EMSGSIZE, "%s: secret is too long (more than %u bytes)",
                                    path, CONFIG_SECRET_MAX);

        /* Exactly n bytes, copied rather than realloc()ed so no unzeroed copy is left behind. */
        out = malloc(n);
        if (!out)
                return secret_error(ret_error, -ENOMEM, "%s: out of memory", path);
        memcpy(out, buf, n);
        *ret = out;
        *ret_len = n;
        return 0;
}

/* ---------------------------------------------------------------------- */

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

int vmm_arg_expand(const char *word, const VmmArgValues *val, char **ret, char *ret_bad, unsigned *ret_seen)
{
        _cleanup_free_ char *out = NULL;
        size_t len = 0, cap = strlen(word) + 1;

        out = malloc(cap);
        if (!out)
                return -ENOMEM;
        for (const char *p = word; *p; p++) {
                const char *add = NULL;
                char one[2] = { *p, 0 };
                unsigned bit = 0;

                if (*p != '%')
                        add = one;
                else {
                        switch (*++p) {
                        case 'r':
                                add = val->ram;
                                bit = 1u << 0;
                                break;
                        case 's':
                                add = val->state;
                                bit = 1u << 1;
                                break;
                        case 'f':
                                add = val->ready_fd;
                                bit = 1u << 2;
                                break;
                        case 'c':
                                add = val->control;
                                bit = 1u << 3;
                                break;
                        case 'n':
                                add = val->name;
                                break;
                        case '%':
                                add = "%";
                                break;
                        default:
                                if (ret_bad)
                                        *ret_bad = *p ?: '%';
                                return -EINVAL;
                        }
                        if (ret_seen)
                                *ret_seen |= bit;
                        add = add ?: "";
                }
                size_t n = strlen(add);
                if (len + n + 1 > cap) {
                        char *t = realloc(out, cap = (len + n + 1) * 2);
                        if (!t)
                                return -ENOMEM;
                        out = t;
                }
                memcpy(out + len, add, n);
                len += n;
        }
        out[len] = 0;
        *ret = TAKE_PTR(out);
        return 0;
}

const char *split_brain_policy_to_string(SplitBrainPolicy p)
{
        return (unsigned) p < ELEMENTSOF(split_brain_names) - 1 ? split_brain_names[p] : NULL;
}

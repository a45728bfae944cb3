/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * dirtyrepd configuration. The parser is table driven (one KeyDef per key,
 * systemd's ConfigTableItem in miniature): a key's table entry says how to
 * parse it and where the result goes, and its parser's kind says how the
 * field is freed, copied and compared; a file's line and the command line's
 * --set take the same path (key_assign()). Adding a key is one line in the
 * table (daemon/config-parse.c), a default, its entry in dirtyrep.conf(5)
 * (test-config-man checks) and any check that spans keys. Everything the files contain is hostile input:
 * every line, value, file and directory entry is bounded, and errors are collected (bounded) instead of
 * stopping at the first.
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

#define DEFAULT_VMM      BINDIR "/dirtyrep-vmm"
#define ERRORS_TOTAL_MAX (CONFIG_ERRORS_MAX * 4U) /* over all files of one load */

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
/* Daemon and VM configs */

DaemonConfig *daemon_config_free(DaemonConfig *d)
{
        if (!d)
                return NULL;
        free(d->path);
        section_fields_free(&daemon_section, d);
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
        section_fields_free(&vm_section, v);
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

/* A key given with a value that did not parse (reported already): checks that need it stay quiet. */
static bool given_bad(const ParseResult *pr, size_t key)
{
        return pr->given[key] && !pr->valid[key];
}

/*
 * The checks that span the keys of a VM, on the result: a file's VM (is_new)
 * or a VM the command line changed or created. pr says which keys were
 * given and where (line 0: not from a file).
 */
static void vm_check(const VmConfig *v, const ParseResult *pr, bool is_new, ErrorList *e, const char *path)
{
        unsigned at = pr->section_line;
        /* Whether Role= is known: given and valid, or from the file a command line amends. */
        bool role = !is_new || pr->valid[VK_ROLE];

        if (is_new && !pr->given[VK_ROLE])
                error_add(e, path, at, "Role= is required (primary or standby)");
        if (!v->secret_file && !pr->given[VK_SECRET_FILE])
                error_add(e, path, at, "SecretFile= is required");
        if (role && v->role == VM_ROLE_PRIMARY && v->peer.len == 0 && !given_bad(pr, VK_PEER))
                error_add(e, path, pr->line[VK_ROLE], "Role=primary requires Peer=ADDRESS:PORT");
        if (role && v->role == VM_ROLE_STANDBY && v->listen.len == 0 && !given_bad(pr, VK_LISTEN))
                error_add(e, path, pr->line[VK_ROLE], "Role=standby requires Listen=ADDRESS:PORT");
        /* The pair must come together; a half given as an invalid value was reported already. */
        if (!given_bad(pr, VK_SERVICE_ADDRESS) && !given_bad(pr, VK_SERVICE_INTERFACE)) {
                if (v->service_address.family != AF_UNSPEC && !v->service_interface)
                        error_add(e, path, pr->line[VK_SERVICE_ADDRESS],
                                  "ServiceAddress= requires ServiceInterface=");
                if (v->service_interface && v->service_address.family == AF_UNSPEC)
                        error_add(e, path, pr->line[VK_SERVICE_INTERFACE],
                                  "ServiceInterface= is only meaningful with ServiceAddress=");
        }
        /* A VmmArgs= that did not parse left the previous words, which were checked already. */
        if (role && !given_bad(pr, VK_PEER))
                check_failover_needs(v, e, path,
                                     pr->line[VK_FAILOVER_POLICY] ? pr->line[VK_FAILOVER_POLICY]
                                                                  : pr->line[VK_ROLE],
                                     pr->line[VK_VMM_ARGS]);
        if (v->vmm_type == VMM_TYPE_QEMU && !given_bad(pr, VK_VMM_TYPE) && !given_bad(pr, VK_VMM_ARGS)) {
                char b[128];
                const char *problem = config_qemu_args_problem(v, b, sizeof(b));
                if (problem)
                        error_add(e, path, pr->line[VK_VMM_TYPE], "VmmType=qemu: %s", problem);
        }
        /* The cluster fences an isolated primary; one that released output on its own before
         * that would lose what it acknowledged when the cluster promotes the replica. */
        if (v->failover_policy == FAILOVER_POLICY_CLUSTER &&
            v->split_brain_policy == SPLIT_BRAIN_POLICY_CONTINUE)
                error_add(e, path, pr->line[VK_SPLIT_BRAIN_POLICY],
                          "SplitBrainPolicy=continue cannot be combined with FailoverPolicy=cluster (use "
                          "suspend)");
        if (v->tls) {
                const char *missing = tls_missing(v, given_bad(pr, VK_TLS_CERT), given_bad(pr, VK_TLS_KEY),
                                                  given_bad(pr, VK_TLS_CA));
                if (missing)
                        error_add(e, path, pr->line[VK_TLS], "TLS=yes requires %s", missing);
        }
}

static void error_add_vm_name(ErrorList *e, const char *path, const char *name)
{
        char esc[ESCAPE_BUF_SIZE];

        error_add(e, path, 0,
                  "invalid VM name \"%s\": must be 1..%u characters of A-Z a-z 0-9 _ . - "
                  "and not start with a dot",
                  escape_value(name ? name : "", esc, sizeof(esc)), CONFIG_VM_NAME_MAX);
}

/* Parses one VM file into e; returns 0 (check e->any), or -ENOMEM. */
static int vm_parse(const char *path, const char *name, const char *text, size_t len, VmConfig **ret,
                    ErrorList *e)
{
        _cleanup_(vm_config_freep) VmConfig *v = NULL;
        ParseResult pr;
        int r;

        if (!config_vm_name_is_valid(name)) {
                error_add_vm_name(e, path, name);
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
        else if (pr.section_line > 0)
                vm_check(v, &pr, true, e, path);
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
        n->name = n->path = NULL;
        if (section_fields_copy(&vm_section, n, v) < 0 || set_string(&n->name, v->name) < 0 ||
            set_string(&n->path, v->path) < 0)
                return -ENOMEM;
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
        n->path = NULL;
        if (section_fields_copy(&daemon_section, n, d) < 0 || set_string(&n->path, d->path) < 0)
                return NULL;
        return TAKE_PTR(n);
}

bool vm_config_equal(const VmConfig *a, const VmConfig *b)
{
        if (!a || !b)
                return a == b;
        return streq(a->name, b->name) && section_fields_equal(&vm_section, a, b);
}

bool daemon_config_equal(const DaemonConfig *a, const DaemonConfig *b)
{
        if (!a || !b)
                return a == b;
        /* LogLevel= (KEY_LIVE) is not compared: the daemon applies it without touching a VM. */
        return section_fields_equal(&daemon_section, a, b);
}

/* A VM the command line creates: the defaults, with the control socket the daemon's
 * RuntimeDirectory= implies as config_load() does for files. */
static int vm_config_new_cli(const Config *c, const char *origin, const char *name, VmConfig **ret)
{
        _cleanup_(vm_config_freep) VmConfig *v = NULL;
        int r;

        r = vm_config_new_default(origin, name, &v);
        if (r < 0)
                return r;
        if (c->daemon->runtime_directory_set) {
                v->control_socket = mfree(v->control_socket);
                if (asprintf(&v->control_socket, "%s/%s.sock", c->daemon->runtime_directory, name) < 0) {
                        v->control_socket = NULL;
                        return -ENOMEM;
                }
        }
        *ret = TAKE_PTR(v);
        return 0;
}

/* One "Key=Value" of the command line into v: its own bounds, then the path a file's line takes. */
static int vm_apply_assignment(VmConfig *v, const char *assignment, const char *origin, ParseResult *pr,
                               ErrorList *e)
{
        _cleanup_free_ char *copy = strdup(assignment);
        char esc[ESCAPE_BUF_SIZE], *eq;

        if (!copy)
                return -ENOMEM;
        eq = strchr(copy, '=');
        if (!eq || eq == copy) {
                error_add(e, origin, 0, "expected Key=Value, got \"%s\"",
                          escape_value(copy, esc, sizeof(esc)));
                return 0;
        }
        *eq = 0;
        if (strlen(eq + 1) > CONFIG_LINE_MAX) {
                error_add(e, origin, 0, "%s=: value is longer than %u bytes",
                          escape_value(copy, esc, sizeof(esc)), CONFIG_LINE_MAX);
                return 0;
        }
        if (has_control(eq + 1)) {
                error_add(e, origin, 0, "%s=: value contains control characters",
                          escape_value(copy, esc, sizeof(esc)));
                return 0;
        }
        return key_assign(&vm_section, v, copy, eq + 1, origin, 0, pr, e);
}

int config_apply_vm_settings(Config *c, const char *name, char *const *assignments, size_t n_assignments,
                             const char *origin, char **ret_errors)
{
        _cleanup_(vm_config_freep) VmConfig *v = NULL;
        ParseResult pr = {};
        ErrorList e = {};
        size_t idx = SIZE_MAX;
        bool is_new;
        int r;

        assert(c && c->daemon && origin);

        if (!config_vm_name_is_valid(name)) {
                error_add_vm_name(&e, origin, name);
                error_file_done(&e, origin);
                return error_list_finish(&e, -EINVAL, ret_errors);
        }
        for (size_t i = 0; i < c->n_vms; i++)
                if (streq(c->vms[i]->name, name))
                        idx = i;
        is_new = idx == SIZE_MAX;
        if (is_new && c->n_vms >= CONFIG_VMS_MAX) {
                error_add(&e, origin, 0, "more than %u VMs", CONFIG_VMS_MAX);
                error_file_done(&e, origin);
                return error_list_finish(&e, -EINVAL, ret_errors);
        }
        r = is_new ? vm_config_new_cli(c, origin, name, &v) : vm_config_copy(c->vms[idx], &v);
        if (r < 0)
                return error_list_finish(&e, r, ret_errors);

        for (size_t i = 0; i < n_assignments; i++) {
                r = vm_apply_assignment(v, assignments[i], origin, &pr, &e);
                if (r < 0)
                        return error_list_finish(&e, r, ret_errors);
        }
        /* The checks a file gets, on the result: for a VM from a file, the file's values count. */
        vm_check(v, &pr, is_new, &e, origin);
        error_file_done(&e, origin);
        if (e.any)
                return error_list_finish(&e, -EINVAL, ret_errors);
        error_list_done(&e);

        if (pr.given[VK_CONTROL_SOCKET])
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

int vmm_arg_expand(const char *word, const VmmArgValues *val, char **ret, char *ret_bad, unsigned *ret_seen)
{
        _cleanup_free_ char *out = NULL;
        size_t len = 0, cap = strlen(word) + 1;

        out = malloc(cap);
        if (!out)
                return -ENOMEM;
        for (const char *p = word; *p; p++) {
                const char *add = NULL;
                char one[2] = {*p, 0};
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

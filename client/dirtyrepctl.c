/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * dirtyrepctl: the operator's command line for dirtyrepd, over its D-Bus
 * API (org.dirtyrep1, see daemon/bus.h and dirtyrepctl(1)). Modelled on
 * timedatectl: one function per verb, a verb table, exit codes that say
 * what went wrong (the EXIT_* values below, documented in the man page).
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <systemd/sd-bus.h>
#include <systemd/sd-event.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "dirtyrep-build.h"
#include "dirtyrepctl.h"
#include "image.h"
#include "macros.h"
#include "monitor.h"

#define VMS_MAX    1024 /* more than the daemon serves (CONFIG_VMS_MAX) */
#define STRING_MAX 1024 /* longest property string kept */

static const char *arg_bus_address;
bool arg_json;
static bool arg_force;
static const char *arg_image, *arg_parent; /* checkpoint --image DIR [--parent DIR] */
static bool arg_raw;
static bool arg_legend = true;
uint64_t arg_count; /* events: stop after this many, 0: never */

sd_bus *bus;

/* ---------------------------------------------------------------------- */
/* Bus and errors */

int acquire_bus(void)
{
        const char *address = arg_bus_address ? arg_bus_address : getenv("DIRTYREP_BUS_ADDRESS");
        int r;

        if (bus)
                return 0;
        if (address && *address) {
                r = sd_bus_new(&bus);
                if (r >= 0)
                        r = sd_bus_set_address(bus, address);
                if (r >= 0)
                        r = sd_bus_set_bus_client(bus, true);
                if (r >= 0)
                        r = sd_bus_start(bus);
        } else {
                address = "the system bus";
                r = sd_bus_open_system(&bus);
        }
        if (r < 0) {
                fprintf(stderr, "dirtyrepctl: cannot connect to %s: %s\n", address, strerror(-r));
                bus = sd_bus_unref(bus);
                return -EXIT_UNREACHABLE;
        }
        return 0;
}

/* Prints the error of a failed call and returns the exit code for it. */
static int bus_error_exit(const sd_bus_error *e, int r, const char *what)
{
        const char *name = e && e->name ? e->name : "";
        const char *msg = e && e->message ? e->message : strerror(r < 0 ? -r : r);

        if (streq(name, "org.freedesktop.DBus.Error.ServiceUnknown") ||
            streq(name, "org.freedesktop.DBus.Error.NameHasNoOwner") ||
            streq(name, "org.freedesktop.DBus.Error.NoReply") ||
            streq(name, "org.freedesktop.DBus.Error.Disconnected")) {
                fprintf(stderr, "dirtyrepctl: %s: dirtyrepd is not reachable on the bus (%s)\n", what, msg);
                return EXIT_UNREACHABLE;
        }
        if (streq(name, "org.freedesktop.DBus.Error.AccessDenied") ||
            streq(name, "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired")) {
                /* The bus policy's refusal is a long rule dump; say what it means first. */
                fprintf(stderr,
                        "dirtyrepctl: %s: permission denied: only root and members of group 'dirtyrep' may "
                        "do "
                        "this\n  (%s)\n",
                        what, msg);
                return EXIT_DENIED;
        }
        fprintf(stderr, "dirtyrepctl: %s: %s\n", what, msg);
        if (streq(name, BUS_ERROR_PREFIX "NoSuchVM") ||
            streq(name, "org.freedesktop.DBus.Error.UnknownObject"))
                return EXIT_NO_SUCH_VM;
        if (streq(name, "org.freedesktop.DBus.Error.UnknownMethod"))
                return EXIT_UNSUPPORTED;
        if (streq(name, BUS_ERROR_PREFIX "InvalidConfig"))
                return EXIT_CONFIG;
        if (strncmp(name, BUS_ERROR_PREFIX, strlen(BUS_ERROR_PREFIX)) == 0)
                return EXIT_STATE; /* NotPrimary, NotAttached, AlreadyAttached, NotConnected, Busy, ... */
        return EXIT_FAILURE;
}

/* ---------------------------------------------------------------------- */
/* Properties */

void vm_info_done(VmInfo *v)
{
        for (size_t i = 0; i < v->n_props; i++)
                free(v->props[i].s);
        v->n_props = 0;
}

const Prop *prop(const VmInfo *v, const char *name)
{
        for (size_t i = 0; i < v->n_props; i++)
                if (streq(v->props[i].name, name))
                        return &v->props[i];
        return NULL;
}

const char *prop_s(const VmInfo *v, const char *name)
{
        const Prop *p = prop(v, name);
        return p && p->type == 's' && p->s ? p->s : "";
}

uint64_t prop_u(const VmInfo *v, const char *name)
{
        const Prop *p = prop(v, name);
        return p && (p->type == 't' || p->type == 'u') ? p->u : 0;
}

double prop_d(const VmInfo *v, const char *name)
{
        const Prop *p = prop(v, name);
        return p && p->type == 'd' ? p->d : 0.0;
}

bool prop_b(const VmInfo *v, const char *name)
{
        const Prop *p = prop(v, name);
        return p && p->type == 'b' && p->b;
}

/*
 * A status string can carry text that came from the network (a peer's error
 * message): never let it put control sequences on the operator's terminal.
 * JSON output escapes instead.
 */
static void make_printable(char *s)
{
        for (; *s; s++)
                if ((unsigned char) *s < 0x20 || *s == 0x7f)
                        *s = '?';
}

/* Reads one variant value of a basic type we know into p; skips others. */
static int read_variant(sd_bus_message *m, Prop *p)
{
        const char *contents;
        char type;
        int r;

        r = sd_bus_message_peek_type(m, &type, &contents);
        if (r < 0)
                return r;
        if (type != 'v' || !contents || strlen(contents) != 1 || !strchr("sbtud", contents[0]))
                return sd_bus_message_skip(m, "v");
        r = sd_bus_message_enter_container(m, 'v', contents);
        if (r < 0)
                return r;
        p->type = contents[0];
        switch (p->type) {
        case 's': {
                const char *s;
                r = sd_bus_message_read_basic(m, 's', &s);
                if (r >= 0)
                        p->s = strndup(s, STRING_MAX);
                if (r >= 0 && !p->s)
                        r = -ENOMEM;
                if (r >= 0 && !arg_json)
                        make_printable(p->s);
                break;
        }
        case 'b': {
                int b;
                r = sd_bus_message_read_basic(m, 'b', &b);
                p->b = b;
                break;
        }
        case 't':
                r = sd_bus_message_read_basic(m, 't', &p->u);
                break;
        case 'u': {
                uint32_t u;
                r = sd_bus_message_read_basic(m, 'u', &u);
                p->u = u;
                break;
        }
        case 'd':
                r = sd_bus_message_read_basic(m, 'd', &p->d);
                break;
        }
        if (r < 0)
                return r;
        return sd_bus_message_exit_container(m);
}

/* Reads an a{sv} into v's properties (bounded by PROPS_MAX). */
int read_props(sd_bus_message *m, VmInfo *v)
{
        int r;

        r = sd_bus_message_enter_container(m, 'a', "{sv}");
        if (r < 0)
                return r;
        while ((r = sd_bus_message_enter_container(m, 'e', "sv")) > 0) {
                const char *name;
                Prop p = {};

                r = sd_bus_message_read_basic(m, 's', &name);
                if (r < 0)
                        return r;
                snprintf(p.name, sizeof(p.name), "%s", name);
                r = read_variant(m, &p);
                if (r < 0)
                        return r;
                if (p.type && v->n_props < PROPS_MAX)
                        v->props[v->n_props++] = p;
                else
                        free(p.s);
                r = sd_bus_message_exit_container(m);
                if (r < 0)
                        return r;
        }
        if (r < 0)
                return r;
        return sd_bus_message_exit_container(m);
}

static int vm_path(const char *name, char **ret, int *ret_exit)
{
        _cleanup_(sd_bus_error_free) sd_bus_error e = SD_BUS_ERROR_NULL;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        const char *path;
        int r;

        r = sd_bus_call_method(bus, BUS_NAME, BUS_MANAGER_PATH, BUS_MANAGER_IFACE, "GetVM", &e, &reply, "s",
                               name);
        if (r < 0) {
                char what[128];
                snprintf(what, sizeof(what), "VM '%.64s'", name);
                *ret_exit = bus_error_exit(&e, r, what);
                return r;
        }
        r = sd_bus_message_read(reply, "o", &path);
        if (r < 0 || !(*ret = strdup(path))) {
                fprintf(stderr, "dirtyrepctl: bad reply from dirtyrepd\n");
                *ret_exit = EXIT_FAILURE;
                return r < 0 ? r : -ENOMEM;
        }
        return 0;
}

void vm_list_done(VmList *l)
{
        free(l->names);
        free(l->roles);
        free(l->states);
        *l = (VmList){};
}

/* ListVMs. Returns 0 or an exit code (error printed). */
int list_vms(VmList *ret)
{
        _cleanup_(sd_bus_error_free) sd_bus_error e = SD_BUS_ERROR_NULL;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        VmList l = {};
        const char *name, *role, *state, *path;
        int r;

        r = sd_bus_call_method(bus, BUS_NAME, BUS_MANAGER_PATH, BUS_MANAGER_IFACE, "ListVMs", &e, &reply,
                               NULL);
        if (r < 0)
                return bus_error_exit(&e, r, "Failed to list VMs");
        l.names = calloc(VMS_MAX, sizeof(*l.names));
        l.roles = calloc(VMS_MAX, sizeof(*l.roles));
        l.states = calloc(VMS_MAX, sizeof(*l.states));
        if (!l.names || !l.roles || !l.states) {
                vm_list_done(&l);
                fprintf(stderr, "dirtyrepctl: out of memory\n");
                return EXIT_FAILURE;
        }
        r = sd_bus_message_enter_container(reply, 'a', "(ssso)");
        while (r >= 0 && (r = sd_bus_message_read(reply, "(ssso)", &name, &role, &state, &path)) > 0) {
                if (l.n >= VMS_MAX)
                        continue;
                snprintf(l.names[l.n], sizeof(l.names[0]), "%s", name);
                snprintf(l.roles[l.n], sizeof(l.roles[0]), "%s", role);
                snprintf(l.states[l.n], sizeof(l.states[0]), "%s", state);
                make_printable(l.names[l.n]);
                make_printable(l.roles[l.n]);
                make_printable(l.states[l.n]);
                l.n++;
        }
        if (r < 0) {
                vm_list_done(&l);
                fprintf(stderr, "dirtyrepctl: bad ListVMs reply from dirtyrepd: %s\n", strerror(-r));
                return EXIT_FAILURE;
        }
        *ret = l;
        return 0;
}

/* The VM a verb acts on: the one named, or the only one there is. */
static int pick_vm(int argc, char *argv[], char *ret, size_t size)
{
        VmList l = {};
        int r;

        if (argc >= 2) {
                snprintf(ret, size, "%s", argv[1]);
                return 0;
        }
        r = list_vms(&l);
        if (r != 0)
                return r;
        if (l.n != 1) {
                fprintf(stderr, "dirtyrepctl: %s: %s; name one\n", argv[0],
                        l.n == 0 ? "dirtyrepd serves no VM" : "dirtyrepd serves several VMs");
                vm_list_done(&l);
                return l.n == 0 ? EXIT_NO_SUCH_VM : EXIT_USAGE;
        }
        snprintf(ret, size, "%s", l.names[0]);
        vm_list_done(&l);
        return 0;
}

int get_vm_info(const char *name, VmInfo *v)
{
        _cleanup_(sd_bus_error_free) sd_bus_error e = SD_BUS_ERROR_NULL;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        _cleanup_free_ char *path = NULL;
        int r, ex = 0;

        r = vm_path(name, &path, &ex);
        if (r < 0)
                return ex;
        snprintf(v->name, sizeof(v->name), "%s", name);
        snprintf(v->path, sizeof(v->path), "%s", path);
        r = sd_bus_call_method(bus, BUS_NAME, path, "org.freedesktop.DBus.Properties", "GetAll", &e, &reply,
                               "s", BUS_VM_IFACE);
        if (r < 0)
                return bus_error_exit(&e, r, "Failed to read the VM's properties");
        r = read_props(reply, v);
        if (r < 0) {
                fprintf(stderr, "dirtyrepctl: bad property reply from dirtyrepd: %s\n", strerror(-r));
                return EXIT_FAILURE;
        }
        return 0;
}

/* ---------------------------------------------------------------------- */
/* Output helpers */

static const char *format_bytes(uint64_t b, char *buf, size_t size)
{
        static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
        double v = (double) b;
        size_t u = 0;

        while (v >= 1024.0 && u + 1 < ELEMENTSOF(units)) {
                v /= 1024.0;
                u++;
        }
        if (u == 0)
                snprintf(buf, size, "%" PRIu64 " B", b);
        else
                snprintf(buf, size, "%.1f %s", v, units[u]);
        return buf;
}

void json_string(FILE *f, const char *s)
{
        fputc('"', f);
        for (; *s; s++) {
                unsigned char c = (unsigned char) *s;
                if (c == '"' || c == '\\')
                        fprintf(f, "\\%c", c);
                else if (c < 0x20)
                        fprintf(f, "\\u%04x", c);
                else
                        fputc(c, f);
        }
        fputc('"', f);
}

void print_json_props(const VmInfo *v)
{
        for (size_t i = 0; i < v->n_props; i++) {
                const Prop *p = &v->props[i];
                printf(", \"%s\": ", p->name);
                switch (p->type) {
                case 's':
                        json_string(stdout, p->s ? p->s : "");
                        break;
                case 'b':
                        printf("%s", p->b ? "true" : "false");
                        break;
                case 't':
                case 'u':
                        printf("%" PRIu64, p->u);
                        break;
                case 'd':
                        /* JSON has no NaN or infinity. */
                        if (p->d != p->d || p->d > 1e300 || p->d < -1e300)
                                printf("null");
                        else
                                printf("%.3f", p->d);
                        break;
                }
        }
}

static void print_json(const VmInfo *v, bool last)
{
        printf("  {\"VM\": ");
        json_string(stdout, v->name);
        print_json_props(v);
        printf("}%s\n", last ? "" : ",");
}

static const char *state_mark(const char *state)
{
        if (streq(state, "protected"))
                return "\u25cf"; /* ● */
        if (streq(state, "failed"))
                return "\u00d7"; /* × */
        return "\u25cb";         /* ○ */
}

/* The status exit code of one VM (dirtyrepctl(1), EXIT STATUS). */
int vm_status_exit(const VmInfo *v)
{
        const char *state = prop_s(v, "State");

        if (streq(state, "failed") || strncmp(prop_s(v, "ServiceAddressState"), "takeover failed", 15) == 0)
                return EXIT_VM_FAILED;
        if (streq(state, "suspended") || streq(state, "suspending"))
                return EXIT_SUSPENDED;
        if (streq(state, "protected"))
                return 0;
        return EXIT_UNPROTECTED;
}

static int exit_severity(int code)
{
        return code == EXIT_VM_FAILED ? 3 : code == EXIT_SUSPENDED ? 2 : code == EXIT_UNPROTECTED ? 1 : 0;
}

static const char *format_duration(uint64_t usec, char *buf, size_t size)
{
        uint64_t s = usec / 1000000;

        if (s >= 3600)
                snprintf(buf, size, "%" PRIu64 "h %02" PRIu64 "min", s / 3600, (s / 60) % 60);
        else if (s >= 60)
                snprintf(buf, size, "%" PRIu64 "min %02" PRIu64 "s", s / 60, s % 60);
        else
                snprintf(buf, size, "%.1fs", (double) usec / 1e6);
        return buf;
}

/* Full-sync progress: "45% 1.2 GiB of 2.0 GiB, 80.0 MiB/s, ETA 10.0s", with a bar on a terminal. */
static void print_sync_progress(const VmInfo *v)
{
        uint64_t done = prop_u(v, "SyncBytesDone"), total = prop_u(v, "SyncBytesTotal");
        uint64_t elapsed = prop_u(v, "SyncUSec");
        char b1[32], b2[32], b3[32], b4[32], eta[48] = "";
        double rate, frac;

        if (total == 0)
                return;
        frac = done >= total ? 1.0 : (double) done / (double) total;
        rate = elapsed > 0 ? (double) done * 1e6 / (double) elapsed : 0.0;
        if (done >= total)
                snprintf(eta, sizeof(eta), ", all sent, waiting for the standby's ACK");
        else if (rate > 0)
                snprintf(eta, sizeof(eta), ", ETA %s",
                         format_duration((uint64_t) ((double) (total - done) / rate * 1e6), b4, sizeof(b4)));
        if (isatty(STDOUT_FILENO)) {
                char bar[31];
                size_t filled = (size_t) (frac * 30.0);
                for (size_t i = 0; i < 30; i++)
                        bar[i] = i < filled ? '#' : '.';
                bar[30] = 0;
                printf("%16s: [%s] ", "Full sync", bar);
        } else
                printf("%16s: ", "Full sync");
        printf("%.0f%%, %s of %s, %s/s, running %s%s\n", frac * 100.0, format_bytes(done, b1, sizeof(b1)),
               format_bytes(total, b2, sizeof(b2)), format_bytes((uint64_t) rate, b3, sizeof(b3)),
               format_duration(elapsed, b4, sizeof(b4)), eta);
}

static void print_status(const VmInfo *v)
{
        const char *role = prop_s(v, "Role"), *state = prop_s(v, "State"), *detail = prop_s(v, "Detail");
        const char *peer = prop_s(v, "Peer");
        bool primary = streq(role, "primary");
        char b1[32], b2[32], b3[32];

        printf("%s %s: %s, %s\n",
               vm_status_exit(v) == EXIT_VM_FAILED ? state_mark("failed") : state_mark(state), v->name, role,
               state);
        if (*detail)
                printf("%16s: %s\n", "Detail", detail);
        printf("%16s: %s (link %s)\n", "Peer", *peer ? peer : "-", prop_b(v, "LinkUp") ? "up" : "down");
        if (primary)
                printf("%16s: sealed %" PRIu64 ", committed %" PRIu64 ", lag %" PRIu64 "\n", "Epoch",
                       prop_u(v, "LastSealed"), prop_u(v, "LastCommitted"), prop_u(v, "Lag"));
        else
                printf("%16s: committed %" PRIu64 "\n", "Epoch", prop_u(v, "LastCommitted"));
        printf("%16s: %s\n", "Protected", prop_b(v, "Protected") ? "yes" : "no");
        print_sync_progress(v);
        if (*prop_s(v, "ServiceAddress"))
                printf("%16s: %s, %s\n", "Service address", prop_s(v, "ServiceAddress"),
                       prop_s(v, "ServiceAddressState"));
        if (primary) {
                printf("%16s: %.0f pages/s, %" PRIu64 " pages last epoch\n", "Dirty rate",
                       prop_d(v, "DirtyPagesPerSec"), prop_u(v, "PagesLastEpoch"));
                printf("%16s: p50 %.2f ms, p99 %.2f ms, max %.2f ms\n", "Pause",
                       prop_u(v, "PauseNSecP50") / 1e6, prop_u(v, "PauseNSecP99") / 1e6,
                       prop_u(v, "PauseNSecMax") / 1e6);
        }
        printf("%16s: %" PRIu64 " full, %" PRIu64 " incremental; %" PRIu64 " epochs committed\n", "Syncs",
               prop_u(v, "FullSyncs"), prop_u(v, "IncrementalSyncs"), prop_u(v, "EpochsCommitted"));
        printf("%16s: sent %s, received %s", "Traffic", format_bytes(prop_u(v, "BytesSent"), b1, sizeof(b1)),
               format_bytes(prop_u(v, "BytesReceived"), b2, sizeof(b2)));
        if (prop_d(v, "CompressionRatio") > 0)
                printf(", compression %.2fx", prop_d(v, "CompressionRatio"));
        printf("\n%16s: %s, %" PRIu64 " epoch(s) in flight\n", "Staging",
               format_bytes(prop_u(v, "StagingBytes"), b3, sizeof(b3)), prop_u(v, "InflightEpochs"));
        printf("%16s: epoch %" PRIu64 " ms, tracking %s, compression %s, max in flight %" PRIu64 "\n",
               "Settings", prop_u(v, "EpochMSec"), prop_s(v, "Tracking"), prop_s(v, "Compression"),
               prop_u(v, "MaxInflightEpochs"));
        printf("%16s: %s\n", "Configuration", prop_s(v, "ConfigPath"));
}

/* ---------------------------------------------------------------------- */
/* Verbs */

static int verb_status(int argc, char *argv[])
{
        VmList l = {};
        VmInfo *infos;
        size_t n = 0;
        int r, ret = 0, state_exit = 0;

        r = acquire_bus();
        if (r < 0)
                return -r;
        if (argc >= 2) {
                l.names = calloc(1, sizeof(*l.names));
                if (!l.names)
                        return EXIT_FAILURE;
                snprintf(l.names[0], sizeof(l.names[0]), "%s", argv[1]);
                l.n = 1;
        } else {
                r = list_vms(&l);
                if (r != 0)
                        return r;
        }
        infos = calloc(l.n ? l.n : 1, sizeof(VmInfo));
        if (!infos) {
                vm_list_done(&l);
                return EXIT_FAILURE;
        }
        for (size_t i = 0; i < l.n; i++) {
                r = get_vm_info(l.names[i], &infos[n]);
                if (r != 0) {
                        ret = r;
                        break;
                }
                n++;
        }
        if (ret == 0) {
                for (size_t i = 0; i < n; i++)
                        if (exit_severity(vm_status_exit(&infos[i])) > exit_severity(state_exit))
                                state_exit = vm_status_exit(&infos[i]);
                if (arg_json) {
                        printf("[\n");
                        for (size_t i = 0; i < n; i++)
                                print_json(&infos[i], i + 1 == n);
                        printf("]\n");
                } else if (n == 0)
                        printf("dirtyrepd serves no VM.\n");
                else
                        for (size_t i = 0; i < n; i++) {
                                if (i > 0)
                                        printf("\n");
                                print_status(&infos[i]);
                        }
        }
        for (size_t i = 0; i < n; i++)
                vm_info_done(&infos[i]);
        free(infos);
        vm_list_done(&l);
        return ret != 0 ? ret : state_exit;
}

static int verb_list(int argc, char *argv[])
{
        VmList l = {};
        int r;

        r = acquire_bus();
        if (r < 0)
                return -r;
        r = list_vms(&l);
        if (r != 0)
                return r;
        if (arg_json) {
                printf("[");
                for (size_t i = 0; i < l.n; i++) {
                        printf("%s{\"VM\": ", i ? ", " : "");
                        json_string(stdout, l.names[i]);
                        printf(", \"Role\": ");
                        json_string(stdout, l.roles[i]);
                        printf(", \"State\": ");
                        json_string(stdout, l.states[i]);
                        printf("}");
                }
                printf("]\n");
        } else {
                if (arg_legend)
                        printf("%-24s %-8s %s\n", "VM", "ROLE", "STATE");
                for (size_t i = 0; i < l.n; i++)
                        printf("%-24s %-8s %s\n", l.names[i], l.roles[i], l.states[i]);
                if (arg_legend)
                        printf("\n%zu VM(s) listed.\n", l.n);
        }
        vm_list_done(&l);
        return 0;
}

/* Calls a method of a VM object; reply handed back when wanted. */
static int call_vm(int argc, char *argv[], const char *method, const char *what, sd_bus_message **ret_reply,
                   char *ret_name, const char *types, ...)
{
        _cleanup_(sd_bus_error_free) sd_bus_error e = SD_BUS_ERROR_NULL;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *call = NULL;
        _cleanup_free_ char *path = NULL;
        char name[NAME_MAX_LEN + 1], desc[160];
        va_list ap;
        int r, ex = 0;

        r = acquire_bus();
        if (r < 0)
                return -r;
        r = pick_vm(argc, argv, name, sizeof(name));
        if (r != 0)
                return r;
        r = vm_path(name, &path, &ex);
        if (r < 0)
                return ex;
        r = sd_bus_message_new_method_call(bus, &call, BUS_NAME, path, BUS_VM_IFACE, method);
        if (r >= 0 && types) {
                va_start(ap, types);
                r = sd_bus_message_appendv(call, types, ap);
                va_end(ap);
        }
        if (r < 0) {
                fprintf(stderr, "dirtyrepctl: cannot build the call: %s\n", strerror(-r));
                return EXIT_FAILURE;
        }
        /* A checkpoint waits for a seal; failover may take a while: generous, but bounded. */
        r = sd_bus_call(bus, call, 60 * 1000 * 1000ULL, &e, ret_reply);
        if (r < 0) {
                snprintf(desc, sizeof(desc), "%s of VM '%.64s' failed", what, name);
                if (sd_bus_error_has_name(&e, "org.freedesktop.DBus.Error.UnknownMethod")) {
                        fprintf(stderr,
                                "dirtyrepctl: %s of VM '%s': this dirtyrepd has no %s.%s method (an older "
                                "or "
                                "partial version), so %s is not available\n",
                                what, name, BUS_VM_IFACE, method, what);
                        return EXIT_UNSUPPORTED;
                }
                return bus_error_exit(&e, r, desc);
        }
        if (ret_name)
                snprintf(ret_name, NAME_MAX_LEN + 1, "%s", name);
        return 0;
}

/* The daemon runs elsewhere: paths it is given must be absolute. */
static char *absolute_path(const char *p)
{
        char cwd[PATH_MAX], *ret = NULL;

        if (p[0] == '/')
                return strdup(p);
        if (!getcwd(cwd, sizeof(cwd)))
                return NULL;
        if (asprintf(&ret, "%s/%s", streq(cwd, "/") ? "" : cwd, p) < 0)
                return NULL;
        return ret;
}

static int checkpoint_image(int argc, char *argv[])
{
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        _cleanup_free_ char *dir = NULL, *parent = NULL;
        char name[NAME_MAX_LEN + 1];
        uint64_t epoch, pages, bytes, pause_ns;
        int r;

        dir = absolute_path(arg_image);
        parent = arg_parent ? absolute_path(arg_parent) : strdup("");
        if (!dir || !parent) {
                fprintf(stderr, "dirtyrepctl: %s\n", strerror(errno ?: ENOMEM));
                return EXIT_FAILURE;
        }
        r = call_vm(argc, argv, "CheckpointImage", "Checkpoint image", &reply, name, "ssb", dir, parent,
                    (int) !arg_raw);
        if (r != 0)
                return r;
        r = sd_bus_message_read(reply, "tttt", &epoch, &pages, &bytes, &pause_ns);
        if (r < 0) {
                fprintf(stderr, "dirtyrepctl: bad CheckpointImage reply: %s\n", strerror(-r));
                return EXIT_FAILURE;
        }
        if (arg_json)
                printf("{\"VM\": \"%s\", \"epoch\": %" PRIu64 ", \"image\": \"%s\", \"pages\": %" PRIu64
                       ", \"bytes\": %" PRIu64 ", \"pause_ns\": %" PRIu64 "}\n",
                       name, epoch, dir, pages, bytes, pause_ns);
        else
                printf("VM %s: image %s written at epoch %" PRIu64 " (%s, %" PRIu64 " pages stored, %" PRIu64
                       " bytes, seal pause %.3f ms)\n",
                       name, dir, epoch, arg_parent ? "incremental" : "full", pages, bytes,
                       (double) pause_ns / 1e6);
        return 0;
}

static int verb_checkpoint(int argc, char *argv[])
{
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        char name[NAME_MAX_LEN + 1];
        uint64_t epoch;
        int r;

        if (arg_parent && !arg_image) {
                fprintf(stderr, "dirtyrepctl: --parent only goes with --image\n");
                return EXIT_USAGE;
        }
        if (arg_image)
                return checkpoint_image(argc, argv);

        r = call_vm(argc, argv, "Checkpoint", "Checkpoint", &reply, name, NULL);
        if (r != 0)
                return r;
        r = sd_bus_message_read(reply, "t", &epoch);
        if (r < 0) {
                fprintf(stderr, "dirtyrepctl: bad Checkpoint reply: %s\n", strerror(-r));
                return EXIT_FAILURE;
        }
        if (arg_json)
                printf("{\"VM\": \"%s\", \"epoch\": %" PRIu64 "}\n", name, epoch);
        else
                printf("VM %s: sealed epoch %" PRIu64 "\n", name, epoch);
        return 0;
}

static int verb_attach(int argc, char *argv[])
{
        return call_vm(argc, argv, "Attach", "Attach", NULL, NULL, NULL);
}

static int verb_detach(int argc, char *argv[])
{
        return call_vm(argc, argv, "Detach", "Detach", NULL, NULL, NULL);
}

static int verb_resume(int argc, char *argv[])
{
        char name[NAME_MAX_LEN + 1];
        int r;

        r = call_vm(argc, argv, "Resume", "Resume", NULL, name, NULL);
        if (r != 0)
                return r;
        printf("VM %s: resumed; it runs UNPROTECTED until a standby syncs\n", name);
        return 0;
}

static int verb_failover(int argc, char *argv[])
{
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        char name[NAME_MAX_LEN + 1];
        const char *role = NULL;
        int r;

        r = call_vm(argc, argv, "Failover", "Failover", &reply, name, "b", (int) arg_force);
        if (r != 0)
                return r;
        if (sd_bus_message_read(reply, "s", &role) > 0)
                printf("VM %s: failover done, now %s\n", name, role);
        else
                printf("VM %s: failover done\n", name);
        return 0;
}

/* maintenance VM on|off: the standby down without the primary suspending, and back with a resync. */
static int verb_maintenance(int argc, char *argv[])
{
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        char name[NAME_MAX_LEN + 1];
        const char *state = NULL;
        bool on;
        int r;

        if (streq(argv[argc - 1], "on"))
                on = true;
        else if (streq(argv[argc - 1], "off"))
                on = false;
        else {
                fprintf(stderr, "dirtyrepctl: maintenance [VM] on|off, not '%s'\n", argv[argc - 1]);
                return EXIT_USAGE;
        }
        r = call_vm(argc - 1, argv, "Maintenance", "Maintenance", &reply, name, "b", (int) on);
        if (r != 0)
                return r;
        if (sd_bus_message_read(reply, "s", &state) <= 0)
                state = on ? "maintenance" : "standby";
        if (on)
                printf("VM %s: standby in maintenance: not replicating, the primary runs UNPROTECTED; "
                       "`dirtyrepctl maintenance %s off` brings it back with a resync\n",
                       name, name);
        else
                printf("VM %s: maintenance over, %s again; the primary resyncs it (see dirtyrepctl status "
                       "%s)\n",
                       name, state, name);
        return 0;
}

static int verb_reload(int argc, char *argv[])
{
        _cleanup_(sd_bus_error_free) sd_bus_error e = SD_BUS_ERROR_NULL;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        uint32_t added, removed, changed, unchanged;
        int r;

        r = acquire_bus();
        if (r < 0)
                return -r;
        r = sd_bus_call_method(bus, BUS_NAME, BUS_MANAGER_PATH, BUS_MANAGER_IFACE, "Reload", &e, &reply,
                               NULL);
        if (r < 0)
                return bus_error_exit(&e, r, "Reload failed");
        r = sd_bus_message_read(reply, "uuuu", &added, &removed, &changed, &unchanged);
        if (r < 0) {
                fprintf(stderr, "dirtyrepctl: bad Reload reply: %s\n", strerror(-r));
                return EXIT_FAILURE;
        }
        printf("Reloaded: %u added, %u removed, %u restarted with a new configuration, %u unchanged\n",
               added, removed, changed, unchanged);
        return 0;
}

static int verb_version(int argc, char *argv[])
{
        _cleanup_(sd_bus_error_free) sd_bus_error e = SD_BUS_ERROR_NULL;
        _cleanup_free_ char *version = NULL;
        int r;

        printf("dirtyrepctl %s\n", DIRTYREP_VERSION);
        r = acquire_bus();
        if (r < 0)
                return -r;
        r = sd_bus_get_property_string(bus, BUS_NAME, BUS_MANAGER_PATH, BUS_MANAGER_IFACE, "Version", &e,
                                       &version);
        if (r < 0)
                return bus_error_exit(&e, r, "Failed to ask dirtyrepd for its version");
        printf("dirtyrepd %s\n", version);
        return 0;
}

/* ---------------------------------------------------------------------- */
/* Main */

typedef struct Verb {
        const char *name;
        int min_args, max_args; /* not counting the verb; -1: any */
        int (*run)(int argc, char *argv[]);
        bool raw; /* gets its arguments unparsed (options included) */
} Verb;

static const Verb verbs[] = {
        {"status", 0, 1, verb_status},           {"list", 0, 0, verb_list},
        {"checkpoint", 0, 1, verb_checkpoint},   {"attach", 1, 1, verb_attach},
        {"detach", 1, 1, verb_detach},           {"failover", 0, 1, verb_failover},
        {"resume", 1, 1, verb_resume},           {"reload", 0, 0, verb_reload},
        {"events", 0, 0, verb_events},           {"version", 0, 0, verb_version},
        {"metrics", 0, 1, verb_metrics},         {"image", 1, -1, verb_image, true},
        {"maintenance", 1, 2, verb_maintenance},
};

static void help(void)
{
        printf("Usage: dirtyrepctl [OPTIONS] COMMAND ...\n\n"
               "Query and control dirtyrepd, the KVM VM replication daemon.\n\n"
               "Commands:\n"
               "  status [VM]            Show the replication status of one or all VMs\n"
               "  list                   List the VMs with their role and state\n"
               "  checkpoint [VM]        Seal an epoch now (primary) and print its number;\n"
               "                         with --image DIR [--parent DIR]: a checkpoint image at that seal\n"
               "  image show|verify DIR  Decode a checkpoint image, or check it and its parents\n"
               "  attach VM              Start the VM's role (after detach)\n"
               "  detach VM              Stop the VM's role; the daemon keeps its configuration\n"
               "  failover [VM]          Promote a standby or demote a primary (--force: even when unsafe)\n"
               "  resume VM              Release a suspended or held primary: it runs UNPROTECTED\n"
               "                         (only when no other host serves the VM)\n"
               "  maintenance [VM] on|off  Standby host: stop replicating without suspending the primary\n"
               "                         (it runs unprotected), then resume with a resync\n"
               "  reload                 Re-read the configuration (changed VMs restart, others untouched)\n"
               "  events                 Follow state changes as they happen (--json: one object a\n"
               "                         line, timestamped, after a dump of the current state)\n"
               "  metrics [FILE]         Metrics in the Prometheus text format (FILE: written\n"
               "                         atomically, for node_exporter's textfile collector)\n"
               "  version                Show the client's and the daemon's version\n\n"
               "Options:\n"
               "  -h --help              Show this help\n"
               "     --json              Machine-readable output (status, list, checkpoint, events)\n"
               "     --no-legend         No header or footer (list)\n"
               "     --force             failover: also when the daemon considers it unsafe\n"
               "     --image DIR         checkpoint: write a checkpoint image into DIR (must not exist)\n"
               "     --parent DIR        checkpoint --image: incremental on DIR (the last image taken)\n"
               "     --raw               checkpoint --image: no LZ4\n"
               "  -n --count N           events: stop after N events\n"
               "     --bus-address ADDR  Talk to dirtyrepd on this bus (default: $DIRTYREP_BUS_ADDRESS,\n"
               "                         else the system bus, $DBUS_SYSTEM_BUS_ADDRESS honoured)\n\n"
               "A VM may be left out when dirtyrepd serves exactly one. status exits 0 when every VM\n"
               "is protected, 10 unprotected, 11 suspended, 12 failed; see dirtyrepctl(1) for all exit "
               "codes.\n");
}

/*
 * Options are accepted before and after the verb (both parsed here), except
 * for raw verbs, whose arguments are theirs. Returns the index of the verb
 * in argv (or argc), or -EXIT_USAGE; 0 means "exit 0" (--help).
 */
static int parse_options(int argc, char *argv[], bool *ret_help)
{
        enum {
                ARG_JSON = 0x100,
                ARG_FORCE,
                ARG_BUS_ADDRESS,
                ARG_NO_LEGEND,
                ARG_VERSION,
                ARG_IMAGE,
                ARG_PARENT,
                ARG_RAW
        };
        static const struct option opts[] = {{"help", no_argument, NULL, 'h'},
                                             {"version", no_argument, NULL, ARG_VERSION},
                                             {"json", no_argument, NULL, ARG_JSON},
                                             {"no-legend", no_argument, NULL, ARG_NO_LEGEND},
                                             {"force", no_argument, NULL, ARG_FORCE},
                                             {"count", required_argument, NULL, 'n'},
                                             {"bus-address", required_argument, NULL, ARG_BUS_ADDRESS},
                                             {"image", required_argument, NULL, ARG_IMAGE},
                                             {"parent", required_argument, NULL, ARG_PARENT},
                                             {"raw", no_argument, NULL, ARG_RAW},
                                             {}};
        int c;

        optind = 0;
        /* "+": stop at the first non-option (the verb), so a raw verb's options stay its own. */
        while ((c = getopt_long(argc, argv, "+hn:", opts, NULL)) >= 0)
                switch (c) {
                case 'h':
                        *ret_help = true;
                        break;
                case ARG_VERSION:
                        printf("dirtyrepctl %s\n", DIRTYREP_VERSION);
                        exit(EXIT_SUCCESS);
                case ARG_JSON:
                        arg_json = true;
                        break;
                case ARG_NO_LEGEND:
                        arg_legend = false;
                        break;
                case ARG_FORCE:
                        arg_force = true;
                        break;
                case ARG_IMAGE:
                case ARG_PARENT:
                        if (!*optarg || strlen(optarg) >= PATH_MAX) {
                                fprintf(stderr, "dirtyrepctl: --%s needs a directory path\n",
                                        c == ARG_IMAGE ? "image" : "parent");
                                return -EXIT_USAGE;
                        }
                        *(c == ARG_IMAGE ? &arg_image : &arg_parent) = optarg;
                        break;
                case ARG_RAW:
                        arg_raw = true;
                        break;
                case 'n': {
                        char *end;
                        errno = 0;
                        arg_count = strtoull(optarg, &end, 10);
                        if (errno || *end || optarg[0] == '-' || !*optarg) {
                                fprintf(stderr, "dirtyrepctl: --count needs a number, not '%s'\n", optarg);
                                return -EXIT_USAGE;
                        }
                        break;
                }
                case ARG_BUS_ADDRESS:
                        if (strlen(optarg) > 4096) {
                                fprintf(stderr, "dirtyrepctl: --bus-address is too long\n");
                                return -EXIT_USAGE;
                        }
                        arg_bus_address = optarg;
                        break;
                default:
                        return -EXIT_USAGE;
                }
        return optind;
}

int main(int argc, char *argv[])
{
        const Verb *verb = NULL;
        char *args[8];
        int nargs = 0, i, r;
        bool want_help = false;

        r = parse_options(argc, argv, &want_help);
        if (r < 0)
                return -r;
        if (want_help) {
                help();
                return 0;
        }
        i = r;
        if (i >= argc) {
                /* Like timedatectl: no verb means status. */
                static char status[] = "status";
                char *sargv[] = {status, NULL};
                return verb_status(1, sargv);
        }
        for (size_t k = 0; k < ELEMENTSOF(verbs); k++)
                if (streq(verbs[k].name, argv[i]))
                        verb = &verbs[k];
        if (!verb) {
                fprintf(stderr, "dirtyrepctl: unknown command '%s' (see --help)\n", argv[i]);
                return EXIT_USAGE;
        }
        if (verb->raw) {
                r = verb->run(argc - i, argv + i);
                return r < 0 ? EXIT_FAILURE : r;
        }

        /* The verb's words and options may be mixed: options anywhere after it too. */
        args[nargs++] = argv[i++];
        while (i < argc) {
                int sub_argc = argc - i + 1, consumed;
                char **sub = argv + i - 1; /* sub[0] is a placeholder for getopt */

                r = parse_options(sub_argc, sub, &want_help);
                if (r < 0)
                        return -r;
                consumed = r - 1;
                i += consumed;
                if (i < argc) {
                        if (nargs >= (int) ELEMENTSOF(args) - 1) {
                                fprintf(stderr, "dirtyrepctl: %s: too many arguments\n", verb->name);
                                return EXIT_USAGE;
                        }
                        args[nargs++] = argv[i++];
                }
        }
        args[nargs] = NULL;
        if (want_help) {
                help();
                return 0;
        }
        if (nargs - 1 < verb->min_args || (verb->max_args >= 0 && nargs - 1 > verb->max_args)) {
                fprintf(stderr, "dirtyrepctl: %s takes %s%d argument(s), got %d (see --help)\n", verb->name,
                        verb->min_args == verb->max_args ? "" : "at most ", verb->max_args, nargs - 1);
                return EXIT_USAGE;
        }
        if (nargs >= 2 && strlen(args[1]) > NAME_MAX_LEN) {
                fprintf(stderr, "dirtyrepctl: no VM name is longer than %d characters\n", NAME_MAX_LEN);
                return EXIT_NO_SUCH_VM;
        }
        r = verb->run(nargs, args);
        bus = sd_bus_flush_close_unref(bus);
        return r;
}

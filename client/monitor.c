/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * dirtyrepctl's monitoring verbs, events and metrics (monitor.h): what a
 * person or a monitoring system watches, on top of the bus connection and
 * VM properties of client/dirtyrepctl.c (dirtyrepctl.h).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <systemd/sd-bus.h>
#include <systemd/sd-event.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "dirtyrepctl.h"
#include "macros.h"
#include "monitor.h"

/* events */

typedef struct EventsState {
        uint64_t seen;
        sd_event *event;
} EventsState;

static void print_timestamp(void)
{
        struct timespec ts;
        struct tm tm;
        char buf[32];

        clock_gettime(CLOCK_REALTIME, &ts);
        localtime_r(&ts.tv_sec, &tm);
        strftime(buf, sizeof(buf), "%H:%M:%S", &tm);
        printf("%s.%03ld ", buf, ts.tv_nsec / 1000000);
}

/* "timestamp" (RFC 3339, UTC, microseconds) and "realtime_usec" of an event line, for --json. */
static void print_json_timestamp(void)
{
        struct timespec ts;
        struct tm tm;
        char buf[32];

        clock_gettime(CLOCK_REALTIME, &ts);
        gmtime_r(&ts.tv_sec, &tm);
        strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%S", &tm);
        printf("{\"timestamp\": \"%s.%06ldZ\", \"realtime_usec\": %" PRIu64, buf, ts.tv_nsec / 1000,
               (uint64_t) ((uint64_t) ts.tv_sec * 1000000U + (uint64_t) ts.tv_nsec / 1000U));
}

static void event_seen(EventsState *s)
{
        fflush(stdout);
        if (arg_count > 0 && ++s->seen >= arg_count)
                (void) sd_event_exit(s->event, 0);
}

static int on_properties_changed(sd_bus_message *m, void *userdata, sd_bus_error *error)
{
        EventsState *s = userdata;
        _cleanup_free_ char *name = NULL;
        VmInfo v = {};
        const char *iface;
        int r;

        if (sd_bus_path_decode(sd_bus_message_get_path(m), BUS_VM_PREFIX, &name) <= 0)
                return 0;
        r = sd_bus_message_read(m, "s", &iface);
        if (r < 0 || !streq(iface, BUS_VM_IFACE))
                return 0;
        r = read_props(m, &v);
        if (r < 0)
                return 0;
        if (arg_json) {
                print_json_timestamp();
                printf(", \"event\": \"changed\", \"VM\": ");
                json_string(stdout, name);
                print_json_props(&v);
                printf("}\n");
        } else {
                print_timestamp();
                printf("%s:", name);
                for (size_t i = 0; i < v.n_props; i++) {
                        const Prop *p = &v.props[i];
                        switch (p->type) {
                        case 's':
                                printf(" %s=%s", p->name, p->s ? p->s : "");
                                break;
                        case 'b':
                                printf(" %s=%s", p->name, p->b ? "yes" : "no");
                                break;
                        case 't':
                        case 'u':
                                printf(" %s=%" PRIu64, p->name, p->u);
                                break;
                        case 'd':
                                printf(" %s=%.3f", p->name, p->d);
                                break;
                        }
                }
                printf("\n");
        }
        vm_info_done(&v);
        event_seen(s);
        return 0;
}

static int on_interfaces(sd_bus_message *m, void *userdata, sd_bus_error *error)
{
        EventsState *s = userdata;
        _cleanup_free_ char *name = NULL;
        const char *path;
        bool added = streq(sd_bus_message_get_member(m), "InterfacesAdded");

        if (sd_bus_message_read(m, "o", &path) < 0 || sd_bus_path_decode(path, BUS_VM_PREFIX, &name) <= 0)
                return 0;
        if (arg_json) {
                print_json_timestamp();
                printf(", \"event\": \"%s\", \"VM\": ", added ? "added" : "removed");
                json_string(stdout, name);
                printf("}\n");
        } else {
                print_timestamp();
                printf("%s: %s\n", name, added ? "added" : "removed");
        }
        event_seen(s);
        return 0;
}

static int on_owner_changed(sd_bus_message *m, void *userdata, sd_bus_error *error)
{
        EventsState *s = userdata;
        const char *name, *old_owner, *new_owner;

        if (sd_bus_message_read(m, "sss", &name, &old_owner, &new_owner) < 0 || !streq(name, BUS_NAME))
                return 0;
        if (arg_json) {
                print_json_timestamp();
                printf(", \"event\": \"daemon\", \"daemon\": \"%s\"}\n", *new_owner ? "appeared" : "left");
        } else {
                print_timestamp();
                printf("dirtyrepd %s\n", *new_owner ? "appeared on the bus" : "left the bus");
        }
        event_seen(s);
        return 0;
}

int verb_events(int argc, char *argv[])
{
        _cleanup_(sd_event_unrefp) sd_event *event = NULL;
        EventsState s = {};
        sigset_t mask;
        int r;

        r = acquire_bus();
        if (r < 0)
                return -r;
        r = sd_event_default(&event);
        if (r < 0) {
                fprintf(stderr, "dirtyrepctl: cannot create an event loop: %s\n", strerror(-r));
                return EXIT_FAILURE;
        }
        s.event = event;
        sigemptyset(&mask);
        sigaddset(&mask, SIGINT);
        sigaddset(&mask, SIGTERM);
        (void) sigprocmask(SIG_BLOCK, &mask, NULL);
        (void) sd_event_add_signal(event, NULL, SIGINT, NULL, NULL);
        (void) sd_event_add_signal(event, NULL, SIGTERM, NULL, NULL);

        r = sd_bus_match_signal(bus, NULL, BUS_NAME, NULL, "org.freedesktop.DBus.Properties",
                                "PropertiesChanged", on_properties_changed, &s);
        if (r >= 0)
                r = sd_bus_match_signal(bus, NULL, BUS_NAME, BUS_MANAGER_PATH,
                                        "org.freedesktop.DBus.ObjectManager", "InterfacesAdded",
                                        on_interfaces, &s);
        if (r >= 0)
                r = sd_bus_match_signal(bus, NULL, BUS_NAME, BUS_MANAGER_PATH,
                                        "org.freedesktop.DBus.ObjectManager", "InterfacesRemoved",
                                        on_interfaces, &s);
        if (r >= 0)
                r = sd_bus_match_signal(bus, NULL, "org.freedesktop.DBus", "/org/freedesktop/DBus",
                                        "org.freedesktop.DBus", "NameOwnerChanged", on_owner_changed, &s);
        if (r < 0) {
                fprintf(stderr, "dirtyrepctl: cannot subscribe to dirtyrepd's signals: %s\n", strerror(-r));
                return EXIT_FAILURE;
        }
        r = sd_bus_attach_event(bus, event, 0);
        if (r < 0) {
                fprintf(stderr, "dirtyrepctl: cannot attach the bus: %s\n", strerror(-r));
                return EXIT_FAILURE;
        }
        if (!arg_json)
                fprintf(stderr, "Following dirtyrepd's events (Ctrl-C to stop)...\n");
        else {
                /* Like `drbdsetup events2 --now`: the state of every VM first ("event": "exists"),
                 * read after the matches are installed so no change falls in between, then a
                 * "dump-done" line; --count counts only what follows it. */
                VmList l = {};
                if (list_vms(&l) == 0) {
                        for (size_t i = 0; i < l.n; i++) {
                                VmInfo v = {};
                                if (get_vm_info(l.names[i], &v) != 0)
                                        continue;
                                print_json_timestamp();
                                printf(", \"event\": \"exists\", \"VM\": ");
                                json_string(stdout, v.name);
                                print_json_props(&v);
                                printf("}\n");
                                vm_info_done(&v);
                        }
                        vm_list_done(&l);
                } else {
                        print_json_timestamp();
                        printf(", \"event\": \"daemon\", \"daemon\": \"absent\"}\n");
                }
                print_json_timestamp();
                printf(", \"event\": \"dump-done\"}\n");
                fflush(stdout);
        }
        /* Matches are installed now: a test can start causing events once this line is out. */
        fflush(stderr);
        r = sd_event_loop(event);
        (void) sd_bus_detach_event(bus);
        return r < 0 ? EXIT_FAILURE : 0;
}

/* ---------------------------------------------------------------------- */
/* metrics: the Prometheus text format (version 0.0.4) */

typedef enum MetricKind { M_U, M_D, M_B, M_NS, M_US } MetricKind;

static const struct Metric {
        const char *name, *type, *help, *prop;
        MetricKind kind;
} metrics[] = {
        {"dirtyrep_vm_protected", "gauge", "1 when the VM's epochs commit on the standby (state protected).",
         "Protected", M_B},
        {"dirtyrep_vm_link_up", "gauge", "1 when the replication link is up.", "LinkUp", M_B},
        {"dirtyrep_vm_last_sealed_epoch", "gauge", "Last epoch the primary sealed.", "LastSealed", M_U},
        {"dirtyrep_vm_last_committed_epoch", "gauge",
         "Primary: last epoch the standby acknowledged; standby: last epoch applied.", "LastCommitted", M_U},
        {"dirtyrep_vm_lag_epochs", "gauge", "Sealed epochs not yet acknowledged (primary).", "Lag", M_U},
        {"dirtyrep_vm_inflight_epochs", "gauge", "Epochs sealed and not yet acknowledged.", "InflightEpochs",
         M_U},
        {"dirtyrep_vm_epochs_committed_total", "counter", "Epochs committed since the role started.",
         "EpochsCommitted", M_U},
        {"dirtyrep_vm_full_syncs_total", "counter", "Full syncs started since the role started.",
         "FullSyncs", M_U},
        {"dirtyrep_vm_incremental_syncs_total", "counter", "Incremental resyncs since the role started.",
         "IncrementalSyncs", M_U},
        {"dirtyrep_vm_pause_p50_seconds", "gauge", "Median epoch seal pause (recent window).",
         "PauseNSecP50", M_NS},
        {"dirtyrep_vm_pause_p99_seconds", "gauge", "99th percentile epoch seal pause (recent window).",
         "PauseNSecP99", M_NS},
        {"dirtyrep_vm_pause_max_seconds", "gauge", "Longest epoch seal pause (recent window).",
         "PauseNSecMax", M_NS},
        {"dirtyrep_vm_guest_pause_p99_seconds", "gauge",
         "99th percentile of the pause as the agent saw the vCPUs stopped (0: not reported).",
         "VmPauseNSecP99", M_NS},
        {"dirtyrep_vm_dirty_pages_per_second", "gauge", "Pages dirtied per second, last epoch.",
         "DirtyPagesPerSec", M_D},
        {"dirtyrep_vm_pages_last_epoch", "gauge", "Distinct pages in the last epoch.", "PagesLastEpoch",
         M_U},
        {"dirtyrep_vm_sent_bytes_total", "counter", "Bytes sent on the replication link.", "BytesSent", M_U},
        {"dirtyrep_vm_received_bytes_total", "counter", "Bytes received on the replication link.",
         "BytesReceived", M_U},
        {"dirtyrep_vm_compression_ratio", "gauge", "Page bytes per byte on the wire.", "CompressionRatio",
         M_D},
        {"dirtyrep_vm_staging_bytes", "gauge", "Memory held for epochs not yet acknowledged or committed.",
         "StagingBytes", M_U},
        {"dirtyrep_vm_full_sync_done_bytes", "gauge",
         "Running full sync: RAM sent so far (0: none running).", "SyncBytesDone", M_U},
        {"dirtyrep_vm_full_sync_total_bytes", "gauge", "Running full sync: all of RAM (0: none running).",
         "SyncBytesTotal", M_U},
        {"dirtyrep_vm_last_sync_seconds", "gauge", "Duration of the last completed resync, to its ACK.",
         "LastSyncUSec", M_US},
        {"dirtyrep_vm_failovers_total", "counter", "Failovers that got the guest running on this host.",
         "Failovers", M_U},
};

/* A label value: backslash, double quote and newline escaped (the text format's rule). */
static void metric_label(FILE *f, const char *s)
{
        for (; *s; s++) {
                if (*s == '\\' || *s == '"')
                        fprintf(f, "\\%c", *s);
                else if (*s == '\n')
                        fputs("\\n", f);
                else
                        fputc(*s, f);
        }
}

static void metric_head(FILE *f, const char *name, const char *type, const char *help)
{
        fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void metrics_write(FILE *f, const VmInfo *infos, size_t n, bool up)
{
        metric_head(f, "dirtyrep_up", "gauge", "1 when dirtyrepd answered on the bus.");
        fprintf(f, "dirtyrep_up %d\n", up ? 1 : 0);
        if (!up)
                return;
        metric_head(f, "dirtyrep_vm_info", "gauge", "The VM's role and state (value always 1).");
        for (size_t i = 0; i < n; i++) {
                fputs("dirtyrep_vm_info{vm=\"", f);
                metric_label(f, infos[i].name);
                fputs("\",role=\"", f);
                metric_label(f, prop_s(&infos[i], "Role"));
                fputs("\",state=\"", f);
                metric_label(f, prop_s(&infos[i], "State"));
                fputs("\"} 1\n", f);
        }
        metric_head(
                f, "dirtyrep_vm_status", "gauge",
                "dirtyrepctl status's exit code for the VM: 0 protected, 10 unprotected, 11 suspended, 12 "
                "failed.");
        for (size_t i = 0; i < n; i++) {
                fputs("dirtyrep_vm_status{vm=\"", f);
                metric_label(f, infos[i].name);
                fprintf(f, "\"} %d\n", vm_status_exit(&infos[i]));
        }
        metric_head(f, "dirtyrep_vm_service_address_held", "gauge",
                    "1 when this host holds the VM's service address (0 also when none is configured).");
        for (size_t i = 0; i < n; i++) {
                fputs("dirtyrep_vm_service_address_held{vm=\"", f);
                metric_label(f, infos[i].name);
                fprintf(f, "\"} %d\n", streq(prop_s(&infos[i], "ServiceAddressState"), "held"));
        }
        for (size_t k = 0; k < ELEMENTSOF(metrics); k++) {
                const struct Metric *m = &metrics[k];
                metric_head(f, m->name, m->type, m->help);
                for (size_t i = 0; i < n; i++) {
                        const Prop *p = prop(&infos[i], m->prop);
                        if (!p)
                                continue; /* an older daemon without it: no sample, not a made-up 0 */
                        fprintf(f, "%s{vm=\"", m->name);
                        metric_label(f, infos[i].name);
                        fputs("\"} ", f);
                        switch (m->kind) {
                        case M_U:
                                fprintf(f, "%" PRIu64 "\n", prop_u(&infos[i], m->prop));
                                break;
                        case M_B:
                                fprintf(f, "%d\n", prop_b(&infos[i], m->prop) ? 1 : 0);
                                break;
                        case M_D: {
                                double d = prop_d(&infos[i], m->prop);
                                if (d != d)
                                        fputs("NaN\n", f);
                                else
                                        fprintf(f, "%.6g\n", d);
                                break;
                        }
                        case M_NS:
                                fprintf(f, "%.9f\n", (double) prop_u(&infos[i], m->prop) / 1e9);
                                break;
                        case M_US:
                                fprintf(f, "%.6f\n", (double) prop_u(&infos[i], m->prop) / 1e6);
                                break;
                        }
                }
        }
}

/* With a FILE: written next to it and renamed over it, as node_exporter's textfile collector needs. */
static int metrics_output(const char *path, const VmInfo *infos, size_t n, bool up)
{
        char tmp[PATH_MAX];
        FILE *f;
        int fd;

        if (!path) {
                metrics_write(stdout, infos, n, up);
                return fflush(stdout) == 0 ? 0 : -errno;
        }
        if (snprintf(tmp, sizeof(tmp), "%s.XXXXXX", path) >= (int) sizeof(tmp))
                return -ENAMETOOLONG;
        fd = mkostemp(tmp, O_CLOEXEC);
        if (fd < 0)
                return -errno;
        (void) fchmod(fd, 0644);
        f = fdopen(fd, "w");
        if (!f) {
                close(fd);
                (void) unlink(tmp);
                return -errno;
        }
        metrics_write(f, infos, n, up);
        if (fflush(f) != 0 || fsync(fileno(f)) < 0 || fclose(f) != 0) {
                (void) unlink(tmp);
                return -EIO;
        }
        if (rename(tmp, path) < 0) {
                int r = -errno;
                (void) unlink(tmp);
                return r;
        }
        return 0;
}

int verb_metrics(int argc, char *argv[])
{
        const char *path = argc >= 2 ? argv[1] : NULL;
        VmList l = {};
        VmInfo *infos = NULL;
        size_t n = 0;
        int r, ret = 0;

        if (path && (path[0] != '/' || strlen(path) >= PATH_MAX - 8)) {
                fprintf(stderr, "dirtyrepctl: metrics: FILE must be an absolute path\n");
                return EXIT_USAGE;
        }
        r = acquire_bus();
        if (r == 0)
                ret = list_vms(&l);
        else
                ret = -r;
        if (ret == 0) {
                infos = calloc(l.n ? l.n : 1, sizeof(VmInfo));
                if (!infos)
                        ret = EXIT_FAILURE;
                for (size_t i = 0; ret == 0 && i < l.n; i++) {
                        ret = get_vm_info(l.names[i], &infos[n]);
                        if (ret == 0)
                                n++;
                        else if (ret == EXIT_NO_SUCH_VM)
                                ret = 0; /* removed by a reload in between */
                }
        }
        /* An unreachable daemon is a metric too (dirtyrep_up 0), and still an error. */
        r = metrics_output(path, infos, n, ret == 0);
        if (r < 0) {
                fprintf(stderr, "dirtyrepctl: metrics: cannot write %s: %s\n", path ? path : "stdout",
                        strerror(-r));
                if (ret == 0)
                        ret = EXIT_FAILURE;
        }
        for (size_t i = 0; i < n; i++)
                vm_info_done(&infos[i]);
        free(infos);
        vm_list_done(&l);
        return ret;
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * dirtyrepd: one sd-event loop, many VMs, each either primary (attached to
 * its VMM, streaming epochs) or standby (holding a replica). See
 * docs/architecture.md and dirtyrepd(8).
 *
 * A VM that cannot be set up (bad secret file, address in use, ...) is
 * logged and marked failed; the daemon keeps serving the others.
 *
 * --debug-socket PATH serves a root-only (0600) diagnostic socket with a
 * line protocol, used by the integration tests and for field diagnosis
 * (daemon/debug.c, its requests in daemon/debug-request.h).
 */
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <systemd/sd-daemon.h>
#include <systemd/sd-event.h>
#include <unistd.h>

#include "bus.h"
#include "caps.h"
#include "check.h"
#include "config.h"
#include "debug.h"
#include "dirtyrep-build.h"
#include "journal.h"
#include "log.h"
#include "macros.h"
#include "manager.h"
#include "role.h"
#include "util.h"

/* The daemon: the manager plus the debug socket. */
typedef struct Daemon {
        Manager manager;
        DebugServer *debug;
} Daemon;

static const char *arg_config = SYSCONFDIR "/dirtyrep/dirtyrep.conf";
static const char *arg_config_dir = SYSCONFDIR "/dirtyrep/vm.d";
static const char *arg_debug_socket;
static bool arg_keep_capabilities;
static bool arg_check_config;
typedef enum SandboxMode { SANDBOX_AUTO, SANDBOX_UNIT, SANDBOX_NONE } SandboxMode;
static SandboxMode arg_sandbox = SANDBOX_AUTO;
typedef enum BusMode { BUS_AUTO, BUS_SYSTEM, BUS_NONE } BusMode;
static BusMode arg_bus = BUS_AUTO;
static const char *arg_bus_address;
static CliVm *arg_vms;
static size_t arg_n_vms;

static void daemon_done(Daemon *d)
{
        manager_done(&d->manager);
        d->debug = debug_server_free(d->debug);
        d->manager.event = sd_event_unref(d->manager.event);
        for (size_t i = 0; i < arg_n_vms; i++)
                for (size_t j = 0; j < arg_vms[i].n_settings; j++)
                        free(arg_vms[i].settings[j]);
        free(arg_vms);
}

/* Logs a multi-line error report one line at a time (log records are bounded). */
static void log_error_lines(const char *text)
{
        _cleanup_free_ char *copy = strdup(text ? text : "");
        char *save = NULL;

        if (!copy)
                return;
        for (char *l = strtok_r(copy, "\n", &save); l; l = strtok_r(NULL, "\n", &save))
                log_error("%s", l);
}

/*
 * Whether paths are checked against dirtyrep.service's sandbox: asked for,
 * or (auto) the configuration is the one the unit reads (the default files,
 * nothing from the command line), or this process was started by systemd.
 */
static bool sandbox_applies(void)
{
        if (arg_sandbox != SANDBOX_AUTO)
                return arg_sandbox == SANDBOX_UNIT;
        if (getenv("INVOCATION_ID"))
                return true;
        return arg_n_vms == 0 && arg_config && arg_config_dir &&
               streq(arg_config, SYSCONFDIR "/dirtyrep/dirtyrep.conf") &&
               streq(arg_config_dir, SYSCONFDIR "/dirtyrep/vm.d");
}

/* --check-config: the parser's checks passed; now the ones that need the system. Exit status. */
static int check_config(const Config *config)
{
        _cleanup_free_ char *sandbox_errors = NULL, *system_errors = NULL;
        int r, ret = 0;

        if (sandbox_applies()) {
                r = config_check_sandbox(config, &sandbox_errors);
                if (r < 0) {
                        log_error_lines(sandbox_errors ? sandbox_errors : strerror(-r));
                        ret = 1;
                }
        }
        r = check_config_system(config, &system_errors);
        if (r < 0) {
                log_error_lines(system_errors ? system_errors : strerror(-r));
                ret = 1;
        }
        if (ret != 0) {
                log_error("Configuration is invalid (%s, %s/*.conf%s): the daemon would start, but these "
                          "would "
                          "fail a VM or its failover",
                          arg_config ?: "no main file", arg_config_dir ?: "no VM directory",
                          arg_n_vms > 0 ? ", command line" : "");
                return ret;
        }
        printf("Configuration OK: %zu VM(s)%s\n", config->n_vms,
               sandbox_applies() ? ", paths fit dirtyrep.service's sandbox" : "");
        for (size_t i = 0; i < config->n_vms; i++)
                printf("  %s: %s (%s)\n", config->vms[i]->name, vm_role_to_string(config->vms[i]->role),
                       config->vms[i]->path);
        return 0;
}

/* At start-up the same checks only warn: the VMs start anyway, the journal says what would fail. */
static void check_config_at_start(const Config *config)
{
        _cleanup_free_ char *errors = NULL;
        _cleanup_free_ char *copy = NULL;
        char *save = NULL;

        if (getenv("INVOCATION_ID") && config_check_sandbox(config, &errors) < 0 && errors) {
                copy = TAKE_PTR(errors);
                for (char *l = strtok_r(copy, "\n", &save); l; l = strtok_r(NULL, "\n", &save))
                        log_warning("%s", l);
                copy = mfree(copy);
        }
        /* A standby's VMM check: it is what its failover would run. */
        for (size_t i = 0; i < config->n_vms; i++)
                check_log_standby(config->vms[i]);
}

/*
 * One dirtyrepd per runtime directory: a second one (same configuration,
 * by mistake) would fight over addresses, sockets and the bus name, and on
 * its way out remove what the first one holds. The lock is taken before
 * anything is touched; a loser exits without touching anything. The fd
 * stays open (and locked) for the life of the process; the file is never
 * removed (removing it would let a third daemon lock a new inode).
 */
static int lock_fd = -EBADF;

static int take_instance_lock(const char *runtime_directory)
{
        _cleanup_free_ char *path = NULL;
        char pid[32] = "";
        int fd, r;

        if (asprintf(&path, "%s/dirtyrepd.lock", runtime_directory) < 0)
                return log_oom();
        if (mkdir(runtime_directory, 0755) < 0 && errno != EEXIST)
                return log_error_errno(-errno, "Cannot create RuntimeDirectory=%s: %m", runtime_directory);
        fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOCTTY | O_NOFOLLOW, 0644);
        if (fd < 0)
                return log_error_errno(-errno, "Cannot open the instance lock %s: %m", path);
        if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
                r = -errno;
                if (r == -EWOULDBLOCK) {
                        char who[48] = "";
                        ssize_t k = pread(fd, pid, sizeof(pid) - 1, 0);
                        pid[k > 0 ? k : 0] = 0;
                        pid[strspn(pid, "0123456789")] = 0;
                        if (pid[0])
                                snprintf(who, sizeof(who), " (PID %s)", pid);
                        safe_close(fd);
                        return log_struct_internal(
                                LOG_ERR, -EBUSY, __FILE__, __LINE__, __func__, DR_MESSAGE_ALREADY_RUNNING,
                                NULL, 0,
                                "Another dirtyrepd%s is running with RuntimeDirectory=%s (it "
                                "holds %s). This one exits without touching anything. Use "
                                "dirtyrepctl to talk to it, or stop it first (systemctl stop "
                                "dirtyrep).",
                                who, runtime_directory, path);
                }
                safe_close(fd);
                return log_error_errno(r, "Cannot lock %s: %m", path);
        }
        snprintf(pid, sizeof(pid), "%d\n", (int) getpid());
        if (ftruncate(fd, 0) < 0 || pwrite(fd, pid, strlen(pid), 0) < 0)
                log_warning("Cannot write the PID into %s: %s", path, strerror(errno));
        lock_fd = fd;
        return 0;
}

static void help(void)
{
        printf("Usage: dirtyrepd [OPTIONS] [--vm NAME VM-OPTIONS]...\n\n"
               "Replicates KVM virtual machines to a standby host.\n\n"
               "  -h --help                   Show this help\n"
               "     --version                Show the version\n"
               "  -c --config FILE            Main configuration (default %s; \"\" for none)\n"
               "  -d --config-dir DIR         Per-VM configuration files (default %s; \"\" for none)\n"
               "     --check-config           Validate the configuration and exit (also reads the secret\n"
               "                              files and asks the VMM to --check VmmArgs=)\n"
               "     --sandbox=auto|unit|none With --check-config: check paths against dirtyrep.service's\n"
               "                              sandbox (auto: for the default configuration files)\n"
               "     --bus=auto|system|none   D-Bus API on the system bus: auto (default) runs without it\n"
               "                              when there is no bus, system requires it\n"
               "     --bus-address=ADDRESS    Serve the D-Bus API on this bus instead (required)\n"
               "     --debug-socket PATH      Serve the diagnostic socket (root only)\n"
               "     --keep-capabilities      As root, keep the capability bounding set (children such as\n"
               "                              FenceCommand= may need more than dirtyrepd itself)\n"
               "\nA VM from the command line (options after --vm NAME apply to that VM and override\n"
               "its file vm.d/NAME.conf, if any; they are checked like the file's keys):\n"
               "     --vm NAME                Define or override VM NAME\n"
               "     --role primary|standby   Role=\n"
               "     --control-socket PATH    ControlSocket=\n"
               "     --peer ADDRESS:PORT      Peer=\n"
               "     --listen ADDRESS:PORT    Listen=\n"
               "     --epoch-ms MS            EpochMs=\n"
               "     --tracking auto|ring|bitmap  Tracking=\n"
               "     --secret-file PATH       SecretFile=\n"
               "     --max-inflight-epochs N  MaxInflightEpochs=\n"
               "     --compression lz4|none   Compression=\n"
               "     --set KEY=VALUE          Any other key of the [VM] section\n",
               SYSCONFDIR "/dirtyrep/dirtyrep.conf", SYSCONFDIR "/dirtyrep/vm.d");
}

/* Adds "Key=value" to the current --vm block. */
static int cli_vm_add(const char *option, const char *key, const char *value)
{
        CliVm *v;
        char *s;

        if (arg_n_vms == 0)
                return log_error_errno(-EINVAL, "%s needs a --vm NAME before it", option);
        v = &arg_vms[arg_n_vms - 1];
        if (v->n_settings >= MANAGER_CLI_SETTINGS_MAX)
                return log_error_errno(-E2BIG, "--vm %s: more than %u settings", v->name,
                                       MANAGER_CLI_SETTINGS_MAX);
        if (key) {
                if (asprintf(&s, "%s=%s", key, value) < 0)
                        return log_oom();
        } else {
                if (!strchr(value, '='))
                        return log_error_errno(-EINVAL, "--vm %s: %s expects KEY=VALUE, got '%s'", v->name,
                                               option, value);
                s = strdup(value);
                if (!s)
                        return log_oom();
        }
        v->settings[v->n_settings++] = s;
        return 0;
}

static int cli_vm_begin(const char *name)
{
        CliVm *l;

        for (size_t i = 0; i < arg_n_vms; i++)
                if (streq(arg_vms[i].name, name))
                        return log_error_errno(-EINVAL, "--vm %s given twice", name);
        if (arg_n_vms >= CONFIG_VMS_MAX)
                return log_error_errno(-E2BIG, "More than %u --vm options", CONFIG_VMS_MAX);
        l = realloc(arg_vms, (arg_n_vms + 1) * sizeof(CliVm));
        if (!l)
                return log_oom();
        arg_vms = l;
        /* The name is checked with the settings, so its error reads like the others. */
        arg_vms[arg_n_vms++] = (CliVm){.name = (char *) name};
        return 0;
}

static int parse_argv(int argc, char **argv)
{
        enum {
                ARG_VERSION = 0x100,
                ARG_CHECK,
                ARG_SANDBOX,
                ARG_DEBUG,
                ARG_KEEP_CAPS,
                ARG_BUS,
                ARG_BUS_ADDRESS,
                ARG_VM,
                ARG_SET,
                ARG_VM_KEY, /* + index into vm_options */
        };
        static const struct {
                const char *option, *key;
        } vm_options[] = {
                {"role", "Role"},
                {"control-socket", "ControlSocket"},
                {"peer", "Peer"},
                {"listen", "Listen"},
                {"epoch-ms", "EpochMs"},
                {"tracking", "Tracking"},
                {"secret-file", "SecretFile"},
                {"max-inflight-epochs", "MaxInflightEpochs"},
                {"compression", "Compression"},
        };
        struct option opts[32] = {
                {"help", no_argument, NULL, 'h'},
                {"version", no_argument, NULL, ARG_VERSION},
                {"config", required_argument, NULL, 'c'},
                {"config-dir", required_argument, NULL, 'd'},
                {"check-config", no_argument, NULL, ARG_CHECK},
                {"sandbox", required_argument, NULL, ARG_SANDBOX},
                {"debug-socket", required_argument, NULL, ARG_DEBUG},
                {"bus", required_argument, NULL, ARG_BUS},
                {"bus-address", required_argument, NULL, ARG_BUS_ADDRESS},
                {"vm", required_argument, NULL, ARG_VM},
                {"set", required_argument, NULL, ARG_SET},
                {"keep-capabilities", no_argument, NULL, ARG_KEEP_CAPS},
        };
        size_t n_opts = 12;
        int c, r;

        for (size_t i = 0; i < ELEMENTSOF(vm_options); i++)
                opts[n_opts++] =
                        (struct option){vm_options[i].option, required_argument, NULL, ARG_VM_KEY + (int) i};
        assert(n_opts < ELEMENTSOF(opts));

        while ((c = getopt_long(argc, argv, "hc:d:", opts, NULL)) >= 0)
                switch (c) {
                case 'h':
                        help();
                        return 0;
                case ARG_VERSION:
                        printf("dirtyrepd %s\n", DIRTYREP_VERSION);
                        return 0;
                case 'c':
                        arg_config = *optarg ? optarg : NULL;
                        break;
                case 'd':
                        arg_config_dir = *optarg ? optarg : NULL;
                        break;
                case ARG_CHECK:
                        arg_check_config = true;
                        break;
                case ARG_SANDBOX:
                        if (streq(optarg, "auto"))
                                arg_sandbox = SANDBOX_AUTO;
                        else if (streq(optarg, "unit"))
                                arg_sandbox = SANDBOX_UNIT;
                        else if (streq(optarg, "none"))
                                arg_sandbox = SANDBOX_NONE;
                        else
                                return log_error_errno(
                                        -EINVAL, "--sandbox= must be auto, unit or none, not '%s'", optarg);
                        break;
                case ARG_DEBUG:
                        arg_debug_socket = optarg;
                        break;
                case ARG_KEEP_CAPS:
                        arg_keep_capabilities = true;
                        break;
                case ARG_BUS:
                        if (streq(optarg, "auto"))
                                arg_bus = BUS_AUTO;
                        else if (streq(optarg, "system"))
                                arg_bus = BUS_SYSTEM;
                        else if (streq(optarg, "none"))
                                arg_bus = BUS_NONE;
                        else
                                return log_error_errno(
                                        -EINVAL, "--bus= must be auto, system or none, not '%s'", optarg);
                        break;
                case ARG_BUS_ADDRESS:
                        if (!*optarg || strlen(optarg) > 4096)
                                return log_error_errno(-EINVAL, "--bus-address= needs an address");
                        arg_bus_address = optarg;
                        break;
                case ARG_VM:
                        r = cli_vm_begin(optarg);
                        if (r < 0)
                                return r;
                        break;
                case ARG_SET:
                        r = cli_vm_add("--set", NULL, optarg);
                        if (r < 0)
                                return r;
                        break;
                default:
                        if (c >= ARG_VM_KEY && c < ARG_VM_KEY + (int) ELEMENTSOF(vm_options)) {
                                char option[64];
                                snprintf(option, sizeof(option), "--%s", vm_options[c - ARG_VM_KEY].option);
                                r = cli_vm_add(option, vm_options[c - ARG_VM_KEY].key, optarg);
                                if (r < 0)
                                        return r;
                                break;
                        }
                        return -EINVAL;
                }
        if (optind < argc)
                return log_error_errno(-EINVAL, "Unexpected argument '%s' (see --help)", argv[optind]);
        return 1;
}

static void log_config_errors(int r, const char *errors)
{
        log_error_lines(errors);
        log_struct_internal(LOG_ERR, r, __FILE__, __LINE__, __func__, DR_MESSAGE_CONFIG_INVALID, NULL, 0,
                            "Configuration is invalid (%s, %s/*.conf%s)", arg_config ?: "no main file",
                            arg_config_dir ?: "no VM directory", arg_n_vms > 0 ? ", command line" : "");
}

/*
 * SIGTERM/SIGINT: before the primaries are freed (which releases only what
 * the standby acknowledged, primary_free()), give each standby a bounded
 * moment to acknowledge the epochs in flight, so a routine stop of a healthy
 * pair leaves as little output held as possible. A second signal stops at once.
 */
#define STOP_DRAIN_USEC      (2 * USEC_PER_SEC)
#define STOP_DRAIN_POLL_USEC (10 * USEC_PER_MSEC)
static uint64_t stop_deadline;

static int on_drain_timer(sd_event_source *s, uint64_t usec, void *userdata)
{
        Manager *m = userdata;
        size_t waiting = 0;

        for (size_t i = 0; i < m->n_vms; i++)
                if (m->vms[i]->primary && !primary_drained(m->vms[i]->primary))
                        waiting++;
        if (waiting == 0 || now_usec() >= stop_deadline) {
                if (waiting > 0)
                        log_warning(
                                "Stopping: %zu VM(s) still have unacknowledged epochs after %llu ms; their "
                                "output stays held in the VMM",
                                waiting, (unsigned long long) (STOP_DRAIN_USEC / USEC_PER_MSEC));
                return sd_event_exit(sd_event_source_get_event(s), 0);
        }
        (void) sd_event_source_set_time_relative(s, STOP_DRAIN_POLL_USEC);
        return sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
}

static int on_stop_signal(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata)
{
        Manager *m = userdata;
        int r;

        if (stop_deadline > 0) {
                log_notice("%s again: stopping now", si->ssi_signo == SIGINT ? "SIGINT" : "SIGTERM");
                return sd_event_exit(sd_event_source_get_event(s), 0);
        }
        (void) sd_notify(false, "STOPPING=1");
        stop_deadline = now_usec() + STOP_DRAIN_USEC;
        for (size_t i = 0; i < m->n_vms; i++)
                if (m->vms[i]->primary)
                        primary_drain(m->vms[i]->primary);
        r = sd_event_add_time_relative(m->event, NULL, CLOCK_MONOTONIC, 0, 1000, on_drain_timer, m);
        if (r < 0)
                return sd_event_exit(m->event, 0);
        log_info("Stopping: waiting up to %llu ms for the standbys to acknowledge epochs in flight",
                 (unsigned long long) (STOP_DRAIN_USEC / USEC_PER_MSEC));
        return 0;
}

static int on_sighup(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata)
{
        Manager *m = userdata;
        _cleanup_free_ char *errors = NULL;
        int r;

        (void) sd_notify(false, "RELOADING=1");
        log_info("SIGHUP: reloading the configuration");
        r = manager_reload(m, NULL, NULL, NULL, NULL, &errors);
        if (r < 0)
                log_config_errors(r, errors);
        else
                log_event(LOG_INFO, DR_MESSAGE_RELOADED, NULL, 0, "Configuration reloaded (SIGHUP)");
        (void) sd_notify(false, "READY=1");
        return 0;
}

int main(int argc, char **argv)
{
        Daemon d = {};
        Manager *m = &d.manager;
        _cleanup_(config_freep) Config *config = NULL;
        _cleanup_free_ char *errors = NULL;
        sigset_t mask;
        int r;

        log_set_ident("dirtyrepd");
        journal_log_setup();
        r = parse_argv(argc, argv);
        if (r <= 0) {
                daemon_done(&d);
                return r < 0 ? 1 : 0;
        }
        m->config_path = arg_config;
        m->config_dir = arg_config_dir;
        m->cli_vms = arg_vms;
        m->n_cli_vms = arg_n_vms;
        m->bus_address = (char *) arg_bus_address;

        r = manager_load_config(m, &config, &errors);
        if (r < 0) {
                log_config_errors(r, errors);
                daemon_done(&d);
                return 1;
        }
        if (arg_check_config) {
                r = check_config(config);
                daemon_done(&d);
                return r;
        }
        log_set_max_level(config->daemon->log_level);

        /* Before anything is touched (debug socket, addresses, bus name, VMs). */
        r = take_instance_lock(config->daemon->runtime_directory);
        if (r < 0) {
                /* The debug socket is not opened: the other daemon's stays. */
                daemon_done(&d);
                return 1;
        }
        check_config_at_start(config);

        /* Before any thread exists: capabilities are per thread, and new threads inherit them. */
        {
                bool bounding = false;
                r = caps_drop(arg_keep_capabilities, &bounding);
                if (r < 0) {
                        log_error_errno(r, "Failed to drop capabilities: %m");
                        daemon_done(&d);
                        return 1;
                }
                if (bounding)
                        log_debug("Capabilities reduced to CAP_NET_ADMIN and CAP_NET_RAW, bounding set "
                                  "included.");
        }

        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigaddset(&mask, SIGHUP);
        sigaddset(&mask, SIGPIPE);
        if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0)
                return log_error_errno(-errno, "sigprocmask(): %m"), 1;

        r = sd_event_default(&m->event);
        if (r < 0) {
                log_error_errno(r, "Failed to create the event loop: %m");
                goto out;
        }
        (void) sd_event_add_signal(m->event, NULL, SIGTERM, on_stop_signal, m);
        (void) sd_event_add_signal(m->event, NULL, SIGINT, on_stop_signal, m);
        (void) sd_event_add_signal(m->event, NULL, SIGHUP, on_sighup, m);
        /* WATCHDOG=1 from the loop itself when WATCHDOG_USEC is set: a hung loop stops it. */
        r = sd_event_set_watchdog(m->event, true);
        if (r < 0)
                log_warning("Failed to enable the service manager's watchdog: %s", strerror(-r));

        if (arg_debug_socket) {
                r = debug_server_open(m, arg_debug_socket, &d.debug);
                if (r < 0)
                        goto out;
        }

        r = manager_start(m, config);
        if (r < 0)
                goto out;

        if (arg_bus_address || arg_bus != BUS_NONE) {
                r = bus_open(m);
                if (r < 0 && (arg_bus_address || arg_bus == BUS_SYSTEM)) {
                        log_error_errno(r, "The D-Bus API is required (--bus=%s) but unavailable",
                                        arg_bus_address ? "ADDRESS" : "system");
                        goto out;
                }
                if (r < 0)
                        log_warning("Running without the D-Bus API (--bus=auto); only the debug socket is "
                                    "served");
        }
        r = manager_start_status_timer(m);
        if (r < 0) {
                log_error_errno(r, "Failed to start the status timer: %m");
                goto out;
        }

        {
                char status[512];
                manager_format_status(m, status, sizeof(status));
                (void) sd_notifyf(false, "READY=1\nSTATUS=%s", status);
        }
        log_event(LOG_INFO, DR_MESSAGE_STARTED, NULL, 0, "dirtyrepd %s serving %zu VM(s)%s",
                  DIRTYREP_VERSION, m->n_vms, m->bus ? ", D-Bus API up" : "");
        r = sd_event_loop(m->event);
        if (r < 0)
                log_error_errno(r, "Event loop failed: %m");
        (void) sd_notify(false, "STOPPING=1");
        log_event(LOG_INFO, DR_MESSAGE_STOPPING, NULL, 0, "dirtyrepd stopping (%zu VM(s))", m->n_vms);
out:
        daemon_done(&d);
        return r < 0 ? 1 : 0;
}

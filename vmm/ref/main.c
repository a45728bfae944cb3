/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * dirtyrep-vmm: the reference VMM. Creates a KVM VM with guest RAM in a
 * memfd, loads a multiboot v1 kernel (or restores a saved state onto a
 * given RAM image), embeds the dirtyrep agent so dirtyrepd can replicate
 * it, and runs one thread per vCPU. The main thread only waits: for
 * SIGTERM/SIGINT or for a vCPU asking the VM to stop.
 */
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "dirtyrep-build.h"
#include "imagefile.h"
#include "kvm.h"
#include "log.h"
#include "multiboot.h"
#include "util.h"
#include "vmm.h"
#include "vmstate.pb-c.h"

/* Where KVM's real-mode helpers go (as QEMU does): inside the 3-4 GiB hole, below the IOAPIC. */
#define IDENTITY_MAP_ADDR 0xfeffc000ULL
#define TSS_ADDR          0xfffbd000ULL

#define RING_ENTRIES_DEFAULT 4096U
#define RING_ENTRIES_MIN     256U
#define RING_ENTRIES_MAX     (1U << 20)
#define STATE_FILE_MAX       (256U << 20)
#define NAME_MAX_LEN         64

typedef enum TrackingChoice { TRACKING_AUTO, TRACKING_RING, TRACKING_BITMAP } TrackingChoice;

typedef struct Options {
        const char *kernel;
        const char *append;
        uint64_t memory;
        bool memory_set;
        unsigned cpus;
        const char *name;
        uint8_t uuid[16];
        bool uuid_set;
        bool cpus_set;
        TrackingChoice tracking;
        uint32_t ring_entries;
        bool ring_entries_set;
        const char *control;
        const char *console;
        bool console_commit;
        const char *service_listen;
        const char *restore;
        const char *restore_image;
        const char *ram_file;
        int ram_fd;
        int ready_fd;
} Options;

void vm_request_exit(Vm *vm, int status)
{
        int expected = -1;
        uint64_t one = 1;

        if (atomic_compare_exchange_strong(&vm->exit_status, &expected, status))
                (void) !write(vm->done_fd, &one, sizeof(one));
}

static void help(void)
{
        printf("Usage: dirtyrep-vmm [OPTIONS] --kernel FILE\n"
               "       dirtyrep-vmm [OPTIONS] --restore STATE (--ram FILE | --ram-fd N)\n"
               "       dirtyrep-vmm [OPTIONS] --restore-image DIR\n"
               "\n"
               "Runs a KVM virtual machine that dirtyrepd can replicate.\n"
               "\n"
               "  -h --help                 Show this help and exit\n"
               "     --version              Show the version and exit\n"
               "  -k --kernel FILE          Multiboot v1 kernel (ELF32) to boot\n"
               "  -a --append STR           Kernel command line (tsc_khz= and ncpus= are added)\n"
               "  -m --memory SIZE          Guest RAM, e.g. 512M, 16G (default 256M; 4M..1T)\n"
               "  -c --cpus N               vCPUs, 1..%u (default 1)\n"
               "  -n --name NAME            VM name (default \"vm\"; [A-Za-z0-9_.-], up to %u chars)\n"
               "     --uuid UUID            VM UUID, 8-4-4-4-12 hex digits (default: random)\n"
               "     --tracking ring|bitmap Dirty tracking (default: ring if KVM has dirty rings)\n"
               "     --ring-entries N       Dirty ring entries per vCPU, power of two >= %u (default %u)\n"
               "     --control PATH         Agent control socket (default /run/dirtyrep/NAME.sock)\n"
               "     --console FILE|-       COM1 output (default: stdout)\n"
               "     --console-commit       Hold COM1 output until its epoch committed, like COM2\n"
               "     --service-listen ADDR:PORT\n"
               "                            Bridge COM2 to TCP (up to 64 clients; port 0 picks one)\n"
               "     --restore STATE        Start from a saved VM state instead of a kernel\n"
               "     --restore-image DIR    Start from a checkpoint image (follows its parent chain)\n"
               "     --ram FILE             RAM image for --restore (copied)\n"
               "     --ram-fd N             RAM for --restore as an inherited fd (a memfd is used in "
               "place)\n"
               "     --check                Check the arguments and exit (0: they would be accepted);\n"
               "                            nothing is opened (dirtyrepd --check-config uses it)\n"
               "     --ready-fd N           Write \"1\\n\" to fd N once the guest runs\n"
               "\n"
               "Exit status: 0 stopped by SIGTERM/SIGINT or guest power-off; 1 error;\n"
               "3 guest crashed (triple fault, KVM internal error, failed entry);\n"
               "(V << 1) | 1 when the guest wrote V to the debug-exit port 0x501.\n",
               DR_AGENT_MAX_VCPUS, NAME_MAX_LEN, RING_ENTRIES_MIN, RING_ENTRIES_DEFAULT);
}

/* --uuid: the canonical 8-4-4-4-12 form only (libuuid, common/util.c). */
static int parse_uuid(const char *s, uint8_t ret[16])
{
        return uuid_from_string(s, ret);
}

static bool name_is_valid(const char *s)
{
        size_t n = strlen(s);

        if (n == 0 || n > NAME_MAX_LEN || s[0] == '.')
                return false;
        for (const char *p = s; *p; p++)
                if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
                      *p == '_' || *p == '-' || *p == '.'))
                        return false;
        return true;
}

/* --check: arguments are parsed and checked, nothing is opened or inherited. */
static bool arg_check;

static int parse_fd_arg(const char *s, const char *opt, int *ret)
{
        uint32_t v;

        if (parse_u32(s, &v) < 0 || v > INT32_MAX)
                return log_error_errno(-EINVAL, "Invalid %s value '%s': expected a file descriptor number",
                                       opt, s);
        if (v <= 2)
                return log_error_errno(-EINVAL, "%s %u: refusing to use a standard stream", opt, v);
        if (arg_check) {
                *ret = (int) v;
                return 0;
        }
        if (fcntl((int) v, F_GETFD) < 0)
                return log_error_errno(-EBADF, "%s %u: not an open file descriptor", opt, v);
        (void) fcntl((int) v, F_SETFD, FD_CLOEXEC);
        *ret = (int) v;
        return 0;
}

/* The long options; help() says what each one means. */
enum {
        ARG_VERSION = 0x100,
        ARG_UUID,
        ARG_TRACKING,
        ARG_RING_ENTRIES,
        ARG_CONTROL,
        ARG_CONSOLE,
        ARG_CONSOLE_COMMIT,
        ARG_SERVICE_LISTEN,
        ARG_RESTORE,
        ARG_RESTORE_IMAGE,
        ARG_RAM,
        ARG_RAM_FD,
        ARG_READY_FD,
        ARG_CHECK,
};
static const struct option options[] = {{"help", no_argument, NULL, 'h'},
                                        {"version", no_argument, NULL, ARG_VERSION},
                                        {"kernel", required_argument, NULL, 'k'},
                                        {"append", required_argument, NULL, 'a'},
                                        {"memory", required_argument, NULL, 'm'},
                                        {"cpus", required_argument, NULL, 'c'},
                                        {"name", required_argument, NULL, 'n'},
                                        {"uuid", required_argument, NULL, ARG_UUID},
                                        {"tracking", required_argument, NULL, ARG_TRACKING},
                                        {"ring-entries", required_argument, NULL, ARG_RING_ENTRIES},
                                        {"control", required_argument, NULL, ARG_CONTROL},
                                        {"console", required_argument, NULL, ARG_CONSOLE},
                                        {"console-commit", no_argument, NULL, ARG_CONSOLE_COMMIT},
                                        {"service-listen", required_argument, NULL, ARG_SERVICE_LISTEN},
                                        {"restore", required_argument, NULL, ARG_RESTORE},
                                        {"restore-image", required_argument, NULL, ARG_RESTORE_IMAGE},
                                        {"ram", required_argument, NULL, ARG_RAM},
                                        {"ram-fd", required_argument, NULL, ARG_RAM_FD},
                                        {"ready-fd", required_argument, NULL, ARG_READY_FD},
                                        {"check", no_argument, NULL, ARG_CHECK},
                                        {}};

/* What the options mean together: one way to start the VM, and no option that the chosen one ignores. */
static int options_check(const Options *o)
{
        if (!!o->kernel + !!o->restore + !!o->restore_image != 1)
                return log_error_errno(-EINVAL, "Exactly one of --kernel and --restore (or --restore-image) "
                                                "is required (see --help)");
        if (o->restore_image && (o->ram_file || o->ram_fd >= 0))
                return log_error_errno(-EINVAL, "--restore-image brings its own RAM: no --ram or --ram-fd");
        if (o->restore_image && o->append)
                return log_error_errno(-EINVAL, "--append only makes sense with --kernel");
        if (o->restore && !!o->ram_file == (o->ram_fd >= 0))
                return log_error_errno(-EINVAL, "--restore needs exactly one of --ram and --ram-fd");
        if (!o->restore && !o->restore_image && (o->ram_file || o->ram_fd >= 0))
                return log_error_errno(-EINVAL, "--ram and --ram-fd only make sense with --restore");
        if (o->restore && o->append)
                return log_error_errno(-EINVAL, "--append only makes sense with --kernel");
        if (o->ring_entries_set && o->tracking == TRACKING_BITMAP)
                return log_error_errno(-EINVAL, "--ring-entries only makes sense with ring tracking");
        return 0;
}

static int parse_argv(int argc, char *argv[], Options *o)
{
        uint32_t v;
        int c, r;

        *o = (Options){
                .memory = 256ULL << 20,
                .cpus = 1,
                .name = "vm",
                .tracking = TRACKING_AUTO,
                .ring_entries = RING_ENTRIES_DEFAULT,
                .console = "-",
                .ram_fd = -1,
                .ready_fd = -1,
        };

        /* Known before any option is read: --ram-fd N is then not required to be open. */
        for (int i = 1; i < argc && !streq(argv[i], "--"); i++)
                if (streq(argv[i], "--check"))
                        arg_check = true;

        while ((c = getopt_long(argc, argv, "hk:a:m:c:n:", options, NULL)) >= 0) {
                switch (c) {
                case 'h':
                        help();
                        return 0;
                case ARG_VERSION:
                        printf("dirtyrep-vmm %s\n", DIRTYREP_VERSION);
                        return 0;
                case 'k':
                        o->kernel = optarg;
                        break;
                case 'a':
                        o->append = optarg;
                        break;
                case 'm':
                        r = parse_size(optarg, &o->memory);
                        if (r < 0 || guest_ram_check_size(o->memory) < 0)
                                return log_error_errno(
                                        -EINVAL,
                                        "Invalid --memory '%s': expected a size from 4M to 1T, "
                                        "a multiple of 4 KiB (e.g. 256M, 16G)",
                                        optarg);
                        o->memory_set = true;
                        break;
                case 'c':
                        if (parse_u32(optarg, &v) < 0 || v < 1 || v > DR_AGENT_MAX_VCPUS)
                                return log_error_errno(-EINVAL, "Invalid --cpus '%s': expected 1..%u",
                                                       optarg, DR_AGENT_MAX_VCPUS);
                        o->cpus = v;
                        o->cpus_set = true;
                        break;
                case 'n':
                        if (!name_is_valid(optarg))
                                return log_error_errno(-EINVAL,
                                                       "Invalid --name '%s': 1..%u of [A-Za-z0-9_.-], not "
                                                       "starting with '.'",
                                                       optarg, NAME_MAX_LEN);
                        o->name = optarg;
                        break;
                case ARG_UUID:
                        if (parse_uuid(optarg, o->uuid) < 0)
                                return log_error_errno(-EINVAL, "Invalid --uuid '%s'", optarg);
                        o->uuid_set = true;
                        break;
                case ARG_TRACKING:
                        if (streq(optarg, "ring"))
                                o->tracking = TRACKING_RING;
                        else if (streq(optarg, "bitmap"))
                                o->tracking = TRACKING_BITMAP;
                        else
                                return log_error_errno(
                                        -EINVAL, "Invalid --tracking '%s': expected ring or bitmap", optarg);
                        break;
                case ARG_RING_ENTRIES:
                        if (parse_u32(optarg, &v) < 0 || v < RING_ENTRIES_MIN || v > RING_ENTRIES_MAX ||
                            !IS_POWER_OF_2(v))
                                return log_error_errno(
                                        -EINVAL,
                                        "Invalid --ring-entries '%s': expected a power of two from "
                                        "%u to %u",
                                        optarg, RING_ENTRIES_MIN, RING_ENTRIES_MAX);
                        o->ring_entries = v;
                        o->ring_entries_set = true;
                        break;
                case ARG_CONTROL:
                        if (strlen(optarg) >= sizeof(((struct sockaddr_un *) NULL)->sun_path) || !*optarg)
                                return log_error_errno(-ENAMETOOLONG,
                                                       "Invalid --control '%s': empty or too long", optarg);
                        o->control = optarg;
                        break;
                case ARG_CONSOLE:
                        o->console = optarg;
                        break;
                case ARG_CONSOLE_COMMIT:
                        o->console_commit = true;
                        break;
                case ARG_SERVICE_LISTEN:
                        o->service_listen = optarg;
                        break;
                case ARG_RESTORE:
                        o->restore = optarg;
                        break;
                case ARG_RESTORE_IMAGE:
                        o->restore_image = optarg;
                        break;
                case ARG_RAM:
                        o->ram_file = optarg;
                        break;
                case ARG_RAM_FD:
                        r = parse_fd_arg(optarg, "--ram-fd", &o->ram_fd);
                        if (r < 0)
                                return r;
                        break;
                case ARG_READY_FD:
                        r = parse_fd_arg(optarg, "--ready-fd", &o->ready_fd);
                        if (r < 0)
                                return r;
                        break;
                case ARG_CHECK:
                        arg_check = true;
                        break;
                case '?':
                        return -EINVAL;
                default:
                        assert(0);
                }
        }
        if (optind < argc)
                return log_error_errno(-EINVAL, "Unexpected argument '%s' (see --help)", argv[optind]);

        r = options_check(o);
        if (r < 0)
                return r;
        return 1;
}

/* Splits "ADDR:PORT" / "[V6]:PORT". */
static int parse_listen(const char *s, char **ret_addr, uint16_t *ret_port)
{
        const char *colon = strrchr(s, ':');
        _cleanup_free_ char *addr = NULL;
        uint32_t port;

        if (!colon || colon == s)
                return -EINVAL;
        if (parse_u32(colon + 1, &port) < 0 || port > 65535)
                return -EINVAL;
        if (s[0] == '[') {
                if (colon[-1] != ']' || colon - s < 3)
                        return -EINVAL;
                addr = strndup(s + 1, (size_t) (colon - s - 2));
        } else
                addr = strndup(s, (size_t) (colon - s));
        if (!addr)
                return -ENOMEM;
        *ret_addr = TAKE_PTR(addr);
        *ret_port = (uint16_t) port;
        return 0;
}

static bool cmdline_has_key(const char *cmdline, const char *key)
{
        size_t kl = strlen(key);

        for (const char *p = cmdline; p && *p;) {
                p += strspn(p, " ");
                if (strneq(p, key, kl) && p[kl] == '=')
                        return true;
                p = strchr(p, ' ');
        }
        return false;
}

static int build_cmdline(const char *append, int tsc_khz, unsigned ncpus, char **ret)
{
        char *s = NULL;
        const char *a = append ?: "";
        char tsc[40] = "", cpus[32] = "";

        if (tsc_khz > 0 && !cmdline_has_key(a, "tsc_khz"))
                snprintf(tsc, sizeof(tsc), "%stsc_khz=%d", *a ? " " : "", tsc_khz);
        if (!cmdline_has_key(a, "ncpus"))
                snprintf(cpus, sizeof(cpus), "%sncpus=%u", *a || *tsc ? " " : "", ncpus);
        if (asprintf(&s, "%s%s%s", a, tsc, cpus) < 0)
                return -ENOMEM;
        *ret = s;
        return 0;
}

static int read_file_bounded(const char *path, size_t max, uint8_t **ret_buf, size_t *ret_len)
{
        _cleanup_close_ int fd = -EBADF;
        _cleanup_free_ uint8_t *buf = NULL;
        struct stat st;
        int r;

        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
        if (fd < 0)
                return -errno;
        if (fstat(fd, &st) < 0)
                return -errno;
        if (!S_ISREG(st.st_mode))
                return -EBADFD;
        if ((uint64_t) st.st_size > max)
                return -EFBIG;
        buf = malloc(MAX((size_t) st.st_size, (size_t) 1));
        if (!buf)
                return -ENOMEM;
        r = loop_read_exact(fd, buf, (size_t) st.st_size);
        if (r < 0)
                return r;
        *ret_buf = TAKE_PTR(buf);
        *ret_len = (size_t) st.st_size;
        return 0;
}

/* Chooses and enables dirty tracking. Must run before any vCPU exists. */
static int setup_tracking(int vm_fd, TrackingChoice choice, uint32_t ring_entries, DrTrackingMode *ret_mode)
{
        int acq_rel, ring, manual, r;
        long cap;
        int max_bytes;

        acq_rel = kvm_check_extension(vm_fd, KVM_CAP_DIRTY_LOG_RING_ACQ_REL);
        ring = kvm_check_extension(vm_fd, KVM_CAP_DIRTY_LOG_RING);
        if (choice == TRACKING_AUTO)
                choice = (acq_rel > 0 || ring > 0) ? TRACKING_RING : TRACKING_BITMAP;

        if (choice == TRACKING_RING) {
                if (acq_rel > 0) {
                        cap = KVM_CAP_DIRTY_LOG_RING_ACQ_REL;
                        max_bytes = acq_rel;
                } else if (ring > 0) {
                        cap = KVM_CAP_DIRTY_LOG_RING;
                        max_bytes = ring;
                } else
                        return log_error_errno(-EOPNOTSUPP,
                                               "This kernel has no KVM dirty ring; use --tracking bitmap");
                if ((uint64_t) ring_entries * sizeof(struct kvm_dirty_gfn) > (uint64_t) max_bytes)
                        return log_error_errno(
                                -ERANGE, "--ring-entries %u exceeds this kernel's maximum of %u",
                                ring_entries, (unsigned) (max_bytes / sizeof(struct kvm_dirty_gfn)));
                r = kvm_enable_cap(vm_fd, (uint32_t) cap,
                                   (uint64_t) ring_entries * sizeof(struct kvm_dirty_gfn));
                if (r < 0)
                        return log_error_errno(r, "Failed to enable the KVM dirty ring (%u entries): %m",
                                               ring_entries);
                *ret_mode = DR_TRACKING_RING;
                return 0;
        }

        manual = kvm_check_extension(vm_fd, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);
        if (manual > 0) {
                uint64_t flags = (uint64_t) manual &
                                 (KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET);
                r = kvm_enable_cap(vm_fd, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags);
                if (r < 0)
                        return log_error_errno(r, "Failed to enable KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: %m");
        } else
                log_info("KVM has no manual dirty-log protection; the bitmap is cleared on every fetch");
        *ret_mode = DR_TRACKING_BITMAP;
        return 0;
}

static int control_path_default(const char *name, char **ret)
{
        char *p;

        if (mkdir("/run/dirtyrep", 0700) < 0 && errno != EEXIST)
                return log_error_errno(-errno, "Failed to create /run/dirtyrep: %m");
        if (asprintf(&p, "/run/dirtyrep/%s.sock", name) < 0)
                return log_oom();
        *ret = p;
        return 0;
}

static int open_console(const char *spec, int *ret)
{
        int fd;

        if (streq(spec, "-"))
                fd = fcntl(STDOUT_FILENO, F_DUPFD_CLOEXEC, 3);
        else
                fd = open(spec, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOCTTY, 0644);
        if (fd < 0)
                return log_error_errno(-errno, "Failed to open console %s: %m",
                                       streq(spec, "-") ? "stdout" : spec);
        *ret = fd;
        return 0;
}

/* --- device backends ---------------------------------------------------- */

static void console_write(Vm *vm, const void *buf, size_t len)
{
        static bool logged;
        int r = loop_write(vm->console_fd, buf, len);

        if (r < 0 && !logged) {
                logged = true;
                log_error_errno(r, "Console write failed, console output is lost from now on: %m");
        }
}

static int com1_tx(void *userdata, uint8_t byte)
{
        Vm *vm = userdata;

        if (vm->console_commit)
                return dr_agent_output_submit(vm->agent, CHANNEL_CONSOLE, &byte, 1);
        console_write(vm, &byte, 1);
        return 0;
}

static bool com1_tx_ready(void *userdata)
{
        Vm *vm = userdata;
        return !vm->console_commit || dr_agent_output_space(vm->agent, CHANNEL_CONSOLE) > 0;
}

static int com2_tx(void *userdata, uint8_t byte)
{
        Vm *vm = userdata;

        if (!service_listening(vm->service))
                return 0; /* no service port: nobody to talk to */
        return dr_agent_output_submit(vm->agent, CHANNEL_SERVICE, &byte, 1);
}

static bool com2_tx_ready(void *userdata)
{
        Vm *vm = userdata;

        if (!service_listening(vm->service))
                return true;
        return dr_agent_output_space(vm->agent, CHANNEL_SERVICE) > 0 && service_can_send(vm->service);
}

static void com2_rx_drained(void *userdata)
{
        Vm *vm = userdata;

        service_wake(vm->service);
}

/* --- agent callbacks ------------------------------------------------------ */

static int agent_save_devices(void *userdata, uint8_t **ret_buf, size_t *ret_len)
{
        return devices_save(userdata, ret_buf, ret_len);
}

/*
 * May run on the agent thread or inside dr_agent_output_submit() on a vCPU
 * thread that holds a Uart lock: so it never calls into a Uart, it only
 * sends and wakes the I/O thread, which retries held bytes.
 */
static void agent_output_release(void *userdata, unsigned channel, const void *buf, size_t len)
{
        Vm *vm = userdata;

        switch (channel) {
        case CHANNEL_CONSOLE:
                console_write(vm, buf, len);
                break;
        case CHANNEL_SERVICE:
                service_send(vm->service, buf, len);
                break;
        default:
                log_error("Agent released %zu bytes on unknown channel %u; dropped", len, channel);
                return;
        }
        service_wake(vm->service);
}

static void agent_vcpu_wedged(void *userdata, unsigned vcpu)
{
        log_error("vCPU %u is wedged (dirty ring jammed); the VMM keeps serving the control socket", vcpu);
}

/* --- main ----------------------------------------------------------------- */

static int load_kernel(Vm *vm, const Options *o)
{
        _cleanup_free_ uint8_t *image = NULL;
        _cleanup_free_ char *cmdline = NULL;
        const char *why = NULL;
        MultibootBoot boot;
        size_t len;
        int r, tsc_khz;

        r = read_file_bounded(o->kernel, MULTIBOOT_IMAGE_MAX, &image, &len);
        if (r == -EFBIG)
                return log_error_errno(r, "Kernel %s is larger than %u MiB", o->kernel,
                                       MULTIBOOT_IMAGE_MAX >> 20);
        if (r < 0)
                return log_error_errno(r, "Failed to read kernel %s: %m", o->kernel);

        tsc_khz = kvm_get_tsc_khz(vm->vcpus[0].fd);
        if (tsc_khz <= 0) {
                log_warning_errno(tsc_khz, "KVM_GET_TSC_KHZ failed, not passing tsc_khz=: %m");
                tsc_khz = 0;
        }
        r = build_cmdline(o->append, tsc_khz, vm->n_vcpus, &cmdline);
        if (r < 0)
                return log_oom();

        r = multiboot_load(vm->ram, image, len, cmdline, &boot, &why);
        if (r < 0)
                return log_error_errno(r, "Cannot boot %s: %s", o->kernel, why);
        log_debug("Loaded %s at 0x%" PRIx64 "-0x%" PRIx64 ", entry 0x%x, cmdline \"%s\"", o->kernel,
                  boot.load_start, boot.load_end, boot.entry, cmdline);

        for (unsigned i = 0; i < vm->n_vcpus; i++) {
                if (i == 0)
                        r = vcpu_setup_boot(&vm->vcpus[i], boot.entry, MULTIBOOT_BOOTLOADER_MAGIC,
                                            boot.info_addr, BOOT_STACK_TOP);
                else
                        r = vcpu_setup_boot(&vm->vcpus[i], boot.entry, 0x44524150U /* "DRAP" */, i, 0);
                if (r < 0)
                        return r;
        }
        return 0;
}

/*
 * A restored VM has the saved state's vCPU count: take it from the state
 * file so --restore needs no --cpus (and refuse a --cpus that disagrees).
 */
static int restore_vcpu_count(Options *o)
{
        _cleanup_free_ uint8_t *state = NULL;
        Dr__Vmstate__VmState *m;
        size_t len, n;
        int r;

        r = read_file_bounded(o->restore, STATE_FILE_MAX, &state, &len);
        if (r < 0)
                return log_error_errno(r, "Failed to read state %s: %m", o->restore);
        m = dr__vmstate__vm_state__unpack(NULL, len, state);
        if (!m)
                return log_error_errno(-EBADMSG, "State file %s is not a valid VM state", o->restore);
        n = m->n_vcpus;
        dr__vmstate__vm_state__free_unpacked(m, NULL);
        if (n < 1 || n > DR_AGENT_MAX_VCPUS)
                return log_error_errno(-EBADMSG, "State file %s has %zu vCPUs, expected 1..%u", o->restore,
                                       n, DR_AGENT_MAX_VCPUS);
        if (o->cpus_set && o->cpus != n)
                return log_error_errno(-EINVAL,
                                       "--cpus %u does not match the %zu vCPUs of the saved state %s",
                                       o->cpus, n, o->restore);
        o->cpus = (unsigned) n;
        return 0;
}

/* The checkpoint image of --restore-image: its chain, opened and checked before KVM is touched. */
static int restore_image_open(Options *o, Image **ret)
{
        _cleanup_(image_freep) Image *restore_img = NULL;
        char err[IMAGE_ERR_MAX] = "";
        uint64_t size;
        int r;

        r = image_open(o->restore_image, IMAGE_OPEN_CHAIN, &restore_img, err, sizeof(err));
        if (r < 0)
                return log_error_errno(r, "Cannot restore from image %s: %s", o->restore_image, err);
        size = image_layout_ram_size(&restore_img->layout);
        if (o->memory_set && o->memory != size)
                return log_error_errno(-EINVAL,
                                       "--memory %" PRIu64 " MiB does not match the image's %" PRIu64 " MiB",
                                       o->memory >> 20, size >> 20);
        if (o->cpus_set && o->cpus != restore_img->inv->n_vcpus)
                return log_error_errno(-EINVAL, "--cpus %u does not match the %" PRIu32 " vCPUs of image %s",
                                       o->cpus, restore_img->inv->n_vcpus, o->restore_image);
        o->memory = size;
        o->cpus = restore_img->inv->n_vcpus;
        *ret = TAKE_PTR(restore_img);
        return 0;
}

/* Guest RAM for --restore-image: a fresh memfd in the same layout, filled from the chain. */
static int restore_image_ram(Vm *vm, const Options *o, const Image *restore_img)
{
        char err[IMAGE_ERR_MAX] = "";
        const ImageLayout *il = &restore_img->layout;
        uint64_t t0 = now_usec();
        int r;

        r = guest_ram_new(o->memory, &vm->ram);
        if (r < 0)
                return log_error_errno(r, "Failed to allocate %" PRIu64 " MiB of guest RAM: %m",
                                       o->memory >> 20);
        if (il->n_regions != vm->ram->n_regions)
                return log_error_errno(
                        -EINVAL, "Image %s has %zu RAM regions, this VMM lays out %u for %" PRIu64 " MiB",
                        o->restore_image, il->n_regions, vm->ram->n_regions, o->memory >> 20);
        for (unsigned i = 0; i < vm->ram->n_regions; i++) {
                const DrAgentRegion *rg = &vm->ram->regions[i];
                if (rg->slot != il->regions[i].slot || rg->guest_phys != il->regions[i].guest_phys ||
                    rg->size != il->regions[i].size || rg->memfd_offset != il->regions[i].fd_offset)
                        return log_error_errno(-EINVAL,
                                               "Image %s: RAM region %u does not match this VMM's layout",
                                               o->restore_image, i);
        }
        r = image_restore(restore_img, vm->ram->map, vm->ram->size, true, err, sizeof(err));
        if (r < 0)
                return log_error_errno(r, "Cannot restore from image %s: %s", o->restore_image, err);
        log_info("Guest RAM: %" PRIu64 " MiB restored from image %s (chain depth %" PRIu32 ") in %" PRIu64
                 " ms",
                 vm->ram->size >> 20, o->restore_image, restore_img->inv->depth, (now_usec() - t0) / 1000);
        return 0;
}

static int restore_state(Vm *vm, const Options *o, const Image *restore_img)
{
        _cleanup_free_ uint8_t *state = NULL, *devs = NULL;
        int fds[DR_AGENT_MAX_VCPUS];
        size_t len, devs_len = 0;
        int r;

        if (restore_img) {
                state = malloc(restore_img->state_len);
                if (!state)
                        return log_oom();
                memcpy(state, restore_img->state, restore_img->state_len);
                len = restore_img->state_len;
        } else {
                r = read_file_bounded(o->restore, STATE_FILE_MAX, &state, &len);
                if (r < 0)
                        return log_error_errno(r, "Failed to read state %s: %m", o->restore);
        }
        for (unsigned i = 0; i < vm->n_vcpus; i++)
                fds[i] = vm->vcpus[i].fd;
        r = dr_state_restore(vm->kvm_fd, vm->vm_fd, fds, vm->n_vcpus, state, len, &devs, &devs_len);
        if (r < 0)
                return log_error_errno(r, "Failed to restore VM state from %s: %m",
                                       restore_img ? restore_img->path : o->restore);
        return devices_restore(vm, devs, devs_len);
}

static int setup_ram(Vm *vm, const Options *o, const Image *restore_img)
{
        bool direct = false;
        int r;

        if (o->restore_image)
                return restore_image_ram(vm, o, restore_img);
        if (!o->restore) {
                r = guest_ram_new(o->memory, &vm->ram);
                if (r < 0)
                        return log_error_errno(r, "Failed to allocate %" PRIu64 " MiB of guest RAM: %m",
                                               o->memory >> 20);
                return 0;
        }

        if (o->ram_fd >= 0) {
                r = guest_ram_from_fd(o->ram_fd, o->memory_set ? o->memory : 0, &vm->ram, &direct);
                if (r >= 0 && !direct)
                        safe_close(o->ram_fd); /* copied; we have no further use for it */
        } else {
                _cleanup_close_ int fd = open(o->ram_file, O_RDONLY | O_CLOEXEC | O_NOCTTY);
                if (fd < 0)
                        return log_error_errno(-errno, "Failed to open RAM image %s: %m", o->ram_file);
                /* A read-only fd is never mapped in place: the image on disk stays as it was. */
                r = guest_ram_from_fd(fd, o->memory_set ? o->memory : 0, &vm->ram, &direct);
                if (direct)
                        TAKE_FD(fd);
        }
        if (r == -EMEDIUMTYPE)
                return log_error_errno(r, "RAM image size does not match --memory");
        if (r == -ERANGE || r == -EINVAL)
                return log_error_errno(
                        r, "RAM image size is not a valid guest RAM size (4M..1T, 4 KiB multiple)");
        if (r == -EACCES)
                return log_error_errno(r, "--ram-fd must be open read-write to be used in place");
        if (r < 0)
                return log_error_errno(r, "Failed to set up guest RAM from the RAM image: %m");
        log_info("Guest RAM: %" PRIu64 " MiB %s", vm->ram->size >> 20,
                 direct ? "mapped in place from the given memfd" : "copied from the RAM image");
        return 0;
}

/* What run() sets up, in the order it does; run_done() releases it. */
typedef struct Run {
        Options o;
        Image *restore_img; /* --restore-image's chain; freed once RAM and state are in */
        char *control_default;
        char *listen_addr;
        uint16_t listen_port;
        char uuid_str[UUID_STRING_MAX];
        int sig_fd;
        DrTrackingMode mode;
        Vm *vm;
} Run;

/* --check: what run_prepare() would refuse without opening anything; the restore source is not read. */
static int run_check(Run *R)
{
        Options *o = &R->o;

        if (o->service_listen && parse_listen(o->service_listen, &R->listen_addr, &R->listen_port) < 0) {
                log_error("Invalid --service-listen '%s': expected ADDR:PORT or [V6ADDR]:PORT",
                          o->service_listen);
                return VMM_EXIT_FAILURE;
        }
        printf("dirtyrep-vmm: arguments OK\n");
        return VMM_EXIT_OK;
}

/* Everything decided before KVM is touched: the restore source, the service address, UUID, control path. */
static int run_prepare(Run *R)
{
        Options *o = &R->o;

        if (o->restore && restore_vcpu_count(o) < 0)
                return -EINVAL;
        if (o->restore_image && restore_image_open(o, &R->restore_img) < 0)
                return -EINVAL;
        if (o->service_listen && parse_listen(o->service_listen, &R->listen_addr, &R->listen_port) < 0)
                return log_error_errno(-EINVAL,
                                       "Invalid --service-listen '%s': expected ADDR:PORT or [V6ADDR]:PORT",
                                       o->service_listen);
        if (!o->uuid_set) {
                if (getrandom(o->uuid, sizeof(o->uuid), 0) != sizeof(o->uuid))
                        return log_error_errno(-errno, "getrandom() failed: %m");
                o->uuid[6] = (o->uuid[6] & 0x0f) | 0x40; /* version 4 */
                o->uuid[8] = (o->uuid[8] & 0x3f) | 0x80; /* RFC 4122 variant */
        }
        uuid_to_string(o->uuid, R->uuid_str);
        if (!o->control) {
                if (control_path_default(o->name, &R->control_default) < 0)
                        return -EINVAL;
                o->control = R->control_default;
        }
        return 0;
}

/* SIGTERM/SIGINT go to the signalfd; every thread inherits the mask. SIGUSR1 stays the agent's. */
static int signals_block(int *ret_fd)
{
        sigset_t mask;
        int fd;

        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        if (pthread_sigmask(SIG_BLOCK, &mask, NULL) != 0)
                return -EINVAL;
        fd = signalfd(-1, &mask, SFD_CLOEXEC);
        if (fd < 0)
                return log_error_errno(-errno, "signalfd() failed: %m");
        signal(SIGPIPE, SIG_IGN);
        *ret_fd = fd;
        return 0;
}

/* The KVM VM itself: tracking mode, the real-mode helpers, the in-kernel irqchip and PIT. */
static int vm_create_kvm(Vm *vm, const Options *o, DrTrackingMode *ret_mode)
{
        int r;

        vm->done_fd = eventfd(0, EFD_CLOEXEC);
        if (vm->done_fd < 0)
                return log_error_errno(-errno, "eventfd() failed: %m");
        r = open_console(o->console, &vm->console_fd);
        if (r < 0)
                return r;
        r = kvm_open();
        if (r < 0)
                return log_error_errno(r, "Cannot use /dev/kvm: %m");
        vm->kvm_fd = r;
        r = kvm_create_vm(vm->kvm_fd);
        if (r < 0)
                return log_error_errno(r, "KVM_CREATE_VM failed: %m");
        vm->vm_fd = r;

        r = kvm_check_extension(vm->vm_fd, KVM_CAP_MAX_VCPUS);
        if (r > 0 && o->cpus > (unsigned) r)
                return log_error_errno(-EINVAL, "--cpus %u exceeds this host's KVM limit of %d", o->cpus, r);
        r = setup_tracking(vm->vm_fd, o->tracking, o->ring_entries, ret_mode);
        if (r < 0)
                return r;

        r = kvm_set_identity_map_addr(vm->vm_fd, IDENTITY_MAP_ADDR);
        if (r < 0)
                return log_error_errno(r, "KVM_SET_IDENTITY_MAP_ADDR failed: %m");
        r = kvm_set_tss_addr(vm->vm_fd, TSS_ADDR);
        if (r < 0)
                return log_error_errno(r, "KVM_SET_TSS_ADDR failed: %m");
        r = kvm_create_irqchip(vm->vm_fd);
        if (r < 0)
                return log_error_errno(r, "KVM_CREATE_IRQCHIP failed: %m");
        r = kvm_create_pit2(vm->vm_fd);
        if (r < 0)
                return log_error_errno(r, "KVM_CREATE_PIT2 failed: %m");
        return 0;
}

/* Guest RAM registered with KVM, then the vCPUs with the host's supported CPUID. */
static int vm_create_ram_vcpus(Vm *vm, const Options *o, const Image *restore_img)
{
        _cleanup_free_ struct kvm_cpuid2 *cpuid = NULL;
        int r;

        r = setup_ram(vm, o, restore_img);
        if (r < 0)
                return r;
        r = guest_ram_register(vm->ram, vm->vm_fd);
        if (r < 0)
                return log_error_errno(r, "KVM_SET_USER_MEMORY_REGION failed: %m");
        r = kvm_get_supported_cpuid(vm->kvm_fd, &cpuid);
        if (r < 0)
                return log_error_errno(r, "KVM_GET_SUPPORTED_CPUID failed: %m");
        for (unsigned i = 0; i < vm->n_vcpus; i++) {
                vm->vcpus[i].fd = -EBADF;
                r = vcpu_create(vm, i, cpuid);
                if (r < 0)
                        return r;
        }
        return 0;
}

/* Devices exist before a restore so their state can be applied. */
static int vm_create_devices(Vm *vm, const Run *R)
{
        int r;

        /* The I/O thread always runs (it retries back-pressured output); it listens only if asked. */
        r = service_new(R->o.service_listen ? R->listen_addr : NULL, R->listen_port, &vm->service);
        if (r < 0)
                return r;
        if (uart_new("COM1", COM1_BASE, COM1_IRQ, vm->vm_fd,
                     &(UartBackend){.tx = com1_tx, .tx_ready = com1_tx_ready}, vm, &vm->com1) < 0 ||
            uart_new("COM2", COM2_BASE, COM2_IRQ, vm->vm_fd,
                     &(UartBackend){.tx = com2_tx, .tx_ready = com2_tx_ready, .rx_drained = com2_rx_drained},
                     vm, &vm->com2) < 0)
                return log_oom();
        service_set_uarts(vm->service, vm->com2, vm->com1);
        return 0;
}

/* The embedded agent (not started yet), with every vCPU registered. */
static int vm_create_agent(Vm *vm, const Options *o, DrTrackingMode mode)
{
        DrAgentConfig cfg;
        int r;

        cfg = (DrAgentConfig){
                .socket_path = o->control,
                .kvm_fd = vm->kvm_fd,
                .vm_fd = vm->vm_fd,
                .vm_name = o->name,
                .mode = mode,
                .ring_entries = mode == DR_TRACKING_RING ? o->ring_entries : 0,
                .regions = vm->ram->regions,
                .n_regions = vm->ram->n_regions,
                .n_vcpus = vm->n_vcpus,
                .cb =
                        {
                                .save_devices = agent_save_devices,
                                .output_release = agent_output_release,
                                .vcpu_wedged = agent_vcpu_wedged,
                        },
                .userdata = vm,
        };
        memcpy(cfg.vm_uuid, o->uuid, sizeof(o->uuid));
        r = dr_agent_new(&cfg, &vm->agent);
        if (r < 0)
                return log_error_errno(r, "Failed to set up the dirtyrep agent on %s: %m", o->control);
        for (unsigned i = 0; i < vm->n_vcpus; i++) {
                r = dr_agent_add_vcpu(vm->agent, i, vm->vcpus[i].fd, vm->vcpus[i].run);
                if (r < 0)
                        return log_error_errno(r, "Failed to register vCPU %u with the agent: %m", i);
        }
        return 0;
}

/* The whole VM, ready to run: KVM, RAM, vCPUs, devices, then the restored state or the kernel, then the
 * agent. */
static int vm_build(Run *R)
{
        Vm *vm = R->vm;
        int r;

        r = vm_create_kvm(vm, &R->o, &R->mode);
        if (r >= 0)
                r = vm_create_ram_vcpus(vm, &R->o, R->restore_img);
        if (r >= 0)
                r = vm_create_devices(vm, R);
        if (r < 0)
                return r;
        if (R->o.restore || R->o.restore_image) {
                r = restore_state(vm, &R->o, R->restore_img);
                if (r < 0)
                        return r;
                R->restore_img =
                        image_free(R->restore_img); /* RAM and state are in; the files are not needed */
        } else {
                r = load_kernel(vm, &R->o);
                if (r < 0)
                        return r;
        }
        return vm_create_agent(vm, &R->o, R->mode);
}

/* The vCPUs run; --ready-fd hears about it. */
static void vm_go(Run *R)
{
        Vm *vm = R->vm;
        int r;

        if (R->mode == DR_TRACKING_RING)
                log_info("VM %s (%s): %u vCPU(s), %" PRIu64 " MiB, ring tracking (%u entries), control %s",
                         R->o.name, R->uuid_str, vm->n_vcpus, vm->ram->size >> 20, R->o.ring_entries,
                         R->o.control);
        else
                log_info("VM %s (%s): %u vCPU(s), %" PRIu64 " MiB, bitmap tracking, control %s", R->o.name,
                         R->uuid_str, vm->n_vcpus, vm->ram->size >> 20, R->o.control);

        for (unsigned i = 0; i < vm->n_vcpus; i++)
                if (vcpu_start(&vm->vcpus[i]) < 0) {
                        vm_request_exit(vm, VMM_EXIT_FAILURE);
                        break;
                }

        if (R->o.ready_fd >= 0) {
                r = loop_write(R->o.ready_fd, "1\n", 2);
                if (r < 0)
                        log_warning_errno(r, "Failed to write to --ready-fd: %m");
                R->o.ready_fd = safe_close(R->o.ready_fd);
        }
}

/* The main thread's only job while the VM runs: wait for a signal or a vCPU asking the VM to stop. */
static void vm_wait(Vm *vm, int sig_fd)
{
        for (;;) {
                struct pollfd p[2] = {
                        {.fd = sig_fd, .events = POLLIN},
                        {.fd = vm->done_fd, .events = POLLIN},
                };

                if (poll(p, 2, -1) < 0) {
                        if (errno == EINTR)
                                continue;
                        log_error_errno(-errno, "poll() failed: %m");
                        vm_request_exit(vm, VMM_EXIT_FAILURE);
                        return;
                }
                if (p[0].revents & POLLIN) {
                        struct signalfd_siginfo si;

                        if (read(sig_fd, &si, sizeof(si)) == sizeof(si))
                                log_info("Received %s, shutting down", strsignal((int) si.ssi_signo));
                        vm_request_exit(vm, VMM_EXIT_OK);
                        return;
                }
                if (p[1].revents & POLLIN)
                        return;
        }
}

/* Stops a started VM; returns the exit status the first vm_request_exit() asked for. */
static int vm_stop(Vm *vm)
{
        int status;

        /* Order matters: the agent releases parked vCPUs and kicks running ones, then we join them. */
        dr_agent_stop(vm->agent);
        for (unsigned i = 0; i < vm->n_vcpus; i++)
                vcpu_join(&vm->vcpus[i]);
        service_stop(vm->service);
        status = atomic_load(&vm->exit_status);
        return status < 0 ? VMM_EXIT_FAILURE : status;
}

static void vm_destroy(Vm *vm)
{
        vm->agent = dr_agent_free(vm->agent);
        vm->service = service_free(vm->service);
        vm->com1 = uart_free(vm->com1);
        vm->com2 = uart_free(vm->com2);
        for (unsigned i = 0; i < vm->n_vcpus; i++)
                if (vm->vcpus[i].vm)
                        vcpu_destroy(&vm->vcpus[i]);
        vm->ram = guest_ram_free(vm->ram);
        safe_close(vm->vm_fd);
        safe_close(vm->kvm_fd);
        safe_close(vm->console_fd);
        safe_close(vm->done_fd);
}

static void run_done(Run *R)
{
        if (R->vm)
                vm_destroy(R->vm);
        R->restore_img = image_free(R->restore_img);
        free(R->control_default);
        free(R->listen_addr);
        safe_close(R->sig_fd);
}

static int run(int argc, char *argv[])
{
        _cleanup_(run_done) Run R = {.sig_fd = -EBADF, .mode = DR_TRACKING_BITMAP};
        static Vm vm_storage;
        int r;

        log_set_ident("dirtyrep-vmm");
        r = parse_argv(argc, argv, &R.o);
        if (r <= 0)
                return r < 0 ? VMM_EXIT_FAILURE : VMM_EXIT_OK;
        if (arg_check)
                return run_check(&R);
        if (run_prepare(&R) < 0)
                return VMM_EXIT_FAILURE;

        R.vm = &vm_storage;
        *R.vm = (Vm){
                .kvm_fd = -EBADF,
                .vm_fd = -EBADF,
                .n_vcpus = R.o.cpus,
                .console_fd = -EBADF,
                .console_commit = R.o.console_commit,
                .done_fd = -EBADF,
        };
        atomic_init(&R.vm->exit_status, -1);
        if (signals_block(&R.sig_fd) < 0)
                return VMM_EXIT_FAILURE;
        if (vm_build(&R) < 0)
                return VMM_EXIT_FAILURE;

        r = dr_agent_start(R.vm->agent);
        if (r < 0) {
                log_error_errno(r, "Failed to start the dirtyrep agent: %m");
                return VMM_EXIT_FAILURE;
        }
        if (service_start(R.vm->service) < 0)
                log_error("Failed to start the service port thread");
        else {
                vm_go(&R);
                vm_wait(R.vm, R.sig_fd);
        }
        return vm_stop(R.vm);
}

int main(int argc, char *argv[])
{
        return run(argc, argv);
}

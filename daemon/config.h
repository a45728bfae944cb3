/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * dirtyrepd configuration: a strict INI parser and the typed configuration it
 * produces. docs/man/dirtyrep.conf.5 is the user-facing description.
 *
 * Files: CONFIG_MAIN_PATH (section [Daemon]; may be missing: defaults) and one
 * file per VM in CONFIG_VM_DIR/NAME.conf (section [VM]). Only names ending in
 * ".conf" are read, in strcmp() order; NAME must match [A-Za-z0-9_.-]{1,64}
 * and must not start with a dot.
 *
 * Syntax: "[Section]" headers, "Key=Value" (whitespace around '=' and at the
 * ends of the line is trimmed), comment lines starting with '#' or ';', blank
 * lines. There are no inline comments, no quoting (except in VmmArgs=) and no
 * line continuations. An empty value ("Key=") means "unset" for the optional
 * keys marked (e) below and is an error for all others.
 *
 * Strict: an unknown section or key, a duplicate key or section, a key
 * outside a section, a line without '=', a line longer than CONFIG_LINE_MAX
 * bytes, a NUL or other control byte, an invalid value, a file larger than
 * CONFIG_FILE_MAX bytes or more than CONFIG_VMS_MAX VM files is an error
 * reported as "PATH:LINE: problem". All errors of a file are collected (up
 * to CONFIG_ERRORS_MAX per file) and the load fails if there is any.
 *
 * dirtyrep.conf [Daemon]
 * | key                 | default           | values                                 |
 * |---------------------|-------------------|----------------------------------------|
 * | ListenAddress=  (e) | none              | IPV4:PORT or [IPV6]:PORT, port         |
 * |                     |                   | 0..65535 (0 = ephemeral); none = no    |
 * |                     |                   | listener                               |
 * | LogLevel=           | info              | debug, info, notice, warning, err      |
 * | StateDirectory=     | /var/lib/dirtyrep | absolute path                          |
 * | RuntimeDirectory=   | /run/dirtyrep     | absolute path                          |
 * | ImageDirectory=     | STATEDIR/images   | absolute path: CheckpointImage over    |
 * |                     |                   | D-Bus writes and reads images only     |
 * |                     |                   | below it                               |
 * | HeartbeatIntervalMs=| 50                | 5..10000 ms (time span, e.g. 50ms)     |
 * | HeartbeatMisses=    | 4                 | 1..100                                 |
 *
 * vm.d/NAME.conf [VM]
 * | key                 | default                  | values                          |
 * |---------------------|--------------------------|---------------------------------|
 * | Role=               | (required)               | primary, standby                |
 * | ControlSocket=      | RUNTIMEDIR/NAME.sock (1) | absolute path, <= 107 bytes     |
 * | Peer=               | (required for primary)   | IPV4:PORT or [IPV6]:PORT, port  |
 * |                     |                          | 1..65535, not a wildcard address|
 * | Listen=             | (required for standby)   | IPV4:PORT or [IPV6]:PORT, port  |
 * |                     |                          | 0..65535 (0 = ephemeral)        |
 * | EpochMs=            | 20                       | 1..10000 ms (time span: 20ms, 2s)|
 * | Tracking=           | auto                     | auto, ring, bitmap              |
 * | SecretFile=         | (required)               | absolute path                   |
 * | MaxInflightEpochs=  | 4                        | 1..64                           |
 * | Compression=        | lz4                      | lz4, none                       |
 * | PreCopy=            | yes                      | yes, no                         |
 * | MaxStagingMB=       | 256                      | 16..65536                       |
 * | Vmm=                | BINDIR/dirtyrep-vmm      | absolute path                   |
 * | VmmArgs=        (e) | none                     | words, '..' or ".." quoting,    |
 * |                     |                          | at most CONFIG_VMM_ARGS_MAX     |
 * | VmmType=            | dirtyrep-vmm             | dirtyrep-vmm, qemu (2)          |
 * | FenceCommand=   (e) | none                     | command line, first word an     |
 * |                     |                          | absolute path                   |
 * | FailoverPolicy=     | manual                   | auto, manual, cluster (not with |
 * |                     |                          | SplitBrainPolicy=continue)      |
 * | ServiceAddress= (e) | none                     | IPV4/PREFIX or IPV6/PREFIX;     |
 * |                     |                          | needs ServiceInterface=         |
 * | ServiceInterface=(e)| none                     | interface name, 1..15 bytes     |
 * | SplitBrainTimeoutMs=| 5000                     | 100..600000 ms (time span: 5s)  |
 * | SplitBrainPolicy=   | suspend                  | suspend, continue               |
 * | OutputCommit=       | yes                      | yes, no                         |
 * | ConsoleCommit=      | no                       | yes, no                         |
 * | TLS=                | no                       | yes, no: the replication link   |
 * |                     |                          | in TLS 1.3, mutual certificates |
 * | TLSCertificateFile= | (required with TLS=yes)  | absolute path, PEM chain        |
 * |   (e)               |                          |                                 |
 * | TLSKeyFile=     (e) | (required with TLS=yes)  | absolute path, PEM private key  |
 * | TLSCAFile=      (e) | (required with TLS=yes)  | absolute path, PEM CA bundle    |
 * | TLSPeerName=    (e) | none (any certificate    | DNS name the peer's certificate |
 * |                     |  the CA signed)          | must carry (SAN or CN)          |
 * (1) /run/dirtyrep/NAME.sock from config_parse_vm_file(); config_load()
 *     re-derives it from the daemon's RuntimeDirectory= when that is set.
 * (2) qemu: Vmm= is a QEMU with the dirtyrep-agent object (docs/qemu.md) and
 *     VmmArgs= its whole command line, in which failover replaces %r (the
 *     replica's RAM, a path), %s (the saved state, a path), %f (the ready
 *     fd number), %c (ControlSocket=), %n (the VM's name) and %% (a %);
 *     %r, %s, %f and %c are required, other %-sequences are errors.
 *
 * Booleans (yes, no) are systemd's: also true/false, on/off, 1/0. Keys in
 * milliseconds take systemd time spans ("20ms", "2s"; a bare number is ms).
 * A misspelt key gets "did you mean" with the closest key (edit distance).
 * A standby with FailoverPolicy=auto needs Peer=; VmmArgs= must not set
 * what failover activation passes (--memory, --control, ...).
 *
 * Role-specific keys are accepted for both roles (a standby becomes primary
 * at failover and then needs what a primary needs); only the "required for"
 * checks depend on Role=. Failover keys are parsed and validated here and
 * used by the failover code (issue 4).
 *
 * Errors are negative errno values. Content errors are -EINVAL; -ENOMEM and
 * I/O errors are passed on. Functions that take `char **ret_errors` set it,
 * when non-NULL, on failure to a malloc()ed message of one or more lines
 * (separated by '\n', no trailing newline) that the caller logs and frees;
 * it is NULL when even that could not be allocated. On success it is not
 * touched. Nothing here logs: the caller decides; log the message line by
 * line (common/log.c truncates a record at 2 KiB). Paths and values quoted
 * in messages have control characters escaped, so a line is always one
 * error.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "macros.h"

#define CONFIG_MAIN_PATH "/etc/dirtyrep/dirtyrep.conf"
#define CONFIG_VM_DIR    "/etc/dirtyrep/vm.d"

#define CONFIG_FILE_MAX           (1024U * 1024U) /* bytes per file */
#define CONFIG_LINE_MAX           4096U           /* bytes per line, without the newline */
#define CONFIG_VMS_MAX            256U            /* *.conf files in the VM directory */
#define CONFIG_ERRORS_MAX         50U             /* error lines kept per file */
#define CONFIG_VM_NAME_MAX        64U
#define CONFIG_VMM_ARGS_MAX       64U
#define CONFIG_SECRET_MIN         16U
#define CONFIG_SECRET_MAX         4096U
#define CONFIG_ADDRESS_STRING_MAX 64U
#define CONFIG_HOSTNAME_MAX       253U /* TLSPeerName= */ /* "[ipv6]:port" fits, with room */

typedef enum VmRole {
        VM_ROLE_PRIMARY,
        VM_ROLE_STANDBY,
} VmRole;

typedef enum ConfigTracking {
        CONFIG_TRACKING_AUTO, /* ring where the kernel has it, else bitmap */
        CONFIG_TRACKING_RING,
        CONFIG_TRACKING_BITMAP,
} ConfigTracking;

typedef enum ConfigCompression {
        CONFIG_COMPRESSION_LZ4,
        CONFIG_COMPRESSION_NONE,
} ConfigCompression;

typedef enum VmmType {
        VMM_TYPE_DIRTYREP_VMM,
        VMM_TYPE_QEMU,
} VmmType;

typedef enum FailoverPolicy {
        FAILOVER_POLICY_MANUAL,
        FAILOVER_POLICY_AUTO,
        FAILOVER_POLICY_CLUSTER, /* Pacemaker decides (ocf:dirtyrep:dirtyrep): never promote on our own */
} FailoverPolicy;

typedef enum SplitBrainPolicy {
        SPLIT_BRAIN_POLICY_SUSPEND,
        SPLIT_BRAIN_POLICY_CONTINUE,
} SplitBrainPolicy;

/* A numeric socket address. len == 0: not set. */
typedef struct ConfigAddress {
        struct sockaddr_storage sa;
        socklen_t len;
        char text[CONFIG_ADDRESS_STRING_MAX]; /* normalised: "1.2.3.4:5" or "[::1]:5" */
} ConfigAddress;

/* An address with a prefix length (ServiceAddress=). family == AF_UNSPEC: not set. */
typedef struct ConfigCidr {
        int family;
        union {
                struct in_addr in;
                struct in6_addr in6;
        } addr;
        unsigned prefixlen;
} ConfigCidr;

typedef struct DaemonConfig {
        char *path;                   /* file it was parsed from, for messages */
        ConfigAddress listen_address; /* len == 0: no listener */
        int log_level;                /* LOG_DEBUG .. LOG_ERR (syslog.h) */
        char *state_directory;
        char *runtime_directory;
        bool runtime_directory_set; /* given in the file, not the default */
        char *image_directory;      /* NULL: state_directory + "/images" */
        uint32_t heartbeat_interval_ms;
        uint32_t heartbeat_misses;
} DaemonConfig;

typedef struct VmConfig {
        char *name;
        char *path; /* file it was parsed from, for messages */
        VmRole role;
        char *control_socket;
        bool control_socket_set; /* given in the file, not the default */
        ConfigAddress peer;      /* len == 0: not set */
        ConfigAddress listen;    /* len == 0: not set */
        uint32_t epoch_ms;
        ConfigTracking tracking;
        char *secret_file;
        uint32_t max_inflight_epochs;
        ConfigCompression compression;
        bool pre_copy;
        uint32_t max_staging_mb;
        char *vmm;
        char *vmm_args_string; /* as written, or NULL */
        char **vmm_args;       /* split, NULL-terminated; never NULL */
        size_t n_vmm_args;
        VmmType vmm_type;
        char *fence_command; /* or NULL */
        FailoverPolicy failover_policy;
        ConfigCidr service_address;
        char *service_interface; /* or NULL */
        uint32_t split_brain_timeout_ms;
        SplitBrainPolicy split_brain_policy;
        bool output_commit;
        bool console_commit;
        bool tls;            /* TLS= */
        char *tls_cert_file; /* or NULL */
        char *tls_key_file;  /* or NULL */
        char *tls_ca_file;   /* or NULL */
        char *tls_peer_name; /* or NULL */
} VmConfig;

typedef struct Config {
        DaemonConfig *daemon; /* never NULL in a loaded Config */
        VmConfig **vms;       /* sorted by name */
        size_t n_vms;
} Config;

/*
 * Loads main_path (missing: all defaults) and every vm_dir/NAME.conf (vm_dir
 * missing: no VMs), then runs config_validate(). Either path may be NULL to
 * skip it. Returns 0 and a Config the caller owns, or a negative errno and,
 * when ret_errors is non-NULL, every error found (content errors of all
 * files, I/O errors), each line naming "PATH:LINE:" or "PATH:".
 */
int config_load(const char *main_path, const char *vm_dir, Config **ret, char **ret_errors);

/* Frees a Config; accepts NULL; returns NULL. */
Config *config_free(Config *c);
DEFINE_TRIVIAL_CLEANUP_FUNC(Config *, config_free);

DaemonConfig *daemon_config_free(DaemonConfig *d);
DEFINE_TRIVIAL_CLEANUP_FUNC(DaemonConfig *, daemon_config_free);

VmConfig *vm_config_free(VmConfig *v);
DEFINE_TRIVIAL_CLEANUP_FUNC(VmConfig *, vm_config_free);

/* The VM called name, or NULL. The pointer lives as long as c. */
const VmConfig *config_find_vm(const Config *c, const char *name);

/*
 * Parses the text of one VM file (no I/O; the text need not be
 * NUL-terminated and may contain anything). path is used in messages only;
 * name is the VM's name (validated). Returns 0 and a VmConfig the caller
 * owns, or -EINVAL / -ENOMEM and the errors.
 */
int config_parse_vm_file(const char *path, const char *name, const char *text, size_t len, VmConfig **ret,
                         char **ret_errors);

/* Same for the daemon file. */
int config_parse_daemon_text(const char *path, const char *text, size_t len, DaemonConfig **ret,
                             char **ret_errors);

/* A DaemonConfig with every default. NULL on OOM. */
DaemonConfig *daemon_config_new_default(void);

/*
 * Cross-checks between files: two listeners (the daemon's ListenAddress=
 * and VMs' Listen=) that would bind the same port on overlapping addresses,
 * two VMs with the same ControlSocket= or ServiceAddress=. Returns 0, or
 * -EINVAL and the errors. -ENOMEM when the message cannot be built.
 */
int config_validate(const Config *c, char **ret_errors);

/*
 * Reads a shared-secret file. It must be a regular file, owned by root or by
 * the effective uid, with no group or other permission bits (mode & 077 ==
 * 0), and CONFIG_SECRET_MIN..CONFIG_SECRET_MAX bytes long. The bytes are used
 * as they are (a trailing newline is part of the secret). Returns 0 and a
 * malloc()ed buffer the caller frees with config_secret_free(), or a
 * negative errno (-EPERM for bad ownership or mode, -EBADFD for not a
 * regular file, -EMSGSIZE for a bad size, or the open/read error) and, when
 * ret_error is non-NULL, a one-line message "PATH: problem".
 */
int config_load_secret(const char *path, uint8_t **ret, size_t *ret_len, char **ret_error);

/* Zeroes and frees a secret from config_load_secret(). Accepts NULL. */
void config_secret_free(uint8_t *secret, size_t len);

/*
 * Parses "A.B.C.D:PORT" or "[IPV6]:PORT" (numeric addresses only, no scope
 * IDs, no names: nothing is looked up). Port 1..65535, or 0 when allow_port0.
 * Returns 0 and fills ret/ret_len (AF_INET or AF_INET6, network byte order),
 * -EINVAL for bad syntax, -ERANGE for a port out of range.
 */
int parse_socket_address(const char *s, struct sockaddr_storage *ret, socklen_t *ret_len, bool allow_port0);

/*
 * Formats a sockaddr_in / sockaddr_in6 as "1.2.3.4:5" / "[::1]:5" into buf.
 * Returns 0, -EAFNOSUPPORT, or -ENOBUFS when size is too small
 * (CONFIG_ADDRESS_STRING_MAX always suffices).
 */
int format_socket_address(const struct sockaddr_storage *sa, socklen_t len, char *buf, size_t size);

/*
 * Applies settings given on dirtyrepd's command line to the VM called name
 * in c (loaded by config_load()). assignments are "Key=Value" strings of
 * [VM] keys, parsed by the very parsers the files use; a key may appear at
 * most once per VM. When c has no VM of that name it is created from the
 * defaults (its default ControlSocket= follows the daemon's
 * RuntimeDirectory=), and then Role= and SecretFile= are required as in a
 * file. A VM defined by a file keeps every value the command line does not
 * override. The required-key checks run on the result (Role=primary needs a
 * Peer=, Role=standby a Listen=, ...). origin names the source in messages
 * ("command line (--vm web)"); the VM's path becomes it when the VM is new.
 * Call config_validate() after the last VM for the cross-checks.
 * Returns 0, or -EINVAL (c unchanged for this VM) / -ENOMEM and the errors
 * as config_load() does: "ORIGIN: EpochMs=0: must be between 1 and 10000".
 */
int config_apply_vm_settings(Config *c, const char *name, char *const *assignments, size_t n_assignments,
                             const char *origin, char **ret_errors);

/*
 * systemd-style values. config_parse_boolean(): 1 for yes/true/on/1/y/t, 0
 * for no/false/off/0/n/f (any case), -EINVAL otherwise.
 * config_parse_msec(): a time span ("20ms", "2s", "1.5s", "1min 30s"; a
 * bare number is milliseconds) in milliseconds; -EINVAL bad syntax or unit,
 * -ERANGE overflow, -EDOM not a whole number of milliseconds.
 */
int config_parse_boolean(const char *v);
int config_parse_msec(const char *s, uint64_t *ret);

/*
 * VmmArgs= as dirtyrep-vmm's getopt_long() reads it (abbreviations such as
 * "--mem" for --memory, "-m2G", "--console=FILE" included): fn is called
 * for every option recognised, with its full name, the word as written,
 * why failover activation cannot take it from VmmArgs= (NULL: it may) and
 * its value (NULL: none). Unknown and ambiguous options are skipped (the
 * VMM's own --check reports them). Returns 0 or fn's negative return.
 */
typedef int (*ConfigVmmArgFn)(const char *option, const char *as_written, const char *reason,
                              const char *value, void *userdata);
int config_vmm_args_scan(char *const *args, size_t n_args, ConfigVmmArgFn fn, void *userdata);
/* The long option names the scan knows (a static table). */
const char *const *config_vmm_option_names(size_t *ret_n);

/*
 * dirtyrep.service runs dirtyrepd with ProtectSystem=strict and
 * PrivateTmp=yes: only config_sandbox_writable (its RuntimeDirectory= and
 * StateDirectory=) can be written. config_check_sandbox() reports every
 * path the daemon or the VMM it starts at failover writes (StateDirectory=,
 * RuntimeDirectory=, each ControlSocket='s directory, a --console file in
 * VmmArgs=) outside them, or in the private /tmp. 0, or -EINVAL and the
 * errors.
 */
extern const char *const config_sandbox_writable[];
int config_check_sandbox(const Config *c, char **ret_errors);
/* The same for one path the daemon is asked to write (what names it in the message): 0, or
 * -EROFS and the message. */
int config_check_sandbox_path(const char *what, const char *path, char **ret_error);

/* A deep copy of d (for a VM that outlives a reload). NULL on OOM. */
DaemonConfig *daemon_config_copy(const DaemonConfig *d);

/*
 * Whether two configurations would run a VM (or the daemon's VMs) the same
 * way: every value compared, except the file path (messages only) and, for
 * the daemon, LogLevel= (applied in place). A reload leaves a VM alone
 * exactly when both say so.
 */
bool vm_config_equal(const VmConfig *a, const VmConfig *b);
bool daemon_config_equal(const DaemonConfig *a, const DaemonConfig *b);

/* Whether key is a [VM] key (exact spelling). */
bool config_vm_key_is_valid(const char *key);

/* Whether name is a valid VM name ([A-Za-z0-9_.-]{1,64}, no leading dot). */
bool config_vm_name_is_valid(const char *name);

const char *vm_role_to_string(VmRole r);
const char *config_tracking_to_string(ConfigTracking t);
const char *config_compression_to_string(ConfigCompression c);
const char *failover_policy_to_string(FailoverPolicy p);
const char *vmm_type_to_string(VmmType t);

/* The values of VmmArgs= placeholders for VmmType=qemu; NULL ones are not substituted. */
typedef struct VmmArgValues {
        const char *ram, *state, *ready_fd, *control, *name;
} VmmArgValues;
/*
 * Expands one VmmArgs= word of VmmType=qemu into a malloc()ed string
 * (*ret). Returns 0, -EINVAL for an unknown %-sequence (its character in
 * *ret_bad when given), -ENOMEM. Sets bit 0..3 of *ret_seen (when given)
 * for %r, %s, %f, %c found.
 */
int vmm_arg_expand(const char *word, const VmmArgValues *val, char **ret, char *ret_bad, unsigned *ret_seen);
/* NULL when VmmType=qemu's VmmArgs= has every required placeholder, else what is missing or wrong. */
const char *config_qemu_args_problem(const VmConfig *v, char *buf, size_t size);
const char *split_brain_policy_to_string(SplitBrainPolicy p);

/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * Shared by the files of the dirtyrepd configuration: daemon/config.c (what
 * the keys of a file mean together, the objects, loading, secrets),
 * daemon/config-parse.c (the value parsers, the key tables, the line
 * parser) and daemon/config-check.c (the checks that are not parsing). Not
 * part of config.h's interface.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/un.h>

#include "config.h"
#include "macros.h"

#define DEFAULT_STATE_DIRECTORY   "/var/lib/dirtyrep"
#define DEFAULT_RUNTIME_DIRECTORY "/run/dirtyrep"
#define VALUE_QUOTE_MAX           64U /* bytes of a value quoted in an error message */
#define ESCAPE_BUF_SIZE           (VALUE_QUOTE_MAX * 4 + 4)
#define SUN_PATH_MAX              (sizeof(((struct sockaddr_un *) NULL)->sun_path) - 1)

/* Error collection (config.c): bounded per file and per load, "PATH:LINE: message" lines. */
typedef struct ErrorList {
        char *buf; /* lines separated by '\n' */
        size_t len;
        unsigned n_file;        /* lines kept for the current file */
        unsigned dropped_file;  /* lines not kept for the current file */
        unsigned n_total;       /* lines kept over all files */
        unsigned dropped_total; /* lines not kept because of ERRORS_TOTAL_MAX */
        unsigned errors_file;   /* errors in the current file, kept or not */
        bool any;               /* at least one error, kept or not */
        bool oom;
} ErrorList;

void error_list_done(ErrorList *e);
/* Records "PATH:LINE: message" (or "PATH: message" for line 0). */
_printf_(4, 5) void error_add(ErrorList *e, const char *path, unsigned line, const char *fmt, ...);
/* Ends a file: says how many of its errors were not kept. */
void error_file_done(ErrorList *e, const char *path);
/* Hands the collected message to *ret_errors (when wanted) and returns r, or -ENOMEM
 * when the message could not be built. */
int error_list_finish(ErrorList *e, int r, char **ret_errors);
/* At most VALUE_QUOTE_MAX bytes of s, non-printable bytes as \xNN, in buf
 * (ESCAPE_BUF_SIZE bytes) for an error message. Returns buf. */
const char *escape_value(const char *s, char *buf, size_t size);

/* config-check.c: what failover needs of a VM's configuration (Peer= for
 * FailoverPolicy=auto, VmmArgs= not setting what activation passes), into e
 * at the given lines. */
void check_failover_needs(const VmConfig *v, ErrorList *e, const char *path, unsigned policy_line,
                          unsigned args_line);
/* config-check.c: the cross-file checks of config_validate(), into e. */
void validate_into(const Config *c, ErrorList *e);

/* ---- config-parse.c: keys, their values and the line parser ---------- */

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
        KEY_LIVE = 1 << 2,         /* applied without touching a VM: not compared by *_config_equal() */
};

struct KeyDef {
        const char *name;
        ValueParser parse;
        size_t offset;
        uint64_t min, max;          /* numbers; paths: max length; addresses: min port */
        const char *const *choices; /* enums: index == value, NULL-terminated */
        unsigned flags;
};

#define KEYS_MAX 32

/* Indices into the [Daemon] and [VM] key tables (config-parse.c). */
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

typedef struct SectionDef {
        const char *name;
        const KeyDef *keys;
        size_t n_keys;
} SectionDef;

extern const SectionDef daemon_section, vm_section;

/* What the line parser (or the command line) saw, for the checks that span keys. */
typedef struct ParseResult {
        unsigned section_line;   /* 0: the section never appeared */
        unsigned line[KEYS_MAX]; /* where each key was set, 0: not set or not from a file */
        bool given[KEYS_MAX];    /* whether each key was set */
        bool valid[KEYS_MAX];    /* and whether its value parsed */
} ParseResult;

/* Sets *field to a copy of value (NULL: unset), freeing the old one. 0 or -ENOMEM. */
int set_string(char **field, const char *value);
/* Frees a NULL-terminated string list (NULL is fine). */
void strv_free(char **l);
/* The key named key in sec (with its index in *ret_index), or NULL. */
const KeyDef *find_key(const SectionDef *sec, const char *key, bool ignore_case, size_t *ret_index);
/* The key a misspelling most likely meant, or NULL. */
const KeyDef *find_similar_key(const SectionDef *sec, const char *key);
/*
 * Sets key to value in target as sec describes, the one path every "Key=Value"
 * takes (a file's line, the command line's --set): unknown key (with "did you
 * mean"), a key given twice, an empty value, the key's parser. Records the key
 * in pr (line 0: not from a file). Content errors go to e as "PATH:LINE: ...";
 * returns 0 or -ENOMEM.
 */
int key_assign(const SectionDef *sec, void *target, const char *key, const char *value, const char *path,
               unsigned line, ParseResult *pr, ErrorList *e);

/*
 * What the key tables say about storage: every key's field is freed, copied
 * and compared by the kind of its value parser (a string, the split VmmArgs=,
 * an address, a number, ...), so a new key needs no code here. Fields that
 * are not keys (a VmConfig's name and path, ...) are the callers'.
 */
/* Frees the fields of sec's keys in target (and sets them to NULL). */
void section_fields_free(const SectionDef *sec, void *target);
/* dst is a byte copy of src: replaces its pointers to src's memory with copies. 0 or -ENOMEM
 * (the fields not copied yet are NULL, so section_fields_free() on dst is safe). */
int section_fields_copy(const SectionDef *sec, void *dst, const void *src);
/* Whether a and b hold the same values for every key not marked KEY_LIVE. */
bool section_fields_equal(const SectionDef *sec, const void *a, const void *b);

/*
 * Parses text into target (a DaemonConfig or VmConfig already holding the
 * defaults) as sec describes. Content errors go to e; returns 0 or -ENOMEM.
 */
int ini_parse(const char *path, const char *text, size_t len, const SectionDef *sec, void *target,
              ParseResult *pr, ErrorList *e);

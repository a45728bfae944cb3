/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * dirtyrepctl's exit codes (dirtyrepctl(1), EXIT STATUS) and the verbs that
 * live in their own files. A verb is int verb_NAME(int argc, char *argv[]):
 * argv[0] is the verb, and it returns one of the exit codes below.
 */

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <systemd/sd-bus.h>

enum {
        /* EXIT_SUCCESS 0, EXIT_FAILURE 1: anything not listed */
        EXIT_USAGE = 2,       /* bad command line */
        EXIT_NO_SUCH_VM = 3,  /* no VM of that name (or none at all) */
        EXIT_STATE = 4,       /* refused in the VM's current state (not primary, not attached, ...) */
        EXIT_DENIED = 5,      /* not root or in group dirtyrep */
        EXIT_UNREACHABLE = 6, /* no bus, or dirtyrepd not on it */
        EXIT_UNSUPPORTED = 7, /* the daemon lacks the method (e.g. Failover before issue 4) */
        EXIT_CONFIG = 8,      /* reload: the new configuration is invalid, nothing changed */
        /* status (the worst VM decides, in this order of severity, failed first): */
        EXIT_UNPROTECTED = 10, /* running without a committed replica: syncing, connecting,
                                * listening, attaching, detached, unprotected, ... */
        EXIT_SUSPENDED = 11,   /* the primary suspended its VM (split-brain guard) */
        EXIT_VM_FAILED = 12,   /* a VM's role failed, or its service address takeover did */
};

/* client/image.c (CRIU-style images), when it is built. */
int verb_image(int argc, char *argv[]);

/*
 * What client/dirtyrepctl.c shares with the verbs in their own files that
 * talk to dirtyrepd (client/monitor.c): the bus names, the command line
 * options they read, the bus connection and a VM's properties as read from it.
 */

#define BUS_NAME          "org.dirtyrep1"
#define BUS_MANAGER_PATH  "/org/dirtyrep1"
#define BUS_MANAGER_IFACE "org.dirtyrep1.Manager"
#define BUS_VM_PREFIX     "/org/dirtyrep1/vm"
#define BUS_VM_IFACE      "org.dirtyrep1.VM"
#define BUS_ERROR_PREFIX  "org.dirtyrep1.Error."

#define PROPS_MAX    64
#define NAME_MAX_LEN 64

extern bool arg_json;      /* --json */
extern uint64_t arg_count; /* events: stop after this many, 0: never */
extern sd_bus *bus;        /* acquire_bus() connects it */

typedef struct Prop {
        char name[48];
        char type; /* 's', 'b', 't', 'u', 'd' */
        char *s;
        uint64_t u;
        double d;
        bool b;
} Prop;

typedef struct VmInfo {
        char name[NAME_MAX_LEN + 1];
        char path[256];
        Prop props[PROPS_MAX];
        size_t n_props;
} VmInfo;

typedef struct VmList {
        char (*names)[NAME_MAX_LEN + 1];
        char (*roles)[16];
        char (*states)[32];
        size_t n;
} VmList;

/* Connects `bus` once (--bus-address=, $DIRTYREP_BUS_ADDRESS, else the system bus).
 * Returns 0, or minus an exit code (-EXIT_UNREACHABLE) with a message printed. */
int acquire_bus(void);

/* A VM's properties: read_props() fills v from an a{sv}, returns 0 or a negative errno
 * (the caller frees with vm_info_done() either way); prop_*() return a property's value, or "", 0, false
 * when it is missing or of another type; prop() returns NULL then. */
void vm_info_done(VmInfo *v);
const Prop *prop(const VmInfo *v, const char *name);
const char *prop_s(const VmInfo *v, const char *name);
uint64_t prop_u(const VmInfo *v, const char *name);
double prop_d(const VmInfo *v, const char *name);
bool prop_b(const VmInfo *v, const char *name);
int read_props(sd_bus_message *m, VmInfo *v);

/* list_vms() and get_vm_info() return 0 or an exit code, with a message printed;
 * the caller frees what they filled with vm_list_done() and vm_info_done(). */
void vm_list_done(VmList *l);
int list_vms(VmList *ret);
int get_vm_info(const char *name, VmInfo *v);

/* --json output: a JSON string literal, and a VM's properties as `, "Name": value` members. */
void json_string(FILE *f, const char *s);
void print_json_props(const VmInfo *v);

/* `dirtyrepctl status`'s exit code for one VM (EXIT_SUCCESS, EXIT_UNPROTECTED, ...). */
int vm_status_exit(const VmInfo *v);

/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * dirtyrepd's D-Bus API (sd-bus), org.dirtyrep1 on the system bus:
 *
 *   /org/dirtyrep1                 org.dirtyrep1.Manager  ListVMs, GetVM, Reload, Version
 *   /org/dirtyrep1/vm/<escaped>    org.dirtyrep1.VM       Checkpoint, Attach, Detach, status properties
 *
 * plus org.freedesktop.DBus.ObjectManager at /org/dirtyrep1. docs/architecture.md
 * ("Control plane") lists every member; systemd/org.dirtyrep1.conf is the
 * policy (anyone reads, root and group dirtyrep change things), and the
 * daemon checks the caller again for every mutating method.
 */

#include "manager.h"

#define BUS_NAME          "org.dirtyrep1"
#define BUS_MANAGER_PATH  "/org/dirtyrep1"
#define BUS_MANAGER_IFACE "org.dirtyrep1.Manager"
#define BUS_VM_PREFIX     "/org/dirtyrep1/vm"
#define BUS_VM_IFACE      "org.dirtyrep1.VM"
#define BUS_ERROR(name)   "org.dirtyrep1.Error." name
#define BUS_ADMIN_GROUP   "dirtyrep"

/*
 * Connects to m->bus_address (NULL: the system bus, which honours
 * DBUS_SYSTEM_BUS_ADDRESS), registers the objects, takes the bus name and
 * attaches to m->event. Returns 0 or a negative errno (logged). When the
 * connection drops later, the daemon keeps running and reconnects.
 */
int bus_open(Manager *m);
void bus_close(Manager *m);

/* Announce a VM object that appeared or went away (ObjectManager signals). */
void bus_vm_added(Manager *m, Vm *vm);
void bus_vm_removed(Manager *m, const char *name);

/* Emits PropertiesChanged for what changed since the last call for this VM. */
void bus_vm_check_changes(Manager *m, Vm *vm);

/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * dirtyrepctl's monitoring verbs (client/monitor.c). argv[0] is the verb;
 * each returns the process exit status (client/dirtyrepctl.h).
 *
 * `dirtyrepctl events`: follows dirtyrepd's signals (VM properties changed,
 * VMs added and removed, the daemon appearing and leaving) until Ctrl-C or
 * --count of them; --json lines, preceded by the state of every VM.
 *
 * `dirtyrepctl metrics [FILE]`: every VM's status in the Prometheus text
 * format, on stdout or atomically into FILE (node_exporter's textfile
 * collector).
 */
int verb_events(int argc, char *argv[]);
int verb_metrics(int argc, char *argv[]);

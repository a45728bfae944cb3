/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * The configuration checks that need the system (config.c, config-parse.c, config-check.c are pure):
 * every VM's SecretFile= read as the daemon reads it, and the VMM that
 * failover would start asked whether it accepts VmmArgs= together with
 * what activation passes (`Vmm= --check VmmArgs... --name ... --restore
 * ...`). `dirtyrepd --check-config` fails on them; at start-up they are
 * logged, so a mistake shows before the failover that would hit it.
 */

#include "config.h"

#define CHECK_VMM_TIMEOUT_USEC (10 * 1000 * 1000ULL)
#define CHECK_VMM_OUTPUT_MAX   4096U

/* Runs the checks of every VM of c. 0, or -EINVAL and one error line per problem
 * ("PATH: ...", as config_load()). -ENOMEM when the message cannot be built. */
int check_config_system(const Config *c, char **ret_errors);

/* The VMM check of one VM. 0, or a negative errno and a malloc()ed one-line reason. */
int check_vmm_args(const VmConfig *v, char **ret_error);

/* At start-up (before the event loop runs: the check may take up to CHECK_VMM_TIMEOUT_USEC, so
 * never on the loop): a standby's VMM check, logged as a warning when it fails (its failover would). */
void check_log_standby(const VmConfig *v);

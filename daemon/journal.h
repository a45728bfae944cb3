/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * dirtyrepd's records in the journal: when stderr is the journal (run by
 * systemd), every log record goes through sd_journal_sendv() with
 * PRIORITY=, CODE_FILE/LINE/FUNC=, ERRNO=, VM= (every "VM NAME: ..."
 * message) and, for the event kinds below, MESSAGE_ID= and EPOCH=. Find
 * them with `journalctl -u dirtyrep VM=web` or `journalctl
 * MESSAGE_ID=<id>`; dirtyrepd(8) lists the ids.
 */

/* Event kinds (MESSAGE_ID=). */
#define DR_MESSAGE_STARTED         "27faa4ecd2ff4139a711d05f75d99cf9" /* serving its VMs */
#define DR_MESSAGE_STOPPING        "e870ef0166f54aa08ba4a094a88428ba" /* SIGTERM: stopping */
#define DR_MESSAGE_RELOADED        "cacbcee0e36847d69c5d8b13d36310d2" /* configuration reloaded */
#define DR_MESSAGE_CONFIG_INVALID  "ef50291f81394102b6470bae81bb198d" /* start or reload refused */
#define DR_MESSAGE_ALREADY_RUNNING "c2c633ce7c144a339c74d4a6236b8602" /* a second daemon refused */
#define DR_MESSAGE_PROTECTED       "4aec3e1058a04312a1e2167c4a6aba3f" /* VM state: protected */
#define DR_MESSAGE_UNPROTECTED     "12ffb2d306624fbe811e686e25a89580" /* VM state: no committed replica */
#define DR_MESSAGE_SUSPENDED       "6895aa0ecab3405f9c9c0155e6920881" /* VM state: suspended(ing) */
#define DR_MESSAGE_FAILED          "d11803bdbd78443ca7c6896216bd911e" /* VM state: failed */
#define DR_MESSAGE_FAILOVER        "3ada128537ee44dba0ca6c9e0df178cb" /* a standby became the primary */
#define DR_MESSAGE_ADDRESS         "a216d575760d4fd19a6f3ef93062a144" /* service address state changed */

/* Routes log records to the journal when stderr is the journal (common/log.h, log_set_sink()). */
void journal_log_setup(void);

/* The MESSAGE_ID= of a VM state word (ReplStatus.state). */
const char *journal_state_message_id(const char *state);

/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * The service port: COM2 bridged to TCP clients.
 *
 * A serial line has no connections, so the port multiplexes at
 * transaction boundaries the guest announces: after it has written a
 * complete reply and has no further input to process, a guest writes
 * SERVICE_TURNAROUND (0xD5) to COM2's scratch register (docs/guest-abi.md).
 *
 * Up to SERVICE_CLIENTS_MAX clients are connected at once, each with its
 * own bounded input buffer. One is active: only its bytes feed COM2's
 * receive FIFO. At a turnaround (marker seen and every fed byte read by the
 * guest), or when the active client leaves, the next client with pending
 * input (round robin) becomes active. A guest that never writes the marker
 * serves one client at a time: the others wait, input buffered, until the
 * active one leaves and the line has been quiet for a while.
 *
 * Output: COM2's transmitter submits to the agent's channel 1, which holds
 * bytes until their epoch commits and then calls back (service_send()),
 * possibly long after the active client changed. So every byte the guest
 * writes to THR is attributed, in submit order, to the client active at
 * that moment (a FIFO of (client, count) segments the UART tap appends to)
 * and released bytes are consumed against that FIFO. Bytes of a client
 * that has gone are dropped.
 *
 * If the active client hangs up in the middle of a transaction (it may
 * have left a partial request in the guest), the port waits for the
 * guest's turnaround; if the line stays quiet, a guest that uses markers
 * is told by dropping carrier (MSR.DCD = 0) and acknowledges with a marker
 * once it discarded the partial request; DCD comes back before the next
 * client's first byte.
 *
 * Lock order: Uart lock, then Service lock. The I/O thread never holds the
 * Service lock while calling into the Uart.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "macros.h"
#include "uart.h"

#define SERVICE_OUT_MAX      (1U << 20)  /* released bytes buffered per client, and over all clients / 2 */
#define SERVICE_IN_MAX       (16U << 10) /* bytes read from a client and not yet fed to COM2 */
#define SERVICE_CLIENTS_MAX  64
#define SERVICE_SEGMENTS_MAX 65536 /* output attribution FIFO (one entry per change of client) */
#define SERVICE_TURNAROUND   0xD5  /* written to COM2's SCR by the guest: transaction done */

typedef struct Service Service;

/*
 * Binds and listens on addr:port (IPv4 or IPv6 literal or host name; port 0
 * picks one). Prints "dirtyrep-vmm: service port listening on ADDR:PORT"
 * on stderr once listening. addr NULL: no listener, the thread only kicks
 * the UARTs when output space comes back.
 */
int service_new(const char *addr, uint16_t port, Service **ret);
/*
 * `service` is the UART the clients feed and hear (COM2; the Service
 * installs its tap there); `console` is
 * another UART whose output may be back-pressured (COM1 with
 * --console-commit). Both are kicked when the thread wakes. Before
 * service_start().
 */
void service_set_uarts(Service *s, Uart *service, Uart *console);
bool service_listening(const Service *s);
int service_start(Service *s);
void service_stop(Service *s);
Service *service_free(Service *s);
DEFINE_TRIVIAL_CLEANUP_FUNC(Service *, service_free);

/*
 * Released output (any thread; never blocks): routed to the clients the
 * bytes were written for. Bytes for no client or a departed one are dropped.
 */
void service_send(Service *s, const void *buf, size_t len);

/* True while the client-side buffer has room: COM2 back pressure (called under the Uart lock). */
bool service_can_send(Service *s);

/* Something changed (output space came back, RX FIFO drained): wake the I/O thread. Any thread. */
void service_wake(Service *s);

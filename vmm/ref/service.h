/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * The service port: COM2 bridged to one TCP client at a time.
 *
 * An I/O thread accepts a client (a second one is closed at once), feeds
 * the client's bytes into COM2's receive FIFO (the FIFO is the bounded
 * buffer: the socket is only read while it has room) and writes out the
 * bytes the output-commit queue released (service_send()), buffering what
 * the socket does not take, up to SERVICE_OUT_MAX.
 *
 * COM2's transmitter does not talk to the socket: it submits to the
 * agent's channel 1, and the agent calls back (output_release) when the
 * epoch holding the bytes committed.
 *
 * Lock order: Uart lock, then Service lock. The I/O thread never holds the
 * Service lock while calling into the Uart.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "macros.h"
#include "uart.h"

#define SERVICE_OUT_MAX (1U << 20)

typedef struct Service Service;

/*
 * Binds and listens on addr:port (IPv4 or IPv6 literal or host name; port 0
 * picks one). Prints "dirtyrep-vmm: service port listening on ADDR:PORT"
 * on stderr once listening. addr NULL: no listener, the thread only kicks
 * the UARTs when output space comes back.
 */
int service_new(const char *addr, uint16_t port, Service **ret);
/*
 * `service` is the UART the client feeds and hears (COM2); `console` is
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

/* Released output for the client (any thread; never blocks). Dropped with an error if no client. */
void service_send(Service *s, const void *buf, size_t len);

/* True while the client-side buffer has room: COM2 back pressure (called under the Uart lock). */
bool service_can_send(Service *s);

/* Something changed (output space came back, RX FIFO drained): wake the I/O thread. Any thread. */
void service_wake(Service *s);

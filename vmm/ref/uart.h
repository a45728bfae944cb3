/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * 16550A UART: the full register set (DLAB divisor latch, IER, IIR/FCR,
 * LCR, MCR with loopback, LSR, MSR, SCR) and a receive FIFO. The RX FIFO is
 * deeper than a real 16550's 16 bytes (UART_RX_FIFO_MAX) so a TCP peer can
 * keep it fed without an extra buffer; the guest cannot tell except by
 * never seeing an overrun.
 *
 * The interrupt line is driven with KVM_IRQ_LINE: high while any enabled
 * condition is pending, low otherwise, so an edge-triggered 8259 sees a
 * rising edge for each new interrupt. When a new condition appears while
 * the line is already high (say THR empty while RX data waits), the line
 * is pulsed low/high so a guest that handles one cause per interrupt does
 * not lose the second.
 *
 * A Uart has its own lock: vCPU threads (port I/O) and the VMM's I/O
 * thread (RX bytes, TX kicks) call in concurrently. Backend callbacks are
 * called with that lock held; they must not call back into the Uart.
 */

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "macros.h"

#define UART_RX_FIFO_MAX 4096
#define UART_NR_PORTS    8

typedef struct UartBackend {
        /* A byte the guest transmitted. 0, or -ENOBUFS to keep it in THR and retry on uart_tx_kick(). */
        int (*tx)(void *userdata, uint8_t byte);
        /* False while output is back-pressured: LSR.THRE then reads 0. NULL: always ready. */
        bool (*tx_ready)(void *userdata);
        /* The guest drained RX bytes: the feeder may push more. Optional. */
        void (*rx_drained)(void *userdata);
} UartBackend;

/*
 * An observer of the line for a multiplexer (the service port). All four
 * are called with the Uart lock held, from whichever thread touched the
 * UART; they must not call back into the Uart. Optional as a whole.
 */
typedef struct UartTap {
        /*
         * The guest wrote a byte to THR that goes to backend.tx() next (now,
         * or on a uart_tx_kick() retry if tx() refused it). Bytes reach tx()
         * in exactly the order of these calls.
         */
        void (*tx_enqueue)(void *userdata);
        /* The byte of the last tx_enqueue() never reaches tx(): overwritten in THR, or tx() failed. */
        void (*tx_cancel)(void *userdata);
        /* The guest wrote SCR (offset 7). rx_empty: the receive FIFO holds no byte the guest has not read.
         */
        void (*scratch_write)(void *userdata, uint8_t value, bool rx_empty);
        /* uart_rx_fill(): copy up to `room` bytes to feed into `buf`; returns the count. */
        size_t (*rx_pull)(void *userdata, uint8_t *buf, size_t room, bool rx_empty);
} UartTap;

/* Register state as saved/restored (see proto/devices.proto). */
typedef struct UartState {
        uint8_t ier, lcr, mcr, lsr, msr, scr, dll, dlm, fcr;
        bool thr_interrupt;
        bool tx_hold_valid;
        uint8_t tx_hold;
        size_t rx_len;
        uint8_t rx[UART_RX_FIFO_MAX];
} UartState;

typedef struct Uart Uart;

/* A UART at I/O port `base` raising GSI `irq` on vm_fd. */
int uart_new(const char *name, uint16_t base, uint32_t irq, int vm_fd, const UartBackend *backend,
             void *userdata, Uart **ret);
Uart *uart_free(Uart *u);
DEFINE_TRIVIAL_CLEANUP_FUNC(Uart *, uart_free);

uint16_t uart_base(const Uart *u);

/* Port I/O from a vCPU: offset 0..7 from the base. */
uint8_t uart_read(Uart *u, unsigned offset);
void uart_write(Uart *u, unsigned offset, uint8_t value);

/* Bytes that uart_rx_push() would accept now. */
size_t uart_rx_space(Uart *u);
/* Feeds received bytes; returns how many were taken (the rest did not fit). */
size_t uart_rx_push(Uart *u, const uint8_t *buf, size_t len);

/* Installs a tap (NULL: none). Before the vCPUs run. */
void uart_set_tap(Uart *u, const UartTap *tap, void *userdata);
/* Pulls bytes through tap->rx_pull() into the receive FIFO while it has room, atomically with respect to
 * port I/O: no guest access sees a half-made decision. Returns the bytes added. */
size_t uart_rx_fill(Uart *u);
/*
 * Carrier detect (MSR.DCD): the peer hung up (false) or a peer is there
 * again (true). A change sets MSR.DDCD and raises the modem-status
 * interrupt when the guest enabled it (IER.MSI).
 */
void uart_set_carrier(Uart *u, bool up);

/* Output space may have come back: retry a held TX byte, signal THR empty. */
void uart_tx_kick(Uart *u);

void uart_save(Uart *u, UartState *ret);
/* Applies a saved state (values are masked to what the registers hold) and re-drives the IRQ line. */
void uart_restore(Uart *u, const UartState *s);

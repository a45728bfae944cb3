/* SPDX-License-Identifier: GPL-2.0-or-later */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvm.h"
#include "log.h"
#include "uart.h"

/* Register offsets */
#define UART_RBR 0 /* read, DLAB=0 */
#define UART_THR 0 /* write, DLAB=0 */
#define UART_DLL 0 /* DLAB=1 */
#define UART_IER 1 /* DLAB=0 */
#define UART_DLM 1 /* DLAB=1 */
#define UART_IIR 2 /* read */
#define UART_FCR 2 /* write */
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define UART_MSR 6
#define UART_SCR 7

#define IER_RDI  0x01
#define IER_THRI 0x02
#define IER_RLSI 0x04
#define IER_MSI  0x08
#define IER_MASK 0x0f

#define IIR_NO_INT 0x01
#define IIR_MSI    0x00
#define IIR_THRI   0x02
#define IIR_RDI    0x04
#define IIR_RLSI   0x06
#define IIR_FIFO   0xc0

#define FCR_ENABLE   0x01
#define FCR_CLEAR_RX 0x02
#define FCR_CLEAR_TX 0x04

#define LCR_DLAB 0x80

#define MCR_DTR  0x01
#define MCR_RTS  0x02
#define MCR_OUT1 0x04
#define MCR_OUT2 0x08
#define MCR_LOOP 0x10
#define MCR_MASK 0x1f

#define LSR_DR   0x01
#define LSR_OE   0x02
#define LSR_PE   0x04
#define LSR_FE   0x08
#define LSR_BI   0x10
#define LSR_THRE 0x20
#define LSR_TEMT 0x40
#define LSR_ERRS (LSR_OE | LSR_PE | LSR_FE | LSR_BI)

#define MSR_DCTS   0x01
#define MSR_DDSR   0x02
#define MSR_TERI   0x04
#define MSR_DDCD   0x08
#define MSR_CTS    0x10
#define MSR_DSR    0x20
#define MSR_RI     0x40
#define MSR_DCD    0x80
#define MSR_DELTAS 0x0f

struct Uart {
        pthread_mutex_t lock;
        char name[16];
        uint16_t base;
        uint32_t irq;
        int vm_fd;
        UartBackend backend;
        void *userdata;
        UartTap tap;
        bool tap_set;
        void *tap_userdata;
        bool carrier_down; /* uart_set_carrier(false): MSR.DCD reads 0 outside loopback */

        uint8_t ier, lcr, mcr, lsr_errs, msr, scr, dll, dlm, fcr;
        bool thr_interrupt; /* THR-empty interrupt pending until IIR read or THR write */
        bool tx_hold_valid; /* a byte the backend refused (-ENOBUFS) waits in THR */
        uint8_t tx_hold;
        bool tx_blocked_seen; /* the guest saw THRE=0: signal THR empty when it clears */

        uint8_t rx[UART_RX_FIFO_MAX];
        size_t rx_head, rx_len;

        bool irq_level;
        uint8_t last_iir;
        bool irq_error_logged;
};

static void uart_set_line(Uart *u, int level)
{
        int r = kvm_irq_line(u->vm_fd, u->irq, level);
        if (r < 0 && !u->irq_error_logged) {
                log_error_errno(r, "%s: KVM_IRQ_LINE(%u, %d) failed: %m", u->name, u->irq, level);
                u->irq_error_logged = true;
        }
}

static bool uart_thr_empty(Uart *u)
{
        if (u->tx_hold_valid)
                return false;
        if (u->mcr & MCR_LOOP)
                return true;
        return !u->backend.tx_ready || u->backend.tx_ready(u->userdata);
}

static uint8_t uart_lsr(Uart *u)
{
        uint8_t lsr = u->lsr_errs;

        if (u->rx_len > 0)
                lsr |= LSR_DR;
        if (uart_thr_empty(u))
                lsr |= LSR_THRE | LSR_TEMT;
        else
                u->tx_blocked_seen = true;
        return lsr;
}

static uint8_t uart_compute_iir(Uart *u)
{
        uint8_t id;

        if ((u->ier & IER_RLSI) && (u->lsr_errs & LSR_ERRS))
                id = IIR_RLSI;
        else if ((u->ier & IER_RDI) && u->rx_len > 0)
                id = IIR_RDI;
        else if ((u->ier & IER_THRI) && u->thr_interrupt)
                id = IIR_THRI;
        else if ((u->ier & IER_MSI) && (u->msr & MSR_DELTAS))
                id = IIR_MSI;
        else
                id = IIR_NO_INT;
        return id | ((u->fcr & FCR_ENABLE) ? IIR_FIFO : 0);
}

/* Called with the lock held after any state change. */
static void uart_update_irq(Uart *u)
{
        uint8_t iir = uart_compute_iir(u);
        bool pending = !(iir & IIR_NO_INT);

        if (pending && !u->irq_level) {
                uart_set_line(u, 1);
        } else if (!pending && u->irq_level) {
                uart_set_line(u, 0);
        } else if (pending && u->irq_level && iir != u->last_iir) {
                /* A different cause while the line is high: make a fresh edge. */
                uart_set_line(u, 0);
                uart_set_line(u, 1);
        }
        u->irq_level = pending;
        u->last_iir = iir;
}

static void uart_rx_clear(Uart *u)
{
        u->rx_head = u->rx_len = 0;
}

static size_t uart_rx_put_locked(Uart *u, const uint8_t *buf, size_t len)
{
        size_t n = MIN(len, UART_RX_FIFO_MAX - u->rx_len);

        for (size_t i = 0; i < n; i++)
                u->rx[(u->rx_head + u->rx_len + i) % UART_RX_FIFO_MAX] = buf[i];
        u->rx_len += n;
        return n;
}

static void uart_modem_status(Uart *u)
{
        uint8_t old = u->msr, lines;

        if (u->mcr & MCR_LOOP) {
                lines = 0;
                if (u->mcr & MCR_RTS)
                        lines |= MSR_CTS;
                if (u->mcr & MCR_DTR)
                        lines |= MSR_DSR;
                if (u->mcr & MCR_OUT1)
                        lines |= MSR_RI;
                if (u->mcr & MCR_OUT2)
                        lines |= MSR_DCD;
        } else {
                lines = MSR_DSR | MSR_CTS; /* a peer is always "connected"... */
                if (!u->carrier_down)
                        lines |= MSR_DCD; /* ...unless the multiplexer said it hung up */
        }
        u->msr = lines | (old & MSR_DELTAS);
        if ((old ^ lines) & MSR_CTS)
                u->msr |= MSR_DCTS;
        if ((old ^ lines) & MSR_DSR)
                u->msr |= MSR_DDSR;
        if ((old ^ lines) & MSR_DCD)
                u->msr |= MSR_DDCD;
        if ((old & MSR_RI) && !(lines & MSR_RI))
                u->msr |= MSR_TERI;
}

int uart_new(const char *name, uint16_t base, uint32_t irq, int vm_fd, const UartBackend *backend,
             void *userdata, Uart **ret)
{
        Uart *u;

        u = calloc(1, sizeof(*u));
        if (!u)
                return -ENOMEM;
        pthread_mutex_init(&u->lock, NULL);
        snprintf(u->name, sizeof(u->name), "%s", name);
        u->base = base;
        u->irq = irq;
        u->vm_fd = vm_fd;
        u->backend = *backend;
        u->userdata = userdata;
        /* Power-on state: 8N1 at 9600 baud, modem lines up. */
        u->lcr = 0x03;
        u->dll = 0x0c;
        u->msr = MSR_DCD | MSR_DSR | MSR_CTS;
        u->last_iir = IIR_NO_INT;
        *ret = u;
        return 0;
}

Uart *uart_free(Uart *u)
{
        if (!u)
                return NULL;
        pthread_mutex_destroy(&u->lock);
        free(u);
        return NULL;
}

uint16_t uart_base(const Uart *u)
{
        return u->base;
}

uint8_t uart_read(Uart *u, unsigned offset)
{
        uint8_t v = 0xff;
        bool drained = false;

        pthread_mutex_lock(&u->lock);
        switch (offset) {
        case UART_RBR:
                if (u->lcr & LCR_DLAB) {
                        v = u->dll;
                        break;
                }
                v = 0;
                if (u->rx_len > 0) {
                        v = u->rx[u->rx_head];
                        u->rx_head = (u->rx_head + 1) % UART_RX_FIFO_MAX;
                        u->rx_len--;
                        drained = true;
                }
                break;
        case UART_IER:
                v = (u->lcr & LCR_DLAB) ? u->dlm : u->ier;
                break;
        case UART_IIR:
                v = uart_compute_iir(u);
                /* Reading IIR while it reports THR empty acknowledges that interrupt. */
                if ((v & 0x0f) == IIR_THRI)
                        u->thr_interrupt = false;
                break;
        case UART_LCR:
                v = u->lcr;
                break;
        case UART_MCR:
                v = u->mcr;
                break;
        case UART_LSR:
                v = uart_lsr(u);
                u->lsr_errs = 0; /* error bits clear on read */
                break;
        case UART_MSR:
                v = u->msr;
                u->msr &= (uint8_t) ~MSR_DELTAS;
                break;
        case UART_SCR:
                v = u->scr;
                break;
        }
        uart_update_irq(u);
        /* Tell the feeder when the FIFO drained, not for every byte: it refills in bulk. */
        if (drained && u->rx_len == 0 && u->backend.rx_drained)
                u->backend.rx_drained(u->userdata);
        pthread_mutex_unlock(&u->lock);
        return v;
}

static void uart_transmit(Uart *u, uint8_t byte)
{
        int r;

        if (u->mcr & MCR_LOOP) {
                if (uart_rx_put_locked(u, &byte, 1) == 0)
                        u->lsr_errs |= LSR_OE;
                u->thr_interrupt = true;
                return;
        }
        if (u->tap_set)
                u->tap.tx_enqueue(u->tap_userdata);
        r = u->backend.tx(u->userdata, byte);
        if (r < 0 && r != -ENOBUFS && u->tap_set)
                u->tap.tx_cancel(u->tap_userdata); /* lost, like a byte on a broken line */
        if (r == -ENOBUFS) {
                /* Output queue full: the byte stays in THR, THRE reads 0 until uart_tx_kick(). */
                u->tx_hold = byte;
                u->tx_hold_valid = true;
                u->tx_blocked_seen = true;
                return;
        }
        /* Transmission is instant; THR is empty again unless we are back-pressured. */
        if (uart_thr_empty(u))
                u->thr_interrupt = true;
        else
                u->tx_blocked_seen = true;
}

void uart_write(Uart *u, unsigned offset, uint8_t value)
{
        pthread_mutex_lock(&u->lock);
        switch (offset) {
        case UART_THR:
                if (u->lcr & LCR_DLAB) {
                        u->dll = value;
                        break;
                }
                u->thr_interrupt = false;
                if (u->tx_hold_valid) {
                        /* Writing a full THR overwrites it on real hardware too; count it as lost. */
                        log_debug("%s: THR written while full, byte 0x%02x dropped", u->name, u->tx_hold);
                        u->tx_hold_valid = false;
                        if (u->tap_set)
                                u->tap.tx_cancel(u->tap_userdata);
                }
                uart_transmit(u, value);
                break;
        case UART_IER:
                if (u->lcr & LCR_DLAB) {
                        u->dlm = value;
                        break;
                }
                /* Enabling the THR-empty interrupt with THR empty raises it at once (8250 behaviour). */
                if (!(u->ier & IER_THRI) && (value & IER_THRI) && uart_thr_empty(u))
                        u->thr_interrupt = true;
                u->ier = value & IER_MASK;
                break;
        case UART_FCR:
                if (value & FCR_CLEAR_RX)
                        uart_rx_clear(u);
                if ((value ^ u->fcr) & FCR_ENABLE)
                        uart_rx_clear(u); /* toggling FIFO mode resets the FIFOs */
                u->fcr = value & 0xc9;    /* enable, DMA mode, trigger level */
                break;
        case UART_LCR:
                u->lcr = value;
                break;
        case UART_MCR:
                u->mcr = value & MCR_MASK;
                uart_modem_status(u);
                break;
        case UART_LSR:
                break; /* read-only (factory test register) */
        case UART_MSR:
                break; /* read-only */
        case UART_SCR:
                u->scr = value;
                if (u->tap_set)
                        u->tap.scratch_write(u->tap_userdata, value, u->rx_len == 0);
                break;
        }
        uart_update_irq(u);
        pthread_mutex_unlock(&u->lock);
}

size_t uart_rx_space(Uart *u)
{
        size_t n;

        pthread_mutex_lock(&u->lock);
        n = UART_RX_FIFO_MAX - u->rx_len;
        pthread_mutex_unlock(&u->lock);
        return n;
}

size_t uart_rx_push(Uart *u, const uint8_t *buf, size_t len)
{
        size_t n;

        pthread_mutex_lock(&u->lock);
        /* In loopback mode the receiver is cut off from the outside. */
        n = (u->mcr & MCR_LOOP) ? len : uart_rx_put_locked(u, buf, len);
        uart_update_irq(u);
        pthread_mutex_unlock(&u->lock);
        return n;
}

void uart_set_tap(Uart *u, const UartTap *tap, void *userdata)
{
        pthread_mutex_lock(&u->lock);
        u->tap_set = tap != NULL;
        if (tap)
                u->tap = *tap;
        u->tap_userdata = userdata;
        pthread_mutex_unlock(&u->lock);
}

size_t uart_rx_fill(Uart *u)
{
        uint8_t buf[UART_RX_FIFO_MAX];
        size_t total = 0;

        pthread_mutex_lock(&u->lock);
        /* In loopback mode the receiver is cut off from the outside: leave the bytes with the feeder. */
        while (u->tap_set && u->tap.rx_pull && !(u->mcr & MCR_LOOP) && u->rx_len < UART_RX_FIFO_MAX) {
                size_t n =
                        u->tap.rx_pull(u->tap_userdata, buf, UART_RX_FIFO_MAX - u->rx_len, u->rx_len == 0);

                if (n == 0)
                        break;
                total += uart_rx_put_locked(u, buf, MIN(n, UART_RX_FIFO_MAX - u->rx_len));
        }
        if (total > 0)
                uart_update_irq(u);
        pthread_mutex_unlock(&u->lock);
        return total;
}

void uart_set_carrier(Uart *u, bool up)
{
        pthread_mutex_lock(&u->lock);
        if (u->carrier_down == !up) {
                pthread_mutex_unlock(&u->lock);
                return;
        }
        u->carrier_down = !up;
        uart_modem_status(u);
        uart_update_irq(u);
        pthread_mutex_unlock(&u->lock);
}

void uart_tx_kick(Uart *u)
{
        pthread_mutex_lock(&u->lock);
        if (u->tx_hold_valid && (!u->backend.tx_ready || u->backend.tx_ready(u->userdata))) {
                /* Any other error keeps the byte for the next kick, as a refusal does. */
                if (u->backend.tx(u->userdata, u->tx_hold) == 0)
                        u->tx_hold_valid = false;
        }
        if (u->tx_blocked_seen && uart_thr_empty(u)) {
                u->tx_blocked_seen = false;
                u->thr_interrupt = true;
        }
        uart_update_irq(u);
        pthread_mutex_unlock(&u->lock);
}

void uart_save(Uart *u, UartState *s)
{
        pthread_mutex_lock(&u->lock);
        *s = (UartState){
                .ier = u->ier,
                .lcr = u->lcr,
                .mcr = u->mcr,
                .lsr = u->lsr_errs,
                .msr = u->msr,
                .scr = u->scr,
                .dll = u->dll,
                .dlm = u->dlm,
                .fcr = u->fcr,
                .thr_interrupt = u->thr_interrupt,
                .tx_hold_valid = u->tx_hold_valid,
                .tx_hold = u->tx_hold,
                .rx_len = u->rx_len,
        };
        for (size_t i = 0; i < u->rx_len; i++)
                s->rx[i] = u->rx[(u->rx_head + i) % UART_RX_FIFO_MAX];
        pthread_mutex_unlock(&u->lock);
}

void uart_restore(Uart *u, const UartState *s)
{
        pthread_mutex_lock(&u->lock);
        u->ier = s->ier & IER_MASK;
        u->lcr = s->lcr;
        u->mcr = s->mcr & MCR_MASK;
        u->lsr_errs = s->lsr & LSR_ERRS;
        u->msr = s->msr;
        u->scr = s->scr;
        u->dll = s->dll;
        u->dlm = s->dlm;
        u->fcr = s->fcr & 0xc9;
        u->thr_interrupt = s->thr_interrupt;
        /* A byte restored into THR goes to tx() before any new one: account for it like a THR write. */
        if (u->tx_hold_valid && u->tap_set)
                u->tap.tx_cancel(u->tap_userdata);
        u->tx_hold_valid = s->tx_hold_valid;
        u->tx_hold = s->tx_hold;
        if (u->tx_hold_valid && u->tap_set)
                u->tap.tx_enqueue(u->tap_userdata);
        uart_rx_clear(u);
        uart_rx_put_locked(u, s->rx, MIN(s->rx_len, (size_t) UART_RX_FIFO_MAX));
        /* Re-drive the line from the restored state; the irqchip state came back separately. */
        u->last_iir = uart_compute_iir(u);
        u->irq_level = !(u->last_iir & IIR_NO_INT);
        uart_set_line(u, u->irq_level);
        pthread_mutex_unlock(&u->lock);
}

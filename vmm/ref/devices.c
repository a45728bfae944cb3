/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The VMM's devices on the port I/O bus (COM1, COM2, the debug-exit port)
 * and their state for SaveState / --restore (proto/devices.proto).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "devices.pb-c.h"
#include "log.h"
#include "vmm.h"

#define DEVICES_BLOB_MAX (1U << 20)

static Uart *devices_uart(Vm *vm, uint16_t port)
{
        if (port >= COM1_BASE && port < COM1_BASE + UART_NR_PORTS)
                return vm->com1;
        if (port >= COM2_BASE && port < COM2_BASE + UART_NR_PORTS)
                return vm->com2;
        return NULL;
}

void devices_pio(Vcpu *v, uint16_t port, bool out, uint8_t *data, unsigned size)
{
        Vm *vm = v->vm;
        Uart *u = devices_uart(vm, port);

        if (u) {
                /* The UART is a byte device; wider accesses use the low byte, as on ISA. */
                if (out)
                        uart_write(u, port - uart_base(u), data[0]);
                else {
                        memset(data, 0xff, size);
                        data[0] = uart_read(u, port - uart_base(u));
                }
                return;
        }

        if (port == DEBUG_EXIT_PORT) {
                uint32_t value = 0;

                if (!out) {
                        memset(data, 0xff, size);
                        return;
                }
                memcpy(&value, data, size);
                /* QEMU isa-debug-exit semantics; the OS keeps the low 8 bits of the status. */
                log_info("Guest wrote 0x%x to the debug-exit port; exiting with status %u", value,
                         ((value << 1) | 1) & 0xff);
                vm_request_exit(vm, (int) (((value << 1) | 1) & 0xff));
                return;
        }

        /* Nothing here: reads float high, writes vanish (port 0x80 delays, PCI probes, ...). */
        if (!out)
                memset(data, 0xff, size);
        if (v->unhandled_logged < 16) {
                v->unhandled_logged++;
                log_debug("vCPU %u: %s of %u bytes at unassigned port 0x%x", v->index,
                          out ? "write" : "read", size, port);
        }
}

static void uart_to_proto(Uart *u, UartState *st, Dr__Devices__Uart *m)
{
        uart_save(u, st);
        dr__devices__uart__init(m);
        m->port = uart_base(u);
        m->ier = st->ier;
        m->lcr = st->lcr;
        m->mcr = st->mcr;
        m->lsr = st->lsr;
        m->msr = st->msr;
        m->scr = st->scr;
        m->dll = st->dll;
        m->dlm = st->dlm;
        m->fcr = st->fcr;
        m->has_thr_interrupt = true;
        m->thr_interrupt = st->thr_interrupt;
        m->has_rx_fifo = true;
        m->rx_fifo.data = st->rx;
        m->rx_fifo.len = st->rx_len;
        m->has_tx_hold = st->tx_hold_valid;
        m->tx_hold = st->tx_hold;
}

int devices_save(Vm *vm, uint8_t **ret_buf, size_t *ret_len)
{
        _cleanup_free_ UartState *st = NULL;
        Dr__Devices__Uart uarts[2], *uart_ptrs[2] = {&uarts[0], &uarts[1]};
        Dr__Devices__Devices d = DR__DEVICES__DEVICES__INIT;
        uint8_t *buf;
        size_t len;

        st = calloc(2, sizeof(UartState));
        if (!st)
                return -ENOMEM;
        uart_to_proto(vm->com1, &st[0], &uarts[0]);
        uart_to_proto(vm->com2, &st[1], &uarts[1]);
        d.format = DR__DEVICES__DEVICES_FORMAT__DEVICES_FORMAT_CURRENT;
        d.n_uarts = 2;
        d.uarts = uart_ptrs;

        len = dr__devices__devices__get_packed_size(&d);
        buf = malloc(MAX(len, (size_t) 1));
        if (!buf)
                return -ENOMEM;
        dr__devices__devices__pack(&d, buf);
        *ret_buf = buf;
        *ret_len = len;
        return 0;
}

static int uart_from_proto(Uart *u, const Dr__Devices__Uart *m)
{
        _cleanup_free_ UartState *st = NULL;

        /* Registers are 8 bits wide; anything else is a corrupt or hostile blob. */
        if (m->ier > 0xff || m->lcr > 0xff || m->mcr > 0xff || m->lsr > 0xff || m->msr > 0xff ||
            m->scr > 0xff || m->dll > 0xff || m->dlm > 0xff || m->fcr > 0xff ||
            (m->has_tx_hold && m->tx_hold > 0xff))
                return -EBADMSG;
        if (m->has_rx_fifo && m->rx_fifo.len > UART_RX_FIFO_MAX)
                return -EBADMSG;
        st = calloc(1, sizeof(*st));
        if (!st)
                return -ENOMEM;
        *st = (UartState){
                .ier = (uint8_t) m->ier,
                .lcr = (uint8_t) m->lcr,
                .mcr = (uint8_t) m->mcr,
                .lsr = (uint8_t) m->lsr,
                .msr = (uint8_t) m->msr,
                .scr = (uint8_t) m->scr,
                .dll = (uint8_t) m->dll,
                .dlm = (uint8_t) m->dlm,
                .fcr = (uint8_t) m->fcr,
                .thr_interrupt = m->has_thr_interrupt && m->thr_interrupt,
                .tx_hold_valid = m->has_tx_hold,
                .tx_hold = (uint8_t) m->tx_hold,
        };
        if (m->has_rx_fifo && m->rx_fifo.len > 0) { /* an empty bytes field has data == NULL */
                memcpy(st->rx, m->rx_fifo.data, m->rx_fifo.len);
                st->rx_len = m->rx_fifo.len;
        }
        uart_restore(u, st);
        return 0;
}

int devices_restore(Vm *vm, const uint8_t *buf, size_t len)
{
        Dr__Devices__Devices *d;
        int r = 0;

        if (len > DEVICES_BLOB_MAX)
                return log_error_errno(-EFBIG, "Device state too large (%zu bytes)", len);
        if (len == 0) {
                log_warning("Saved state has no device state; devices start from power-on state");
                return 0;
        }
        d = dr__devices__devices__unpack(NULL, len, buf);
        if (!d)
                return log_error_errno(-EBADMSG, "Device state is not a valid dr.devices.Devices message");
        if (d->format != DR__DEVICES__DEVICES_FORMAT__DEVICES_FORMAT_CURRENT) {
                r = log_error_errno(-EPROTONOSUPPORT, "Device state format %u is not supported", d->format);
                goto out;
        }
        for (size_t i = 0; i < d->n_uarts; i++) {
                Uart *u = devices_uart(vm, (uint16_t) MIN(d->uarts[i]->port, 0xffffU));

                if (!u || uart_base(u) != d->uarts[i]->port) {
                        r = log_error_errno(-EBADMSG, "Device state has a UART at unknown port 0x%x",
                                            d->uarts[i]->port);
                        goto out;
                }
                r = uart_from_proto(u, d->uarts[i]);
                if (r < 0) {
                        log_error_errno(r, "Device state of the UART at 0x%x is invalid: %m",
                                        d->uarts[i]->port);
                        goto out;
                }
        }
out:
        dr__devices__devices__free_unpacked(d, NULL);
        return r;
}

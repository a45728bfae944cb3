/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * VM state save/restore: KVM ioctls <-> VmSnapshot <-> dr.vmstate.VmState.
 *
 * Restore order (docs/kvm-host.md, verified on this host even for a Linux kernel
 * mid-boot): per vCPU CPUID2, MP_STATE, REGS, SREGS, XSAVE, XCRS, DEBUGREGS,
 * LAPIC, MSRS (after LAPIC, so IA32_TSC_DEADLINE lands in a configured
 * LAPIC timer), VCPU_EVENTS; then per VM PIT2, CLOCK, IRQCHIP x3.
 */
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <string.h>
#include <sys/ioctl.h>

#include "dr-agent.h"
#include "log.h"
#include "macros.h"
#include "state.h"
#include "vmstate.pb-c.h"

/* ---- snapshot objects ---- */

static void vcpu_snapshot_done(VcpuSnapshot *v)
{
        free(v->cpuid);
        free(v->xsave);
        free(v->msrs);
}

VmSnapshot *vm_snapshot_free(VmSnapshot *s)
{
        if (!s)
                return NULL;
        for (unsigned i = 0; i < s->n_vcpus; i++)
                vcpu_snapshot_done(&s->vcpus[i]);
        free(s->vcpus);
        free(s->devices);
        free(s);
        return NULL;
}

int vm_snapshot_new(unsigned n_vcpus, VmSnapshot **ret)
{
        _cleanup_(vm_snapshot_freep) VmSnapshot *s = NULL;

        if (n_vcpus == 0 || n_vcpus > STATE_MAX_VCPUS)
                return -EINVAL;
        s = calloc(1, sizeof(*s));
        if (!s)
                return -ENOMEM;
        s->vcpus = calloc(n_vcpus, sizeof(VcpuSnapshot));
        if (!s->vcpus)
                return -ENOMEM;
        s->n_vcpus = n_vcpus;
        for (unsigned i = 0; i < n_vcpus; i++)
                s->vcpus[i].index = i;
        *ret = TAKE_PTR(s);
        return 0;
}

/* ---- encoding ---- */

/*
 * protobuf-c wants a tree of message structs; they all live in one arena
 * that is freed after packing, so no error path can leak a subtree.
 */
typedef struct Arena {
        void **ptrs;
        size_t n, cap;
} Arena;

static void arena_done(Arena *a)
{
        for (size_t i = 0; i < a->n; i++)
                free(a->ptrs[i]);
        free(a->ptrs);
}

static void *arena_alloc(Arena *a, size_t size)
{
        void *p;

        if (a->n == a->cap) {
                size_t cap = a->cap ? a->cap * 2 : 64;
                void **n = realloc(a->ptrs, cap * sizeof(void *));
                if (!n)
                        return NULL;
                a->ptrs = n;
                a->cap = cap;
        }
        p = calloc(1, size ?: 1);
        if (!p)
                return NULL;
        a->ptrs[a->n++] = p;
        return p;
}

#define ARENA_NEW(a, type, init)                                                                            \
        ({                                                                                                  \
                type *_m_ = arena_alloc((a), sizeof(type));                                                 \
                if (_m_)                                                                                    \
                        *_m_ = (type) init;                                                                 \
                _m_;                                                                                        \
        })

static Dr__Vmstate__Segment *encode_segment(Arena *a, const struct kvm_segment *s)
{
        Dr__Vmstate__Segment *m = ARENA_NEW(a, Dr__Vmstate__Segment, DR__VMSTATE__SEGMENT__INIT);
        if (!m)
                return NULL;
        m->base_address = s->base;
        m->limit = s->limit;
        m->selector = s->selector;
        m->type = s->type;
        m->present = s->present;
        m->dpl = s->dpl;
        m->db = s->db;
        m->s = s->s;
        m->l = s->l;
        m->g = s->g;
        m->avl = s->avl;
        m->unusable = s->unusable;
        return m;
}

static Dr__Vmstate__DescriptorTable *encode_dtable(Arena *a, const struct kvm_dtable *d)
{
        Dr__Vmstate__DescriptorTable *m =
                ARENA_NEW(a, Dr__Vmstate__DescriptorTable, DR__VMSTATE__DESCRIPTOR_TABLE__INIT);
        if (!m)
                return NULL;
        m->base_address = d->base;
        m->limit = d->limit;
        return m;
}

static Dr__Vmstate__PicState *encode_pic(Arena *a, const struct kvm_pic_state *p)
{
        Dr__Vmstate__PicState *m = ARENA_NEW(a, Dr__Vmstate__PicState, DR__VMSTATE__PIC_STATE__INIT);
        if (!m)
                return NULL;
        m->last_irr = p->last_irr;
        m->irr = p->irr;
        m->imr = p->imr;
        m->isr = p->isr;
        m->priority_add = p->priority_add;
        m->irq_base = p->irq_base;
        m->read_reg_select = p->read_reg_select;
        m->poll = p->poll;
        m->special_mask = p->special_mask;
        m->init_state = p->init_state;
        m->auto_eoi = p->auto_eoi;
        m->rotate_on_auto_eoi = p->rotate_on_auto_eoi;
        m->special_fully_nested_mode = p->special_fully_nested_mode;
        m->init4 = p->init4;
        m->elcr = p->elcr;
        m->elcr_mask = p->elcr_mask;
        return m;
}

static Dr__Vmstate__CpuidEntry **encode_cpuid(Arena *a, const struct kvm_cpuid_entry2 *c, size_t n)
{
        Dr__Vmstate__CpuidEntry **v = arena_alloc(a, n * sizeof(void *));

        if (!v)
                return NULL;
        for (size_t i = 0; i < n; i++) {
                Dr__Vmstate__CpuidEntry *ce =
                        ARENA_NEW(a, Dr__Vmstate__CpuidEntry, DR__VMSTATE__CPUID_ENTRY__INIT);
                if (!ce)
                        return NULL;
                ce->function = c[i].function;
                ce->index = c[i].index;
                ce->flags = c[i].flags;
                ce->eax = c[i].eax;
                ce->ebx = c[i].ebx;
                ce->ecx = c[i].ecx;
                ce->edx = c[i].edx;
                v[i] = ce;
        }
        return v;
}

static Dr__Vmstate__Regs *encode_regs(Arena *a, const struct kvm_regs *k)
{
        Dr__Vmstate__Regs *r = ARENA_NEW(a, Dr__Vmstate__Regs, DR__VMSTATE__REGS__INIT);
        if (!r)
                return NULL;
        r->rax = k->rax;
        r->rbx = k->rbx;
        r->rcx = k->rcx;
        r->rdx = k->rdx;
        r->rsi = k->rsi;
        r->rdi = k->rdi;
        r->rsp = k->rsp;
        r->rbp = k->rbp;
        r->r8 = k->r8;
        r->r9 = k->r9;
        r->r10 = k->r10;
        r->r11 = k->r11;
        r->r12 = k->r12;
        r->r13 = k->r13;
        r->r14 = k->r14;
        r->r15 = k->r15;
        r->rip = k->rip;
        r->rflags = k->rflags;
        return r;
}

/* The segment registers: where KVM keeps each, and where the message wants it. */
static const struct {
        size_t kvm, msg;
} sregs_segments[] = {
        {offsetof(struct kvm_sregs, cs), offsetof(Dr__Vmstate__Sregs, cs)},
        {offsetof(struct kvm_sregs, ds), offsetof(Dr__Vmstate__Sregs, ds)},
        {offsetof(struct kvm_sregs, es), offsetof(Dr__Vmstate__Sregs, es)},
        {offsetof(struct kvm_sregs, fs), offsetof(Dr__Vmstate__Sregs, fs)},
        {offsetof(struct kvm_sregs, gs), offsetof(Dr__Vmstate__Sregs, gs)},
        {offsetof(struct kvm_sregs, ss), offsetof(Dr__Vmstate__Sregs, ss)},
        {offsetof(struct kvm_sregs, tr), offsetof(Dr__Vmstate__Sregs, tr)},
        {offsetof(struct kvm_sregs, ldt), offsetof(Dr__Vmstate__Sregs, ldt)},
};

static Dr__Vmstate__Sregs *encode_sregs(Arena *a, const struct kvm_sregs *k)
{
        Dr__Vmstate__Sregs *s = ARENA_NEW(a, Dr__Vmstate__Sregs, DR__VMSTATE__SREGS__INIT);
        if (!s)
                return NULL;
        for (size_t i = 0; i < ELEMENTSOF(sregs_segments); i++) {
                const struct kvm_segment *seg = (const void *) ((const uint8_t *) k + sregs_segments[i].kvm);
                Dr__Vmstate__Segment *m = encode_segment(a, seg);
                if (!m)
                        return NULL;
                memcpy((uint8_t *) s + sregs_segments[i].msg, &m, sizeof(m));
        }
        s->gdt = encode_dtable(a, &k->gdt);
        s->idt = encode_dtable(a, &k->idt);
        if (!s->gdt || !s->idt)
                return NULL;
        s->cr0 = k->cr0;
        s->cr2 = k->cr2;
        s->cr3 = k->cr3;
        s->cr4 = k->cr4;
        s->cr8 = k->cr8;
        s->efer = k->efer;
        s->apic_base = k->apic_base;
        s->n_interrupt_bitmap = ELEMENTSOF(k->interrupt_bitmap);
        s->interrupt_bitmap = (uint64_t *) k->interrupt_bitmap;
        return s;
}

/* XCRs into m (nothing when KVM reported none). 0 or -ENOMEM. */
static int encode_xcrs(Arena *a, const struct kvm_xcrs *k, Dr__Vmstate__VcpuState *m)
{
        unsigned n = MIN(k->nr_xcrs, (unsigned) KVM_MAX_XCRS);

        if (k->nr_xcrs == 0)
                return 0;
        m->xcrs = arena_alloc(a, n * sizeof(void *));
        if (!m->xcrs)
                return -ENOMEM;
        for (unsigned i = 0; i < n; i++) {
                Dr__Vmstate__Xcr *x = ARENA_NEW(a, Dr__Vmstate__Xcr, DR__VMSTATE__XCR__INIT);
                if (!x)
                        return -ENOMEM;
                x->xcr = k->xcrs[i].xcr;
                x->value = k->xcrs[i].value;
                m->xcrs[i] = x;
        }
        m->n_xcrs = n;
        m->has_xcrs_flags = true;
        m->xcrs_flags = k->flags;
        return 0;
}

static Dr__Vmstate__DebugRegs *encode_debugregs(Arena *a, const struct kvm_debugregs *k)
{
        Dr__Vmstate__DebugRegs *d = ARENA_NEW(a, Dr__Vmstate__DebugRegs, DR__VMSTATE__DEBUG_REGS__INIT);
        if (!d)
                return NULL;
        d->n_db = 4;
        d->db = (uint64_t *) k->db;
        d->dr6 = k->dr6;
        d->dr7 = k->dr7;
        d->has_flags = true;
        d->flags = k->flags;
        return d;
}

static Dr__Vmstate__Msr **encode_msrs(Arena *a, const struct kvm_msr_entry *k, size_t n)
{
        Dr__Vmstate__Msr **v = arena_alloc(a, n * sizeof(void *));

        if (!v)
                return NULL;
        for (size_t i = 0; i < n; i++) {
                Dr__Vmstate__Msr *x = ARENA_NEW(a, Dr__Vmstate__Msr, DR__VMSTATE__MSR__INIT);
                if (!x)
                        return NULL;
                x->index = k[i].index;
                x->value = k[i].data;
                v[i] = x;
        }
        return v;
}

static Dr__Vmstate__VcpuEvents *encode_events(Arena *a, const struct kvm_vcpu_events *k)
{
        Dr__Vmstate__VcpuEvents *e = ARENA_NEW(a, Dr__Vmstate__VcpuEvents, DR__VMSTATE__VCPU_EVENTS__INIT);
        if (!e)
                return NULL;
        e->exception_injected = k->exception.injected;
        e->exception_nr = k->exception.nr;
        e->exception_has_error_code = k->exception.has_error_code;
        e->exception_pending = k->exception.pending;
        e->exception_error_code = k->exception.error_code;
        e->has_exception_has_payload = e->has_exception_payload = true;
        e->exception_has_payload = k->exception_has_payload;
        e->exception_payload = k->exception_payload;
        e->interrupt_injected = k->interrupt.injected;
        e->interrupt_nr = k->interrupt.nr;
        e->interrupt_soft = k->interrupt.soft;
        e->interrupt_shadow = k->interrupt.shadow;
        e->nmi_injected = k->nmi.injected;
        e->nmi_pending = k->nmi.pending;
        e->nmi_masked = k->nmi.masked;
        e->sipi_vector = k->sipi_vector;
        e->flags = k->flags;
        e->has_smi_smm = e->has_smi_pending = e->has_smi_smm_inside_nmi = e->has_smi_latched_init = true;
        e->smi_smm = k->smi.smm;
        e->smi_pending = k->smi.pending;
        e->smi_smm_inside_nmi = k->smi.smm_inside_nmi;
        e->smi_latched_init = k->smi.latched_init;
        e->has_triple_fault_pending = true;
        e->triple_fault_pending = k->triple_fault.pending;
        return e;
}

/* One vCPU, a register group at a time (NULL when out of memory). */
static Dr__Vmstate__VcpuState *encode_vcpu(Arena *a, const VcpuSnapshot *v)
{
        Dr__Vmstate__VcpuState *m = ARENA_NEW(a, Dr__Vmstate__VcpuState, DR__VMSTATE__VCPU_STATE__INIT);

        if (!m)
                return NULL;
        m->index = v->index;
        m->mp_state = v->mp_state.mp_state;
        if (v->tsc_khz) {
                m->has_tsc_khz = true;
                m->tsc_khz = v->tsc_khz;
        }
        if (v->n_cpuid > 0) {
                m->cpuid = encode_cpuid(a, v->cpuid, v->n_cpuid);
                if (!m->cpuid)
                        return NULL;
                m->n_cpuid = v->n_cpuid;
        }
        m->regs = encode_regs(a, &v->regs);
        m->sregs = encode_sregs(a, &v->sregs);
        if (!m->regs || !m->sregs)
                return NULL;
        m->xsave.data = v->xsave;
        m->xsave.len = v->xsave_len;
        if (encode_xcrs(a, &v->xcrs, m) < 0)
                return NULL;
        m->debugregs = encode_debugregs(a, &v->debugregs);
        if (!m->debugregs)
                return NULL;
        if (v->has_lapic) {
                m->has_lapic = true;
                m->lapic.data = (uint8_t *) v->lapic.regs;
                m->lapic.len = sizeof(v->lapic.regs);
        }
        if (v->n_msrs > 0) {
                m->msrs = encode_msrs(a, v->msrs, v->n_msrs);
                if (!m->msrs)
                        return NULL;
                m->n_msrs = v->n_msrs;
        }
        m->events = encode_events(a, &v->events);
        return m->events ? m : NULL;
}

int state_encode(const VmSnapshot *s, uint8_t **ret_buf, size_t *ret_len)
{
        _cleanup_(arena_done) Arena a = {};
        Dr__Vmstate__VmState m = DR__VMSTATE__VM_STATE__INIT;
        _cleanup_free_ uint8_t *buf = NULL;
        size_t len;

        if (!s || !ret_buf || !ret_len || s->n_vcpus == 0 || s->n_vcpus > STATE_MAX_VCPUS)
                return -EINVAL;

        m.format_version = DR__VMSTATE__VM_STATE_FORMAT__VMSTATE_FORMAT_CURRENT;
        m.vcpus = arena_alloc(&a, s->n_vcpus * sizeof(void *));
        if (!m.vcpus)
                return -ENOMEM;
        for (unsigned i = 0; i < s->n_vcpus; i++) {
                m.vcpus[i] = encode_vcpu(&a, &s->vcpus[i]);
                if (!m.vcpus[i])
                        return -ENOMEM;
        }
        m.n_vcpus = s->n_vcpus;

        if (s->has_pit) {
                Dr__Vmstate__Pit *p = ARENA_NEW(&a, Dr__Vmstate__Pit, DR__VMSTATE__PIT__INIT);
                if (!p)
                        return -ENOMEM;
                p->channels = arena_alloc(&a, 3 * sizeof(void *));
                if (!p->channels)
                        return -ENOMEM;
                for (size_t i = 0; i < 3; i++) {
                        const struct kvm_pit_channel_state *c = &s->pit.channels[i];
                        Dr__Vmstate__PitChannel *mc =
                                ARENA_NEW(&a, Dr__Vmstate__PitChannel, DR__VMSTATE__PIT_CHANNEL__INIT);
                        if (!mc)
                                return -ENOMEM;
                        mc->count = c->count;
                        mc->latched_count = c->latched_count;
                        mc->count_latched = c->count_latched;
                        mc->status_latched = c->status_latched;
                        mc->status = c->status;
                        mc->read_state = c->read_state;
                        mc->write_state = c->write_state;
                        mc->write_latch = c->write_latch;
                        mc->rw_mode = c->rw_mode;
                        mc->mode = c->mode;
                        mc->bcd = c->bcd;
                        mc->gate = c->gate;
                        mc->count_load_time = c->count_load_time;
                        p->channels[i] = mc;
                }
                p->n_channels = 3;
                p->flags = s->pit.flags;
                m.pit = p;
        }

        if (s->has_clock) {
                Dr__Vmstate__Clock *c = ARENA_NEW(&a, Dr__Vmstate__Clock, DR__VMSTATE__CLOCK__INIT);
                if (!c)
                        return -ENOMEM;
                c->clock = s->clock.clock;
                c->has_flags = c->has_realtime = c->has_host_tsc = true;
                c->flags = s->clock.flags;
                c->realtime = s->clock.realtime;
                c->host_tsc = s->clock.host_tsc;
                m.clock = c;
        }

        if (s->has_irqchip) {
                Dr__Vmstate__IoapicState *io;

                m.pic_master = encode_pic(&a, &s->pic[0]);
                m.pic_slave = encode_pic(&a, &s->pic[1]);
                io = m.ioapic = ARENA_NEW(&a, Dr__Vmstate__IoapicState, DR__VMSTATE__IOAPIC_STATE__INIT);
                if (!m.pic_master || !m.pic_slave || !io)
                        return -ENOMEM;
                io->base_address = s->ioapic.base_address;
                io->ioregsel = s->ioapic.ioregsel;
                io->id = s->ioapic.id;
                io->irr = s->ioapic.irr;
                io->redirtbl = arena_alloc(&a, KVM_IOAPIC_NUM_PINS * sizeof(uint64_t));
                if (!io->redirtbl)
                        return -ENOMEM;
                for (size_t i = 0; i < KVM_IOAPIC_NUM_PINS; i++)
                        io->redirtbl[i] = s->ioapic.redirtbl[i].bits;
                io->n_redirtbl = KVM_IOAPIC_NUM_PINS;
        }

        if (s->devices_len > 0) {
                m.has_devices = true;
                m.devices.data = s->devices;
                m.devices.len = s->devices_len;
        }

        len = dr__vmstate__vm_state__get_packed_size(&m);
        buf = malloc(len ?: 1);
        if (!buf)
                return -ENOMEM;
        if (dr__vmstate__vm_state__pack(&m, buf) != len)
                return -EIO;
        *ret_buf = TAKE_PTR(buf);
        *ret_len = len;
        return 0;
}

/* ---- decoding ---- */

static void vm_state_unpackedp(Dr__Vmstate__VmState **p)
{
        if (*p)
                dr__vmstate__vm_state__free_unpacked(*p, NULL);
}

#define BAD(fmt, ...) log_error_errno(-EBADMSG, "Invalid VM state: " fmt, ##__VA_ARGS__)

/* Fields carried as uint32 but 8 or 16 bits wide in KVM: reject, never truncate. */
#define CHECK_MAX(v, max, what)                                                                             \
        do {                                                                                                \
                if ((uint64_t) (v) > (uint64_t) (max))                                                      \
                        return BAD("%s out of range (%llu)", what, (unsigned long long) (v));               \
        } while (0)

static int decode_segment(const Dr__Vmstate__Segment *m, struct kvm_segment *s)
{
        CHECK_MAX(m->selector, UINT16_MAX, "segment selector");
        CHECK_MAX(m->type, 15, "segment type");
        CHECK_MAX(m->dpl, 3, "segment dpl");
        *s = (struct kvm_segment){
                .base = m->base_address,
                .limit = m->limit,
                .selector = m->selector,
                .type = m->type,
                .present = m->present,
                .dpl = m->dpl,
                .db = m->db,
                .s = m->s,
                .l = m->l,
                .g = m->g,
                .avl = m->avl,
                .unusable = m->unusable,
        };
        return 0;
}

static int decode_dtable(const Dr__Vmstate__DescriptorTable *m, struct kvm_dtable *d)
{
        CHECK_MAX(m->limit, UINT16_MAX, "descriptor table limit");
        *d = (struct kvm_dtable){.base = m->base_address, .limit = m->limit};
        return 0;
}

static int decode_pic(const Dr__Vmstate__PicState *m, struct kvm_pic_state *p)
{
        const uint32_t f[16] = {m->last_irr,
                                m->irr,
                                m->imr,
                                m->isr,
                                m->priority_add,
                                m->irq_base,
                                m->read_reg_select,
                                m->poll,
                                m->special_mask,
                                m->init_state,
                                m->auto_eoi,
                                m->rotate_on_auto_eoi,
                                m->special_fully_nested_mode,
                                m->init4,
                                m->elcr,
                                m->elcr_mask};
        for (size_t i = 0; i < ELEMENTSOF(f); i++)
                CHECK_MAX(f[i], UINT8_MAX, "8259 register");
        *p = (struct kvm_pic_state){
                .last_irr = m->last_irr,
                .irr = m->irr,
                .imr = m->imr,
                .isr = m->isr,
                .priority_add = m->priority_add,
                .irq_base = m->irq_base,
                .read_reg_select = m->read_reg_select,
                .poll = m->poll,
                .special_mask = m->special_mask,
                .init_state = m->init_state,
                .auto_eoi = m->auto_eoi,
                .rotate_on_auto_eoi = m->rotate_on_auto_eoi,
                .special_fully_nested_mode = m->special_fully_nested_mode,
                .init4 = m->init4,
                .elcr = m->elcr,
                .elcr_mask = m->elcr_mask,
        };
        return 0;
}

static int decode_vcpu(const Dr__Vmstate__VcpuState *m, VcpuSnapshot *v)
{
        const Dr__Vmstate__Sregs *s = m->sregs;
        const Dr__Vmstate__Regs *r = m->regs;
        const Dr__Vmstate__VcpuEvents *e = m->events;
        const Dr__Vmstate__DebugRegs *d = m->debugregs;
        int k;

        if (m->n_cpuid > STATE_MAX_CPUID)
                return BAD("vCPU %u: %zu CPUID entries (max %d)", m->index, m->n_cpuid, STATE_MAX_CPUID);
        if (m->n_msrs > STATE_MAX_MSRS)
                return BAD("vCPU %u: %zu MSRs (max %d)", m->index, m->n_msrs, STATE_MAX_MSRS);
        if (m->n_xcrs > KVM_MAX_XCRS)
                return BAD("vCPU %u: %zu XCRs (max %d)", m->index, m->n_xcrs, KVM_MAX_XCRS);
        if (m->xsave.len < STATE_MIN_XSAVE || m->xsave.len > STATE_MAX_XSAVE)
                return BAD("vCPU %u: XSAVE area of %zu bytes", m->index, m->xsave.len);
        if (m->has_lapic && m->lapic.len != KVM_APIC_REG_SIZE)
                return BAD("vCPU %u: LAPIC page of %zu bytes (want %d)", m->index, m->lapic.len,
                           KVM_APIC_REG_SIZE);
        if (s->n_interrupt_bitmap != ELEMENTSOF(v->sregs.interrupt_bitmap))
                return BAD("vCPU %u: interrupt bitmap of %zu words", m->index, s->n_interrupt_bitmap);
        if (d->n_db != 4)
                return BAD("vCPU %u: %zu debug address registers", m->index, d->n_db);
        if (m->mp_state > KVM_MP_STATE_AP_RESET_HOLD)
                return BAD("vCPU %u: mp_state %u", m->index, m->mp_state);

        v->n_cpuid = m->n_cpuid;
        if (m->n_cpuid > 0) {
                v->cpuid = calloc(m->n_cpuid, sizeof(*v->cpuid));
                if (!v->cpuid)
                        return -ENOMEM;
        }
        for (size_t i = 0; i < m->n_cpuid; i++) {
                const Dr__Vmstate__CpuidEntry *c = m->cpuid[i];
                v->cpuid[i] = (struct kvm_cpuid_entry2){
                        .function = c->function,
                        .index = c->index,
                        .flags = c->flags,
                        .eax = c->eax,
                        .ebx = c->ebx,
                        .ecx = c->ecx,
                        .edx = c->edx,
                };
        }

        v->mp_state.mp_state = m->mp_state;
        v->regs = (struct kvm_regs){
                .rax = r->rax,
                .rbx = r->rbx,
                .rcx = r->rcx,
                .rdx = r->rdx,
                .rsi = r->rsi,
                .rdi = r->rdi,
                .rsp = r->rsp,
                .rbp = r->rbp,
                .r8 = r->r8,
                .r9 = r->r9,
                .r10 = r->r10,
                .r11 = r->r11,
                .r12 = r->r12,
                .r13 = r->r13,
                .r14 = r->r14,
                .r15 = r->r15,
                .rip = r->rip,
                .rflags = r->rflags,
        };

        if ((k = decode_segment(s->cs, &v->sregs.cs)) < 0 || (k = decode_segment(s->ds, &v->sregs.ds)) < 0 ||
            (k = decode_segment(s->es, &v->sregs.es)) < 0 || (k = decode_segment(s->fs, &v->sregs.fs)) < 0 ||
            (k = decode_segment(s->gs, &v->sregs.gs)) < 0 || (k = decode_segment(s->ss, &v->sregs.ss)) < 0 ||
            (k = decode_segment(s->tr, &v->sregs.tr)) < 0 ||
            (k = decode_segment(s->ldt, &v->sregs.ldt)) < 0 ||
            (k = decode_dtable(s->gdt, &v->sregs.gdt)) < 0 || (k = decode_dtable(s->idt, &v->sregs.idt)) < 0)
                return k;
        v->sregs.cr0 = s->cr0;
        v->sregs.cr2 = s->cr2;
        v->sregs.cr3 = s->cr3;
        v->sregs.cr4 = s->cr4;
        v->sregs.cr8 = s->cr8;
        v->sregs.efer = s->efer;
        v->sregs.apic_base = s->apic_base;
        memcpy(v->sregs.interrupt_bitmap, s->interrupt_bitmap, sizeof(v->sregs.interrupt_bitmap));

        v->xsave = malloc(m->xsave.len);
        if (!v->xsave)
                return -ENOMEM;
        memcpy(v->xsave, m->xsave.data, m->xsave.len);
        v->xsave_len = m->xsave.len;

        v->xcrs.nr_xcrs = m->n_xcrs;
        v->xcrs.flags = m->has_xcrs_flags ? m->xcrs_flags : 0;
        for (size_t i = 0; i < m->n_xcrs; i++) {
                v->xcrs.xcrs[i].xcr = m->xcrs[i]->xcr;
                v->xcrs.xcrs[i].value = m->xcrs[i]->value;
        }

        memcpy(v->debugregs.db, d->db, sizeof(v->debugregs.db));
        v->debugregs.dr6 = d->dr6;
        v->debugregs.dr7 = d->dr7;
        v->debugregs.flags = d->has_flags ? d->flags : 0;

        v->has_lapic = m->has_lapic;
        if (m->has_lapic)
                memcpy(v->lapic.regs, m->lapic.data, KVM_APIC_REG_SIZE);

        v->n_msrs = m->n_msrs;
        if (m->n_msrs > 0) {
                v->msrs = calloc(m->n_msrs, sizeof(*v->msrs));
                if (!v->msrs)
                        return -ENOMEM;
        }
        for (size_t i = 0; i < m->n_msrs; i++) {
                v->msrs[i].index = m->msrs[i]->index;
                v->msrs[i].data = m->msrs[i]->value;
        }

        CHECK_MAX(e->exception_nr, UINT8_MAX, "exception vector");
        CHECK_MAX(e->interrupt_nr, UINT8_MAX, "interrupt vector");
        CHECK_MAX(e->interrupt_shadow, UINT8_MAX, "interrupt shadow");
        CHECK_MAX(e->smi_latched_init, UINT8_MAX, "latched INIT");
        v->events.exception.injected = e->exception_injected;
        v->events.exception.nr = e->exception_nr;
        v->events.exception.has_error_code = e->exception_has_error_code;
        v->events.exception.pending = e->exception_pending;
        v->events.exception.error_code = e->exception_error_code;
        v->events.exception_has_payload = e->has_exception_has_payload && e->exception_has_payload;
        v->events.exception_payload = e->has_exception_payload ? e->exception_payload : 0;
        v->events.interrupt.injected = e->interrupt_injected;
        v->events.interrupt.nr = e->interrupt_nr;
        v->events.interrupt.soft = e->interrupt_soft;
        v->events.interrupt.shadow = e->interrupt_shadow;
        v->events.nmi.injected = e->nmi_injected;
        v->events.nmi.pending = e->nmi_pending;
        v->events.nmi.masked = e->nmi_masked;
        v->events.sipi_vector = e->sipi_vector;
        v->events.flags = e->flags;
        v->events.smi.smm = e->has_smi_smm && e->smi_smm;
        v->events.smi.pending = e->has_smi_pending && e->smi_pending;
        v->events.smi.smm_inside_nmi = e->has_smi_smm_inside_nmi && e->smi_smm_inside_nmi;
        v->events.smi.latched_init = e->has_smi_latched_init ? e->smi_latched_init : 0;
        v->events.triple_fault.pending = e->has_triple_fault_pending && e->triple_fault_pending;

        v->tsc_khz = m->has_tsc_khz ? m->tsc_khz : 0;
        return 0;
}

int state_decode(const uint8_t *buf, size_t len, VmSnapshot **ret)
{
        _cleanup_(vm_state_unpackedp) Dr__Vmstate__VmState *m = NULL;
        _cleanup_(vm_snapshot_freep) VmSnapshot *s = NULL;
        int r;

        if (!buf || len == 0)
                return BAD("empty buffer");
        if (len > STATE_MAX_VCPUS * (size_t) (STATE_MAX_XSAVE + 64 * 1024) + STATE_MAX_DEVICES)
                return BAD("%zu bytes is more than any valid state", len);

        m = dr__vmstate__vm_state__unpack(NULL, len, buf);
        if (!m)
                return BAD("protobuf does not parse (%zu bytes)", len);
        if (m->format_version != DR__VMSTATE__VM_STATE_FORMAT__VMSTATE_FORMAT_CURRENT)
                return BAD("format version %u, this build reads %d", m->format_version,
                           DR__VMSTATE__VM_STATE_FORMAT__VMSTATE_FORMAT_CURRENT);
        if (m->n_vcpus == 0 || m->n_vcpus > STATE_MAX_VCPUS)
                return BAD("%zu vCPUs", m->n_vcpus);
        if (m->has_devices && m->devices.len > STATE_MAX_DEVICES)
                return BAD("device blob of %zu bytes", m->devices.len);

        r = vm_snapshot_new(m->n_vcpus, &s);
        if (r < 0)
                return r;
        for (size_t i = 0; i < m->n_vcpus; i++) {
                if (m->vcpus[i]->index != i)
                        return BAD("vCPU record %zu has index %u", i, m->vcpus[i]->index);
                r = decode_vcpu(m->vcpus[i], &s->vcpus[i]);
                if (r < 0)
                        return r;
        }

        if (m->pit) {
                if (m->pit->n_channels != 3)
                        return BAD("PIT with %zu channels", m->pit->n_channels);
                for (size_t i = 0; i < 3; i++) {
                        const Dr__Vmstate__PitChannel *c = m->pit->channels[i];
                        struct kvm_pit_channel_state *k = &s->pit.channels[i];
                        const uint32_t b[] = {c->count_latched, c->status_latched, c->status,
                                              c->read_state,    c->write_state,    c->write_latch,
                                              c->rw_mode,       c->mode,           c->bcd,
                                              c->gate};
                        CHECK_MAX(c->count, 65536, "PIT count");
                        CHECK_MAX(c->latched_count, UINT16_MAX, "PIT latched count");
                        for (size_t j = 0; j < ELEMENTSOF(b); j++)
                                CHECK_MAX(b[j], UINT8_MAX, "PIT register");
                        *k = (struct kvm_pit_channel_state){
                                .count = c->count,
                                .latched_count = c->latched_count,
                                .count_latched = c->count_latched,
                                .status_latched = c->status_latched,
                                .status = c->status,
                                .read_state = c->read_state,
                                .write_state = c->write_state,
                                .write_latch = c->write_latch,
                                .rw_mode = c->rw_mode,
                                .mode = c->mode,
                                .bcd = c->bcd,
                                .gate = c->gate,
                                .count_load_time = c->count_load_time,
                        };
                }
                s->pit.flags = m->pit->flags;
                s->has_pit = 1;
        }

        if (m->clock) {
                s->has_clock = 1;
                s->clock.clock = m->clock->clock;
                s->clock.flags = m->clock->has_flags ? m->clock->flags : 0;
                s->clock.realtime = m->clock->has_realtime ? m->clock->realtime : 0;
                s->clock.host_tsc = m->clock->has_host_tsc ? m->clock->host_tsc : 0;
        }

        if (m->pic_master || m->pic_slave || m->ioapic) {
                if (!m->pic_master || !m->pic_slave || !m->ioapic)
                        return BAD("irqchip state incomplete");
                if ((r = decode_pic(m->pic_master, &s->pic[0])) < 0 ||
                    (r = decode_pic(m->pic_slave, &s->pic[1])) < 0)
                        return r;
                if (m->ioapic->n_redirtbl != KVM_IOAPIC_NUM_PINS)
                        return BAD("IOAPIC with %zu pins", m->ioapic->n_redirtbl);
                s->ioapic.base_address = m->ioapic->base_address;
                s->ioapic.ioregsel = m->ioapic->ioregsel;
                s->ioapic.id = m->ioapic->id;
                s->ioapic.irr = m->ioapic->irr;
                for (size_t i = 0; i < KVM_IOAPIC_NUM_PINS; i++)
                        s->ioapic.redirtbl[i].bits = m->ioapic->redirtbl[i];
                s->has_irqchip = 1;
        }

        if (m->has_devices && m->devices.len > 0) {
                s->devices = malloc(m->devices.len);
                if (!s->devices)
                        return -ENOMEM;
                memcpy(s->devices, m->devices.data, m->devices.len);
                s->devices_len = m->devices.len;
        }

        *ret = TAKE_PTR(s);
        return 0;
}

/* ---- KVM side ---- */

/* Bytes KVM_GET_XSAVE2 fills, or 0 when only the legacy 4 KiB KVM_GET_XSAVE exists. */
static size_t xsave2_size(int kvm_fd, int vm_fd)
{
        int r = ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
        if (r <= 0)
                r = ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
        return r > (int) sizeof(struct kvm_xsave) ? (size_t) r : 0;
}

/*
 * The MSRs worth saving: KVM_GET_MSR_INDEX_LIST, minus those KVM_GET_MSRS
 * refuses on this vCPU (it stops at the first one it cannot read and
 * returns how many it read). Computed once per process: the answer depends
 * on the host and on CPUID, which one VMM sets the same for all its vCPUs.
 */
static pthread_mutex_t msr_list_lock = PTHREAD_MUTEX_INITIALIZER;
static uint32_t *msr_list;
static size_t msr_list_n;

static int msr_list_get(int kvm_fd, int vcpu_fd, const uint32_t **ret, size_t *ret_n)
{
        struct kvm_msr_list probe = {.nmsrs = 0};
        _cleanup_free_ struct kvm_msr_list *list = NULL;
        _cleanup_free_ struct kvm_msrs *msrs = NULL;
        _cleanup_free_ uint32_t *keep = NULL;
        size_t n, n_keep = 0, i = 0;
        int r;

        pthread_mutex_lock(&msr_list_lock);
        if (msr_list) {
                *ret = msr_list;
                *ret_n = msr_list_n;
                pthread_mutex_unlock(&msr_list_lock);
                return 0;
        }

        if (ioctl(kvm_fd, KVM_GET_MSR_INDEX_LIST, &probe) < 0 && errno != E2BIG) {
                r = -errno;
                goto out;
        }
        n = MIN(probe.nmsrs, (uint32_t) STATE_MAX_MSRS);
        list = calloc(1, sizeof(*list) + n * sizeof(uint32_t));
        msrs = calloc(1, sizeof(*msrs) + n * sizeof(struct kvm_msr_entry));
        keep = calloc(n ?: 1, sizeof(uint32_t));
        if (!list || !msrs || !keep) {
                r = -ENOMEM;
                goto out;
        }
        list->nmsrs = n;
        if (ioctl(kvm_fd, KVM_GET_MSR_INDEX_LIST, list) < 0) {
                r = -errno;
                goto out;
        }
        n = MIN(list->nmsrs, n);

        while (i < n) {
                size_t batch = n - i;
                int got;

                msrs->nmsrs = batch;
                for (size_t j = 0; j < batch; j++)
                        msrs->entries[j] = (struct kvm_msr_entry){.index = list->indices[i + j]};
                got = ioctl(vcpu_fd, KVM_GET_MSRS, msrs);
                if (got < 0) {
                        r = -errno;
                        goto out;
                }
                for (int j = 0; j < got; j++)
                        keep[n_keep++] = list->indices[i + j];
                i += got;
                if ((size_t) got < batch) {
                        log_debug("MSR 0x%x not readable with KVM_GET_MSRS, not saved", list->indices[i]);
                        i++; /* skip the one it refused */
                }
        }

        msr_list = TAKE_PTR(keep);
        msr_list_n = n_keep;
        *ret = msr_list;
        *ret_n = msr_list_n;
        r = 0;
out:
        pthread_mutex_unlock(&msr_list_lock);
        return r;
}

static int capture_vcpu(int kvm_fd, int vm_fd, int fd, size_t xsave_size, VcpuSnapshot *v)
{
        _cleanup_free_ struct kvm_cpuid2 *cpuid = NULL;
        _cleanup_free_ struct kvm_msrs *msrs = NULL;
        const uint32_t *list = NULL;
        size_t n_list = 0;
        int r;

        cpuid = calloc(1, sizeof(*cpuid) + STATE_MAX_CPUID * sizeof(struct kvm_cpuid_entry2));
        if (!cpuid)
                return -ENOMEM;
        cpuid->nent = STATE_MAX_CPUID;
        if (ioctl(fd, KVM_GET_CPUID2, cpuid) < 0)
                return log_debug_errno(-errno, "KVM_GET_CPUID2: %m");
        v->cpuid = calloc(cpuid->nent ?: 1, sizeof(struct kvm_cpuid_entry2));
        if (!v->cpuid)
                return -ENOMEM;
        memcpy(v->cpuid, cpuid->entries, cpuid->nent * sizeof(struct kvm_cpuid_entry2));
        v->n_cpuid = cpuid->nent;

        if (ioctl(fd, KVM_GET_MP_STATE, &v->mp_state) < 0)
                return -errno;
        if (ioctl(fd, KVM_GET_REGS, &v->regs) < 0)
                return -errno;
        if (ioctl(fd, KVM_GET_SREGS, &v->sregs) < 0)
                return -errno;

        v->xsave_len = xsave_size ?: sizeof(struct kvm_xsave);
        v->xsave = calloc(1, v->xsave_len);
        if (!v->xsave)
                return -ENOMEM;
        if (ioctl(fd, xsave_size ? KVM_GET_XSAVE2 : KVM_GET_XSAVE, v->xsave) < 0)
                return -errno;

        if (ioctl(fd, KVM_GET_XCRS, &v->xcrs) < 0)
                v->xcrs.nr_xcrs = 0; /* no XSAVE on this host: nothing to restore */
        if (ioctl(fd, KVM_GET_DEBUGREGS, &v->debugregs) < 0)
                return -errno;
        v->has_lapic = ioctl(fd, KVM_GET_LAPIC, &v->lapic) >= 0;

        r = msr_list_get(kvm_fd, fd, &list, &n_list);
        if (r < 0)
                return r;
        msrs = calloc(1, sizeof(*msrs) + n_list * sizeof(struct kvm_msr_entry));
        if (!msrs)
                return -ENOMEM;
        msrs->nmsrs = n_list;
        for (size_t i = 0; i < n_list; i++)
                msrs->entries[i].index = list[i];
        r = ioctl(fd, KVM_GET_MSRS, msrs);
        if (r < 0)
                return -errno;
        if ((size_t) r != n_list)
                return log_debug_errno(-EIO, "KVM_GET_MSRS read %d of %zu MSRs", r, n_list);
        v->msrs = calloc(n_list ?: 1, sizeof(struct kvm_msr_entry));
        if (!v->msrs)
                return -ENOMEM;
        memcpy(v->msrs, msrs->entries, n_list * sizeof(struct kvm_msr_entry));
        v->n_msrs = n_list;

        if (ioctl(fd, KVM_GET_VCPU_EVENTS, &v->events) < 0)
                return -errno;

        r = ioctl(fd, KVM_GET_TSC_KHZ);
        v->tsc_khz = r > 0 ? (uint64_t) r : 0;
        return 0;
}

int state_capture(int kvm_fd, int vm_fd, const int *vcpu_fds, unsigned n_vcpus, VmSnapshot **ret)
{
        _cleanup_(vm_snapshot_freep) VmSnapshot *s = NULL;
        size_t xsave_size = xsave2_size(kvm_fd, vm_fd);
        struct kvm_irqchip chip;
        int r;

        r = vm_snapshot_new(n_vcpus, &s);
        if (r < 0)
                return r;
        for (unsigned i = 0; i < n_vcpus; i++) {
                r = capture_vcpu(kvm_fd, vm_fd, vcpu_fds[i], xsave_size, &s->vcpus[i]);
                if (r < 0)
                        return log_debug_errno(r, "Failed to read the state of vCPU %u: %m", i);
        }

        s->has_pit = ioctl(vm_fd, KVM_GET_PIT2, &s->pit) >= 0;
        if (ioctl(vm_fd, KVM_GET_CLOCK, &s->clock) < 0)
                return -errno;
        s->has_clock = 1;

        chip = (struct kvm_irqchip){.chip_id = KVM_IRQCHIP_PIC_MASTER};
        if (ioctl(vm_fd, KVM_GET_IRQCHIP, &chip) >= 0) {
                s->pic[0] = chip.chip.pic;
                chip = (struct kvm_irqchip){.chip_id = KVM_IRQCHIP_PIC_SLAVE};
                if (ioctl(vm_fd, KVM_GET_IRQCHIP, &chip) < 0)
                        return -errno;
                s->pic[1] = chip.chip.pic;
                chip = (struct kvm_irqchip){.chip_id = KVM_IRQCHIP_IOAPIC};
                if (ioctl(vm_fd, KVM_GET_IRQCHIP, &chip) < 0)
                        return -errno;
                s->ioapic = chip.chip.ioapic;
                s->has_irqchip = 1;
        }

        *ret = TAKE_PTR(s);
        return 0;
}

/* KVM_SET_MSRS stops at the first MSR it refuses; skip that one and go on. */
static int apply_msrs(int fd, unsigned vcpu, const struct kvm_msr_entry *e, size_t n)
{
        _cleanup_free_ struct kvm_msrs *msrs = NULL;
        size_t i = 0, skipped = 0;

        msrs = calloc(1, sizeof(*msrs) + (n ?: 1) * sizeof(struct kvm_msr_entry));
        if (!msrs)
                return -ENOMEM;
        while (i < n) {
                int got;

                msrs->nmsrs = n - i;
                memcpy(msrs->entries, e + i, (n - i) * sizeof(struct kvm_msr_entry));
                got = ioctl(fd, KVM_SET_MSRS, msrs);
                if (got < 0)
                        return -errno;
                i += got;
                if (i < n) {
                        log_debug("vCPU %u: KVM_SET_MSRS refused MSR 0x%x, skipped", vcpu, e[i].index);
                        skipped++;
                        i++;
                }
        }
        if (skipped > 0)
                log_warning("vCPU %u: %zu of %zu MSRs could not be restored.", vcpu, skipped, n);
        return 0;
}

static int apply_vcpu(int fd, unsigned i, size_t xsave_size, const VcpuSnapshot *v)
{
        _cleanup_free_ struct kvm_cpuid2 *cpuid = NULL;
        _cleanup_free_ uint8_t *xsave = NULL;
        struct kvm_vcpu_events ev;
        size_t want = xsave_size ?: sizeof(struct kvm_xsave);
        int r;

#define SET(req, arg, what)                                                                                 \
        do {                                                                                                \
                if (ioctl(fd, req, arg) < 0)                                                                \
                        return log_error_errno(-errno, "vCPU %u: " what " failed: %m", i);                  \
        } while (0)

        cpuid = calloc(1, sizeof(*cpuid) + (v->n_cpuid ?: 1) * sizeof(struct kvm_cpuid_entry2));
        if (!cpuid)
                return -ENOMEM;
        cpuid->nent = v->n_cpuid;
        memcpy(cpuid->entries, v->cpuid, v->n_cpuid * sizeof(struct kvm_cpuid_entry2));
        SET(KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2");
        SET(KVM_SET_MP_STATE, &v->mp_state, "KVM_SET_MP_STATE");
        SET(KVM_SET_REGS, &v->regs, "KVM_SET_REGS");
        SET(KVM_SET_SREGS, &v->sregs, "KVM_SET_SREGS");

        /*
         * KVM_SET_XSAVE reads as many bytes as KVM_CAP_XSAVE2 says. A shorter
         * area (saved on a host with fewer XSAVE features) is zero-extended;
         * a longer one is refused rather than silently cut.
         */
        if (v->xsave_len > want)
                return log_error_errno(-EBADMSG,
                                       "vCPU %u: saved XSAVE area has %zu bytes, this host takes %zu", i,
                                       v->xsave_len, want);
        xsave = calloc(1, want);
        if (!xsave)
                return -ENOMEM;
        memcpy(xsave, v->xsave, v->xsave_len);
        SET(KVM_SET_XSAVE, xsave, "KVM_SET_XSAVE");

        if (v->xcrs.nr_xcrs > 0)
                SET(KVM_SET_XCRS, &v->xcrs, "KVM_SET_XCRS");
        SET(KVM_SET_DEBUGREGS, &v->debugregs, "KVM_SET_DEBUGREGS");
        if (v->has_lapic)
                SET(KVM_SET_LAPIC, &v->lapic, "KVM_SET_LAPIC");

        r = apply_msrs(fd, i, v->msrs, v->n_msrs);
        if (r < 0)
                return log_error_errno(r, "vCPU %u: KVM_SET_MSRS failed: %m", i);

        /* GET reports which optional parts are valid; SET also needs NMI and SIPI marked. */
        ev = v->events;
        ev.flags &= KVM_VCPUEVENT_VALID_SHADOW | KVM_VCPUEVENT_VALID_SMM | KVM_VCPUEVENT_VALID_PAYLOAD |
                    KVM_VCPUEVENT_VALID_TRIPLE_FAULT;
        ev.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
        SET(KVM_SET_VCPU_EVENTS, &ev, "KVM_SET_VCPU_EVENTS");
#undef SET
        return 0;
}

int state_apply(int kvm_fd, int vm_fd, const int *vcpu_fds, unsigned n_vcpus, const VmSnapshot *s)
{
        size_t xsave_size = xsave2_size(kvm_fd, vm_fd);
        struct kvm_irqchip chip;
        int r;

        if (s->n_vcpus != n_vcpus)
                return log_error_errno(-EINVAL, "Saved state has %u vCPUs, the VM has %u.", s->n_vcpus,
                                       n_vcpus);

        for (unsigned i = 0; i < n_vcpus; i++) {
                r = apply_vcpu(vcpu_fds[i], i, xsave_size, &s->vcpus[i]);
                if (r < 0)
                        return r;
        }

        if (s->has_pit && ioctl(vm_fd, KVM_SET_PIT2, &s->pit) < 0)
                return log_error_errno(-errno, "KVM_SET_PIT2 failed: %m");
        if (s->has_clock) {
                /*
                 * flags 0: restore the saved kvmclock value as is, without
                 * KVM_CLOCK_REALTIME moving it by the wall time that passed.
                 */
                struct kvm_clock_data c = {.clock = s->clock.clock};
                if (ioctl(vm_fd, KVM_SET_CLOCK, &c) < 0)
                        return log_error_errno(-errno, "KVM_SET_CLOCK failed: %m");
        }
        if (s->has_irqchip) {
                chip = (struct kvm_irqchip){.chip_id = KVM_IRQCHIP_PIC_MASTER, .chip.pic = s->pic[0]};
                if (ioctl(vm_fd, KVM_SET_IRQCHIP, &chip) < 0)
                        return log_error_errno(-errno, "KVM_SET_IRQCHIP (PIC master) failed: %m");
                chip = (struct kvm_irqchip){.chip_id = KVM_IRQCHIP_PIC_SLAVE, .chip.pic = s->pic[1]};
                if (ioctl(vm_fd, KVM_SET_IRQCHIP, &chip) < 0)
                        return log_error_errno(-errno, "KVM_SET_IRQCHIP (PIC slave) failed: %m");
                chip = (struct kvm_irqchip){.chip_id = KVM_IRQCHIP_IOAPIC, .chip.ioapic = s->ioapic};
                if (ioctl(vm_fd, KVM_SET_IRQCHIP, &chip) < 0)
                        return log_error_errno(-errno, "KVM_SET_IRQCHIP (IOAPIC) failed: %m");
        }
        return 0;
}

/* ---- public API ---- */

int dr_state_save(int kvm_fd, int vm_fd, const int *vcpu_fds, unsigned n_vcpus, const uint8_t *devices,
                  size_t devices_len, uint8_t **ret_buf, size_t *ret_len)
{
        _cleanup_(vm_snapshot_freep) VmSnapshot *s = NULL;
        int r;

        if (kvm_fd < 0 || vm_fd < 0 || !vcpu_fds || n_vcpus == 0 || n_vcpus > DR_AGENT_MAX_VCPUS ||
            (devices_len > 0 && !devices) || devices_len > STATE_MAX_DEVICES || !ret_buf || !ret_len)
                return -EINVAL;

        r = state_capture(kvm_fd, vm_fd, vcpu_fds, n_vcpus, &s);
        if (r < 0)
                return r;
        /* Borrowed for encoding only; detached before the snapshot is freed. */
        s->devices = (uint8_t *) devices;
        s->devices_len = devices_len;
        r = state_encode(s, ret_buf, ret_len);
        s->devices = NULL;
        s->devices_len = 0;
        return r;
}

int dr_state_restore(int kvm_fd, int vm_fd, const int *vcpu_fds, unsigned n_vcpus, const uint8_t *buf,
                     size_t len, uint8_t **ret_devices, size_t *ret_devices_len)
{
        _cleanup_(vm_snapshot_freep) VmSnapshot *s = NULL;
        int r;

        if (kvm_fd < 0 || vm_fd < 0 || !vcpu_fds || n_vcpus == 0 || n_vcpus > DR_AGENT_MAX_VCPUS)
                return -EINVAL;

        r = state_decode(buf, len, &s);
        if (r < 0)
                return r;
        r = state_apply(kvm_fd, vm_fd, vcpu_fds, n_vcpus, s);
        if (r < 0)
                return r;
        if (ret_devices)
                *ret_devices = TAKE_PTR(s->devices);
        if (ret_devices_len)
                *ret_devices_len = s->devices_len;
        return 0;
}

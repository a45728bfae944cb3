/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Ring 0 of the test guests. On PVM hosts every instruction here is emulated
 * (~1 M instructions/s) and bulk stores jam the dirty ring, so this file only
 * does what cannot run in CPL3: page tables above 4 GiB, GDT/TSS/IDT, the
 * PIC, traps and the ud2 syscalls. Loops store one word at a time on purpose.
 */
#include "guest.h"

struct trap_frame {
        uint64_t rax, rbx, rcx, rdx, rsi, rdi, rbp;
        uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
        uint64_t vector, error;
        uint64_t rip, cs, rflags, rsp, ss;
};

struct tss {
        uint32_t reserved0;
        uint64_t rsp0, rsp1, rsp2;
        uint64_t reserved1;
        uint64_t ist[7];
        uint64_t reserved2;
        uint16_t reserved3;
        uint16_t iomap_base;
} __attribute__((packed));

struct multiboot_info {
        uint32_t flags, mem_lower, mem_upper, boot_device, cmdline;
        uint32_t mods_count, mods_addr, syms[4];
        uint32_t mmap_length, mmap_addr;
} __attribute__((packed));

struct multiboot_mmap {
        uint32_t size;
        uint64_t addr, len;
        uint32_t type;
} __attribute__((packed));

/* boot.S */
extern uint64_t pml4[512], pdpt[512], pd_tables[GUEST_MAX_PDS][512];
extern uint8_t kstacks[], ustacks[];
extern uint64_t gdt[];
extern const uint64_t isr_table[48];
extern volatile uint32_t boot_ready;
extern uint32_t mb_magic, mb_info;
noreturn void enter_user(uint64_t rip, uint64_t rsp, uint64_t arg);
void kmain(unsigned cpu);
void trap(struct trap_frame *f);
void user_start(unsigned cpu); /* lib.c, CPL3 */

struct boot_info boot_info;
static struct tss tsss[GUEST_MAX_CPUS];
static uint64_t idt[256 * 2] __attribute__((aligned(16)));

static void boot_copy_cmdline(const struct multiboot_info *mbi)
{
        size_t i;

        if (!(mbi->flags & (1u << 2)) || mbi->cmdline == 0)
                return;
        const char *s = (const char *) (uintptr_t) mbi->cmdline;
        for (i = 0; i + 1 < sizeof(boot_info.cmdline) && s[i]; i++)
                boot_info.cmdline[i] = s[i];
        boot_info.cmdline[i] = 0;
}

static void boot_scan_memory(const struct multiboot_info *mbi)
{
        uint64_t top = 0, work_end = 0;

        if (mbi->flags & (1u << 6)) {
                uint64_t off = 0, len = mbi->mmap_length;
                unsigned n = 0;
                if (len > 64 * 1024)
                        len = 64 * 1024;
                while (off + sizeof(struct multiboot_mmap) <= len && n++ < 256) {
                        const struct multiboot_mmap *e = (const void *) (uintptr_t) (mbi->mmap_addr + off);
                        if (e->type == 1 && e->len > 0 && e->addr + e->len > e->addr) {
                                uint64_t end = e->addr + e->len;
                                if (end > top)
                                        top = end;
                                if (e->addr <= GUEST_WORK_BASE && end > GUEST_WORK_BASE)
                                        work_end = end;
                        }
                        off += (uint64_t) e->size + 4;
                }
        }
        if (top == 0 && (mbi->flags & 1u)) {
                top = 0x100000ULL + (uint64_t) mbi->mem_upper * 1024;
                work_end = top;
        }
        if (top > (uint64_t) GUEST_MAX_PDS << 30)
                top = (uint64_t) GUEST_MAX_PDS << 30;
        if (work_end > top)
                work_end = top;
        boot_info.ram_top = top;
        boot_info.work_end = work_end;
}

/* boot.S mapped 0..4 GiB; map the rest of RAM, 2 MiB at a time. */
static void boot_map_high(void)
{
        unsigned npd = (unsigned) ((boot_info.ram_top + (1ULL << 30) - 1) >> 30);

        for (unsigned d = 4; d < npd && d < GUEST_MAX_PDS; d++) {
                for (unsigned i = 0; i < 512; i++)
                        WRITE_ONCE(pd_tables[d][i], (((uint64_t) d << 30) + ((uint64_t) i << 21)) | 0x87);
                WRITE_ONCE(pdpt[d], (uint64_t) (uintptr_t) pd_tables[d] | 0x7);
        }
        __asm__ __volatile__("mov %%cr3, %%rax; mov %%rax, %%cr3" ::: "rax", "memory");
}

static void boot_tables(void)
{
        for (unsigned c = 0; c < GUEST_MAX_CPUS; c++) {
                uint64_t base = (uint64_t) (uintptr_t) &tsss[c];
                uint64_t limit = sizeof(struct tss) - 1;
                tsss[c].rsp0 = (uint64_t) (uintptr_t) (kstacks + (c + 1) * GUEST_KSTACK_SIZE);
                tsss[c].iomap_base = sizeof(struct tss); /* no I/O bitmap: IOPL=3 decides */
                gdt[5 + 2 * c] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ULL << 40) |
                                 (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
                gdt[6 + 2 * c] = base >> 32;
        }
        for (unsigned v = 0; v < ARRAY_SIZE(isr_table); v++) {
                uint64_t h = isr_table[v];
                idt[2 * v] =
                        (h & 0xffff) | ((uint64_t) SEL_KCODE << 16) | (0x8EULL << 40) | ((h >> 16) << 48);
                idt[2 * v + 1] = h >> 32;
        }
}

static void pic_init(void)
{
        outb(0x20, 0x11);
        outb(0xa0, 0x11); /* ICW1: init, ICW4 needed */
        outb(0x21, 0x20);
        outb(0xa1, 0x28); /* ICW2: vector bases */
        outb(0x21, 0x04);
        outb(0xa1, 0x02); /* ICW3: slave on IRQ2 */
        outb(0x21, 0x01);
        outb(0xa1, 0x01);                 /* ICW4: 8086 mode */
        outb(0x21, (uint8_t) ~(1u << 3)); /* only IRQ3 (COM2) */
        outb(0xa1, 0xff);
}

static void cpu_load_tables(unsigned cpu)
{
        struct {
                uint16_t limit;
                uint64_t base;
        } __attribute__((packed)) idtr = {sizeof(idt) - 1, (uint64_t) (uintptr_t) idt};
        __asm__ __volatile__("lidt %0" : : "m"(idtr));
        __asm__ __volatile__("ltr %w0" : : "r"((uint16_t) (SEL_TSS0 + 16 * cpu)));
}

void kmain(unsigned cpu)
{
        if (cpu == 0) {
                const struct multiboot_info *mbi = (const void *) (uintptr_t) mb_info;
                uart_init(COM1);
                uart_init(COM2);
                if (mb_magic == MULTIBOOT_BOOT_MAGIC) {
                        boot_copy_cmdline(mbi);
                        boot_scan_memory(mbi);
                }
                boot_map_high();
                boot_tables();
                pic_init();
                /* Release: pairs with the APs' spin on boot_ready in boot.S. */
                barrier();
                boot_ready = 1;
        }
        cpu_load_tables(cpu);
        enter_user((uint64_t) (uintptr_t) user_start,
                   (uint64_t) (uintptr_t) (ustacks + (cpu + 1) * GUEST_USTACK_SIZE), cpu);
}

static noreturn void do_exit(unsigned code)
{
        /* Let COM1 drain (TEMT) so the last line is not lost when the VMM exits. */
        for (unsigned i = 0; i < 100000 && !(inb(COM1 + 5) & 0x40); i++)
                ;
        outb(GUEST_EXIT_PORT, (uint8_t) code);
        for (;;)
                __asm__ __volatile__("cli; hlt");
}

noreturn void sys_exit(int code)
{
        syscall1(SYS_EXIT, (uint64_t) code);
        __builtin_unreachable();
}

static noreturn void fatal(struct trap_frame *f)
{
        uint64_t cr2;
        __asm__ __volatile__("mov %%cr2, %0" : "=r"(cr2));
        pr_nolock("guest: fatal exception %u at rip=0x%lx cr2=0x%lx err=0x%lx cs=0x%lx rflags=0x%lx",
                  (unsigned) f->vector, f->rip, cr2, f->error, f->cs, f->rflags);
        do_exit(GUEST_EXIT_FATAL);
}

static void irq(struct trap_frame *f)
{
        unsigned n = (unsigned) f->vector - 0x20;

        if (n == 7 || n == 15) { /* spurious unless the ISR says otherwise */
                outb(n == 7 ? 0x20 : 0xa0, 0x0b);
                if (!(inb(n == 7 ? 0x20 : 0xa0) & 0x80)) {
                        if (n == 15)
                                outb(0x20, 0x20);
                        return;
                }
        }
        if (n >= 8)
                outb(0xa0, 0x20);
        outb(0x20, 0x20);
}

volatile uint64_t io_emulated;

/* Is the user buffer [p, p + n) in mapped RAM? */
static bool user_range_ok(uint64_t p, uint64_t n)
{
        return n <= SYS_UART_MAX && p >= GUEST_LOAD_ADDR && p <= boot_info.ram_top &&
               n <= boot_info.ram_top - p;
}

static bool uart_port_ok(uint64_t port)
{
        return port == COM1 || port == COM2;
}

static uint64_t k_uart_write(uint64_t port, uint64_t buf, uint64_t n)
{
        const uint8_t *s = (const uint8_t *) (uintptr_t) buf;
        uint64_t i;

        for (i = 0; i < n; i++) {
                unsigned spins = 0;
                while (!(inb((uint16_t) (port + 5)) & 0x20))
                        if (++spins == 64)
                                return i; /* back pressure: let CPL3 retry */
                outb((uint16_t) port, s[i]);
        }
        return i;
}

static uint64_t k_uart_read(uint64_t port, uint64_t buf, uint64_t n)
{
        uint8_t *d = (uint8_t *) (uintptr_t) buf;
        uint64_t i = 0;

        unsigned misses = 0;

        /* Without a FIFO the next byte shows up only after this one is read:
         * poll a little longer here rather than pay a trap per byte. */
        while (i < n) {
                if (inb((uint16_t) (port + 5)) & 0x01) {
                        d[i++] = inb((uint16_t) port);
                        misses = 0;
                } else if (++misses > 16) {
                        break;
                }
        }
        return i;
}

static void k_uart_rxwait(uint64_t port)
{
        outb((uint16_t) (port + 1), 0x01);
        /* sti's shadow covers hlt: an interrupt already pending is taken in
         * hlt, not lost before it. */
        if (!(inb((uint16_t) (port + 5)) & 0x01))
                __asm__ __volatile__("sti; hlt; cli" ::: "memory");
        outb((uint16_t) (port + 1), 0x00);
}

/*
 * #GP from a CPL3 in/out with IOPL=3: PVM does not honour IOPL for guest
 * user mode. Emulate the byte forms (E4 ib, E6 ib, EC, EE) so the guest
 * still works, just slowly; lib.c notices (io_emulated) and batches instead.
 */
static bool emulate_io(struct trap_frame *f)
{
        const uint8_t *ip = (const uint8_t *) (uintptr_t) f->rip;
        uint16_t port;
        unsigned len;

        /* Not checking rflags.IOPL: PVM reports it as 0 in the frame even
         * though enter_user() set 3; the guest grants CPL3 port I/O anyway. */
        if ((f->cs & 3) != 3 || f->rip < GUEST_LOAD_ADDR || f->rip >= GUEST_IMAGE_LIMIT - 2)
                return false;
        switch (ip[0]) {
        case 0xe4:
        case 0xe6:
                port = ip[1];
                len = 2;
                break;
        case 0xec:
        case 0xee:
                port = (uint16_t) f->rdx;
                len = 1;
                break;
        default:
                return false;
        }
        if (ip[0] == 0xe4 || ip[0] == 0xec)
                f->rax = (f->rax & ~0xffULL) | inb(port);
        else
                outb(port, (uint8_t) f->rax);
        f->rip += len;
        io_emulated++;
        return true;
}

static void syscall_ud2(struct trap_frame *f)
{
        uint64_t pages;

        switch (f->rax) {
        case SYS_WAIT:
                /* sti's shadow covers hlt: an interrupt already pending is
                 * taken in hlt, not lost before it. */
                __asm__ __volatile__("sti; hlt; cli" ::: "memory");
                f->rax = 0;
                break;
        case SYS_EXIT:
                do_exit((unsigned) f->rdi);
        case SYS_JAM:
                pages = f->rdi < GUEST_JAM_MAX_PAGES ? f->rdi : GUEST_JAM_MAX_PAGES;
                {
                        void *dst = (void *) (uintptr_t) GUEST_JAM_BASE;
                        uint64_t cnt = pages * 4096;
                        /* Deliberately the bulk ring-0 store that jams the ring. */
                        __asm__ __volatile__("rep stosb" : "+D"(dst), "+c"(cnt) : "a"(0x4a) : "memory");
                }
                f->rax = pages;
                break;
        case SYS_UART_WRITE:
        case SYS_UART_READ:
                if (!uart_port_ok(f->rdi) || !user_range_ok(f->rsi, f->rdx))
                        fatal(f);
                f->rax = f->rax == SYS_UART_WRITE ? k_uart_write(f->rdi, f->rsi, f->rdx)
                                                  : k_uart_read(f->rdi, f->rsi, f->rdx);
                break;
        case SYS_UART_RXWAIT:
                if (!uart_port_ok(f->rdi))
                        fatal(f);
                k_uart_rxwait(f->rdi);
                f->rax = 0;
                break;
        default:
                fatal(f);
        }
        f->rip += 2;
}

void trap(struct trap_frame *f)
{
        if (f->vector >= 0x20 && f->vector < 0x30) {
                irq(f);
                return;
        }
        if (f->vector == 6 && (f->cs & 3) == 3) {
                const uint8_t *ip = (const uint8_t *) (uintptr_t) f->rip;
                if (f->rip >= GUEST_LOAD_ADDR && f->rip < GUEST_IMAGE_LIMIT - 1 && ip[0] == 0x0f &&
                    ip[1] == 0x0b) {
                        syscall_ud2(f);
                        return;
                }
        }
        if (f->vector == 13 && emulate_io(f))
                return;
        fatal(f);
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * memtouch: generation-tagged page writes that dirtyrep-memcheck can verify
 * on any RAM snapshot taken between instructions (memtouch-abi.h).
 */
#include "guest.h"
#include "memtouch-abi.h"

static volatile uint32_t desc_ready;
static uint64_t report_ms, run_ms;

static void layout(void)
{
        struct memtouch_desc *d = (struct memtouch_desc *) (uintptr_t) MEMTOUCH_DESC_GPA;
        uint64_t avail = boot_info.work_end > GUEST_WORK_BASE ? boot_info.work_end - GUEST_WORK_BASE : 0;
        uint64_t ws = cfg_size("ws", 16ULL << 20);
        unsigned n = ncpus > MEMTOUCH_MAX_CPUS ? MEMTOUCH_MAX_CPUS : ncpus;

        report_ms = cfg_u64("report_ms", 1000);
        if (report_ms == 0)
                report_ms = 1000;
        run_ms = cfg_u64("run_ms", 0);

        /* descriptor page, then the index (8 bytes per page), then data at 2 MiB */
        uint64_t index_base = MEMTOUCH_DESC_GPA + MEMTOUCH_PAGE_SIZE;
        uint64_t pages = ws / MEMTOUCH_PAGE_SIZE;
        for (;;) {
                uint64_t data_base = (index_base + pages * 8 + (2ULL << 20) - 1) & ~((2ULL << 20) - 1);
                if (data_base + pages * MEMTOUCH_PAGE_SIZE <= GUEST_WORK_BASE + avail || pages == 0)
                        break;
                pages = pages * 7 / 8;
        }
        if (pages < n)
                pages = 0;
        if (pages * MEMTOUCH_PAGE_SIZE != ws)
                pr("memtouch: ws=%lu does not fit RAM, using %lu", ws, pages * MEMTOUCH_PAGE_SIZE);
        uint64_t data_base = (index_base + pages * 8 + (2ULL << 20) - 1) & ~((2ULL << 20) - 1);

        d->version = MEMTOUCH_VERSION;
        d->ncpus = n;
        d->page_size = MEMTOUCH_PAGE_SIZE;
        uint64_t per = pages / (n ? n : 1);
        for (unsigned c = 0; c < n; c++) {
                struct memtouch_cpu *mc = &d->cpu[c];
                uint64_t cnt = c == n - 1 ? pages - per * c : per;
                mc->data_base = data_base + per * c * MEMTOUCH_PAGE_SIZE;
                mc->index_base = index_base + per * c * 8;
                mc->committed = 0;
                mc->inflight_page = 0;
                mc->inflight_gen = 0;
                mc->data_pages = cnt;
        }
        barrier();
        memcpy(d->magic, MEMTOUCH_MAGIC, 8);
}

void guest_main(unsigned cpu)
{
        struct memtouch_desc *d = (struct memtouch_desc *) (uintptr_t) MEMTOUCH_DESC_GPA;

        if (cpu == 0) {
                layout();
                /* Release: pairs with the acquire below; APs use the layout. */
                __atomic_store_n(&desc_ready, 1, __ATOMIC_RELEASE);
        } else {
                while (!__atomic_load_n(&desc_ready, __ATOMIC_ACQUIRE))
                        cpu_relax();
        }
        if (cpu >= d->ncpus || d->cpu[cpu].data_pages == 0) {
                pr("memtouch: cpu=%u idle", cpu);
                for (;;)
                        sys_wait();
        }

        volatile struct memtouch_cpu *mc = &d->cpu[cpu];
        uint64_t pages = mc->data_pages, data_base = mc->data_base;
        volatile uint64_t *index = (volatile uint64_t *) (uintptr_t) mc->index_base;
        uint64_t rng = 0x2545F4914F6CDD1DULL * (cpu + 1);
        uint64_t t_start = rdtsc(), t_report = t_start, report_ticks = ms_to_tsc(report_ms);

        pr("memtouch: cpu=%u data_base=0x%lx pages=%lu index_base=0x%lx", cpu, data_base, pages,
           mc->index_base);
        /* Every store below is volatile, so the compiler keeps program order;
         * x86 keeps it for stores too, and a stopped vCPU has drained its
         * store buffer: a snapshot sees a prefix of this sequence. */
        for (uint64_t gen = mc->committed + 1;; gen++) {
                uint64_t p = xorshift64(&rng) % pages;
                uint64_t gpa = data_base + p * MEMTOUCH_PAGE_SIZE;
                mc->inflight_page = p;
                mc->inflight_gen = gen;
                memtouch_fill((volatile uint64_t *) (uintptr_t) gpa, gpa, gen);
                index[p] = gen;
                mc->committed = gen;

                if ((gen & 15) == 0) {
                        uint64_t now = rdtsc();
                        if (now - t_report >= report_ticks) {
                                pr("memtouch: cpu=%u gen=%lu", cpu, gen);
                                t_report = now;
                        }
                        if (cpu == 0 && run_ms && now - t_start >= ms_to_tsc(run_ms)) {
                                pr("memtouch: done gen=%lu", gen);
                                sys_exit(0);
                        }
                }
        }
}

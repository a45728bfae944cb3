/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * dirtier: dirties pages of a working set at a configurable rate and
 * pattern, stamping each write so a replica's copy can be inspected.
 * Keys and lines: README.md.
 */
#include "guest.h"

#define DIRT_MAGIC 0x54524944u /* "DIRT" */

enum pattern { PAT_SEQ, PAT_RANDOM, PAT_HOTCOLD };
static const char *const pattern_names[] = {"seq", "random", "hotcold"};

struct config {
        uint64_t ws_pages, hot_pages, rate, report_ms, run_ms, jam, jam_after_ms, fill, passes;
        enum pattern pattern;
};

static struct config cfg;
static volatile uint32_t cfg_ready;

static void config_load(void)
{
        char pat[16] = "seq";
        uint64_t avail = boot_info.work_end > GUEST_WORK_BASE ? boot_info.work_end - GUEST_WORK_BASE : 0;
        uint64_t ws = cfg_size("ws", 64ULL << 20);

        if (ws > avail) {
                pr("dirtier: ws=%lu exceeds RAM above 0x%lx, clamped to %lu", ws, (uint64_t) GUEST_WORK_BASE,
                   avail);
                ws = avail;
        }
        cfg.ws_pages = ws / 4096;
        if (cfg.ws_pages < ncpus)
                cfg.ws_pages = ncpus;
        cfg.rate = cfg_u64("rate", 0);
        cfg.report_ms = cfg_u64("report_ms", 1000);
        if (cfg.report_ms == 0)
                cfg.report_ms = 1000;
        cfg.run_ms = cfg_u64("run_ms", 0);
        cfg.jam = cfg_u64("jam", 0);
        cfg.jam_after_ms = cfg_u64("jam_after_ms", 0);
        cfg.fill = cfg_u64("fill", 0);
        cfg.passes = cfg_u64("passes", 0);
        cfg_str("pattern", pat, sizeof(pat));
        cfg.pattern = PAT_SEQ;
        for (unsigned i = 0; i < ARRAY_SIZE(pattern_names); i++)
                if (memcmp(pat, pattern_names[i], strlen(pattern_names[i]) + 1) == 0)
                        cfg.pattern = (enum pattern) i;
        cfg.hot_pages = cfg_size("hot", cfg.ws_pages * 4096 / 10) / 4096;
}

struct dirt_page {
        uint32_t magic;
        uint32_t cpu;
        uint64_t seq;
        uint64_t gpa;
};

void guest_main(unsigned cpu)
{
        if (cpu == 0) {
                config_load();
                if (cfg.jam > 0 && cfg.jam_after_ms == 0) {
                        pr("dirtier: jam pages=%lu", cfg.jam);
                        sys_jam(cfg.jam);
                }
                /* Release: pairs with the APs' acquire loads below. */
                __atomic_store_n(&cfg_ready, 1, __ATOMIC_RELEASE);
        } else {
                while (!__atomic_load_n(&cfg_ready, __ATOMIC_ACQUIRE))
                        cpu_relax();
        }
        if (cpu >= ncpus) {
                pr("dirtier: cpu=%u beyond ncpus=%u, idle", cpu, ncpus);
                for (;;)
                        sys_wait();
        }

        /* This CPU's share: [first, first + pages) of the working set. */
        uint64_t per = cfg.ws_pages / ncpus;
        uint64_t first = per * cpu;
        uint64_t pages = cpu == ncpus - 1 ? cfg.ws_pages - first : per;
        uint64_t hot = cfg.hot_pages / ncpus;
        if (hot == 0)
                hot = 1;
        if (hot > pages)
                hot = pages;
        uint8_t *base = (uint8_t *) (uintptr_t) (GUEST_WORK_BASE + first * 4096);
        uint64_t rate_cpu = cfg.rate / ncpus + (cpu < cfg.rate % ncpus);

        pr("dirtier: cpu=%u ws_base=0x%lx ws_pages=%lu pattern=%s rate=%lu", cpu,
           (uint64_t) (uintptr_t) base, pages, pattern_names[cfg.pattern], rate_cpu);

        uint64_t seq = 0, pass = 0, next = 0, rng = 0x9E3779B97F4A7C15ULL * (cpu + 1);
        uint64_t fill_rng = 0xD1B54A32D192ED03ULL * (cpu + 1);
        uint64_t report_ticks = ms_to_tsc(cfg.report_ms);
        uint64_t t_start = rdtsc(), t_report = t_start, writes_report = 0;
        /* Throttle: writes in the current throttle window vs. its budget. */
        uint64_t t_window = t_start, writes_window = 0;

        for (;;) {
                uint64_t p;
                switch (cfg.pattern) {
                case PAT_SEQ:
                        p = next++;
                        if (next == pages) {
                                next = 0;
                                pass++;
                        }
                        break;
                case PAT_RANDOM:
                        p = xorshift64(&rng) % pages;
                        if ((seq + 1) % pages == 0)
                                pass++;
                        break;
                default: { /* hotcold: 90% of the writes to the first `hot` pages */
                        uint64_t r = xorshift64(&rng);
                        if (r % 10 != 0 || hot == pages)
                                p = (r >> 8) % hot;
                        else
                                p = hot + (r >> 8) % (pages - hot);
                        if ((seq + 1) % pages == 0)
                                pass++;
                }
                }

                struct dirt_page *d = (struct dirt_page *) (base + p * 4096);
                seq++;
                d->magic = DIRT_MAGIC;
                d->cpu = cpu;
                d->seq = seq;
                d->gpa = (uint64_t) (uintptr_t) d;
                if (cfg.fill) {
                        /* The rest of the page, incompressible: what real RAM looks like to LZ4. */
                        uint64_t *q = (uint64_t *) d;
                        for (unsigned i = sizeof(*d) / 8; i < 512; i++)
                                q[i] = xorshift64(&fill_rng);
                }

                if ((seq & 63) != 0 && rate_cpu == 0)
                        continue;
                uint64_t now = rdtsc();
                if (rate_cpu) {
                        writes_window++;
                        /* Budget for the window; restart it every second so a
                         * stall (or a VM pause) is not paid back in a burst. */
                        for (;;) {
                                uint64_t el = now - t_window;
                                if (el >= tsc_khz * 1000) {
                                        t_window = now;
                                        writes_window = 0;
                                        break;
                                }
                                if (writes_window * tsc_khz * 1000 <= el * rate_cpu)
                                        break;
                                cpu_relax();
                                now = rdtsc();
                        }
                }
                if (now - t_report >= report_ticks) {
                        uint64_t ms = tsc_to_ms(now - t_report);
                        uint64_t w = seq - writes_report;
                        pr("dirtier: cpu=%u pass=%lu writes=%lu rate=%lu", cpu, pass, seq,
                           ms ? w * 1000 / ms : 0);
                        t_report = now;
                        writes_report = seq;
                }
                /* A jam later in the run, so a harvester can attach (and turn dirty
                 * logging on) first: the ring only jams while it is logging. */
                if (cpu == 0 && cfg.jam && cfg.jam_after_ms &&
                    now - t_start >= ms_to_tsc(cfg.jam_after_ms)) {
                        pr("dirtier: jam pages=%lu", cfg.jam);
                        sys_jam(cfg.jam);
                        cfg.jam = 0;
                }
                if (cfg.passes && pass >= cfg.passes) {
                        /* Done writing: idle in hlt (no host CPU), RAM stays as written. */
                        pr("dirtier: cpu=%u idle after pass=%lu writes=%lu", cpu, pass, seq);
                        for (;;)
                                sys_wait();
                }
                if (cpu == 0 && cfg.run_ms && now - t_start >= ms_to_tsc(cfg.run_ms)) {
                        pr("dirtier: done writes=%lu", seq);
                        sys_exit(0);
                }
        }
}

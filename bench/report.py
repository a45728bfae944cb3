#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""The benchmark report: every benchmark in one run, dirtyrep beside QEMU.

  bench/run [--quick]           (installs, builds, then runs this)
  bench/report.py --build DIR [--quick] [--out-dir bench/results]

Writes latest.json (every headline figure, the settings it was measured
at, and each target as met/missed with the margin), latest.md (tables)
and PNG plots (gnuplot). These machines are shared and noisy: claims are
ratios between figures measured in this one run, and runs that are
compared (1 GiB vs 16 GiB, dirtyrep vs QEMU) are interleaved.
See docs/performance.md.
"""
import argparse
import contextlib
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time

import qemubench as qb
import replbench as repl
from replbench import repl as loopback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")


def quiet(fn, *a, **kw):
    """Runs fn with its child-process command echo ("+ ...") kept out of the report's output."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        return fn(*a, **kw)


def med(xs):
    return statistics.median(xs)


class Report:
    def __init__(self, quick):
        self.quick = quick
        self.figures = {}
        self.settings = {}
        self.tables = {}
        self.targets = []
        self.notes = []
        self.extra_plot_data = {}
        self.rendered_only = None  # the measuring run, when --only none --merge just re-renders it
        self.t0 = time.time()

    def fig(self, key, value, **settings):
        self.figures[key] = value
        self.settings[key] = settings
        print(f"  {key} = {value}   {json.dumps(settings)}", flush=True)

    def table(self, name, rows):
        self.tables[name] = rows

    def target(self, name, measured, op, limit, unit="", bound=""):
        ok = measured is not None and (measured <= limit if op == "<=" else measured >= limit)
        if measured is None:
            margin = "not measured"
        elif ok:
            margin = "met"
        elif op == "<=":
            margin = f"missed by {measured - limit:.3g}{unit}" + (f" ({measured / limit:.2f}x the limit)" if limit else "")
        else:
            margin = f"missed by {limit - measured:.3g}{unit} ({measured / limit:.2f}x the target)"
        self.targets.append({"target": name, "measured": measured, "op": op, "limit": limit, "unit": unit,
                             "met": ok, "margin": margin, "bound_by": bound if not ok else ""})


def dirtyrep_section(rep, repl, window):
    """Pause vs dirty rate, ring vs bitmap; per-epoch cost vs RAM; full sync; guest progress."""
    rates = [1000, 25000, 100000, 0] if not rep.quick else [25000]
    rows = []
    for rate in rates:
        for tracking in ("ring", "bitmap"):
            r = quiet(repl.run_one, tracking=tracking, rate=rate, window=window)
            print("  run", json.dumps(r), flush=True)
            rows.append(r)
    rep.table("pause_vs_rate", rows)
    head = [r for r in rows if r["tracking"] == "ring" and r["rate"] == 25000][0]
    rep.fig("pause_p50_ms", head["pause_p50_ms"], tracking="ring", dirty_pages_per_s=25000, epoch_ms=20,
            guest="dirtier ws=64M pattern=random", memory="1G", window_s=window)
    rep.fig("pause_p99_ms", head["pause_p99_ms"], tracking="ring", dirty_pages_per_s=25000, epoch_ms=20,
            guest="dirtier ws=64M pattern=random", memory="1G", window_s=window,
            measure="VM stopped, as the VMM's agent saw it: PAUSE arrival to vCPU release (QEMU's COLO "
                    "figure is the same view: its own run->stop->run trace)")
    rep.fig("seal_p99_ms", head["seal_p99_ms"], tracking="ring", dirty_pages_per_s=25000, epoch_ms=20,
            measure="the daemon's view of the same seals: PAUSE sent to RESUME answered (adds the requests' "
                    "two trips between the processes; not guest-visible)")

    if not rep.quick:
        erows = []
        for epoch_ms in (10, 20, 50, 100):
            r = quiet(repl.run_one, tracking="ring", rate=25000, epoch_ms=epoch_ms, window=window)
            print("  run", json.dumps(r), flush=True)
            erows.append(r)
        rep.table("pause_vs_epoch", erows)

    # Cost vs RAM: 1 GiB and 16 GiB interleaved, twice each, medians.
    sizes = ["1G", "4G", "16G"] if not rep.quick else ["1G", "16G"]
    reps = 1 if rep.quick else 2
    cost = {}
    for k in range(reps):
        for tracking in ("ring", "bitmap"):
            for memory in sizes:
                r = quiet(repl.run_one, tracking=tracking, memory=memory, window=window)
                print("  run", json.dumps(r), flush=True)
                cost.setdefault((tracking, memory), []).append(r)
    crow = []
    for (tracking, memory), rs in sorted(cost.items()):
        crow.append({"tracking": tracking, "memory": memory,
                     "daemon_cpu_ms_per_epoch": round(med([r["daemon_cpu_ms_per_epoch"] for r in rs]), 3),
                     "pause_p50_ms": round(med([r["pause_p50_ms"] for r in rs]), 3),
                     "pause_p99_ms": round(med([r["pause_p99_ms"] for r in rs]), 3), "runs": len(rs)})
    rep.table("cost_vs_ram", crow)
    for tracking in ("ring", "bitmap"):
        c1 = [r for r in crow if r["tracking"] == tracking and r["memory"] == "1G"][0]
        c16 = [r for r in crow if r["tracking"] == tracking and r["memory"] == "16G"][0]
        ratio = round(c16["daemon_cpu_ms_per_epoch"] / max(c1["daemon_cpu_ms_per_epoch"], 1e-9), 3)
        rep.fig(f"{tracking}_cost_ratio_16g_vs_1g", ratio, measure="primary daemon CPU per epoch, median of "
                f"{reps} interleaved runs", dirty_pages_per_s=25000, epoch_ms=20, tracking=tracking)
        rep.fig(f"{tracking}_pause_ratio_16g_vs_1g",
                round(c16["pause_p50_ms"] / max(c1["pause_p50_ms"], 1e-9), 3), measure="pause p50",
                dirty_pages_per_s=25000, epoch_ms=20, tracking=tracking)


def spread(xs):
    """min/median/max of a list, rounded, for a figure's settings."""
    return {"min": round(min(xs), 2), "median": round(med(xs), 2), "max": round(max(xs), 2), "n": len(xs)}


SYNC_PAIRS = 5


def sync_section(rep, repl, qb, build):
    """dirtyrep full sync and QEMU migration on the same RAM: SYNC_PAIRS interleaved pairs (incompressible
    pages, bitmap migration), the order alternating within a pair; min/median/max. dirtyrep is timed twice:
    from EPOCH_BEGIN (the daemon's own clock) and from before the connect (QEMU's total-time starts there)."""
    rows, pairs = [], []
    for k in range(SYNC_PAIRS):
        runs = [("dirtyrep", 1), ("qemu-migration", False)]
        if not rep.quick or k == 0:
            runs += [("dirtyrep", 0), ("qemu-migration", True)]  # stamped pages and QEMU's ring: context
        if k % 2:  # QEMU first in every other pair
            runs = [r for r in runs if r[0] != "dirtyrep"] + [r for r in runs if r[0] == "dirtyrep"]
        pair = {}
        for who, arg in runs:
            if who == "dirtyrep":
                r = quiet(repl.full_sync, fill=arg)
            else:
                r = quiet(qb.migration, build, ring=arg)
            r["who"] = who
            r["pair"] = k
            print("  run", json.dumps(r), flush=True)
            rows.append(r)
            if who == "dirtyrep" and arg == 1:
                pair["dr"] = r
            elif who == "qemu-migration" and not arg:
                pair["qm"] = r
        pairs.append(pair)
    rep.table("full_sync", rows)
    dr = [p["dr"]["guest_RAM_MBps"] for p in pairs]
    drc = [p["dr"]["guest_RAM_MBps_from_connect"] for p in pairs]
    qm = [p["qm"]["guest_RAM_MBps"] for p in pairs]
    ratio = [p["dr"]["guest_RAM_MBps"] / p["qm"]["guest_RAM_MBps"] for p in pairs]
    ratio_c = [p["dr"]["guest_RAM_MBps_from_connect"] / p["qm"]["guest_RAM_MBps"] for p in pairs]
    dr_c = [r["guest_RAM_MBps"] for r in rows if r["who"] == "dirtyrep" and str(r["fill"]) == "0"]
    qr = [r["guest_RAM_MBps"] for r in rows if r["who"] == "qemu-migration" and r["tracking"] == "ring"]
    common = dict(memory="1G", written="900M, every page written once then idle", link="TCP 127.0.0.1")
    n = f"median of {len(pairs)} interleaved pairs"
    rep.fig("full_sync_MBps", round(med(dr), 1), data="incompressible pages (dirtier fill=1)",
            compression="lz4 (default)", measure=f"guest RAM / (EPOCH_BEGIN -> standby ACK), {n}",
            spread=spread(dr), **common)
    rep.fig("full_sync_MBps_from_connect", round(med(drc), 1), data="incompressible pages (dirtier fill=1)",
            measure=f"guest RAM / (before the primary's connect -> the ACK seen by a 2 ms status poll; the same "
                    f"span as QEMU's total-time, and never shorter than the true one), {n}",
            spread=spread(drc), **common)
    rep.fig("full_sync_MBps_compressible", round(med(dr_c), 1), data="stamped pages (dirtier fill=0)",
            compression="lz4", measure=f"EPOCH_BEGIN -> ACK, median of {len(dr_c)}", spread=spread(dr_c), **common)
    rep.fig("qemu_migration_MBps", round(med(qm), 1), data="incompressible pages (dirtier fill=1)",
            tracking="bitmap", max_bandwidth="unlimited", measure=f"guest RAM / total-time (QMP), {n}",
            spread=spread(qm), **common)
    rep.fig("qemu_migration_MBps_ring", round(med(qr), 1), tracking="dirty ring 65536",
            measure=f"median of {len(qr)}", spread=spread(qr), **common)
    rep.fig("full_sync_ratio_vs_qemu", round(med(ratio), 2), spread=spread(ratio),
            measure=f"per pair: dirtyrep full_sync_MBps (from EPOCH_BEGIN) / qemu_migration_MBps; {n}")
    rep.fig("full_sync_ratio_vs_qemu_from_connect", round(med(ratio_c), 2), spread=spread(ratio_c),
            measure=f"per pair: dirtyrep from before its connect / QEMU total-time, the same span; {n}")


def colo_section(rep, repl, qb, build, window):
    rows = []
    for delay in ([20] if rep.quick else [20, 200]):
        r = quiet(qb.colo, build, rate=25000, delay_ms=delay, window=window)
        print("  run", json.dumps(r), flush=True)
        rows.append(r)
    rep.table("qemu_colo", rows)
    c20 = [r for r in rows if r["checkpoint_delay_ms"] == 20][0]
    rep.fig("qemu_colo_pause_p50_ms", c20["pause_p50_ms"], dirty_pages_per_s=25000, checkpoint_delay_ms=20,
            tracking="bitmap (QEMU 7.2 asserts with the ring)", guest="dirtier ws=64M pattern=random",
            measure="colo_vm_state_change run=>stop to stop=>run (QEMU trace)")
    rep.fig("qemu_colo_checkpoints_per_s", c20["checkpoints_per_s"], checkpoint_delay_ms=20)
    rep.fig("qemu_colo_guest_pages_per_s", c20["guest_pages_per_s"], requested=25000, checkpoint_delay_ms=20)
    p99 = rep.figures["pause_p99_ms"]
    rep.fig("colo_pause_p50_over_dirtyrep_pause_p99", round(c20["pause_p50_ms"] / max(p99, 1e-9), 1),
            measure="how many times shorter dirtyrep's p99 pause is than QEMU COLO's median")


def progress_section(rep, repl, window):
    rows = []
    for replicated in (False, True):
        r = quiet(repl.progress, replicated, window=window)
        print("  run", json.dumps(r), flush=True)
        rows.append(r)
    rep.table("guest_progress", rows)
    un = rows[0]["guest_pages_per_s"]
    re_ = rows[1]["guest_pages_per_s"]
    rep.fig("guest_progress_ratio", round(re_ / max(un, 1), 6), guest="dirtier ws=64M pattern=random rate=0 "
            "(unthrottled page writes)", epoch_ms=20, tracking="ring",
            note="unreplicated writes are plain stores; replicated, each first write to a page after a "
                 "re-protect is a write-protect fault in this software hypervisor (docs/kvm-host.md)")
    # The same at the rate the other figures use: does the guest still get the 25k pages/s it asks for?
    t25 = [r for r in rep.tables.get("pause_vs_rate", []) if r["tracking"] == "ring" and r["rate"] == 25000]
    if t25:
        rep.fig("guest_progress_ratio_at_25k", round(t25[0]["dirty_pages_per_s"] / 25000, 3),
                measure="dirty pages/s the primary saw / 25000 requested", epoch_ms=20, tracking="ring")


def images_section(rep, build):
    import imagebench as ib
    rows = []
    for size in (["1G"] if rep.quick else ["1G", "4G"]):
        r = quiet(ib.bench_size, build, ib.parse_size(size), "/var/tmp", 1000)
        print("  run", json.dumps(r)[:600], flush=True)
        for mode in ("raw", "lz4"):
            m = r[mode]
            rows.append({"guest_ram": r["guest_ram"], "mode": mode, "write_MBps_full": m["write_mbps_full"],
                         "write_MBps_incr": med(m["write_mbps_incr"]), "pause_ms_full": m["pause_us_full"] / 1000,
                         "pause_ms_incr": med(m["pause_us_incr"]) / 1000, "restore_ms_full": m["restore_ms_full"],
                         "restore_ms_chain3": m["restore_ms_chain3"], "full_bytes": m["full_bytes"],
                         "incr_bytes": med(m["incr_bytes"])})
    rep.table("images", rows)
    common = dict(guest="dirtier hotcold, hot set 64 MiB, working set half of RAM", tracking="ring",
                  taker="dr-imager (pre-copy, then one pause)")
    for r in rows:
        if r["mode"] == "raw":
            g = r["guest_ram"].lower()
            rep.fig(f"image_restore_ms_{g}", r["restore_ms_full"], measure="dirtyrep-vmm --restore-image to "
                    "--ready-fd (first guest instruction), full image, warm page cache", **common)
            rep.fig(f"image_write_MBps_full_{g}", r["write_MBps_full"], measure="page data / write time incl. "
                    "fsync", **common)
            rep.fig(f"image_pause_ms_incr_{g}", r["pause_ms_incr"], **common)


def run_failover_bench(rep, build, runs, *extra):
    """bench/failover-bench.py's per-run times and its heartbeat line; None (and a note) when it failed."""
    c = subprocess.run([sys.executable, os.path.join(BENCH, "failover-bench.py"), "--build", build, "--runs",
                        str(runs), *extra], capture_output=True, text=True, timeout=1800)
    rows = []
    for m in re.finditer(r"^run +(\d+) (\w+) *: guest executing after +([\d.]+) ms, service back after +([\d.]+) ms",
                         c.stdout, re.M):
        rows.append({"run": int(m.group(1)), "death": m.group(2), "guest_executing_ms": float(m.group(3)),
                     "service_back_ms": float(m.group(4))})
    what = " ".join(["failover-bench", *extra])
    if c.returncode != 0 or not rows:
        rep.notes.append(f"{what} failed (exit {c.returncode}): {(c.stdout + c.stderr)[-600:]}")
        return None
    hb = re.search(r"^heartbeat: (\d+) ms x (\d+)$", c.stdout, re.M)
    if not hb:
        rep.notes.append(f"{what} printed no heartbeat line: the figures are left out")
        return None
    return rows, hb


def failover_section(rep, build):
    """bench/failover-bench.py (network namespaces, kv guest): per-run times, parsed from its output."""
    runs = 4 if rep.quick else 20
    got = run_failover_bench(rep, build, runs)
    if not got:
        return
    rows, hb = got
    rep.table("failover", rows)
    ex = [r["guest_executing_ms"] for r in rows]
    sv = [r["service_back_ms"] for r in rows]
    st = dict(heartbeat=f"{hb.group(1)} ms x {hb.group(2)}", guest="kv, 64 MiB", deaths="alternating: silent (switch ports down, then "
              "SIGKILL) and SIGKILL", runs=len(rows), measure="primary death -> standby's VMM running on the replica")
    rep.fig("failover_p50_ms", round(med(ex), 1), **st)
    rep.fig("failover_p99_ms", round(pct(ex, 0.99), 1), note=f"p99 of {len(rows)} runs is their maximum", **st)
    rep.fig("failover_service_back_p50_ms", round(med(sv), 1), measure="death -> first PONG through the service "
            "address (takeover, gratuitous ARP, TCP connect)")
    rep.extra_plot_data["failover"] = rows


def run_redis_bench(rep, build, requests, *extra):
    """bench/redis-bench.py's rows (configuration, test, latencies); None (and a note) when it failed."""
    c = subprocess.run([sys.executable, os.path.join(BENCH, "redis-bench.py"), "--build", build, "--requests",
                        str(requests), *extra], capture_output=True, text=True, timeout=1800)
    rows = []
    for m in re.finditer(r"^\| (unreplicated|replicated \d+ ms) \| (\w+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| "
                         r"([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", c.stdout, re.M):
        rows.append({"configuration": m.group(1), "test": m.group(2), "rps": float(m.group(3)),
                     "avg_ms": float(m.group(4)), "p50_ms": float(m.group(5)), "p95_ms": float(m.group(6)),
                     "p99_ms": float(m.group(7)), "max_ms": float(m.group(8))})
    if c.returncode != 0 or not rows:
        rep.notes.append(f"{' '.join(['redis-bench', *extra])} failed (exit {c.returncode}): "
                         f"{(c.stdout + c.stderr)[-600:]}")
        return None
    return rows


def redis_section(rep, build):
    """bench/redis-bench.py: redis-benchmark through the kv guest, unreplicated vs 20/50 ms epochs."""
    rows = run_redis_bench(rep, build, 100 if rep.quick else 1000)
    if not rows:
        return
    rep.table("redis", rows)
    for conf, key in (("unreplicated", "redis_p50_ms_unreplicated"), ("replicated 20 ms", "redis_p50_ms_replicated")):
        xs = [r["p50_ms"] for r in rows if r["configuration"] == conf]
        if xs:
            rep.fig(key, round(med(xs), 3), tests="set,get,incr (median of the three p50s)", clients=1,
                    epoch_ms=20 if "20" in conf else None, guest="kv through the service address, network namespaces")
    un = {r["test"]: r["p50_ms"] for r in rows if r["configuration"] == "unreplicated"}
    worst = None
    for r in rows:
        if r["configuration"].startswith("replicated"):
            ms = int(r["configuration"].split()[1])
            over = r["p50_ms"] - (un.get(r["test"], 0) + ms + 3)
            worst = over if worst is None else max(worst, over)
    if worst is not None:
        rep.fig("redis_p50_excess_over_target_ms", round(worst, 3),
                measure="max over tests and epochs of replicated p50 - (unreplicated p50 + epoch + 3 ms); <= 0 meets")
    rep.extra_plot_data["redis"] = rows


def load_section(rep, build, out_dir):
    """bench/load-bench.py: 8 VMs under one dirtyrepd, one fails over (writes load.{json,md,png})."""
    dur = 120 if rep.quick else 600
    c = subprocess.run([sys.executable, os.path.join(BENCH, "load-bench.py"), "--build", build, "--duration",
                        str(dur), "--warmup", "30" if rep.quick else "60", "--out-dir", out_dir, "--name", "load"],
                       capture_output=True, text=True, timeout=dur + 900)
    path = os.path.join(out_dir, "load.json")
    if not os.path.exists(path) or os.path.getmtime(path) < rep.t0:
        rep.notes.append(f"section load failed (exit {c.returncode}): {(c.stdout + c.stderr)[-600:]}")
        return
    r = json.load(open(path))
    st = dict(vms=r["run"]["vms"], memory=r["run"]["memory"], duration_s=r["run"]["duration_s"],
              heartbeat=r["run"]["heartbeat"], details="load.md")
    others = [v for k, v in r["vms"].items() if not v.get("failed_over")]
    rep.fig("load_min_epochs_per_s", min(v["epochs_per_s"] for v in r["vms"].values()), epoch_ms=20, **st)
    rep.fig("load_vms_with_a_10s_window_without_commit", sum(1 for v in r["vms"].values() if v["empty_10s_windows"]),
            **st)
    growth = [s_["growth_pct_per_10min"] for d in r["daemons"].values() for s_ in d["segments"]]
    rep.fig("load_daemon_rss_growth_pct_per_10min_max", max(growth) if growth else None,
            measure="least-squares RSS slope after the warm-up, before and after the failover", **st)
    rep.fig("load_others_disturbed_by_failover", sum(1 for v in others if not v.get("undisturbed")),
            measure="VMs with a commit gap > max(500 ms, their longest in the minute before) or < 80 % of "
                    "their epoch rate, after one VM's failover", **st)
    rep.fig("load_failover_promoted_s", r["failover"]["promoted_after_s"], measure="primary VMM SIGKILL -> the "
            "VM running on the standby host (includes the kernel's teardown of the killed VMM)", **st)
    if c.returncode != 0:
        rep.notes.append(f"load-bench verdicts: {json.dumps(r['verdicts'])}")

QEMU_AGENT_PAUSE_RUNS = 3
QEMU_AGENT_DEATHS = 20


def loadavg():
    return float(open("/proc/loadavg").read().split()[0])


def qemu_agent_section(rep, build):
    """dirtyrep + QEMU: the VM under QEMU with the dirtyrep-agent device (vmm/qemu/, scripts/build-qemu), the
    same guests and daemons as the dirtyrep-vmm figures. Pause: QEMU_AGENT_PAUSE_RUNS runs of the dirtier at
    25k pages/s, 20 ms epochs, the median of the runs' p50s and p99s; failover: QEMU_AGENT_DEATHS deaths of the
    primary host (bench/failover-bench.py --qemu); redis: bench/redis-bench.py --qemu."""
    import qemuagentbench as qa
    qemu = qa.find_qemu()
    print(f"  QEMU: {qemu}", flush=True)
    window = 6.0
    runs = []
    for k in range(QEMU_AGENT_PAUSE_RUNS):
        la0 = loadavg()
        r = quiet(qa.pause, qemu, rate=25000, epoch_ms=20, window=window)
        r["loadavg"] = [la0, loadavg()]
        print("  run", json.dumps(r), flush=True)
        runs.append(r)
    rep.table("qemu_agent_pause", runs)
    loads = [x for r in runs for x in r["loadavg"]]
    common = dict(vmm="QEMU 7.2 (Debian 1:7.2+dfsg-7+deb12u18) + vmm/qemu/patches, -device dirtyrep-agent",
                  tracking="ring (dirty-ring-size=4096)", dirty_pages_per_s=25000, epoch_ms=20,
                  guest="dirtier ws=64M pattern=random", memory="1G (memory-backend-memfd, share=on)", vcpus=1,
                  window_s=window, trials=len(runs), loadavg=f"{min(loads):.2f}-{max(loads):.2f}")
    rep.fig("qemu_agent_pause_p50_ms", round(med([r["pause_p50_ms"] for r in runs]), 3),
            measure=f"VM stopped, as the agent in QEMU saw it (PAUSE arrival to vCPU release, after reset-pauses), "
                    f"as pause_p50_ms for dirtyrep-vmm; median of the {len(runs)} runs' p50s",
            runs_ms=[r["pause_p50_ms"] for r in runs], **common)
    rep.fig("qemu_agent_pause_p99_ms", round(med([r["pause_p99_ms"] for r in runs]), 3),
            measure=f"the same pauses' p99, median of the {len(runs)} runs' p99s",
            runs_ms=[r["pause_p99_ms"] for r in runs], **common)
    rep.fig("qemu_agent_seal_p99_ms", round(med([r["seal_p99_ms"] for r in runs]), 3),
            measure="the daemon's view of the same seals (PAUSE sent to RESUME answered), median of the runs' p99s",
            **common)
    rep.fig("qemu_agent_guest_progress_ratio_at_25k", round(med([r["dirty_pages_per_s"] for r in runs]) / 25000, 3),
            measure="dirty pages/s the primary saw / 25000 requested, median of the runs", **common)
    colo = rep.figures.get("qemu_colo_pause_p50_ms")
    if colo:
        rep.fig("qemu_colo_pause_p50_over_qemu_agent_pause_p99",
                round(colo / max(rep.figures["qemu_agent_pause_p99_ms"], 1e-9), 1),
                measure="how many times shorter dirtyrep + QEMU's p99 pause is than QEMU COLO's median, both on "
                        "QEMU 7.2 (COLO: Debian's qemu-system-x86_64, bench/qemubench.py), same guest and rate")

    got = run_failover_bench(rep, build, QEMU_AGENT_DEATHS, "--qemu", qemu)
    if got:
        rows, hb = got
        rep.table("qemu_agent_failover", rows)
        ex = [r["guest_executing_ms"] for r in rows]
        st = dict(vmm="QEMU + agent on both hosts (VmmType=qemu: the standby starts QEMU with restore= on its "
                  "replica; each run checked 'device state restored')", heartbeat=f"{hb.group(1)} ms x {hb.group(2)}",
                  guest="kv, 64 MiB, 1 vCPU", deaths="alternating: silent (switch ports down, then SIGKILL) and "
                  "SIGKILL", trials=len(rows), measure="primary death -> standby's QEMU running on the replica "
                  "(its status out of activating, polled every 2 ms)")
        rep.fig("qemu_agent_failover_p50_ms", round(med(ex), 1), **st)
        rep.fig("qemu_agent_failover_p99_ms", round(pct(ex, 0.99), 1),
                note=f"p99 of {len(rows)} deaths is their maximum", **st)
        rep.fig("qemu_agent_failover_service_back_p50_ms", round(med([r["service_back_ms"] for r in rows]), 1),
                measure="death -> first PONG through the service address on a connection opened after the death "
                        "(the service is a serial line: a PONG may answer an earlier PING of the same pinger)")

    rows = run_redis_bench(rep, build, 100 if rep.quick else 1000, "--qemu", qemu)
    if rows:
        rep.table("qemu_agent_redis", rows)
        svc = ("kv guest's RESP on COM2, a QEMU socket chardev on TCP 6379 (a serial line: one byte stream, no "
               "connection boundaries), redis-benchmark in the client namespace")
        for conf, key in (("unreplicated", "qemu_agent_redis_p50_ms_unreplicated"),
                          ("replicated 20 ms", "qemu_agent_redis_p50_ms")):
            xs = [r["p50_ms"] for r in rows if r["configuration"] == conf]
            if xs:
                rep.fig(key, round(med(xs), 3), tests="set,get,incr (median of the three p50s)", clients=1,
                        requests=100 if rep.quick else 1000, epoch_ms=20 if "20" in conf else None,
                        vmm="QEMU + agent" + ("" if "20" in conf else " (no dirtyrepd attached)"), service=svc,
                        reached="the service address (primary A, standby B)" if "20" in conf else "host A's address",
                        trials=1)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def plots(rep, out_dir):
    gp = shutil.which("gnuplot")
    if not gp:
        rep.notes.append("gnuplot not found: no plots (apt-get install gnuplot-nox)")
        return []
    made = []
    data = os.path.join(out_dir, "data")
    os.makedirs(data, exist_ok=True)

    def run(name, script):
        path = os.path.join(out_dir, name)
        full = f'set terminal pngcairo size 900,560 font "sans,11"\nset output "{path}"\n' + script
        r = subprocess.run([gp], input=full, text=True, capture_output=True)
        if r.returncode != 0:
            rep.notes.append(f"gnuplot {name}: {r.stderr.strip()[:300]}")
        else:
            made.append(name)

    # 1. pause vs dirty rate
    rows = rep.tables.get("pause_vs_rate", [])
    if rows:
        for tracking in ("ring", "bitmap"):
            with open(os.path.join(data, f"pause-{tracking}.dat"), "w") as f:
                for r in sorted(rows, key=lambda r: r["dirty_pages_per_s"]):
                    if r["tracking"] == tracking:
                        f.write(f'{max(r["dirty_pages_per_s"], 1)} {r["pause_p50_ms"]} {r["pause_p99_ms"]}\n')
        colo = rep.figures.get("qemu_colo_pause_p50_ms")
        extra = ""
        if colo:
            with open(os.path.join(data, "colo.dat"), "w") as f:
                f.write(f'{max(rep.figures.get("qemu_colo_guest_pages_per_s") or 25000, 1)} {colo}\n')
            extra = f', "{data}/colo.dat" using 1:2 with points pt 7 ps 2 lc rgb "#c00000" title "QEMU COLO p50 (asked 25k/s, 20 ms)"'
        run("pause-vs-rate.png", f'''set title "Epoch pause vs guest dirty rate (20 ms epochs, 1 GiB guest)"
set logscale xy
set xlabel "dirty pages/s the primary saw"
set ylabel "seal pause (ms)"
set key bottom right
set grid
plot "{data}/pause-ring.dat" using 1:2 with linespoints lw 2 title "dirtyrep ring p50", \\
     "{data}/pause-ring.dat" using 1:3 with linespoints dt 2 lw 2 title "dirtyrep ring p99", \\
     "{data}/pause-bitmap.dat" using 1:2 with linespoints lw 2 title "dirtyrep bitmap p50", \\
     "{data}/pause-bitmap.dat" using 1:3 with linespoints dt 2 lw 2 title "dirtyrep bitmap p99", \\
     3 with lines lc rgb "#888888" title "target p99 <= 3 ms"{extra}
''')
    # 2. ring vs bitmap cost vs RAM
    crow = rep.tables.get("cost_vs_ram", [])
    if crow:
        gib = lambda m: int(m.rstrip("G"))  # noqa: E731
        for tracking in ("ring", "bitmap"):
            with open(os.path.join(data, f"cost-{tracking}.dat"), "w") as f:
                for r in sorted(crow, key=lambda r: gib(r["memory"])):
                    if r["tracking"] == tracking:
                        f.write(f'{gib(r["memory"])} {r["daemon_cpu_ms_per_epoch"]} {r["pause_p50_ms"]}\n')
        run("cost-vs-ram.png", f'''set title "Per-epoch cost vs guest RAM (25k pages/s, 20 ms epochs)"
set logscale x 2
set xlabel "guest RAM (GiB)"
set ylabel "primary daemon CPU per epoch (ms)"
set y2label "pause p50 (ms)"
set y2tics
set yrange [0:*]
set y2range [0:*]
set key top left
set grid
plot "{data}/cost-ring.dat" using 1:2 with linespoints lw 2 title "ring: CPU/epoch", \\
     "{data}/cost-bitmap.dat" using 1:2 with linespoints lw 2 title "bitmap: CPU/epoch", \\
     "{data}/cost-ring.dat" using 1:3 axes x1y2 with linespoints dt 2 title "ring: pause p50", \\
     "{data}/cost-bitmap.dat" using 1:3 axes x1y2 with linespoints dt 2 title "bitmap: pause p50"
''')
    # 3. full sync vs QEMU migration
    if rep.figures.get("full_sync_MBps"):
        with open(os.path.join(data, "sync.dat"), "w") as f:
            f.write(f'"dirtyrep full sync\\n(incompressible)" {rep.figures["full_sync_MBps"]}\n')
            if rep.figures.get("full_sync_MBps_from_connect"):
                f.write(f'"dirtyrep full sync\\n(from connect)" {rep.figures["full_sync_MBps_from_connect"]}\n')
            f.write(f'"dirtyrep full sync\\n(stamped pages)" {rep.figures["full_sync_MBps_compressible"]}\n')
            f.write(f'"QEMU migration\\n(bitmap)" {rep.figures["qemu_migration_MBps"]}\n')
            f.write(f'"QEMU migration\\n(ring)" {rep.figures["qemu_migration_MBps_ring"]}\n')
        run("sync-vs-migration.png", f'''set title "Guest RAM copied per second, 1 GiB guest, 127.0.0.1"
set style data histogram
set style fill solid 0.8
set boxwidth 0.7
set ylabel "MB/s of guest RAM"
set yrange [0:*]
set grid ytics
plot "{data}/sync.dat" using 2:xtic(1) notitle lc rgb "#3060c0"
''')
    # 4. failover time distribution
    fr = rep.extra_plot_data.get("failover")
    if fr:
        with open(os.path.join(data, "failover.dat"), "w") as f:
            for i, v in enumerate(sorted(r["guest_executing_ms"] for r in fr)):
                f.write(f"{v} {(i + 1) / len(fr)}\n")
        with open(os.path.join(data, "failover-service.dat"), "w") as f:
            for i, v in enumerate(sorted(r["service_back_ms"] for r in fr)):
                f.write(f"{v} {(i + 1) / len(fr)}\n")
        hb = rep.settings.get("failover_p50_ms", {}).get("heartbeat", "?")
        run("failover-cdf.png", f'''set title "Failover time, {len(fr)} primary deaths ({hb} heartbeats)"
set xlabel "ms from the primary's death"
set ylabel "fraction of runs"
set yrange [0:1.05]
set key bottom right
set grid
set xrange [0:350]
set arrow from 300,0 to 300,1.05 nohead dt 2 lc rgb "#888888"
set label "target 300 ms" at 300,1.0 right offset -0.5,0
plot "{data}/failover.dat" using 1:2 with steps lw 2 title "guest executing on the standby", \\
     "{data}/failover-service.dat" using 1:2 with steps lw 2 title "service answering via the service IP"
''')
    rr = rep.extra_plot_data.get("redis")
    if rr:
        confs = []
        for r in rr:
            if r["configuration"] not in confs:
                confs.append(r["configuration"])
        tests = []
        for r in rr:
            if r["test"] not in tests:
                tests.append(r["test"])
        with open(os.path.join(data, "redis.dat"), "w") as f:
            f.write("test " + " ".join(f'"{c}"' for c in confs) + "\n")
            for t in tests:
                vals = [next((r["p50_ms"] for r in rr if r["test"] == t and r["configuration"] == c), 0) for c in confs]
                f.write(f'"{t}" ' + " ".join(str(v) for v in vals) + "\n")
        cols = ", ".join(f'"" using {i + 2}:xtic(1) title columnheader({i + 2})' for i in range(len(confs)))
        run("redis-latency.png", f'''set title "redis-benchmark p50 latency through the kv guest"
set style data histogram
set style histogram cluster gap 1
set style fill solid 0.8
set ylabel "p50 latency (ms)"
set yrange [0:*]
set key top left
set grid ytics
plot {cols.replace('""', '"' + data + '/redis.dat"', 1)}
''')
    return made


def vmm_comparison(f):
    """The same measures for the three ways of replicating a VM, from the report's figures (markdown lines)."""
    cols = [("dirtyrep-vmm", "pause_p50_ms", "pause_p99_ms", "failover_p50_ms", "failover_p99_ms",
             "redis_p50_ms_replicated"),
            ("dirtyrep + QEMU", "qemu_agent_pause_p50_ms", "qemu_agent_pause_p99_ms", "qemu_agent_failover_p50_ms",
             "qemu_agent_failover_p99_ms", "qemu_agent_redis_p50_ms"),
            ("QEMU COLO", "qemu_colo_pause_p50_ms", None, None, None, None)]
    if not any(f.get(c[1]) is not None for c in cols[1:]):
        return []
    rows = [("pause p50 (ms), 25k pages/s, 20 ms", 1), ("pause p99 (ms)", 2), ("failover p50 (ms)", 3),
            ("failover p99 (ms)", 4), ("redis p50 replicated (ms)", 5)]
    cell = lambda c, i: "no automatic failover" if c[0] == "QEMU COLO" and i in (3, 4) else (  # noqa: E731
        "—" if c[i] is None or f.get(c[i]) is None else str(f[c[i]]))
    md = ["", "## dirtyrep-vmm, dirtyrep + QEMU, QEMU COLO", "",
          "Settings of each cell: the figure of the same name under Headline figures (`qemu_agent_redis_p50_ms`: "
          "the kv service on a serial line).", "",
          "| measure | " + " | ".join(c[0] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for name, i in rows:
        md.append(f"| {name} | " + " | ".join(cell(c, i) for c in cols) + " |")
    return md


def write(rep, out_dir, made):
    os.makedirs(out_dir, exist_ok=True)
    out = dict(rep.figures)
    out["settings"] = rep.settings
    out["targets"] = rep.targets
    out["tables"] = rep.tables
    out["notes"] = rep.notes
    out["plots"] = made
    out["run"] = {"quick": rep.quick, "seconds": round(time.time() - rep.t0, 1), "host": platform.node(),
                  "kernel": platform.release(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "cpus": os.cpu_count(), "loadavg_at_end": open("/proc/loadavg").read().split()[:3]}
    if rep.rendered_only:
        # --only none --merge measured nothing: the run is still the one that did.
        out["run"] = dict(rep.rendered_only, rendered=out["run"]["when"])
    with open(os.path.join(out_dir, "latest.json"), "w") as f:
        json.dump(out, f, indent=2)
    md = ["# dirtyrep benchmark report", "",
          f"Run {out['run']['when']} on {out['run']['host']} ({out['run']['cpus']} CPUs, kernel "
          f"{out['run']['kernel']}), {'quick' if rep.quick else 'full'} run, {out['run']['seconds']} s. "
          "Ratios compare figures measured in this one run.", "", "## Targets", "",
          "| target | measured | limit | result |", "|---|---|---|---|"]
    for t in rep.targets:
        md.append(f"| {t['target']} | {t['measured']}{t['unit']} | {t['op']} {t['limit']}{t['unit']} | "
                  f"{t['margin']}{(' — ' + t['bound_by']) if t['bound_by'] else ''} |")
    md += vmm_comparison(rep.figures)
    md += ["", "## Headline figures", "", "| figure | value | measured at |", "|---|---|---|"]
    for k, v in rep.figures.items():
        s = ", ".join(f"{a}={b}" for a, b in rep.settings.get(k, {}).items())
        md.append(f"| `{k}` | {v} | {s} |")
    for name, rows in rep.tables.items():
        if not rows:
            continue
        keys = list(rows[0].keys())
        for r in rows[1:]:
            keys += [k for k in r if k not in keys]
        md += ["", f"## {name}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in rows:
            md.append("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    if made:
        md += ["", "## Plots", ""] + [f"![{m}]({m})" for m in made]
    if rep.notes:
        md += ["", "## Notes", ""] + [f"- {n}" for n in rep.notes]
    with open(os.path.join(out_dir, "latest.md"), "w") as f:
        f.write("\n".join(md) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--out-dir", default=os.path.join(BENCH, "results"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--merge", action="store_true", help="with --only: merge into the existing latest.json")
    ap.add_argument("--only", help="comma-separated sections: dirtyrep,sync,colo,progress,images,failover,redis,"
                    "qemu_agent (dirtyrep + QEMU: pause, failover and redis with the VM under QEMU with the agent) "
                    "and load (only when named: 10 minutes, writes load.{json,md,png})")
    a = ap.parse_args()
    b = os.path.abspath(a.build)
    loopback.build_env(b, "dirtier", "memtouch", "kv")
    rep = Report(a.quick)
    if a.merge:
        # Re-run some sections into an existing report: keep the others' figures and tables.
        old = json.load(open(os.path.join(a.out_dir, "latest.json")))
        rerun = set(a.only.split(",")) if a.only else set()
        rep.t0 -= old["run"]["seconds"]  # the report's time is the measuring time of all its sections
        keep_tables = {k: v for k, v in old.get("tables", {}).items()}
        rep.tables.update(keep_tables)
        for k, v in old.items():
            if k not in ("settings", "targets", "tables", "notes", "plots", "run"):
                rep.figures[k] = v
                rep.settings[k] = old["settings"].get(k, {})
        # Old plot errors are redone below; a re-run section's old failure no longer holds.
        rep.notes = [n for n in old.get("notes", [])
                     if not n.startswith("gnuplot ") and not any(n.startswith(f"section {x} ") for x in rerun)]
        if rerun == {"none"}:
            rep.rendered_only = old["run"]
        if rerun - {"none"}:
            rep.notes.append(f"sections {sorted(rerun)} re-run at {time.strftime('%H:%M:%SZ', time.gmtime())} and "
                             f"merged into the run of {old['run']['when']}")
        for t in ("failover", "redis"):
            if t in rep.tables:
                rep.extra_plot_data[t] = rep.tables[t]
    window = 2.5 if a.quick else 6.0
    only = set(a.only.split(",")) if a.only else None

    def want(s):
        return only is None or s in only

    def section(name, fn, *args, **kw):
        """A failing section is reported in the notes; the others still run."""
        try:
            fn(*args, **kw)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - a benchmark's failure is data too
            rep.notes.append(f"section {name} failed: {type(e).__name__}: {str(e)[:400]}")
            print(f"  section {name} FAILED: {e}", flush=True)

    if want("dirtyrep"):
        print("== dirtyrep: pause vs rate, cost vs RAM", flush=True)
        section("dirtyrep", dirtyrep_section, rep, repl, window)
    if want("sync"):
        print("== full sync vs QEMU migration", flush=True)
        section("sync", sync_section, rep, repl, qb, b)
    if want("colo") and "pause_p99_ms" in rep.figures:
        print("== QEMU COLO", flush=True)
        section("colo", colo_section, rep, repl, qb, b, window=4.0 if a.quick else 8.0)
    if want("progress"):
        print("== guest progress", flush=True)
        section("progress", progress_section, rep, repl, window)

    if want("images"):
        print("== checkpoint images", flush=True)
        section("images", images_section, rep, b)
    if want("failover"):
        print("== failover time", flush=True)
        section("failover", failover_section, rep, b)
    if want("redis"):
        print("== redis-benchmark through the kv guest", flush=True)
        section("redis", redis_section, rep, b)
    if want("qemu_agent"):
        print("== dirtyrep + QEMU: pause, failover, redis with the VM under QEMU with the agent", flush=True)
        section("qemu_agent", qemu_agent_section, rep, b)
    if only is not None and "load" in only:
        # Opt-in: 10 minutes (--quick: 2) of 8 VMs under one daemon; see load.md.
        print("== load: 8 VMs under one dirtyrepd, one fails over", flush=True)
        section("load", load_section, rep, b, a.out_dir)

    f = rep.figures
    rep.target("pause p99 at 25k pages/s, 20 ms epochs (ms)", f.get("pause_p99_ms"), "<=", 3.0, " ms",
               bound="scheduling of the VMM's vCPU and agent threads on a 2-CPU shared machine")
    if "qemu_colo_pause_p50_ms" in f:
        rep.target("QEMU COLO pause p50 / dirtyrep pause p99", f.get("colo_pause_p50_over_dirtyrep_pause_p99"),
                   ">=", 20.0, "x")
    if "qemu_agent_pause_p99_ms" in f:
        rep.target("dirtyrep + QEMU: pause p99 at 25k pages/s, 20 ms epochs (ms)", f.get("qemu_agent_pause_p99_ms"),
                   "<=", 3.0, " ms", bound="scheduling of QEMU's vCPU and agent threads on a 2-CPU shared machine")
    if "qemu_colo_pause_p50_over_qemu_agent_pause_p99" in f:
        rep.target("QEMU COLO pause p50 / dirtyrep + QEMU pause p99", f.get("qemu_colo_pause_p50_over_qemu_agent_pause_p99"),
                   ">=", 20.0, "x")
    if "full_sync_ratio_vs_qemu_from_connect" in f:
        rep.target("full sync / QEMU migration throughput (both from the connect, median of interleaved pairs)",
                   f.get("full_sync_ratio_vs_qemu_from_connect"), ">=", 1.3, "x",
                   bound="the standby's loop thread (perf: ~40% of it first-touch faults on the fresh staging "
                         "memfd, then CRC32C and the recv copy; bench/results/profile-full-sync.txt); QEMU's own "
                         "figure moves 5x between runs here")
        rep.target("full sync throughput (MB/s of guest RAM)", f.get("full_sync_MBps"), ">=", 1000.0, " MB/s",
                   bound="two daemons, the kernel's loopback TCP and the page copies share 2 CPUs")
    if "failover_p99_ms" in f:
        rep.target("failover p99 (ms)", f.get("failover_p99_ms"), "<=", 300.0, " ms")
    if "redis_p50_excess_over_target_ms" in f:
        rep.target("redis p50 - (unreplicated p50 + epoch + 3 ms)", f.get("redis_p50_excess_over_target_ms"), "<=",
                   0.0, " ms")
    if "load_daemon_rss_growth_pct_per_10min_max" in f:
        rep.target("load: daemon RSS growth after warm-up (% per 10 min)", f.get("load_daemon_rss_growth_pct_per_10min_max"),
                   "<=", 1.0, " %")
        rep.target("load: VMs disturbed by another VM's failover", f.get("load_others_disturbed_by_failover"), "<=", 0,
                   "")
    if "ring_cost_ratio_16g_vs_1g" in f:
        rep.target("ring cost ratio 16 GiB / 1 GiB", f.get("ring_cost_ratio_16g_vs_1g"), "<=", 1.1, "x")
    made = plots(rep, a.out_dir)
    write(rep, a.out_dir, made)
    print(f"wrote {a.out_dir}/latest.json, latest.md, {len(made)} plots in {time.time() - rep.t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

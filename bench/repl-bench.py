#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Replication benchmarks of dirtyrepd (issue 3's figures), on loopback.

  bench/repl-bench.py [--build DIR] [--out FILE] [--quick]

For each setting: dirtyrep-vmm runs the dirtier guest, a standby and a
primary dirtyrepd replicate it, and after the pair is protected the
primary's own status is sampled over a window:
  - seal pause p50/p99/max (PAUSE request to RESUME reply, primary side), and
    the VM's pause as the agent saw it, over the seals of the window only
    (the debug socket's reset-pauses at its start),
  - pages per epoch, link MB/s, compression ratio,
  - primary daemon CPU per epoch (utime+stime from /proc).
Sweeps: dirty rate (1k, 25k, 100k pages/s, unthrottled) x ring/bitmap at
20 ms; epoch length (10, 20, 50, 100 ms) at 25k; guest RAM (1, 4, 16 GiB)
x ring/bitmap at 25k and 20 ms (per-epoch cost vs RAM size); and full-sync
throughput of a 1 GiB guest whose RAM was written first.
One run on a shared machine: compare figures within a run, as ratios.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from replbench import full_sync, repl, run_one  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/results/repl-bench.json"))
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    b = os.path.abspath(a.build)
    repl.build_env(b, "dirtier")
    window = 4.0 if a.quick else 8.0
    res = {"host": os.uname().release, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": []}

    def go(**kw):
        r = run_one(window=window, **kw)
        print(json.dumps(r), flush=True)
        res["runs"].append(r)
        return r

    rates = [1000, 25000, 100000, 0] if not a.quick else [25000, 0]
    for tracking in ("ring", "bitmap"):
        for rate in rates:
            go(tracking=tracking, rate=rate)
    for epoch_ms in ([10, 50, 100] if not a.quick else [50]):
        go(epoch_ms=epoch_ms)
    cost = {}
    for tracking in ("ring", "bitmap"):
        for memory in (["1G", "4G", "16G"] if not a.quick else ["1G", "16G"]):
            cost[(tracking, memory)] = go(tracking=tracking, memory=memory)
    for tracking in ("ring", "bitmap"):
        c1, c16 = cost[(tracking, "1G")], cost[(tracking, "16G")]
        res[f"{tracking}_cost_ratio_16g_vs_1g"] = {
            "daemon_cpu_per_epoch": round(c16["daemon_cpu_ms_per_epoch"] / max(c1["daemon_cpu_ms_per_epoch"], 1e-9), 3),
            "pause_p50": round(c16["pause_p50_ms"] / max(c1["pause_p50_ms"], 1e-9), 3),
        }
    res["full_sync"] = full_sync()
    print(json.dumps(res["full_sync"]), flush=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    sys.exit(main())

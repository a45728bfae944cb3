#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Control-path and tracking measurements of the reference VMM + agent.

  bench/vmm-bench.py [--build DIR] [--out FILE] [--quick]

Measures, in one run (these machines are shared and noisy, so compare
numbers only within a run):
  - PAUSE -> RESUME round trip through the agent, 1 and 2 vCPUs (p50/p99);
  - ring entries harvested per second from one vCPU's ring by a second
    process (dirtier unthrottled, random pattern);
  - dirtier pages/s as the guest reports it, untracked vs tracked (ring and
    bitmap, with a harvester attached), and their ratio.
Writes JSON to --out (default bench/results/vmm-bench.json) and prints it.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "lib"))
from drproc import terminate  # noqa: E402


def run_vmm(b, tmp, tag, args):
    console = os.path.join(tmp, f"{tag}.console")
    ctl = os.path.join(tmp, f"{tag}.sock")
    p = subprocess.Popen([os.path.join(b, "vmm/ref/dirtyrep-vmm"), "--name", tag, "--control", ctl,
                          "--console", console] + args,
                         stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, f"{tag}.err"), "w"))
    return p, console, ctl


def wait_lines(console, rx, n, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        try:
            ms = re.findall(rx, open(console).read(), re.M)
        except FileNotFoundError:
            ms = []
        if len(ms) >= n:
            return ms
        time.sleep(0.1)
    raise SystemExit(f"timeout waiting for {rx} in {console}")


def guest_rate(console, cpu, since_lines, seconds):
    """Mean of the guest's own rate= reports over `seconds`, after `since_lines` reports."""
    rx = rf"^dirtier: cpu={cpu} pass=\d+ writes=\d+ rate=(\d+)"
    before = len(re.findall(rx, open(console).read(), re.M))
    time.sleep(seconds)
    rates = [int(x) for x in re.findall(rx, open(console).read(), re.M)[before + 1:]]
    return sum(rates) / len(rates) if rates else 0.0


def stop(p):
    terminate(p, 15)


def harv(b, *args):
    out = subprocess.run([os.path.join(b, "tests/kvm/dr-harvester")] + list(args), capture_output=True,
                         text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"dr-harvester {args[0]} failed: {out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/results/vmm-bench.json"))
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    b = os.path.abspath(a.build)
    dirtier = os.path.join(b, "vmm/guests/dirtier.elf")
    secs = 3 if a.quick else 6
    res = {"host": os.uname().release, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    with tempfile.TemporaryDirectory(prefix="dr-bench-") as tmp:
        # PAUSE -> RESUME round trip.
        for cpus in (1, 2):
            p, console, ctl = run_vmm(b, tmp, f"pause{cpus}", [
                "--kernel", dirtier, "--cpus", str(cpus), "--memory", "256M",
                "--append", "ws=16M pattern=random rate=0 report_ms=500"])
            wait_lines(console, rf"^dirtier: cpu={cpus - 1} pass=", 1)
            r = harv(b, "bench-pause", "--control", ctl, "--count", "300" if a.quick else "1000")
            res[f"pause_resume_{cpus}vcpu"] = r
            stop(p)

        # Untracked vs tracked guest rate, and ring harvest rate, in one VM each.
        for mode in ("ring", "bitmap"):
            p, console, ctl = run_vmm(b, tmp, f"rate-{mode}", [
                "--kernel", dirtier, "--cpus", "1", "--memory", "1G", "--tracking", mode,
                "--append", "ws=256M pattern=random rate=0 report_ms=250"])
            wait_lines(console, r"^dirtier: cpu=0 pass=\d+ writes=\d+ rate=", 3)
            untracked = guest_rate(console, 0, 0, secs)
            h = subprocess.Popen([os.path.join(b, "tests/kvm/dr-harvester"), "bench-harvest", "--control", ctl,
                                  "--seconds", str(secs + 2)], stdout=subprocess.PIPE, text=True)
            time.sleep(1.0)
            tracked = guest_rate(console, 0, 0, secs)
            out, _ = h.communicate(timeout=120)
            hr = json.loads(out.strip().splitlines()[-1])
            res[f"dirtier_{mode}"] = {
                "untracked_pages_per_s": round(untracked),
                "tracked_pages_per_s": round(tracked),
                "tracked_over_untracked": round(tracked / untracked, 4) if untracked else None,
                "harvest": hr,
                "settings": "1 vCPU, 1 GiB RAM, ws=256M random, unthrottled",
            }
            stop(p)
        res["ring_entries_per_s_one_vcpu"] = res["dirtier_ring"]["harvest"]["entries_per_s"]

    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    sys.exit(main())

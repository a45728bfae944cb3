#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Profiles the primary dirtyrepd with perf while it replicates a guest.

  bench/profile-primary.py MEMORY [--build DIR] [--seconds N]

Starts dirtyrep-vmm (dirtier, ws=64M random, 25k pages/s, ring), a standby
and a primary dirtyrepd on loopback, waits until protected, records
`perf record -g -p <primary>` into /tmp/perf-MEMORY.data, and prints the
top symbols. Compare e.g. 1G with 16G to see what grows with RAM size.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import replbench as rb
from replbench import ROOT, repl


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("memory")
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--seconds", type=int, default=5)
    a = ap.parse_args()
    b = os.path.abspath(a.build)
    repl.build_env(b, "dirtier")
    out = f"/tmp/perf-{a.memory}.data"
    with tempfile.TemporaryDirectory(prefix="dr-prof-") as tmp:
        vmm = rb.BVmm(tmp, a.memory, "ring", "ws=64M pattern=random rate=25000 report_ms=1000")
        rb.wait_console(vmm.console, "ws_base=")
        primary, standby = repl.pair(tmp, vmm, "ring")
        try:
            primary.wait(lambda s: s["state"] == "protected", "protected", timeout=300)
            time.sleep(1)
            subprocess.run(["perf", "record", "-q", "-g", "-o", out, "-p", str(primary.proc.pid), "--", "sleep",
                            str(a.seconds)], check=True, capture_output=True)
        finally:
            for p in (primary, standby, vmm):
                p.kill()
    rep = subprocess.run(["perf", "report", "-i", out, "--no-children", "--sort", "symbol", "--stdio"],
                         capture_output=True, text=True)
    print("\n".join(l for l in rep.stdout.splitlines() if l.strip()[:1].isdigit())[:3000])
    return 0


if __name__ == "__main__":
    sys.exit(main())

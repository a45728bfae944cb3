#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""The peer: QEMU 7.2 live migration and COLO on the same guest images (issue 7).

  bench/qemu-bench.py [--build DIR] [--quick]

migration(): source and destination qemu-system-x86_64 on 127.0.0.1, the
dirtier guest having written its working set once and idling (the same
RAM dirtyrep's full sync is measured on); max-bandwidth unlimited; total
time, downtime, and guest RAM MB/s = RAM size / total time. Dirty ring
(-accel kvm,dirty-ring-size=...) or bitmap.

colo(): COLO with periodic checkpoints (x-checkpoint-delay), bitmap
tracking (QEMU 7.2 asserts at the first checkpoint with the ring). The
checkpoint pause is read from QEMU's own trace: colo_vm_state_change
run=>stop to stop=>run on the primary, with -msg timestamp=on.
"""
import argparse
import json
import os
import sys

import qemu
from qemubench import colo, migration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if not qemu.QEMU:
        print("qemu-system-x86_64 not found: apt-get install qemu-system-x86", file=sys.stderr)
        return 1
    b = os.path.abspath(a.build)
    out = {"migration": [], "colo": []}
    for ring in (False, True):
        r = migration(b, ring=ring)
        print(json.dumps(r), flush=True)
        out["migration"].append(r)
    for delay in ([20] if a.quick else [20, 200]):
        r = colo(b, delay_ms=delay, window=4.0 if a.quick else 8.0)
        print(json.dumps(r), flush=True)
        out["colo"].append(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())

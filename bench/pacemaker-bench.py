#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Failover time under Pacemaker: kill the primary's container, time until a redis-cli INCR through the
cluster's service address is answered again by the promoted standby (docs/pacemaker.md).

  bench/pacemaker-bench.py [--build DIR] [--trials N] [--out bench/results/latest.json]

Runs tests/integration/test-pacemaker.py kill-primary (three systemd-nspawn containers, corosync knet
with token 1500 ms, STONITH by the tests' fence_drhost, the kv guest) with N kills (default 7), each a
fail back after a rejoin and full resync, and merges pacemaker_failover_p50_ms and
pacemaker_failover_max_ms (with their settings) into the report's latest.json, leaving every other
figure as it is. Needs root, /dev/kvm, systemd-nspawn, debootstrap and the Debian archive (the
container tree is cached in DIR). Exit 1 when the run fails: nothing is merged then.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(HERE)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(SRC, "build"))
    ap.add_argument("--trials", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "latest.json"))
    a = ap.parse_args()
    b = os.path.abspath(a.build)
    env = dict(os.environ, DR_SRCDIR=SRC, DR_BUILDDIR=b, DR_VMM=f"{b}/vmm/ref/dirtyrep-vmm",
               DR_DIRTYREPD=f"{b}/daemon/dirtyrepd", DR_DIRTYREPCTL=f"{b}/client/dirtyrepctl",
               DR_GUEST_KV=f"{b}/vmm/guests/kv.elf", DR_GUEST_DIRTIER=f"{b}/vmm/guests/dirtier.elf",
               DR_PCMK_TRIALS=str(a.trials))
    subprocess.run(["ninja", "-C", b], check=True, stdout=subprocess.DEVNULL)
    with tempfile.NamedTemporaryFile(prefix="dr-pcmk-bench-", suffix=".json") as res:
        env["DR_PCMK_RESULT"] = res.name
        t0 = time.time()
        rc = subprocess.run([sys.executable, os.path.join(SRC, "tests/integration/test-pacemaker.py"),
                             "kill-primary"], env=env).returncode
        if rc != 0:
            print(f"pacemaker-bench: the cluster run failed (exit {rc}); nothing merged", file=sys.stderr)
            return 1
        r = json.load(open(res.name))
    took = time.time() - t0
    try:
        rep = json.load(open(a.out))
    except FileNotFoundError:
        rep = {"settings": {}}
    how = (f"test-pacemaker.py kill-primary: {len(r['pacemaker_failover_ms'])} kills of the primary's container "
           f"(SIGKILL to its init), fenced by Pacemaker, standby promoted by ocf:dirtyrep:dirtyrep; kill to the "
           f"first acknowledged INCR through the IPaddr2 service address; corosync token "
           f"{r['corosync_token_ms']} ms; samples {r['pacemaker_failover_ms']} ms; run "
           f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, {took:.0f} s, load {os.getloadavg()[0]:.1f}")
    for k in ("pacemaker_failover_p50_ms", "pacemaker_failover_max_ms"):
        rep[k] = r[k]
        rep.setdefault("settings", {})[k] = {"how": how}
    with open(a.out + ".tmp", "w") as f:
        json.dump(rep, f, indent=2)
        f.write("\n")
    os.replace(a.out + ".tmp", a.out)
    print(f"pacemaker_failover_p50_ms {r['pacemaker_failover_p50_ms']}, "
          f"pacemaker_failover_max_ms {r['pacemaker_failover_max_ms']} -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""redis-benchmark through the kv guest: unreplicated vs replicated (output commit on).

  bench/redis-bench.py [--build DIR] [--requests N] [--clients C] [--qemu PATH]

Uses tests/lib/drtest.py's network namespaces: host A runs
dirtyrep-vmm with the kv guest; the client namespace runs
`redis-benchmark -t set,get,incr --csv` against it. Configurations:
  - unreplicated: the VMM alone (no dirtyrepd: output passes straight through);
  - replicated, EpochMs=20 and EpochMs=50: primary on A, standby on B,
    benchmark through the service address once the pair is protected.
Prints requests/s and latency percentiles per test and configuration, and
checks the target p50 <= unreplicated p50 + epoch + 3 ms.
One run on a shared 2-core machine: noisy; compare within a run.
--qemu PATH: the kv guest runs under that QEMU with the dirtyrep-agent device
(tests/lib/qemuvm.py), its RESP service on COM2, a socket chardev on TCP 6379
(a serial line: one byte stream, no connection boundaries for the guest);
unreplicated is the same QEMU, agent device present, no dirtyrepd attached.
"""
import argparse
import csv
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "lib"))
import drtest as fo  # noqa: E402
import qemuvm  # noqa: E402


def bench(ip, requests, clients):
    r = fo.run(*fo.ns_exec("c", "redis-benchmark", "-h", ip, "-p", str(fo.KV_PORT), "-t", "set,get,incr",
                           "-n", str(requests), "-c", str(clients), "--csv"), timeout=300)
    rows = {}
    for row in csv.DictReader(io.StringIO(r.stdout)):
        rows[row["test"]] = {k: float(v) for k, v in row.items() if k != "test"}
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--heartbeat-misses", type=int, default=4,
                    help="HeartbeatMisses= (x 50 ms); raise it on a loaded machine")
    ap.add_argument("--qemu", help="QEMU with the dirtyrep-agent device (scripts/build-qemu prints it)")
    a = ap.parse_args()
    fo.build_env(a.build, "kv")
    fo.install_sigterm()
    tmp = tempfile.mkdtemp(prefix="dr-redis-bench-")
    results = {}
    extra = {}
    if a.qemu:
        fo.start_kv = qemuvm.kv_starter(a.qemu)
        extra = qemuvm.failover_keys(a.qemu, tmp)
    try:
        fo.net_up()
        fo.write_fence(tmp)
        v = fo.start_kv(tmp, "a")
        fo.wait_file(os.path.join(tmp, "a", "console.log"), "kv: ready", v)
        results["unreplicated"] = bench(fo.HOST_IP["a"], a.requests, a.clients)
        v.kill()
        for ms in (20, 50):
            # setup_pair() waits for "kv: ready" in this file: not the killed VM's (under QEMU, attaching
            # while the firmware boots ends the session: docs/qemu.md, "Limits").
            os.unlink(os.path.join(tmp, "a", "console.log"))
            A, B = fo.setup_pair(tmp, {**extra, "EpochMs": str(ms)}, misses=a.heartbeat_misses)
            A.daemon.ok("reset-pauses t")  # the pause printed below: the seals of the run only
            results[f"replicated {ms} ms"] = bench(fo.SVC_IP, a.requests, a.clients)
            st = A.daemon.status()
            print(f"# {ms} ms: primary {st['state']}, epochs committed {st['epochs_committed']}, "
                  f"pause p50 {st['pause_ns_p50'] / 1e6:.2f} ms", flush=True)
            for p in (B.daemon, A.daemon, A.vmm):
                os.killpg(p.pid, 9)
                p.kill()
    except (fo.Fail, subprocess.TimeoutExpired) as e:
        print("FAIL:", e)
        for p in fo.LIVE:
            p.dump()
        return 1
    finally:
        fo.kill_live()  # with their process groups: a daemon's holds a VMM it started by a promotion
        fo.net_down()
        shutil.rmtree(tmp, ignore_errors=True)  # its logs were dumped above on a failure

    vmm = "QEMU with the agent, service on a serial line" if a.qemu else "dirtyrep-vmm"
    print(f"\nredis-benchmark -t set,get,incr -n {a.requests} -c {a.clients} (kv guest, 64 MiB, 1 vCPU, {vmm}; "
          "latency in ms)\n")
    print("| configuration | test | requests/s | avg | p50 | p95 | p99 | max | target p50 <= |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = results["unreplicated"]
    for conf, rows in results.items():
        for t, r in rows.items():
            target = ""
            if conf != "unreplicated":
                ms = int(conf.split()[1])
                limit = base[t]["p50_latency_ms"] + ms + 3
                target = f"{limit:.2f} {'ok' if r['p50_latency_ms'] <= limit else 'MISSED'}"
            print(f"| {conf} | {t} | {r['rps']:.0f} | {r['avg_latency_ms']:.2f} | {r['p50_latency_ms']:.2f} | "
                  f"{r['p95_latency_ms']:.2f} | {r['p99_latency_ms']:.2f} | {r['max_latency_ms']:.2f} | {target} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

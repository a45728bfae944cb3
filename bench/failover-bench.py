#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Failover time: from the primary host's death to the guest executing on the standby.

  bench/failover-bench.py [--build DIR] [--runs N] [--heartbeat-ms MS] [--qemu PATH]

Uses tests/lib/drtest.py's namespaces (hosts A and B, client
C, switch S). Each run: the pair is protected (after the first run, the dead
host has rejoined as standby); a pinger in the client namespace sends PING to
the service address every 2 ms over a fresh connection per attempt and logs
CLOCK_MONOTONIC times of PONGs; then the primary host dies, in one of two
ways, alternating:
  - silent: its switch ports go down, then its processes are SIGKILLed
    (power loss: only missed heartbeats tell the standby);
  - kill: SIGKILL only (the kernel closes its sockets: the standby sees the
    connection reset at once).
Measured from the death (port down / kill, CLOCK_MONOTONIC):
  - guest executing: the standby's VMM wrote its --ready-fd (vCPUs started on
    the replica); taken from the monotonic timestamp the test reads off the
    standby's status poll (every 2 ms), i.e. an upper bound;
  - service back: the first PONG, through the service address, to a PING
    sent after the death (includes the address takeover, ARP and a TCP
    connect).
Prints min/p50/p90/max per mode. --heartbeat-ms: HeartbeatIntervalMs= of
both daemons (the misses stay 4); the setting is read back from their
configuration files and printed ("heartbeat: MS ms x MISSES").
--qemu PATH: the VM is the kv guest under that QEMU with the dirtyrep-agent
device on both hosts (tests/lib/qemuvm.py; VmmType=qemu: the standby starts
QEMU on its replica with restore=), its service a serial line on TCP 6379;
each run also checks that the promoted QEMU restored the device state
rather than booting.
"""
import argparse
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "lib"))
import drtest as fo  # noqa: E402
import qemuvm  # noqa: E402

PINGER = r"""
import socket, sys, time
ip, port = sys.argv[1], int(sys.argv[2])
while True:
    t = time.monotonic()
    try:
        s = socket.create_connection((ip, port), timeout=0.05)
        s.settimeout(0.05)
        s.sendall(b"PING\r\n")
        if s.recv(16).startswith(b"+PONG"):
            print(f"{t:.6f} {time.monotonic():.6f}", flush=True)
        s.close()
    except OSError:
        pass
    time.sleep(max(0.0, 0.002 - (time.monotonic() - t)))
"""


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def restored_qemu(S):
    """The QEMU the promoted standby started (its output in the log its dirtyrepd names)
    restored the replica's device state: it did not boot the guest again."""
    logs = re.findall(r"output to (\S+\.vmm\.log)", S.daemon.text())
    if not logs:
        raise fo.Fail("the standby's dirtyrepd did not say where its QEMU's output goes")
    with open(logs[-1], errors="replace") as f:
        if "device state restored" not in f.read():
            raise fo.Fail(f"no 'device state restored' in {logs[-1]}: the promoted QEMU did not restore")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--heartbeat-ms", type=int, default=50)
    ap.add_argument("--qemu", help="QEMU with the dirtyrep-agent device (scripts/build-qemu prints it)")
    a = ap.parse_args()
    fo.build_env(a.build, "kv")
    fo.install_sigterm()
    # Every Daemon the namespaces' scaffolding writes takes its HeartbeatIntervalMs= from there.
    fo.HEARTBEAT_MS = a.heartbeat_ms
    tmp = tempfile.mkdtemp(prefix="dr-failover-bench-")
    extra = None
    if a.qemu:
        fo.start_kv = qemuvm.kv_starter(a.qemu)  # setup_pair() starts the first primary's VM with it
        extra = qemuvm.failover_keys(a.qemu, tmp)
        print(f"vmm: {a.qemu} (VmmType=qemu on both hosts)", flush=True)
    res = {"silent": {"exec": [], "service": []}, "kill": {"exec": [], "service": []}}
    pinger = None
    try:
        fo.net_up()
        fo.write_fence(tmp)
        A, B = fo.setup_pair(tmp, extra)
        P, S = A, B
        # The label below states what the daemons were configured with, read back from their files.
        hb = {}
        for h in (A, B):
            with open(os.path.join(h.daemon.dir, "dirtyrep.conf")) as f:
                conf = f.read()
            hb[h.name] = tuple(int(re.search(rf"^{k}=(\d+)$", conf, re.M).group(1))
                               for k in ("HeartbeatIntervalMs", "HeartbeatMisses"))
        if len(set(hb.values())) != 1 or hb["a"][0] != a.heartbeat_ms:
            raise fo.Fail(f"the daemons' heartbeat settings {hb} are not --heartbeat-ms {a.heartbeat_ms}")
        interval, misses = hb["a"]
        print(f"heartbeat: {interval} ms x {misses}", flush=True)
        for k in range(a.runs):
            mode = "silent" if k % 2 == 0 else "kill"
            out = os.path.join(tmp, f"ping{k}.log")
            f = open(out, "w")
            pinger = subprocess.Popen(fo.ns_exec("c", "python3", "-c", PINGER, fo.SVC_IP, str(fo.KV_PORT)),
                                      stdout=f, process_group=0)
            time.sleep(random.uniform(0.3, 0.6))
            t_death = time.monotonic()
            fo.kill_primary(P, silent=(mode == "silent"))
            t_exec = None
            end = time.monotonic() + 10
            while time.monotonic() < end:
                st = S.daemon.status()
                if st["role"] == "primary" and st["state"] != "activating":
                    t_exec = time.monotonic()
                    break
                time.sleep(0.002)
            time.sleep(1.0)
            os.killpg(pinger.pid, 9)
            pinger.wait()
            pinger = None
            f.close()
            # PONGs to requests sent after the death (one in flight may still have come
            # from the old primary just before its ports went down).
            pongs = [tuple(map(float, line.split())) for line in open(out) if line.strip()]
            after = [end_t for start_t, end_t in pongs if start_t > t_death]
            if t_exec is None or not after:
                raise fo.Fail(f"run {k}: no failover seen (exec {t_exec}, {len(after)} PONGs after)")
            e_ms, s_ms = (t_exec - t_death) * 1000, (after[0] - t_death) * 1000
            if a.qemu:
                restored_qemu(S)
            res[mode]["exec"].append(e_ms)
            res[mode]["service"].append(s_ms)
            print(f"run {k:2d} {mode:6s}: guest executing after {e_ms:6.1f} ms, service back after {s_ms:6.1f} ms",
                  flush=True)
            if k + 1 < a.runs:
                fo.rejoin(tmp, P, S, extra)
            P, S = S, P
    except fo.Fail as e:
        print("FAIL:", e)
        for p in fo.LIVE:
            p.dump()
        return 1
    finally:
        if pinger:
            os.killpg(pinger.pid, 9)
            pinger.wait()
        fo.kill_live()
        fo.net_down()
        shutil.rmtree(tmp, ignore_errors=True)  # its logs were dumped above on a failure

    vmm = "QEMU with the agent" if a.qemu else "dirtyrep-vmm"
    print(f"\nFailover time, HeartbeatIntervalMs={interval} x HeartbeatMisses={misses}, kv guest 64 MiB ({vmm}), "
          f"{a.runs} runs (ms from death)\n")
    print("| death | measure | n | min | p50 | p90 | max |")
    print("|---|---|---|---|---|---|---|")
    for mode, d in res.items():
        for m, xs in d.items():
            if xs:
                print(f"| {mode} | {'guest executing' if m == 'exec' else 'first PONG via service IP'} | "
                      f"{len(xs)} | {min(xs):.1f} | {statistics.median(xs):.1f} | {pct(xs, 0.9):.1f} | "
                      f"{max(xs):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

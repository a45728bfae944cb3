#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""What TLS costs on the replication link: full-sync throughput, plaintext vs TLS.

  bench/tls-bench.py [--build DIR] [--memory 512M] [--ws 450M] [--reps 2] [--compression none|lz4]

For each repetition and mode (plaintext, TLS 1.3 with mutual certificates made
by `openssl req` in a temporary directory), dirtyrep-vmm runs the dirtier guest,
which writes its working set once and idles; a standby and a primary dirtyrepd
then do the first (full) sync, and the primary's own measure of it (EPOCH_BEGIN
of the full epoch to the standby's ACK: every non-zero page copied, sent,
CRC-checked, staged, committed) is reported with the daemons' CPU time. With
Compression=none the link carries the working set raw, so its throughput is what
the transport can do on loopback. Modes alternate, so machine noise hits both.
"""
import argparse
import json
import os
import sys
import tempfile

import replbench as rb
from replbench import ROOT, repl
from pki import Pki, tls_keys  # (tests/lib: on sys.path from replbench)


def one(tls, memory, ws, compression):
    with tempfile.TemporaryDirectory(prefix="dr-tls-bench-") as tmp:
        pki = Pki(tmp)
        ks = tls_keys(pki, "standby.test") if tls else {}
        kp = tls_keys(pki, "primary.test") if tls else {}
        vmm = rb.BVmm(tmp, memory, "ring", f"ws={ws} pattern=seq rate=0 report_ms=200 passes=1")
        rb.wait_console(vmm.console, r"idle after pass=1")
        port = repl.free_port()
        standby = repl.Daemon(tmp, "standby", {"t": {"Role": "standby", "Listen": f"127.0.0.1:{port}", **ks}})
        primary = repl.Daemon(tmp, "primary", {"t": {"Role": "primary", "ControlSocket": vmm.control,
                                                     "Peer": f"127.0.0.1:{port}", "Tracking": "ring",
                                                     "Compression": compression, **kp}})
        try:
            c0 = rb.cpu_s(primary.proc.pid) + rb.cpu_s(standby.proc.pid)
            st = primary.wait(lambda s: s["last_committed"] >= 1 and s["last_sync_usec"] > 0, "the full sync",
                              timeout=300)
            c1 = rb.cpu_s(primary.proc.pid) + rb.cpu_s(standby.proc.pid)
        finally:
            for p in (primary, standby, vmm):
                p.kill()
    if not st["last_sync_full"] or st["full_syncs"] != 1:
        print(f"discarded: {st['full_syncs']} full syncs ({st['detail']})", file=sys.stderr)
        return None
    secs = st["last_sync_usec"] / 1e6
    return {"mode": "tls" if tls else "plain", "seconds": round(secs, 3),
            "wire_MBps": round(st["bytes_sent"] / 1e6 / secs, 1), "bytes_sent": st["bytes_sent"],
            "daemons_cpu_s": round(c1 - c0, 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--memory", default="512M")
    ap.add_argument("--ws", default="450M")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--compression", default="none")
    a = ap.parse_args()
    b = os.path.abspath(a.build)
    repl.build_env(b, "dirtier")
    runs = []
    for _ in range(a.reps):
        for tls in (False, True):
            r = one(tls, a.memory, a.ws, a.compression)
            if r:
                print(json.dumps(r), flush=True)
                runs.append(r)
    for mode in ("plain", "tls"):
        m = [r["wire_MBps"] for r in runs if r["mode"] == mode]
        if m:
            print(f"{mode}: best {max(m)} MB/s on the wire over {len(m)} run(s)")


if __name__ == "__main__":
    main()

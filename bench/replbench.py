# SPDX-License-Identifier: GPL-2.0-or-later
"""The replication benchmarks' runs (bench/repl-bench.py runs them all; bench/report.py,
bench/tls-bench.py and bench/profile-primary.py some): a dirtyrep-vmm with the dirtier
guest, a standby and a primary dirtyrepd on loopback (tests/lib/loopback.py).
"""
import os
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "lib"))
import loopback as repl  # noqa: E402


def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def BVmm(tmp, memory, tracking, append):
    """dirtyrep-vmm running the dirtier guest on one vCPU."""
    return repl.Vmm(tmp, "dirtier", tracking, None, append, memory=memory)


def wait_console(path, pattern, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        try:
            if re.search(pattern, open(path, errors="replace").read(), re.M):
                return
        except FileNotFoundError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"timeout waiting for /{pattern}/ in {path}")


def run_one(memory="1G", tracking="ring", rate=25000, epoch_ms=20, window=6.0, ws="64M"):
    with tempfile.TemporaryDirectory(prefix="dr-bench-") as tmp:
        vmm = BVmm(tmp, memory, tracking, f"ws={ws} pattern=random rate={rate} report_ms=1000")
        wait_console(vmm.console, "ws_base=")
        return pause_window(tmp, vmm, memory=memory, tracking=tracking, rate=rate, epoch_ms=epoch_ms, window=window)


def pause_window(tmp, vmm, memory, tracking, rate, epoch_ms, window):
    """A standby and a primary of vmm (a VMM with an agent on vmm.control running the dirtier
    at rate; bench/qemuagentbench.py's QEMU too) until protected, then `window` seconds of
    epochs measured; kills all three. The figures of run_one()."""
    primary, standby = repl.pair(tmp, vmm, tracking, epoch_ms=epoch_ms)
    try:
        primary.wait(lambda s: s["state"] == "protected", "protected", timeout=300)
        time.sleep(1.0)
        # The window starts here: the pause percentiles the status reports afterwards cover only
        # its seals (without the reset, the daemon's last 1024 seals: warm-up and full sync too).
        primary.ok("reset-pauses t")
        s0, c0, t0 = primary.status(), cpu_s(primary.proc.pid), time.time()
        time.sleep(window)
        s1, c1, t1 = primary.status(), cpu_s(primary.proc.pid), time.time()
    finally:
        for p in (primary, standby, vmm):
            p.kill()
    epochs = max(1, s1["last_sealed"] - s0["last_sealed"])
    mb = (s1["bytes_sent"] - s0["bytes_sent"]) / 1e6
    return {
        "memory": memory, "tracking": tracking, "rate": rate, "epoch_ms": epoch_ms,
        # The pause: how long the VM was stopped, as the VMM's agent saw it (PAUSE's
        # arrival to the vCPUs' release), like QEMU's own run->stop->run trace for
        # COLO. The seal: the daemon's view, PAUSE sent to RESUME answered, which
        # adds the two requests' trips between the processes.
        "pause_p50_ms": round(s1["vm_pause_ns_p50"] / 1e6, 3),
        "pause_p99_ms": round(s1["vm_pause_ns_p99"] / 1e6, 3),
        "pause_max_ms": round(s1["vm_pause_ns_max"] / 1e6, 3),
        "seal_p50_ms": round(s1["pause_ns_p50"] / 1e6, 3),
        "seal_p99_ms": round(s1["pause_ns_p99"] / 1e6, 3),
        "seal_max_ms": round(s1["pause_ns_max"] / 1e6, 3),
        "epochs_per_s": round(epochs / (t1 - t0), 1),
        "pages_per_epoch": s1["pages_last_epoch"],
        "dirty_pages_per_s": round(s1["dirty_pages_per_s"]),
        "link_MBps": round(mb / (t1 - t0), 2),
        "compression_ratio": round(s1["compression_ratio"], 1),
        "daemon_cpu_ms_per_epoch": round((c1 - c0) * 1000 / epochs, 3),
    }


def full_sync(memory="1G", ws="900M", fill=0, compression=None):
    """The first (full) epoch of a guest whose working set was written first.

    seconds: the primary's own measure, from the full epoch's EPOCH_BEGIN to the
    standby's ACK of it (every non-zero page copied, sent, CRC-checked, staged and
    committed). seconds_from_connect: from before the primary's connection to the
    standby (the last status poll that still saw it attaching to the VMM, or its
    launch if no poll did) to the first poll that saw the ACK: the same span as
    QEMU's total-time (connect, setup, copy), taken so that it can only be longer
    than the true one. wall_seconds adds the standby's start-up too."""
    for attempt in range(3):
        r = _full_sync_once(memory, ws, fill, compression)
        if r:
            return r
    raise SystemExit("full sync: the link was re-established during every attempt (see the daemons' logs)")


def _full_sync_once(memory, ws, fill, compression):
    """One attempt; None when the first (full) sync was followed by a resync before it could be read."""
    with tempfile.TemporaryDirectory(prefix="dr-bench-") as tmp:
        vmm = BVmm(tmp, memory, "ring", f"ws={ws} pattern=seq rate=0 report_ms=200 fill={fill} passes=1")
        wait_console(vmm.console, r"idle after pass=1")  # every page of the working set written once, then idle
        t0 = time.time()
        port = repl.free_port()
        standby = repl.Daemon(tmp, "standby", {"t": {"Role": "standby", "Listen": f"127.0.0.1:{port}"}})
        keys = {"Role": "primary", "ControlSocket": vmm.control, "Peer": f"127.0.0.1:{port}", "EpochMs": "20",
                "Tracking": "ring"}
        if compression:
            keys["Compression"] = compression
        primary = None
        try:
            t_start, start_from = time.monotonic(), "daemon launch"
            primary = repl.Daemon(tmp, "primary", {"t": keys})
            end = t_start + 300
            while True:
                t = time.monotonic()
                st = primary.status()
                t_seen = time.monotonic()
                if st["state"] == "attaching":
                    # It answered after t and had not connected yet: the connect starts after t.
                    t_start, start_from = t, "attaching seen"
                elif st["last_committed"] >= 1 and st["last_sync_usec"] > 0:
                    break  # committed by the time the answer came back
                elif st["state"] == "failed" or t_seen > end:
                    raise SystemExit(f"full sync: {st}\n{primary.text()[-2000:]}")
                time.sleep(0.002)  # (a busy poll would take a CPU from the daemons; QEMU's is polled every 5 ms)
            t1 = time.time()
        finally:
            for p in (primary, standby, vmm):
                if p:
                    p.kill()
            logs = {"primary": primary.text() if primary else "", "standby": standby.text()}
    if not st["last_sync_full"] or st["full_syncs"] != 1:
        print(f"full sync attempt discarded: {st['full_syncs']} full and {st['incremental_syncs']} incremental "
              f"syncs (the link was re-established): {st['detail']}", file=sys.stderr, flush=True)
        for tag, text in logs.items():
            print(f"--- {tag}:\n" + "\n".join(text.splitlines()[-12:]), file=sys.stderr, flush=True)
        return None
    secs = st["last_sync_usec"] / 1e6
    from_connect = t_seen - t_start
    ram_mb = st["ram_bytes"] / 1e6
    return {"memory": memory, "written_working_set": ws, "fill": fill, "compression": compression or "default",
            "seconds": round(secs, 3), "guest_RAM_MBps": round(ram_mb / secs, 1),
            "seconds_from_connect": round(from_connect, 3),
            "guest_RAM_MBps_from_connect": round(ram_mb / from_connect, 1), "connect_start": start_from,
            "wall_seconds": round(t1 - t0, 3), "guest_RAM_MBps_wall": round(ram_mb / (t1 - t0), 1),
            "bytes_sent": st["bytes_sent"], "compression_ratio": round(st["compression_ratio"], 1)}


def progress(replicated, epoch_ms=20, window=6.0, memory="1G", ws="64M", tracking="ring"):
    """Guest-reported page writes/s of the unthrottled dirtier, with or without replication."""
    with tempfile.TemporaryDirectory(prefix="dr-bench-") as tmp:
        vmm = BVmm(tmp, memory, tracking, f"ws={ws} pattern=random rate=0 report_ms=500")
        procs = [vmm]
        try:
            wait_console(vmm.console, "ws_base=")
            if replicated:
                primary, standby = repl.pair(tmp, vmm, tracking, epoch_ms=epoch_ms)
                procs += [primary, standby]
                primary.wait(lambda s: s["state"] == "protected", "protected", timeout=300)
            time.sleep(1.0)
            mark = len(open(vmm.console, errors="replace").read())
            time.sleep(window)
            lines = open(vmm.console, errors="replace").read()[mark:]
        finally:
            for p in procs:
                p.kill()
    rates = [int(x) for x in re.findall(r"dirtier: cpu=\d+ pass=\d+ writes=\d+ rate=(\d+)", lines)]
    if not rates:
        raise SystemExit("no progress lines from the dirtier")
    return {"replicated": replicated, "epoch_ms": epoch_ms if replicated else None, "tracking": tracking,
            "guest_pages_per_s": round(sum(rates) / len(rates))}

# SPDX-License-Identifier: GPL-2.0-or-later
"""QEMU's live migration and COLO runs of bench/qemu-bench.py (and bench/report.py).
"""
import os
import re
import statistics
import tempfile
import time

import qemu


def guest(build):
    return os.path.join(build, "vmm/guests/dirtier.elf")


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round((len(xs) - 1) * q)))]


def migration(build, memory="1G", ws="900M", fill=1, ring=False):
    app = f"ws={ws} pattern=seq rate=0 report_ms=200 fill={fill} passes=1"
    accel = "kvm,dirty-ring-size=65536" if ring else "kvm"
    with tempfile.TemporaryDirectory(prefix="dr-qemu-") as tmp:
        port = qemu.free_port()
        src = qemu.Qemu(tmp, "src", guest(build), app, mem=memory, accel=accel)
        dst = None
        try:
            dst = qemu.Qemu(tmp, "dst", guest(build), app, mem=memory, accel=accel,
                            extra=["-incoming", f"tcp:127.0.0.1:{port}"])
            src.wait_console(r"idle after pass=1")
            src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
            t0 = time.time()
            src.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
            while True:
                st = src.qmp.cmd("query-migrate")
                if st.get("status") in ("completed", "failed", "cancelled"):
                    break
                time.sleep(0.005)
            wall = time.time() - t0
        finally:
            src.kill()
            if dst:
                dst.kill()
    if st.get("status") != "completed":
        raise RuntimeError(f"QEMU migration {st.get('status')}: {st}")
    ram = st["ram"]
    total_s = st["total-time"] / 1000.0
    mb = ram["total"] / 1e6
    return {"memory": memory, "written_working_set": ws, "fill": fill, "tracking": "ring" if ring else "bitmap",
            "total_s": round(total_s, 3), "downtime_ms": st.get("downtime"), "setup_ms": st.get("setup-time"),
            "guest_RAM_MBps": round(mb / total_s, 1), "wire_MBps": round(ram["transferred"] / 1e6 / total_s, 1),
            "transferred_bytes": ram["transferred"], "wall_s": round(wall, 3)}


TRACE_RE = re.compile(r"^\d+@(\d+\.\d+):colo_vm_state_change Change '(\w+)' => '(\w+)'")


def colo(build, rate=25000, delay_ms=20, window=8.0, memory="1G", ws="64M"):
    """COLO checkpoints at x-checkpoint-delay=delay_ms for `window` seconds."""
    app = f"ws={ws} pattern=random rate={rate} report_ms=500"
    tr = ["colo_vm_state_change"]
    with tempfile.TemporaryDirectory(prefix="dr-colo-") as tmp:
        port = qemu.free_port()
        pri = qemu.Qemu(tmp, "pri", guest(build), app, mem=memory, trace=tr, extra=["-msg", "timestamp=on"])
        sec = None
        try:
            sec = qemu.Qemu(tmp, "sec", guest(build), app, mem=memory,
                            extra=["-incoming", f"tcp:127.0.0.1:{port}"])
            pri.wait_console("ws_base=")
            for q in (pri, sec):
                q.qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-colo", "state": True}])
            pri.qmp.cmd("migrate-set-parameters", **{"x-checkpoint-delay": delay_ms, "max-bandwidth": 1 << 40})
            pri.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
            end = time.time() + 60
            while "colo_vm_state_change" not in open(pri.logpath, errors="replace").read():
                if time.time() > end:
                    raise RuntimeError("COLO never checkpointed")
                time.sleep(0.1)
            time.sleep(1.0)  # past the first (full) checkpoint
            mark = len(open(pri.logpath, errors="replace").read())
            c_mark = len(pri.console())
            time.sleep(window)
            log = open(pri.logpath, errors="replace").read()[mark:]
            cons = pri.console()[c_mark:]
            status = pri.qmp.cmd("query-colo-status")
        finally:
            pri.kill()
            if sec:
                sec.kill()
    pauses, stop_t = [], None
    for line in log.splitlines():
        m = TRACE_RE.match(line)
        if not m:
            continue
        t, old, new = float(m.group(1)), m.group(2), m.group(3)
        if old == "run" and new == "stop":
            stop_t = t
        elif old == "stop" and new == "run" and stop_t is not None:
            pauses.append((t - stop_t) * 1000)
            stop_t = None
    if len(pauses) < 3:
        raise RuntimeError(f"only {len(pauses)} COLO checkpoints in {window} s (status {status})")
    rates = [int(x) for x in re.findall(r"pass=\d+ writes=\d+ rate=(\d+)", cons)]
    return {"rate": rate, "checkpoint_delay_ms": delay_ms, "tracking": "bitmap", "checkpoints": len(pauses),
            "checkpoints_per_s": round(len(pauses) / window, 1),
            "pause_p50_ms": round(statistics.median(pauses), 3), "pause_p99_ms": round(pct(pauses, 0.99), 3),
            "pause_max_ms": round(max(pauses), 3),
            "guest_pages_per_s": round(statistics.mean(rates)) if rates else None, "colo_mode": status.get("mode")}

# SPDX-License-Identifier: GPL-2.0-or-later
"""The checkpoint image benchmark's runs (bench/image-bench.py, bench/report.py).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "lib"))
from drproc import terminate  # noqa: E402


def parse_size(s):
    units = {"M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1]]


def imager_lines(out):
    res = []
    for m in re.finditer(r"^imager: image=(\S+) (.*)$", out, re.M):
        res.append({k: (int(v) if v.isdigit() else v) for k, v in (kv.split("=") for kv in m.group(2).split())})
    return res


def wait_for(path, pattern, proc, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with open(path, errors="replace") as f:
                if re.search(pattern, f.read(), re.M):
                    return
        except FileNotFoundError:
            pass
        if proc.poll() is not None:
            sys.exit(f"VMM exited early ({proc.returncode})")
        time.sleep(0.05)
    sys.exit(f"timeout waiting for {pattern}")


def stop(proc):
    terminate(proc, 20)


def restore_time(build, image, tmp, tag):
    r, w = os.pipe()
    ctl = os.path.join(tmp, f"r-{tag}.sock")
    t0 = time.monotonic()
    p = subprocess.Popen([f"{build}/vmm/ref/dirtyrep-vmm", "--restore-image", image, "--control", ctl,
                          "--console", os.path.join(tmp, f"r-{tag}.log"), "--ready-fd", str(w)],
                         pass_fds=(w,), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    os.close(w)
    data = os.read(r, 2)
    t1 = time.monotonic()
    os.close(r)
    stop(p)
    err = p.stderr.read()
    p.stderr.close()
    if data != b"1\n":
        sys.exit(f"restore from {image} failed: {err}")
    m = re.search(r"restored from image .* in (\d+) ms", err)
    return (t1 - t0) * 1000, int(m.group(1)) if m else None


def bench_size(build, size, base, interval_ms):
    tmp = tempfile.mkdtemp(prefix="dr-image-bench-", dir=base)
    try:
        low = min(size, 3 << 30)
        ws = min(size // 2, low - (64 << 20))
        ctl = os.path.join(tmp, "ctl.sock")
        console = os.path.join(tmp, "console.log")
        vmm = subprocess.Popen([f"{build}/vmm/ref/dirtyrep-vmm", "--kernel", f"{build}/vmm/guests/dirtier.elf",
                                "--memory", str(size), "--cpus", "1", "--control", ctl, "--console", console,
                                "--append", f"ws={ws >> 20}M pattern=hotcold hot=64M rate=0 report_ms=500"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(console, r"^dirtier: cpu=0 pass=[1-9]", vmm, timeout=300)
            out = {}
            for mode in ("raw", "lz4"):
                d = os.path.join(tmp, mode)
                os.mkdir(d)
                cmd = [f"{build}/tests/kvm/dr-imager", "run", "--control", ctl, "--name", "bench", "--dir", d,
                       "--images", "3", "--interval-ms", str(interval_ms)] + (["--compress"] if mode == "lz4" else [])
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
                if p.returncode != 0:
                    sys.exit(f"dr-imager failed: {p.stderr}")
                lines = imager_lines(p.stdout)
                full, incr = lines[0], lines[1:]
                mbps = lambda l: l["stored_bytes"] / (1 << 20) / max(l["write_ms"], 1) * 1000
                raw_mbps = lambda l: (l["present"] * 4096) / (1 << 20) / max(l["write_ms"], 1) * 1000
                out[mode] = {
                    "full_bytes": full["total_bytes"],
                    "full_present_pages": full["present"],
                    "write_mbps_full": round(mbps(full), 1),
                    "write_mbps_full_guest_data": round(raw_mbps(full), 1),
                    "pause_us_full": full["pause_us"],
                    "incr_bytes": [l["total_bytes"] for l in incr],
                    "write_mbps_incr": [round(mbps(l), 1) for l in incr],
                    "pause_us_incr": [l["pause_us"] for l in incr],
                }
        finally:
            stop(vmm)
        for mode in ("raw", "lz4"):
            wall_full, fill_full = restore_time(build, os.path.join(tmp, mode, "img0"), tmp, f"{mode}-full")
            wall_chain, fill_chain = restore_time(build, os.path.join(tmp, mode, "img2"), tmp, f"{mode}-chain")
            out[mode].update({"restore_ms_full": round(wall_full, 1), "ram_fill_ms_full": fill_full,
                              "restore_ms_chain3": round(wall_chain, 1), "ram_fill_ms_chain3": fill_chain})
        # Copy into a memfd (what the VMM does) vs. Firecracker-style MAP_PRIVATE of the raw runs.
        for img in ("img0", "img2"):
            p = subprocess.run([f"{build}/tests/kvm/dr-imager", "restore-bench", os.path.join(tmp, "raw", img)],
                               capture_output=True, text=True, timeout=600)
            if p.returncode != 0:
                sys.exit(f"restore-bench failed: {p.stderr}")
            out["raw"][f"copy_vs_map_{img}"] = json.loads(p.stdout)
        return {"guest_ram": f"{size >> 30}G", "working_set_mb": ws >> 20, "hot_mb": 64, **out}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

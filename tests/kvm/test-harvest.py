#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Cross-process dirty harvesting, ring-full, wedge and save/restore tests.

Starts dirtyrep-vmm with a test guest, then plays the daemon's part with
dr-harvester (a second process that receives the fds over the control
socket). Exit 0 pass, 1 fail, 77 skip (no /dev/kvm).
"""
import argparse
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time

ENV = os.environ


def log(*a):
    print(*a, flush=True)


LIVE = []  # every Vmm this test started and has not stopped


def fail(msg):
    log("FAIL:", msg)
    for v in LIVE:
        v.kill()
    sys.exit(1)


class Vmm:
    """One dirtyrep-vmm process we started (and only we stop, by PID)."""

    def __init__(self, tmp, tag, args):
        self.console = os.path.join(tmp, f"console-{tag}.log")
        self.errlog = os.path.join(tmp, f"vmm-{tag}.err")
        self.control = os.path.join(tmp, f"ctl-{tag}.sock")
        cmd = [ENV["DR_VMM"], "--name", f"t-{tag}", "--control", self.control,
               "--console", self.console] + args
        log("+", " ".join(cmd))
        self.err = open(self.errlog, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.err)
        LIVE.append(self)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def text(self):
        try:
            with open(self.console, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stderr(self):
        with open(self.errlog, errors="replace") as f:
            return f.read()

    def wait_for(self, pattern, timeout=30.0, count=1, after=0):
        """Waits until `pattern` matched `count` times in the console past offset `after`."""
        rx = re.compile(pattern, re.M)
        end = time.time() + timeout
        while time.time() < end:
            ms = list(rx.finditer(self.text(), after))
            if len(ms) >= count:
                return ms
            if self.proc.poll() is not None:
                fail(f"VMM exited with {self.proc.returncode} while waiting for /{pattern}/:\n"
                     f"{self.stderr()[-2000:]}\nconsole:\n{self.text()[-2000:]}")
            time.sleep(0.05)
        fail(f"timed out waiting for /{pattern}/ x{count}; console:\n{self.text()[-2000:]}\n"
             f"stderr:\n{self.stderr()[-2000:]}")

    def wait_socket(self, timeout=20.0):
        end = time.time() + timeout
        while time.time() < end:
            if os.path.exists(self.control):
                return
            if self.proc.poll() is not None:
                fail(f"VMM exited early: {self.stderr()[-2000:]}")
            time.sleep(0.05)
        fail("control socket never appeared")

    def stop(self, sig=signal.SIGTERM, timeout=15.0):
        if self in LIVE:
            LIVE.remove(self)
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                fail(f"VMM did not stop on signal {sig} within {timeout}s")
        self.err.close()
        return self.proc.returncode

    def cpu_seconds(self):
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def harvester(*args, timeout=120):
    cmd = [ENV["DR_HARVESTER"]] + list(args)
    log("+", " ".join(cmd))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    sys.stdout.write(p.stdout)
    sys.stdout.write(p.stderr)
    return p


def dirtier_ws(vmm, cpus):
    ms = vmm.wait_for(r"^dirtier: cpu=(\d+) ws_base=(0x[0-9a-f]+) ws_pages=(\d+)", count=cpus)
    return [f"{m.group(2)}:{m.group(3)}" for m in ms]


def dirtier_max_seq(ram, ws, cpu):
    """Highest write sequence number a vCPU stamped into its working set in a RAM image."""
    best = 0
    with open(ram, "rb") as f:
        for w in ws:
            base, pages = w.split(":")
            for k in range(int(pages)):
                f.seek(int(base, 16) + k * 4096)
                magic, c, seq = struct.unpack("<IIQ", f.read(16))
                if magic == 0x54524944 and c == cpu:
                    best = max(best, seq)
    if best == 0:
        fail("the saved RAM holds no dirtier stamps")
    return best


def test_harvest(tmp, mode, cpus):
    vmm = Vmm(tmp, "h", ["--kernel", ENV["DR_GUEST_DIRTIER"], "--cpus", str(cpus), "--memory", "256M",
                         "--tracking", mode, "--append", "ws=16M pattern=random rate=0 report_ms=500"])
    ws = dirtier_ws(vmm, cpus)
    vmm.wait_socket()
    args = ["check", "--control", vmm.control, "--rounds", "12", "--interval-ms", "150"]
    for w in ws:
        args += ["--ws", w]
    p = harvester(*args)
    if p.returncode != 0:
        fail(f"harvester check failed ({p.returncode}) in {mode} mode with {cpus} vCPU(s)")
    m = re.search(r"written=(\d+) reported=(\d+)", p.stdout)
    if not m or int(m.group(1)) < 100:
        fail("too few pages written for the check to mean anything")
    # A second client attaches to the same VM: the agent reset the rings when the
    # first left, so the new one must find where each ring continues.
    p2 = harvester(*(args[:4] + ["5"] + args[5:]))
    if p2.returncode != 0:
        fail(f"second harvester session failed ({p2.returncode}) in {mode} mode")
    # The guest keeps running after the harvester detached (tracking off, VM resumed).
    before = vmm.text()
    vmm.wait_for(r"^dirtier: cpu=0 pass=\d+ writes=\d+", after=len(before))
    for cpu in range(cpus):
        vmm.wait_for(rf"^dirtier: cpu={cpu} pass=\d+ writes=\d+", after=len(before))
    rc = vmm.stop()
    if rc != 0:
        fail(f"VMM exited {rc} on SIGTERM")
    log(f"PASS: {mode} mode, {cpus} vCPU(s): {m.group(0)}")


def test_ring_full(tmp):
    vmm = Vmm(tmp, "rf", ["--kernel", ENV["DR_GUEST_DIRTIER"], "--cpus", "1", "--memory", "256M",
                          "--tracking", "ring", "--ring-entries", "256",
                          "--append", "ws=32M pattern=seq rate=0 report_ms=500"])
    ws = dirtier_ws(vmm, 1)
    vmm.wait_socket()
    args = ["check", "--control", vmm.control, "--rounds", "8", "--interval-ms", "250",
            "--ring-full-only", "--expect-ring-full"]
    for w in ws:
        args += ["--ws", w]
    p = harvester(*args)
    if p.returncode != 0:
        fail("ring-full check failed")
    before = vmm.text()
    vmm.wait_for(r"^dirtier: cpu=0 pass=\d+ writes=\d+", after=len(before))
    if vmm.stop() != 0:
        fail("VMM did not exit 0 on SIGTERM")
    log("PASS: 256-entry ring, vCPU stopped on ring-full, drained, no page lost")


def test_wedge(tmp):
    vmm = Vmm(tmp, "w", ["--kernel", ENV["DR_GUEST_DIRTIER"], "--cpus", "1", "--memory", "256M",
                         "--tracking", "ring", "--ring-entries", "4096",
                         "--append", "ws=4M pattern=seq rate=1000 report_ms=500 jam=16 jam_after_ms=2000"])
    vmm.wait_for(r"^dirtier: cpu=0 ws_base=")
    vmm.wait_socket()
    p = harvester("wedge", "--control", vmm.control, "--timeout-ms", "30000", timeout=60)
    if p.returncode != 0:
        fail("the jammed ring was not reported")
    if "bitmap" not in (p.stdout + vmm.stderr()):
        fail("the wedge error does not name bitmap tracking as the way out")
    # Not a spin: either the agent parked the wedged vCPU (no CPU, no guest
    # progress), or, when the harvester stopped first on an overflowed ring,
    # the agent switched logging off and the guest simply runs on (CPU spent,
    # with progress). CPU burnt without guest progress is the spin to catch.
    c0 = vmm.cpu_seconds()
    p0 = len(re.findall(r"^dirtier: cpu=0 pass=", vmm.text(), re.M))
    time.sleep(2.0)
    used = vmm.cpu_seconds() - c0
    progressed = len(re.findall(r"^dirtier: cpu=0 pass=", vmm.text(), re.M)) - p0
    log(f"VMM CPU over 2 s after the wedge: {used:.2f} s, guest progress lines: {progressed}")
    if used > 0.5 and progressed == 0:
        fail(f"VMM spins after the wedge ({used:.2f} CPU-s in 2 s with no guest progress)")
    if vmm.proc.poll() is not None:
        fail("VMM died after the wedge instead of reporting it")
    vmm.stop()
    log("PASS: wedge reported as an error, no spin")


def test_restore(tmp, guest):
    kernel = ENV["DR_GUEST_DIRTIER"] if guest == "dirtier" else ENV["DR_GUEST_MEMTOUCH"]
    append = "ws=8M rate=20000 report_ms=300" if guest == "dirtier" else "ws=8M report_ms=300"
    vmm = Vmm(tmp, "s", ["--kernel", kernel, "--cpus", "2", "--memory", "128M", "--append", append])
    # Whole lines only: the console is written a byte at a time, and a number still being
    # written ("writes=1243" of 12435) once read as progress going backwards.
    line = r"^dirtier: cpu=0 pass=\d+ writes=(\d+) rate=" if guest == "dirtier" else r"^memtouch: cpu=0 gen=(\d+)\n"
    vmm.wait_for(line, count=3, timeout=60)
    vmm.wait_socket()
    state = os.path.join(tmp, "state.pb")
    ram = os.path.join(tmp, "ram.img")
    ws = dirtier_ws(vmm, 2) if guest == "dirtier" else None
    p = harvester("snapshot", "--control", vmm.control, "--state", state, "--ram", ram)
    if p.returncode != 0:
        fail("snapshot failed")
    # The agent resumes the VM when the snapshot client disconnects, so the
    # console runs past the snapshot: take the saved point from the RAM image.
    vmm.stop(signal.SIGKILL)
    if guest == "dirtier":
        saved = dirtier_max_seq(ram, ws, cpu=0)
    else:
        c = subprocess.run([ENV["DR_MEMCHECK"], ram], capture_output=True, text=True)
        log(c.stdout.strip(), c.stderr.strip())
        if c.returncode != 0:
            fail("memtouch checker failed on the saved RAM")
        saved = int(re.search(r"gens=(\d+)", c.stdout).group(1))

    r = Vmm(tmp, "r", ["--restore", state, "--ram", ram])
    ms = r.wait_for(line, count=2, timeout=60)
    first = int(ms[0].group(1))
    later = int(ms[-1].group(1))
    log(f"saved {guest} counter {saved}; after restore {first} then {later}")
    if "ws_base=" in r.text() or "memtouch: cpu=0 start" in r.text():
        fail("the restored guest booted again instead of continuing")
    if first < saved or later <= first:
        fail(f"progress did not continue from the saved point ({saved} -> {first} -> {later})")
    if guest == "dirtier":
        r.wait_for(r"^dirtier: cpu=1 pass=\d+ writes=\d+")
    if r.stop() != 0:
        fail("restored VMM did not exit 0 on SIGTERM")
    log(f"PASS: {guest} continued after restore in a new process")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode")
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--ring-full", action="store_true")
    ap.add_argument("--wedge", action="store_true")
    ap.add_argument("--restore-guest")
    a = ap.parse_args()
    if not os.path.exists("/dev/kvm"):
        print("SKIP: /dev/kvm missing")
        sys.exit(77)
    for k in ("DR_VMM", "DR_HARVESTER", "DR_GUEST_DIRTIER"):
        if k not in ENV:
            fail(f"{k} not set: the VMM or guests were not built")
    with tempfile.TemporaryDirectory(prefix="dr-kvm-") as tmp:
      try:
        if a.ring_full:
            test_ring_full(tmp)
        elif a.wedge:
            test_wedge(tmp)
        elif a.restore_guest:
            test_restore(tmp, a.restore_guest)
        else:
            test_harvest(tmp, a.mode, a.cpus)
      finally:
        for v in list(LIVE):
            v.kill()


if __name__ == "__main__":
    main()

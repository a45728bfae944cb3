# SPDX-License-Identifier: GPL-2.0-or-later
"""A primary and a standby dirtyrepd on loopback with the reference VMM (the
tests test-replication.py, test-security.py, test-qemu.py, test-control.py,
test-operator.py and the replication benchmarks).

A failure here (fail()) is final: it logs FAIL, dumps the last lines of
every process's log, kills them all and exits 1.
"""
import os
import re
import subprocess
import sys
import tempfile
import time

import drproc
from drproc import ENV, LIVE, SLOW, DebugSocket, build_env, free_port, log  # noqa: F401 (re-exported)


def fail(msg):
    log("FAIL:", msg)
    for p in LIVE:
        if hasattr(p, "dump"):
            p.dump()
    for p in list(LIVE):
        p.kill()
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def in_tmp(prefix, test, *args, world=False):
    """Runs test(tmp, *args) in a new temporary directory (world: readable by any uid) and kills
    every process left, however it ends; returns 0 (a failure exits in fail())."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        if world:
            os.chmod(tmp, 0o755)
        try:
            test(tmp, *args)
        finally:
            for p in list(LIVE):
                p.kill()
    return 0


def stop_clean(*procs):
    """SIGTERM to each in turn: each must exit 0 (a sanitized build checks for leaks at exit)."""
    for p in procs:
        rc = p.stop()
        if rc != 0:
            fail(f"{p.tag} exited {rc} on SIGTERM")


class Proc(drproc.Proc):
    """A process this test started; only we stop it, by PID."""

    fail = staticmethod(fail)


class Bus(Proc, drproc.Bus):
    pass


class Vmm(Proc):
    """dirtyrep-vmm running the guest DR_GUEST_<GUEST>, controlled on TMP/vmm.sock, COM1 in
    TMP/console.log (cpus, tracking None: the VMM's default)."""

    def __init__(self, tmp, guest, tracking, cpus, append, extra=(), memory="256M"):
        self.control = os.path.join(tmp, "vmm.sock")
        self.console = os.path.join(tmp, "console.log")
        kernel = ENV["DR_GUEST_" + guest.upper()]
        super().__init__(tmp, "vmm", [ENV["DR_VMM"], "--name", "t", "--kernel", kernel,
                                      *(["--cpus", str(cpus)] if cpus else []), "--memory", memory,
                                      *(["--tracking", tracking] if tracking else []), "--control", self.control,
                                      "--console", self.console, "--append", append, *extra])

    def service_port(self, timeout=30):
        end = time.time() + timeout
        while time.time() < end:
            m = re.search(r"service port listening on [^\s]*:(\d+)", self.text())
            if m:
                return int(m.group(1))
            if self.proc.poll() is not None:
                fail(f"{self.tag} exited with {self.proc.returncode} before its service port listened")
            time.sleep(0.05)
        fail(f"{self.tag}: no 'service port listening' line within {timeout}s")


class Daemon(Proc, DebugSocket):
    """dirtyrepd with TMP/TAG/dirtyrep.conf and vms: VM name -> its keys (a file in vm.d, with
    its own secret file); heartbeat: (interval ms, misses)."""

    connect_s = 5.0
    poll_s = 0.05
    wait_s = 60

    def __init__(self, tmp, tag, vms, secret=b"s3cret-shared-between-the-two-hosts\n", heartbeat=None):
        d = os.path.join(tmp, tag)
        os.makedirs(os.path.join(d, "vm.d"), exist_ok=True)
        self.dir = d
        self.debug = os.path.join(d, "debug.sock")
        interval, misses = heartbeat or (50, round(4 * SLOW))
        drproc.write_daemon_conf(d, interval, misses)
        for name, keys in vms.items():
            sf = drproc.write_secret(os.path.join(d, name + ".secret"), secret)
            drproc.write_vm_conf(os.path.join(d, "vm.d", name + ".conf"), keys, sf)
        super().__init__(tmp, tag, drproc.dirtyrepd_cmd(d, self.debug))
        # (bench/repl-bench.py times the primary's start from here)
        drproc.wait_path(self, self.debug, "debug socket", poll=0.005, dump=False)


def pair(tmp, vmm, tracking, epoch_ms=20, peer_port=None, listen_port=None, secret_p=None, extra_standby=None,
         extra_primary=None, primary_keys=None, heartbeat=None):
    """A standby, then a primary of vmm's VM "t" (extra_*: more VMs; primary_keys: more keys of "t")."""
    listen_port = listen_port or free_port()
    peer_port = peer_port or listen_port
    sb_vms = {"t": {"Role": "standby", "Listen": f"127.0.0.1:{listen_port}"}}
    sb_vms.update(extra_standby or {})
    standby = Daemon(tmp, "standby", sb_vms, heartbeat=heartbeat)
    pr_vms = {"t": {"Role": "primary", "ControlSocket": vmm.control, "Peer": f"127.0.0.1:{peer_port}",
                    "EpochMs": str(epoch_ms), "Tracking": tracking}}
    pr_vms["t"].update(primary_keys or {})
    pr_vms.update(extra_primary or {})
    kw = {"secret": secret_p} if secret_p else {}
    kw["heartbeat"] = heartbeat
    primary = Daemon(tmp, "primary", pr_vms, **kw)
    return primary, standby


def compare_at_freeze(tmp, primary, standby, guest, k):
    e = primary.freeze()
    standby.wait(lambda s: s["last_committed"] >= e, f"standby to commit epoch {e}")
    ph, sh = os.path.join(tmp, f"p{k}.crc"), os.path.join(tmp, f"s{k}.crc")
    primary.ok(f"hash t {ph}")
    se = standby.ok(f"hash t {sh}")
    if se != e:
        fail(f"standby hashed epoch {se}, expected the frozen {e}")
    a, b = open(ph, "rb").read(), open(sh, "rb").read()
    if len(a) != len(b) or len(a) == 0:
        fail(f"hash files differ in size: primary {len(a)}, standby {len(b)}")
    if a != b:
        bad = [i // 4 for i in range(0, len(a), 4) if a[i:i + 4] != b[i:i + 4]]
        fail(f"epoch {e}: replica differs from the primary's RAM in {len(bad)} page(s), first {bad[:10]}")
    msg = f"epoch {e}: all {len(a) // 4} pages identical"
    gens = None
    if guest == "memtouch":
        ram, state = os.path.join(tmp, f"r{k}.img"), os.path.join(tmp, f"r{k}.state")
        standby.ok(f"dump t {ram} {state}")
        c = subprocess.run([ENV["DR_MEMCHECK"], ram], capture_output=True, text=True)
        if c.returncode != 0:
            fail(f"memtouch checker failed on the replica at epoch {e}: {c.stdout} {c.stderr}")
        msg += "; " + c.stdout.strip()
        m = re.search(r"gens=([\d,]+)", c.stdout)
        if not m:
            fail(f"no gens= in the memtouch checker's output: {c.stdout!r}")
        gens = [int(g) for g in m.group(1).split(",")]
        os.unlink(ram)
    primary.ok("thaw t")
    log(msg)
    return e, a, gens

# SPDX-License-Identifier: GPL-2.0-or-later
"""dirtyrepd's control plane with real parts (test-control.py, test-operator.py,
test-security.py): private system-like dbus-daemons whose configuration
includes the project's real policy file, dirtyrepd on them with its VM from
the command line, the reference VMM running the dirtier guest, dirtyrepctl
and busctl. Failures are final, as in loopback.py.
"""
import json
import os
import subprocess
import time

import drproc
import loopback
from loopback import ENV, LIVE, DebugSocket, Proc, check, fail, free_port, in_tmp, log  # noqa: F401 (re-exported)

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
SECRET = b"control-plane-test-secret-0123456789\n"


class Popened:
    """A bare subprocess.Popen in LIVE: killed (by PID) by the cleanup."""

    def __init__(self, popen):
        self.p = popen

    def kill(self):
        if self in LIVE:
            LIVE.remove(self)
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


class Bus(loopback.Bus):
    """A "host's" system bus: the distribution's defaults, its Introspectable and Properties
    interfaces callable, the socket reachable for uid 65534 (the unprivileged-caller checks)."""

    def __init__(self, tmp, tag, permissive=False):
        super().__init__(tmp, tag, permissive=permissive, introspect=True, world=True)


def Vmm(tmp):
    """The dirtier guest, one vCPU, 128 MiB (the VMM's default tracking)."""
    return loopback.Vmm(tmp, "dirtier", None, 1, "ws=4M rate=5000 report_ms=1000", memory="128M")


class Daemon(Proc, DebugSocket):
    """dirtyrepd with its own config dir; the VM comes from the command line (--vm t ...)."""

    connect_s = 20
    poll_s = 0.05
    wait_s = 60
    connect_fails = True

    def __init__(self, tmp, tag, vm_args, bus=None, env=None, extra=()):
        d = os.path.join(tmp, tag)
        os.makedirs(os.path.join(d, "vm.d"), exist_ok=True)
        self.dir = d
        self.debug = os.path.join(d, "debug.sock")
        self.secret = drproc.write_secret(os.path.join(d, "secret"), SECRET)
        drproc.write_daemon_conf(d)
        cmd = drproc.dirtyrepd_cmd(d, self.debug)
        cmd += ["--bus-address", bus.address] if bus else ["--bus=none"]
        cmd += ["--vm", "t"] + vm_args + ["--secret-file", self.secret] + list(extra)
        super().__init__(tmp, tag, cmd, env=env)


def pair(tmp, env_primary=None, epoch_ms=20, primary_args=(), primary_extra=(), standby_extra=()):
    """A bus, a standby and a primary (of a fresh Vmm) per host: (bus_p, bus_s, vmm, primary, standby)."""
    bus_p, bus_s = Bus(tmp, "bus-primary"), Bus(tmp, "bus-standby")
    vmm = Vmm(tmp)
    port = free_port()
    standby = Daemon(tmp, "standby", ["--role", "standby", "--listen", f"127.0.0.1:{port}"], bus=bus_s,
                     extra=standby_extra)
    primary = Daemon(tmp, "primary", ["--role", "primary", "--control-socket", vmm.control, "--peer",
                                      f"127.0.0.1:{port}", "--epoch-ms", str(epoch_ms), *primary_args],
                     bus=bus_p, env=env_primary, extra=primary_extra)
    return bus_p, bus_s, vmm, primary, standby


def ctl(bus, *args, user=None, env_addr=False):
    """Runs dirtyrepctl; returns (exit code, stdout, stderr)."""
    cmd = [ENV["DR_DIRTYREPCTL"]]
    env = dict(ENV)
    if env_addr:
        env["DIRTYREP_BUS_ADDRESS"] = bus.address
    else:
        cmd += ["--bus-address", bus.address]
    cmd += list(args)
    if user == "nobody":
        cmd = NOBODY + cmd
    c = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=90)
    return c.returncode, c.stdout, c.stderr


def ctl_ok(bus, *args, **kw):
    rc, out, err = ctl(bus, *args, **kw)
    check(rc == 0, f"dirtyrepctl {' '.join(args)} exited {rc}: {out} {err}")
    return out


def ctl_fails(bus, want_rc, want_msg, *args, **kw):
    rc, out, err = ctl(bus, *args, **kw)
    check(rc == want_rc, f"dirtyrepctl {' '.join(args)}: exit {rc}, expected {want_rc}: {out} {err}")
    check(want_msg in err, f"dirtyrepctl {' '.join(args)}: {want_msg!r} not in stderr {err!r}")
    log(f"  dirtyrepctl {' '.join(args)} -> exit {rc}: {err.strip()}")
    return err


def busctl(bus, *args, user=None):
    cmd = ["busctl", "--address=" + bus.address] + list(args)
    if user == "nobody":
        cmd = NOBODY + cmd
    c = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return c.returncode, c.stdout, c.stderr


def busctl_ok(bus, *args, **kw):
    rc, out, err = busctl(bus, *args, **kw)
    check(rc == 0, f"busctl {' '.join(args)} exited {rc}: {out} {err}")
    return out


def status(bus, vm="t"):
    # status exits 0 only for a protected VM; 10/11/12 are unprotected/suspended/failed (dirtyrepctl(1)).
    rc, out, err = ctl(bus, "status", vm, "--json")
    check(rc in (0, 10, 11, 12), f"dirtyrepctl status {vm} --json exited {rc}: {out} {err}")
    l = json.loads(out)
    check(len(l) == 1 and l[0]["VM"] == vm, f"status --json for {vm}: {out}")
    return l[0]


def wait_for(bus, pred, what, vm="t", timeout=60):
    end = time.time() + timeout
    st = None
    while time.time() < end:
        st = status(bus, vm)
        if pred(st):
            return st
        time.sleep(0.1)
    fail(f"timed out waiting for {what}; last status {st}")

# SPDX-License-Identifier: GPL-2.0-or-later
"""QEMU with the dirtyrep-agent device (scripts/build-qemu, vmm/qemu/) running the
test guests: the command lines, the process, and the kv guest behind its serial
service line for the namespace scenarios of drtest.py (tests/integration/test-qemu.py
and the benchmarks bench/qemuagentbench.py, bench/failover-bench.py --qemu and
bench/redis-bench.py --qemu).

The patched QEMU is $DR_QEMU, or what scripts/build-qemu prints (instant when
cached). A failure here is loopback.fail(): final, it exits 1.
"""
import os
import re
import subprocess
import sys
import time

import loopback as tr

log, fail, Proc, ENV = tr.log, tr.fail, tr.Proc, tr.ENV

HERE = os.path.dirname(os.path.abspath(__file__))
RAM = "256M"


def find_qemu():
    if ENV.get("DR_QEMU"):
        return ENV["DR_QEMU"]
    build = ENV.get("DR_BUILDDIR")
    script = os.path.join(ENV.get("DR_SRCDIR", os.path.join(HERE, "..", "..")), "scripts", "build-qemu")
    r = subprocess.run([script] + ([build] if build else []), capture_output=True, text=True, timeout=3000)
    if r.returncode != 0:
        fail(f"scripts/build-qemu failed ({r.returncode}): {r.stderr[-2000:]}")
    return r.stdout.strip().splitlines()[-1]


def qemu_args(qemu, guest, append, cpus=1, control=None, console=None, memory=None, agent_extra="",
              accel="kvm,dirty-ring-size=4096", machine="pc,memory-backend=m0,smm=off", extra=(), ram=RAM):
    """A test guest (DR_GUEST_<GUEST>) on ram of memfd (memory: another backend, id m0), COM1 to
    the file console, the agent on the control socket control (None: no agent)."""
    kernel = ENV["DR_GUEST_" + guest.upper()]
    memory = memory or f"memory-backend-memfd,id=m0,size={ram},share=on"
    a = [qemu, "-name", "t", "-machine", machine, "-accel", accel, "-smp", str(cpus), "-m", ram,
         "-object", memory, "-L", "/usr/share/seabios", "-L", "/usr/share/qemu",
         "-kernel", kernel, "-append", append, "-display", "none", "-nodefaults", "-no-user-config",
         "-serial", "file:" + console, "-device", "isa-debug-exit,iobase=0x501,iosize=1", "-no-reboot"]
    if control:
        a += ["-device", f"dirtyrep-agent,path={control},name=t" + agent_extra]
    return a + list(extra)


class Qemu(Proc):
    """QEMU with the agent on TMP/TAG.sock (self.control, as loopback.pair() wants it), COM1 in
    TMP/TAG.com1."""

    runs = 0

    def __init__(self, tmp, qemu, guest, append, cpus=1, tag=None, **kw):
        Qemu.runs += 1
        tag = tag or f"qemu{Qemu.runs}"
        self.control = os.path.join(tmp, tag + ".sock")
        self.console = os.path.join(tmp, tag + ".com1")
        super().__init__(tmp, tag, qemu_args(qemu, guest, append, cpus, self.control, self.console, **kw))

    def lines(self):
        try:
            with open(self.console, errors="replace") as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def dump(self):
        super().dump()
        log(f"--- {self.tag} COM1 ---\n" + "\n".join(self.lines()[-15:]))

    def wait_line(self, regex, timeout=60, after=0):
        end = time.time() + timeout
        while time.time() < end:
            found = [m for m in (re.search(regex, l) for l in self.lines()[after:]) if m]
            if found:
                return found[-1]
            if self.proc.poll() is not None:
                fail(f"{self.tag} exited with {self.proc.returncode} before COM1 showed {regex!r}")
            time.sleep(0.05)
        fail(f"{self.tag}: timed out waiting for {regex!r} on COM1")

    def wait_socket(self, timeout=60):
        end = time.time() + timeout
        while not os.path.exists(self.control):
            if self.proc.poll() is not None:
                fail(f"{self.tag} exited with {self.proc.returncode} before creating {self.control}")
            if time.time() > end:
                fail(f"{self.tag}: no control socket after {timeout}s")
            time.sleep(0.05)


# ---- the kv guest in drtest.py's network namespaces ---------------------------------------

def qemu_kv_args(qemu, hostdir, control=None):
    """The kv guest under QEMU, RESP on COM2 (TCP 6379) through the agent's output
    commit. control=None: the failover template of VmmType=qemu (placeholders)."""
    promoted = control is None
    mem = ("memory-backend-file,id=m0,size=64M,mem-path=%r,share=on" if promoted
           else "memory-backend-memfd,id=m0,size=64M,share=on")
    agent = "path=%c,name=%n,restore=%s,ready-fd=%f" if promoted else f"path={control},name=t"
    console = os.path.join(hostdir, "console-promoted.log" if promoted else "console.log")
    return ((["-S"] if promoted else []) +
            ["-name", "t", "-machine", "pc,memory-backend=m0,smm=off", "-accel", "kvm,dirty-ring-size=4096",
             "-m", "64M", "-object", mem, "-L", "/usr/share/seabios", "-L", "/usr/share/qemu",
             "-kernel", ENV["DR_GUEST_KV"], "-display", "none", "-nodefaults", "-no-user-config",
             "-serial", "file:" + console, "-chardev", "socket,id=svc,host=0.0.0.0,port=6379,server=on,wait=off",
             "-device", "isa-serial,chardev=svc", "-device", "isa-debug-exit,iobase=0x501,iosize=1", "-no-reboot",
             "-device", "dirtyrep-agent,chardev=svc," + agent])


def kv_starter(qemu):
    """A replacement for drtest.start_kv(tmp, host): the kv guest under QEMU on that host
    (its control socket HOST/vm.sock, COM1 in HOST/console.log, as drtest's)."""
    import drtest as dt

    def start_qemu_kv(tmp_, host):
        h = os.path.join(tmp_, host)
        os.makedirs(h, exist_ok=True)
        return dt.Proc(tmp_, f"vmm-{host}", dt.ns_exec(host, qemu, *qemu_kv_args(qemu, h, os.path.join(h, "vm.sock"))))

    return start_qemu_kv


def failover_keys(qemu, tmp):
    """The VM keys that make both hosts' dirtyrepd start QEMU on the replica (VmmType=qemu);
    the template is the same for both."""
    return {"VmmType": "qemu", "Vmm": qemu, "VmmArgs": " ".join(qemu_kv_args(qemu, tmp))}


DRAIN = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(b"PING\\r\\n")
buf, end = b"", time.time() + 5
while not buf.endswith(b"+PONG\\r\\n") and time.time() < end:
    d = s.recv(4096)
    if not d:
        break
    buf += d
sys.stdout.write(repr(buf))
sys.exit(0 if buf.endswith(b"+PONG\\r\\n") else 1)
"""


def drain_service_line():
    """Under QEMU the kv guest's service port is a serial line without connection
    boundaries (the reference VMM multiplexes clients with a turnaround marker,
    docs/guest-abi.md). A command in flight when the primary died is in the replica's
    epoch, so the promoted guest answers it, and that stale reply would reach the next
    client, shifting every later reply by one. One PING read up to its PONG consumes it
    (docs/qemu.md, "Limits")."""
    import drtest as dt
    end = time.time() + 15 * dt.SLOW
    while time.time() < end:
        r = subprocess.run(dt.ns_exec("c", sys.executable, "-c", DRAIN, dt.SVC_IP, str(dt.KV_PORT)),
                           capture_output=True, text=True)
        if r.returncode == 0:
            if r.stdout != repr(b"+PONG\r\n"):
                log(f"service line drained: {r.stdout}")
            return
        time.sleep(0.1)
    fail("the promoted guest's service port never answered PING")

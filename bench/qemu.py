# SPDX-License-Identifier: GPL-2.0-or-later
"""QEMU, driven over QMP, as the peer dirtyrep is measured against (issue 7).

The guests are the same multiboot images dirtyrep-vmm runs (vmm/guests/*.elf,
ELF32 for QEMU's -kernel); COM1 goes to a file, like dirtyrep-vmm's console.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "lib"))
from drproc import free_port  # noqa: E402,F401 (the benchmarks' qemu.free_port)

QEMU = shutil.which("qemu-system-x86_64")


class QmpError(Exception):
    pass


class Qmp:
    def __init__(self, path, timeout=30):
        end = time.time() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.time() > end:
                    raise
                time.sleep(0.05)
        self.f = self.sock.makefile("rwb", buffering=0)
        self.events = []
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.f.readline()
        if not line:
            raise QmpError("QMP connection closed")
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write((json.dumps(msg) + "\n").encode())
        while True:
            r = self._read()
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise QmpError(f"{name}: {r['error'].get('desc', r['error'])}")
            return r.get("return")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class Qemu:
    """One qemu-system-x86_64 process with a QMP socket and COM1 in a file."""

    def __init__(self, tmp, name, kernel, append, mem="1G", accel="kvm", extra=(), trace=None):
        self.tmp, self.name = tmp, name
        self.qmp_path = os.path.join(tmp, f"{name}.qmp")
        self.com1 = os.path.join(tmp, f"{name}.com1")
        self.logpath = os.path.join(tmp, f"{name}.log")
        args = [QEMU, "-accel", accel, "-m", mem, "-smp", "1", "-display", "none", "-nodefaults",
                "-no-user-config", "-serial", "file:" + self.com1, "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                "-device", "isa-debug-exit,iobase=0x501,iosize=1", "-no-reboot"]
        if kernel:
            args += ["-kernel", kernel, "-append", append]
        if trace:
            for t in trace:
                args += ["-trace", t]
        args += list(extra)
        self.log = open(self.logpath, "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.qmp = Qmp(self.qmp_path)

    def console(self):
        try:
            return open(self.com1, errors="replace").read()
        except FileNotFoundError:
            return ""

    def wait_console(self, pattern, timeout=120):
        end = time.time() + timeout
        while time.time() < end:
            if re.search(pattern, self.console(), re.M):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: qemu exited ({self.proc.returncode}): {open(self.logpath).read()[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: timeout waiting for /{pattern}/ on COM1")

    def kill(self):
        self.qmp.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

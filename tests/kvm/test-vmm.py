#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""dirtyrep-vmm under real KVM: boots, the service port with real redis
clients, lifecycle (SIGTERM, debug exit, bad kernels, bad options) and a
guest whose RAM spans the 3-4 GiB hole.

Usage: test-vmm.py boot GUEST NCPUS | kv | lifecycle | badkernel | options | bigmem
Environment: DR_VMM, DR_GUEST_DIRTIER, DR_GUEST_MEMTOUCH, DR_GUEST_KV (meson's test_env).
Exit 77 only when /dev/kvm is missing.
"""

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

VMM = os.environ.get("DR_VMM")
GUESTS = {
    "dirtier": os.environ.get("DR_GUEST_DIRTIER"),
    "memtouch": os.environ.get("DR_GUEST_MEMTOUCH"),
    "kv": os.environ.get("DR_GUEST_KV"),
}
BOOT_TIMEOUT = 30.0


class Failure(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Failure(msg)


class Vmm:
    """One dirtyrep-vmm process with its console and stderr in files."""

    def __init__(self, tmp, args, name="vm", pass_fds=()):
        self.tmp = tmp
        self.console = os.path.join(tmp, name + ".console")
        self.errfile = os.path.join(tmp, name + ".stderr")
        self.args = [VMM, "--name", name, "--control", os.path.join(tmp, name + ".sock"),
                     "--console", self.console] + args
        with open(self.errfile, "wb") as err:
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err, pass_fds=pass_fds)
        self.rc = None

    def read(self, which):
        try:
            with open(which, "r", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def console_text(self):
        return self.read(self.console)

    def stderr_text(self):
        return self.read(self.errfile)

    def wait_for(self, pred, what, timeout=BOOT_TIMEOUT, source=None):
        """Polls pred(text) until it returns a true value; fails on timeout or VMM exit."""
        end = time.monotonic() + timeout
        while True:
            text = (source or self.console_text)()
            r = pred(text)
            if r:
                return r
            if self.proc.poll() is not None:
                raise Failure("VMM exited with %d while waiting for %s\n--- console:\n%s\n--- stderr:\n%s"
                              % (self.proc.returncode, what, text[-2000:], self.stderr_text()[-2000:]))
            if time.monotonic() > end:
                raise Failure("timed out after %.0fs waiting for %s\n--- console:\n%s\n--- stderr:\n%s"
                              % (timeout, what, text[-2000:], self.stderr_text()[-2000:]))
            time.sleep(0.1)

    def service_port(self):
        m = self.wait_for(lambda t: re.search(r"dirtyrep-vmm: service port listening on [^\s]*:(\d+)", t),
                          "the service port line", source=self.stderr_text)
        return int(m.group(1))

    def wait_exit(self, timeout):
        try:
            self.rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Failure("VMM did not exit within %.0fs\n--- stderr:\n%s" % (timeout, self.stderr_text()[-2000:]))
        return self.rc

    def terminate(self, timeout=10.0):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self):
        # Only our own child, by PID.
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def progress(text, guest, key):
    """{cpu: [values of key]} from lines like 'dirtier: cpu=0 ... writes=123'."""
    out = {}
    for m in re.finditer(r"^%s: cpu=(\d+) .*?\b%s=(\d+)" % (guest, key), text, re.M):
        out.setdefault(int(m.group(1)), []).append(int(m.group(2)))
    return out


def wait_dirtier_progress(vm, ncpus):
    def ok(text):
        p = progress(text, "dirtier", "writes")
        return all(len(p.get(c, [])) >= 2 for c in range(ncpus)) and p
    p = vm.wait_for(ok, "two dirtier progress lines per CPU")
    for c in range(ncpus):
        w = p[c]
        check(all(b > a for a, b in zip(w, w[1:])), "dirtier writes on cpu %d do not increase: %s" % (c, w))
    return p


def test_boot(tmp, guest, ncpus):
    ncpus = int(ncpus)
    args = ["--kernel", GUESTS[guest], "--cpus", str(ncpus)]
    if guest == "kv":
        args += ["--service-listen", "127.0.0.1:0"]
    vm = Vmm(tmp, args)
    try:
        vm.wait_for(lambda t: re.search(r"^%s: " % guest, t, re.M), "the first %s line" % guest)
        if guest == "dirtier":
            p = wait_dirtier_progress(vm, ncpus)
            print("dirtier progress:", {c: v[-1] for c, v in p.items()})
        elif guest == "memtouch":
            def ok(t):
                p = progress(t, "memtouch", "gen")
                return all(len(p.get(c, [])) >= 2 for c in range(ncpus)) and p
            p = vm.wait_for(ok, "two memtouch generations per CPU")
            for c in range(ncpus):
                check(p[c][-1] > p[c][0], "memtouch gen on cpu %d does not advance: %s" % (c, p[c]))
            print("memtouch generations:", {c: v[-1] for c, v in p.items()})
        else:
            vm.wait_for(lambda t: re.search(r"^kv: ready", t, re.M), "kv: ready")
            port = vm.service_port()
            check(redis(port, "PING") == "PONG", "kv guest does not answer PING")
        rc = vm.terminate()
        check(rc == 0, "SIGTERM gave exit status %d, expected 0" % rc)
    finally:
        vm.kill()


def redis(port, *args, timeout=20):
    r = subprocess.run(["redis-cli", "-p", str(port)] + list(args), capture_output=True, text=True,
                       timeout=timeout)
    check(r.returncode == 0, "redis-cli %s failed (%d): %s %s" % (args, r.returncode, r.stdout, r.stderr))
    return r.stdout.strip()


def test_kv(tmp):
    for tool in ("redis-cli", "redis-benchmark"):
        check(shutil.which(tool), "%s is not installed (apt-get install redis-tools)" % tool)
    vm = Vmm(tmp, ["--kernel", GUESTS["kv"], "--service-listen", "127.0.0.1:0"])
    try:
        port = vm.service_port()
        vm.wait_for(lambda t: re.search(r"^kv: ready", t, re.M), "kv: ready")

        check(redis(port, "SET", "k", "v") == "OK", "SET k v did not answer OK")
        check(redis(port, "GET", "k") == "v", "GET k did not return v")
        check(redis(port, "INCR", "n") == "1", "first INCR n did not return 1")
        check(redis(port, "INCR", "n") == "2", "second INCR n did not return 2")
        check(redis(port, "GET", "n") == "2", "GET n after two INCR did not return 2")

        # One client at a time: a second one is closed while the first stays usable.
        a = socket.create_connection(("127.0.0.1", port), timeout=10)
        time.sleep(0.3)
        b = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            data = b.recv(16)
        except ConnectionResetError:
            data = b""
        check(data == b"", "a second concurrent client was not refused (got %r)" % data)
        b.close()
        a.sendall(b"*1\r\n$4\r\nPING\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = a.recv(64)
            check(chunk, "first client lost its connection after a second one was refused")
            reply += chunk
        check(reply == b"+PONG\r\n", "first client got %r for PING" % reply)
        a.close()

        # The service port bridges one client at a time, so the benchmark runs one connection (-c 1).
        r = subprocess.run(["redis-benchmark", "-p", str(port), "-t", "set,get", "-n", "2000", "-q", "-c", "1"],
                           capture_output=True, text=True, timeout=240)
        out = r.stdout.replace("\r", "\n")
        print("\n".join(l for l in out.splitlines() if "requests per second" in l))
        check(r.returncode == 0, "redis-benchmark failed (%d): %s %s" % (r.returncode, out[-500:], r.stderr))
        check("Error" not in out and "Error" not in r.stderr, "redis-benchmark reported errors: %s %s"
              % (out[-500:], r.stderr))
        for t in ("SET", "GET"):
            check(re.search(r"^%s: [\d.]+ requests per second" % t, out, re.M),
                  "redis-benchmark has no %s result: %s" % (t, out[-500:]))
        check(redis(port, "GET", "k") == "v", "GET k after the benchmark did not return v")

        rc = vm.terminate()
        check(rc == 0, "SIGTERM gave exit status %d, expected 0" % rc)
    finally:
        vm.kill()


def test_lifecycle(tmp):
    # SIGTERM stops promptly with status 0; --ready-fd reports the start.
    rfd, wfd = os.pipe()
    vm = Vmm(tmp, ["--kernel", GUESTS["dirtier"], "--cpus", "2", "--ready-fd", str(wfd)], name="term",
             pass_fds=(wfd,))
    os.close(wfd)
    try:
        ready = os.read(rfd, 16)
        check(ready == b"1\n", "--ready-fd got %r, expected b'1\\n'" % ready)
        wait_dirtier_progress(vm, 2)
        t0 = time.monotonic()
        rc = vm.terminate(timeout=5)
        check(rc == 0, "SIGTERM gave exit status %d, expected 0" % rc)
        print("SIGTERM -> exit 0 in %.2fs" % (time.monotonic() - t0))
    finally:
        os.close(rfd)
        vm.kill()

    # The guest's debug-exit write (dirtier run_ms=: sys_exit(0) -> out 0x501, 0) gives (0 << 1) | 1.
    vm = Vmm(tmp, ["--kernel", GUESTS["dirtier"], "--append", "run_ms=1500 report_ms=500"], name="exit")
    try:
        rc = vm.wait_exit(BOOT_TIMEOUT)
        check(rc == 1, "debug exit with value 0 gave status %d, expected 1" % rc)
        check("dirtier: done" in vm.console_text(), "dirtier did not print its done line before exiting")
        check("debug-exit port" in vm.stderr_text(), "no debug-exit log line: %s" % vm.stderr_text())
        print("debug exit 0 -> status 1")
    finally:
        vm.kill()


def run_expect_error(tmp, args, phrase, name):
    vm = Vmm(tmp, args, name=name)
    try:
        rc = vm.wait_exit(15)
    finally:
        vm.kill()
    err = vm.stderr_text()
    check(rc != 0, "%s: exit status 0, expected an error" % name)
    check(phrase.lower() in err.lower(), "%s: stderr lacks %r:\n%s" % (name, phrase, err))
    print("%s: status %d: %s" % (name, rc, err.strip().splitlines()[-1]))


def test_badkernel(tmp):
    with open(GUESTS["dirtier"], "rb") as f:
        good = f.read()

    def write(name, data):
        p = os.path.join(tmp, name)
        with open(p, "wb") as f:
            f.write(data)
        return p

    # Truncated: headers intact, segment data cut off.
    run_expect_error(tmp, ["--kernel", write("truncated.elf", good[:5000])], "beyond the end of the file",
                     "truncated")
    run_expect_error(tmp, ["--kernel", write("tiny.elf", good[:40])], "multiboot", "tiny")
    # Wrong magic: every multiboot magic in the first 8 KiB destroyed.
    magic = struct.pack("<I", 0x1BADB002)
    bad = bytearray(good)
    i = bad.find(magic, 0, 8192)
    check(i >= 0, "no multiboot header in the guest image?")
    while i >= 0:
        bad[i:i + 4] = b"\0\0\0\0"
        i = bad.find(magic, 0, 8192)
    run_expect_error(tmp, ["--kernel", write("nomagic.elf", bytes(bad))], "no multiboot v1 header", "wrong-magic")
    # A PT_LOAD segment outside guest RAM: move the first one to 1 GiB in a 256 MiB guest.
    e_phoff, = struct.unpack_from("<I", good, 28)
    e_phentsize, e_phnum = struct.unpack_from("<HH", good, 42)
    bad = bytearray(good)
    for n in range(e_phnum):
        off = e_phoff + n * e_phentsize
        if struct.unpack_from("<I", bad, off)[0] == 1:  # PT_LOAD
            struct.pack_into("<I", bad, off + 12, 0x40000000)  # p_paddr
            break
    run_expect_error(tmp, ["--kernel", write("outside.elf", bytes(bad)), "--memory", "256M"],
                     "outside guest RAM", "segment-outside-ram")
    # An unwrapped ELF64 and a missing file.
    elf64 = GUESTS["dirtier"].replace(".elf", ".elf64")
    if os.path.exists(elf64):
        run_expect_error(tmp, ["--kernel", elf64], "ELF32", "elf64")
    run_expect_error(tmp, ["--kernel", os.path.join(tmp, "missing.elf")], "No such file", "missing")


def test_options(tmp):
    k = GUESTS["dirtier"]
    cases = [
        (["--kernel", k, "--cpus", "0"], "--cpus", "cpus-0"),
        (["--kernel", k, "--cpus", "129"], "--cpus", "cpus-129"),
        (["--kernel", k, "--memory", "1K"], "--memory", "memory-1k"),
        (["--kernel", k, "--memory", "lots"], "--memory", "memory-junk"),
        (["--kernel", k, "--ring-entries", "1000"], "--ring-entries", "ring-not-pow2"),
        (["--kernel", k, "--ring-entries", "128"], "--ring-entries", "ring-too-small"),
        (["--kernel", k, "--tracking", "magic"], "--tracking", "tracking-junk"),
        (["--kernel", k, "--uuid", "not-a-uuid"], "--uuid", "uuid-junk"),
        (["--kernel", k, "--service-listen", "nowhere"], "--service-listen", "listen-junk"),
        ([], "exactly one of --kernel and --restore", "no-kernel"),
        (["--restore", os.path.join(tmp, "state")], "--ram", "restore-no-ram"),
        (["--kernel", k, "--ram-fd", "1000"], "--ram-fd", "ram-fd-closed"),
    ]
    for args, phrase, name in cases:
        run_expect_error(tmp, args, phrase, name)
    r = subprocess.run([VMM, "--help"], capture_output=True, text=True, timeout=10)
    check(r.returncode == 0 and "--service-listen" in r.stdout, "--help failed")


def test_bigmem(tmp):
    # 4 GiB: 3 GiB in slot 0, 1 GiB at 4 GiB in slot 1; both trackings.
    for tracking in ("ring", "bitmap"):
        vm = Vmm(tmp, ["--kernel", GUESTS["dirtier"], "--memory", "4G", "--cpus", "2", "--tracking", tracking],
                 name="big-" + tracking)
        try:
            wait_dirtier_progress(vm, 2)
            check("4096 MiB" in vm.stderr_text(), "VMM did not report 4096 MiB: %s" % vm.stderr_text())
            rc = vm.terminate()
            check(rc == 0, "SIGTERM gave exit status %d" % rc)
            print("4G guest with %s tracking ran dirtier" % tracking)
        finally:
            vm.kill()
    # 16 GiB is sparse in the memfd: it must boot as quickly.
    vm = Vmm(tmp, ["--kernel", GUESTS["dirtier"], "--memory", "16G"], name="huge")
    try:
        wait_dirtier_progress(vm, 1)
        check(vm.terminate() == 0, "16G guest did not stop cleanly")
        print("16G guest ran dirtier")
    finally:
        vm.kill()


def main():
    if not os.path.exists("/dev/kvm"):
        print("/dev/kvm is missing: skipping")
        return 77
    check(VMM and os.path.exists(VMM), "DR_VMM is not set or missing")
    for g, p in GUESTS.items():
        check(p and os.path.exists(p), "DR_GUEST_%s is not set or missing" % g.upper())
    tests = {
        "boot": test_boot,
        "kv": test_kv,
        "lifecycle": test_lifecycle,
        "badkernel": test_badkernel,
        "options": test_options,
        "bigmem": test_bigmem,
    }
    if len(sys.argv) < 2 or sys.argv[1] not in tests:
        print(__doc__)
        return 2
    with tempfile.TemporaryDirectory(prefix="dr-vmm-test-", dir=os.environ.get("TMPDIR")) as tmp:
        try:
            tests[sys.argv[1]](tmp, *sys.argv[2:])
        except Failure as e:
            print("FAIL:", e)
            return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())

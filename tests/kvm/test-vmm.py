#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""dirtyrep-vmm under real KVM: boots, the service port with real redis
clients, lifecycle (SIGTERM, debug exit, bad kernels, bad options) and a
guest whose RAM spans the 3-4 GiB hole.

Usage: test-vmm.py boot GUEST NCPUS | kv | kv-serial | lifecycle | badkernel | options | bigmem
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
    # Whole lines only: the console is written byte by byte, and a number cut
    # short at the end of the file ("writes=73523" of "writes=7352339\n") is not a value.
    for m in re.finditer(r"^%s: cpu=(\d+) .*?\b%s=(\d+)\b[^\n]*\n" % (guest, key), text, re.M):
        out.setdefault(int(m.group(1)), []).append(int(m.group(2)))
    return out


def wait_dirtier_progress(vm, ncpus):
    def ok(text):
        p = progress(text, "dirtier", "writes")
        return all(len(p.get(c, [])) >= 2 for c in range(ncpus)) and p
    p = vm.wait_for(ok, "two dirtier progress lines per CPU")
    for c in range(ncpus):
        w = p[c]
        check(all(b > a for a, b in zip(w, w[1:])), "dirtier writes on cpu %d do not increase: %s\n--- console:\n%s"
              "\n--- stderr:\n%s" % (c, w, vm.console_text()[-3000:], vm.stderr_text()[-2000:]))
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


def resp(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a.encode() if isinstance(a, str) else a
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


def connect(port):
    return socket.create_connection(("127.0.0.1", port), timeout=20)


_pending = {}  # socket -> bytes received beyond the replies returned so far


def read_reply(sock):
    """One RESP reply (a line, or a bulk string); keeps what follows it for the next call."""
    buf = _pending.pop(sock, b"")
    while True:
        if b"\r\n" in buf:
            end = buf.index(b"\r\n") + 2
            if buf.startswith(b"$") and int(buf[1:end - 2]) >= 0:
                end += int(buf[1:end - 2]) + 2
            if len(buf) >= end:
                _pending[sock] = buf[end:]
                return buf[:end]
        try:
            chunk = sock.recv(4096)
        except socket.timeout:
            raise Failure("no reply within %.0fs (got %r)" % (sock.gettimeout(), buf))
        check(chunk, "connection closed while waiting for a reply (got %r)" % buf)
        buf += chunk


def recv_or_empty(sock):
    try:
        return sock.recv(16)
    except (ConnectionResetError, socket.timeout):
        return b""


def benchmark(port, args):
    cmd = ["redis-benchmark", "-p", str(port), "-n", "2000", "-q"] + args
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    out = r.stdout.replace("\r", "\n")
    print(" ".join(cmd[3:]) + ":")
    print("\n".join("  " + l.strip() for l in out.splitlines() if "requests per second" in l))
    check(r.returncode == 0, "redis-benchmark %s failed (%d): %s %s" % (args, r.returncode, out[-500:], r.stderr))
    check("Error" not in out and "Error" not in r.stderr, "redis-benchmark %s reported errors: %s %s"
          % (args, out[-500:], r.stderr))
    for t in args[args.index("-t") + 1].upper().split(","):
        check(re.search(r"^%s: [\d.]+ requests per second" % t, out, re.M),
              "redis-benchmark %s has no %s result: %s" % (args, t, out[-500:]))


def test_kv_serial(tmp):
    """A guest that never marks turnarounds (kv turnaround=0): one client at a time, the next waits."""
    vm = Vmm(tmp, ["--kernel", GUESTS["kv"], "--service-listen", "127.0.0.1:0", "--append", "turnaround=0"])
    try:
        port = vm.service_port()
        vm.wait_for(lambda t: re.search(r"^kv: ready .*turnaround=0", t, re.M), "kv: ready turnaround=0")
        a = connect(port)
        a.sendall(resp("PING"))
        check(read_reply(a) == b"+PONG\r\n", "first client: no PONG")
        b = connect(port)
        b.sendall(resp("ECHO", "b"))
        b.settimeout(1.0)
        check(recv_or_empty(b) == b"", "a second client was served while the first was still connected")
        a.sendall(resp("ECHO", "a"))
        check(read_reply(a) == b"$1\r\na\r\n", "first client stopped being served while a second waited")
        a.close()
        b.settimeout(10)
        rb = read_reply(b)
        check(rb == b"$1\r\nb\r\n", "the waiting client got %r once the first left" % rb)
        b.close()
        check(redis(port, "PING") == "PONG", "a later client is not served")
        print("without turnaround markers the port serves one client at a time; the next waits")
        check(vm.terminate() == 0, "SIGTERM did not stop the VMM cleanly")
    finally:
        vm.kill()


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

        # Two clients interleaved on one serial line: each gets its own, exact replies.
        a, b = connect(port), connect(port)
        for i in range(1, 11):
            a.sendall(resp("INCR", "ia"))
            b.sendall(resp("INCR", "ib"))
            ra, rb = read_reply(a), read_reply(b)
            check(ra == b":%d\r\n" % i and rb == b":%d\r\n" % i,
                  "interleaved INCR #%d: client a got %r, client b got %r" % (i, ra, rb))
        # Both send before either reads, with pipelined commands: still no mixing.
        a.sendall(resp("INCR", "ia") + resp("ECHO", "from-a"))
        b.sendall(resp("INCR", "ib") + resp("ECHO", "from-b"))
        ra = read_reply(a) + read_reply(a)
        rb = read_reply(b) + read_reply(b)
        check(ra == b":11\r\n$6\r\nfrom-a\r\n", "pipelined client a got %r" % ra)
        check(rb == b":11\r\n$6\r\nfrom-b\r\n", "pipelined client b got %r" % rb)
        check(not _pending.get(a) and not _pending.get(b), "extra bytes after the replies: a %r, b %r"
              % (_pending.get(a), _pending.get(b)))
        print("interleaved clients: 2 x 11 INCR with exact replies")

        # A client that leaves after a complete request, before its reply: the reply goes nowhere.
        c = connect(port)
        c.sendall(resp("INCR", "ia"))
        c.close()
        b.sendall(resp("INCR", "ib"))
        rb = read_reply(b)
        check(rb == b":12\r\n", "after a client left before its reply, client b got %r" % rb)
        # A client that leaves in the middle of a request: the guest drops the partial command.
        c = connect(port)
        c.sendall(b"*3\r\n$3\r\nSET\r\n$2\r\nia\r\n$5\r\nhal")
        time.sleep(0.3)
        c.close()
        a.sendall(resp("INCR", "ia"))
        ra = read_reply(a)
        check(ra == b":13\r\n", "after a client left mid-request, client a got %r (12 INCR + 1 orphaned)" % ra)
        vm.wait_for(lambda t: "kv: hangup mid-command" in t, "kv reporting the hangup")
        print("clients leaving mid-transaction do not disturb the others")
        a.close()
        b.close()

        # The connection limit: 64 clients; the 65th is refused with a log line.
        socks = [connect(port) for _ in range(64)]
        extra = connect(port)
        check(recv_or_empty(extra) == b"", "a 65th concurrent client was not refused")
        extra.close()
        vm.wait_for(lambda t: "refusing another" in t, "the refusal log line", source=vm.stderr_text)
        socks[-1].sendall(resp("PING"))
        check(read_reply(socks[-1]) == b"+PONG\r\n", "the 64th client is not served")
        for x in socks:
            x.close()

        # The product requirement: redis-benchmark with its default 50 connections.
        for args in (["-t", "set,get"], ["-c", "8", "-t", "set,get,incr"], ["-c", "1", "-t", "set,get"]):
            benchmark(port, args)
        check(redis(port, "GET", "counter:__rand_int__") == "2000",
              "2000 INCR from 8 connections did not count to 2000")
        check(redis(port, "GET", "k") == "v", "GET k after the benchmark did not return v")

        rc = vm.terminate()
        check(rc == 0, "SIGTERM gave exit status %d, expected 0" % rc)
    finally:
        vm.kill()


def pings(port, n):
    """Round-trip times (ms) of n PINGs on one connection."""
    sock = connect(port)
    times = []
    for _ in range(n):
        t0 = time.monotonic()
        sock.sendall(resp("PING"))
        check(read_reply(sock) == b"+PONG\r\n", "PING did not answer PONG")
        times.append((time.monotonic() - t0) * 1000)
    sock.close()
    return sorted(times)


def test_kv_held(tmp):
    """Output commit: while a daemon-like client runs epochs, COM2 output is held until its
    epoch is released, and released bytes still reach exactly the right clients."""
    harvester = os.environ.get("DR_HARVESTER")
    check(harvester and os.path.exists(harvester), "DR_HARVESTER is not set or missing")
    vm = Vmm(tmp, ["--kernel", GUESTS["kv"], "--service-listen", "127.0.0.1:0"], name="held")
    h = None
    try:
        port = vm.service_port()
        vm.wait_for(lambda t: re.search(r"^kv: ready", t, re.M), "kv: ready")
        free = pings(port, 30)
        interval = 40
        h = subprocess.Popen([harvester, "epochs", "--control", os.path.join(tmp, "held.sock"),
                              "--interval-ms", str(interval), "--seconds", "600"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        held = pings(port, 30)
        p50_free, p50_held = free[len(free) // 2], held[len(held) // 2]
        print("PING p50: %.2f ms with output flowing freely, %.2f ms with output held per %d ms epoch"
              % (p50_free, p50_held, interval))
        # A reply waits for the end of its epoch, on average half an interval.
        check(p50_held >= interval / 4 and p50_held > p50_free * 2,
              "output does not look held (p50 %.2f ms free, %.2f ms held)" % (p50_free, p50_held))
        benchmark(port, ["-c", "8", "-t", "set,get,incr"])
        check(redis(port, "GET", "counter:__rand_int__") == "2000",
              "2000 INCR from 8 connections with held output did not count to 2000")
        check(h.poll() is None, "the epoch client died: %s" % (h.stderr.read() if h.poll() is not None else ""))
        h.terminate()
        out, err = h.communicate(timeout=10)
        m = re.search(r"epochs=(\d+) released_bytes=(\d+)", out)
        h = None
        # SIGTERM: the harvester stops tracking (as a clean dirtyrepd stop does) and prints its summary.
        check(m is not None, "the epoch client printed no summary: %r %r" % (out[-500:], err[-500:]))
        print("epoch client: %s" % m.group(0))
        # Every reply of the held phase went through ReleaseOutput: the 30 PONGs (7 bytes each),
        # and per redis-benchmark request at least "+OK\r\n" (SET), 5 bytes (GET: "$-1\r\n" at the least) and
        # ":N\r\n" (INCR), 2000 each. Had output flowed past the agent, far less would be counted.
        least = 30 * len(b"+PONG\r\n") + 2000 * (5 + 5 + 4)
        check(int(m.group(2)) >= least, "released_bytes=%s, but the clients received at least %d bytes while "
              "output was held" % (m.group(2), least))
        check(int(m.group(1)) > 0, "the epoch client ran no epochs")
        # Detached after STOP_TRACKING: output flows freely (a client that vanishes leaves it held).
        check(redis(port, "PING") == "PONG", "no PONG after the epoch client left")
        check(vm.terminate() == 0, "SIGTERM did not stop the VMM cleanly")
    finally:
        if h:
            h.kill()
            h.wait()
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
        "kv-serial": test_kv_serial,
        "kv-held": test_kv_held,
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

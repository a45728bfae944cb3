#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Security claims of docs/security.md, end to end with real dirtyrepd daemons,
the reference VMM, real sockets and real KVM (scaffolding from
test-replication.py).

  test-security.py tls          replication in TLS 1.3 (mutual certificates, TLSPeerName=)
                                passes the consistency check; a sniffing proxy sees TLS
                                records and no replication frame in clear
  test-security.py tls-refused  a peer certificate from another CA, a wrong TLSPeerName=,
                                a plaintext primary at a TLS standby and a TLS primary at a
                                plaintext standby are all refused, with a log line that
                                says why on both sides; nothing is applied; missing and
                                world-readable key files fail the VM with a clear error,
                                the daemon keeps running
  test-security.py caps         the capability sets of a running root dirtyrepd
                                (/proc/PID/status) and what --keep-capabilities keeps
  test-security.py debug-socket the debug socket refuses another uid (mode 0600, and
                                SO_PEERCRED when the mode is opened up)
  test-security.py tamper-page|tamper-ack|tamper-replay|tamper-relay
                                an attacker on the path (drtest.TamperProxy) who knows the
                                frame format but not the secret rewrites a page record with a
                                valid CRC, forges an ACK, replays a frame, or relays the
                                handshake and then answers the primary itself: each detected
                                by the per-frame MAC with a log line that says so, the link
                                fails, the primary never holds an ACK for an epoch the standby
                                has not committed (sampled all along), and after the pair
                                reconnects the replica is identical to the primary's RAM
  test-security.py image-root   CheckpointImage over D-Bus (dirtyrepctl checkpoint --image) is
                                confined to ImageDirectory= (default StateDirectory=/images): a
                                path outside, a ".." out of it, a symbolic link out of it and a
                                parent outside are refused with an error naming the root;
                                nothing is created (no /dev/kvm needed: checked before the role)
  test-security.py preauth-flood
                                silent connections from 8 source addresses (127.0.0.2-9) that
                                reconnect when closed, while the real primary starts: it is
                                protected within 2 s and stays protected; the standby's
                                warning about them is rate-limited and names a source

Certificates are made at test time with `openssl req`/`openssl x509` in the
test's temporary directory (no key is committed). Exit 0 pass, 1 fail,
77 skip (no /dev/kvm, no openssl or setpriv).
"""
import argparse
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import control  # noqa: E402
import drtest  # noqa: E402
import loopback as repl  # noqa: E402
from pki import Pki, tls_keys  # noqa: E402

ENV = os.environ
log, fail, check = repl.log, repl.fail, repl.check
FRAME_MAGIC = struct.pack("<I", 0x46505244)
NOBODY = control.NOBODY


# ---- a proxy that keeps the first bytes of each direction -------------------------------------

class Sniffer(drtest.Proxy):
    KEEP = 65536

    def __init__(self, target):
        self.seen = {"up": b"", "down": b""}  # up: primary -> standby
        self.total = {"up": 0, "down": 0}
        super().__init__(target)

    def pump(self, src, dst, forward):
        d = "up" if forward else "down"
        try:
            while True:
                data = src.recv(262144)
                if not data:
                    break
                with self.lock:
                    if len(self.seen[d]) < self.KEEP:
                        self.seen[d] += data[:self.KEEP - len(self.seen[d])]
                    self.total[d] += len(data)
                dst.sendall(data)
        except OSError:
            pass
        drtest.close_both(src, dst)


# ---- scenarios ----------------------------------------------------------------------------------

def daemon(tmp, tag, keys):
    return repl.Daemon(tmp, tag, {"t": keys})


def stop_all(*procs):
    for p in procs:
        p.proc.send_signal(signal.SIGTERM)
        try:
            rc = p.proc.wait(15)
        except subprocess.TimeoutExpired:
            if shutil.which("gdb"):
                bt = subprocess.run(["gdb", "-p", str(p.proc.pid), "-batch", "-ex", "thread apply all bt"],
                                    capture_output=True, text=True).stdout
                log(f"--- {p.tag}: threads ---\n{bt[-6000:]}")
            fail(f"{p.tag} did not stop on SIGTERM within 15 s")
        if p in repl.LIVE:
            repl.LIVE.remove(p)
        if rc != 0 and not isinstance(p, repl.Vmm):
            fail(f"{p.tag} exited {rc} on SIGTERM")


def test_tls(tmp, a):
    pki = Pki(tmp)
    vmm = repl.Vmm(tmp, "dirtier", "ring", 1, "ws=32M pattern=random rate=25000 report_ms=500")
    sport = repl.free_port()
    sniff = Sniffer(sport)
    standby = daemon(tmp, "standby", {"Role": "standby", "Listen": f"127.0.0.1:{sport}",
                                      **tls_keys(pki, "standby.test", peer="primary.test")})
    primary = daemon(tmp, "primary", {"Role": "primary", "ControlSocket": vmm.control,
                                      "Peer": f"127.0.0.1:{sniff.port}", "EpochMs": "20", "Tracking": "ring",
                                      **tls_keys(pki, "primary.test", peer="standby.test")})
    st = primary.wait(lambda s: s["state"] == "protected", "the primary to be protected over TLS", timeout=90)
    log(f"protected over TLS; first full sync took {st['last_sync_usec'] / 1000:.0f} ms")
    rng = random.Random(a.seed)
    checks = sorted(rng.sample(range(20, a.epochs), 3))
    for k, target in enumerate(checks):
        primary.wait(lambda s: s["last_committed"] >= target, f"epoch {target}", timeout=a.epochs * 0.2 + 60)
        repl.compare_at_freeze(tmp, primary, standby, "dirtier", k)
    st = primary.wait(lambda s: s["last_committed"] >= a.epochs, f"{a.epochs} epochs", timeout=a.epochs * 0.2 + 60)
    with sniff.lock:
        up, down, total = sniff.seen["up"], sniff.seen["down"], dict(sniff.total)
    log(f"on the wire: {total['up']} bytes primary->standby, {total['down']} back")
    # TLS records: content type 22 (handshake) first, version 3.x; application data is 23.
    check(up[:2] == b"\x16\x03" and down[:2] == b"\x16\x03",
          f"the link does not start with a TLS handshake: {up[:8].hex()} / {down[:8].hex()}")
    check(total["up"] > 4 * 1024 * 1024, f"too little traffic through the sniffer: {total}")
    check(FRAME_MAGIC not in up and FRAME_MAGIC not in down,
          "a replication frame header is visible in clear on a TLS link")
    stop_all(primary, standby, vmm)
    log(f"PASS: {st['last_committed']} epochs over TLS 1.3 with mutual certificates and peer names, "
        f"replica identical at {len(checks)} frozen epochs, nothing in clear on the wire")


def wait_log(procs, needles, what, timeout=15):
    """Waits until every (proc, text) pair's text is in that proc's log."""
    end = time.time() + timeout
    while time.time() < end:
        if all(n in p.text() for p, n in needles):
            return
        time.sleep(0.1)
    missing = [(p.tag, n) for p, n in needles if n not in p.text()]
    for p in procs:
        p.dump()
    fail(f"{what}: no log line with {missing}")


def refused_case(tmp, vmm, tag, sb_keys, pr_keys, needles, what):
    port = repl.free_port()
    standby = daemon(tmp, f"standby-{tag}", {"Role": "standby", "Listen": f"127.0.0.1:{port}", **sb_keys})
    primary = daemon(tmp, f"primary-{tag}", {"Role": "primary", "ControlSocket": vmm.control,
                                            "Peer": f"127.0.0.1:{port}", "Tracking": "ring", **pr_keys})
    wait_log([primary, standby], [({"p": primary, "s": standby}[w], n) for w, n in needles], what)
    time.sleep(0.5)
    st, pt = standby.status(), primary.status()
    check(st["last_committed"] == 0 and st["state"] != "protected" and not st["link_up"],
          f"{what}: the standby accepted epochs: {st}")
    check(pt["state"] != "protected", f"{what}: the primary is protected: {pt}")
    log(f"PASS: {what}: refused; primary: {pt['detail']!r}; standby: {st['detail']!r}")
    stop_all(primary, standby)


def test_tls_refused(tmp, a):
    pki = Pki(tmp)
    pki.leaf("primary.test")
    pki.leaf("standby.test")
    vmm = repl.Vmm(tmp, "dirtier", "ring", 1, "ws=8M rate=5000")
    good_p, good_s = tls_keys(pki, "primary.test"), tls_keys(pki, "standby.test")

    # The standby trusts only another CA: it refuses the primary's certificate, and says why.
    refused_case(tmp, vmm, "ca", {**good_s, "TLSCAFile": pki.ca("ca2")}, good_p,
                 [("s", "was refused: unable to get local issuer certificate"),
                  ("p", "refused this side's TLS certificate")],
                 "a primary certificate from another CA")
    # The primary wants another name than the standby's certificate carries.
    refused_case(tmp, vmm, "name", good_s, {**good_p, "TLSPeerName": "other.test"},
                 [("p", "was refused: hostname mismatch")], "a standby certificate with the wrong name")
    # Plaintext primary, TLS standby; then TLS primary, plaintext standby.
    refused_case(tmp, vmm, "plain-p", good_s, {},
                 [("s", "speaks plaintext replication, but TLS=yes here"),
                  ("p", "this standby requires TLS")], "a plaintext primary at a TLS standby")
    refused_case(tmp, vmm, "plain-s", {}, good_p,
                 [("s", "started a TLS handshake, but TLS is off for this link here"),
                  ("p", "answered in plaintext replication frames")], "a TLS primary at a plaintext standby")

    # Key file problems: the VM fails with a message naming the file; the daemon lives on.
    port = repl.free_port()
    missing = os.path.join(pki.dir, "absent.key")
    open_key = os.path.join(pki.dir, "open.key")
    shutil.copy(good_s["TLSKeyFile"], open_key)
    os.chmod(open_key, 0o644)
    sb = repl.Daemon(tmp, "standby-files", {
        "t": {"Role": "standby", "Listen": f"127.0.0.1:{port}", **good_s, "TLSKeyFile": missing},
        "u": {"Role": "standby", "Listen": f"127.0.0.1:{repl.free_port()}", **good_s, "TLSKeyFile": open_key},
        "v": {"Role": "standby", "Listen": f"127.0.0.1:{repl.free_port()}", **good_s}})
    t, u, v = sb.status("t"), sb.status("u"), sb.status("v")
    check(t["state"] == "failed" and f"{missing}: cannot open TLS key file: No such file" in t["detail"],
          f"missing key file: {t}")
    check(u["state"] == "failed" and "must not be accessible by others" in u["detail"],
          f"world-readable key file: {u}")
    check(v["state"] == "listening", f"the VM with good files: {v}")
    check(f"VM t: TLS: {missing}: cannot open TLS key file" in sb.text(), "no log line for the missing key")
    stop_all(sb, vmm)
    log("PASS: missing and world-readable key files fail their VM with a clear error; the other VM listens")


# ---- capabilities -------------------------------------------------------------------------------

CAP_NET_ADMIN, CAP_NET_RAW, CAP_SYS_ADMIN = 12, 13, 21


def caps(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Cap"):
                k, v = line.split(":")
                out[k] = int(v.strip(), 16)
    return out


def last_cap():
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def test_caps(tmp, a):
    if os.geteuid() != 0:
        print("SKIP: needs root")
        sys.exit(77)
    need = (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW)
    mine = caps(os.getpid())
    if (mine["CapEff"] & need) != need or shutil.which("setpriv") is None:
        print("SKIP: this test needs CAP_NET_ADMIN and CAP_NET_RAW itself, and setpriv")
        sys.exit(77)
    log(f"the test itself: CapEff={mine['CapEff']:016x} CapBnd={mine['CapBnd']:016x}")
    fmt = lambda c: ", ".join(f"{k}={v:016x}" for k, v in c.items())

    d = repl.Daemon(tmp, "caps", {"t": {"Role": "standby", "Listen": f"127.0.0.1:{repl.free_port()}"}})
    c = caps(d.proc.pid)
    log(f"dirtyrepd as root: {fmt(c)}")
    check(c["CapEff"] == need and c["CapPrm"] == need, f"effective/permitted are not NET_ADMIN+NET_RAW: {c}")
    check(c["CapInh"] == 0 and c["CapAmb"] == 0, f"inheritable/ambient not empty: {c}")
    check(c["CapBnd"] == need, f"the bounding set was not reduced to NET_ADMIN+NET_RAW: {c}")
    # Every thread (loop, writers) alike: the drop ran before any was started.
    for tid in os.listdir(f"/proc/{d.proc.pid}/task"):
        ct = caps(f"{d.proc.pid}/task/{tid}")
        check(ct["CapEff"] == need and ct["CapBnd"] == need, f"thread {tid}: {fmt(ct)}")
    check(d.status()["state"] == "listening", "the standby does not listen after dropping capabilities")
    stop_all(d)

    # --keep-capabilities: the bounding set stays (for fence commands that need more); the
    # daemon itself still runs with only what it needs.
    conf = ["--config", os.path.join(d.dir, "dirtyrep.conf"), "--config-dir", os.path.join(d.dir, "vm.d")]
    for tag, cmd, bnd in (("caps-keep", [ENV["DR_DIRTYREPD"], *conf, "--keep-capabilities"], mine["CapBnd"]),
                          # Whatever the caller's bounding set, --keep-capabilities leaves it as it is.
                          ("caps-setpriv", ["setpriv", "--bounding-set", "-sys_admin", ENV["DR_DIRTYREPD"], *conf,
                                            "--keep-capabilities"], mine["CapBnd"] & ~(1 << CAP_SYS_ADMIN))):
        p = repl.Proc(tmp, tag, cmd)
        end = time.time() + 10
        while "serving 1 VM" not in p.text() and time.time() < end:
            time.sleep(0.05)
        c = caps(p.proc.pid)
        log(f"{tag}: {fmt(c)}")
        check(c["CapEff"] == need and c["CapPrm"] == need and c["CapBnd"] == bnd, f"{tag}: {fmt(c)}")
        stop_all(p)
    log(f"PASS: dirtyrepd as root runs with CapEff=CapPrm=CapBnd={need:#x} (CAP_NET_ADMIN, CAP_NET_RAW), "
        f"no inheritable or ambient capabilities, in every thread; --keep-capabilities keeps the caller's "
        f"bounding set")


def test_debug_socket(tmp, a):
    if shutil.which("setpriv") is None:
        print("SKIP: setpriv missing")
        sys.exit(77)
    os.chmod(tmp, 0o755)
    d = repl.Daemon(tmp, "dbg", {"t": {"Role": "standby", "Listen": f"127.0.0.1:{repl.free_port()}"}})
    os.chmod(d.dir, 0o755)
    mode = os.stat(d.debug).st_mode & 0o777
    check(mode == 0o600, f"debug socket mode {mode:o}")
    probe = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
             "try:\n s.connect(sys.argv[1])\nexcept OSError as e:\n print('connect', e.errno); sys.exit(0)\n"
             "s.settimeout(5)\ntry:\n s.sendall(b'status t\\n')\nexcept OSError as e:\n print('send', e.errno); sys.exit(0)\n"
             "try:\n d=s.recv(4096)\nexcept OSError as e:\n print('recv', e.errno); sys.exit(0)\n"
             "print('answer', repr(d))\n")
    out = subprocess.run(NOBODY + [sys.executable, "-c", probe, d.debug], capture_output=True, text=True)
    check(out.stdout.startswith("connect 13"), f"uid 65534 at the 0600 debug socket: {out.stdout} {out.stderr}")
    os.chmod(d.debug, 0o666)  # the mode opened up: SO_PEERCRED must still refuse
    out = subprocess.run(NOBODY + [sys.executable, "-c", probe, d.debug], capture_output=True, text=True)
    check(out.stdout.strip() in ("answer b''", "recv 104", "send 32", "send 104"),
          f"uid 65534 at an opened-up debug socket got: {out.stdout} {out.stderr}")
    check(d.status()["vm"] == "t", "root lost access to the debug socket")
    stop_all(d)
    log("PASS: the debug socket refuses uid 65534 by its mode (EACCES) and, opened up, by SO_PEERCRED "
        "(closed without an answer); root is served")


# ---- an attacker on the path --------------------------------------------------------------------

class AckWatch:
    """Samples the primary's acknowledged epoch (what its output commit released up to),
    then the standby's committed epoch, every 10 ms: the first must never be ahead of the
    second. The standby's value only grows, so sampling it second makes the check exact."""

    def __init__(self, primary, standby):
        self.primary, self.standby = primary, standby
        self.samples, self.bad, self.stop = 0, [], False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while not self.stop:
            try:
                acked = self.primary.status()["last_committed"]
                committed = self.standby.status()["last_committed"]
            except Exception:  # a daemon busy for a moment; the next sample counts
                time.sleep(0.01)
                continue
            self.samples += 1
            if acked > committed:
                self.bad.append((acked, committed))
            time.sleep(0.01)

    def finish(self):
        self.stop = True
        self.t.join(5)
        check(self.samples >= 50, f"only {self.samples} samples of acked vs committed epochs")
        check(not self.bad, f"the primary held ACKs for epochs the standby had not committed: {self.bad[:5]}")
        return self.samples


TAMPER = {
    # kind: (which daemon detects it, what its log says)
    "page": ("standby", "authentication failed for PAGES frame"),
    "ack": ("primary", "authentication failed for ACK frame"),
    "replay": ("standby", "frame out of sequence"),
    "relay": ("primary", "authentication failed for ACK frame"),
}


def test_tamper(tmp, a, kind):
    who, needle = TAMPER[kind]
    vmm = repl.Vmm(tmp, "dirtier", "ring", 1, "ws=16M pattern=random rate=3000 report_ms=500")
    sport = repl.free_port()
    proxy = drtest.TamperProxy(sport)
    # Compression=none: page records are raw, so the relay finds one to rewrite.
    standby = daemon(tmp, "standby", {"Role": "standby", "Listen": f"127.0.0.1:{sport}"})
    primary = daemon(tmp, "primary", {"Role": "primary", "ControlSocket": vmm.control,
                                      "Peer": f"127.0.0.1:{proxy.port}", "EpochMs": "20", "Tracking": "ring",
                                      "Compression": "none"})
    primary.wait(lambda s: s["state"] == "protected", "the primary to be protected", timeout=90)
    primary.wait(lambda s: s["last_committed"] >= 20, "20 epochs", timeout=60)
    watch = AckWatch(primary, standby)
    proc = {"primary": primary, "standby": standby}[who]
    before = proc.text().count(needle)
    proxy.mode = f"tamper-{kind}"
    end = time.time() + 30
    while proxy.tampered == 0:
        check(time.time() < end, f"the tamper proxy found nothing to do in 30 s (mode {proxy.mode})")
        time.sleep(0.01)
    t_tamper = time.time()
    end = time.time() + 15
    while proc.text().count(needle) == before:
        if time.time() > end:
            primary.dump()
            standby.dump()
            fail(f"tamper-{kind}: the {who} did not log {needle!r} within 15 s")
        time.sleep(0.02)
    line = [ln for ln in proc.text().splitlines() if needle in ln][-1]
    log(f"detected after {(time.time() - t_tamper) * 1000:.0f} ms (at most; polled): {line.strip()}")
    check("link closed, nothing of it applied" in line, f"the log line does not say the link closed: {line}")
    # The link failed and came back (the proxy passes again): protected, committing.
    st = primary.wait(lambda s: s["state"] == "protected" and s["link_up"], "the pair to reconnect", timeout=60)
    target = st["last_committed"] + 20
    primary.wait(lambda s: s["last_committed"] >= target, f"epoch {target} after reconnecting", timeout=60)
    samples = watch.finish()
    for k in range(2):
        repl.compare_at_freeze(tmp, primary, standby, "dirtier", k)
    check(proxy.tampered == 1, f"the proxy tampered {proxy.tampered} times, expected once")
    stop_all(primary, standby, vmm)
    log(f"PASS: tamper-{kind}: detected by the {who} ({needle!r}), link failed and resynced; "
        f"{samples} samples: the primary never held an ACK ahead of the standby's commit; "
        f"replica identical to the primary's RAM at 2 frozen epochs after it")


class Flooder:
    """Keeps `per_source` silent TCP connections from each source address open to the
    target, reconnecting every one that gets closed."""

    def __init__(self, sources, port, per_source=4):
        self.sources, self.port, self.per = sources, port, per_source
        self.connects = 0
        self.closed = 0
        self.stop = False
        self.threads = [threading.Thread(target=self.run, args=(src,), daemon=True) for src in sources]
        for t in self.threads:
            t.start()

    def run(self, src):
        socks = []
        while not self.stop:
            while len(socks) < self.per and not self.stop:
                s = socket.socket()
                try:
                    s.bind((src, 0))
                    s.connect(("127.0.0.1", self.port))
                    socks.append(s)
                    self.connects += 1
                except OSError:
                    s.close()
                    time.sleep(0.01)
            r, _, _ = select.select(socks, [], [], 0.01)
            for s in r:
                try:
                    d = s.recv(4096)
                except OSError:
                    d = b""
                if not d:
                    socks.remove(s)
                    s.close()
                    self.closed += 1
        for s in socks:
            s.close()

    def finish(self):
        self.stop = True
        for t in self.threads:
            t.join(5)


def test_preauth_flood(tmp, a):
    vmm = repl.Vmm(tmp, "dirtier", "ring", 1, "ws=16M pattern=random rate=3000 report_ms=500")
    sport = repl.free_port()
    standby = daemon(tmp, "standby", {"Role": "standby", "Listen": f"127.0.0.1:{sport}"})
    sources = [f"127.0.0.{i}" for i in range(2, 10)]
    flood = Flooder(sources, sport)
    time.sleep(3)  # the listener is saturated and churning: evictions, 1 s first-bytes deadlines
    check(flood.connects >= 32, f"the flood made only {flood.connects} connections")
    log(f"flood running: {flood.connects} connections from {len(sources)} addresses, {flood.closed} closed by "
        f"the standby so far")
    t0 = time.time()
    primary = daemon(tmp, "primary", {"Role": "primary", "ControlSocket": vmm.control,
                                      "Peer": f"127.0.0.1:{sport}", "EpochMs": "20", "Tracking": "ring"})
    st = primary.wait(lambda s: s["state"] == "protected", "the primary to be protected during the flood",
                      timeout=30)
    took = time.time() - t0
    log(f"protected {took * 1000:.0f} ms after dirtyrepd started (full sync {st['last_sync_usec'] / 1000:.0f} ms), "
        f"during a flood of {flood.connects} connections")
    check(took <= 2.0 * repl.SLOW, f"protected only after {took:.2f} s during the flood (limit 2 s)")
    # Stays protected while the flood goes on, and keeps committing.
    c0, end, samples = st["last_committed"], time.time() + 8, 0
    while time.time() < end:
        s = primary.status()
        samples += 1
        check(s["state"] == "protected" and s["link_up"], f"the primary left protected during the flood: {s}")
        time.sleep(0.05)
    c1 = primary.status()["last_committed"]
    check(c1 - c0 >= 100, f"only {c1 - c0} epochs committed in 8 s of flood")
    flood.finish()
    text = standby.text()
    warns = [ln for ln in text.splitlines() if "before authentication" in ln]
    check(warns and any(src in warns[-1] for src in sources), f"no warning naming a flood source: {warns[-3:]}")
    elapsed = time.time() - t0 + 3
    check(len(warns) <= elapsed / 10 + 2, f"{len(warns)} warnings in {elapsed:.0f} s: not rate-limited")
    log(f"standby: {len(warns)} warning line(s) for {flood.closed} dropped connections in {elapsed:.0f} s; "
        f"last: {warns[-1].strip()}")
    stop_all(primary, standby, vmm)
    log(f"PASS: {flood.connects} silent connections from {len(sources)} addresses; the primary was protected "
        f"after {took:.2f} s and stayed protected for 8 s ({samples} samples, {c1 - c0} epochs)")


def test_image_root(tmp, a):
    bus = control.Bus(tmp, "bus")
    d = control.Daemon(tmp, "sb", ["--role", "standby", "--listen", f"127.0.0.1:{repl.free_port()}"], bus=bus)
    end = time.time() + 20
    while control.busctl(bus, "status", "org.dirtyrep1")[0] != 0:
        check(d.alive() and time.time() < end, "org.dirtyrep1 never appeared on the bus")
        time.sleep(0.1)
    img = os.path.join(d.dir, "images")
    os.makedirs(img, exist_ok=True)  # the daemon makes it too (0700) when asked for an image
    os.symlink(tmp, os.path.join(img, "escape"))
    cases = [("/etc/dr-image", None), (os.path.join(img, "..", "out"), None),
             (os.path.join(img, "escape", "out"), None), (os.path.join(img, "inc"), os.path.join(tmp, "parent"))]
    for target, parent in cases:
        args = ["checkpoint", "t", "--image", target] + (["--parent", parent] if parent else [])
        err = control.ctl_fails(bus, 4, "is not below the image root ImageDirectory=" + img, *args)
        check("set ImageDirectory= in dirtyrep.conf" in err, f"the error does not name the key: {err}")
    for p in ("/etc/dr-image", os.path.join(d.dir, "out"), os.path.join(tmp, "out"), os.path.join(img, "inc")):
        check(not os.path.exists(p), f"a refused image created {p}")
    # Inside the root the request passes the check and meets the role's own refusal.
    control.ctl_fails(bus, 4, "not a running primary", "checkpoint", "t", "--image", os.path.join(img, "ok"))
    check("CheckpointImage refused" in d.text(), "the daemon did not log the refusal")
    # ImageDirectory= moves the root (a reload applies it): the old root is outside now.
    conf = os.path.join(d.dir, "dirtyrep.conf")
    c = subprocess.run([ENV["DR_DIRTYREPD"], "-c", conf, "-d", os.path.join(d.dir, "vm.d"), "--check-config"],
                       input="", capture_output=True, text=True)
    check(c.returncode == 0, f"--check-config before: {c.stdout} {c.stderr}")
    with open(conf, "a") as f:
        f.write("ImageDirectory=images-elsewhere\n")
    c = subprocess.run([ENV["DR_DIRTYREPD"], "-c", conf, "-d", os.path.join(d.dir, "vm.d"), "--check-config"],
                       capture_output=True, text=True)
    check(c.returncode == 1 and "ImageDirectory=" in c.stderr, f"a relative ImageDirectory= accepted: {c.stderr}")
    root2 = os.path.join(tmp, "images-elsewhere")
    with open(conf) as f:
        text = f.read().replace("ImageDirectory=images-elsewhere", f"ImageDirectory={root2}")
    with open(conf, "w") as f:
        f.write(text)
    control.ctl_ok(bus, "reload")
    control.ctl_fails(bus, 4, "is not below the image root ImageDirectory=" + root2, "checkpoint", "t", "--image",
                      os.path.join(img, "ok"))
    check(os.path.isdir(root2) and (os.stat(root2).st_mode & 0o777) == 0o700, f"{root2} not created 0700")
    control.ctl_fails(bus, 4, "not a running primary", "checkpoint", "t", "--image", os.path.join(root2, "ok"))
    stop_all(d)
    log(f"PASS: CheckpointImage confined to {img}: {len(cases)} escapes refused, nothing created; "
        f"ImageDirectory= moved it to {root2} (made 0700), a relative one refused")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("test", choices=["tls", "tls-refused", "caps", "debug-socket", "tamper-page", "tamper-ack",
                                     "tamper-replay", "tamper-relay", "preauth-flood", "image-root"])
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    a = ap.parse_args()
    if (a.test.startswith("tls") or a.test.startswith("tamper") or a.test == "preauth-flood") and \
            not os.path.exists("/dev/kvm"):
        print("SKIP: /dev/kvm missing")
        return 77
    if a.test.startswith("tls") and shutil.which("openssl") is None:
        print("SKIP: openssl missing")
        return 77
    for k in ("DR_VMM", "DR_DIRTYREPD", "DR_GUEST_DIRTIER"):
        if k not in ENV:
            fail(f"{k} not set")
    log(f"seed {a.seed}")
    if a.test.startswith("tamper-"):
        return repl.in_tmp("dr-sec-", test_tamper, a, a.test[len("tamper-"):])
    return repl.in_tmp("dr-sec-", {"tls": test_tls, "tls-refused": test_tls_refused, "caps": test_caps,
                                   "debug-socket": test_debug_socket, "preauth-flood": test_preauth_flood,
                                   "image-root": test_image_root}[a.test], a)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""A standby dirtyrepd's whole life, and its replica through all of it (issue 19).

A real dirtyrepd as the standby of VM t, owning org.dirtyrep1 on a private
system-like dbus-daemon (the real policy file) and driven with dirtyrepctl; the
primary's side is dr-linkprimary (the replication protocol over the real Link, on
synthetic RAM, so this runs without /dev/kvm; operator-* cover the same with real
VMs). Checked, each time by the primary's Welcome (the standby's committed epoch
and session) and by page hashes of the replica against the primary's model:

  - reload adding Peer=: the committed epoch never reads 0, the primary resyncs
    incrementally (no second full sync);
  - reload to Role=primary over the replica: refused with the reason, nothing changed;
  - detach, attach: the replica is kept;
  - SIGTERM and a new daemon: the replica is saved to the state directory, restored
    (hashes equal), the file removed once restored, incremental resync;
  - maintenance on: the primary is told (ERROR -ENOLINK, "maintenance"), status
    "maintenance", no promotion; survives a restart; off: incremental resync;
  - a damaged replica file: moved aside (.bad), the reason logged, full resync;
  - the primary lost, an activation whose VMM exits at once: `dirtyrepctl failover`
    fails with the VMM's message and the standby keeps its replica; after a reload
    with a VMM that reports ready, the retry answers only then, and the role file
    says primary; a reload of the promoted VM keeps its VMM; without a service
    manager a stop ends that VMM and removes the role file.

Usage: test-standby-lifecycle.py PATH-TO-dr-linkprimary. Exit 0 pass, 1 fail, 77 skip.
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import drproc  # noqa: E402
from drproc import ENV, LIVE, Bus, DebugSocket, Fail, fail, free_port, log  # noqa: E402

SECRET = b"standby-lifecycle-secret-0123456789\n"


class Proc(drproc.Proc):
    stop_s = 20

    def logname(self, tag):
        return f"{tag}.{len(LIVE)}.log"  # one per start of the daemon


class LinkPrimary(Proc):
    """dr-linkprimary; its stdout events are collected by a thread."""

    def __init__(self, tmp, exe, port, secret):
        self.events = []
        self.lock = threading.Lock()
        self.hash = os.path.join(tmp, "model.hash")
        super().__init__(tmp, "linkprimary", [exe, "--connect", f"127.0.0.1:{port}", "--secret", secret, "--name",
                                              "t", "--pages", "2048", "--interval-ms", "30", "--hash", self.hash],
                         pipe=True)
        threading.Thread(target=self.reader, daemon=True).start()

    def reader(self):
        for line in self.proc.stdout:
            with self.lock:
                self.events.append(line.strip())

    def mark(self):
        with self.lock:
            return len(self.events)

    def since(self, mark):
        with self.lock:
            return list(self.events[mark:])

    def wait(self, pred, what, mark=0, timeout=30):
        end = time.time() + timeout
        while time.time() < end:
            for e in self.since(mark):
                if pred(e):
                    return e
            if not self.alive():
                fail(f"dr-linkprimary exited: {self.text()}")
            time.sleep(0.02)
        fail(f"timed out waiting for the primary to see {what}; its events: {self.since(mark)[-20:]}")

    def pause(self):
        mark = self.mark()
        self.proc.send_signal(signal.SIGUSR1)
        return int(self.wait(lambda e: e.startswith("paused at"), "pause", mark).split()[2])

    def resume(self):
        # Waited for: sd-event takes pending signals by priority, not in order.
        mark = self.mark()
        self.proc.send_signal(signal.SIGUSR2)
        self.wait(lambda e: e == "resumed", "resume", mark)

    def fulls(self):
        with self.lock:
            return sum(1 for e in self.events if e.startswith("ack ") and e.endswith(" full"))

    def last_ack(self):
        with self.lock:
            acks = [int(e.split()[1]) for e in self.events if e.startswith("ack ")]
        return acks[-1] if acks else 0


class Standby(DebugSocket):
    """The standby dirtyrepd, restarted as the test goes (self.proc: the running one)."""

    tag = "dirtyrepd"
    fail = staticmethod(fail)

    def __init__(self, tmp, bus, port):
        self.tmp, self.bus, self.port = tmp, bus, port
        self.state = os.path.join(tmp, "state")
        self.conf = os.path.join(tmp, "vm.d", "t.conf")
        self.debug = os.path.join(tmp, "debug.sock")
        self.proc = None
        os.makedirs(os.path.join(tmp, "vm.d"), exist_ok=True)
        os.makedirs(os.path.join(tmp, "run"), exist_ok=True)
        drproc.write_daemon_conf(tmp, 50, 10, runtime=f"{tmp}/run", state=self.state)
        self.secret = drproc.write_secret(os.path.join(tmp, "secret"), SECRET)
        self.keys = {"Role": "standby", "Listen": f"127.0.0.1:{port}", "SecretFile": self.secret,
                     "FailoverPolicy": "manual", "Vmm": "/bin/false"}
        self.write()

    def write(self, **changes):
        self.keys.update(changes)
        drproc.write_vm_conf(self.conf, self.keys)

    def start(self):
        if os.path.exists(self.debug):
            os.unlink(self.debug)
        self.proc = Proc(self.tmp, "dirtyrepd",
                         drproc.dirtyrepd_cmd(self.tmp, self.debug) + ["--bus-address", self.bus])
        end = time.time() + 20
        while ctl(self.bus, "list", quiet=True)[0] != 0:
            if not self.proc.alive() or time.time() > end:
                fail(f"dirtyrepd did not come up: {self.proc.text()[-2000:]}")
            time.sleep(0.1)

    def stop(self):
        rc = self.proc.stop()
        if rc != 0:
            fail(f"dirtyrepd exited {rc} on SIGTERM: {self.proc.text()[-2000:]}")

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.alive()

    def exitcode(self):
        return self.proc.exitcode()


def ctl(bus, *args, quiet=False):
    c = subprocess.run([ENV["DR_DIRTYREPCTL"], "--bus-address", bus] + list(args), capture_output=True, text=True,
                       timeout=60)
    if not quiet:
        log(f"  dirtyrepctl {' '.join(args)} -> exit {c.returncode}: {(c.stdout + c.stderr).strip()[:300]}")
    return c.returncode, c.stdout + c.stderr


def ctl_ok(bus, *args):
    rc, out = ctl(bus, *args)
    if rc != 0:
        fail(f"dirtyrepctl {' '.join(args)} failed ({rc}): {out}")
    return out


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def hashes_equal(S, P, what):
    """Primary paused at a sealed epoch: the standby's replica must hash like the model."""
    mark = P.mark()
    sealed = P.pause()
    end = time.time() + 20
    while P.last_ack() < sealed and time.time() < end:
        time.sleep(0.02)
    if P.last_ack() != sealed:
        fail(f"epoch {sealed} never acknowledged; the primary's last events: {P.since(max(0, mark - 10))}; "
             f"standby {S.status()}")
    path = os.path.join(S.tmp, "replica.hash")
    r = S.req(f"hash t {path}")
    if not r.startswith("ok") or int(r.split()[1]) != sealed:
        fail(f"hash of the replica: {r.strip()!r}, expected epoch {sealed}")
    if open(path, "rb").read() != open(P.hash, "rb").read():
        fail(f"{what}: the replica of epoch {sealed} differs from the primary's RAM")
    log(f"{what}: replica of epoch {sealed} == primary's RAM (2048 page hashes)")
    P.resume()
    return sealed


def run(tmp, exe):
    bus = Bus(tmp, "dbus", dirname=".").address
    port = free_port()
    S = Standby(tmp, bus, port)
    S.start()
    P = LinkPrimary(tmp, exe, port, S.secret)
    P.wait(lambda e: e.startswith("ack ") and e.endswith(" inc"), "incremental epochs after the full sync")
    S.wait(lambda s: s["state"] == "protected", "protected")
    hashes_equal(S, P, "start")

    # 1. The reload that used to drop the replica: Peer= added to the standby.
    fulls = P.fulls()
    mark = P.mark()
    S.write(Peer="127.0.0.1:9")
    r = subprocess.Popen([ENV["DR_DIRTYREPCTL"], "--bus-address", bus, "reload"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    lowest = min(S.status()["last_committed"] for _ in range(3))
    while r.poll() is None:
        lowest = min(lowest, S.status()["last_committed"])
    for _ in range(30):
        lowest = min(lowest, S.status()["last_committed"])
    out = r.stdout.read()
    log(f"  dirtyrepctl reload -> exit {r.returncode}: {out.strip()}; lowest committed epoch seen {lowest}")
    if r.returncode != 0 or lowest == 0:
        fail(f"reload with Peer= added: exit {r.returncode}, committed epoch went to {lowest}")
    up = P.wait(lambda e: e.startswith("up "), "the reconnect after the reload", mark)
    P.wait(lambda e: e.startswith("ack ") and e.endswith(" inc"), "an incremental resync", mark)
    if "session=ours" not in up or P.fulls() != fulls:
        fail(f"after the reload: {up}, full syncs {fulls} -> {P.fulls()}: the replica was not kept")
    log(f"reload with Peer= added: primary saw {P.since(mark)[:3]}; no full sync")
    hashes_equal(S, P, "after the reload")

    # 2. A reload that would discard the replica is refused and changes nothing.
    S.write(Role="primary")
    rc, out = ctl(bus, "reload")
    if rc == 0 or "would discard it" not in out:
        fail(f"reload to Role=primary over the replica: exit {rc}: {out}")
    if S.status()["role"] != "standby":
        fail("the refused reload changed the role")
    S.write(Role="standby")
    ctl_ok(bus, "reload")

    # 3. Detach and attach keep the replica.
    mark = P.mark()
    ctl_ok(bus, "detach", "t")
    if S.status()["state"] != "detached":
        fail("not detached")
    ctl_ok(bus, "attach", "t")
    up = P.wait(lambda e: e.startswith("up "), "the reconnect after attach", mark)
    P.wait(lambda e: e.startswith("ack ") and e.endswith(" inc"), "an incremental resync after attach", mark)
    if "session=ours" not in up or P.fulls() != fulls:
        fail(f"detach/attach dropped the replica: {up}")
    log(f"detach + attach: {up}")

    # 4. A clean stop saves the replica, the next start restores it.
    sealed = hashes_equal(S, P, "before the stop")
    P.pause()
    time.sleep(0.3)
    S.stop()
    saved = os.path.join(S.state, "t.replica")
    if not os.path.exists(saved):
        fail(f"no {saved} after a clean stop: {S.proc.text()[-1500:]}")
    st = os.stat(saved)
    log(f"stopped: {saved} {st.st_size} bytes, {st.st_blocks * 512} allocated")
    mark = P.mark()
    S.start()
    st = S.status()
    if st["last_committed"] < sealed:
        fail(f"after a restart the standby holds epoch {st['last_committed']}, expected >= {sealed}")
    if os.path.exists(saved):
        fail("the replica file is still there once restored (a crash would bring back an old copy)")
    P.resume()
    up = P.wait(lambda e: e.startswith("up "), "the reconnect after the restart", mark)
    P.wait(lambda e: e.startswith("ack ") and e.endswith(" inc"), "an incremental resync after the restart", mark)
    if "session=ours" not in up or P.fulls() != fulls:
        fail(f"after a restart: {up}, full syncs {fulls} -> {P.fulls()}")
    hashes_equal(S, P, "after a restart")

    # 5. Planned maintenance: the primary is told, the state persists, off resyncs.
    mark = P.mark()
    out = ctl_ok(bus, "maintenance", "t", "on")
    down = P.wait(lambda e: e.startswith("down "), "the maintenance notice", mark)
    if not down.startswith("down -67 ") or "maintenance" not in down:
        fail(f"the primary was not told about the maintenance (ERROR -ENOLINK): {down}")
    st = S.status()
    if st["state"] != "maintenance":
        fail(f"status during maintenance: {st}")
    log(f"maintenance on: primary saw {down!r}; standby {st['state']}: {st['detail']}")
    rc, out = ctl(bus, "failover", "t")
    if rc == 0:
        fail("a standby in maintenance was promoted")
    S.stop()
    if not os.path.exists(os.path.join(S.state, "t.role")):
        fail("the maintenance was not persisted")
    S.start()
    st = S.status()
    if st["state"] != "maintenance" or st["last_committed"] == 0:
        fail(f"after a restart in maintenance: {st}")
    time.sleep(0.5)
    if any(e.startswith("up ") for e in P.since(mark)):
        fail("the primary got connected while the standby is in maintenance")
    mark = P.mark()
    ctl_ok(bus, "maintenance", "t", "off")
    up = P.wait(lambda e: e.startswith("up "), "the reconnect after maintenance", mark)
    P.wait(lambda e: e.startswith("ack "), "a resync after maintenance", mark)
    if os.path.exists(os.path.join(S.state, "t.role")):
        fail("the role file is still there after maintenance off")
    S.wait(lambda s: s["state"] == "protected", "protected after maintenance")
    log(f"maintenance off: {up}")
    hashes_equal(S, P, "after maintenance")

    # 6. A damaged replica file is refused, moved aside, and the primary sends a full one.
    P.pause()
    time.sleep(0.3)
    S.stop()
    with open(saved, "r+b") as f:
        f.seek(os.path.getsize(saved) - 4096 * 2048 + 100)  # inside the RAM (the first, non-zero half)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))
    fulls = P.fulls()
    mark = P.mark()
    S.start()
    P.resume()
    if not os.path.exists(saved + ".bad") or "RAM checksum mismatch" not in S.proc.text():
        fail(f"a damaged replica file was not refused and moved aside: {S.proc.text()[-1500:]}")
    P.wait(lambda e: e.startswith("ack ") and e.endswith(" full"), "a full resync after the damaged file", mark)
    log(f"damaged file: refused (RAM checksum mismatch), moved to {saved}.bad, full resync")
    hashes_equal(S, P, "after the full resync")

    # 7. A failed activation keeps the replica; the retry's answer waits for the ready fd. The
    # VMM here is a program of this test (no /dev/kvm needed): first one that exits 1 with a
    # message, then one that reports ready as dirtyrep-vmm does (fd 5) and stays. The real VMM
    # is operator-failover-retry's.
    epoch = S.wait(lambda s: s["state"] == "protected", "protected")["last_committed"]
    P.stop()
    S.wait(lambda s: "waiting for promote" in s["detail"], "the lost primary (FailoverPolicy=manual)")
    epoch = S.status()["last_committed"]
    bad = os.path.join(tmp, "vmm-bad")
    with open(bad, "w") as f:
        # Chatter first: the reason reported must be the last line.
        f.write("#!/bin/sh\nfor i in 1 2 3 4 5 6 7 8; do echo \"vmm-bad: setting up part $i of the VM\"; done\n"
                "echo 'RAM image size does not match --memory' >&2\nexit 1\n")
    good = os.path.join(tmp, "vmm-good")
    with open(good, "w") as f:
        f.write("#!/bin/sh\necho \"vmm-good: $*\"\nsleep 0.3\necho 1 >&5\nexec sleep 600\n")
    os.chmod(bad, 0o755)
    os.chmod(good, 0o755)
    S.write(Vmm=bad)
    ctl_ok(bus, "reload")
    rc, out = ctl(bus, "failover", "t")
    if rc == 0 or "RAM image size does not match --memory" not in out:
        fail(f"a failed activation was not reported with the VMM's own error: exit {rc}: {out}")
    st = S.status()
    if st["role"] != "standby" or st["last_committed"] != epoch:
        fail(f"after a failed activation: {st}, expected a standby with the replica of epoch {epoch}")
    log(f"failed activation: standby {st['state']} at epoch {st['last_committed']}: {st['detail']}")
    S.write(Vmm=good)
    ctl_ok(bus, "reload")
    t0 = time.time()
    out = ctl_ok(bus, "failover", "t")
    took = time.time() - t0
    if "now primary" not in out or took < 0.3:
        fail(f"the retried failover answered {out!r} after {took:.2f} s (before the VMM was ready?)")
    role = open(os.path.join(S.state, "t.role")).read()
    vmmlog = open(os.path.join(tmp, "run", "t.vmm.log")).read()
    if "role=primary" not in role or f"from_epoch={epoch}" not in role:
        fail(f"role file after the failover: {role!r}")
    if "--restore /proc/self/fd/4 --ram-fd 3 --ready-fd 5" not in vmmlog:
        fail(f"the VMM's output did not reach its log file: {vmmlog!r}")
    st = S.status()
    log(f"retried failover answered after {took:.2f} s: {out.strip()}; now {st['role']} {st['state']}; "
        f"role file {role.split()}")
    # A reload that changes the promoted VM's configuration keeps its VMM (handed to the new role).
    vmm = children(S.proc.pid)
    if len(vmm) != 1:
        fail(f"the daemon's children after the failover: {vmm}")
    S.write(EpochMs="30")
    ctl_ok(bus, "reload")
    st = S.status()
    if children(S.proc.pid) != vmm or st["role"] != "primary":
        fail(f"a reload of the promoted VM lost its VMM: children {children(S.proc.pid)} (was {vmm}), {st}")
    log(f"reload of the promoted VM: VMM pid {vmm[0]} kept, still {st['role']}")
    # Without a service manager the VMM has no unit of its own: a stop ends it, and the role file
    # goes with it (the next start must not wait for a VMM that is gone).
    S.stop()
    if os.path.exists(f"/proc/{vmm[0]}") and open(f"/proc/{vmm[0]}/stat").read().split()[2] != "Z":
        fail("the VMM outlived the daemon without a unit of its own")
    if os.path.exists(os.path.join(S.state, "t.role")):
        fail("the role file outlived a VMM stopped with the daemon")
    S.start()
    st = S.status()
    if st["role"] != "standby":
        fail(f"after the VMM was stopped with the daemon, the VM came back as {st}")
    log(f"stop without a service manager: VMM stopped, role file removed, back as {st['role']} {st['state']}")
    S.stop()


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    if not shutil.which("dbus-daemon"):
        print("SKIP: dbus-daemon is not installed")
        return 77
    tmp = tempfile.mkdtemp(prefix="dr-standby-life-")
    rc = 1
    try:
        run(tmp, sys.argv[1])
        log("PASS")
        rc = 0
    except Fail as e:
        log("FAIL:", e)
        for p in LIVE:
            log(f"--- {p.tag} ---\n" + p.text()[-3000:])
    finally:
        for p in list(LIVE):
            if p.alive():
                p.proc.kill()
                p.proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())

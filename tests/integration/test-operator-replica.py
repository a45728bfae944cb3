#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""What an operator does to a replicated pair, and what must survive it (issue 19).

Two hosts in network namespaces (drtest.py: A primary with the kv guest behind the
service address, B standby, a client C running redis-cli), both dirtyrepd real; B
also owns org.dirtyrep1 on a private system-like dbus-daemon (DBUS_SYSTEM_BUS_ADDRESS)
so `dirtyrepctl` drives it exactly as on a host.

  test-operator-replica.py reload-keeps-replica
      B starts as the man page's standby did (no Peer=, FailoverPolicy=manual); once it
      holds a replica, Peer= and FailoverPolicy=auto are added and `dirtyrepctl reload`
      runs: B's committed epoch never drops to 0 (polled through the reload), the
      primary resyncs incrementally (no second full sync), a reload that would make B
      primary over its replica is refused with the reason and changes nothing; then A
      dies and B fails over on its own: GET >= the last acknowledged INCR.
  test-operator-replica.py failover-retry
      Another process on B holds the service port the VMM must listen on, a failure
      `--check-config` cannot foresee. A dies; `dirtyrepctl failover` must exit
      non-zero with the VMM's own error, B stays a standby with the same committed
      epoch and no VMM; the port freed, `dirtyrepctl reload`, `dirtyrepctl failover`
      again: exit 0 only once the guest runs, and the first INCR
      right after it answers, GET >= the last acknowledged value.
  test-operator-replica.py maintenance
      `dirtyrepctl maintenance t on` on B: A keeps serving (INCRs acknowledged for 3x
      SplitBrainTimeoutMs with SplitBrainPolicy=suspend, status "unprotected", never
      "suspended"), B's status says "maintenance"; B's daemon is stopped and started
      again meanwhile (the replica is saved to and restored from its state directory,
      the maintenance persists); `maintenance t off`: B resyncs and is protected; then
      A dies, B fails over, GET >= the last acknowledged INCR.

Exit 0 pass, 1 fail, 77 skip (no /dev/kvm, not root, no redis-cli/ip/dbus-daemon).
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from drtest import (ENV, SLOW, SVC_IP, Bus, Daemon, IncrLoop, Proc, fail, install_sigterm, kill_primary,  # noqa: E402
                    log, ns_exec, redis, run_in_namespaces, setup_pair, wait_file)

def ctl(bus, *args, timeout=120):
    c = subprocess.run([ENV["DR_DIRTYREPCTL"], "--bus-address", bus.address] + list(args), capture_output=True,
                       text=True, timeout=timeout)
    log(f"  dirtyrepctl {' '.join(args)} -> exit {c.returncode}: {(c.stdout + c.stderr).strip()[:400]}")
    return c.returncode, c.stdout, c.stderr


def standby_on_bus(tmp, bus, extra):
    """B's dirtyrepd, owning org.dirtyrep1 on the private bus (bus=auto honours DBUS_SYSTEM_BUS_ADDRESS)."""
    old = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address
    try:
        d = Daemon(tmp, "b", "standby", extra)
    finally:
        if old is None:
            del os.environ["DBUS_SYSTEM_BUS_ADDRESS"]
        else:
            os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = old
    end = time.time() + 20 * SLOW
    while ctl(bus, "list")[0] != 0:
        if time.time() > end:
            fail("B never appeared on the bus")
        time.sleep(0.2)
    return d


def rewrite_conf(daemon, changes):
    """Edits B's vm.d/t.conf in place (None removes a key)."""
    path = os.path.join(daemon.dir, "vm.d", "t.conf")
    keys = {}
    for line in open(path).read().splitlines()[1:]:
        k, _, v = line.partition("=")
        keys[k] = v
    keys.update(changes)
    with open(path, "w") as f:
        f.write("[VM]\n" + "".join(f"{k}={v}\n" for k, v in keys.items() if v is not None))


def pair(tmp, bus, b_extra):
    """A primary (kv guest), B standby on the bus with b_extra; waits for a committed replica."""
    A, B = setup_pair(tmp, {"FailoverPolicy": "manual"})
    B.daemon.proc.send_signal(signal.SIGTERM)
    B.daemon.proc.wait(timeout=15 * SLOW)
    B.daemon.reap()
    B.daemon = standby_on_bus(tmp, bus, b_extra)
    A.daemon.wait(lambda s: s["state"] == "protected", "protected by B on the bus", timeout=60 * SLOW)
    B.daemon.wait(lambda s: s["last_committed"] > 0, "a committed replica on B")
    return A, B


def incr_some(key, n=5):
    vals = []
    for _ in range(n):
        v = redis(SVC_IP, "INCR", key)
        if v is not None:
            vals.append(int(v))
    if not vals:
        fail(f"no INCR {key} was answered")
    return vals


def check_get(key, last_acked, within=20):
    end = time.time() + within * SLOW
    v = None
    while v is None and time.time() < end:
        v = redis(SVC_IP, "GET", key)
    if v is None or int(v) < last_acked:
        fail(f"GET {key} -> {v!r} after the failover, but {last_acked} was acknowledged: a write was lost")
    log(f"GET {key} -> {v} (last acknowledged {last_acked}): nothing lost")


def test_reload_keeps_replica(tmp, bus):
    A, B = pair(tmp, bus, {"Peer": None, "FailoverPolicy": "manual"})
    acked = incr_some("r")
    st = B.daemon.wait(lambda s: s["state"] == "protected", "B protected")
    a0 = A.daemon.status()
    log(f"B without Peer=: {st['state']}, committed {st['last_committed']}; A full syncs {a0['full_syncs']}")

    # The reload that used to drop the replica.
    rewrite_conf(B.daemon, {"Peer": "10.78.0.1:7000", "FailoverPolicy": "auto"})
    p = subprocess.Popen([ENV["DR_DIRTYREPCTL"], "--bus-address", bus.address, "reload"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    lowest = None
    while p.poll() is None:
        c = B.daemon.status()["last_committed"]
        lowest = c if lowest is None else min(lowest, c)
    out = p.stdout.read()
    log(f"  dirtyrepctl reload -> exit {p.returncode}: {out.strip()}")
    if p.returncode != 0:
        fail(f"dirtyrepctl reload failed: {out}")
    for _ in range(50):
        c = B.daemon.status()["last_committed"]
        lowest = min(lowest, c) if lowest is not None else c
        time.sleep(0.01)
    if lowest == 0:
        fail("B's committed epoch dropped to 0 during the reload: the replica was discarded")
    st = B.daemon.wait(lambda s: s["state"] == "protected" and s["last_committed"] > st["last_committed"],
                       "B protected again after the reload")
    a1 = A.daemon.wait(lambda s: s["state"] == "protected", "A protected again")
    log(f"after the reload: B {st['state']} at {st['last_committed']} (lowest seen {lowest}); A full syncs "
        f"{a1['full_syncs']}, incremental {a1['incremental_syncs']}")
    if a1["full_syncs"] != a0["full_syncs"]:
        fail(f"the reload cost a full sync ({a0['full_syncs']} -> {a1['full_syncs']}): the replica was not kept")
    if a1["incremental_syncs"] <= a0["incremental_syncs"]:
        fail("no incremental resync after the reload: the standby was not restarted at all?")
    if "restarting its role" not in B.daemon.text():
        fail("B did not restart the VM's role with the new configuration")

    # A reload that would throw the replica away is refused, naming why, and changes nothing.
    rewrite_conf(B.daemon, {"Role": "primary"})
    rc, o, e = ctl(bus, "reload")
    if rc == 0 or "would discard it" not in o + e:
        fail(f"a reload making B primary over its replica was not refused with the reason: {rc} {o} {e}")
    st2 = B.daemon.status()
    if st2["role"] != "standby" or st2["last_committed"] < st["last_committed"]:
        fail(f"the refused reload changed B: {st2}")
    rewrite_conf(B.daemon, {"Role": "standby"})
    rc, o, e = ctl(bus, "reload")
    if rc != 0:
        fail("reloading the unchanged configuration failed")

    acked += incr_some("r")
    kill_primary(A, silent=True)
    B.daemon.wait(lambda s: s["role"] == "primary" and s["state"] == "unprotected",
                  "B to fail over on its own (Peer= from the reload)", timeout=40 * SLOW)
    check_get("r", max(acked))


def test_failover_retry(tmp, bus):
    args = "--service-listen 0.0.0.0:6379 --console " + os.path.join(tmp, "b", "console-promoted.log")
    A, B = pair(tmp, bus, {"VmmArgs": args, "FailoverPolicy": "manual"})
    acked = incr_some("f")
    epoch = B.daemon.wait(lambda s: s["state"] == "protected", "B protected")["last_committed"]
    # Something else on B holds the service port: a failure `--check-config` cannot
    # foresee, met only when the VMM starts.
    blocker = Proc(tmp, "port-blocker", ns_exec("b", sys.executable, "-c",
                                                "import socket, time\n"
                                                "s = socket.socket(); s.bind(('0.0.0.0', 6379)); s.listen(1)\n"
                                                "print('listening', flush=True)\n"
                                                "time.sleep(3600)"))
    wait_file(blocker.errlog, "listening", blocker)
    kill_primary(A, silent=False)
    st = B.daemon.wait(lambda s: "waiting for promote" in s["detail"], "B to see the primary lost")
    epoch = st["last_committed"]

    t0 = time.time()
    rc, o, e = ctl(bus, "failover", "t")
    if rc == 0:
        fail(f"dirtyrepctl failover succeeded with a VMM that cannot start: {o}")
    if "Address already in use" not in e:
        fail(f"dirtyrepctl failover did not report the VMM's own error: {e!r}")
    st = B.daemon.status()
    log(f"failed activation reported after {time.time() - t0:.2f} s ({e.strip()[:120]}); "
        f"B now {st['role']} {st['state']}: {st['detail']}")
    if st["role"] != "standby" or st["last_committed"] != epoch:
        fail(f"after the failed activation B is {st['role']} with committed {st['last_committed']}, "
             f"expected standby with the replica of epoch {epoch}")
    if B.daemon.vmm_pids():
        fail(f"a VMM still runs after the failed activation: {B.daemon.vmm_pids()}")

    # The operator frees the port and reloads (a reload must not drop the replica either).
    blocker.kill()
    rc, o, e = ctl(bus, "reload")
    if rc != 0:
        fail(f"reload failed: {o} {e}")
    st = B.daemon.status()
    if st["last_committed"] != epoch:
        fail(f"the reload lost the replica: committed {st['last_committed']}, expected {epoch}")

    rc, o, e = ctl(bus, "failover", "t")
    if rc != 0 or "now primary" not in o:
        fail(f"the retried failover failed: {rc} {o} {e}")
    # Answered only once the guest runs: it answers at once (retried only for the client's ARP
    # entry, which the gratuitous ARP updates).
    t0 = time.time()
    v = None
    while v is None and time.time() < t0 + 5 * SLOW:
        v = redis(SVC_IP, "INCR", "f", timeout=1.0)
    if v is None:
        fail("the guest did not answer within 5 s after `dirtyrepctl failover` returned")
    log(f"first INCR {time.time() - t0:.2f} s after the retried failover returned -> {v}")
    if int(v) <= max(acked):
        fail(f"INCR f -> {v} after the failover, but {max(acked)} was acknowledged: a write was lost")
    st = B.daemon.status()
    if st["role"] != "primary":
        fail(f"B is {st['role']} after the failover")


def test_maintenance(tmp, bus):
    A, B = pair(tmp, bus, {"SplitBrainPolicy": "suspend", "FailoverPolicy": "manual"})
    A.daemon.wait(lambda s: s["state"] == "protected", "A protected")
    # The primary's own SplitBrainTimeoutMs= (drtest: 1000 ms, SplitBrainPolicy=suspend).
    split_ms = 1000
    before = B.daemon.status()["last_committed"]

    loop = IncrLoop(tmp, "m")
    time.sleep(1)
    rc, o, e = ctl(bus, "maintenance", "t", "on")
    if rc != 0:
        fail(f"maintenance on failed: {o} {e}")
    st = B.daemon.status()
    if st["state"] != "maintenance":
        fail(f"B's status does not show maintenance: {st}")
    t_on = time.time()
    states = set()
    while time.time() < t_on + 3 * split_ms / 1000 * SLOW:
        states.add(A.daemon.status()["state"])
        time.sleep(0.05)
    vals = loop.stop()
    during = [v for v in vals]
    log(f"A's states during maintenance: {sorted(states)}; {len(vals)} INCRs acknowledged in all")
    if "suspended" in states or "suspending" in states:
        fail(f"the primary suspended while the standby was in maintenance: {states}")
    if "unprotected" not in states:
        fail(f"the primary did not say it runs unprotected: {states}")
    # The guest kept answering after the split-brain timeout would have suspended it.
    late = incr_some("m", 3)
    log(f"INCR m {3 * split_ms} ms into maintenance -> {late}")

    # The maintenance and the replica survive a restart of B's daemon.
    B.daemon.proc.send_signal(signal.SIGTERM)
    if B.daemon.proc.wait(timeout=20 * SLOW) != 0:
        fail("B's daemon did not stop cleanly")
    B.daemon.reap()
    saved = os.path.join(tmp, "b", "t.replica")
    if not os.path.exists(saved):
        fail(f"no replica file {saved} after B stopped")
    log(f"B stopped: replica saved ({os.path.getsize(saved)} bytes, sparse)")
    B.daemon = standby_on_bus(tmp, bus, {"SplitBrainPolicy": "suspend", "FailoverPolicy": "manual"})
    st = B.daemon.status()
    if st["state"] != "maintenance" or st["last_committed"] < before:
        fail(f"after a restart B is not in maintenance with its replica: {st}")
    log(f"B restarted: {st['state']}, replica of epoch {st['last_committed']}: {st['detail']}")
    rc, o, e = ctl(bus, "failover", "t")
    if rc == 0:
        fail("a standby in maintenance (stale replica) was promoted")

    rc, o, e = ctl(bus, "maintenance", "t", "off")
    if rc != 0:
        fail(f"maintenance off failed: {o} {e}")
    A.daemon.wait(lambda s: s["state"] == "protected", "A protected again after maintenance", timeout=60 * SLOW)
    st = B.daemon.wait(lambda s: s["state"] == "protected", "B protected again")
    log(f"maintenance over: B {st['state']} at epoch {st['last_committed']}")
    acked = during + late + incr_some("m")
    kill_primary(A, silent=True)
    # FailoverPolicy=manual (pair()): the operator fails over.
    B.daemon.wait(lambda s: "waiting for promote" in s["detail"], "B to see the primary lost", timeout=30 * SLOW)
    rc, o, e = ctl(bus, "failover", "t")
    if rc != 0:
        fail(f"failover after maintenance failed: {o} {e}")
    check_get("m", max(acked))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["reload-keeps-replica", "failover-retry", "maintenance"])
    a = ap.parse_args()
    if not os.path.exists("/dev/kvm"):
        print("SKIP: no /dev/kvm")
        return 77
    if os.geteuid() != 0 or not all(shutil.which(x) for x in ("redis-cli", "ip", "dbus-daemon")):
        print("SKIP: needs root, iproute2, redis-cli and dbus-daemon")
        return 77
    for k in ("DR_VMM", "DR_DIRTYREPD", "DR_DIRTYREPCTL", "DR_GUEST_KV", "DR_SRCDIR"):
        if k not in ENV:
            print(f"SKIP: {k} not set")
            return 77
    install_sigterm()
    tmp = tempfile.mkdtemp(prefix="dr-operator-")
    try:
        return run_in_namespaces(tmp, lambda: {
            "reload-keeps-replica": test_reload_keeps_replica, "failover-retry": test_failover_retry,
            "maintenance": test_maintenance}[a.mode](tmp, Bus(tmp, "dbus", dirname="bus")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""dirtyrepd end to end on loopback: dirtyrep-vmm with a guest, a primary and
a standby dirtyrepd, real sockets, real KVM.

  test-replication.py consistency --guest dirtier|memtouch --tracking ring|bitmap --cpus N [--epochs N]
  test-replication.py faults      (link cut mid-epoch, flipped bit, stalled link, via a proxy)
  test-replication.py auth        (wrong secret refused, replica untouched)
  test-replication.py badinput    (garbage at one VM's listener; the other VM keeps replicating)
  test-replication.py commit-ack  (kv guest: with the standby's ACKs stalled by a proxy, no reply
                                   reaches the client until the ACK arrives, then it does)

Consistency: at random epochs the primary is frozen right after a seal, and
a CRC32C of every page of its RAM is compared with the same of the
standby's replica once that epoch committed: they must be identical. For
memtouch the replica is also dumped and checked with dirtyrep-memcheck.
Progress is asserted too: pages changed between freezes, memtouch
generations (of the replica) advance on every vCPU, the dirtier's write
counters advance on every vCPU.
Exit 0 pass, 1 fail, 77 skip (no /dev/kvm).
"""
import argparse
import os
import random
import re
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from drtest import Proxy  # noqa: E402
from loopback import (ENV, SLOW, Proc, Vmm, compare_at_freeze, fail, free_port, in_tmp, log, pair,  # noqa: E402
                      stop_clean)


def dirtier_writes(vmm, cpus):
    """The last write counter the dirtier reported on each vCPU ("dirtier: cpu=K pass=P writes=W")."""
    last = {}
    with open(vmm.console, errors="replace") as f:
        # " rate=": whole lines only (a number still being written would read smaller).
        for m in re.finditer(r"^dirtier: cpu=(\d+) pass=\d+ writes=(\d+) rate=", f.read(), re.M):
            last[int(m.group(1))] = int(m.group(2))
    if sorted(last) != list(range(cpus)):
        fail(f"dirtier progress lines for vCPUs {sorted(last)}, expected 0..{cpus - 1}")
    return [last[c] for c in range(cpus)]


def test_consistency(tmp, a):
    append = "ws=32M pattern=random rate=25000 report_ms=500" if a.guest == "dirtier" else "ws=16M report_ms=500"
    vmm = Vmm(tmp, a.guest, a.tracking, a.cpus, append)
    primary, standby = pair(tmp, vmm, a.tracking)
    primary.wait(lambda s: s["state"] == "protected", "the primary to be protected", timeout=90)
    rng = random.Random(a.seed)
    checks = sorted(rng.sample(range(20, a.epochs), 4))
    log(f"checking at epochs ~{checks} of {a.epochs}")
    # Progress: a VM that never ran again after the first freeze would pass the comparisons.
    # Between consecutive freezes the primary's RAM must have changed; memtouch's generations
    # (from the replica) must never go back and must advance on every vCPU from the first check
    # to the last; the dirtier's per-vCPU write counters (its console) likewise.
    prev_hash, prev_gens, first_gens, writes = None, None, None, []
    for k, target in enumerate(checks):
        primary.wait(lambda s: s["last_committed"] >= target, f"epoch {target}", timeout=a.epochs * 0.2 + 60)
        e, h, gens = compare_at_freeze(tmp, primary, standby, a.guest, k)
        if prev_hash is not None:
            changed = sum(1 for i in range(0, len(h), 4) if h[i:i + 4] != prev_hash[i:i + 4])
            log(f"epoch {e}: {changed} pages changed since the previous check")
            if changed == 0:
                fail(f"epoch {e}: no page of the primary changed since the previous check: the VM did not run")
        prev_hash = h
        if gens is not None:
            if len(gens) != a.cpus:
                fail(f"epoch {e}: memtouch generations for {len(gens)} vCPU(s), expected {a.cpus}: {gens}")
            if prev_gens and any(g < q for g, q in zip(gens, prev_gens)):
                fail(f"epoch {e}: memtouch generations went back: {prev_gens} -> {gens}")
            first_gens = first_gens or gens
            prev_gens = gens
        if a.guest == "dirtier":
            writes.append(dirtier_writes(vmm, a.cpus))
    if first_gens and not all(g > q for g, q in zip(prev_gens, first_gens)):
        fail(f"memtouch generations did not advance on every vCPU between the first and last check: "
             f"{first_gens} -> {prev_gens}")
    st = primary.wait(lambda s: s["last_committed"] >= a.epochs, f"{a.epochs} epochs", timeout=a.epochs * 0.2 + 60)
    if a.guest == "dirtier":
        writes.append(dirtier_writes(vmm, a.cpus))
        if not all(writes[-1][c] > writes[0][c] for c in range(a.cpus)):
            fail(f"the dirtier's write counters did not advance on every vCPU: {writes[0]} -> {writes[-1]}")
        log(f"dirtier writes per vCPU: {writes[0]} at the first check, {writes[-1]} at the end")
    if first_gens:
        log(f"memtouch generations: {first_gens} at the first check, {prev_gens} at the last")
    log(f"primary: {st}")
    log(f"standby: {standby.status()}")
    stop_clean(primary, standby, vmm)
    log(f"PASS: {a.guest}, {a.tracking}, {a.cpus} vCPU(s), {st['last_committed']} epochs, "
        f"pause p50 {st['pause_ns_p50'] / 1e6:.2f} ms p99 {st['pause_ns_p99'] / 1e6:.2f} ms")


def ack_stall_round(tmp, output_commit, rounds):
    """The kv guest behind a primary and a standby whose link runs through a proxy. Per round:
    a PING is answered with output flowing; then only the standby-to-primary direction (ACKs,
    heartbeats) is stalled, a PING is sent, and the standby is let commit the epoch the reply
    was produced in. Returns, per round, whether a reply reached the client during the stall
    and the seconds from the end of the stall to the reply."""
    os.makedirs(tmp, exist_ok=True)
    vmm = Vmm(tmp, "kv", "ring", 1, "", extra=["--service-listen", "127.0.0.1:0"])
    svc = vmm.service_port()
    end = time.time() + 60
    while not re.search(r"^kv: ready", open(vmm.console, errors="replace").read() if os.path.exists(vmm.console)
                        else "", re.M):
        if time.time() > end or vmm.proc.poll() is not None:
            fail(f"the kv guest did not print 'kv: ready' (VMM {'exited' if vmm.proc.poll() is not None else 'runs'})")
        time.sleep(0.05)
    sport = free_port()
    proxy = Proxy(sport)
    # Heartbeats of 100 ms, 100 misses: a stall of a few seconds is no loss of the standby (a
    # loss would change the question), and 64 epochs of 100 ms may be sealed while ACKs wait.
    primary, standby = pair(tmp, vmm, "ring", epoch_ms=100, peer_port=proxy.port, listen_port=sport,
                            heartbeat=(100, 100),
                            primary_keys={"MaxInflightEpochs": "64",
                                          "OutputCommit": "yes" if output_commit else "no"})
    primary.wait(lambda s: s["state"] == "protected" and s["last_committed"] >= 5, "5 acknowledged epochs",
                 timeout=90)
    c = socket.create_connection(("127.0.0.1", svc), timeout=30)
    results = []
    for r in range(rounds):
        c.settimeout(20 * SLOW)
        c.sendall(b"*1\r\n$4\r\nPING\r\n")
        got = b""
        while len(got) < 7:
            chunk = c.recv(64)
            if not chunk:
                fail("the kv guest closed the connection")
            got += chunk
        if got != b"+PONG\r\n":
            fail(f"round {r}: PING answered {got!r} with the link flowing")
        time.sleep(0.3)
        proxy.back = "stall"
        time.sleep(0.3)  # let ACKs already in the proxy's hands reach the primary
        acked = primary.status()["last_committed"]
        c.sendall(b"*1\r\n$4\r\nPING\r\n")
        t_send = time.monotonic()
        # The guest answers within milliseconds; 1 s later the reply was produced in an epoch
        # no later than the one running then, last_sealed + 1.
        time.sleep(1.0)
        reply_epoch = primary.status()["last_sealed"] + 1
        st = standby.wait(lambda s: s["last_committed"] >= reply_epoch, f"the standby to commit epoch {reply_epoch}",
                          timeout=5)
        pst = primary.status()
        # Hold on for 2 s in all, then look at what reached the client.
        time.sleep(max(0.0, t_send + 2.0 - time.monotonic()))
        c.settimeout(0)
        try:
            during = c.recv(64)
        except BlockingIOError:
            during = b""
        pst2 = primary.status()
        if pst2["last_committed"] != acked:
            fail(f"round {r}: the primary saw ACKs during the stall: last acknowledged {acked} -> "
                 f"{pst2['last_committed']} (is the proxy stalling the standby's direction?)")
        if pst2["state"] != "protected" or not pst2["link_up"]:
            fail(f"round {r}: the stall was taken for a loss: {pst2}")
        log(f"round {r}: ACKs stalled at epoch {acked}; reply produced by epoch {reply_epoch}, committed by the "
            f"standby (its last {st['last_committed']}), primary sealed {pst['last_sealed']}; "
            f"reached the client during the stall: {during!r}")
        proxy.back = "pass"
        t_pass = time.monotonic()
        c.settimeout(20 * SLOW)
        got = during
        while len(got) < 7:
            chunk = c.recv(64)
            if not chunk:
                fail("the kv guest closed the connection")
            got += chunk
        delay = time.monotonic() - t_pass
        if got != b"+PONG\r\n":
            fail(f"round {r}: PING answered {got!r}")
        # The ACKs held back arrive together; the reply left with the first one covering its epoch.
        after = primary.wait(lambda s: s["last_committed"] >= reply_epoch, f"the ACK of epoch {reply_epoch}",
                             timeout=10)["last_committed"]
        log(f"round {r}: reply {delay * 1000:.1f} ms after the ACK direction flowed again; "
            f"primary acknowledged up to {after}")
        results.append((bool(during), delay))
    c.close()
    stop_clean(primary, standby, vmm)
    proxy.stop = True
    proxy.ls.close()
    return results


def test_commit_ack(tmp, a):
    """Output commit at the ACK, deterministically: with only the standby's ACKs held back
    (the primary still seals and ships, the standby commits), no reply reaches the client;
    once the ACKs flow, it does. The same procedure with OutputCommit=no must see the reply
    during the stall (it proves the check can fail)."""
    if "DR_GUEST_KV" not in ENV:
        fail("DR_GUEST_KV not set")
    res = ack_stall_round(os.path.join(tmp, "commit"), True, 3)
    leaked = [r for r, (during, _) in enumerate(res) if during]
    if leaked:
        fail(f"a reply reached the client before its epoch's ACK arrived (rounds {leaked})")
    neg = ack_stall_round(os.path.join(tmp, "nocommit"), False, 1)
    if not neg[0][0]:
        fail("with OutputCommit=no the reply did not reach the client during the ACK stall either: "
             "the test cannot tell held from released output")
    log(f"PASS: in {len(res)} rounds no reply left before its ACK (each reached the client "
        f"{', '.join(f'{d * 1000:.0f}' for _, d in res)} ms after the ACKs flowed again); with "
        f"OutputCommit=no it came during the stall")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def test_faults(tmp, a):
    vmm = Vmm(tmp, "dirtier", "ring", 1, "ws=32M pattern=random rate=25000 report_ms=500")
    sport = free_port()
    proxy = Proxy(sport)
    primary, standby = pair(tmp, vmm, "ring", peer_port=proxy.port, listen_port=sport)
    primary.wait(lambda s: s["state"] == "protected", "the primary to be protected", timeout=90)
    k = 0
    for fault in ("cut", "flip", "cut"):
        before = standby.status()["last_committed"]
        primary.wait(lambda s: s["last_committed"] >= before + 20, "20 more epochs")
        syncs = primary.status()
        syncs = syncs["full_syncs"] + syncs["incremental_syncs"]
        crc_lines = standby.text().count("CRC")
        if fault == "cut":
            proxy.cut()
        else:
            proxy.mode = "flip"
        # The link drops and the pair resyncs by itself (a new full or incremental
        # sync), then commits again.
        st = primary.wait(lambda s: s["full_syncs"] + s["incremental_syncs"] > syncs, f"a resync after {fault}",
                          timeout=30)
        log(f"{fault}: resynced ({st['full_syncs']} full, {st['incremental_syncs']} incremental so far)")
        if fault == "flip" and standby.text().count("CRC") <= crc_lines and primary.text().count("CRC") == 0:
            fail("the flipped bit was not reported as a CRC mismatch")
        after = standby.status()["last_committed"]
        primary.wait(lambda s: s["state"] == "protected" and s["last_committed"] >= after + 10,
                     f"recovery after {fault}", timeout=60)
        compare_at_freeze(tmp, primary, standby, "dirtier", k)
        k += 1
        log(f"PASS: {fault}: replica consistent after resync")
    # Stalled link: epochs stretch, primary memory stays bounded.
    rss0 = rss_kib(primary.proc.pid)
    sealed0 = primary.status()["last_sealed"]
    proxy.mode = "stall"
    time.sleep(4)
    st = primary.status()
    rss1 = rss_kib(primary.proc.pid)
    proxy.mode = "pass"
    log(f"stall: sealed {sealed0} -> {st['last_sealed']} in 4 s, in flight {st['inflight']}, "
        f"primary RSS {rss0} -> {rss1} KiB")
    if st["last_sealed"] - sealed0 > 200 * 0.5:
        fail("epochs did not stretch while the link was stalled")
    if rss1 - rss0 > 128 * 1024:
        fail(f"primary memory grew by {(rss1 - rss0) // 1024} MiB during the stall")
    for p in (primary, standby, vmm):
        p.stop()
    log("PASS: faults")


def freeze_thread(tid, seconds, primary):
    """Freezes one thread with the cgroup v1 freezer for `seconds`; returns the primary's status
    taken just before the thaw."""
    cg = os.path.join("/sys/fs/cgroup/freezer", f"dr-test-{os.getpid()}")
    os.mkdir(cg)
    try:
        with open(os.path.join(cg, "tasks"), "w") as f:
            f.write(tid)
        with open(os.path.join(cg, "freezer.state"), "w") as f:
            f.write("FROZEN")
        time.sleep(seconds)
        return primary.status()
    finally:
        with open(os.path.join(cg, "freezer.state"), "w") as f:
            f.write("THAWED")
        try:
            with open(os.path.join("/sys/fs/cgroup/freezer", "tasks"), "w") as f:
                f.write(tid)
        except OSError:
            pass
        os.rmdir(cg)


def test_pause_timeout(tmp, a):
    """A vCPU the host does not run for longer than the 2 s PAUSE timeout (frozen
    here with the cgroup v1 freezer, thread by thread) postpones the seal; the VM is
    resumed in the same epoch, and protection goes on once the vCPU runs again."""
    freezer_root = "/sys/fs/cgroup/freezer"
    if not os.path.isdir(freezer_root):
        log("SKIP: no cgroup v1 freezer at /sys/fs/cgroup/freezer")
        sys.exit(77)
    vmm = Vmm(tmp, "dirtier", "ring", 1, "ws=16M pattern=random rate=25000 report_ms=500")
    primary, standby = pair(tmp, vmm, "ring")
    primary.wait(lambda s: s["state"] == "protected", "the primary to be protected", timeout=90)
    tids = [t for t in os.listdir(f"/proc/{vmm.proc.pid}/task")
            if open(f"/proc/{vmm.proc.pid}/task/{t}/comm").read().strip() == "vcpu0"]
    if len(tids) != 1:
        fail(f"no thread named vcpu0 in the VMM (pid {vmm.proc.pid})")
    # The freezer stops the thread where it next reaches a freezable point. Most often that is the
    # return from KVM_RUN: the vCPU counts as running, and a PAUSE times out. But a PAUSE's kick
    # may win the race: the thread leaves KVM_RUN, parks for that pause, and freezes there; it
    # then counts as parked (it runs no guest code), so the VM pauses at once and seals go on.
    # That is right too, but not the case under test: thaw and freeze again.
    for attempt in range(1, 6):
        timeouts = primary.text().count("PAUSE timed out")
        before = primary.status()["last_committed"]
        frozen_st = freeze_thread(tids[0], 4.5, primary)  # two PAUSE timeouts of 2 s each
        if primary.text().count("PAUSE timed out") > timeouts:
            break
        if frozen_st["last_committed"] < before + 20:
            fail(f"no PAUSE timeout, and only {frozen_st['last_committed'] - before} epochs committed, "
                 f"while vcpu0 was frozen: {frozen_st}")
        log(f"attempt {attempt}: vcpu0 froze while parked ({frozen_st['last_committed'] - before} epochs "
            f"sealed meanwhile, as they should be); freezing again")
        time.sleep(0.5)
    else:
        fail("the primary did not report a PAUSE timeout while vcpu0 was frozen (5 attempts)")
    if frozen_st["state"] == "failed":
        fail(f"a PAUSE timeout ended protection: {frozen_st}")
    target = max(before, frozen_st["last_committed"]) + 50
    st = primary.wait(lambda s: s["last_committed"] >= target, f"epoch {target} after the thaw", timeout=60)
    log(f"after the thaw: {st['state']}, epoch {st['last_committed']} (was {before} before the freeze)")
    compare_at_freeze(tmp, primary, standby, "dirtier", 0)
    stop_clean(primary, standby, vmm)
    log("PASS: PAUSE timeouts postponed the seal; protection and consistency held")


def test_auth(tmp, a):
    vmm = Vmm(tmp, "dirtier", "ring", 1, "ws=8M rate=5000")
    primary, standby = pair(tmp, vmm, "ring", secret_p=b"not-the-same-secret-at-all\n")
    time.sleep(3)
    st, pt = standby.status(), primary.status()
    if st["last_committed"] != 0 or st["state"] == "protected":
        fail(f"the standby accepted epochs from a primary with the wrong secret: {st}")
    text = primary.text() + standby.text()
    if "secret" not in text.lower():
        fail("no log line says the shared secret is wrong")
    log(f"primary: {pt['state']} ({pt['detail']}); standby: {st['state']}")
    for p in (primary, standby, vmm):
        p.stop()
    log("PASS: a wrong secret is refused with a clear log line; nothing applied")


def test_badinput(tmp, a):
    vmm = Vmm(tmp, "dirtier", "ring", 1, "ws=8M rate=5000 report_ms=500")
    other_port = free_port()
    primary, standby = pair(tmp, vmm, "ring",
                            extra_standby={"u": {"Role": "standby", "Listen": f"127.0.0.1:{other_port}"}})
    primary.wait(lambda s: s["state"] == "protected", "the primary to be protected", timeout=90)
    garbage = [b"\x00" * 64, b"DRPF" + b"\xff" * 60, os.urandom(4096), b"GET / HTTP/1.0\r\n\r\n"]
    for g in garbage:
        s = socket.create_connection(("127.0.0.1", other_port))
        s.sendall(g)
        s.settimeout(5)
        try:
            s.recv(1024)
        except OSError:
            pass
        s.close()
    before = standby.status("t")["last_committed"]
    standby.wait(lambda s: s["last_committed"] >= before + 20, "VM t to keep committing", vm="t")
    if standby.proc.poll() is not None:
        fail("the standby daemon died on garbage input")
    for p in (primary, standby, vmm):
        p.stop()
    log("PASS: garbage at one VM's listener; the other VM kept replicating")


def test_images(tmp, a):
    """Checkpoint images taken by the primary at its seals (issue 6): a full image and
    three incrementals of a replicated memtouch guest, each a consistent snapshot
    (memcheck), the chain verified, the last one restored by dirtyrep-vmm and the
    guest continuing; a wrong parent and a first incremental are refused."""
    for k in ("DR_IMAGECTL", "DR_IMAGER", "DR_MEMCHECK", "DR_GUEST_MEMTOUCH"):
        if k not in ENV:
            fail(f"{k} not set")
    vmm = Vmm(tmp, "memtouch", "ring", 2, "ws=16M report_ms=200")
    primary, standby = pair(tmp, vmm, "ring")
    primary.wait(lambda s: s["state"] == "protected", "protected", timeout=120)
    imgs = os.path.join(tmp, "images")
    os.mkdir(imgs)

    def image(name, parent=None, expect_ok=True):
        args = f"image t {os.path.join(imgs, name)}" + (f" {os.path.join(imgs, parent)}" if parent else "")
        r = primary.req_settled(args, timeout=120, connected=True)
        if expect_ok != r.startswith("ok"):
            fail(f"'{args}' answered {r.strip()!r}")
        if not expect_ok:
            return r
        f = dict(kv.split("=") for kv in r.split()[2:])
        res = {"epoch": int(r.split()[1]), **{k: int(v) for k, v in f.items()}}
        log(f"{name}: {res}")
        return res

    r = image("inc-first", "nothing", expect_ok=False)
    if "full one first" not in r:
        fail(f"an incremental image before any full one: {r.strip()!r}")
    st = [image("img0")]
    for i in (1, 2, 3):
        time.sleep(0.4)
        st.append(image(f"img{i}", f"img{i - 1}"))
    if not all(st[i]["epoch"] > st[i - 1]["epoch"] for i in (1, 2, 3)):
        fail(f"image epochs do not grow: {[s['epoch'] for s in st]}")
    if not all(st[i]["pages"] < st[0]["pages"] for i in (1, 2, 3)):
        fail(f"incremental images are not smaller than the full one: {[s['pages'] for s in st]}")
    log("seal pause per image (ms):", [round(s["pause_ns"] / 1e6, 3) for s in st])
    r = image("img-wrong", "img1", expect_ok=False)
    if "error" not in r:
        fail("an incremental image on a parent that is not the last image was accepted")
    if os.path.exists(os.path.join(imgs, "img-wrong")):
        fail("a refused image left a directory behind")

    c = subprocess.run([ENV["DR_IMAGECTL"], "image", "verify", os.path.join(imgs, "img3")], capture_output=True,
                       text=True)
    if c.returncode != 0 or "4 image(s)" not in c.stdout:
        fail(f"image verify of the chain: {c.returncode} {c.stdout} {c.stderr}")
    prev = None
    for i in range(4):
        ram = os.path.join(tmp, f"ram{i}")
        subprocess.run([ENV["DR_IMAGER"], "materialize", os.path.join(imgs, f"img{i}"), ram], check=True,
                       capture_output=True)
        c = subprocess.run([ENV["DR_MEMCHECK"], ram], capture_output=True, text=True)
        if c.returncode != 0:
            fail(f"memtouch checker failed on img{i}: {c.stdout} {c.stderr}")
        gens = [int(g) for g in re.search(r"gens=([\d,]+)", c.stdout).group(1).split(",")]
        if prev and (any(g < q for g, q in zip(gens, prev)) or gens == prev):
            fail(f"img{i}: generations {prev} -> {gens} do not move forward")
        prev = gens
        os.unlink(ram)
    for p in (primary, standby, vmm):
        p.stop()  # SIGTERM: a clean exit, checked for leaks in a sanitized build

    con = os.path.join(tmp, "restored.log")
    r = Proc(tmp, "restored", [ENV["DR_VMM"], "--name", "t", "--restore-image", os.path.join(imgs, "img3"),
                               "--control", os.path.join(tmp, "restored.sock"), "--console", con])
    end = time.time() + 30
    found = []
    while time.time() < end and len(found) < 2:
        try:
            found = re.findall(r"^memtouch: cpu=0 gen=(\d+)\n", open(con, errors="replace").read(), re.M)
        except FileNotFoundError:
            pass
        time.sleep(0.1)
    if len(found) < 2 or int(found[-1]) <= prev[0]:
        fail(f"the VM restored from img3 did not continue past generation {prev[0]}: {found}\n{r.text()[-2000:]}")
    r.stop()
    log(f"PASS: 1 full + 3 incremental images at seals, chain verified, memcheck ok, restored guest went "
        f"from generation {prev[0]} to {found[-1]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("test", choices=["consistency", "faults", "auth", "badinput", "images", "pause-timeout",
                                     "commit-ack"])
    ap.add_argument("--guest", default="dirtier")
    ap.add_argument("--tracking", default="ring")
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=500)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    a = ap.parse_args()
    if not os.path.exists("/dev/kvm"):
        print("SKIP: /dev/kvm missing")
        return 77
    for k in ("DR_VMM", "DR_DIRTYREPD", "DR_GUEST_DIRTIER"):
        if k not in ENV:
            fail(f"{k} not set")
    log(f"seed {a.seed}")
    return in_tmp("dr-repl-", {"consistency": test_consistency, "faults": test_faults, "auth": test_auth,
                               "pause-timeout": test_pause_timeout, "badinput": test_badinput, "images": test_images,
                               "commit-ack": test_commit_ack}[a.test], a)


if __name__ == "__main__":
    sys.exit(main())

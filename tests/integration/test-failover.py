#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Failover and output commit end to end, in network namespaces.

Three "hosts" (network namespaces A, B and a client C) and a switch
namespace S with two bridges: the service network (10.77.0.0/24, where the
service address 10.77.0.100 lives) and the replication network
(10.78.0.0/24). Every namespace, veth and bridge is created here and removed
at the end, also on failure; names carry this process's PID.

Each host runs dirtyrepd; the VM is the kv guest (RESP on COM2, bridged to
TCP port 6379 by dirtyrep-vmm through the output-commit queue). The fence
command "powers off" the other host by shutting its switch ports.

  test-failover.py kill [--trials N] [--epoch-ms MS]
      N trials: the client in C runs redis-cli INCR against the service
      address and records every acknowledged value; at a random moment the
      primary host dies (its dirtyrepd and VMM SIGKILLed at once, as one
      process group); the standby detects it, fences, starts the VM on its
      replica and takes the address; the client reconnects, and GET must be
      >= the last acknowledged value. The old host then rejoins as standby
      (full resync) and the next trial kills the other side, so every trial
      after the first is also a fail back. At the end, two page-hash checks
      of primary RAM against the replica in steady state (20 epochs and more
      after the last resync, INCRs before each, the RAM must have changed
      between them, no resync in between).
  test-failover.py nocommit [--trials N]
      The same with OutputCommit=no on both hosts: at least one trial must
      lose an acknowledged write (the test detects it), or the check above
      could not fail.
  test-failover.py standby-loss
      The standby is killed: the primary keeps running under
      SplitBrainPolicy=continue (status "unprotected", output flows), and a
      restarted standby resyncs (status "protected" again); then with
      SplitBrainPolicy=suspend the status says "suspended" and the guest
      answers nobody until the standby is back.
  test-failover.py manual
      FailoverPolicy=manual: the lost primary is only reported; the debug
      socket's "promote t" runs the fence command, which fails here, so the
      standby stays one; "promote t force" starts the VM; "demote t" stops it,
      gives up the service address and listens as standby again.
  test-failover.py vmm-death
      A primary dirtyrepd stopped with SIGTERM: the standby does not fail over
      (the VM still runs there). Then only the primary's VMM is SIGKILLed: its
      dirtyrepd reports the VM gone and the standby fails over (no
      acknowledged write lost).
  test-failover.py split-brain
      Only the replication network is cut, both hosts stay up, fencing
      "succeeds" without doing anything (/bin/true): the standby promotes,
      the old primary holds its output and suspends. A client talking to
      each host directly must never get answers from both after the cut.
  test-failover.py stop-suspended
      The split brain continued: the suspended old primary's dirtyrepd is
      stopped with SIGTERM, restarted (it must come back "suspended": the VMM
      keeps the suspension), SIGKILLed and restarted again; its VM must never
      answer a client. Then the operator's way out (`resume t`, as dirtyrepctl
      resume does over D-Bus): it answers, so the silence before was real.
  test-failover.py restart-inflight
      The standby is SIGSTOPped (no ACKs), the primary dirtyrepd is stopped with
      SIGTERM with epochs in flight and restarted; its replication link then
      trickles through a slow proxy, and the primary host dies during the full
      sync. The standby fails over from its replica of the old session: no
      acknowledged INCR may be lost, and none may be acknowledged after the stop.

Exit 0 pass, 1 fail, 77 skip (no /dev/kvm, not root, no redis-cli).
"""
import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from drtest import *  # noqa: E402,F401,F403


def test_kill(tmp, a, nocommit=False):
    extra = {"OutputCommit": "no"} if nocommit else None
    A, B = setup_pair(tmp, extra)
    P, S = A, B
    losses = 0
    times = []
    # With output commit off a loss is a race the kill must win (it lands between a
    # reply and its epoch's commit); on a slow or loaded host that takes more trials,
    # so the negative control goes on until it has seen one, up to 4 times as many.
    limit = a.trials * 4 if nocommit else a.trials
    k = 0
    while k < limit and not (nocommit and losses > 0 and k >= a.trials):
        key = f"k{k}"
        t = time.time()
        losses += failover_trial(tmp, k, P, S, key, check=not nocommit)
        times.append(time.time() - t)
        k += 1
        if not nocommit or (k < limit and not (losses > 0 and k >= a.trials)):
            rejoin(tmp, P, S, extra)
        P, S = S, P
    if nocommit:
        log(f"OutputCommit=no: {losses} of {k} trials lost acknowledged writes")
        if losses == 0:
            fail("with output commit off no trial lost an acknowledged write: the check cannot fail")
        return
    log(f"{a.trials} failovers, no acknowledged write lost; trial time mean {sum(times) / len(times):.2f} s")
    # P is the primary now, S its standby (rejoined): the replica must be exact.
    page_hash_check(tmp, P, S)


def test_standby_loss(tmp, a):
    A, B = setup_pair(tmp, {"SplitBrainPolicy": "continue", "SplitBrainTimeoutMs": "500"})
    if redis(SVC_IP, "SET", "x", "1") != "OK":
        fail("SET x 1 failed while protected")
    B.daemon.kill()
    st = A.daemon.wait(lambda s: s["state"] == "unprotected", "primary unprotected after losing the standby",
                       timeout=10)
    log(f"standby killed: primary says {st['state']}: {st['detail']}")
    if redis(SVC_IP, "INCR", "x", timeout=2) != "2":
        fail("the unprotected primary did not answer INCR")
    B.daemon = Daemon(tmp, "b", "standby", {"SplitBrainPolicy": "continue", "SplitBrainTimeoutMs": "500"})
    st = A.daemon.wait(lambda s: s["state"] == "protected", "protected again after the standby restarted")
    log(f"standby restarted: primary {st['state']}, standby full syncs {B.daemon.status()['full_syncs']}")
    if redis(SVC_IP, "INCR", "x", timeout=2) != "3":
        fail("INCR after the resync did not answer 3")

    # Policy suspend: the same loss suspends the VM; nothing answers until the standby is back.
    # The standby first: it would fail over (and fence A) when A's daemon died.
    for p in (B.daemon, A.daemon, A.vmm):
        p.kill()
    A, B = setup_pair(tmp, {"SplitBrainPolicy": "suspend", "SplitBrainTimeoutMs": "500"})
    if redis(SVC_IP, "SET", "y", "1") != "OK":
        fail("SET y 1 failed while protected")
    B.daemon.kill()
    st = A.daemon.wait(lambda s: s["state"] == "suspended", "primary suspended after losing the standby",
                       timeout=10)
    log(f"standby killed: primary says {st['state']}: {st['detail']}")
    if redis(SVC_IP, "INCR", "y", timeout=2) is not None:
        fail("the suspended primary answered INCR")
    B.daemon = Daemon(tmp, "b", "standby", {"SplitBrainPolicy": "suspend", "SplitBrainTimeoutMs": "500"})
    A.daemon.wait(lambda s: s["state"] == "protected", "protected again after the standby restarted")
    v = redis(SVC_IP, "GET", "y", timeout=3)
    if v not in ("1", "2"):
        fail(f"GET y after resuming answered {v!r}")
    log(f"standby restarted: primary protected again, GET y -> {v}")


def test_split_brain(tmp, a):
    extra = {"FenceCommand": "/bin/true", "SplitBrainPolicy": "suspend", "SplitBrainTimeoutMs": "1000"}
    A, B = setup_pair(tmp, extra)
    if redis(HOST_IP["a"], "SET", "z", "0") != "OK":
        fail("SET z failed")
    # Only the replication network is cut; both hosts and the service network stay up.
    run("ip", "-n", NS["s"], "link", "set", "ra", "down")
    t_cut = time.time()
    answers = {"a": [], "b": []}
    end = t_cut + 6
    while time.time() < end:
        for h in ("a", "b"):
            v = redis(HOST_IP[h], "INCR", "z", timeout=0.3)
            if v is not None:
                answers[h].append((round(time.time() - t_cut, 2), v))
    sa, sb = A.daemon.status(), B.daemon.status()
    log(f"after the cut: A {sa['role']}/{sa['state']}, B {sb['role']}/{sb['state']}")
    log(f"answers from A after the cut: {answers['a'][:5]}; from B: {len(answers['b'])}, first {answers['b'][:3]}")
    if sb["role"] != "primary":
        fail("the standby did not promote after the replication link was cut")
    if sa["state"] != "suspended":
        fail(f"the old primary is {sa['state']}, expected suspended")
    if answers["a"] and answers["b"]:
        fail("both sides released output after the replication link was cut: split brain")
    if not answers["b"]:
        fail("the promoted standby never answered")


def answers_from(host, key, seconds):
    """INCR key at host's own address (its VMM directly, not the service address) for
    `seconds`; the replies it got."""
    got = []
    end = time.time() + seconds
    while time.time() < end:
        v = redis(HOST_IP[host], "INCR", key, timeout=0.3)
        if v is not None:
            got.append(v)
    return got


def test_stop_suspended(tmp, a):
    extra = {"FenceCommand": "/bin/true", "SplitBrainPolicy": "suspend", "SplitBrainTimeoutMs": "1000"}
    A, B = setup_pair(tmp, extra)
    if redis(HOST_IP["a"], "SET", "z", "0") != "OK":
        fail("SET z failed")
    run("ip", "-n", NS["s"], "link", "set", "ra", "down")
    B.daemon.wait(lambda s: s["role"] == "primary", "the standby to promote after the cut", timeout=20)
    A.daemon.wait(lambda s: s["state"] == "suspended", "the old primary to suspend", timeout=20)
    if not answers_from("b", "z", 1.0):
        fail("the promoted host never answered (the client cannot see answers at all?)")
    got = answers_from("a", "z", 1.0)
    if got:
        fail(f"the suspended old primary answered before any stop: {got[:5]}")

    # 1. systemctl stop / restart: SIGTERM. Nothing may answer while it stops or after.
    t0 = time.time()
    A.daemon.proc.send_signal(signal.SIGTERM)
    got = []
    while A.daemon.alive() and time.time() < t0 + 15 * SLOW:
        got += answers_from("a", "z", 0.3)
    if A.daemon.alive():
        fail("the suspended primary's dirtyrepd did not stop within 15 s of SIGTERM")
    rc = A.daemon.proc.returncode
    A.daemon.reap()
    stop_s = time.time() - t0
    got += answers_from("a", "z", 3.0)
    log(f"SIGTERM of the suspended primary's dirtyrepd: exit {rc} after {stop_s:.2f} s; answers from A: {got}")
    if rc != 0:
        fail(f"dirtyrepd-a exited with {rc} on SIGTERM")
    if got:
        fail(f"the old primary answered after its dirtyrepd stopped: {got[:5]}: split brain")
    if not A.vmm.alive():
        fail("the VMM of the old primary died with its dirtyrepd")
    if "stays SUSPENDED" not in A.vmm.text():
        fail("the agent did not say that the VM stays suspended when its client left")

    # 2. The restart: the daemon learns from the VMM that the VM is suspended.
    A.daemon = Daemon(tmp, "a", "primary", extra)
    st = A.daemon.wait(lambda s: s["state"] == "suspended", "the restarted primary to come back suspended",
                       timeout=20)
    log(f"restarted: A {st['state']}: {st['detail']}")
    got = answers_from("a", "z", 3.0)
    if got:
        fail(f"the old primary answered after its dirtyrepd restarted: {got[:5]}: split brain")
    if SVC_IP in run("ip", "-n", NS["a"], "-4", "addr", "show", "dev", "eth0").stdout:
        fail("the restarted, suspended old primary took the service address (the promoted host has it)")

    # 3. A crash of the restarted daemon (SIGKILL): the agent keeps the VM paused.
    A.daemon.kill()
    got = answers_from("a", "z", 2.0)
    if got:
        fail(f"the old primary answered after its dirtyrepd was killed: {got[:5]}: split brain")
    A.daemon = Daemon(tmp, "a", "primary", extra)
    A.daemon.wait(lambda s: s["state"] == "suspended", "the primary to come back suspended again", timeout=20)
    got = answers_from("a", "z", 1.0)
    if got:
        fail(f"the old primary answered after a second restart: {got[:5]}")
    sb = B.daemon.status()
    if sb["role"] != "primary":
        fail(f"B is {sb['role']}/{sb['state']}, expected the promoted primary")

    # 4. The operator's way out (dirtyrepctl resume t calls the same): the VM answers
    # again, so the silence above was the suspension, not a client that cannot get through.
    r = A.daemon.req("resume t")
    if not r.startswith("ok"):
        fail(f"'resume t' answered {r.strip()!r}")
    st = A.daemon.wait(lambda s: s["state"] == "unprotected", "the operator's resume")
    end = time.time() + 5
    while SVC_IP not in run("ip", "-n", NS["a"], "-4", "addr", "show", "dev", "eth0").stdout:
        if time.time() > end:
            fail("the resumed primary did not take its service address")
        time.sleep(0.05)
    got = answers_from("a", "z", 5.0)
    log(f"operator resume: A {st['state']}: {st['detail']}; answers from A: {got[:3]}...")
    if not got:
        fail("after the operator's resume the old primary never answered: the checks above prove nothing")
    r = A.daemon.req("resume t")
    if not r.startswith("error"):
        fail(f"a second 'resume t' answered {r.strip()!r}, expected a refusal (already unprotected)")


def test_restart_inflight(tmp, a):
    """A restart with unacknowledged epochs in flight, then the host dies during the
    next full sync: the standby fails over from its old replica; every INCR the client
    saw acknowledged must be in it."""
    misses = 60  # 3 s: the standby is SIGSTOPped for about 2.5 s below
    ctl = os.path.join(tmp, "proxy-a.sock")
    start_proxy(tmp, "a", ctl, f"7100:{REPL_IP['b']}:{REPL_PORT}")
    A, B = Host("a"), Host("b")
    ports("a", True)
    ports("b", True)
    A.vmm = start_kv(tmp, "a")
    wait_file(os.path.join(tmp, "a", "console.log"), "kv: ready", A.vmm)
    a_extra = {"Peer": "127.0.0.1:7100"}
    B.daemon = Daemon(tmp, "b", "standby", None, misses)
    A.daemon = Daemon(tmp, "a", "primary", a_extra, misses)
    A.daemon.wait(lambda s: s["state"] == "protected", "primary protected")

    # The client talks to A's VMM directly: the service address leaves with A's dirtyrepd,
    # but a VM whose output were not held would still answer there.
    loop = IncrLoop(tmp, "r", ip=HOST_IP["a"])
    end = time.time() + 20
    while not any(line.strip().isdigit() for line in open(loop.out)):
        if time.time() > end:
            fail("no INCR acknowledged within 20 s")
        time.sleep(0.05)
    time.sleep(random.uniform(0.3, 1.0) * SLOW)

    os.kill(B.daemon.pid, signal.SIGSTOP)  # no more ACKs
    time.sleep(0.3)
    st = A.daemon.status()
    log(f"standby stopped: A sealed {st['last_sealed']}, committed {st['last_committed']}")
    t0 = time.time()
    A.daemon.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with open(loop.out) as f:
        n_at_stop = sum(1 for line in f if line.strip().lstrip("-").isdigit())
    try:
        rc = A.daemon.proc.wait(timeout=15 * SLOW)
    except subprocess.TimeoutExpired:
        os.kill(B.daemon.pid, signal.SIGCONT)
        fail("dirtyrepd-a did not stop within 15 s of SIGTERM")
    stop_s = time.time() - t0
    A.daemon.reap()
    if rc != 0:
        os.kill(B.daemon.pid, signal.SIGCONT)
        fail(f"dirtyrepd-a exited with {rc} on SIGTERM")
    held = "stays held in the VMM" in A.daemon.text()
    proxy_cmd(ctl, "slow")
    os.kill(B.daemon.pid, signal.SIGCONT)
    log(f"primary dirtyrepd stopped in {stop_s:.2f} s with epochs in flight "
        f"({'it says their output stays held' if held else 'NO held-output message'})")
    if not held:
        fail("the stopping primary did not report output held for unacknowledged epochs")
    time.sleep(0.5)
    sb = B.daemon.status()
    if sb["role"] != "standby":
        fail(f"the standby reacted to a clean primary stop with {sb['role']}/{sb['state']}")
    base = sb["last_committed"]

    # The restart (systemctl restart): a new session, a full sync through the slow proxy.
    A.daemon = Daemon(tmp, "a", "primary", a_extra, misses)
    A.daemon.wait(lambda s: s["state"] == "syncing" and s["link_up"], "the restarted primary's full sync",
                  timeout=30)
    time.sleep(0.3)
    sb = B.daemon.status()
    log(f"restarted primary syncing; standby still holds epoch {sb['last_committed']} of the old session")
    if sb["last_committed"] != base:
        fail(f"the standby committed {sb['last_committed']} before the kill: the full sync was not interrupted")
    kill_primary(A, silent=False)
    proxy_cmd(ctl, "cut")
    st = B.daemon.wait(lambda s: s["role"] == "primary" and s["state"] in ("unprotected", "connecting"),
                       "failover", timeout=30)
    acked = loop.stop()
    got = None
    end = time.time() + 15
    while got is None and time.time() < end:
        got = redis(HOST_IP["b"], "GET", "r", timeout=1.0)
    if got is None:
        fail("GET r got no answer from the new primary within 15 s")
    back = acked_regressions(acked)
    after = len(acked) - n_at_stop
    log(f"{len(acked)} INCRs acknowledged, {after} after the stop; B promoted ({st['detail'][:80]}); GET r -> {got}")
    if not acked:
        fail("no INCR was acknowledged")
    if int(got) < max(acked) or back:
        fail(f"GET r = {got}, highest acknowledged INCR {max(acked)}, acknowledged values that went back "
             f"{back[:10]}: acknowledged writes lost")
    if after > 0:
        fail(f"{after} INCR(s) acknowledged after the primary was told to stop, with the standby not "
             f"acknowledging: output released without the standby's commit")


def test_manual(tmp, a):
    """FailoverPolicy=manual: a lost primary is only reported; `promote` fences and
    activates; `demote` stops the VM again and listens as standby."""
    # B's fence command fails: a plain promote is refused, a forced one goes ahead.
    extra = {"FailoverPolicy": "manual"}
    A, B = setup_pair(tmp, extra)
    B.daemon.kill()
    B.daemon = Daemon(tmp, "b", "standby", {"FailoverPolicy": "manual", "FenceCommand": f"{tmp}/fence-fails"})
    A.daemon.wait(lambda s: s["state"] == "protected", "protected by the restarted standby")
    if redis(SVC_IP, "SET", "m", "41") != "OK":
        fail("SET m failed")
    r = B.daemon.req("promote t")
    if not r.startswith("error") or "connected" not in r:
        fail(f"promote with the primary connected answered {r.strip()!r}, expected a refusal")
    kill_primary(A, silent=False)
    st = B.daemon.wait(lambda s: "waiting for promote" in s["detail"], "manual policy to wait")
    time.sleep(0.5)
    st = B.daemon.status()
    if st["role"] != "standby":
        fail(f"FailoverPolicy=manual promoted on its own: {st}")
    log(f"primary killed, manual policy: standby {st['state']}: {st['detail']}")
    B.daemon.ok("promote t")
    st = B.daemon.wait(lambda s: "promotion refused" in s["detail"], "the failing fence to refuse the promotion")
    if st["role"] != "standby" or B.daemon.vmm_pids():
        fail(f"promoted although the fence command failed: {st}")
    if "fence: cannot reach the power switch" not in B.daemon.text():
        fail("the fence command's output was not logged")
    log(f"fence command fails: standby {st['state']}: {st['detail']}")
    e = B.daemon.ok("promote t force")
    st = B.daemon.wait(lambda s: s["role"] == "primary" and s["state"] == "unprotected", "forced promotion")
    v = None
    end = time.time() + 10
    while v is None and time.time() < end:
        v = redis(SVC_IP, "INCR", "m")
    if v != "42":
        fail(f"INCR m after the manual promotion answered {v!r}, expected 42")
    log(f"promote t force -> replica epoch {e}, {st['state']}: {st['detail']}; INCR m -> {v}")
    if B.daemon.vmm_pids() == []:
        fail("no VMM child after the promotion")
    B.daemon.ok("demote t")
    st = B.daemon.wait(lambda s: s["role"] == "standby" and s["state"] == "listening", "demotion")
    if B.daemon.vmm_pids():
        fail(f"the VMM still runs after demote: {B.daemon.vmm_pids()}")
    r = run("ip", "-n", NS["b"], "-4", "addr", "show", "dev", "eth0").stdout
    if SVC_IP in r:
        fail("the service address is still on B after demote")
    log(f"demote t -> standby {st['state']}; VMM stopped, service address removed")
    # A clean stop after all that (under sanitizers: no leak, no error).
    B.daemon.proc.send_signal(signal.SIGTERM)
    try:
        rc = B.daemon.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        fail("dirtyrepd-b did not stop on SIGTERM within 15 s")
    if rc != 0:
        B.daemon.dump()
        fail(f"dirtyrepd-b exited with {rc} on SIGTERM")
    B.daemon.reap()


def test_vmm_death(tmp, a):
    """A primary dirtyrepd stopped cleanly (SIGTERM) leaves its VM running (unprotected):
    the standby must not fail over. Then only the primary's VMM dies; its dirtyrepd
    lives and tells the standby the VM is gone (-EHOSTDOWN), which fails over like a
    lost host."""
    A, B = setup_pair(tmp)
    A.daemon.proc.send_signal(signal.SIGTERM)
    A.daemon.reap()
    time.sleep(1.0)
    st = B.daemon.status()
    log(f"primary dirtyrepd stopped cleanly: standby {st['role']}/{st['state']}: {st['detail']}")
    if st["role"] != "standby" or "primary stopping" not in st["detail"]:
        fail(f"the standby reacted to a clean primary stop with {st}")
    # Not a failure of replication: the primary stopped on purpose (its VM runs on, unprotected).
    if st["state"] != "listening" or "primary stopped replicating" not in st["detail"]:
        fail(f"a standby whose primary stopped cleanly shows {st['state']}: {st['detail']}")
    if redis(SVC_IP, "PING") is not None:
        fail("the service address still answers after the primary dirtyrepd stopped")  # it gives it up
    for p in (B.daemon, A.vmm):
        p.kill()

    A, B = setup_pair(tmp)
    loop = IncrLoop(tmp, "v")
    time.sleep(random.uniform(0.3, 1.0) * SLOW)
    A.vmm.kill()
    st = B.daemon.wait(lambda s: s["role"] == "primary" and s["state"] == "unprotected", "promotion", timeout=20)
    acked = loop.stop()
    if not acked:
        fail("no INCR acknowledged before the VMM died")
    got = None
    end = time.time() + 15
    while got is None and time.time() < end:
        got = redis(SVC_IP, "GET", "v")
    sa = A.daemon.status()
    log(f"VMM of A killed after {len(acked)} INCRs (last {acked[-1]}): A {sa['state']} ({sa['detail'][:80]}); "
        f"B {st['state']}; GET v -> {got}")
    if got is None or int(got) < acked[-1]:
        fail(f"GET v = {got} < {acked[-1]}, the last acknowledged INCR")
    if "VM is gone" not in B.daemon.text():
        fail("the standby did not hear that the primary's VM is gone")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["kill", "nocommit", "standby-loss", "split-brain", "manual", "vmm-death",
                                     "stop-suspended", "restart-inflight"])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    a = ap.parse_args()
    if not os.path.exists("/dev/kvm"):
        print("SKIP: no /dev/kvm")
        return 77
    if os.geteuid() != 0 or not shutil.which("redis-cli") or not shutil.which("ip"):
        print("SKIP: needs root, iproute2 and redis-cli")
        return 77
    for k in ("DR_VMM", "DR_DIRTYREPD", "DR_GUEST_KV"):
        if k not in ENV:
            print(f"SKIP: {k} not set")
            return 77
    seed = int(ENV.get("DR_SEED", str(int(time.time()))))
    random.seed(seed)
    log(f"seed {seed} (DR_SEED= repeats a run)")
    install_sigterm()
    tmp = tempfile.mkdtemp(prefix="dr-failover-")
    rc = 1
    try:
        rc = run_in_namespaces(tmp, lambda: {
            "kill": test_kill, "nocommit": lambda t, x: test_kill(t, x, True),
            "standby-loss": test_standby_loss, "split-brain": test_split_brain,
            "manual": test_manual, "vmm-death": test_vmm_death, "stop-suspended": test_stop_suspended,
            "restart-inflight": test_restart_inflight}[a.mode](tmp, a))
    finally:
        if rc == 0 and not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log("logs kept in", tmp)
    return rc


if __name__ == "__main__":
    sys.exit(main())

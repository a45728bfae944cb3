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
      after the first is also a fail back. At the end, a page-hash check of
      primary RAM against the replica.
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

Exit 0 pass, 1 fail, 77 skip (no /dev/kvm, not root, no redis-cli).
"""
import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ENV = os.environ
# scripts/test sets it for the slower sanitized build: heartbeats, client timeouts and run times stretch.
SLOW = float(ENV.get("DR_TEST_SLOWDOWN", "1"))
TAG = f"dr{os.getpid() % 100000}"
NS = {h: f"{TAG}{h}" for h in ("a", "b", "c", "s")}
SVC_IP = "10.77.0.100"
HOST_IP = {"a": "10.77.0.1", "b": "10.77.0.2", "c": "10.77.0.3"}
REPL_IP = {"a": "10.78.0.1", "b": "10.78.0.2"}
REPL_PORT = 7000
KV_PORT = 6379
SECRET = b"failover-test-secret-0123456789\n"
LIVE = []
GROUPS = []  # process groups of helpers (client loops) to kill at the end
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:7.2f}]", *a, flush=True)


class Fail(Exception):
    pass


def fail(msg):
    raise Fail(msg)


def run(*cmd, check=True, timeout=30):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        fail(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
    return r


def ns_exec(host, *cmd):
    return ["ip", "netns", "exec", NS[host], *cmd]


def install_sigterm():
    """meson's timeout (or anyone) sends SIGTERM: turn it into a failure, so the
    namespaces and processes are still cleaned up."""
    def on_term(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Fail("terminated by SIGTERM")
    signal.signal(signal.SIGTERM, on_term)


# ---- network ------------------------------------------------------------------------------

def net_up():
    for n in NS.values():
        run("ip", "netns", "add", n)
    s = NS["s"]
    for n in NS.values():
        run("ip", "-n", n, "link", "set", "lo", "up")
    for br in ("brsvc", "brrepl"):
        run("ip", "-n", s, "link", "add", br, "type", "bridge")
        run("ip", "-n", s, "link", "set", br, "up")
    for h in ("a", "b", "c"):
        run("ip", "-n", s, "link", "add", f"v{h}", "type", "veth", "peer", "name", "eth0", "netns", NS[h])
        run("ip", "-n", s, "link", "set", f"v{h}", "master", "brsvc", "up")
        run("ip", "-n", NS[h], "addr", "add", f"{HOST_IP[h]}/24", "dev", "eth0")
        run("ip", "-n", NS[h], "link", "set", "eth0", "up")
    for h in ("a", "b"):
        run("ip", "-n", s, "link", "add", f"r{h}", "type", "veth", "peer", "name", "repl", "netns", NS[h])
        run("ip", "-n", s, "link", "set", f"r{h}", "master", "brrepl", "up")
        run("ip", "-n", NS[h], "addr", "add", f"{REPL_IP[h]}/24", "dev", "repl")
        run("ip", "-n", NS[h], "link", "set", "repl", "up")


def net_down():
    # Deleting a namespace deletes its veth ends, their peers and the bridges in it.
    for n in NS.values():
        subprocess.run(["ip", "netns", "del", n], capture_output=True)


def ports(host, up):
    for p in (f"v{host}", f"r{host}"):
        run("ip", "-n", NS["s"], "link", "set", p, "up" if up else "down")


# ---- processes ----------------------------------------------------------------------------

class Proc:
    """A process this test started; only we stop it, by PID (or its own process group)."""

    def __init__(self, tmp, tag, cmd, group=None):
        self.tag = tag
        self.errlog = os.path.join(tmp, f"{tag}.{int((time.time() - T0) * 1000)}.log")
        self.err = open(self.errlog, "w")
        log("+", tag, " ".join(cmd[3:] if cmd[0] == "ip" else cmd)[:200])
        self.proc = subprocess.Popen(cmd, stdout=self.err, stderr=subprocess.STDOUT,
                                     process_group=0 if group is None else group)
        self.pid = self.proc.pid
        LIVE.append(self)

    def text(self):
        with open(self.errlog, errors="replace") as f:
            return f.read()

    def dump(self, n=30):
        log(f"--- {self.tag} (last lines of {self.errlog}) ---\n" + "\n".join(self.text().splitlines()[-n:]))

    def alive(self):
        return self.proc.poll() is None

    def reap(self):
        if self in LIVE:
            LIVE.remove(self)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self):
        if self.alive():
            self.proc.kill()
        self.reap()


class Daemon(Proc):
    def __init__(self, tmp, host, role, extra=None, misses=4):
        peer = "b" if host == "a" else "a"
        d = os.path.join(tmp, host)
        os.makedirs(os.path.join(d, "vm.d"), exist_ok=True)
        self.host = host
        self.dir = d
        self.debug = os.path.join(d, "debug.sock")
        if os.path.exists(self.debug):
            os.unlink(self.debug)
        self.control = os.path.join(d, "vm.sock")
        with open(os.path.join(d, "dirtyrep.conf"), "w") as f:
            f.write(f"[Daemon]\nHeartbeatIntervalMs=50\nHeartbeatMisses={round(misses * SLOW)}\n"
                    f"RuntimeDirectory={d}\nStateDirectory={d}\n")
        sf = os.path.join(d, "t.secret")
        with open(os.open(sf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(SECRET)
        keys = {
            "Role": role,
            "ControlSocket": self.control,
            "Peer": f"{REPL_IP[peer]}:{REPL_PORT}",
            "Listen": f"{REPL_IP[host]}:{REPL_PORT}",
            "EpochMs": "20",
            "SecretFile": sf,
            "Vmm": ENV["DR_VMM"],
            "VmmArgs": f"--service-listen 0.0.0.0:{KV_PORT} --console {d}/console-promoted.log",
            "FenceCommand": f"{tmp}/fence {NS['s']} v{peer} r{peer}",
            "FailoverPolicy": "auto",
            "ServiceAddress": f"{SVC_IP}/24",
            "ServiceInterface": "eth0",
            "SplitBrainTimeoutMs": "1000",
            "SplitBrainPolicy": "suspend",
        }
        keys.update(extra or {})
        with open(os.path.join(d, "vm.d", "t.conf"), "w") as f:
            f.write("[VM]\n" + "".join(f"{k}={v}\n" for k, v in keys.items() if v is not None))
        super().__init__(tmp, f"dirtyrepd-{host}", ns_exec(host, ENV["DR_DIRTYREPD"], "--config",
                                                            os.path.join(d, "dirtyrep.conf"), "--config-dir",
                                                            os.path.join(d, "vm.d"), "--debug-socket",
                                                            self.debug))
        end = time.time() + 20
        while not os.path.exists(self.debug):
            if not self.alive():
                self.dump()
                fail(f"{self.tag} exited with {self.proc.returncode}")
            if time.time() > end:
                fail(f"{self.tag}: debug socket never appeared")
            time.sleep(0.02)

    def req(self, line, timeout=30):
        for attempt in range(200):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            try:
                s.connect(self.debug)
                break
            except (ConnectionRefusedError, FileNotFoundError):
                s.close()
                if attempt == 199:
                    raise
                time.sleep(0.02)
        s.sendall(line.encode() + b"\n")
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        s.close()
        return out.decode()

    def ok(self, line, timeout=30):
        r = self.req(line, timeout)
        if not r.startswith("ok"):
            fail(f"{self.tag}: '{line}' answered {r.strip()!r}")
        return int(r.split()[1])

    def status(self):
        for line in self.req("status t").splitlines():
            return json.loads(line)
        fail(f"{self.tag}: no status")

    def wait(self, pred, what, timeout=30):
        end = time.time() + timeout
        st = None
        while time.time() < end:
            if not self.alive():
                fail(f"{self.tag} exited with {self.proc.returncode} while waiting for {what}")
            st = self.status()
            if pred(st):
                return st
            time.sleep(0.02)
        fail(f"{self.tag}: timed out after {timeout} s waiting for {what}; last status {st}")

    def vmm_pids(self):
        """The VMM(s) this daemon started (its children)."""
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []


class Host:
    """One host: its dirtyrepd, and the VMM the test started there (initial primary only)."""

    def __init__(self, name):
        self.name = name
        self.daemon = None
        self.vmm = None


def start_kv(tmp, host):
    h = os.path.join(tmp, host)
    os.makedirs(h, exist_ok=True)
    control = os.path.join(h, "vm.sock")
    v = Proc(tmp, f"vmm-{host}", ns_exec(host, ENV["DR_VMM"], "--name", "t", "--kernel", ENV["DR_GUEST_KV"],
                                         "--memory", "64M", "--control", control, "--console",
                                         os.path.join(h, "console.log"), "--service-listen",
                                         f"0.0.0.0:{KV_PORT}"))
    return v


def stop_all():
    """A passed test ends its processes with SIGTERM, daemons first (each stops the VMM it
    started): clean exits, which a sanitized build checks for leaks (tests/sanitize-wrap.py)."""
    for p in sorted(LIVE, key=lambda p: not p.tag.startswith("dirtyrepd")):
        if p.alive():
            p.proc.send_signal(signal.SIGTERM)
            try:
                p.proc.wait(timeout=15 * SLOW)
            except subprocess.TimeoutExpired:
                raise Fail(f"{p.tag} did not exit within {15 * SLOW:.0f} s of SIGTERM")
        p.reap()


# ---- the client -----------------------------------------------------------------------------

def redis(ip, *args, timeout=1.0):
    """One redis-cli command from the client namespace; the reply, or None (no answer)."""
    try:
        r = subprocess.run(ns_exec("c", "redis-cli", "-h", ip, "-p", str(KV_PORT), *args), capture_output=True,
                           text=True, timeout=timeout * SLOW)
    except subprocess.TimeoutExpired:
        return None
    if r.returncode != 0:
        return None
    out = r.stdout.strip()
    if out.startswith("Could not connect") or out.startswith("Error") or out.startswith("ERR") or not out:
        return None
    return out


def incr_until(deadline, key):
    """INCR key until deadline; returns the acknowledged values, in order."""
    acked = []
    while time.time() < deadline:
        v = redis(SVC_IP, "INCR", key, timeout=0.5)
        if v is not None:
            try:
                acked.append(int(v))
            except ValueError:
                fail(f"INCR {key} answered {v!r}")
    return acked


class IncrLoop:
    """INCR in a background process in the client namespace: a shell loop of redis-cli
    commands, each acknowledged reply printed with a timestamp."""

    def __init__(self, tmp, key, ip=SVC_IP):
        self.out = os.path.join(tmp, f"incr-{key}.log")
        script = (f"while :; do timeout 0.5 redis-cli -h {ip} -p {KV_PORT} INCR {key} 2>/dev/null; done")
        self.f = open(self.out, "w")
        self.proc = subprocess.Popen(ns_exec("c", "sh", "-c", script), stdout=self.f, stderr=subprocess.DEVNULL,
                                     process_group=0)
        GROUPS.append(self.proc.pid)

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        GROUPS.remove(self.proc.pid)
        self.proc.wait()
        self.f.close()
        vals = []
        with open(self.out) as f:
            for line in f:
                line = line.strip()
                if line.lstrip("-").isdigit():
                    vals.append(int(line))
        return vals


# ---- scenarios ----------------------------------------------------------------------------

def write_fence(tmp):
    p = os.path.join(tmp, "fence")
    with open(p, "w") as f:
        # Network fencing: shut the switch ports of the host being fenced (service and
        # replication), as a managed switch would. Arguments: switch netns, ports.
        f.write("#!/bin/sh\nset -e\nns=$1; shift\nfor p in \"$@\"; do ip -n \"$ns\" link set \"$p\" down; done\n"
                "echo \"fenced $DIRTYREP_VM: ports $* down\"\n")
    os.chmod(p, 0o755)
    p = os.path.join(tmp, "fence-fails")
    with open(p, "w") as f:
        f.write("#!/bin/sh\necho 'cannot reach the power switch' >&2\nexit 3\n")
    os.chmod(p, 0o755)


def setup_pair(tmp, extra=None, misses=4):
    """A: primary on a fresh kv VM; B: standby. Waits until protected."""
    A, B = Host("a"), Host("b")
    ports("a", True)
    ports("b", True)
    A.vmm = start_kv(tmp, "a")
    wait_file(os.path.join(tmp, "a", "console.log"), "kv: ready", A.vmm)
    B.daemon = Daemon(tmp, "b", "standby", extra, misses)
    A.daemon = Daemon(tmp, "a", "primary", extra, misses)
    A.daemon.wait(lambda s: s["state"] == "protected", "primary protected")
    return A, B


def wait_file(path, text, proc, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        if proc and not proc.alive():
            proc.dump()
            fail(f"{proc.tag} exited")
        try:
            with open(path, errors="replace") as f:
                if text in f.read():
                    return
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    fail(f"timed out waiting for {text!r} in {path}")


def kill_primary(P, silent):
    """SIGKILL the primary host's dirtyrepd and VMM at once. silent: its switch ports go
    down first (power loss: no FIN or RST reaches anyone, only missed heartbeats tell)."""
    if silent:
        ports(P.name, False)
    pids = [P.daemon.pid] + P.daemon.vmm_pids() + ([P.vmm.pid] if P.vmm else [])
    for pid in pids:
        try:
            os.kill(pid, signal.SIGSTOP)  # nobody runs any more: a dead host, frozen first
        except ProcessLookupError:
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in (P.daemon, P.vmm):
        if p:
            p.reap()
    P.daemon = P.vmm = None


def failover_trial(tmp, k, P, S, key, check=True):
    """One kill: returns (lost, last_acked, got, failover_s)."""
    loop = IncrLoop(tmp, f"{key}")
    run_s = random.uniform(0.3, 1.5) * SLOW
    time.sleep(run_s)
    t_kill = time.time()
    silent = random.random() < 0.5
    kill_primary(P, silent)
    # The new primary runs the guest; the client keeps INCRing meanwhile (no answers).
    st = S.daemon.wait(lambda s: s["role"] == "primary" and s["state"] in ("unprotected", "connecting"),
                       "promotion", timeout=20)
    t_up = time.time()
    acked = loop.stop()
    if not acked:
        fail(f"trial {k}: no INCR was acknowledged in {run_s:.2f} s")
    last = acked[-1]
    # The client reconnects to the same service address.
    end = time.time() + 15
    got = None
    while time.time() < end and got is None:
        got = redis(SVC_IP, "GET", key, timeout=1.0)
    if got is None:
        S.daemon.dump()
        fail(f"trial {k}: GET {key} got no answer from the new primary within 15 s")
    got = int(got)
    lost = got < last
    log(f"trial {k}: {len(acked)} INCRs acknowledged in {run_s:.2f} s, last {last}; "
        f"{'silently (ports down first)' if silent else 'SIGKILL'}; "
        f"new primary {st['state']} after {t_up - t_kill:.2f} s; "
        f"GET -> {got}{'  LOST ACKNOWLEDGED WRITES' if lost else ''}")
    if check and lost:
        fail(f"trial {k}: GET {key} = {got} < {last}, the last acknowledged INCR: acknowledged writes lost")
    return lost


def rejoin(tmp, P, S, extra=None):
    """P (dead) comes back as standby of S; waits for the full resync."""
    P.daemon = Daemon(tmp, P.name, "standby", extra)
    P.daemon.wait(lambda s: s["state"] == "listening", "standby listening")
    ports(P.name, True)
    st = S.daemon.wait(lambda s: s["state"] == "protected", "new primary protected by the rejoined standby",
                       timeout=30)
    log(f"host {P.name} rejoined as standby: full syncs {P.daemon.status()['full_syncs']}, "
        f"new primary {st['state']}")


def page_hash_check(tmp, primary, standby):
    for _ in range(200):
        r = primary.daemon.req("freeze t")
        if r.startswith("ok"):
            e = int(r.split()[1])
            break
        time.sleep(0.05)
    else:
        fail("freeze never succeeded")
    standby.daemon.wait(lambda s: s["last_committed"] >= e, f"standby commits epoch {e}")
    ph, sh = os.path.join(tmp, "p.crc"), os.path.join(tmp, "s.crc")
    primary.daemon.ok(f"hash t {ph}")
    se = standby.daemon.ok(f"hash t {sh}")
    primary.daemon.ok("thaw t")
    a, b = open(ph, "rb").read(), open(sh, "rb").read()
    if se != e or not a or a != b:
        bad = sum(1 for i in range(0, min(len(a), len(b)), 4) if a[i:i + 4] != b[i:i + 4])
        fail(f"page hashes differ after fail back: epoch {e}/{se}, sizes {len(a)}/{len(b)}, {bad} pages")
    log(f"page-hash check at epoch {e}: all {len(a) // 4} pages of the replica equal the primary's RAM")


def test_kill(tmp, a, nocommit=False):
    extra = {"OutputCommit": "no"} if nocommit else None
    A, B = setup_pair(tmp, extra)
    P, S = A, B
    losses = 0
    times = []
    for k in range(a.trials):
        key = f"k{k}"
        t = time.time()
        losses += failover_trial(tmp, k, P, S, key, check=not nocommit)
        times.append(time.time() - t)
        if k + 1 < a.trials or not nocommit:
            rejoin(tmp, P, S, extra)
        P, S = S, P
    if nocommit:
        log(f"OutputCommit=no: {losses} of {a.trials} trials lost acknowledged writes")
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
    ap.add_argument("mode", choices=["kill", "nocommit", "standby-loss", "split-brain", "manual", "vmm-death"])
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
        net_up()
        write_fence(tmp)
        {"kill": test_kill, "nocommit": lambda t, x: test_kill(t, x, True),
         "standby-loss": test_standby_loss, "split-brain": test_split_brain,
         "manual": test_manual, "vmm-death": test_vmm_death}[a.mode](tmp, a)
        stop_all()
        log("PASS")
        rc = 0
    except Fail as e:
        log("FAIL:", e)
        for p in LIVE:
            p.dump()
    finally:
        for pg in GROUPS:
            try:
                os.killpg(pg, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in list(LIVE):
            try:
                # A daemon's process group holds the VMM it started, too.
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.kill()
        net_down()
        if rc == 0 and not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log("logs kept in", tmp)
    return rc


if __name__ == "__main__":
    sys.exit(main())

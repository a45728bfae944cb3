#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Scaffolding of the namespace-based integration tests (test-failover.py,
test-operator-replica.py, test-qemu.py's failover), the fault campaign
(tests/faults/) and the failover benchmarks: network
namespaces for hosts A and B, a client C and a switch S; processes started
and stopped only by PID (or their own process group); dirtyrepd instances
driven through their debug socket; redis-cli clients of the kv guest.

Every namespace name carries the importing process's PID; net_down() deletes
them all, and callers run it in a finally block (install_sigterm() turns
meson's SIGTERM into an exception so that still happens).
"""
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

from drproc import ENV, LIVE, SLOW, DebugSocket, Fail, build_env, fail, free_port  # noqa: F401 (re-exported)
import drproc

TAG = f"dr{os.getpid() % 100000}"
NS = {h: f"{TAG}{h}" for h in ("a", "b", "c", "s")}
SVC_IP = "10.77.0.100"
HOST_IP = {"a": "10.77.0.1", "b": "10.77.0.2", "c": "10.77.0.3"}
REPL_IP = {"a": "10.78.0.1", "b": "10.78.0.2"}
REPL_PORT = 7000
KV_PORT = 6379
SECRET = b"failover-test-secret-0123456789\n"
# HeartbeatIntervalMs= of every Daemon; bench/failover-bench.py --heartbeat-ms sets it.
HEARTBEAT_MS = 50
GROUPS = []  # process groups of helpers (client loops) to kill at the end
T0 = time.time()
# This file run as a program: the proxy of a host (proxy_server()).
PROXY_CMD = [sys.executable, os.path.abspath(__file__), "proxy"]


def log(*a):
    print(f"[{time.time() - T0:7.2f}]", *a, flush=True)


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


def kill_groups():
    """SIGKILL the process groups of the helpers (client loops)."""
    for pg in GROUPS:
        try:
            os.killpg(pg, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_live():
    """SIGKILL every process left in LIVE with its process group (a daemon's holds the
    VMM it started, too)."""
    for p in list(LIVE):
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        p.kill()


def kill_all():
    """The cleanup of a test, passed or not (then net_down())."""
    kill_groups()
    kill_live()


def run_in_namespaces(tmp, scenario):
    """Runs scenario() with the namespaces up and the fence scripts in tmp. A pass ends every
    process cleanly (stop_all()); whatever happens, what is left is killed and the namespaces
    are deleted. Returns 0 (pass) or 1 (a Fail: its message and the logs were printed)."""
    rc = 1
    try:
        net_up()
        write_fence(tmp)
        scenario()
        stop_all()
        log("PASS")
        rc = 0
    except Fail as e:
        log("FAIL:", e)
        for p in LIVE:
            p.dump()
    finally:
        kill_all()
        net_down()
    return rc


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

class Proc(drproc.Proc):
    """A process this test started, in its own process group (unless group says
    otherwise); only we stop it, by PID (or that group)."""

    say = staticmethod(log)
    dump_lines = 30
    group = 0

    def logname(self, tag):
        return f"{tag}.{int((time.time() - T0) * 1000)}.log"

    def shown(self, tag, cmd):
        return f"{tag} " + " ".join(cmd[3:] if cmd[0] == "ip" else cmd)[:200]


class Bus(Proc, drproc.Bus):
    pass


class Daemon(Proc, DebugSocket):
    """dirtyrepd on a host. vms: VM name -> keys of that VM over the defaults and
    extra (default: one VM "t"); a key "_port" gives a VM other than "t" its own
    replication port (Listen and Peer); None drops a key."""

    def __init__(self, tmp, host, role, extra=None, misses=4, vms=None):
        peer = "b" if host == "a" else "a"
        d = os.path.join(tmp, host)
        os.makedirs(os.path.join(d, "vm.d"), exist_ok=True)
        self.host = host
        self.dir = d
        self.debug = os.path.join(d, "debug.sock")
        if os.path.exists(self.debug):
            os.unlink(self.debug)
        self.control = os.path.join(d, "vm.sock")
        drproc.write_daemon_conf(d, HEARTBEAT_MS, min(100, round(misses * SLOW)))
        sf = drproc.write_secret(os.path.join(d, "t.secret"), SECRET)
        for name, own in (vms or {"t": {}}).items():
            own = dict(own)
            port = own.pop("_port", REPL_PORT)
            keys = {
                "Role": role,
                "ControlSocket": self.control if name == "t" else os.path.join(d, f"{name}.sock"),
                "Peer": f"{REPL_IP[peer]}:{port}",
                "Listen": f"{REPL_IP[host]}:{port}",
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
            keys.update(own)
            drproc.write_vm_conf(os.path.join(d, "vm.d", f"{name}.conf"), keys)
        # the fence script's `ip -n` needs CAP_SYS_ADMIN
        super().__init__(tmp, f"dirtyrepd-{host}", ns_exec(host, *drproc.dirtyrepd_cmd(d, self.debug),
                                                            "--keep-capabilities"))
        drproc.wait_path(self, self.debug, "debug socket")


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


def acked_regressions(acked):
    """Acknowledged INCR values that are not above every value acknowledged before them:
    each one means an acknowledged write was lost (the counter went back)."""
    out, top = [], None
    for v in acked:
        if top is not None and v <= top:
            out.append(v)
        top = v if top is None else max(top, v)
    return out


class IncrLoop:
    """INCR in a background process in the client namespace: a shell loop of redis-cli
    commands, each acknowledged reply printed with a timestamp."""

    def __init__(self, tmp, key, ip=SVC_IP):
        self.out = os.path.join(tmp, f"incr-{key}.log")
        # --foreground: timeout stays in the loop's process group, so stop() kills a redis-cli
        # in flight too (otherwise it could still print an acknowledged value after stop()).
        script = (f"while :; do timeout --foreground 0.5 redis-cli -h {ip} -p {KV_PORT} INCR {key} 2>/dev/null; "
                  "done")
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


def replica_check(tmp, primary, standby, vm="t", memcheck=False):
    """Freeze the primary right after a seal, wait until the standby committed that
    epoch, and compare a CRC32C of every page of the primary's RAM with the same of
    the replica: they must be identical. memcheck: also dump the replica and run
    dirtyrep-memcheck on it (memtouch guest). Returns (epoch, pages, memcheck output)."""
    e = primary.freeze(vm, tries=400)
    try:
        standby.wait(lambda s: s["last_committed"] >= e, f"standby commits epoch {e} of {vm}", vm=vm)
        ph, sh = os.path.join(tmp, f"p-{vm}.crc"), os.path.join(tmp, f"s-{vm}.crc")
        primary.ok(f"hash {vm} {ph}")
        # busy while an epoch is open: the one after the frozen seal may still be in flight
        r = standby.req_settled(f"hash {vm} {sh}")
        if not r.startswith("ok"):
            fail(f"{standby.tag}: 'hash {vm}' answered {r.strip()!r}")
        se = int(r.split()[1])
        out = ""
        if memcheck:
            ram, state = os.path.join(tmp, f"replica-{vm}.ram"), os.path.join(tmp, f"replica-{vm}.state")
            r = standby.req_settled(f"dump {vm} {ram} {state}")
            if not r.startswith("ok"):
                fail(f"{standby.tag}: 'dump {vm}' answered {r.strip()!r}")
            c = subprocess.run([ENV["DR_MEMCHECK"], ram], capture_output=True, text=True)
            for f in (ram, state):
                if os.path.exists(f):
                    os.unlink(f)
            if c.returncode != 0:
                fail(f"{vm}: memtouch checker failed on the replica at epoch {e}: {c.stdout} {c.stderr}")
            out = c.stdout.strip()
    finally:
        if primary.alive():
            primary.req(f"thaw {vm}")
    a, b = open(ph, "rb").read(), open(sh, "rb").read()
    if se != e or not a or a != b:
        bad = sum(1 for i in range(0, min(len(a), len(b)), 4) if a[i:i + 4] != b[i:i + 4])
        fail(f"{vm}: page hashes differ: epoch {e}/{se}, sizes {len(a)}/{len(b)}, {bad} pages")
    return e, len(a) // 4, out


def failover_trial(tmp, k, P, S, key, check=True, drain=None):
    """One kill: returns (lost, last_acked, got, failover_s). drain(), when given, runs
    once the standby is promoted, before the GET (test-qemu.py: the serial line's stale
    reply)."""
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
    if drain:
        drain()
    # The client reconnects to the same service address.
    end = time.time() + 15
    got = None
    while time.time() < end and got is None:
        got = redis(SVC_IP, "GET", key, timeout=1.0)
    if got is None:
        S.daemon.dump()
        fail(f"trial {k}: GET {key} got no answer from the new primary within 15 s")
    got = int(got)
    back = acked_regressions(acked)
    lost = got < max(acked) or bool(back)
    log(f"trial {k}: {len(acked)} INCRs acknowledged in {run_s:.2f} s, last {last}; "
        f"{'silently (ports down first)' if silent else 'SIGKILL'}; "
        f"new primary {st['state']} after {t_up - t_kill:.2f} s; "
        f"GET -> {got}{'  LOST ACKNOWLEDGED WRITES' if lost else ''}")
    if check and lost:
        fail(f"trial {k}: GET {key} = {got}, highest acknowledged INCR {max(acked)}, acknowledged values that "
             f"went back {back[:10]}: acknowledged writes lost")
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
    """The replica in steady-state replication, not right after the resync (which only checks
    the full sync): 20 epochs past the rejoin, with writes through the service address, twice;
    the replica equals the primary's RAM both times, the primary's RAM changed in between (the
    VM ran and its changes were replicated), and no resync happened meanwhile."""
    st0 = primary.daemon.wait(lambda s: s["state"] == "protected", "the primary protected")
    base = st0["last_committed"]
    primary.daemon.wait(lambda s: s["last_committed"] >= base + 20, f"20 epochs past epoch {base}, the resync")
    hashes = []
    for k in range(2):
        acked = incr_until(time.time() + 1.0 * SLOW, f"steady{k}")
        if not acked:
            fail(f"no INCR answered through the service address before check {k}")
        e, pages, _ = replica_check(tmp, primary.daemon, standby.daemon)
        with open(os.path.join(tmp, "p-t.crc"), "rb") as f:
            hashes.append(f.read())
        log(f"page-hash check at epoch {e} ({e - base} after the resync, {len(acked)} INCRs before it): "
            f"all {pages} pages of the replica equal the primary's RAM")
    a, b = hashes
    changed = sum(1 for i in range(0, min(len(a), len(b)), 4) if a[i:i + 4] != b[i:i + 4])
    st = primary.daemon.status()
    if changed == 0:
        fail("the primary's RAM did not change between the two checks: the VM did not run")
    if st["full_syncs"] + st["incremental_syncs"] != st0["full_syncs"] + st0["incremental_syncs"]:
        fail(f"a resync happened during the steady-state checks: {st0} -> {st}")
    log(f"{changed} pages changed between the two checks, no resync in between")


# ---- a TCP proxy with fault injection ---------------------------------------------------------

def close_both(*socks):
    """Shuts down and closes sockets (both ends of a relayed connection), whatever state they are in."""
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            s.close()
        except OSError:
            pass


class Proxy:
    """TCP proxy listen -> target (host, port), with fault injection on the data
    flowing from the connecting side (the primary) to the target (the standby):
    mode "pass"; "flip" (one bit of the next chunk longer than 64 bytes is
    flipped, then "pass"); "stall" (nothing is forwarded either way until the
    mode changes); "slow" (the primary's stream trickles at about 20 KB/s, so a
    full sync takes seconds). back = "stall" stalls only the other direction,
    the standby's ACKs and heartbeats, until it is "pass" again (nothing is
    lost: the bytes wait in the socket buffers). cut() shuts every connection
    down (both sides see it closed)."""

    def __init__(self, target, listen=("127.0.0.1", 0)):
        self.target = target if isinstance(target, tuple) else ("127.0.0.1", target)
        self.ls = socket.socket()
        self.ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.ls.bind(listen)
        self.ls.listen(8)
        self.port = self.ls.getsockname()[1]
        self.mode = "pass"
        self.back = "pass"
        self.flipped = 0
        self.conns = []
        self.lock = threading.Lock()
        self.stop = False
        threading.Thread(target=self.accept_loop, daemon=True).start()

    def accept_loop(self):
        while not self.stop:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            try:
                t = socket.create_connection(self.target, timeout=2)
                t.settimeout(None)
            except OSError:
                c.close()
                continue
            with self.lock:
                self.conns.append((c, t))
            self.relay(c, t)

    def relay(self, c, t):
        """Relays one accepted connection c and its connection t to the target."""
        # One thread per direction: a full receive buffer on one side must not hold
        # back the other direction (heartbeats, ACKs), as it would not on a real link.
        threading.Thread(target=self.pump, args=(c, t, True), daemon=True).start()
        threading.Thread(target=self.pump, args=(t, c, False), daemon=True).start()

    def pump(self, src, dst, forward):
        def stalled():
            return self.mode == "stall" or (not forward and self.back == "stall")
        try:
            while not self.stop:
                if stalled():
                    time.sleep(0.01)
                    continue
                slow = forward and self.mode == "slow"
                data = src.recv(1024 if slow else 65536)
                if not data:
                    break
                if slow:
                    time.sleep(0.05)
                while stalled() and not self.stop:
                    time.sleep(0.01)
                if forward and self.mode == "flip" and len(data) > 64:
                    self.mode = "pass"
                    i = len(data) // 2
                    data = data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1:]
                    self.flipped += 1
                    log("proxy: flipped one bit")
                dst.sendall(data)
        except OSError:
            pass
        close_both(src, dst)

    def cut(self):
        with self.lock:
            n = len(self.conns)
            for c, t in self.conns:
                for s in (c, t):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            self.conns = []
        log(f"proxy: cut {n} connection(s)")
        return n

    def close(self):
        self.stop = True
        self.cut()
        self.ls.close()


# ---- a frame-aware tampering relay (docs/security.md) ------------------------------------------

def _crc32c_table():
    t = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        t.append(c)
    return t


_CRC32C = _crc32c_table()


def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    t = _CRC32C
    for b in data:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


FRAME_HDR, MAC_TRAILER = 20, 24
F_CHALLENGE, F_AUTH, F_PAGES, F_EPOCH_END, F_ACK = 2, 3, 6, 8, 9
TAMPER_MODES = ("tamper-page", "tamper-ack", "tamper-replay", "tamper-relay")


def frame_build(ftype, payload):
    """A frame with a valid header and CRC32C (anyone can compute those)."""
    h = struct.pack("<IHHI", 0x46505244, 1, ftype, len(payload))
    return h + struct.pack("<II", crc32c(h + payload), 0) + payload


def _varint(b, i):
    v = shift = 0
    while i < len(b):
        v |= (b[i] & 0x7F) << shift
        i += 1
        if not b[i - 1] & 0x80:
            return v
        shift += 7
    return None


def _put_varint(v):
    out = b""
    while True:
        if v < 0x80:
            return out + bytes([v])
        out += bytes([(v & 0x7F) | 0x80])
        v >>= 7


class TamperProxy(Proxy):
    """Proxy that parses the replication frames of each direction and, besides Proxy's
    modes, plays an attacker on the path who knows the frame format but not the
    shared secret. One-shot modes (back to "pass" once done, `tampered` counts them):

      tamper-page    rewrites a byte of a page record (raw or LZ4) in a PAGES frame (<= 512 KiB)
                     and recomputes the CRC: the frame is valid except for its MAC
      tamper-ack     as an EPOCH_END passes to the standby, sends the primary an ACK of
                     that epoch at once (right sequence number, a tag it cannot compute)
      tamper-replay  saves a PAGES frame and sends it again after the next EPOCH_END
      tamper-relay   the handshake went through this relay: now it drops the standby's
                     connection and answers the primary itself, an ACK for every EPOCH_END

    A stream that is not replication frames (TLS) is passed on unparsed."""

    def __init__(self, target, listen=("127.0.0.1", 0)):
        self.tampered = 0
        super().__init__(target, listen)

    def relay(self, c, t):
        st = {"c": c, "t": t, "wlock": threading.Lock(), "keyed": {True: False, False: False},
              "seq": {True: 0, False: 0}, "relay": False, "saved": None, "done": False}
        threading.Thread(target=self.fpump, args=(st, True), daemon=True).start()
        threading.Thread(target=self.fpump, args=(st, False), daemon=True).start()

    def _one_shot(self, what):
        self.mode = "pass"
        self.tampered += 1
        log(f"tamper proxy: {what}")

    def _forge_ack(self, st, epoch):
        """An ACK with a valid CRC and the sequence number the primary expects; the tag
        is random: without the session key nothing better can be made."""
        f = frame_build(F_ACK, b"\x08" + _put_varint(epoch)) + struct.pack("<Q", st["seq"][False]) + os.urandom(16)
        with st["wlock"]:
            st["c"].sendall(f)
            st["seq"][False] += 1

    def _frames(self, st, forward, frame):
        """What to send on for one whole frame of direction `forward` (a list of byte strings)."""
        ftype, length = struct.unpack_from("<HI", frame, 6)
        keyed = st["keyed"][forward]
        mode = self.mode
        out = [frame]
        if forward and keyed and mode == "tamper-page" and ftype == F_PAGES and length <= 512 * 1024:
            p = bytearray(frame[FRAME_HDR:FRAME_HDR + length])
            n, at = struct.unpack_from("<I", p, 8)[0], 16
            for _ in range(n):
                if at + 16 > len(p):
                    break
                page, dlen, enc = struct.unpack_from("<QIH", p, at)
                if enc in (1, 2) and 100 < dlen <= 4096 and at + 16 + dlen <= len(p):  # raw or LZ4
                    p[at + 16 + dlen // 2] ^= 0xFF
                    h = bytearray(frame[:FRAME_HDR])
                    struct.pack_into("<I", h, 12, crc32c(bytes(h[:12]) + bytes(p)))
                    out = [bytes(h) + bytes(p) + frame[FRAME_HDR + length:]]
                    self._one_shot(f"rewrote page {page} in a PAGES frame of {length} bytes, CRC recomputed")
                    break
                at += 16 + dlen
        elif forward and keyed and mode == "tamper-replay" and ftype == F_PAGES and st["saved"] is None:
            st["saved"] = frame
        elif forward and keyed and mode == "tamper-replay" and ftype == F_EPOCH_END and st["saved"]:
            out = [frame, st["saved"]]
            st["saved"] = None
            self._one_shot(f"replayed a PAGES frame of {len(out[1])} bytes after EPOCH_END")
        if forward and keyed and ftype == F_EPOCH_END and (mode in ("tamper-ack", "tamper-relay") or st["relay"]):
            epoch = _varint(frame, FRAME_HDR + 1) if frame[FRAME_HDR:FRAME_HDR + 1] == b"\x08" else None
            if epoch is not None:
                if mode == "tamper-relay" and not st["relay"]:
                    st["relay"] = True
                    try:
                        st["t"].shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    self._one_shot("dropped the standby; answering the primary itself")
                if st["relay"]:
                    out = []
                    self._forge_ack(st, epoch)
                    log(f"tamper proxy: relay acked epoch {epoch}")
                else:
                    # The EPOCH_END goes on in order with the rest of the stream; the forged ACK
                    # reaches the primary before the standby can have committed the epoch.
                    out = [frame]
                    self._forge_ack(st, epoch)
                    self._one_shot(f"forged an ACK of epoch {epoch} before the standby committed it")
        elif forward and st["relay"]:
            out = []  # the standby is gone; the relay swallows the rest
        return out

    def _to_standby(self, st, data):
        if not st["relay"]:
            st["t"].sendall(data)

    def _to_primary(self, st, frame, keyed):
        with st["wlock"]:
            st["c"].sendall(frame)
            if keyed:
                st["seq"][False] += 1  # the next sequence number the primary expects

    def fpump(self, st, forward):
        src, dst = (st["c"], st["t"]) if forward else (st["t"], st["c"])
        buf, raw = bytearray(), False
        try:
            while not self.stop:
                if self.mode == "stall":
                    time.sleep(0.01)
                    continue
                slow = forward and self.mode == "slow"  # as Proxy.pump: about 20 KB/s
                data = src.recv(1024 if slow else 262144)
                if not data:
                    break
                if slow:
                    time.sleep(0.05)
                while self.mode == "stall" and not self.stop:
                    time.sleep(0.01)
                if raw:
                    if forward:
                        self._to_standby(st, data)
                    else:
                        self._to_primary(st, data, False)
                    continue
                buf += data
                out = []
                while len(buf) >= FRAME_HDR:
                    magic, _, ftype, length = struct.unpack_from("<IHHI", buf, 0)
                    if magic != 0x46505244:
                        raw = True  # not replication frames (TLS): passed on as they are
                        out.append(bytes(buf))
                        buf = bytearray()
                        break
                    keyed = st["keyed"][forward]
                    whole = FRAME_HDR + length + (MAC_TRAILER if keyed else 0)
                    if len(buf) < whole:
                        break
                    frame = bytes(buf[:whole])
                    del buf[:whole]
                    sent = self._frames(st, forward, frame)
                    if forward:
                        out += sent
                    else:
                        for f in sent:
                            self._to_primary(st, f, keyed)
                    # The primary's frames are keyed after its AUTH, the standby's after CHALLENGE.
                    if (forward and ftype == F_AUTH) or (not forward and ftype == F_CHALLENGE):
                        st["keyed"][forward] = True
                if not forward:
                    if raw and out:
                        self._to_primary(st, b"".join(out), False)
                    continue
                data = b"".join(out)
                if self.mode == "flip" and len(data) > 64:
                    self.mode = "pass"
                    i = len(data) // 2
                    data = data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1:]
                    self.flipped += 1
                    log("proxy: flipped one bit")
                if data:
                    self._to_standby(st, data)
        except OSError:
            pass
        if not forward and st["relay"]:
            return  # the standby is gone, the relay goes on talking to the primary
        close_both(src, dst)


def proxy_server(control, pairs):
    """Run Proxies for pairs [(listen_port, target_host, target_port)] on 127.0.0.1 and
    obey one-line commands on the unix socket control: pass | flip | stall | slow | cut;
    each answers "ok N" (N: connections cut, bits flipped so far)."""
    proxies = [TamperProxy((h, p), ("127.0.0.1", lp)) for lp, h, p in pairs]
    if os.path.exists(control):
        os.unlink(control)
    cs = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cs.bind(control)
    cs.listen(4)
    while True:
        s, _ = cs.accept()
        cmd = s.recv(64).decode().strip()
        n = 0
        if cmd == "cut":
            n = sum(p.cut() for p in proxies)
        elif cmd in ("pass", "flip", "stall", "slow") + TAMPER_MODES:
            for p in proxies:
                p.mode = cmd
        elif cmd == "flipped":
            n = sum(p.flipped for p in proxies)
        elif cmd == "tampered":
            n = sum(p.tampered for p in proxies)
        known = ("cut", "pass", "flip", "stall", "slow", "flipped", "tampered") + TAMPER_MODES
        s.sendall(f"ok {n}\n".encode() if cmd in known else b"error\n")
        s.close()


def start_proxy(tmp, host, control, *pairs):
    """This file's proxy_server() in host's namespace: pairs "LISTEN_PORT:TARGET_HOST:TARGET_PORT",
    commands on the unix socket control (proxy_cmd()). Returns its Proc once it listens."""
    p = Proc(tmp, f"proxy-{host}", ns_exec(host, *PROXY_CMD, control, *pairs))
    end = time.time() + 20
    while not os.path.exists(control):
        if not p.alive() or time.time() > end:
            p.dump()
            fail(f"proxy on {host} did not start")
        time.sleep(0.02)
    return p


def proxy_cmd(control, cmd):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(control)
    s.sendall(cmd.encode() + b"\n")
    r = s.recv(64).decode().strip()
    s.close()
    if not r.startswith("ok"):
        fail(f"proxy {control}: '{cmd}' answered {r!r}")
    return int(r.split()[1])


if __name__ == "__main__":
    # drtest.py proxy CONTROL LISTEN_PORT:TARGET_HOST:TARGET_PORT...
    if len(sys.argv) >= 4 and sys.argv[1] == "proxy":
        proxy_server(sys.argv[2], [(int(a.split(":")[0]), a.split(":")[1], int(a.split(":")[2]))
                                   for a in sys.argv[3:]])

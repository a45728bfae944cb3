#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Many VMs under one dirtyrepd for a long time: the load run and the leak run.

  bench/load-bench.py [--build DIR] [--duration S] [--vms N] [--memory SIZE] [--out-dir DIR] [--name NAME]
  bench/load-bench.py --build build-asan --asan --churn --vms 4 --duration 300 --name leak

One primary dirtyrepd protects N small VMs (the reference VMM, one vCPU
each, guests mixed: kv driven by a RESP client, dirtier at a fixed rate,
memtouch unthrottled); one standby dirtyrepd holds their replicas. Both run
on 127.0.0.1 (a host each would change nothing the daemons see: one TCP
connection per VM either way). Every 0.1 s the bench asks both daemons'
debug sockets for every VM's status (last committed epoch, pause window);
every 2 s it reads each daemon's /proc: RSS, PSS, anonymous memory, open
fds, threads.

Half way through, ONE VM fails over: its primary VMM is SIGKILLed, the
primary dirtyrepd reports the VM gone, the standby fences (the fence
command confirms that VMM is dead) and starts the VM on its replica; then
the old primary's daemon is told `demote`, becomes that VM's standby, and
the promoted VM resyncs to it (protected again, the other way round). The
kv client of that VM checks that no acknowledged INCR was lost.

Commit gaps come from the primary dirtyrepd itself (status `commit_gaps`:
a histogram of the times between two ACKs that advanced the committed
epoch, bucket bounds GAP_EDGES_MS; `commit_gap_max_usec`): a poller on a
loaded host cannot see them (its own stalls look like every VM's gap).

Verdicts (written to NAME.json / NAME.md, plot NAME.png):
  - all committing: after the warm-up every VM committed at least one epoch
    in every 10 s window (the failed-over VM excepted from its death until
    10 s after it is protected again);
  - memory flat: for each daemon, least-squares lines through RSS and
    through anonymous memory after the warm-up, before the failover and
    after it settled, each grow by less than 1 % of the mean RSS per
    10 minutes;
  - others undisturbed: from the death until 10 s after the failed-over VM
    is protected again, every other VM committed, had no inter-commit gap
    above 500 ms (or, if the minute before already had such gaps, none in
    a higher bucket than it did), and its epochs/s in the minute after are
    at least 80 % of the minute before;
  - no acknowledged write lost: the failed-over kv guest's INCR counter
    never went below a value its client had been answered;
  - clean exit: both daemons exit 0 on SIGTERM at the end.

--churn (the leak run) adds, every --churn-interval seconds in turn: a cut
of one VM's replication connection (through a TCP proxy: the primary
reconnects and resyncs), a checkpoint image (full, then incremental on the
last), a reload (SIGHUP) that changes one VM's EpochMs (that VM restarts,
the others must not), a D-Bus detach + attach of that VM (dirtyrepctl on
a private dbus-daemon) and a D-Bus Checkpoint. At the end both daemons get
SIGTERM and must exit 0.

--asan: the build is -Db_sanitize=address,undefined; ASAN_OPTIONS sets
detect_leaks=1, so LeakSanitizer reports at each process's exit; the run
fails when any log holds a sanitizer report or a daemon exits non-zero.
First, a positive control: a small program that leaks one block, built
with -fsanitize=address and run with the same options, must be reported.
With --churn, memory flat and others undisturbed are shown but are not
verdicts (resyncs on purpose disturb VMs and allocate).

The machine this was written on has 2 CPUs shared with other work, and a
memtouch or rate-limited dirtier guest spins its vCPU: the vCPU threads of
the VMMs are set to nice 19 (--vcpu-nice), so the guests take what CPU is
left while the daemons and the VMMs' agent threads run at normal priority.
The load average is recorded with every memory sample.
"""
import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "lib"))
import drproc  # noqa: E402
from drproc import LIVE, Fail, fail, free_port  # noqa: E402
from drtest import Proxy  # noqa: E402

T0 = time.monotonic()
SECRET = b"load-bench-secret-0123456789abcdef\n"
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                   "SUMMARY: AddressSanitizer", "SUMMARY: UndefinedBehaviorSanitizer", "ERROR: ThreadSanitizer")


def now():
    return time.monotonic() - T0


def log(*a):
    print(f"[{now():7.1f}]", *a, flush=True)


def parse_size(s):
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * mult[s[-1].upper()] if s[-1].upper() in mult else int(s)


class Proc(drproc.Proc):
    """A process this bench started, in its own process group; stopped only by its PID."""

    group = 0
    logmode = "a"
    say = staticmethod(log)

    def shown(self, tag, cmd):
        return None

    def popen(self, cmd, env, group, pipe):
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, process_group=group, env=env)
        # Every line gets the bench's clock, so the logs line up with the events and samples.
        self.reader = threading.Thread(target=self.pump, args=(p,), daemon=True)
        self.reader.start()
        return p

    def pump(self, p):
        for line in iter(p.stdout.readline, b""):
            self.err.write(f"[{now():8.3f}] {line.decode(errors='replace')}")
            self.err.flush()
        p.stdout.close()

    def tail(self, n=25):
        return "\n".join(self.text().splitlines()[-n:])

    def stop(self, sig=signal.SIGTERM, timeout=30):
        """Signals the process and waits; returns its exit status (negative: killed by a signal)."""
        if self.alive():
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
            log(f"{self.tag} did not stop within {timeout} s after signal {sig}: killed")
        self.reader.join(10)
        if self in LIVE:
            LIVE.remove(self)
        return rc


def vcpu_renice(pid, nice, settle=1.5):
    """Sets the busiest thread of process pid (the vCPU thread of a one-vCPU VMM whose guest
    spins) to nice. Returns its TID, or None."""
    if nice is None:
        return None

    def cpu():
        out = {}
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    st = f.read().rsplit(")", 1)[1].split()
                out[int(tid)] = int(st[11]) + int(st[12])
        except OSError:
            pass
        return out

    a = cpu()
    time.sleep(settle)
    b = cpu()
    if not b:
        return None
    tid = max(b, key=lambda t: b[t] - a.get(t, 0))
    try:
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError:
        return None
    return tid


def proc_mem(pid):
    """RSS, PSS, anonymous (KiB), fds and threads of a process."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("Rss", "Pss", "Anonymous", "Pss_Anon", "Pss_Shmem", "Pss_File"):
                out[k.lower()] = int(v.split()[0])
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                out["hwm"] = int(line.split()[1])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


class Daemon(Proc):
    def __init__(self, tmp, tag, vms, a, env, bus=None):
        d = os.path.join(tmp, tag)
        os.makedirs(os.path.join(d, "vm.d"), exist_ok=True)
        self.dir = d
        self.debug = os.path.join(d, "debug.sock")
        self.vms = vms
        drproc.write_daemon_conf(d, a.heartbeat_ms, a.heartbeat_misses)
        self.secret = drproc.write_secret(os.path.join(d, "secret"), SECRET)
        for name, keys in vms.items():
            self.write_vm(name, keys)
        cmd = drproc.dirtyrepd_cmd(d, self.debug, env["DR_DIRTYREPD"])
        cmd += ["--bus-address", bus.address] if bus else ["--bus=none"]
        super().__init__(tmp, tag, cmd, env=env)
        end = time.monotonic() + 30
        while not os.path.exists(self.debug):
            if not self.alive():
                fail(f"{tag} exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > end:
                fail(f"{tag}: no debug socket after 30 s")
            time.sleep(0.05)

    def write_vm(self, name, keys):
        drproc.write_vm_conf(os.path.join(self.dir, "vm.d", name + ".conf"), keys, self.secret)

    def req(self, line, timeout=30):
        return drproc.unix_request(self.debug, line, timeout)

    def status(self):
        out = {}
        for line in self.req("status", timeout=10).splitlines():
            if line.strip():
                st = json.loads(line)
                out[st["vm"]] = st
        return out

    def wait(self, vm, pred, what, timeout=60):
        end = time.monotonic() + timeout
        st = None
        while time.monotonic() < end:
            if not self.alive():
                fail(f"{self.tag} exited with {self.proc.returncode} while waiting for {what}:\n{self.tail()}")
            st = self.status().get(vm)
            if st and pred(st):
                return st
            time.sleep(0.05)
        fail(f"{self.tag}: {what}: not after {timeout} s; last status {st}")

    def children(self):
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []


class Bus(Proc, drproc.Bus):
    """A private system-like bus with the project's real policy file."""

    def __init__(self, tmp):
        super().__init__(tmp, "dbus-daemon", dirname="bus")


class KvClient:
    """A RESP client of one kv guest: INCR every `period` seconds over one connection
    (reconnecting after errors); records every acknowledged value and its latency."""

    def __init__(self, name, port, period=0.1):
        self.name, self.port, self.period = name, port, period
        self.acked = []  # (t, value, latency_s)
        self.errors = []  # t
        self.stopped = False
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        s = None
        buf = b""
        while not self.stopped:
            t = time.monotonic()
            try:
                if s is None:
                    s = socket.create_connection(("127.0.0.1", self.port), timeout=2)
                    buf = b""
                s.sendall(b"INCR load\r\n")
                while b"\r\n" not in buf:
                    chunk = s.recv(4096)
                    if not chunk:
                        raise OSError("closed")
                    buf += chunk
                line, _, buf = buf.partition(b"\r\n")
                if not line.startswith(b":"):
                    raise OSError(f"reply {line[:40]!r}")
                self.acked.append((t - T0, int(line[1:]), time.monotonic() - t))
            except (OSError, ValueError):
                self.errors.append(t - T0)
                if s:
                    s.close()
                s = None
                time.sleep(0.05)
            time.sleep(max(0.0, self.period - (time.monotonic() - t)))
        if s:
            s.close()


GAP_EDGES_MS = [30, 50, 100, 200, 500, 1000, 2000]  # daemon/role.h COMMIT_GAP_EDGES_MS
GUESTS = ["kv", "dirtier", "memtouch", "dirtier", "kv", "memtouch", "dirtier", "kv"]
APPEND = {
    "dirtier": "ws=16M pattern=random rate=2000 report_ms=10000",
    "memtouch": "ws=512K report_ms=10000",
    "kv": "report_ms=10000",
}


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else None


def linfit(pts):
    """Least-squares slope (y per x unit) and intercept."""
    n = len(pts)
    if n < 3:
        return None, None
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None, None
    b = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    return b, my - b * mx


class Bench:
    def __init__(self, a):
        self.a = a
        b = os.path.abspath(a.build)
        self.env = drproc.build_env(b, "dirtier", "memtouch", "kv", ctl=True, env=dict(os.environ))
        if a.asan:
            self.env["ASAN_OPTIONS"] = "detect_leaks=1:abort_on_error=0:halt_on_error=1"
            self.env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
            self.env["LSAN_OPTIONS"] = "report_objects=1"
        self.tmp = tempfile.mkdtemp(prefix=f"dr-{a.name}-")
        self.names = [f"vm{i}" for i in range(a.vms)]
        self.guest = {n: GUESTS[i % len(GUESTS)] for i, n in enumerate(self.names)}
        self.victim = self.names[0]  # a kv guest: its client checks that no acknowledged write is lost
        self.vmms = {}
        self.kv = {}
        self.samples = []  # (t, {side: {vm: status}})
        self.mem = []  # (t, {side: mem}, loadavg)
        self.events = []  # (t, what)
        self.proxy = None
        self.bus = None
        self.stop_sampling = False
        self.sample_errors = []
        self.lock = threading.Lock()

    def event(self, what):
        t = now()
        self.events.append((round(t, 2), what))
        log("event:", what)

    # ---- set-up ---------------------------------------------------------------------------

    def start_vmm(self, name):
        g = self.guest[name]
        d = os.path.join(self.tmp, "a")
        os.makedirs(d, exist_ok=True)
        cmd = [self.env["DR_VMM"], "--name", name, "--kernel", self.env[f"DR_GUEST_{g.upper()}"], "--cpus", "1",
               "--memory", self.a.memory, "--control", os.path.join(d, f"{name}.sock"), "--console",
               os.path.join(d, f"{name}-console.log"), "--append", APPEND[g]]
        if g == "kv":
            cmd += ["--service-listen", f"127.0.0.1:{self.kv_port[name]}"]
        p = Proc(self.tmp, f"vmm-{name}", cmd, env=self.env)
        with open(os.path.join(self.tmp, f"{name}.pid"), "w") as f:
            f.write(f"{p.pid}\n")
        self.vmms[name] = p
        return p

    def write_fence(self):
        path = os.path.join(self.tmp, "fence")
        with open(path, "w") as f:
            f.write(f"""#!/bin/sh
# Fences VM $DIRTYREP_VM: succeeds once its primary VMM (pid in {self.tmp}/$DIRTYREP_VM.pid) is gone.
f={self.tmp}/$DIRTYREP_VM.pid
[ -f "$f" ] || {{ echo "no primary VMM recorded for $DIRTYREP_VM"; exit 0; }}
pid=$(cat "$f")
i=0
while [ $i -lt 50 ]; do
    st=$(sed 's/.*) //' /proc/$pid/stat 2>/dev/null | cut -d' ' -f1)
    if [ -z "$st" ] || [ "$st" = Z ]; then echo "fenced $DIRTYREP_VM: its primary VMM $pid is gone"; exit 0; fi
    sleep 0.1; i=$((i + 1))
done
echo "the primary VMM of $DIRTYREP_VM (pid $pid) still runs: refusing" >&2
exit 1
""")
        os.chmod(path, 0o755)
        return path

    def vm_keys(self, side, name, i, fence):
        other = "b" if side == "a" else "a"
        d = os.path.join(self.tmp, side)
        vmm_args = f"--console {d}/{name}-promoted.log"
        if self.guest[name] == "kv":
            vmm_args += f" --service-listen 127.0.0.1:{self.kv_port[name]}"
        peer = self.listen[other][name]
        if side == "a" and self.proxy and name == self.cut_vm:
            peer = self.proxy.port
        return {
            "Role": "primary" if side == "a" else "standby",
            "ControlSocket": os.path.join(d, f"{name}.sock"),
            "Peer": f"127.0.0.1:{peer}",
            "Listen": f"127.0.0.1:{self.listen[side][name]}",
            "EpochMs": "20",
            "Vmm": self.env["DR_VMM"],
            "VmmArgs": vmm_args,
            "FenceCommand": fence,
            "FailoverPolicy": "auto",
        }

    def lsan_control(self):
        """LeakSanitizer's positive control: a program that leaks one block, built and run
        with this run's ASAN_OPTIONS, must be reported; else "no leak report" proves nothing."""
        cc = shutil.which("cc") or shutil.which("gcc")
        if not cc:
            fail("--asan: no C compiler for LeakSanitizer's positive control")
        src = os.path.join(self.tmp, "leak-control.c")
        exe = os.path.join(self.tmp, "leak-control")
        with open(src, "w") as f:
            f.write("#include <stdlib.h>\nvoid *volatile kept;\nint main(void) {\n"
                    "        kept = malloc(4242);\n        kept = NULL;\n        return 0;\n}\n")
        subprocess.run([cc, "-fsanitize=address", "-g", "-O0", "-o", exe, src], check=True, capture_output=True)
        r = subprocess.run([exe], capture_output=True, text=True, env=self.env)
        if r.returncode == 0 or "ERROR: LeakSanitizer" not in r.stderr or "4242 byte" not in r.stderr:
            fail(f"LeakSanitizer's positive control was not reported (exit {r.returncode}): {r.stderr[-400:]}")
        self.event(f"LeakSanitizer positive control: a leaked block of 4242 bytes reported (exit {r.returncode})")

    def setup(self):
        a = self.a
        if a.asan:
            self.lsan_control()
        self.kv_port = {n: free_port() for n in self.names if self.guest[n] == "kv"}
        self.listen = {s: {n: free_port() for n in self.names} for s in ("a", "b")}
        self.cut_vm = self.names[1 % len(self.names)]
        self.reload_vm = self.names[3 % len(self.names)]
        self.image_vm = self.names[2 % len(self.names)]
        if a.churn:
            self.proxy = Proxy(self.listen["b"][self.cut_vm])
            self.bus = Bus(self.tmp)
        fence = self.write_fence()
        for n in self.names:
            self.start_vmm(n)
        os.makedirs(os.path.join(self.tmp, "b"), exist_ok=True)
        self.keys = {s: {n: self.vm_keys(s, n, i, fence) for i, n in enumerate(self.names)} for s in ("a", "b")}
        self.B = Daemon(self.tmp, "b", self.keys["b"], a, self.env)
        self.A = Daemon(self.tmp, "a", self.keys["a"], a, self.env, bus=self.bus)
        t = time.monotonic()
        for n in self.names:
            self.A.wait(n, lambda s: s["state"] == "protected", f"{n} protected", timeout=120)
        log(f"all {len(self.names)} VMs protected after {time.monotonic() - t:.1f} s")
        for n in self.names:
            if self.guest[n] != "kv":
                vcpu_renice(self.vmms[n].pid, a.vcpu_nice, settle=0.5)
        for n in self.names:
            if self.guest[n] == "kv":
                self.kv[n] = KvClient(n, self.kv_port[n])
        self.event("all VMs protected; clients started")

    # ---- sampling -------------------------------------------------------------------------

    def sampler(self):
        k = 0
        while not self.stop_sampling:
            t0 = time.monotonic()
            snap = {}
            for side, d in (("a", self.A), ("b", self.B)):
                try:
                    if d.alive():
                        snap[side] = d.status()
                except (OSError, ValueError) as e:
                    self.sample_errors.append((round(now(), 2), side, str(e)))
            with self.lock:
                self.samples.append((now(), snap))
            if k % max(1, int(self.a.mem_interval / self.a.poll)) == 0:
                m = {}
                for side, d in (("a", self.A), ("b", self.B)):
                    try:
                        m[side] = proc_mem(d.pid)
                    except OSError:
                        pass
                with self.lock:
                    self.mem.append((now(), m, float(open("/proc/loadavg").read().split()[0])))
            k += 1
            time.sleep(max(0.0, self.a.poll - (time.monotonic() - t0)))

    # ---- the failover ---------------------------------------------------------------------

    def failover(self):
        v = self.victim
        self.t_kill = now()
        self.event(f"SIGKILL the primary VMM of {v}")
        self.vmms[v].stop(signal.SIGKILL)
        self.event(f"the killed VMM of {v} is reaped ({now() - self.t_kill:.2f} s: the kernel closes its sockets "
                   "only after tearing down its memory)")
        st = self.B.wait(v, lambda s: s["role"] == "primary" and s["state"] not in ("activating",),
                         f"{v} promoted on the standby", timeout=60)
        self.t_promoted = now()
        self.event(f"{v} promoted on the standby host ({st['state']}) {self.t_promoted - self.t_kill:.2f} s "
                   "after the kill")
        # From now on the VM's primary VMM is the one the standby host's daemon started: a
        # fence against that host must wait for it (a spurious loss is then refused).
        kids = []
        for pid in self.B.children():  # the fence command may still be one of them
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if os.path.basename(argv[0]) == b"dirtyrep-vmm" and v.encode() in argv:
                kids.append(pid)
        if len(kids) != 1:
            fail(f"{v} promoted, but the standby host's daemon has {len(kids)} VMM children for it")
        with open(os.path.join(self.tmp, f"{v}.pid"), "w") as f:
            f.write(f"{kids[0]}\n")
        if self.guest[v] != "kv":
            vcpu_renice(kids[0], self.a.vcpu_nice, settle=0.5)
        st = self.A.wait(v, lambda s: s["state"] in ("attaching", "failed"), f"{v}'s old primary sees its VMM gone")
        self.event(f"{v}'s old primary: {st['state']}: {st['detail'][:100]}")
        r = self.A.req(f"demote {v}")
        if not r.startswith("ok"):
            fail(f"demote {v} on the old primary answered {r.strip()!r}")
        self.event(f"{v} demoted to standby on the old primary host")
        self.B.wait(v, lambda s: s["state"] == "protected", f"{v} protected again (the other way round)",
                    timeout=120)
        self.t_rejoined = now()
        self.event(f"{v} protected again from the standby host {self.t_rejoined - self.t_kill:.2f} s after the kill")

    # ---- churn (leak run) -----------------------------------------------------------------

    def ctl(self, *args):
        r = subprocess.run([self.env["DR_DIRTYREPCTL"], "--bus-address", self.bus.address, *args],
                           capture_output=True, text=True, timeout=60, env=self.env)
        if r.returncode != 0:
            fail(f"dirtyrepctl {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
        return r.stdout

    def churn_step(self, k):
        kind = k % 5
        if kind == 0:
            n = self.proxy.cut()
            self.event(f"link cut: {n} connection(s) of {self.cut_vm} through the proxy")
            self.A.wait(self.cut_vm, lambda s: s["state"] == "protected", f"{self.cut_vm} resynced after the cut")
        elif kind == 1:
            d = os.path.join(self.tmp, "images", f"img{k}")
            os.makedirs(os.path.dirname(d), exist_ok=True)
            parent = getattr(self, "last_image", None)
            r = self.A.req(f"image {self.image_vm} {d}" + (f" {parent}" if parent else ""), timeout=120)
            if not r.startswith("ok"):
                fail(f"image of {self.image_vm}: {r.strip()}")
            self.last_image = d
            self.event(f"image of {self.image_vm} ({'incremental' if parent else 'full'}): {r.strip()}")
        elif kind == 2:
            keys = self.keys["a"][self.reload_vm]
            keys["EpochMs"] = "30" if keys["EpochMs"] == "20" else "20"
            self.A.write_vm(self.reload_vm, keys)
            self.A.proc.send_signal(signal.SIGHUP)
            self.event(f"reload (SIGHUP): {self.reload_vm} EpochMs={keys['EpochMs']}")
            time.sleep(1.0)
            self.A.wait(self.reload_vm, lambda s: s["state"] == "protected", f"{self.reload_vm} after the reload")
        elif kind == 3:
            self.ctl("detach", self.reload_vm)
            self.A.wait(self.reload_vm, lambda s: s["state"] == "detached", f"{self.reload_vm} detached")
            time.sleep(1.0)
            self.ctl("attach", self.reload_vm)
            self.A.wait(self.reload_vm, lambda s: s["state"] == "protected", f"{self.reload_vm} after attach")
            self.event(f"D-Bus detach + attach of {self.reload_vm}")
        else:
            out = self.ctl("checkpoint", self.cut_vm)
            self.event(f"D-Bus checkpoint of {self.cut_vm}: {out.strip()[:80]}")

    # ---- the run --------------------------------------------------------------------------

    def run(self):
        a = self.a
        self.setup()
        th = threading.Thread(target=self.sampler, daemon=True)
        th.start()
        t_start = now()
        self.t_start = t_start
        t_fail = t_start + a.duration * a.failover_at
        t_end = t_start + a.duration
        failed_over = False
        k = 0
        next_churn = t_start + a.warmup / 2
        while now() < t_end:
            for p in (self.A, self.B):
                if not p.alive():
                    fail(f"{p.tag} exited with {p.proc.returncode}:\n{p.tail()}")
            if not failed_over and now() >= t_fail:
                self.failover()
                failed_over = True
                next_churn = max(next_churn, now() + a.churn_interval)
            elif a.churn and now() >= next_churn and now() < t_end - 20 and (failed_over or now() < t_fail - 20):
                self.churn_step(k)
                k += 1
                next_churn = now() + a.churn_interval
            time.sleep(0.2)
        self.stop_sampling = True
        th.join()
        for c in self.kv.values():
            c.stopped = True
        for c in self.kv.values():
            c.thread.join(5)
        self.t_stop = now()

    def shutdown(self):
        """Clean stop: primary daemon, standby daemon (it stops the VMM its promotion started),
        the VMMs; returns {tag: exit status}."""
        rcs = {}
        for p in (self.A, self.B):
            if p and p in LIVE:
                rcs[p.tag] = p.stop(signal.SIGTERM, timeout=60)
        for n, p in self.vmms.items():
            if p in LIVE:
                rcs[p.tag] = p.stop(signal.SIGTERM, timeout=30)
        if self.bus and self.bus in LIVE:
            self.bus.stop()
        return rcs

    # ---- analysis -------------------------------------------------------------------------

    def side_of(self, vm, t):
        """Which daemon is vm's primary at time t."""
        if vm == self.victim and getattr(self, "t_kill", None) is not None and t >= self.t_kill:
            return "b"
        return "a"

    def vm_records(self, vm):
        """vm's samples on its current primary, split into segments, one per Primary object
        (a failover, a reload or an attach starts a new one, whose counters start at 0):
        [[(t, epochs_committed, commit_gaps, commit_gap_max_usec, status), ...], ...]."""
        segs = []
        last = None
        for t, snap in self.samples:
            side = self.side_of(vm, t)
            st = snap.get(side, {}).get(vm)
            if not st or st["role"] != "primary" or "commit_gaps" not in st:
                continue
            rec = (t, st["epochs_committed"], st["commit_gaps"], st["commit_gap_max_usec"], st)
            if last is None or side != last[0] or rec[1] < last[1][1]:
                segs.append([])
            segs[-1].append(rec)
            last = (side, rec)
        return segs

    @staticmethod
    def window(segs, lo, hi):
        """Commits, the inter-commit gap histogram and the exact longest gap (when it was
        set inside the window, else None) of the commits whose ACK arrived in [lo, hi]."""
        hist = [0] * len(GAP_EDGES_MS) + [0]
        n = 0
        exact = None
        span = 0.0
        for seg in segs:
            rs = [r for r in seg if lo <= r[0] <= hi]
            if len(rs) < 2:
                continue
            a_, b = rs[0], rs[-1]
            n += b[1] - a_[1]
            span += b[0] - a_[0]
            hist = [h + y - x for h, x, y in zip(hist, a_[2], b[2])]
            if b[3] > a_[3]:
                exact = max(exact or 0, b[3] / 1000)
        return n, hist, exact, span

    @staticmethod
    def top_bucket(hist):
        """(lower, upper) edge in ms of the highest non-empty bucket, or None."""
        for i in range(len(hist) - 1, -1, -1):
            if hist[i]:
                return (GAP_EDGES_MS[i - 1] if i else 0, GAP_EDGES_MS[i] if i < len(GAP_EDGES_MS) else None)
        return None

    def analyse(self, rcs):
        a = self.a
        warm = self.t_start + a.warmup
        tk = getattr(self, "t_kill", None)
        tr = getattr(self, "t_rejoined", None)
        res = {"vms": {}, "daemons": {}, "events": self.events, "gap_bucket_edges_ms": GAP_EDGES_MS}
        series = {}
        for vm in self.names:
            segs = self.vm_records(vm)
            pts = []
            base = 0
            for seg in segs:
                for r in seg:
                    pts.append((r[0], base + r[1], r[4]))
                base += seg[-1][1]
            series[vm] = pts
            excl = (tk, tr + 10) if (vm == self.victim and tk is not None and tr is not None) else None
            ranges = [(warm, self.t_stop)] if not excl else [(warm, excl[0]), (excl[1], self.t_stop)]
            n, hist, exact, span = 0, [0] * (len(GAP_EDGES_MS) + 1), None, 0.0
            for lo, hi in ranges:
                n2, h2, e2, s2 = self.window(segs, lo, hi)
                n += n2
                span += s2
                hist = [x + y for x, y in zip(hist, h2)]
                if e2 is not None:
                    exact = max(exact or 0, e2)
            # 10 s windows after the warm-up: every one must hold a commit.
            empty = []
            w = warm
            while w + 10 <= self.t_stop:
                if not (excl and w + 10 > excl[0] and w < excl[1]):
                    if self.window(segs, w, w + 10)[0] <= 0:
                        empty.append(round(w - self.t_start, 1))
                w += 10
            p50s = [st["pause_ns_p50"] / 1e6 for t, c, st in pts if t >= warm]
            p99s = [st["pause_ns_p99"] / 1e6 for t, c, st in pts if t >= warm]
            top = self.top_bucket(hist)
            v = {"guest": self.guest[vm], "epochs_committed": pts[-1][1] if pts else 0,
                 "epochs_per_s": round(n / span, 2) if span else 0,
                 "gap_histogram": hist,
                 "max_gap_bucket_ms": list(top) if top else None,
                 "max_gap_ms": round(exact, 1) if exact is not None else None,
                 "pause_p50_ms": round(statistics.median(p50s), 3) if p50s else None,
                 "pause_p99_ms_median": round(statistics.median(p99s), 3) if p99s else None,
                 "pause_p99_ms_max": round(max(p99s), 3) if p99s else None,
                 "empty_10s_windows": empty}
            if tk is not None and tr is not None:
                if vm == self.victim:
                    v["failed_over"] = True
                else:
                    nb, hb, eb, sb = self.window(segs, tk - 60, tk)
                    nd, hd, ed, sd = self.window(segs, tk, tr + 10)
                    na, ha, ea, sa = self.window(segs, tk, tk + 60)
                    v["rate_before"] = round(nb / sb, 2) if sb else 0
                    v["rate_after"] = round(na / sa, 2) if sa else 0
                    v["gaps_before"] = hb
                    v["gaps_failover"] = hd
                    tb, td = self.top_bucket(hb), self.top_bucket(hd)
                    v["max_gap_before_bucket_ms"] = list(tb) if tb else None
                    v["max_gap_failover_bucket_ms"] = list(td) if td else None
                    v["max_gap_failover_ms"] = round(ed, 1) if ed is not None else None
                    # No gap above 500 ms during the failover, or none in a higher bucket than the
                    # minute before already had; and at least 80 % of the epoch rate.
                    i500 = GAP_EDGES_MS.index(500) + 1
                    ib = max((i for i, h in enumerate(hb) if h), default=0)
                    over = sum(hd[max(i500, ib + 1):])
                    v["undisturbed"] = nd > 0 and over == 0 and v["rate_after"] >= 0.8 * v["rate_before"]
            res["vms"][vm] = v
        self.series = series

        # Memory: least-squares slope over the warm-up .. failover and settled .. end segments.
        segs = [("before failover", warm, tk if tk else self.t_stop)]
        if tr:
            segs.append(("after failover", tr + 30, self.t_stop))
        for side, tag in (("a", "primary dirtyrepd"), ("b", "standby dirtyrepd")):
            ms = [(t, m[side]) for t, m, _ in self.mem if side in m]
            if not ms:
                continue
            d = {"rss_kib_first": ms[0][1]["rss"], "rss_kib_last": ms[-1][1]["rss"],
                 "rss_kib_max": max(m["rss"] for _, m in ms), "pss_kib_last": ms[-1][1]["pss"],
                 "anon_kib_last": ms[-1][1]["anonymous"], "fds_first": ms[0][1]["fds"],
                 "fds_last": ms[-1][1]["fds"], "fds_max": max(m["fds"] for _, m in ms),
                 "threads_last": ms[-1][1]["threads"], "segments": []}
            flat = True
            for sname, lo, hi in segs:
                pts = [(t / 60, m["rss"]) for t, m in ms if lo <= t <= hi]
                apts = [(t / 60, m["anonymous"]) for t, m in ms if lo <= t <= hi]
                slope, _ = linfit(pts)
                aslope, _ = linfit(apts)
                if slope is None:
                    continue
                mean = sum(p[1] for p in pts) / len(pts)
                ok = slope * 10 <= 0.01 * mean and (aslope is None or aslope * 10 <= 0.01 * mean)
                flat = flat and ok
                d["segments"].append({"segment": sname, "from_s": round(lo - self.t_start, 1),
                                      "to_s": round(hi - self.t_start, 1), "samples": len(pts),
                                      "rss_mean_kib": round(mean), "rss_slope_kib_per_min": round(slope, 2),
                                      "anon_slope_kib_per_min": round(aslope, 2) if aslope is not None else None,
                                      "growth_pct_per_10min": round(slope * 10 / mean * 100, 3), "flat": ok})
            d["flat"] = flat and bool(d["segments"])
            res["daemons"][tag] = d

        # The kv clients: acknowledged INCRs never go backwards across the failover.
        kvres = {}
        for n, c in self.kv.items():
            vals = [x[1] for x in c.acked]
            lat = [x[2] * 1000 for x in c.acked]
            lost = any(b < a_ for a_, b in zip(vals, vals[1:]))
            kvres[n] = {"acked": len(vals), "errors": len(c.errors), "last": vals[-1] if vals else None,
                        "latency_p50_ms": round(pct(lat, 0.5), 2) if lat else None,
                        "latency_p99_ms": round(pct(lat, 0.99), 2) if lat else None,
                        "acknowledged_write_lost": lost}
        res["kv_clients"] = kvres

        # Sanitizer reports in any log; daemons' exit statuses.
        reports = []
        for f in sorted(os.listdir(self.tmp)):
            if f.endswith(".log"):
                with open(os.path.join(self.tmp, f), errors="replace") as fh:
                    for i, line in enumerate(fh):
                        if any(mk in line for mk in SANITIZER_MARKS):
                            reports.append(f"{f}:{i + 1}: {line.strip()[:200]}")
        res["sanitizer_reports"] = reports
        res["exit_status"] = rcs
        others = [v for k_, v in res["vms"].items() if k_ != self.victim]
        res["verdicts"] = {
            "all_committing": all(not v["empty_10s_windows"] and v["epochs_committed"] > 0 for v in res["vms"].values()),
            "memory_flat": all(d["flat"] for d in res["daemons"].values()) and len(res["daemons"]) == 2,
            "others_undisturbed": bool(tk) and all(v.get("undisturbed") for v in others),
            "failover_done": bool(tr),
            "no_acknowledged_write_lost": not any(k["acknowledged_write_lost"] for k in kvres.values()),
            "clean_exit": all(rc == 0 for tag, rc in rcs.items() if tag in ("a", "b")),
        }
        if a.asan:
            res["verdicts"]["no_sanitizer_reports"] = not reports
        if a.churn:
            # Link cuts, reloads and detach/attach resync VMs on purpose, and resyncs allocate:
            # shown, but not a verdict of the leak run.
            res["informational"] = {k: res["verdicts"].pop(k) for k in ("memory_flat", "others_undisturbed")}
        # Heartbeat losses nobody caused (the bench's link cuts close connections instead).
        lost = []
        for p in (self.A, self.B):
            for line in p.text().splitlines():
                if "nothing received for" in line and "replication link" in line:
                    lost.append(f"{p.tag}: {line.strip()[:200]}")
        res["heartbeat_losses"] = lost
        res["failover"] = {"vm": self.victim, "kill_s": round(tk - self.t_start, 2) if tk else None,
                           "promoted_after_s": round(self.t_promoted - tk, 3) if tk else None,
                           "protected_again_after_s": round(tr - tk, 3) if tr else None}
        loads = [la for _, _, la in self.mem]
        res["run"] = {"duration_s": round(self.t_stop - self.t_start, 1), "vms": len(self.names),
                      "memory": a.memory, "epoch_ms": 20, "poll_s": a.poll, "mem_interval_s": a.mem_interval,
                      "warmup_s": a.warmup, "heartbeat": f"{a.heartbeat_ms} ms x {a.heartbeat_misses}",
                      "vcpu_nice": a.vcpu_nice, "asan": a.asan, "churn": a.churn,
                      "loadavg_median": round(statistics.median(loads), 2) if loads else None,
                      "loadavg_max": round(max(loads), 2) if loads else None, "cpus": os.cpu_count(),
                      "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "kernel": os.uname().release, "status_errors": len(self.sample_errors),
                      "guests": {n: f"{self.guest[n]} {APPEND[self.guest[n]]}" for n in self.names},
                      "command": " ".join(["bench/load-bench.py"] + sys.argv[1:])}
        return res

    # ---- output ---------------------------------------------------------------------------

    def plot(self, res, out_dir):
        gp = shutil.which("gnuplot")
        if not gp:
            return None
        data = os.path.join(out_dir, "data")
        os.makedirs(data, exist_ok=True)
        name = self.a.name
        with open(os.path.join(data, f"{name}-mem.dat"), "w") as f:
            for t, m, la in self.mem:
                f.write(f"{t - self.t_start:.1f} {m.get('a', {}).get('rss', 0) / 1024:.2f} "
                        f"{m.get('b', {}).get('rss', 0) / 1024:.2f} {m.get('a', {}).get('anonymous', 0) / 1024:.2f} "
                        f"{m.get('b', {}).get('anonymous', 0) / 1024:.2f} {la}\n")
        plots = []
        for vm, pts in self.series.items():
            p = os.path.join(data, f"{name}-epochs-{vm}.dat")
            with open(p, "w") as f:
                for t, c, _ in pts[::5]:
                    f.write(f"{t - self.t_start:.1f} {c}\n")
            plots.append(f'"{p}" using 1:2 with lines lw 2 title "{vm} ({self.guest[vm]})"')
        tk = res["failover"]["kill_s"]
        arrow = (f'set arrow from {tk},graph 0 to {tk},graph 1 nohead dt 2 lc rgb "#c00000"\n'
                 f'set label "failover of {self.victim}" at {tk},graph 0.95 right offset -0.5,0\n') if tk else ""
        path = os.path.join(out_dir, f"{name}.png")
        mem = os.path.join(data, f"{name}-mem.dat")
        script = f'''set terminal pngcairo size 1000,800 font "sans,11"
set output "{path}"
set multiplot layout 2,1 title "{len(self.names)} VMs under one dirtyrepd, {res['run']['duration_s']:.0f} s"
set grid
set key top left
set xlabel "s"
set ylabel "MiB"
{arrow}set title "daemon memory (RSS; anonymous)"
plot "{mem}" using 1:2 with lines lw 2 title "primary RSS", "{mem}" using 1:3 with lines lw 2 title "standby RSS", \\
     "{mem}" using 1:4 with lines dt 2 title "primary anon", "{mem}" using 1:5 with lines dt 2 title "standby anon"
set title "epochs committed per VM (on its current primary)"
set ylabel "epochs"
set key top left
plot {", ".join(plots)}
unset multiplot
'''
        r = subprocess.run([gp], input=script, text=True, capture_output=True)
        if r.returncode != 0:
            log("gnuplot:", r.stderr.strip()[:300])
            return None
        return path

    def write(self, res, out_dir):
        os.makedirs(out_dir, exist_ok=True)
        png = self.plot(res, out_dir)
        res["plot"] = os.path.basename(png) if png else None
        name = self.a.name
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(res, f, indent=2)
        r = res["run"]
        md = [f"# {'Leak run' if self.a.asan else 'Load run'}: {r['vms']} VMs under one dirtyrepd", "",
              f"`{r['command']}`", "",
              f"{r['when']}, {r['duration_s']} s measured, {r['cpus']} CPUs shared with other work (load average "
              f"median {r['loadavg_median']}, max {r['loadavg_max']}), kernel {r['kernel']}. VMs of "
              f"{r['memory']}, 20 ms epochs, heartbeats {r['heartbeat']}, vCPU threads at nice {r['vcpu_nice']}"
              f"{', AddressSanitizer + UndefinedBehaviorSanitizer + LeakSanitizer' if r['asan'] else ''}"
              f"{', churn (link cuts, images, reloads, detach/attach, checkpoints)' if r['churn'] else ''}. "
              f"Status polled every {r['poll_s']} s, memory every "
              f"{r['mem_interval_s']} s; warm-up {r['warmup_s']} s.", "", "## Verdicts", ""]
        for k, v in res["verdicts"].items():
            md.append(f"- {k.replace('_', ' ')}: **{'yes' if v else 'NO'}**")
        for k, v in res.get("informational", {}).items():
            md.append(f"- {k.replace('_', ' ')}: {'yes' if v else 'no'} (shown, not a verdict of this run)")
        md += ["", f"Links declared lost on missed heartbeats (nobody cut them): {len(res['heartbeat_losses'])}"]
        md += [f"- `{x}`" for x in res["heartbeat_losses"][:20]]
        fo = res["failover"]
        md += ["", f"Failover of {fo['vm']} at {fo['kill_s']} s: promoted on the standby host after "
               f"{fo['promoted_after_s']} s, protected again (old primary demoted to its standby, full resync) "
               f"after {fo['protected_again_after_s']} s.", "", "## Per VM", "",
               "Gaps are times between two ACKs that advanced a VM's committed epoch, counted by the "
               "primary dirtyrepd into buckets with upper bounds " + ", ".join(f"{e}" for e in GAP_EDGES_MS) +
               " ms and above (debug socket status `commit_gaps`, `commit_gap_max_usec`); the exact longest "
               "gap is shown where the daemon's running maximum was set inside the window.", "",
               "| VM | guest | epochs committed | epochs/s | gap histogram | longest gap ms | pause p50 ms | "
               "pause p99 ms (median / max of windows) | epochs/s before / after failover | longest gap before / "
               "during failover ms | undisturbed |", "|---|---|---|---|---|---|---|---|---|---|---|"]

        def bucket(b):
            return "—" if not b else (f"{b[0]}-{b[1]}" if b[1] else f">{b[0]}")

        def hist(h):
            return " ".join(str(x) for x in h)
        for vm, v in res["vms"].items():
            longest = v["max_gap_ms"] if v["max_gap_ms"] is not None else bucket(v["max_gap_bucket_ms"])
            md.append(f"| {vm} | {v['guest']} | {v['epochs_committed']} | {v['epochs_per_s']} | {hist(v['gap_histogram'])} | "
                      f"{longest} | {v['pause_p50_ms']} | {v['pause_p99_ms_median']} / {v['pause_p99_ms_max']} | "
                      + ("failed over | — | — |" if v.get("failed_over") else
                         f"{v.get('rate_before')} / {v.get('rate_after')} | {bucket(v.get('max_gap_before_bucket_ms'))} / "
                         f"{v.get('max_gap_failover_ms') or bucket(v.get('max_gap_failover_bucket_ms'))} | "
                         f"{'yes' if v.get('undisturbed') else 'no'} |"))
        md += ["", "## Daemons", "", "| daemon | RSS first / last / max KiB | PSS last KiB | anon last KiB | fds first / "
               "last / max | threads |", "|---|---|---|---|---|---|"]
        for tag, d in res["daemons"].items():
            md.append(f"| {tag} | {d['rss_kib_first']} / {d['rss_kib_last']} / {d['rss_kib_max']} | {d['pss_kib_last']} | "
                      f"{d['anon_kib_last']} | {d['fds_first']} / {d['fds_last']} / {d['fds_max']} | {d['threads_last']} |")
        md += ["", "| daemon | segment | s | samples | mean RSS KiB | RSS slope KiB/min | anon slope KiB/min | "
               "growth %/10 min | flat (< 1 %) |", "|---|---|---|---|---|---|---|---|---|"]
        for tag, d in res["daemons"].items():
            for s in d["segments"]:
                md.append(f"| {tag} | {s['segment']} | {s['from_s']}-{s['to_s']} | {s['samples']} | {s['rss_mean_kib']} | "
                          f"{s['rss_slope_kib_per_min']} | {s['anon_slope_kib_per_min']} | {s['growth_pct_per_10min']} | "
                          f"{'yes' if s['flat'] else 'no'} |")
        if res["kv_clients"]:
            md += ["", "## kv clients (INCR every 0.1 s, one connection, reconnecting)", "",
                   "| VM | acknowledged | errors | latency p50 / p99 ms | acknowledged write lost |", "|---|---|---|---|---|"]
            for n, k in res["kv_clients"].items():
                md.append(f"| {n} | {k['acked']} | {k['errors']} | {k['latency_p50_ms']} / {k['latency_p99_ms']} | "
                          f"{'YES' if k['acknowledged_write_lost'] else 'no'} |")
        md += ["", "## Events", ""] + [f"- {t - self.t_start:.1f} s: {w}" for t, w in res["events"]]
        md += ["", "## Exit statuses", ""] + [f"- {k}: {v}" for k, v in res["exit_status"].items()]
        if self.a.asan:
            md += ["", "## Sanitizer reports", ""] + ([f"- `{x}`" for x in res["sanitizer_reports"]] or ["none"])
        if png:
            md += ["", f"![{os.path.basename(png)}]({os.path.basename(png)})"]
        with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
            f.write("\n".join(md) + "\n")
        log(f"wrote {out_dir}/{name}.json, {name}.md" + (f", {name}.png" if png else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(ROOT, "build-bench"))
    ap.add_argument("--duration", type=float, default=600, help="seconds measured after every VM is protected")
    ap.add_argument("--vms", type=int, default=8)
    ap.add_argument("--memory", default="64M")
    ap.add_argument("--warmup", type=float, default=60)
    ap.add_argument("--failover-at", type=float, default=0.5, help="fraction of the duration")
    ap.add_argument("--poll", type=float, default=0.25)
    ap.add_argument("--mem-interval", type=float, default=2.0)
    ap.add_argument("--heartbeat-ms", type=int, default=50)
    ap.add_argument("--heartbeat-misses", type=int, default=10)
    ap.add_argument("--vcpu-nice", type=int, default=19, help="nice of spinning guests' vCPU threads (-1: leave)")
    ap.add_argument("--churn", action="store_true", help="link cuts, images, reloads, detach/attach (leak run)")
    ap.add_argument("--churn-interval", type=float, default=15)
    ap.add_argument("--asan", action="store_true", help="sanitizer build: fail on any sanitizer report")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--name", default="load")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory with every log")
    a = ap.parse_args()
    if a.vcpu_nice < 0:
        a.vcpu_nice = None
    if not os.path.exists("/dev/kvm"):
        print("load-bench: /dev/kvm is missing", file=sys.stderr)
        return 77
    if a.vms < 2:
        print("load-bench: --vms must be at least 2 (one fails over, the others must not notice)", file=sys.stderr)
        return 2
    if a.churn and a.vms < 4:
        print("load-bench: --churn needs --vms 4 or more", file=sys.stderr)
        return 2

    def on_term(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Fail("terminated by SIGTERM")
    signal.signal(signal.SIGTERM, on_term)
    random.seed(1)
    b = Bench(a)
    log(f"logs in {b.tmp}")
    rc = 1
    res = None
    try:
        b.run()
        rcs = b.shutdown()
        res = b.analyse(rcs)
        b.write(res, a.out_dir)
        bad = [k for k, v in res["verdicts"].items() if not v]
        log("verdicts:", json.dumps(res["verdicts"]))
        rc = 1 if bad else 0
    except Fail as e:
        log("FAIL:", e)
        for p in LIVE:
            log(f"--- {p.tag} ---\n{p.tail()}")
    finally:
        b.stop_sampling = True
        if b.proxy:
            b.proxy.close()
        for p in list(LIVE):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.stop(signal.SIGKILL, timeout=10)
        if rc == 0 and not a.keep:
            shutil.rmtree(b.tmp, ignore_errors=True)
        else:
            log("logs kept in", b.tmp)
    return rc


if __name__ == "__main__":
    sys.exit(main())

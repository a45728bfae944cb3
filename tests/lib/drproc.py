# SPDX-License-Identifier: GPL-2.0-or-later
"""The base of the Python test library (tests/lib/README.md):
processes a test or a benchmark started, stopped only by their PID (or their
own process group); dirtyrepd's debug socket; a private system-like
dbus-daemon.

Two ways to fail share it. fail() here raises Fail, and the test's main()
catches it, dumps the logs and cleans up (drtest.py, the namespace tests);
loopback.fail() dumps every process in LIVE, kills them and exits 1 at once
(loopback.py, control.py). A Proc subclass names the one it uses in its
`fail` attribute; every process of every family is in the one list LIVE.
"""
import json
import os
import signal
import socket
import subprocess
import time

ENV = os.environ
# scripts/test sets it for the slower sanitized build: heartbeats, client timeouts and run times stretch.
SLOW = float(ENV.get("DR_TEST_SLOWDOWN", "1"))
LIVE = []  # every Proc not yet reaped: the cleanup of a test kills what is left
SRCDIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def log(*a):
    print(*a, flush=True)


class Fail(Exception):
    pass


def fail(msg):
    raise Fail(msg)


def build_env(build, *guests, ctl=False, env=None):
    """The DR_* variables meson gives the tests, for a benchmark run by hand: the executables of
    the build directory build (dirtyrepctl too with ctl) and the guests named, unless set.
    Returns env (default os.environ), changed in place."""
    env = os.environ if env is None else env
    build = os.path.abspath(build)  # daemons are handed these paths (Vmm= must be absolute)
    env.setdefault("DR_VMM", os.path.join(build, "vmm/ref/dirtyrep-vmm"))
    env.setdefault("DR_DIRTYREPD", os.path.join(build, "daemon/dirtyrepd"))
    if ctl:
        env.setdefault("DR_DIRTYREPCTL", os.path.join(build, "client/dirtyrepctl"))
    for g in guests:
        env.setdefault(f"DR_GUEST_{g.upper()}", os.path.join(build, f"vmm/guests/{g}.elf"))
    return env


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Proc:
    """A process this test started; only we stop it, by PID (or its own process group).

    A family of processes (drtest.Proc, loopback.Proc) sets the class attributes:
    fail, how a failure is reported; say, the log; group, the process group of
    its processes (None: the caller's, 0: their own); logmode, how its output file
    is opened; and may override logname(), its output file in tmp; shown(), what
    the "+" line logs (None: no line); popen(), how it is started. pipe: stdout is
    a pipe (text) for the caller to read, stderr goes to the output file."""

    fail = staticmethod(fail)
    say = staticmethod(log)
    dump_lines = 25
    group = None
    stop_s = 15
    logmode = "w"

    def logname(self, tag):
        return tag + ".log"

    def shown(self, tag, cmd):
        return " ".join(cmd)

    def popen(self, cmd, env, group, pipe):
        kw = {} if group is None else {"process_group": group}
        if pipe:
            kw.update(stdout=subprocess.PIPE, stderr=self.err, text=True)
        else:
            kw.update(stdout=self.err, stderr=subprocess.STDOUT)
        return subprocess.Popen(cmd, env=env, **kw)

    def __init__(self, tmp, tag, cmd, env=None, group=None, pipe=False):
        self.tag = tag
        self.errlog = os.path.join(tmp, self.logname(tag))
        self.err = open(self.errlog, self.logmode)
        shown = self.shown(tag, cmd)
        if shown is not None:
            self.say("+", shown)
        self.proc = self.popen(cmd, env, self.group if group is None else group, pipe)
        self.pid = self.proc.pid
        LIVE.append(self)

    def text(self):
        with open(self.errlog, errors="replace") as f:
            return f.read()

    def dump(self, n=None):
        self.say(f"--- {self.tag} (last lines of {self.errlog}) ---\n" +
                 "\n".join(self.text().splitlines()[-(n or self.dump_lines):]))

    def alive(self):
        return self.proc.poll() is None

    def exitcode(self):
        return self.proc.returncode

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

    def stop(self, timeout=None, sig=signal.SIGTERM):
        """Signals the process (SIGTERM) and waits; returns its exit status. One that
        does not exit within timeout seconds (stop_s) is killed, and that fails the test."""
        timeout = timeout or self.stop_s
        if self in LIVE:
            LIVE.remove(self)
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.fail(f"{self.tag} did not stop on signal {sig} within {timeout}s")
        return self.proc.returncode


def terminate(popen, timeout=15):
    """SIGTERM to a bare subprocess.Popen that still runs, SIGKILL if it has not exited within
    timeout seconds; waits for it."""
    if popen.poll() is None:
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()


def wait_path(proc, path, what, timeout=20, poll=0.02, dump=True):
    """Waits until path exists while proc runs (dump: its log if it exited)."""
    end = time.time() + timeout
    while not os.path.exists(path):
        if not proc.alive():
            if dump:
                proc.dump()
            proc.fail(f"{proc.tag} exited with {proc.proc.returncode}")
        if time.time() > end:
            proc.fail(f"{proc.tag}: {what} never appeared")
        time.sleep(poll)


def unix_request(path, line, timeout=30):
    """One request line to a unix stream socket; the whole answer (until the peer closes)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(line.encode() + b"\n")
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    finally:
        s.close()
    return out.decode()


class DebugSocket:
    """dirtyrepd's debug socket (--debug-socket; self.debug is its path), for a Proc (or
    a class with its tag, fail, alive(), exitcode() and pid).
    connect_s: how long a refused connection is retried (the socket file exists from
    bind(), the daemon listens a moment later); poll_s: how often wait() asks."""

    connect_s = 4.0
    poll_s = 0.02
    wait_s = 30
    connect_fails = False  # a connection never made fails the test (else: the error is raised)

    def req(self, line, timeout=30):
        end = time.time() + self.connect_s
        while True:
            try:
                return unix_request(self.debug, line, timeout)
            except (ConnectionRefusedError, FileNotFoundError):
                if self.connect_fails:
                    if not self.alive():
                        self.fail(f"{self.tag} exited")
                    if time.time() > end:
                        self.fail(f"{self.tag}: debug socket never answered")
                elif time.time() > end:
                    raise
                time.sleep(self.poll_s)

    def req_settled(self, line, tries=100, timeout=30, connected=False):
        """req(line), asked again (tries times, 50 ms apart) while the daemon answers busy
        (or, with connected, "not connected": a link still being re-established)."""
        for _ in range(tries):
            r = self.req(line, timeout)
            if "busy" not in r and not (connected and "not connected" in r.lower()):
                break
            time.sleep(0.05)
        return r

    def freeze(self, vm="t", tries=200):
        """Freezes VM vm right after a seal; returns that epoch. The daemon answers busy or not
        connected at once while it still has ACKs or a reconnect to process: asked again."""
        r = self.req_settled(f"freeze {vm}", tries, connected=True)
        if not r.startswith("ok"):
            self.fail(f"{self.tag}: freeze {vm} answered {r.strip()!r}")
        return int(r.split()[1])

    def ok(self, line, timeout=30):
        r = self.req(line, timeout)
        if not r.startswith("ok"):
            self.fail(f"{self.tag}: '{line}' answered {r.strip()!r}")
        return int(r.split()[1])

    def status(self, vm="t"):
        for line in self.req(f"status {vm}").splitlines():
            st = json.loads(line)
            if st.get("vm", vm) == vm:
                return st
        self.fail(f"{self.tag}: no status for VM {vm}")

    def wait(self, pred, what, timeout=None, vm="t"):
        timeout = timeout or self.wait_s
        end = time.time() + timeout
        st = None
        while time.time() < end:
            if not self.alive():
                self.fail(f"{self.tag} exited with {self.exitcode()} while waiting for {what}")
            st = self.status(vm)
            if pred(st):
                return st
            time.sleep(self.poll_s)
        self.fail(f"{self.tag}: timed out after {timeout} s waiting for {what}; last status {st}")

    def vmm_pids(self):
        """The VMM(s) this daemon started (its children)."""
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []


def write_daemon_conf(d, heartbeat_ms=None, misses=None, runtime=None, state=None):
    """d/dirtyrep.conf: the [Daemon] section of a test's dirtyrepd; returns its path."""
    path = os.path.join(d, "dirtyrep.conf")
    with open(path, "w") as f:
        f.write("[Daemon]\n")
        if heartbeat_ms is not None:
            f.write(f"HeartbeatIntervalMs={heartbeat_ms}\nHeartbeatMisses={misses}\n")
        f.write(f"RuntimeDirectory={runtime or d}\nStateDirectory={state or d}\n")
    return path


def dirtyrepd_cmd(d, debug, exe=None):
    """dirtyrepd with d/dirtyrep.conf, the VMs of d/vm.d and the debug socket debug."""
    return [exe or ENV["DR_DIRTYREPD"], "--config", os.path.join(d, "dirtyrep.conf"), "--config-dir",
            os.path.join(d, "vm.d"), "--debug-socket", debug]


def write_secret(path, secret):
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(secret)
    return path


def write_vm_conf(path, keys, secret_file=None):
    """A [VM] file from keys (a None value drops the key); SecretFile= last if given."""
    with open(path, "w") as f:
        f.write("[VM]\n" + "".join(f"{k}={v}\n" for k, v in keys.items() if v is not None) +
                (f"SecretFile={secret_file}\n" if secret_file else ""))


BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path={socket}</listen>
  <!-- The distribution's system.conf defaults: deny method calls and owning names,
       then services punch holes with their policy files. -->
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
{introspect}  </policy>
  <include>{policy}</include>
</busconfig>
"""

BUS_INTROSPECT = """\
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
"""

PERMISSIVE_POLICY = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy context="default">
    <allow own="org.dirtyrep1"/>
    <allow send_destination="org.dirtyrep1"/>
  </policy>
</busconfig>
"""


class Bus(Proc):
    """A private system-like dbus-daemon in TMP/DIRNAME (default the tag) whose
    configuration includes the project's real policy file systemd/org.dirtyrep1.conf
    (permissive: a policy that allows everything, as a wrong or missing one would).
    introspect: the bus's own Introspectable and Properties interfaces may be called
    too; world: the socket is reachable for any uid (the unprivileged-caller checks).
    A family's Bus is class Bus(ItsProc, drproc.Bus), for its way to fail."""

    def __init__(self, tmp, tag="bus", dirname=None, permissive=False, introspect=False, world=False, **kw):
        d = os.path.join(tmp, dirname or tag)
        os.makedirs(d, exist_ok=True)
        if world:
            os.chmod(d, 0o755)
        self.socket = os.path.join(d, "bus.sock")
        self.address = "unix:path=" + self.socket
        policy = os.path.join(ENV.get("DR_SRCDIR", SRCDIR), "systemd", "org.dirtyrep1.conf")
        if permissive:
            policy = os.path.join(d, "permissive.conf")
            with open(policy, "w") as f:
                f.write(PERMISSIVE_POLICY)
        conf = os.path.join(d, "bus.conf")
        with open(conf, "w") as f:
            f.write(BUS_CONF.format(socket=self.socket, policy=policy, introspect=BUS_INTROSPECT if introspect else ""))
        super().__init__(tmp, tag, ["dbus-daemon", "--config-file=" + conf, "--nofork", "--nopidfile"], **kw)
        end = time.time() + 10
        while True:  # the socket file exists from bind(); wait until it accepts
            if not self.alive() or time.time() > end:
                self.fail(f"{self.tag}: dbus-daemon did not come up: {self.text()}")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.socket)
                break
            except OSError:
                time.sleep(0.05)
            finally:
                s.close()
        if world:
            os.chmod(self.socket, 0o777)

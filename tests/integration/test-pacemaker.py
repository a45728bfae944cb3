#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""The Pacemaker resource agent ocf:dirtyrep:dirtyrep with real parts (docs/pacemaker.md).

  test-pacemaker.py ocf-tester   one container (Debian 12 with pacemaker, corosync, crmsh,
                                 resource-agents, fence-agents; the project built with
                                 --prefix=/usr and installed with `meson install`), booted
                                 with systemd-nspawn: dirtyrep.service serves VM t as a
                                 standby with FailoverPolicy=cluster; a second dirtyrepd
                                 (its own unit, --bus=none) is the peer host's primary with
                                 the reference VMM and the dirtier guest. A peer loop plays
                                 the other host: while the standby has no protected replica
                                 it (re)starts the peer primary and its VMM; once the
                                 standby is protected, it kills them (a host death). Then
                                 `ocf-tester` runs every action of the installed agent
                                 (meta-data against ra-api-1.dtd, validate-all, monitor and
                                 probe stopped/running, start twice, notify, three
                                 promotions onto a fresh replica each, demotions, stop
                                 twice, reload) and must pass; by hand: a probe where the VM
                                 is not configured answers "not running", FailoverPolicy=auto
                                 fails validate-all with OCF_ERR_INSTALLED.
  test-pacemaker.py kill-primary three containers n1, n2 (dirtyrepd + the kv guest) and n3
                                 (quorum) on a bridge in a network namespace, corosync knet
                                 (token 1500 ms), Pacemaker with the promotable clone, an
                                 IPaddr2 service address after the promoted instance and
                                 STONITH by fence_drhost (kills a node's container from the
                                 host). Five times (DR_PCMK_TRIALS): a redis-cli INCR loop,
                                 SIGKILL to the primary's container init; the cluster must
                                 fence it and promote the standby, every acknowledged INCR
                                 is found (strictly rising), the killed node boots, rejoins,
                                 gets a full resync and the next kill fails back to it.
                                 crm_mon -1 -r is checked each time (nodes online, quorum,
                                 fence device started, Promoted/Unpromoted, no failures).
                                 The kill-to-service-back times go to DR_PCMK_RESULT (JSON)
                                 when set (bench/pacemaker-bench.py).
  test-pacemaker.py partition    the same cluster; n1 (primary)'s switch port goes down (its
                                 traffic dropped both ways) while one client INCRs through
                                 the service address and another on n1's own loopback: n1
                                 loses quorum, the majority fences it and promotes n2; each
                                 client's acknowledged values rise strictly, no value is
                                 acknowledged twice, and the next INCR on n2 is above all.
  test-pacemaker.py cluster-smoke  the same cluster without a VM (runs without /dev/kvm):
                                 quorum, the agent starts standbys on n1 and n2 (n1's stale
                                 Role=primary demoted), nothing promoted without a replica,
                                 stonith_admin --fence n2 kills its container, n2 rejoins;
                                 n1's switch port down: the majority fences it.

The containers' tree is made once per build directory (tests/lib/pmtree.py); each
run boots fresh overlays of it. Exit 0 pass, 1 fail, 77 skip (says why).
"""
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import pmtree  # noqa: E402

tsd = pmtree.tsd
log, fail, check, run = tsd.log, tsd.fail, tsd.check, tsd.run
ENV = os.environ
AGENT = "/usr/lib/ocf/resource.d/dirtyrep/dirtyrep"
SECRET = "pacemaker-test-shared-secret-0123456789\n"


class Node:
    """One container: an overlay of the cached tree, booted with systemd-nspawn -b in its own session."""

    def __init__(self, tmp, name, cache, b, net_args):
        self.name = name
        self.dir = os.path.join(tmp, name)
        self.root = os.path.join(self.dir, "root")
        self.res = os.path.join(self.dir, "res")
        self.cache, self.b, self.net_args = cache, b, net_args
        self.proc = None
        self.leader = None
        for d in ("root", "upper", "work", "res", "dr"):
            os.makedirs(os.path.join(self.dir, d), exist_ok=True)
        c = run(["mount", "-t", "overlay", "overlay", "-o",
                 f"lowerdir={cache},upperdir={self.dir}/upper,workdir={self.dir}/work", self.root])
        check(c.returncode == 0, f"mounting the overlay: {c.stderr}")
        tsd.install(b, self.root)
        check(os.path.exists(os.path.join(self.root, AGENT.lstrip("/"))), f"{AGENT} not installed by meson")
        with open(os.path.join(self.root, "etc/machine-id"), "w"):
            pass
        with open(os.path.join(self.root, "etc/hostname"), "w") as f:
            f.write(name + "\n")

    def write(self, path, text, mode=0o644):
        p = os.path.join(self.root, path.lstrip("/"))
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w") as f:
            f.write(text)

    def boot(self, timeout=120):
        self.start()
        self.wait_booted(timeout)

    def start(self):
        cmd = ["systemd-nspawn", "-q", "-D", self.root, "--register=no", "--keep-unit", *self.net_args,
               "-M", f"drpm{os.getpid() % 100000}{self.name}"[:64], "--hostname", self.name, f"--bind={self.res}:/run/dr-results",
               f"--bind-ro={self.dir}/dr:/run/dr"] + (["--bind=/dev/kvm"] if os.path.exists("/dev/kvm") else []) + [
               "-b", "--", "systemd.firstboot=off"]
        log("+", " ".join(cmd))
        self.console = open(os.path.join(self.dir, "nspawn.log"), "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.console, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.leader = None

    def wait_booted(self, timeout=240):
        """Until `systemctl is-system-running` in the container says running or degraded (a failed unit is
        for the test to judge). On a timeout, fails with what it last said and systemd's jobs and failed units."""
        end = time.time() + timeout
        while time.time() < end:
            # The container's init, not nspawn's first child: that one can be its short-lived outer child,
            # and every nsenter into it after it exits fails ("stat of /proc/PID/ns/user failed").
            self.leader = tsd.container_init(self.proc.pid)
            if self.leader:
                break
            check(self.proc.poll() is None, f"{self.name}: systemd-nspawn exited: {self.log_tail()}")
            time.sleep(0.1)
        check(self.leader, f"{self.name}: no container init within {timeout} s: {self.log_tail()}")
        c = subprocess.CompletedProcess([], None, "", "not run: no time left")
        while time.time() < end:
            check(self.proc.poll() is None,
                  f"{self.name}: systemd-nspawn exited ({self.proc.returncode}) while booting: {self.log_tail()}")
            c = self.sh("systemctl is-system-running", timeout=10, quiet=True)
            if c.stdout.strip() in ("running", "degraded"):
                return
            time.sleep(0.5)
        fail(f"{self.name} did not boot within {timeout} s: {self.boot_diagnosis(c)}\n"
             f"console (tail):\n{self.log_tail()}")

    def boot_diagnosis(self, last):
        """What the container's systemd says about a boot that did not finish: the last is-system-running
        (output, errors, exit status), its queued jobs and its failed units."""
        alive = os.path.exists(f"/proc/{self.leader}")
        text = [f"init PID {self.leader} ({'alive' if alive else 'gone'}); systemctl is-system-running: "
                f"exit {last.returncode}, stdout {last.stdout.strip()!r}, stderr {last.stderr.strip()!r}"]
        for cmd in ("systemctl list-jobs --no-pager", "systemctl --failed --no-pager"):
            c = self.sh(cmd, timeout=20, quiet=True)
            text.append(f"$ {cmd} (exit {c.returncode})\n{(c.stdout + c.stderr).rstrip()}")
        return "\n".join(text)

    def log_tail(self):
        return open(os.path.join(self.dir, "nspawn.log"), errors="replace").read()[-3000:]

    def sh(self, script, timeout=60, quiet=False):
        cmd = ["nsenter", "-t", str(self.leader), "-a", "/bin/sh", "-c", script]
        if not quiet:
            log(f"[{self.name}] $ {script}")
        try:
            c = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            return subprocess.CompletedProcess(cmd, 124, out, "timeout")
        if not quiet:
            for line in (c.stdout + c.stderr).rstrip().splitlines()[-60:]:
                log(f"[{self.name}]   {line}")
        return c

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        """SIGKILL to the container's init ends every process in its PID namespace (a host losing power)."""
        if self.leader:
            try:
                os.kill(self.leader, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                tsd.kill_group(self.proc)
        self.leader = None

    def destroy(self):
        if self.proc and self.proc.poll() is None:
            self.kill()
        tsd.umount_under(self.root)


def prepare():
    """(cache, usr build, lock) or an exit code (77 with the reason printed)."""
    for tool in ("systemd-nspawn", "debootstrap", "nsenter"):
        if not shutil.which(tool):
            print(f"SKIP: {tool} is not installed")
            return None
    b = tsd.usr_build(ENV["DR_BUILDDIR"])
    cache, why, lock = pmtree.cluster_tree(ENV["DR_BUILDDIR"], tsd.runtime_packages(b))
    if not cache:
        print(f"SKIP: no container tree: {why}")
        return None
    return cache, b, lock


# ---- ocf-tester ----------------------------------------------------------------------------------

# The other host, played inside the one container: its primary runs while the standby (the agent's)
# has no protected replica, and dies (SIGKILL, with its VMM) once it has one.
PEER_LOOP = r"""#!/bin/sh
while :; do
    j=$(dirtyrepctl --json status t 2>/dev/null)
    role=$(printf '%s' "$j" | sed -n 's/.*, "Role": "\([a-z]*\)".*/\1/p')
    state=$(printf '%s' "$j" | sed -n 's/.*, "State": "\([a-z]*\)".*/\1/p')
    peer=$(systemctl is-active dr-peer)
    if [ "$role" = standby ] && [ "$state" = protected ] && [ "$peer" = active ]; then
        echo "$(date +%T.%N) standby protected: killing the peer primary and its VMM"
        systemctl kill -s KILL dr-peer dr-peer-vmm
        systemctl reset-failed dr-peer dr-peer-vmm 2>/dev/null
    elif [ "$role" = standby ] && [ "$state" != protected ] && [ "$peer" != active ]; then
        echo "$(date +%T.%N) standby $state: starting the peer primary"
        systemctl stop dr-peer-vmm 2>/dev/null; systemctl reset-failed dr-peer dr-peer-vmm 2>/dev/null
        rm -f /run/dirtyrep-peer/t.sock
        systemd-run -q --unit=dr-peer-vmm --property=Type=exec /usr/bin/dirtyrep-vmm --name t \
            --kernel /run/dr/dirtier.elf --cpus 1 --memory 64M --control /run/dirtyrep-peer/t.sock \
            --console /run/dr-results/peer-console.log --append "ws=2M rate=2000"
        systemd-run -q --unit=dr-peer --property=Type=exec /usr/sbin/dirtyrepd --bus=none \
            --config /etc/dirtyrep-peer/dirtyrep.conf --config-dir /etc/dirtyrep-peer/vm.d
    fi
    sleep 0.2
done
"""


def test_ocf_tester(cache, b):
    with tempfile.TemporaryDirectory(prefix=f"dr-pcmk-{os.getpid()}-") as tmp:
        n = Node(tmp, "drtester", cache, b, ["--private-network"])
        try:
            return ocf_tester_in(n)
        finally:
            n.destroy()


def ocf_tester_in(n):
    n.write("/etc/dirtyrep/secret", SECRET, 0o600)
    n.write("/etc/dirtyrep/vm.d/t.conf",
            "[VM]\nRole=standby\nListen=127.0.0.1:7741\nPeer=127.0.0.1:7742\nSecretFile=/etc/dirtyrep/secret\n"
            "FailoverPolicy=cluster\nVmm=/usr/bin/dirtyrep-vmm\n")
    n.write("/etc/dirtyrep-peer/dirtyrep.conf",
            "[Daemon]\nRuntimeDirectory=/run/dirtyrep-peer\nStateDirectory=/var/lib/dirtyrep-peer\n")
    n.write("/etc/dirtyrep-peer/vm.d/t.conf",
            "[VM]\nRole=primary\nPeer=127.0.0.1:7741\nListen=127.0.0.1:7742\nSecretFile=/etc/dirtyrep/secret\n"
            "FailoverPolicy=cluster\n")
    with open(os.path.join(n.dir, "dr", "peer-loop.sh"), "w") as f:
        f.write(PEER_LOOP)
    shutil.copy(ENV["DR_GUEST_DIRTIER"], os.path.join(n.dir, "dr", "dirtier.elf"))
    n.boot()
    c = n.sh("mkdir -p /run/dirtyrep-peer /var/lib/dirtyrep-peer && systemctl start dirtyrep && "
             "dirtyrepctl status t")
    # status exits 10 for a standby without a replica yet (dirtyrepctl(1), EXIT STATUS)
    check(c.returncode in (0, 10) and "standby" in c.stdout, "dirtyrep.service did not start the standby")
    c = n.sh("command -v ocf-tester")
    check(c.returncode == 0, "ocf-tester is not in the container (package resource-agents)")
    c = n.sh("systemd-run -q --unit=dr-peer-loop --property=Type=exec sh /run/dr/peer-loop.sh")
    check(c.returncode == 0, "cannot start the peer loop")

    t0 = time.time()
    # Each promotion waits for the peer loop's VM to boot and fully sync (at most half the operation
    # timeout): room for a loaded host.
    c = n.sh(f"ocf-tester -v -n t -o vm=t -o CRM_meta_timeout=240000 {AGENT}", timeout=900)
    took = time.time() - t0
    peer = n.sh("journalctl -u dr-peer-loop --no-pager -o cat | tail -20", quiet=True).stdout
    log("peer loop:\n" + peer)
    out = c.stdout + c.stderr
    if c.returncode != 0:
        n.sh("journalctl --no-pager -o short-monotonic -u dirtyrep | tail -60")
        fail(f"ocf-tester failed (exit {c.returncode}) after {took:.1f} s")
    check(re.search(r"\S+ passed all tests", out), f"ocf-tester did not say it passed: {out[-2000:]}")
    for what in ("Testing: promote", "Testing: demote", "Testing: stop", "Testing: start",
                 "Testing: monitor"):
        check(what in out, f"ocf-tester did not run {what!r}")
    # A promotion really ran on the replica: the daemon's own log line, and the peer was killed for it.
    j = n.sh("journalctl -u dirtyrep --no-pager -o cat", quiet=True).stdout
    promos = re.findall(r"guest running on this host ([\d.]+) ms after the promotion began", j)
    check(promos, "no promotion in dirtyrepd's journal")
    check("FailoverPolicy=cluster: waiting for the cluster" in j, "the standby did not wait for the cluster")
    check("promoting to primary" in j and "forced" not in j, "a promotion was forced")
    log(f"ocf-tester passed in {took:.1f} s; promotions: {', '.join(promos)} ms (guest running after the "
        f"promotion began)")

    # By hand: a node that does not have the VM answers probes "not running" (7); FailoverPolicy=auto is
    # refused on this node (OCF_ERR_INSTALLED, 5: a node-local problem).
    env = "OCF_ROOT=/usr/lib/ocf OCF_RESOURCE_INSTANCE=t"
    c = n.sh(f"{env} OCF_RESKEY_vm=nosuch OCF_RESKEY_CRM_meta_interval=0 {AGENT} monitor; echo rc=$?")
    check("rc=7" in c.stdout, "a probe of an unconfigured VM is not 'not running'")
    n.sh("sed 's/FailoverPolicy=cluster/FailoverPolicy=auto/' /etc/dirtyrep/vm.d/t.conf > /tmp/auto.conf")
    c = n.sh(f"{env} OCF_RESKEY_vm=t OCF_RESKEY_config=/tmp/auto.conf {AGENT} validate-all; echo rc=$?")
    check("rc=5" in c.stdout, "validate-all accepted FailoverPolicy=auto")
    log("PASS: ocf-tester passes on ocf:dirtyrep:dirtyrep; probe and validate-all by hand")
    return 0


# ---- the three-node cluster ----------------------------------------------------------------------

NODES = ("n1", "n2", "n3")  # n1, n2 run the VM; n3 only gives quorum
IP = {"n1": "10.79.0.1", "n2": "10.79.0.2", "n3": "10.79.0.3", "c": "10.79.0.99"}
SVC = "10.79.0.50"  # the service address: ocf:heartbeat:IPaddr2, colocated with the promoted instance
KV_PORT = 6379
REPL_PORT = 7000
# Corosync: token 1500 ms (knet), consensus 1.2 x token; both bound the detection of a lost node.
TOKEN_MS = 1500
PEER = {"n1": "n2", "n2": "n1"}
FENCE_AGENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fence_drhost")

COROSYNC_CONF = f"""totem {{
    version: 2
    cluster_name: drpm
    transport: knet
    token: {TOKEN_MS}
    crypto_cipher: none
    crypto_hash: none
}}
nodelist {{
""" + "".join(f"    node {{\n        ring0_addr: {IP[n]}\n        name: {n}\n        nodeid: {i + 1}\n    }}\n"
              for i, n in enumerate(NODES)) + """}
quorum {
    provider: corosync_votequorum
}
logging {
    to_syslog: yes
    to_logfile: no
}
"""

CIB_RESOURCES = """<resources>
  <primitive id="fence" class="stonith" type="fence_drhost">
    <instance_attributes id="fence-ia">
      <nvpair id="fence-hosts" name="pcmk_host_list" value="n1 n2 n3"/>
    </instance_attributes>
    <operations><op id="fence-mon" name="monitor" interval="60s"/></operations>
  </primitive>
  <primitive id="vip" class="ocf" provider="heartbeat" type="IPaddr2">
    <instance_attributes id="vip-ia">
      <nvpair id="vip-ip" name="ip" value="10.79.0.50"/>
      <nvpair id="vip-mask" name="cidr_netmask" value="24"/>
      <nvpair id="vip-nic" name="nic" value="eth0"/>
    </instance_attributes>
    <operations><op id="vip-mon" name="monitor" interval="5s"/></operations>
  </primitive>
  <clone id="kv-clone">
    <meta_attributes id="kv-clone-meta">
      <nvpair id="kv-promotable" name="promotable" value="true"/>
      <nvpair id="kv-promoted-max" name="promoted-max" value="1"/>
      <nvpair id="kv-clone-max" name="clone-max" value="2"/>
      <nvpair id="kv-clone-node-max" name="clone-node-max" value="1"/>
      <nvpair id="kv-notify" name="notify" value="true"/>
    </meta_attributes>
    <primitive id="kv" class="ocf" provider="dirtyrep" type="dirtyrep">
      <instance_attributes id="kv-ia"><nvpair id="kv-vm" name="vm" value="kv"/></instance_attributes>
      <operations>
        <op id="kv-mon-p" name="monitor" interval="3s" role="Promoted" timeout="20s"/>
        <op id="kv-mon-u" name="monitor" interval="4s" role="Unpromoted" timeout="20s"/>
        <op id="kv-start" name="start" interval="0s" timeout="60s"/>
        <op id="kv-stop" name="stop" interval="0s" timeout="60s"/>
        <op id="kv-promote" name="promote" interval="0s" timeout="90s"/>
        <op id="kv-demote" name="demote" interval="0s" timeout="60s"/>
      </operations>
    </primitive>
  </clone>
</resources>"""

CIB_CONSTRAINTS = """<constraints>
  <rsc_location id="kv-not-on-n3" rsc="kv-clone" node="n3" score="-INFINITY"/>
  <rsc_colocation id="vip-with-primary" rsc="vip" with-rsc="kv-clone" with-rsc-role="Promoted"
                  score="INFINITY"/>
  <rsc_order id="vip-after-promote" first="kv-clone" first-action="promote" then="vip" then-action="start"/>
</constraints>"""

CIB_PROPERTIES = [("stonith-enabled", "true"), ("stonith-action", "off"), ("no-quorum-policy", "stop"),
                  ("stonith-timeout", "60s"), ("cluster-recheck-interval", "1min")]


class FenceServer:
    """The power switch of the test's nodes: kills a node's container on request (fence_drhost)."""

    def __init__(self, path, cluster):
        import socket
        import threading
        self.cluster = cluster
        self.events = []  # (time, action, node)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        os.chmod(path, 0o666)
        self.sock.listen(8)
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    words = conn.makefile().readline().split()
                    reply = self.handle(words)
                    conn.sendall((reply + "\n").encode())
                except OSError:
                    pass

    def handle(self, words):
        if words[:1] == ["list"]:
            return " ".join(NODES)
        if words[:1] == ["monitor"]:
            return "ok"
        if len(words) != 2 or words[1] not in self.cluster.nodes:
            return "error"
        action, node = words
        n = self.cluster.nodes[node]
        if action == "status":
            return "on" if n.alive() else "off"
        if action in ("off", "reboot"):
            log(f"FENCE: {action} {node} (container alive: {n.alive()})")
            if n.alive() and not self.events:
                # The first fencing of a run: what the node said before it dies (why it is fenced).
                n.sh("grep -E 'Actions:|exit-reason|Result of|unpack_rsc_op|fenced:|pe_fence_node' "
                     "/var/log/pacemaker/pacemaker.log | grep -v debug | tail -40", timeout=20)
            n.kill()
            self.events.append((time.time(), action, node))
            return "ok"
        if action == "on":
            return "ok" if n.alive() else "error"
        return "error"

    def close(self):
        self.sock.close()


class Cluster:
    def __init__(self, tmp, cache, b):
        self.tmp = tmp
        self.tag = f"drpm{os.getpid() % 100000}"
        self.ns = {h: f"{self.tag}{h}" for h in NODES + ("c", "s")}
        self.nodes = {}
        self.fence = None
        self.net_up()
        fdir = os.path.join(tmp, "fence")
        os.makedirs(fdir)
        self.fence = FenceServer(os.path.join(fdir, "sock"), self)
        for name in NODES:
            # nspawn keeps CAP_NET_ADMIN only with --private-network, not with a network namespace
            # of ours: IPaddr2 (the vip) and dirtyrepd's own addresses need it.
            n = Node(tmp, name, cache, b, [f"--network-namespace-path=/run/netns/{self.ns[name]}",
                                           "--capability=CAP_NET_ADMIN", f"--bind={fdir}:/run/dr-fence"])
            self.nodes[name] = n
            self.configure(n)

    def ip(self, *args, ns=None):
        cmd = ["ip"] + (["-n", ns] if ns else []) + list(args)
        c = subprocess.run(cmd, capture_output=True, text=True)
        check(c.returncode == 0, f"{' '.join(cmd)}: {c.stderr}")

    def net_up(self):
        for n in self.ns.values():
            self.ip("netns", "add", n)
        s = self.ns["s"]
        self.ip("link", "add", "br0", "type", "bridge", ns=s)
        self.ip("link", "set", "br0", "up", ns=s)
        self.ip("link", "set", "lo", "up", ns=s)
        for h in NODES + ("c",):
            self.ip("link", "add", f"v{h}", "netns", s, "type", "veth", "peer", "name", "eth0", "netns", self.ns[h])
            self.ip("link", "set", f"v{h}", "master", "br0", "up", ns=s)
            self.ip("addr", "add", f"{IP[h]}/24", "dev", "eth0", ns=self.ns[h])
            self.ip("link", "set", "eth0", "up", ns=self.ns[h])
            self.ip("link", "set", "lo", "up", ns=self.ns[h])

    def net_down(self):
        for n in self.ns.values():
            subprocess.run(["ip", "netns", "del", n], capture_output=True)

    def port(self, name, up):
        """The node's switch port: down drops its traffic in both directions (a partition)."""
        self.ip("link", "set", f"v{name}", "up" if up else "down", ns=self.ns["s"])

    def configure(self, n):
        name = n.name
        n.write("/etc/corosync/corosync.conf", COROSYNC_CONF)
        n.write("/usr/sbin/fence_drhost", open(FENCE_AGENT).read(), 0o755)
        # dirtyrepd before Pacemaker (its probes need it).
        n.write("/etc/systemd/system/pacemaker.service.d/dirtyrep.conf",
                "[Unit]\nWants=dirtyrep.service\nAfter=dirtyrep.service\n")
        wants = os.path.join(n.root, "etc/systemd/system/multi-user.target.wants")
        os.makedirs(wants, exist_ok=True)
        for unit, path in (("dirtyrep.service", "/usr/lib/systemd/system/dirtyrep.service"),
                           ("corosync.service", "/lib/systemd/system/corosync.service"),
                           ("pacemaker.service", "/lib/systemd/system/pacemaker.service")):
            link = os.path.join(wants, unit)
            if not os.path.lexists(link):
                os.symlink(path, link)
        shutil.copy(ENV["DR_GUEST_KV"], os.path.join(n.dir, "dr", "kv.elf"))
        if name not in PEER:
            return
        n.write("/etc/dirtyrep/secret", SECRET, 0o600)
        n.write("/etc/dirtyrep/dirtyrep.conf", "[Daemon]\nHeartbeatIntervalMs=50\nHeartbeatMisses=10\n")
        # The initial roles: n1 runs the VM at first. After a failover this file still says so; the agent
        # turns a node that comes back with Role=primary and no VM into a standby.
        n.write("/etc/dirtyrep/vm.d/kv.conf",
                f"[VM]\nRole={'primary' if name == 'n1' else 'standby'}\n"
                f"Peer={IP[PEER[name]]}:{REPL_PORT}\nListen={IP[name]}:{REPL_PORT}\n"
                "SecretFile=/etc/dirtyrep/secret\nFailoverPolicy=cluster\nSplitBrainPolicy=suspend\n"
                "SplitBrainTimeoutMs=3000\nEpochMs=20\nVmm=/usr/bin/dirtyrep-vmm\n"
                f"VmmArgs=--service-listen 0.0.0.0:{KV_PORT}\n")

    def boot(self, name):
        n = self.nodes[name]
        n.boot()
        c = n.sh("systemctl is-active corosync pacemaker dirtyrep || true", quiet=True)
        log(f"{name} booted: {' '.join(c.stdout.split())}")

    def crm_mon(self, via=None):
        for name in ([via] if via else NODES):
            n = self.nodes[name]
            if n.alive() and n.leader:
                c = n.sh("crm_mon -1 -r", timeout=20, quiet=True)
                if c.returncode == 0:
                    return c.stdout
        return ""

    def roles(self, via=None):
        """(promoted node or None, unpromoted nodes, the text) as crm_mon -1 shows them."""
        out = self.crm_mon(via)
        prom = re.search(r"Promoted: \[ (\S+) \]", out)
        unprom = re.search(r"Unpromoted: \[ ([^\]]+) \]", out)
        return (prom.group(1) if prom else None), (unprom.group(1).split() if unprom else []), out

    def dr(self, name):
        n = self.nodes[name]
        if not n.alive() or not n.leader:
            return {}
        c = n.sh("dirtyrepctl --json status kv", timeout=20, quiet=True)
        m = {}
        for k in ("Role", "State"):
            x = re.search(rf'"{k}": "([^"]*)"', c.stdout)
            m[k] = x.group(1) if x else None
        return m

    def wait_steady(self, primary, standby, timeout=240):
        """crm_mon shows primary Promoted and standby Unpromoted, and the standby is protected."""
        end = time.time() + timeout
        last = None
        while time.time() < end:
            p, u, out = self.roles()
            st = self.dr(standby)
            now = (p, tuple(u), st.get("State"))
            if now != last:
                log(f"cluster: promoted {p}, unpromoted {u}; {standby}: {st}")
                last = now
            if p == primary and standby in u and st.get("Role") == "standby" and st.get("State") == "protected":
                # The standby's promotion score (its monitor sets it once protected): without it the
                # cluster could not promote it.
                c = self.nodes[primary].sh(f"crm_attribute -t status -l reboot -N {standby} -n master-kv -G -q",
                                           timeout=20, quiet=True)
                if c.stdout.strip() == "100":
                    return out
            time.sleep(1)
        log(self.crm_mon())
        for name in PEER:
            if self.nodes[name].alive():
                self.nodes[name].sh("journalctl -u dirtyrep -u pacemaker-controld --no-pager -o short-monotonic "
                                    "| tail -40; crm_mon -1 -r -f")
        fail(f"the cluster did not reach {primary} promoted, {standby} protected within {timeout} s")

    def destroy(self):
        for n in self.nodes.values():
            n.destroy()
        if self.fence:
            self.fence.close()
        self.net_down()


def redis_ns(ns, ip, *args, timeout=1.0):
    try:
        r = subprocess.run(["ip", "netns", "exec", ns, "redis-cli", "-h", ip, "-p", str(KV_PORT), *args],
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    out = r.stdout.strip()
    if r.returncode != 0 or not out or out.startswith(("Could not", "Error", "ERR")):
        return None
    return out


class IncrLoop:
    """INCR in a background shell loop in a network namespace; every acknowledged reply with its time."""

    def __init__(self, tmp, ns, ip, key, tag):
        self.out = os.path.join(tmp, f"incr-{tag}.log")
        script = (f"while :; do r=$(timeout --foreground 0.5 redis-cli -h {ip} -p {KV_PORT} INCR {key} "
                  "2>/dev/null) && case $r in *[!0-9]*|'') ;; *) echo \"$(date +%s.%N) $r\";; esac; done")
        self.f = open(self.out, "w")
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, "sh", "-c", script], stdout=self.f,
                                     stderr=subprocess.DEVNULL, process_group=0)

    def values(self):
        vals = []
        with open(self.out) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[1].isdigit():
                    vals.append((float(parts[0]), int(parts[1])))
        return vals

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.f.close()
        return self.values()


def check_acked(acked, what):
    """Acknowledged INCR values must rise strictly: a repeat or a fall is a lost (or duplicated) write."""
    top = None
    for t, v in acked:
        check(top is None or v > top, f"{what}: acknowledged {v} after {top}: an acknowledged write was lost "
                                      "or applied twice")
        top = v
    return top


def start_cluster(tmp, cache, b, vm=True):
    cl = Cluster(tmp, cache, b)
    try:
        for name in NODES:
            cl.nodes[name].start()
        for name in NODES:
            cl.nodes[name].wait_booted()
        n1 = cl.nodes["n1"]
        if not vm:
            form_cluster(cl)
            return cl
        # The VM starts on n1 (the operator's first start); dirtyrepd there attaches as its primary.
        c = n1.sh(f"systemd-run -q --unit=kv-vmm --property=Type=exec /usr/bin/dirtyrep-vmm --name kv "
                  f"--kernel /run/dr/kv.elf --memory 64M --control /run/dirtyrep/kv.sock "
                  f"--console /run/dr-results/console.log --service-listen 0.0.0.0:{KV_PORT}")
        check(c.returncode == 0, "cannot start the VMM on n1")
        end = time.time() + 120
        while time.time() < end and cl.dr("n2").get("State") != "protected":
            time.sleep(0.5)
        if cl.dr("n2").get("State") != "protected":
            n1.sh("dirtyrepctl status; journalctl -u dirtyrep --no-pager | tail -20")
            cl.nodes["n2"].sh("dirtyrepctl status; journalctl -u dirtyrep --no-pager | tail -20")
            fail("n2 never became a protected standby before the cluster")
        form_cluster(cl)
        out = cl.wait_steady("n1", "n2")
        log("crm_mon -1 -r:\n" + out)
        check_crm_mon(out, "n1", "n2")
        return cl
    except BaseException:
        cl.destroy()
        raise


def form_cluster(cl):
    """A quorate three-node membership, then the properties and resources go into the CIB."""
    n1 = cl.nodes["n1"]
    if True:
        end = time.time() + 120
        while time.time() < end:
            c = n1.sh("corosync-quorumtool -s", timeout=20, quiet=True)
            if re.search(r"Quorate:\s+Yes", c.stdout) and re.search(r"Total votes:\s+3", c.stdout):
                break
            time.sleep(1)
        else:
            n1.sh("corosync-quorumtool -s; journalctl -u corosync --no-pager | tail -30")
            fail("corosync did not form a quorate three-node membership")
        for k, v in CIB_PROPERTIES:
            c = n1.sh(f"crm_attribute --type crm_config --name {k} --update {v}", timeout=30)
            check(c.returncode == 0, f"setting {k}")
        with open(os.path.join(n1.dir, "dr", "resources.xml"), "w") as f:
            f.write(CIB_RESOURCES)
        with open(os.path.join(n1.dir, "dr", "constraints.xml"), "w") as f:
            f.write(CIB_CONSTRAINTS)
        c = n1.sh("cibadmin --replace --scope resources --xml-file /run/dr/resources.xml && "
                  "cibadmin --replace --scope constraints --xml-file /run/dr/constraints.xml", timeout=30)
        check(c.returncode == 0, "loading the resources into the CIB")


def check_crm_mon(out, promoted, unpromoted):
    """What an operator expects to read: three nodes online, the fence device started, the VM promoted on
    the primary and unpromoted on the standby, nothing failed."""
    check(re.search(r"Online: \[ n1 n2 n3 \]", out), f"crm_mon: not all nodes online:\n{out}")
    check(re.search(r"partition with quorum", out), f"crm_mon: no quorum:\n{out}")
    check(re.search(r"fence\s+\(stonith:fence_drhost\):\s+Started", out), f"crm_mon: fence device:\n{out}")
    check(re.search(r"Clone Set: kv-clone \[kv\] \(promotable\)", out), f"crm_mon: no promotable clone:\n{out}")
    check(f"Promoted: [ {promoted} ]" in out and f"Unpromoted: [ {unpromoted} ]" in out,
          f"crm_mon: roles are not {promoted} promoted, {unpromoted} unpromoted:\n{out}")
    check("Failed Resource Actions" not in out, f"crm_mon shows failed actions:\n{out}")


def failover_once(cl, tmp, primary, standby, key, trial):
    """Kills the primary's container while a client INCRs; returns (kill to service back in ms, values)."""
    loop = IncrLoop(tmp, cl.ns["c"], SVC, key, f"{key}-{trial}")
    time.sleep(3)
    check(loop.values(), f"trial {trial}: no INCR acknowledged before the kill")
    fences = len(cl.fence.events)
    t_kill = time.time()
    log(f"trial {trial}: killing {primary} (its whole container)")
    cl.nodes[primary].kill()
    # Replies the primary sent while its container was being killed are not the service coming
    # back: only those acknowledged once it is dead.
    t_dead = time.time()
    end = time.time() + 120
    back = None
    while time.time() < end:
        after = [x for x in loop.values() if x[0] > t_dead]
        if after:
            back = after[0][0]
            break
        time.sleep(0.05)
    time.sleep(2)
    vals = loop.stop()
    if back is None:
        log(cl.crm_mon(standby))
        cl.nodes[standby].sh("journalctl -u dirtyrep -u pacemaker-controld -u pacemaker-fenced --no-pager "
                             "-o short-monotonic | tail -60")
        fail(f"trial {trial}: the service did not come back within 120 s of the kill")
    ms = (back - t_kill) * 1000
    ev = cl.fence.events[fences:]
    check(any(e[2] == primary for e in ev), f"trial {trial}: the cluster did not fence {primary}: {ev}")
    check(all(e[0] < back for e in ev if e[2] == primary), "service back before the fence completed")
    p, u, out = cl.roles(standby)
    check(p == standby, f"trial {trial}: crm_mon does not show {standby} promoted:\n{out}")
    top = check_acked(vals, f"trial {trial}")
    log(f"trial {trial}: {primary} killed, fenced, {standby} promoted; service back after {ms:.0f} ms; "
        f"{len(vals)} INCR acknowledged, last {top}")
    return ms, vals


def test_kill_primary(cache, b):
    trials = max(5, int(ENV.get("DR_PCMK_TRIALS", "5")))
    with tempfile.TemporaryDirectory(prefix=f"dr-pcmk-{os.getpid()}-") as tmp:
        cl = start_cluster(tmp, cache, b)
        try:
            primary, standby = "n1", "n2"
            acked, times = [], []
            for trial in range(1, trials + 1):
                ms, vals = failover_once(cl, tmp, primary, standby, "k", trial)
                times.append(ms)
                acked += vals
                check_acked(acked, f"after trial {trial}")
                # Fail back: the killed host comes back, rejoins, and gets a full resync as the standby.
                cl.boot(primary)
                out = cl.wait_steady(standby, primary)
                if trial == 1:
                    log("crm_mon -1 -r after the first failover and rejoin:\n" + out)
                check_crm_mon(out, standby, primary)
                primary, standby = standby, primary
            final = redis_ns(cl.ns["c"], SVC, "GET", "k", timeout=5)
            check(final is not None and int(final) >= acked[-1][1],
                  f"GET k = {final} below the last acknowledged {acked[-1][1]}")
            times.sort()
            p50 = times[len(times) // 2]
            log(f"failover (kill to service back) ms: {', '.join(f'{t:.0f}' for t in times)}; "
                f"p50 {p50:.0f}, max {times[-1]:.0f}")
            res = ENV.get("DR_PCMK_RESULT")
            if res:
                import json
                with open(res, "w") as f:
                    json.dump({"pacemaker_failover_ms": [round(t) for t in times],
                               "pacemaker_failover_p50_ms": round(p50),
                               "pacemaker_failover_max_ms": round(times[-1]), "corosync_token_ms": TOKEN_MS}, f)
            log(f"PASS: {trials} kills of the primary's container, each fenced and failed over by Pacemaker, "
                f"each failed back after a rejoin with full resync; {len(acked)} acknowledged INCRs, none lost "
                f"or repeated, GET {final}")
            return 0
        finally:
            cl.destroy()


def test_partition(cache, b):
    with tempfile.TemporaryDirectory(prefix=f"dr-pcmk-{os.getpid()}-") as tmp:
        cl = start_cluster(tmp, cache, b)
        try:
            outside = IncrLoop(tmp, cl.ns["c"], SVC, "p", "client")
            # A client on the primary's own host (its network namespace, loopback): it still reaches the
            # VM after the cut, so it sees any output the isolated primary releases.
            inside = IncrLoop(tmp, cl.ns["n1"], "127.0.0.1", "p", "n1-local")
            time.sleep(3)
            check(outside.values() and inside.values(), "no INCR acknowledged before the partition")
            t_cut = time.time()
            log("partition: n1's switch port down (both directions)")
            cl.port("n1", False)
            end = time.time() + 120
            while time.time() < end and not any(e[2] == "n1" for e in cl.fence.events):
                time.sleep(0.1)
            check(any(e[2] == "n1" for e in cl.fence.events), "the majority did not fence n1")
            t_fenced = next(e[0] for e in cl.fence.events if e[2] == "n1")
            end = time.time() + 120
            while time.time() < end and not [x for x in outside.values() if x[0] > t_cut]:
                time.sleep(0.1)
            time.sleep(2)
            out_vals, in_vals = outside.stop(), inside.stop()
            after = [x for x in out_vals if x[0] > t_cut]
            check(after, "the service did not come back on n2 within 120 s")
            p, u, mon = cl.roles("n2")
            log("crm_mon -1 -r on the majority:\n" + mon)
            check(p == "n2", "n2 is not promoted")
            check(re.search(r"OFFLINE: \[ n1 \]", mon), f"n1 not shown offline:\n{mon}")
            released = [x for x in in_vals if x[0] > t_cut]
            last_released = released[-1][0] - t_cut if released else 0
            # Each client's own replies rise strictly; across the two (concurrent) clients no value is
            # acknowledged twice; and the promoted replica's counter is above every acknowledged value.
            top = max(check_acked(out_vals, "partition, client"), check_acked(in_vals, "partition, n1-local"))
            both = [v for _, v in out_vals + in_vals]
            check(len(both) == len(set(both)), "a value was acknowledged to both clients: a write applied twice")
            final = redis_ns(cl.ns["c"], SVC, "INCR", "p", timeout=5)
            check(final is not None and int(final) > top, f"INCR after the partition gave {final}, not above {top}")
            log(f"partition: n1 fenced {1000 * (t_fenced - t_cut):.0f} ms after the cut; service back on n2 "
                f"{1000 * (after[0][0] - t_cut):.0f} ms after it; the isolated primary acknowledged "
                f"{len(released)} INCRs after the cut (the last {1000 * last_released:.0f} ms after it), each "
                f"committed before the cut: the next INCR on n2 gave {final} > {top}")
            log("PASS: the partitioned primary lost quorum and released nothing it had not committed; the "
                "majority fenced it and promoted the standby; no acknowledged write lost or repeated")
            return 0
        finally:
            cl.destroy()


def test_cluster_smoke(cache, b):
    """pacemaker-cluster-smoke, runs without /dev/kvm too: the cluster machinery alone. Three nodes form
    a quorate cluster; the agent starts the clone on n1 and n2 as standbys (n1's stale Role=primary without
    a VM is demoted by start), nothing is promoted (no replica: no score), n3 never runs it; STONITH
    through fence_drhost kills n2's container; n2 boots, rejoins and runs its standby again; n1 cut off
    (its switch port down) is fenced by the majority."""
    with tempfile.TemporaryDirectory(prefix=f"dr-pcmk-{os.getpid()}-") as tmp:
        cl = start_cluster(tmp, cache, b, vm=False)
        try:
            def wait_unpromoted(what, timeout=180):
                end = time.time() + timeout
                out = ""
                while time.time() < end:
                    p, u, out = cl.roles()
                    if sorted(u) == ["n1", "n2"] and re.search(r"Online: \[ n1 n2 n3 \]", out):
                        return out
                    time.sleep(1)
                for name in PEER:
                    cl.nodes[name].sh("journalctl -u pacemaker-controld -u pacemaker-execd -u dirtyrep --no-pager "
                                      "-o short-monotonic | tail -40")
                fail(f"{what}: the clone is not unpromoted on n1 and n2:\n{out}")
            out = wait_unpromoted("start")
            log("crm_mon -1 -r:\n" + out)
            check(re.search(r"fence\s+\(stonith:fence_drhost\):\s+Started", out), "fence device not started")
            check("Promoted: [" not in out, "a standby without a replica was promoted")
            for name in PEER:
                st = cl.dr(name)
                check(st.get("Role") == "standby", f"{name}: dirtyrepd role {st}")
                c = cl.nodes["n3"].sh(f"crm_attribute -t status -l reboot -N {name} -n master-kv -G -q", quiet=True)
                check(c.stdout.strip() in ("", "0") or c.returncode != 0,
                      f"{name} without a replica has promotion score {c.stdout.strip()}")
            c = cl.nodes["n1"].sh("journalctl -u dirtyrep --no-pager -o cat | grep -c 'demoting to standby'")
            check(c.stdout.strip() not in ("", "0"), "n1's stale Role=primary was not demoted by the agent's start")
            t0 = time.time()
            c = cl.nodes["n1"].sh("stonith_admin --fence n2 --timeout 60", timeout=90)
            check(c.returncode == 0, "stonith_admin --fence n2 failed")
            check(any(e[2] == "n2" for e in cl.fence.events) and not cl.nodes["n2"].alive(),
                  "fencing n2 did not kill its container")
            log(f"n2 fenced (its container killed) {time.time() - t0:.1f} s after stonith_admin --fence")
            end = time.time() + 60
            while time.time() < end and "OFFLINE: [ n2 ]" not in cl.crm_mon("n1"):
                time.sleep(0.5)
            mon = cl.crm_mon("n1")
            check("OFFLINE: [ n2 ]" in mon, f"n2 not offline after fencing:\n{mon}")
            cl.boot("n2")
            out = wait_unpromoted("rejoin")
            log("crm_mon -1 -r after n2 rejoined:\n" + out)
            # A partition (the switch port the partition test cuts): n1 alone has no quorum, the majority
            # fences it on its own.
            t_cut = time.time()
            cl.port("n1", False)
            end = time.time() + 120
            while time.time() < end and not any(e[2] == "n1" for e in cl.fence.events):
                time.sleep(0.1)
            check(any(e[2] == "n1" for e in cl.fence.events) and not cl.nodes["n1"].alive(),
                  "the majority did not fence the partitioned n1")
            t_fenced = next(e[0] for e in cl.fence.events if e[2] == "n1")
            end = time.time() + 60
            mon = ""
            while time.time() < end:
                mon = cl.crm_mon("n2")
                if "OFFLINE: [ n1 ]" in mon and "partition with quorum" in mon:
                    break
                time.sleep(0.5)
            check("OFFLINE: [ n1 ]" in mon and "partition with quorum" in mon,
                  f"the majority does not show n1 offline with quorum:\n{mon}")
            log(f"n1 partitioned: fenced by the majority {t_fenced - t_cut:.1f} s after its port went down")
            log("PASS: cluster formed, standbys started by the agent, nothing promoted without a replica, "
                "n2 fenced by fence_drhost and rejoined, a partitioned n1 fenced by the majority")
            return 0
        finally:
            cl.destroy()


def sweep_stale_runs():
    for d in glob.glob(os.path.join(tempfile.gettempdir(), "dr-pcmk-*-*")):
        m = re.match(r"dr-pcmk-(\d+)-", os.path.basename(d))
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            log(f"removing {d} left by a killed run")
            tsd.remove_tree(d)


def main():
    tests = {"ocf-tester": test_ocf_tester, "kill-primary": test_kill_primary,
             "partition": test_partition, "cluster-smoke": test_cluster_smoke}
    if len(sys.argv) != 2 or sys.argv[1] not in tests:
        print(__doc__)
        return 2
    if os.geteuid() != 0:
        print("SKIP: needs root (mount namespaces, systemd-nspawn)")
        return 77
    if not os.path.exists("/dev/kvm") and sys.argv[1] != "cluster-smoke":
        print("SKIP: /dev/kvm missing")
        return 77
    if ENV.get("DR_PCMK_MNTNS") != str(os.getpid()):
        os.environ["DR_PCMK_MNTNS"] = str(os.getpid())
        os.execvp("unshare", ["unshare", "--mount", "--propagation", "private", sys.executable,
                              os.path.abspath(__file__), sys.argv[1]])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("killed by SIGTERM (meson timeout?)"))
    sweep_stale_runs()
    p = prepare()
    if not p:
        return 77
    cache, b, lock = p
    try:
        return tests[sys.argv[1]](cache, b)
    finally:
        lock.close()


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""What an operator and a monitoring system see (issue 19), with real parts:
dirtyrep-vmm running a dirtier guest on KVM, two dirtyrepd on private
dbus-daemons, dirtyrepctl.

  status-exit-codes  every state produced for real and its exit code:
                     protected 0, unprotected 10 (a standby with no primary,
                     a detached VM, a primary whose standby is gone), suspended
                     11 (the split-brain guard), failed 12 (a role that could not
                     start); several VMs: the worst one decides
  events-json        `dirtyrepctl events --json`: every line parsed by a JSON
                     parser, the state dump first, timestamps, real changes
  metrics            `dirtyrepctl metrics [FILE]` parsed by prometheus_client's
                     text-format parser, values checked against status
  journal-fields     dirtyrepd's records in a real systemd-journald (a mount
                     namespace of the test's own): native records with VM=,
                     MESSAGE_ID= per event kind, EPOCH=, ERRNO=
  single-instance    a second dirtyrepd with the same configuration exits with
                     a clear error and touches nothing: the first keeps its bus
                     name, debug socket, lock and service address (in a network
                     namespace of the test's own)

Usage: test-operator.py status-exit-codes|events-json|metrics|single-instance|journal-fields
"""
import datetime
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
import control as ctlmod  # noqa: E402
from control import ENV, LIVE, Bus, Daemon, Proc, check, ctl, fail, free_port, log, pair  # noqa: E402


def status_rc(bus, vm=None):
    """(exit code, [VM dicts]) of `dirtyrepctl status [VM] --json`."""
    rc, out, err = ctl(bus, "status", *([vm] if vm else []), "--json")
    check(rc in (0, 10, 11, 12), f"status --json exited {rc}: {out} {err}")
    return rc, json.loads(out)


def wait_state(bus, want, vm="t", timeout=60):
    end = time.time() + timeout
    last = None
    while time.time() < end:
        rc, out, err = ctl(bus, "status", vm, "--json")
        if rc == 6:  # the daemon is not on the bus yet
            last = (rc, err.strip())
            time.sleep(0.1)
            continue
        check(rc in (0, 10, 11, 12), f"status --json exited {rc}: {out} {err}")
        l = json.loads(out)
        last = (rc, l[0]["State"] if l else None)
        if l and l[0]["State"] == want:
            return rc, l[0]
        time.sleep(0.1)
    fail(f"VM {vm} never reached state {want!r} (last: {last})")


def kvm_works():
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
        return True
    except OSError:
        return False


def skip_rest(what):
    """The parts without KVM passed; the rest cannot run here: say so and skip (exit 77)."""
    print(f"SKIP: /dev/kvm is missing or unusable: {what}; the parts without KVM passed", flush=True)
    for p in list(LIVE):
        p.kill()
    sys.exit(77)


# ---- status exit codes ----------------------------------------------------------------------

def test_status_exit_codes(tmp):
    # Without KVM: a standby with no primary (listening), a detached VM, a primary waiting for its
    # VMM (attaching), a VM whose role failed (its secret file is missing); the worst decides.
    bus_x = Bus(tmp, "bus-x")
    # As systemd starts it (INVOCATION_ID): the daemon then knows it runs in dirtyrep.service's sandbox.
    x = Daemon(tmp, "x", ["--role", "standby", "--listen", f"127.0.0.1:{free_port()}"], bus=bus_x,
               env=dict(ENV, INVOCATION_ID="5f1c0e2a9b8d4c7e8f6a5b4c3d2e1f00"),
               extra=["--vm", "broken", "--role", "standby", "--listen", f"127.0.0.1:{free_port()}",
                      "--secret-file", os.path.join(tmp, "no-such-secret"),
                      "--vm", "p", "--role", "primary", "--peer", f"127.0.0.1:{free_port()}",
                      "--control-socket", os.path.join(tmp, "no-vmm.sock"), "--secret-file",
                      os.path.join(tmp, "x", "secret"),
                      # Its service address cannot be taken over: there is no such interface (nothing
                      # is changed anywhere, the lookup fails).
                      "--vm", "q", "--role", "primary", "--peer", f"127.0.0.1:{free_port()}",
                      "--control-socket", os.path.join(tmp, "no-vmm-q.sock"), "--secret-file",
                      os.path.join(tmp, "x", "secret"), "--set", "ServiceAddress=10.66.0.9/32",
                      "--set", "ServiceInterface=drnosuch0"])
    rc, st = wait_state(bus_x, "listening", vm="t")
    check(rc == 10, f"listening standby: exit {rc}, expected 10")
    rc, st = wait_state(bus_x, "attaching", vm="p")
    check(rc == 10, f"attaching primary: exit {rc}, expected 10")
    rc, st = wait_state(bus_x, "failed", vm="broken")
    check(rc == 12, f"failed VM: exit {rc}, expected 12")
    check("no-such-secret" in st["Detail"], f"failed VM's detail does not name the secret: {st['Detail']}")
    rc, st = wait_state(bus_x, "attaching", vm="q")
    check(rc == 12 and st["ServiceAddressState"].startswith("takeover failed: ") and
          st["ServiceAddress"] == "10.66.0.9/32 on drnosuch0",
          f"a primary whose address takeover failed: exit {rc}, {st['ServiceAddress']!r} "
          f"{st['ServiceAddressState']!r}")
    rc, out, _ = ctl(bus_x, "status", "q")
    check(rc == 12 and "Service address: 10.66.0.9/32 on drnosuch0, takeover failed: " in out,
          f"text status of q: {rc} {out}")
    log(f"takeover failed: exit 12, '{st['ServiceAddressState']}'")
    # An image into the service's private /tmp is refused with the reason, not "written" where
    # nobody would find it. The image root (ImageDirectory=, checked against the sandbox when the
    # configuration is read) refuses it first: every image lies below that root.
    rc, out, err = ctl(bus_x, "checkpoint", "p", "--image", "/tmp/dr-op-image")
    check(rc == 4 and ("is in the service's private /tmp (PrivateTmp=yes)" in err or
                       "is not below the image root ImageDirectory=" in err) and
          not os.path.exists("/tmp/dr-op-image"), f"checkpoint --image /tmp/...: exit {rc}: {err}")
    log(f"checkpoint --image into the private /tmp: exit 4: {err.strip()}")
    rc, l = status_rc(bus_x)
    check(rc == 12 and len(l) == 4, f"status of all VMs: exit {rc} (expected the worst, 12): {l}")
    rc, out, _ = ctl(bus_x, "status")
    check(rc == 12 and "broken: standby, failed" in out and "t: standby, listening" in out,
          f"text status of all: {rc} {out}")
    check(ctl(bus_x, "detach", "t")[0] == 0, "detach failed")
    rc, st = wait_state(bus_x, "detached", vm="t")
    check(rc == 10, f"detached standby: exit {rc}, expected 10")
    check(ctl(bus_x, "attach", "t")[0] == 0, "attach failed")
    wait_state(bus_x, "listening", vm="t")
    # Errors keep their own codes: no such VM is 3, an absent daemon 6.
    check(ctl(bus_x, "status", "nope")[0] == 3, "status of an unknown VM is not exit 3")
    x.stop()
    check(ctl(bus_x, "status")[0] == 6, "status without a daemon is not exit 6")
    log("listening, attaching, detached: exit 10; failed: exit 12; all VMs: exit 12 (the worst)")
    if not kvm_works():
        skip_rest("protected (0) and suspended (11) need a running VM")

    bus_p, bus_s, vmm, primary, standby = pair(
        tmp, primary_extra=["--set", "SplitBrainTimeoutMs=1s", "--set", "SplitBrainPolicy=suspend"])
    rc, st = wait_state(bus_p, "protected")
    check(rc == 0, f"protected primary: exit {rc}")
    rc, st = wait_state(bus_s, "protected")
    check(rc == 0, f"protected standby: exit {rc}")
    rc, out, err = ctl(bus_p, "status")
    check(rc == 0 and "t: primary, protected" in out, f"text status: {rc} {out} {err}")
    log("protected: exit 0 on both hosts")

    # The standby dies: the primary is unprotected (connecting) until the split-brain guard
    # suspends the VM after SplitBrainTimeoutMs=1s.
    standby.kill()
    seen = {}
    end = time.time() + 30
    while time.time() < end and "suspended" not in seen:
        rc, l = status_rc(bus_p, "t")
        seen.setdefault(l[0]["State"], rc)
        time.sleep(0.05)
    log(f"primary after the standby's death: {seen}")
    check("suspended" in seen, f"the primary never suspended: {seen}")
    check(seen["suspended"] == 11, f"suspended: exit {seen['suspended']}, expected 11")
    for state, rc in seen.items():
        if state not in ("suspended", "suspending", "protected"):
            check(rc == 10, f"state {state}: exit {rc}, expected 10")
    rc, out, _ = ctl(bus_p, "status")
    check(rc == 11 and "t: primary, suspended" in out, f"text status of the suspended primary: {rc} {out}")
    log("PASS: status exit codes")


# ---- events --json ---------------------------------------------------------------------------

def parse_events(text):
    events = []
    for line in text.splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError as ex:
            fail(f"events --json printed a line that is not JSON ({ex}): {line!r}")
        check(isinstance(e, dict), f"not an object: {line!r}")
        check("timestamp" in e and "realtime_usec" in e and "event" in e, f"line lacks timestamp/event: {line!r}")
        ts = datetime.datetime.strptime(e["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
            tzinfo=datetime.timezone.utc)
        check(abs(ts.timestamp() * 1e6 - e["realtime_usec"]) < 2, f"timestamp and realtime_usec disagree: {e}")
        check(abs(ts.timestamp() - time.time()) < 600, f"timestamp far from now: {e}")
        events.append(e)
    for a, b in zip(events, events[1:]):
        check(a["realtime_usec"] <= b["realtime_usec"], f"timestamps go backwards: {a} {b}")
    return events


def follow(tmp, bus, tag, *extra):
    """`dirtyrepctl events --json` into a file; returns (Popen, path) once the dump is out."""
    out = os.path.join(tmp, tag + ".jsonl")
    with open(out, "w") as f:
        ev = subprocess.Popen([ENV["DR_DIRTYREPCTL"], "--bus-address", bus.address, "events", "--json", *extra],
                              stdout=f, stderr=subprocess.PIPE)
    LIVE.append(ctlmod.Popened(ev))
    end = time.time() + 20
    while "dump-done" not in open(out).read():
        if ev.poll() is not None:
            fail(f"events exited early ({ev.returncode}): {ev.stderr.read()}")
        check(time.time() < end, "events --json printed no state dump")
        time.sleep(0.05)
    return ev, out


def test_events_json(tmp):
    bus = Bus(tmp, "bus")
    d = Daemon(tmp, "d", ["--role", "standby", "--listen", f"127.0.0.1:{free_port()}"], bus=bus,
               extra=["--vm", "broken", "--role", "standby", "--listen", f"127.0.0.1:{free_port()}",
                      "--secret-file", os.path.join(tmp, "no-such-secret")])
    wait_state(bus, "listening")
    ev, out = follow(tmp, bus, "events")
    # Real changes: detach and attach; then the daemon leaves the bus.
    check(ctl(bus, "detach", "t")[0] == 0, "detach failed")
    wait_state(bus, "detached")
    check(ctl(bus, "attach", "t")[0] == 0, "attach failed")
    wait_state(bus, "listening")
    time.sleep(0.5)  # the 200 ms status poll announces it
    d.stop()
    end = time.time() + 20
    while '"left"' not in open(out).read() and time.time() < end:
        time.sleep(0.05)
    ev.terminate()
    ev.wait(10)
    events = parse_events(open(out).read())
    log(f"events --json: {len(events)} lines, all JSON")
    dump = {e["VM"]: e for e in events if e["event"] == "exists"}
    check([e["event"] for e in events[:3]] == ["exists", "exists", "dump-done"], f"dump: {events[:3]}")
    check(dump["t"]["State"] == "listening" and dump["t"]["Role"] == "standby", f"dump of t: {dump['t']}")
    check(dump["broken"]["State"] == "failed" and "no-such-secret" in dump["broken"]["Detail"],
          f"dump of broken: {dump['broken']}")
    for k in ("LastCommitted", "Attached", "ServiceAddressState", "EpochMSec"):
        check(k in dump["t"], f"dump lacks {k}: {dump['t']}")
    states = [e["State"] for e in events[3:] if e["event"] == "changed" and "State" in e]
    check("detached" in states and "listening" in states[states.index("detached") + 1:],
          f"no detached -> listening in the changes: {states}")
    for e in events[3:]:
        # The daemon announces every VM once after taking the bus name; for the VM nobody
        # touched that may repeat the dump, never tell something else.
        if e["event"] == "changed" and e["VM"] != "t":
            check(e["VM"] == "broken" and e.get("State", "failed") == "failed", f"a change nobody made: {e}")
    check(events[-1]["event"] == "daemon" and events[-1]["daemon"] == "left", f"last event: {events[-1]}")
    log(f"dump, then state changes {states}, then the daemon left")

    # --count counts the events after the dump: the dump alone does not end `-n 1`, a change does.
    # The daemon announces its VMs once after taking the bus name: let that pass first.
    ev0, out0 = follow(tmp, bus, "events0")
    d = Daemon(tmp, "d2", ["--role", "standby", "--listen", f"127.0.0.1:{free_port()}"], bus=bus)
    end = time.time() + 30
    while not any(e["event"] == "changed" and e["VM"] == "t" for e in parse_events(open(out0).read())):
        check(time.time() < end, "a new daemon did not announce its VM")
        time.sleep(0.05)
    ev0.terminate()
    e0 = parse_events(open(out0).read())
    check(any(e["event"] == "daemon" and e["daemon"] == "appeared" for e in e0), f"no 'daemon appeared': {e0}")
    wait_state(bus, "listening")
    ev1, out1 = follow(tmp, bus, "events1", "-n", "1")
    time.sleep(0.5)
    check(ev1.poll() is None, "events -n 1 ended on the dump alone")
    check(ctl(bus, "detach", "t")[0] == 0, "detach failed")
    ev1.wait(20)
    e1 = parse_events(open(out1).read())
    check(ev1.returncode == 0 and e1[-1]["event"] == "changed" and e1[-1]["VM"] == "t",
          f"events -n 1: exit {ev1.returncode}, last {e1[-1]}")
    check(sum(1 for e in e1 if e["event"] != "exists") == 2, f"events -n 1 printed more than one change: {e1}")
    d.stop()
    if not kvm_works():
        skip_rest("the dump of a protected VM needs a running VM")
    bus_p, bus_s, vmm, primary, standby = pair(tmp)
    wait_state(bus_s, "protected")
    ev, out = follow(tmp, bus_s, "events-protected", "-n", "1")
    ev.terminate()
    ev.wait(10)
    e = parse_events(open(out).read())[0]
    check(e["event"] == "exists" and e["State"] == "protected" and e["LastCommitted"] > 0, f"dump: {e}")
    log("PASS: events --json")


# ---- metrics ---------------------------------------------------------------------------------

def parse_metrics(text):
    from prometheus_client.parser import text_string_to_metric_families
    fams = {}
    for fam in text_string_to_metric_families(text):
        check(fam.name not in fams, f"metric family {fam.name} twice")
        fams[fam.name] = fam
    return fams


def sample(fams, name, **labels):
    base = name[:-6] if name.endswith("_total") else name
    fam = fams.get(base) or fams.get(name)
    check(fam is not None, f"metric {name} missing")
    for s in fam.samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    fail(f"no sample {name}{labels}: {fam.samples}")


def test_metrics(tmp):
    try:
        import prometheus_client.parser  # noqa: F401
    except ImportError:
        # python3-prometheus-client is Debian's package; another python3 first in PATH (pyenv,
        # a venv) does not see the system's dist-packages.
        sys.path.append("/usr/lib/python3/dist-packages")
        try:
            import prometheus_client.parser  # noqa: F401
        except ImportError:
            print("SKIP: python3-prometheus-client not installed (scripts/deps.sh installs it)")
            sys.exit(77)
    # Without KVM: a listening standby and a VM whose role failed.
    bus = Bus(tmp, "bus")
    d = Daemon(tmp, "d", ["--role", "standby", "--listen", f"127.0.0.1:{free_port()}"], bus=bus,
               extra=["--vm", "broken", "--role", "standby", "--listen", f"127.0.0.1:{free_port()}",
                      "--secret-file", os.path.join(tmp, "no-such-secret")])
    wait_state(bus, "listening")
    rc, out, err = ctl(bus, "metrics")
    check(rc == 0, f"metrics: exit {rc}: {err}")
    fams = parse_metrics(out)
    log(f"metrics: {len(fams)} families parsed")
    check(sample(fams, "dirtyrep_up") == 1, "dirtyrep_up is not 1")
    check(sample(fams, "dirtyrep_vm_info", vm="t", role="standby", state="listening") == 1, "vm_info of t")
    check(sample(fams, "dirtyrep_vm_status", vm="t") == 10, "status code of a listening standby is not 10")
    check(sample(fams, "dirtyrep_vm_protected", vm="t") == 0, "a listening standby is protected")
    check(sample(fams, "dirtyrep_vm_link_up", vm="t") == 0, "link up without a primary")
    check(sample(fams, "dirtyrep_vm_epochs_committed_total", vm="t") == 0, "epochs committed without a primary")
    check(fams["dirtyrep_vm_epochs_committed"].type == "counter", "epochs_committed is not a counter")
    check(fams["dirtyrep_vm_lag_epochs"].type == "gauge", "lag is not a gauge")
    check(sample(fams, "dirtyrep_vm_failovers_total", vm="t") == 0, "failovers without a failover")
    check(sample(fams, "dirtyrep_vm_service_address_held", vm="t") == 0, "service address held without one")
    check(sample(fams, "dirtyrep_vm_status", vm="broken") == 12, "the failed VM's status code is not 12")
    check(sample(fams, "dirtyrep_vm_info", vm="broken", role="standby", state="failed") == 1, "vm_info of broken")
    for fam in ("dirtyrep_vm_pause_p99_seconds", "dirtyrep_vm_sent_bytes", "dirtyrep_vm_full_sync_done_bytes",
                "dirtyrep_vm_last_committed_epoch", "dirtyrep_vm_last_sync_seconds"):
        check(fam in fams, f"family {fam} missing")

    # FILE: written atomically (no temporary left behind), readable by node_exporter.
    path = os.path.join(tmp, "textfile", "dirtyrep.prom")
    os.makedirs(os.path.dirname(path))
    rc, _, err = ctl(bus, "metrics", path)
    check(rc == 0, f"metrics FILE: exit {rc}: {err}")
    check(os.listdir(os.path.dirname(path)) == ["dirtyrep.prom"], f"leftovers: {os.listdir(os.path.dirname(path))}")
    check(os.stat(path).st_mode & 0o777 == 0o644, "the metrics file is not 0644 (node_exporter must read it)")
    fams = parse_metrics(open(path).read())
    check(sample(fams, "dirtyrep_vm_info", vm="t", role="standby", state="listening") == 1, "vm_info in FILE")
    check(ctl(bus, "metrics", "relative.prom")[0] == 2, "a relative FILE is not a usage error")

    # A daemon that is gone: dirtyrep_up 0 in the file, and the unreachable exit code.
    d.stop()
    rc, _, err = ctl(bus, "metrics", path)
    check(rc == 6, f"metrics without a daemon: exit {rc}, expected 6: {err}")
    fams = parse_metrics(open(path).read())
    check(sample(fams, "dirtyrep_up") == 0 and "dirtyrep_vm_info" not in fams, "dirtyrep_up is not 0 without a daemon")
    log("without KVM: listening 10, failed 12, FILE atomic, dirtyrep_up 0 when the daemon is gone")
    if not kvm_works():
        skip_rest("metrics of a replicating pair need a running VM")

    bus_p, bus_s, vmm, primary, standby = pair(tmp)
    wait_state(bus_p, "protected")
    time.sleep(1)
    rc, out, err = ctl(bus_p, "metrics")
    check(rc == 0, f"metrics: exit {rc}: {err}")
    fams = parse_metrics(out)
    rc2, st = status_rc(bus_p, "t")
    st = st[0]
    check(sample(fams, "dirtyrep_vm_info", vm="t", role="primary", state="protected") == 1, "vm_info")
    check(sample(fams, "dirtyrep_vm_protected", vm="t") == 1, "protected is not 1")
    check(sample(fams, "dirtyrep_vm_status", vm="t") == 0, "status code is not 0")
    committed = sample(fams, "dirtyrep_vm_epochs_committed_total", vm="t")
    check(0 < committed <= st["EpochsCommitted"], f"epochs committed {committed} vs status {st['EpochsCommitted']}")
    sealed = sample(fams, "dirtyrep_vm_last_sealed_epoch", vm="t")
    check(0 < sealed <= st["LastSealed"], f"last sealed {sealed} vs {st['LastSealed']}")
    sent = sample(fams, "dirtyrep_vm_sent_bytes_total", vm="t")
    check(0 < sent <= st["BytesSent"], f"bytes sent {sent} vs {st['BytesSent']}")
    p99 = sample(fams, "dirtyrep_vm_pause_p99_seconds", vm="t")
    check(0 < p99 < 5, f"pause p99 {p99}s")
    check(sample(fams, "dirtyrep_vm_full_syncs_total", vm="t") >= 1, "no full sync counted")
    log(f"metrics agree with status: committed {committed:.0f}, sealed {sealed:.0f}, sent {sent:.0f} B, "
        f"pause p99 {p99 * 1e3:.2f} ms")
    standby.kill()
    end = time.time() + 20
    while time.time() < end:
        fams = parse_metrics(ctl(bus_p, "metrics")[1])
        if sample(fams, "dirtyrep_vm_protected", vm="t") == 0:
            break
        time.sleep(0.1)
    check(sample(fams, "dirtyrep_vm_protected", vm="t") == 0, "still protected without a standby")
    check(sample(fams, "dirtyrep_vm_status", vm="t") in (10, 11), "status code of an unprotected primary")
    log("PASS: metrics")


# ---- single instance -------------------------------------------------------------------------

def test_single_instance(tmp):
    ns = f"drop{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        nsx = ["ip", "netns", "exec", ns]
        subprocess.run(nsx + ["ip", "link", "set", "lo", "up"], check=True)
        # A veth pair (the dummy driver is not everywhere): svc0 carries the service address.
        subprocess.run(nsx + ["ip", "link", "add", "svc0", "type", "veth", "peer", "name", "svc1"], check=True)
        subprocess.run(nsx + ["ip", "link", "set", "svc0", "up"], check=True)
        bus = Bus(tmp, "bus")
        # The primary holds the service address from its start, also while it waits for its VMM:
        # no VM (and no KVM) is needed to see what a second daemon would take from it.
        control = os.path.join(tmp, "vm.sock")
        port = free_port()
        secret = os.path.join(tmp, "secret")
        with open(os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(ctlmod.SECRET)
        d = os.path.join(tmp, "a")
        os.makedirs(os.path.join(d, "vm.d"))
        with open(os.path.join(d, "dirtyrep.conf"), "w") as f:
            f.write(f"[Daemon]\nRuntimeDirectory={d}\nStateDirectory={d}\n")
        with open(os.path.join(d, "vm.d", "t.conf"), "w") as f:
            f.write(f"[VM]\nRole=primary\nControlSocket={control}\nPeer=127.0.0.1:{port}\nSecretFile={secret}\n"
                    "EpochMs=20ms\nServiceAddress=10.66.0.1/32\nServiceInterface=svc0\n")
        sd = os.path.join(tmp, "s")
        os.makedirs(os.path.join(sd, "vm.d"))
        with open(os.path.join(sd, "dirtyrep.conf"), "w") as f:
            f.write(f"[Daemon]\nRuntimeDirectory={sd}\nStateDirectory={sd}\n")
        with open(os.path.join(sd, "vm.d", "t.conf"), "w") as f:
            f.write(f"[VM]\nRole=standby\nListen=127.0.0.1:{port}\nSecretFile={secret}\n")
        debug = os.path.join(d, "debug.sock")
        cmd = nsx + [ENV["DR_DIRTYREPD"], "-c", os.path.join(d, "dirtyrep.conf"), "-d", os.path.join(d, "vm.d"),
                     "--debug-socket", debug, "--bus-address", bus.address]
        standby = Proc(tmp, "standby", nsx + [ENV["DR_DIRTYREPD"], "-c", os.path.join(sd, "dirtyrep.conf"),
                                              "-d", os.path.join(sd, "vm.d"), "--bus=none"])
        first = Proc(tmp, "first", cmd)
        rc, st = wait_state(bus, "attaching")

        def addr():
            return subprocess.run(nsx + ["ip", "-4", "addr", "show", "dev", "svc0"], capture_output=True,
                                  text=True).stdout

        def owner():
            r = subprocess.run(["busctl", "--address", bus.address, "status", "org.dirtyrep1"], capture_output=True,
                               text=True)
            for line in r.stdout.splitlines():
                if line.startswith("PID="):
                    return int(line[4:])
            return None

        check("10.66.0.1/32" in addr(), f"the first daemon does not hold the service address:\n{addr()}")
        lock = os.path.join(d, "dirtyrepd.lock")
        check(open(lock).read().strip() == str(first.proc.pid), "the lock does not name the first daemon")
        check(owner() == first.proc.pid, f"bus name owner {owner()} is not the first daemon {first.proc.pid}")
        log(f"first dirtyrepd (PID {first.proc.pid}): service address, bus name, lock held")

        # The second one, same configuration, same bus, same debug socket.
        t0 = time.time()
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        log(f"second dirtyrepd: exit {second.returncode} after {time.time() - t0:.2f}s: {second.stderr.strip()}")
        check(second.returncode == 1, f"the second daemon exited {second.returncode}")
        check(f"Another dirtyrepd (PID {first.proc.pid}) is running" in second.stderr and
              "exits without touching anything" in second.stderr, f"unclear error: {second.stderr}")
        check("D-Bus API" not in second.stderr and "role started" not in second.stderr,
              f"the second daemon got further than the lock: {second.stderr}")
        # Nothing touched: address, bus name, debug socket, lock, replication.
        check("10.66.0.1/32" in addr(), f"the service address is gone after the second daemon:\n{addr()}")
        check(owner() == first.proc.pid, f"bus name owner is now {owner()}")
        check(os.path.exists(debug), "the debug socket was unlinked")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(20)
        s.connect(debug)
        s.sendall(b"status t\n")
        answer = s.recv(65536).decode()
        s.close()
        check('"state": "attaching"' in answer, f"the first daemon's debug socket does not answer: {answer!r}")
        check(open(lock).read().strip() == str(first.proc.pid), "the lock file was rewritten")
        check(first.alive(), "the first daemon died")
        rc, st = wait_state(bus, "attaching")
        log("the first keeps its address, bus name, debug socket and lock")

        # Once the first is gone, the lock is free again: a new daemon starts.
        check(first.stop() == 0, "the first daemon did not exit 0 on SIGTERM")
        check("10.66.0.1/32" not in addr(), "the first daemon left the service address behind on SIGTERM")
        third = Proc(tmp, "third", cmd)
        wait_state(bus, "attaching")
        check(open(lock).read().strip() == str(third.proc.pid), "the lock does not name the new daemon")
        check("10.66.0.1/32" in addr(), "the new daemon did not take the service address")
        third.stop()
        standby.stop()
        log("PASS: single instance")
    finally:
        for p in list(LIVE):
            p.kill()
        subprocess.run(["ip", "netns", "del", ns])


# ---- journal fields ---------------------------------------------------------------------------

def test_journal_fields(tmp):
    """dirtyrepd's records in a real systemd-journald, run in a mount namespace of this test's own
    (its sockets and files on tmpfs there, nothing of the host's journal touched)."""
    journald = "/lib/systemd/systemd-journald"
    if not (os.path.exists(journald) and shutil.which("journalctl") and shutil.which("systemd-cat")):
        print("SKIP: systemd-journald, journalctl or systemd-cat missing (scripts/deps.sh installs systemd)")
        sys.exit(77)
    check(ENV.get("DR_OP_MOUNT_NS") == "1", "journal-fields must run in its own mount namespace (see main())")
    for d in ("/run/systemd", "/run/log"):
        os.makedirs(d, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", d], check=True)
    os.makedirs("/run/systemd/journal")
    jd = Proc(tmp, "journald", [journald])
    end = time.time() + 10
    while not os.path.exists("/run/systemd/journal/socket"):
        check(jd.alive() and time.time() < end, "systemd-journald did not start")
        time.sleep(0.05)

    bus = Bus(tmp, "bus")
    d = os.path.join(tmp, "d")
    os.makedirs(os.path.join(d, "vm.d"))
    secret = os.path.join(d, "secret")
    with open(os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(ctlmod.SECRET)
    with open(os.path.join(d, "dirtyrep.conf"), "w") as f:
        f.write(f"[Daemon]\nRuntimeDirectory={d}\nStateDirectory={d}\n")
    with open(os.path.join(d, "vm.d", "t.conf"), "w") as f:
        f.write(f"[VM]\nRole=standby\nListen=127.0.0.1:{free_port()}\nSecretFile={secret}\nVmm={ENV['DR_VMM']}\n")
    with open(os.path.join(d, "vm.d", "broken.conf"), "w") as f:
        f.write(f"[VM]\nRole=standby\nListen=127.0.0.1:{free_port()}\nSecretFile={d}/missing\nVmm={ENV['DR_VMM']}\n")
    # As systemd runs a service: stderr is a stream to journald and JOURNAL_STREAM names it.
    daemon = (f"export JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2); exec {ENV['DR_DIRTYREPD']} "
              f"-c {d}/dirtyrep.conf -d {d}/vm.d --bus-address {bus.address}")
    first = Proc(tmp, "first", ["systemd-cat", "-t", "dirtyrepd-test", "sh", "-c", daemon])
    wait_state(bus, "listening")
    wait_state(bus, "failed", vm="broken")
    # The state records come from the daemon's status timer, which can run seconds after the
    # properties already say "failed" on a loaded host (the first tick is late): wait for the record
    # rather than stopping the daemon before it was written.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        got = subprocess.run(["journalctl", "-D", "/run/log/journal", "-o", "cat", "--no-pager",
                              "SYSLOG_IDENTIFIER=dirtyrepd", "VM=broken", "PRIORITY=3"],
                             capture_output=True, text=True, timeout=30).stdout
        if "standby failed" in got:
            break
        time.sleep(0.2)
    check(ctl(bus, "detach", "t")[0] == 0, "detach failed")
    wait_state(bus, "detached")
    check(ctl(bus, "attach", "t")[0] == 0, "attach failed")
    wait_state(bus, "listening")
    second = subprocess.run(["systemd-cat", "-t", "dirtyrepd-test", "sh", "-c", daemon], timeout=30)
    check(second.returncode == 1, f"the second daemon exited {second.returncode}")
    check(first.stop() == 0, "dirtyrepd did not exit 0 on SIGTERM")
    subprocess.run(["journalctl", "--sync"], timeout=30)
    out = subprocess.run(["journalctl", "-D", "/run/log/journal", "-o", "json", "--no-pager",
                          "SYSLOG_IDENTIFIER=dirtyrepd"], capture_output=True, text=True, timeout=30).stdout
    recs = [json.loads(l) for l in out.splitlines() if l.strip()]
    log(f"journal: {len(recs)} records of dirtyrepd")
    check(recs, "no record of dirtyrepd in the journal")
    for r in recs:
        check(r.get("_TRANSPORT") == "journal", f"not a native journal record: {r.get('_TRANSPORT')} {r['MESSAGE']}")
        check(r.get("PRIORITY", "").isdigit() and r.get("CODE_FUNC"), f"no PRIORITY/CODE_FUNC: {r}")

    def find(msgid, **fields):
        return [r for r in recs if r.get("MESSAGE_ID") == msgid and all(r.get(k) == v for k, v in fields.items())]

    ids = {}
    for line in open(os.path.join(ENV["DR_SRCDIR"], "daemon", "journal.h")):
        m = re.match(r'#define (DR_MESSAGE_\w+)\s+"([0-9a-f]{32})"', line)
        if m:
            ids[m.group(1)] = m.group(2)
    check(len(ids) >= 10, f"MESSAGE_IDs not found in daemon/journal.h: {ids}")
    check(find(ids["DR_MESSAGE_STARTED"]), "no STARTED record")
    check(find(ids["DR_MESSAGE_STOPPING"]), "no STOPPING record")
    check(find(ids["DR_MESSAGE_ALREADY_RUNNING"], PRIORITY="3", ERRNO=str(16)),
          "no ALREADY_RUNNING record (priority err, ERRNO=EBUSY) from the second daemon")
    failed = find(ids["DR_MESSAGE_FAILED"], VM="broken")
    check(failed and "missing" in failed[0]["MESSAGE"],
          f"no FAILED record with VM=broken: {failed}; the records: "
          + "; ".join(f"{r.get('MESSAGE_ID', '-')[:8]} VM={r.get('VM', '-')} {r['MESSAGE']}" for r in recs))
    unprot = [r["MESSAGE"] for r in find(ids["DR_MESSAGE_UNPROTECTED"], VM="t")]
    check(any("detached" in m for m in unprot) and any("listening" in m for m in unprot),
          f"UNPROTECTED records of VM t lack detached/listening: {unprot}")
    # Any "VM NAME: ..." message carries VM=, also those without an event kind.
    plain = [r for r in recs if r["MESSAGE"].startswith("VM t:") and "MESSAGE_ID" not in r]
    check(plain and all(r.get("VM") == "t" for r in plain), f"plain 'VM t:' records without VM=t: {plain[:3]}")
    check(not any(r.get("VM") for r in recs if not r["MESSAGE"].startswith("VM ") and "MESSAGE_ID" not in r),
          "VM= on a record that names no VM")
    log(f"journal: STARTED, STOPPING, ALREADY_RUNNING, FAILED VM=broken, UNPROTECTED VM=t {unprot}; "
        f"{len(plain)} plain records with VM=t")
    jd.stop()
    log("PASS: journal fields")



def main():
    tests = {"status-exit-codes": test_status_exit_codes, "events-json": test_events_json,
             "metrics": test_metrics, "single-instance": test_single_instance,
             "journal-fields": test_journal_fields}
    if len(sys.argv) != 2 or sys.argv[1] not in tests:
        print(__doc__)
        return 2
    for tool in ("dbus-daemon", "busctl"):
        if not shutil.which(tool):
            print(f"SKIP: {tool} not installed (scripts/deps.sh installs it)")
            return 77
    for k in ("DR_VMM", "DR_DIRTYREPD", "DR_DIRTYREPCTL", "DR_GUEST_DIRTIER", "DR_SRCDIR"):
        if k not in ENV:
            fail(f"{k} not set")
    if sys.argv[1] == "journal-fields" and ENV.get("DR_OP_MOUNT_NS") != "1":
        # A private mount namespace: the test's journald gets tmpfs on /run/systemd and /run/log there.
        env = dict(ENV, DR_OP_MOUNT_NS="1")
        os.execvpe("unshare", ["unshare", "--mount", "--propagation", "private", sys.executable,
                               os.path.abspath(__file__), "journal-fields"], env)
    return ctlmod.in_tmp("dr-op-", tests[sys.argv[1]], world=True)


if __name__ == "__main__":
    sys.exit(main())

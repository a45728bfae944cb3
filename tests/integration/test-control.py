#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""dirtyrepd's control plane with real parts: private system-like dbus-daemons
(one per "host") whose configuration includes the project's real policy file
systemd/org.dirtyrep1.conf, a primary and a standby dirtyrepd on them, the
reference VMM running the dirtier guest, dirtyrepctl and busctl.

  test-control.py dbus     every method and property through dirtyrepctl and busctl,
                           named errors, events, reload, the policy (root vs. nobody)
  test-control.py notify   sd_notify: READY=1, STATUS= with role/epoch/lag, periodic
                           WATCHDOG=1 that stops while the loop is stalled
  test-control.py attach   attach runs off the event loop: a VMM socket that never answers
                           leaves the D-Bus API answering, its Hello times out and is retried,
                           a stop during it is bounded; a VMM tracking otherwise than
                           Tracking= fails the primary, named, and Attach() says why

Exit 0 pass, 1 fail, 77 skip (no /dev/kvm, or no dbus-daemon/busctl/setpriv).
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from control import (ENV, LIVE, SECRET, Bus, Daemon, Popened, busctl, busctl_ok, check, ctl, ctl_fails,  # noqa: E402
                     ctl_ok, fail, free_port, log, status, wait_for)
import control  # noqa: E402
import loopback  # noqa: E402


VM_PATH = "/org/dirtyrep1/vm/t"
VM_IFACE = "org.dirtyrep1.VM"
VM_PROPERTIES = {
    "Name": "s", "ConfigPath": "s", "Role": "s", "ConfiguredRole": "s", "State": "s", "Detail": "s",
    "Attached": "b", "Protected": "b", "Peer": "s", "LinkUp": "b", "LastSealed": "t", "LastCommitted": "t",
    "Lag": "t", "EpochsCommitted": "t", "FullSyncs": "t", "IncrementalSyncs": "t", "DirtyPagesPerSec": "d",
    "PagesLastEpoch": "t", "PauseNSecP50": "t", "PauseNSecP99": "t", "PauseNSecMax": "t",
    "VmPauseNSecP50": "t", "VmPauseNSecP99": "t", "VmPauseNSecMax": "t", "BytesSent": "t",
    "BytesReceived": "t", "InflightEpochs": "t", "CompressionRatio": "d", "StagingBytes": "t",
    "EpochMSec": "u", "Tracking": "s", "Compression": "s", "MaxInflightEpochs": "u", "ControlSocket": "s",
    "ConfiguredPeer": "s", "ConfiguredListen": "s",
}


def pair(tmp, env_primary=None, epoch_ms=20):
    return control.pair(tmp, env_primary, epoch_ms, primary_args=["--tracking", "ring", "--max-inflight-epochs", "3",
                                                                  "--compression", "lz4"])


def test_command_line(tmp):
    """dirtyrepd's per-VM options: checked like the files, errors on stderr, exit 1."""
    d = ENV["DR_DIRTYREPD"]
    c = subprocess.run([d, "-c", "", "-d", "", "--vm", "web", "--role", "primary", "--peer", "0.0.0.0:7000",
                        "--epoch-ms", "0", "--tracking", "fast", "--compression", "zstd", "--set", "PreCopy=maybe",
                        "--check-config"], capture_output=True, text=True)
    check(c.returncode == 1, f"bad --vm options accepted: {c.returncode} {c.stdout} {c.stderr}")
    for want in ("command line (--vm web): Peer=0.0.0.0:7000: a wildcard address cannot be connected to",
                 "command line (--vm web): EpochMs=0: must be between 1 and 10000",
                 "command line (--vm web): Tracking=fast: must be one of: auto, ring, bitmap",
                 "command line (--vm web): Compression=zstd: must be one of: lz4, none",
                 "command line (--vm web): PreCopy=maybe: must be yes or no",
                 "command line (--vm web): SecretFile= is required"):
        check(want in c.stderr, f"--check-config lacks {want!r}:\n{c.stderr}")
    c = subprocess.run([d, "--epoch-ms", "20", "--check-config"], capture_output=True, text=True)
    check(c.returncode == 1 and "--epoch-ms needs a --vm NAME before it" in c.stderr, f"option without --vm: {c.stderr}")
    # --check-config reads the secret files and runs the VMM's --check: give it real ones.
    key = os.path.join(tmp, "check.key")
    with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(SECRET)
    c = subprocess.run([d, "-c", "", "-d", "", "--vm", "a", "--role", "standby", "--listen", "127.0.0.1:7001",
                        "--secret-file", key, "--set", f"Vmm={ENV['DR_VMM']}", "--vm", "b", "--role", "primary",
                        "--peer", "127.0.0.1:7001", "--secret-file", key, "--set", f"Vmm={ENV['DR_VMM']}",
                        "--control-socket", "/run/b.sock", "--check-config"],
                       capture_output=True, text=True)
    check(c.returncode == 0 and "a: standby (command line (--vm a))" in c.stdout and
          "b: primary (command line (--vm b))" in c.stdout, f"two VMs from the command line: {c.stdout} {c.stderr}")
    log("dirtyrepd --vm options: validated like the files")


def test_dbus(tmp):
    test_command_line(tmp)
    bus_p, bus_s, vmm, primary, standby = pair(tmp)
    # The D-Bus API is up once the name is on the bus.
    end = time.time() + 20
    while busctl(bus_p, "status", "org.dirtyrep1")[0] != 0 or busctl(bus_s, "status", "org.dirtyrep1")[0] != 0:
        check(primary.alive() and standby.alive(), "a daemon exited before taking its bus name")
        check(time.time() < end, "org.dirtyrep1 never appeared on the buses")
        time.sleep(0.1)

    # events follows from before anything happens (exits after 4 events).
    ev_out = os.path.join(tmp, "events.out")
    ev = subprocess.Popen([ENV["DR_DIRTYREPCTL"], "--bus-address", bus_p.address, "events"],
                          stdout=open(ev_out, "w"), stderr=subprocess.PIPE, text=True)
    LIVE.append(Popened(ev))  # stopped by the cleanup if a check fails before the SIGINT below
    check("Following" in ev.stderr.readline(), "dirtyrepctl events did not start")

    st = wait_for(bus_p, lambda s: s["State"] == "protected" and s["LastCommitted"] >= 20,
                  "the primary to be protected")
    log(f"primary protected at epoch {st['LastCommitted']}")

    # --- properties: every one through busctl, with the right type, and consistent with status ---
    intro = busctl_ok(bus_p, "introspect", "org.dirtyrep1", VM_PATH, VM_IFACE)
    for name, sig in VM_PROPERTIES.items():
        check(re.search(rf"^\.{name}\s+property\s+{sig}\s", intro, re.M), f"property {name} ({sig}) missing:\n{intro}")
        out = busctl_ok(bus_p, "get-property", "org.dirtyrep1", VM_PATH, VM_IFACE, name)
        check(out.startswith(sig + " "), f"get-property {name}: {out!r}")
    for name in ("Checkpoint", "Attach", "Detach"):
        check(re.search(rf"^\.{name}\s+method", intro, re.M), f"method {name} missing")
    role = busctl_ok(bus_p, "get-property", "org.dirtyrep1", VM_PATH, VM_IFACE, "Role").strip()
    check(role == 's "primary"', f"Role {role}")
    check(busctl_ok(bus_p, "get-property", "org.dirtyrep1", VM_PATH, VM_IFACE, "Protected").strip() == "b true",
          "Protected is not true on a protected primary")
    check(busctl_ok(bus_p, "get-property", "org.dirtyrep1", VM_PATH, VM_IFACE, "EpochMSec").strip() == "u 20",
          "EpochMSec from --epoch-ms")
    check(busctl_ok(bus_p, "get-property", "org.dirtyrep1", VM_PATH, VM_IFACE, "MaxInflightEpochs").strip() == "u 3",
          "MaxInflightEpochs from --max-inflight-epochs")
    check(busctl_ok(bus_p, "get-property", "org.dirtyrep1", VM_PATH, VM_IFACE, "ConfigPath").strip()
          == 's "command line (--vm t)"', "ConfigPath")
    check(st["Role"] == "primary" and st["LinkUp"] and st["Protected"] and st["Attached"], f"status {st}")
    # Each property is read at its own instant: the lag is bounded by the in-flight limit, not exact.
    check(st["LastSealed"] >= st["LastCommitted"] and st["Lag"] <= 3 + 2, f"lag {st}")
    check(st["BytesSent"] > 0 and st["FullSyncs"] >= 1 and st["PauseNSecMax"] > 0 and st["PauseNSecP50"] > 0,
          f"counters not filled: {st}")
    check(st["DirtyPagesPerSec"] > 0, f"dirty rate 0 with the dirtier running: {st}")
    # The agent's view of the VM stopped is inside the daemon's round trips.
    check(0 < st["VmPauseNSecP50"] <= st["PauseNSecP50"] and 0 < st["VmPauseNSecMax"] <= st["PauseNSecMax"],
          f"VM-side pause not filled or longer than the seal: {st}")
    sst = status(bus_s)
    check(sst["Role"] == "standby" and sst["State"] == "protected" and sst["LastCommitted"] > 0, f"standby {sst}")

    # Manager: Version, NVMs, ListVMs, GetVM, GetManagedObjects.
    check(busctl_ok(bus_p, "get-property", "org.dirtyrep1", "/org/dirtyrep1", "org.dirtyrep1.Manager",
                    "NVMs").strip() == "u 1", "NVMs")
    lst = busctl_ok(bus_p, "call", "org.dirtyrep1", "/org/dirtyrep1", "org.dirtyrep1.Manager", "ListVMs")
    check(lst.strip() == 'a(ssso) 1 "t" "primary" "protected" "/org/dirtyrep1/vm/t"', f"ListVMs: {lst}")
    check(busctl_ok(bus_p, "call", "org.dirtyrep1", "/org/dirtyrep1", "org.dirtyrep1.Manager", "GetVM", "s",
                    "t").strip() == 'o "/org/dirtyrep1/vm/t"', "GetVM")
    mo = busctl_ok(bus_p, "call", "org.dirtyrep1", "/org/dirtyrep1", "org.freedesktop.DBus.ObjectManager",
                   "GetManagedObjects")
    check("/org/dirtyrep1/vm/t" in mo and '"LastCommitted" t' in mo, f"GetManagedObjects: {mo[:300]}")
    tree = busctl_ok(bus_p, "tree", "org.dirtyrep1")
    check("/org/dirtyrep1/vm/t" in tree, f"tree: {tree}")

    # --- dirtyrepctl: status, list, version ---
    text = ctl_ok(bus_p, "status")
    for want in ("t: primary, protected", "Protected: yes", "link up", "Pause: p50", "Configuration: command line"):
        check(want in text, f"status text lacks {want!r}:\n{text}")
    log("dirtyrepctl status:\n" + text)
    out = ctl_ok(bus_p, "list", env_addr=True)  # $DIRTYREP_BUS_ADDRESS
    check(re.search(r"^t\s+primary\s+protected$", out, re.M) and "1 VM(s) listed." in out, f"list: {out}")
    check(ctl_ok(bus_p, "list", "--no-legend").strip().split() == ["t", "primary", "protected"], "list --no-legend")
    check(json.loads(ctl_ok(bus_p, "list", "--json")) == [{"VM": "t", "Role": "primary", "State": "protected"}],
          "list --json")
    v = ctl_ok(bus_p, "version")
    check(re.search(r"^dirtyrepctl \S+$", v, re.M) and re.search(r"^dirtyrepd \S+$", v, re.M), f"version: {v}")

    # --- Checkpoint: real epoch numbers, increasing, committed on the standby ---
    before = status(bus_p)["LastSealed"]
    out = ctl_ok(bus_p, "checkpoint", "t")
    m = re.match(r"VM t: sealed epoch (\d+)$", out.strip())
    check(m, f"checkpoint output {out!r}")
    e1 = int(m.group(1))
    check(e1 > before, f"checkpoint epoch {e1} not after the last sealed {before}")
    out = busctl_ok(bus_p, "call", "org.dirtyrep1", VM_PATH, VM_IFACE, "Checkpoint")
    e2 = int(out.split()[1])
    check(out.startswith("t ") and e2 > e1, f"busctl Checkpoint {out!r} after {e1}")
    e3 = json.loads(ctl_ok(bus_p, "checkpoint", "--json"))["epoch"]  # the only VM: name optional
    check(e3 > e2, f"checkpoint --json {e3} after {e2}")
    wait_for(bus_s, lambda s: s["LastCommitted"] >= e3, f"the standby to commit epoch {e3}")
    log(f"checkpoints: {e1}, {e2}, {e3}; committed on the standby")

    # --- named errors, calls in the wrong state, bad input ---
    ctl_fails(bus_s, 4, "only a primary seals epochs", "checkpoint", "t")
    rc, out, err = busctl(bus_s, "call", "org.dirtyrep1", VM_PATH, VM_IFACE, "Checkpoint")
    check(rc != 0 and "only a primary seals epochs" in err, f"busctl Checkpoint on a standby: {rc} {err}")
    ctl_fails(bus_p, 3, "No VM named 'nope'", "status", "nope")
    ctl_fails(bus_p, 3, "No VM named 'nope'", "checkpoint", "nope")
    ctl_fails(bus_p, 3, "no VM name is longer", "status", "x" * 65)
    rc, out, err = busctl(bus_p, "call", "org.dirtyrep1", "/org/dirtyrep1", "org.dirtyrep1.Manager", "GetVM", "s",
                          "../../etc")
    check(rc != 0 and "Invalid VM name" in err, f"GetVM with a bad name: {rc} {err}")
    rc, out, err = busctl(bus_p, "call", "org.dirtyrep1", "/org/dirtyrep1", "org.dirtyrep1.Manager", "GetVM", "s",
                          "y" * 100000)
    check(rc != 0, f"GetVM with a 100 kB name: {rc} {err}")
    rc, out, err = busctl(bus_p, "get-property", "org.dirtyrep1", "/org/dirtyrep1/vm/nope", VM_IFACE, "State")
    check(rc != 0, "a property of a VM that does not exist")
    ctl_fails(bus_p, 2, "unknown command", "frobnicate")
    ctl_fails(bus_p, 2, "takes", "attach")
    ctl_fails(bus_p, 2, "--count needs a number", "events", "-n", "x")

    # --- Failover: refused when unsafe (the promotion itself is tested by the failover suite) ---
    check(re.search(r"^\.Failover\s+method", intro, re.M), "the VM object has no Failover method")
    # This standby has no Peer= (it could not protect the VM as primary): refused, named.
    ctl_fails(bus_s, 4, "has no Peer= for the standby it would need as primary", "failover", "t")
    ctl_fails(bus_p, 4, "runs in a VMM dirtyrepd did not start", "failover", "t")
    rc, out, err = busctl(bus_s, "call", "org.dirtyrep1", VM_PATH, VM_IFACE, "Failover", "b", "false")
    check(rc != 0 and "has no Peer=" in err, f"busctl Failover on a standby without Peer=: {rc} {err}")

    # --- checkpoint images through the daemon (taken at a seal of the running primary) ---
    # Below the image root: ImageDirectory= defaults to StateDirectory=/images (the daemon makes it).
    img = os.path.join(primary.dir, "images")
    os.makedirs(img, exist_ok=True)
    out = ctl_ok(bus_p, "checkpoint", "t", "--image", os.path.join(img, "full"))
    m = re.match(r"VM t: image \S+/full written at epoch (\d+) \(full, (\d+) pages stored", out.strip())
    check(m, f"checkpoint --image: {out!r}")
    full_pages = int(m.group(2))
    js = json.loads(ctl_ok(bus_p, "--json", "checkpoint", "t", "--image", os.path.join(img, "inc1"), "--parent",
                           os.path.join(img, "full")))
    check(js["epoch"] > int(m.group(1)) and js["pages"] < full_pages, f"incremental image: {js} after {out!r}")
    v = ctl_ok(bus_p, "image", "verify", os.path.join(img, "inc1"))
    check("2 image(s)" in v, f"image verify: {v}")
    show = json.loads(ctl_ok(bus_p, "image", "show", "--json", os.path.join(img, "inc1")))
    check(show["kind"] == "incremental" and show["depth"] == 1, f"image show: {show.get('kind')} {show.get('depth')}")
    ctl_fails(bus_p, 4, "Image", "checkpoint", "t", "--image", os.path.join(img, "inc2"), "--parent",
              os.path.join(img, "full"))  # not the last image taken
    check(not os.path.exists(os.path.join(img, "inc2")), "a refused image left a directory")
    ctl_fails(bus_p, 4, "Image", "checkpoint", "t", "--image", os.path.join(img, "full"))  # exists
    ctl_fails(bus_s, 4, "not a running primary", "checkpoint", "t", "--image",
              os.path.join(standby.dir, "images", "sb"))
    # Confined to the image root: a path outside, a ".." out of it, a symbolic link out of it,
    # and a parent outside are refused before anything is written.
    os.symlink(tmp, os.path.join(img, "escape"))
    for bad in ("/etc/dr-image", os.path.join(img, "..", "out"), os.path.join(img, "escape", "out")):
        ctl_fails(bus_p, 4, "is not below the image root", "checkpoint", "t", "--image", bad)
        check(not os.path.exists(os.path.join(tmp, "out")) and not os.path.exists("/etc/dr-image"),
              f"a refused image {bad} was written")
    ctl_fails(bus_p, 4, "is not below the image root", "checkpoint", "t", "--image", os.path.join(img, "inc9"),
              "--parent", os.path.join(tmp, "elsewhere"))
    ctl_fails(bus_p, 2, "--parent only goes with --image", "checkpoint", "t", "--parent", img)
    ctl_fails(bus_p, 5, "permission denied", "checkpoint", "t", "--image", os.path.join(img, "nobody"),
              user="nobody")
    ctl_fails(bus_p, 5, "permission denied", "failover", "t", user="nobody")
    log("images through D-Bus: full + incremental written, verified; wrong parent, existing target, standby, "
        "unprivileged, outside ImageDirectory= (path, .., symlink, parent) refused")

    # --- the policy: nobody may read, not change ---
    out = ctl_ok(bus_p, "status", "t", user="nobody")
    check("t: primary, protected" in out, f"status as nobody: {out}")
    ctl_ok(bus_p, "list", user="nobody")
    busctl_ok(bus_p, "get-property", "org.dirtyrep1", VM_PATH, VM_IFACE, "LastCommitted", user="nobody")
    busctl_ok(bus_p, "introspect", "org.dirtyrep1", VM_PATH, user="nobody")
    for verb in (["checkpoint", "t"], ["detach", "t"], ["attach", "t"], ["resume", "t"], ["reload"]):
        ctl_fails(bus_p, 5, "permission denied: only root and members of group 'dirtyrep' may do this", *verb,
                  user="nobody")
    for method in ("Checkpoint", "Detach", "Attach", "Resume"):
        rc, out, err = busctl(bus_p, "call", "org.dirtyrep1", VM_PATH, VM_IFACE, method, user="nobody")
        check(rc != 0 and "denied" in err.lower(), f"busctl {method} as nobody: {rc} {err}")
    rc, out, err = busctl(bus_p, "call", "org.dirtyrep1", "/org/dirtyrep1", "org.dirtyrep1.Manager", "Reload",
                          user="nobody")
    check(rc != 0 and "denied" in err.lower(), f"Reload as nobody: {rc} {err}")
    check(status(bus_p)["State"] == "protected", "a refused call changed something")
    # The way out of the split-brain guard is refused while a standby protects the VM.
    ctl_fails(bus_p, 4, "has a standby connected", "resume", "t")
    check(status(bus_p)["State"] == "protected", "a refused resume changed something")

    # --- Detach / Attach ---
    ctl_ok(bus_p, "detach", "t")
    st = status(bus_p)
    check(st["State"] == "detached" and not st["Attached"], f"after detach: {st}")
    ctl_fails(bus_p, 4, "is not attached", "detach", "t")
    ctl_fails(bus_p, 4, "is not attached", "checkpoint", "t")
    busctl_ok(bus_p, "call", "org.dirtyrep1", VM_PATH, VM_IFACE, "Attach")
    ctl_fails(bus_p, 4, "is already attached", "attach", "t")
    # A re-attached primary is a new replication session (its epochs count from 1 again).
    st = wait_for(bus_p, lambda s: s["State"] == "protected" and s["LastCommitted"] > 0 and s["Attached"],
                  "the primary to be protected again after attach")
    check(st["IncrementalSyncs"] + st["FullSyncs"] >= 1, f"after attach: {st}")
    e4 = json.loads(ctl_ok(bus_p, "checkpoint", "t", "--json"))["epoch"]
    check(e4 > st["LastSealed"], f"checkpoint after re-attach {e4} <= {st['LastSealed']}")
    wait_for(bus_s, lambda s: s["LastCommitted"] >= e4 and s["State"] == "protected",
             f"the standby to commit epoch {e4} of the new session")
    busctl_ok(bus_p, "call", "org.dirtyrep1", VM_PATH, VM_IFACE, "Detach")
    busctl_ok(bus_p, "call", "org.dirtyrep1", VM_PATH, VM_IFACE, "Attach")
    wait_for(bus_p, lambda s: s["State"] == "protected", "protected after busctl Detach/Attach")

    # --- Reload: add, change, break, remove a VM; t stays untouched ---
    t_before = status(bus_p)
    vmconf = os.path.join(primary.dir, "vm.d", "extra.conf")
    extra_port = free_port()
    with open(vmconf, "w") as f:
        f.write(f"[VM]\nRole=standby\nListen=127.0.0.1:{extra_port}\nSecretFile={primary.secret}\n")
    out = ctl_ok(bus_p, "reload")
    check("1 added, 0 removed, 0 restarted with a new configuration, 1 unchanged" in out, f"reload: {out}")
    names = ctl_ok(bus_p, "list", "--no-legend")
    check(re.search(r"^extra\s+standby\s+listening$", names, re.M), f"list after adding extra: {names}")
    with open(vmconf, "w") as f:
        f.write(f"[VM]\nRole=standby\nListen=127.0.0.1:{extra_port}\nSecretFile={primary.secret}\nEpochMs=0\n")
    err = ctl_fails(bus_p, 8, "EpochMs=0: must be between 1 and 10000", "reload")
    check("extra.conf:5:" in err, f"reload error without file:line: {err}")
    check(primary.alive() and "extra" in ctl_ok(bus_p, "list"), "a bad reload changed something")
    with open(vmconf, "w") as f:
        f.write(f"[VM]\nRole=standby\nListen=127.0.0.1:{extra_port}\nSecretFile={primary.secret}\nEpochMs=50\n")
    out = busctl_ok(bus_p, "call", "org.dirtyrep1", "/org/dirtyrep1", "org.dirtyrep1.Manager", "Reload")
    check(out.strip() == "uuuu 0 0 1 1", f"Reload with extra changed: {out}")
    check(busctl_ok(bus_p, "get-property", "org.dirtyrep1", "/org/dirtyrep1/vm/extra", VM_IFACE,
                    "EpochMSec").strip() == "u 50", "extra's new EpochMs")
    os.unlink(vmconf)
    out = ctl_ok(bus_p, "reload")
    check("0 added, 1 removed, 0 restarted with a new configuration, 1 unchanged" in out, f"reload: {out}")
    t_after = status(bus_p)
    check(t_after["State"] == "protected" and t_after["FullSyncs"] == t_before["FullSyncs"] and
          t_after["IncrementalSyncs"] == t_before["IncrementalSyncs"] and
          t_after["LastCommitted"] > t_before["LastCommitted"],
          f"reloads touched the unchanged VM t: before {t_before}, after {t_after}")
    ctl_fails(bus_p, 3, "No VM named 'extra'", "status", "extra")

    # --- events saw the state changes, the object coming and going ---
    time.sleep(0.5)
    ev.send_signal(signal.SIGINT)
    ev.wait(10)
    check(ev.returncode == 0, f"dirtyrepctl events exited {ev.returncode}")
    events = open(ev_out).read()
    log("events (first lines):\n" + "\n".join(events.splitlines()[:12]))
    for want in (r"t: .*State=protected", r"t: .*State=detached", r"Attached=no", r"LinkUp=yes",
                 r"extra: added", r"extra: removed"):
        check(re.search(want, events), f"events lack {want!r}:\n{events}")

    # events -n N ends by itself; --json gives one object per line.
    evj = subprocess.Popen([ENV["DR_DIRTYREPCTL"], "--bus-address", bus_p.address, "events", "--json", "-n", "1"],
                           stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    ctl_ok(bus_p, "detach", "t")
    out, _ = evj.communicate(timeout=10)
    # One object a line: the state dump ("exists", "dump-done"), then the one change -n 1 waits for.
    lines = [json.loads(l) for l in out.splitlines()]
    check(evj.returncode == 0 and lines[-1]["event"] == "changed" and lines[-1]["VM"] == "t",
          f"events --json -n 1: {out!r}")
    ctl_ok(bus_p, "attach", "t")

    # --- defence in depth: with a policy that lets everyone through, the daemon still refuses ---
    bus_x = Bus(tmp, "bus-permissive", permissive=True)
    lone = Daemon(tmp, "lone", ["--role", "standby", "--listen", f"127.0.0.1:{free_port()}"], bus=bus_x)
    end = time.time() + 20
    while busctl(bus_x, "status", "org.dirtyrep1")[0] != 0:
        check(lone.alive() and time.time() < end, "dirtyrepd on the permissive bus did not come up")
        time.sleep(0.1)
    for verb in (["detach", "t"], ["reload"]):
        ctl_fails(bus_x, 5, "Only root and members of group 'dirtyrep' may change dirtyrepd's state", *verb,
                  user="nobody")
    check(status(bus_x)["Attached"], "nobody detached a VM through a permissive bus")
    ctl_ok(bus_x, "detach", "t")  # root still may
    check(lone.stop() == 0, "lone daemon exit status")
    bus_x.kill()

    # --- daemons alive after all of it; unreachable daemon: exit 6 ---
    check(primary.alive() and standby.alive(), "a daemon died")
    for p in (primary, standby):
        rc = p.stop()
        check(rc == 0, f"{p.tag} exited {rc} on SIGTERM")
    ctl_fails(bus_s, 6, "not reachable", "status")
    ctl_fails(bus_s, 6, "cannot connect", "--bus-address", "unix:path=" + os.path.join(tmp, "nope.sock"), "list")
    for p in (vmm, bus_p, bus_s):
        p.kill()
    log("PASS: D-Bus API through dirtyrepctl and busctl, errors, policy, events, reload")


class NotifySocket:
    """The service manager's side of sd_notify: a datagram socket that records every message."""

    def __init__(self, tmp):
        self.path = os.path.join(tmp, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.msgs = []  # (monotonic time, line)
        self.lock = threading.Lock()
        self.done = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.done:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            now = time.monotonic()
            with self.lock:
                for line in data.decode(errors="replace").splitlines():
                    self.msgs.append((now, line))

    def lines(self, prefix, since=0.0):
        with self.lock:
            return [(t, l) for t, l in self.msgs if l.startswith(prefix) and t >= since]

    def wait(self, prefix, timeout=30, since=0.0):
        end = time.time() + timeout
        while time.time() < end:
            got = self.lines(prefix, since)
            if got:
                return got
            time.sleep(0.05)
        fail(f"no {prefix!r} from the daemon within {timeout}s; got {self.msgs[-10:]}")


def max_gap(times):
    return max((b - a for a, b in zip(times, times[1:])), default=0.0)


def test_notify(tmp):
    ns = NotifySocket(tmp)
    env = dict(ENV)
    env["NOTIFY_SOCKET"] = ns.path
    # 2 s: sd-event sends WATCHDOG=1 about every quarter of it. Generous for a loaded 2-core CI
    # machine; a real deployment's WatchdogSec= is 10 s.
    env["WATCHDOG_USEC"] = "2000000"
    env.pop("WATCHDOG_PID", None)
    bus_p, bus_s, vmm, primary, standby = pair(tmp, env_primary=env)

    ns.wait("READY=1")
    check(busctl(bus_p, "status", "org.dirtyrep1")[0] == 0, "READY=1 before the bus name was held")
    t_ready = ns.lines("READY=1")[0][0]
    log("READY=1 received; bus name held")

    # STATUS= with role, epoch and lag, and the epoch moving.
    end = time.time() + 60
    epochs = []
    while time.time() < end and len(set(epochs)) < 3:
        for _, l in ns.lines("STATUS="):
            m = re.search(r"t: primary protected, epoch (\d+), lag (\d+)", l)
            if m:
                epochs.append(int(m.group(1)))
        time.sleep(0.2)
    check(len(set(epochs)) >= 3 and sorted(set(epochs))[-1] > 0,
          f"STATUS= never showed a moving epoch: {[l for _, l in ns.lines('STATUS=')][-5:]}")
    log(f"STATUS= lines, e.g. {ns.lines('STATUS=')[-1][1]!r}")
    st = status(bus_p)
    last_epoch = max(epochs)
    check(abs(st["LastSealed"] - last_epoch) < 500, f"STATUS epoch {last_epoch} vs LastSealed {st['LastSealed']}")

    # Periodic WATCHDOG=1 while the loop runs: never a gap near WATCHDOG_USEC.
    # Measured in steady state (protected); the start-up gap is only logged.
    t_steady = time.monotonic()
    time.sleep(3.0)
    wd = [t for t, _ in ns.lines("WATCHDOG=1", since=t_steady)]
    span = time.monotonic() - t_steady
    check(len(wd) >= span / 1.0, f"only {len(wd)} WATCHDOG=1 in {span:.1f}s")
    gap = max_gap(wd)
    check(gap < 1.5, f"WATCHDOG=1 gap {gap:.2f}s, too close to WATCHDOG_USEC (2 s)")
    log(f"{len(wd)} WATCHDOG=1 in {span:.1f}s of steady state, largest gap {gap * 1000:.0f} ms; "
        f"since READY=1: {max_gap([t for t, _ in ns.lines('WATCHDOG=1', since=t_ready)]) * 1000:.0f} ms")

    # A stalled loop stops sending WATCHDOG=1 (a service manager would now kill and restart it).
    t0 = time.monotonic()
    r = primary.req("stall 4")
    check(r.startswith("ok"), f"stall: {r!r}")
    time.sleep(4.5)
    during = [t for t, _ in ns.lines("WATCHDOG=1", since=t0 + 0.05)]
    check(not during or during[0] - t0 >= 3.5, f"WATCHDOG=1 arrived {during[0] - t0:.2f}s into a 4s stall")
    ns.wait("WATCHDOG=1", since=t0 + 3.9, timeout=5)
    all_wd = [t for t, _ in ns.lines("WATCHDOG=1", since=t_ready)]
    log(f"stalled 4 s: largest WATCHDOG=1 gap {max_gap(all_wd):.2f}s (> WATCHDOG_USEC), then it resumed")
    check(max_gap(all_wd) >= 3.5, "no gap in WATCHDOG=1 during the stall")
    rc, out, err = ctl(bus_p, "status")
    # Answered: any of status's state codes (the stall may have cost the link a resync), not 6.
    check(rc in (0, 10, 11, 12) and "t: primary" in out, f"the daemon did not answer after the stall: {rc} {err}")
    check(primary.req("stall 121").startswith("error"), "stall beyond the bound accepted")
    check(primary.req("stall x").startswith("error"), "stall with garbage accepted")

    t_stop = time.monotonic()
    check(primary.stop() == 0, "primary did not exit 0")
    ns.wait("STOPPING=1", since=t_stop, timeout=5)
    for p in (standby, vmm, bus_p, bus_s):
        p.kill()
    ns.done = True
    log("PASS: READY=1 after the bus name, STATUS= with role/epoch/lag, WATCHDOG=1 stops while stalled")


def hung_vmm_socket(path):
    """A control socket that accepts connections and never answers: returns the list of accept
    times, appended to by a thread (the socket lives as long as the test)."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(path)
    srv.listen(8)
    accepted, conns = [], []

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            conns.append(c)  # kept open: the daemon's Hello waits for an answer that never comes
            accepted.append(time.time())

    threading.Thread(target=serve, daemon=True).start()
    return accepted


def on_bus(bus, d):
    end = time.time() + 20
    while busctl(bus, "status", "org.dirtyrep1")[0] != 0:
        check(d.alive(), f"{d.tag} exited before taking its bus name")
        check(time.time() < end, "org.dirtyrep1 never appeared on the bus")
        time.sleep(0.1)


def test_attach(tmp):
    bus = Bus(tmp, "bus")
    port = free_port()

    # --- a VMM that accepts and never answers ---
    hung = os.path.join(tmp, "hung.sock")
    accepted = hung_vmm_socket(hung)
    d = Daemon(tmp, "primary", ["--role", "primary", "--control-socket", hung, "--peer", f"127.0.0.1:{port}"],
               bus=bus)
    end = time.time() + 30
    while not accepted and time.time() < end:
        time.sleep(0.05)
    check(accepted, "dirtyrepd never connected to the control socket")
    # The attach hangs in the Hello; the loop must not: status answers at once, repeatedly.
    slowest = 0.0
    for _ in range(10):
        t = time.time()
        st = status(bus)
        slowest = max(slowest, time.time() - t)
        check(st["State"] == "attaching", f"state {st['State']} while the VMM does not answer: {st}")
        time.sleep(0.3)
    check(slowest < 2.0, f"a status call took {slowest:.2f} s while an attach hung: the attach blocks the loop")
    log(f"status answered in at most {slowest * 1000:.0f} ms while the attach hung")
    # The Hello is bounded: the status names the timeout, and the attach is retried.
    st = wait_for(bus, lambda st: "did not answer within 10 s" in st["Detail"], "the Hello timeout in Detail",
                  timeout=30)
    # (The first connection may be the manager's probe whether anything listens, closed at once.)
    n = len(accepted)
    end = time.time() + 15
    while len(accepted) <= n and time.time() < end:
        time.sleep(0.05)
    check(len(accepted) > n, "no second attach after the Hello timed out")
    gap = accepted[n] - accepted[n - 1]
    check(9.0 <= gap <= 14.0, f"the second attach came {gap:.1f} s after the first, expected the 10 s bound "
          f"plus the 1 s retry")
    log(f"Hello timed out and the attach was retried {gap:.1f} s after the first ({st['Detail']})")
    # A stop while the attach hangs: bounded by the Hello's timeout (and exit 0: nothing leaks).
    t = time.time()
    rc = d.stop(timeout=20)
    took = time.time() - t
    check(rc == 0, f"dirtyrepd exited {rc} when stopped during a hung attach")
    check(took < 13.0, f"stopping during a hung attach took {took:.1f} s")
    log(f"stopped during a hung attach in {took:.1f} s")

    # --- a VMM that tracks with a bitmap, and Tracking=ring ---
    vmm = loopback.Vmm(tmp, "dirtier", "bitmap", 1, "ws=4M rate=5000 report_ms=1000", memory="128M")
    end = time.time() + 30
    while not os.path.exists(vmm.control) and time.time() < end:
        time.sleep(0.05)
    check(os.path.exists(vmm.control), "the VMM's control socket never appeared")
    d = Daemon(tmp, "primary2", ["--role", "primary", "--control-socket", vmm.control, "--tracking", "ring",
                                 "--peer", f"127.0.0.1:{port}"], bus=bus)
    on_bus(bus, d)
    want = "Tracking=ring but the VMM tracks with a bitmap"
    st = wait_for(bus, lambda st: st["State"] == "failed", "the primary to fail on the tracking mode")
    check(want in st["Detail"], f"the failure does not name the tracking mode: {st}")
    rc, out, err = ctl(bus, "status", "t")
    check(rc == 12, f"dirtyrepctl status of a failed VM exited {rc}, expected 12: {out} {err}")
    # Attach() waits for the worker's outcome and says why it failed.
    ctl_fails(bus, 4, want, "attach", "t")
    st = status(bus)
    check(st["State"] == "failed" and want in st["Detail"], f"after a refused attach: {st}")
    # The VMM was left running, untracked: a primary of the right mode attaches to it.
    check(vmm.alive(), "the VMM died when the primary refused its tracking mode")
    loopback.stop_clean(d)
    d = Daemon(tmp, "primary3", ["--role", "primary", "--control-socket", vmm.control, "--tracking", "bitmap",
                                 "--peer", f"127.0.0.1:{port}"], bus=bus)
    on_bus(bus, d)
    st = wait_for(bus, lambda st: st["State"] == "connecting", "Tracking=bitmap to attach")
    log(f"Tracking=bitmap attached: {st['State']}: {st['Detail']}")
    loopback.stop_clean(d)
    vmm.stop()


def main():
    if len(sys.argv) != 2 or sys.argv[1] not in ("dbus", "notify", "attach"):
        print(__doc__)
        return 2
    if not os.path.exists("/dev/kvm"):
        print("SKIP: /dev/kvm missing")
        return 77
    for tool in ("dbus-daemon", "busctl", "setpriv"):
        if not shutil.which(tool):
            print(f"SKIP: {tool} not installed (scripts/deps.sh installs it)")
            return 77
    for k in ("DR_VMM", "DR_DIRTYREPD", "DR_DIRTYREPCTL", "DR_GUEST_DIRTIER", "DR_SRCDIR"):
        if k not in ENV:
            fail(f"{k} not set")
    return control.in_tmp("dr-ctl-", {"dbus": test_dbus, "notify": test_notify, "attach": test_attach}[sys.argv[1]],
                          world=True)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""dirtyrep under systemd, with real parts.

  test-systemd.py units    `meson install --destdir`: every file in its place;
                           `systemd-analyze verify --man=no` of the installed unit
                           prints nothing (any stderr output fails)
  test-systemd.py nspawn   the project built with --prefix=/usr and installed with
                           `meson install --destdir` into a Debian 12 tree made by
                           `debootstrap --variant=minbase` (systemd, systemd-sysv, dbus
                           and the packages of the libraries ldd finds in the installed
                           executables; from the host's apt mirror), booted with
                           `systemd-nspawn -b --register=no --keep-unit
                           --private-network`, /dev/kvm bound in; inside:
                           `systemctl start dirtyrep` with a primary and a standby VM
                           (loopback) and the reference VMM running a guest,
                           `dirtyrepctl status/checkpoint` over the container's system
                           bus, the bus policy (nobody refused, a member of group
                           dirtyrep allowed), `systemctl reload`, a hung
                           daemon (SIGSTOP) killed and restarted by the watchdog, then
                           the standby SIGSTOPped until the primary suspends: a clean
                           `systemctl stop` leaves the VM suspended (its console stops)
                           and `systemctl start` brings the daemon back suspended.
  test-systemd.py restart-promoted
                           operator-restart-promoted, in the same container: dirtyrep.service
                           is the standby of a second dirtyrepd (the primary "host", with its
                           VMM as a transient unit); the primary is SIGKILLed, `dirtyrepctl
                           failover` returns once the kv guest answers, its VMM runs in
                           dirtyrep-vmm-t.scope; `systemctl restart dirtyrep` and `stop`/`start`
                           keep the same VMM serving (INCR keeps counting), the role is in
                           /var/lib/dirtyrep/t.role and the daemon reattaches as primary.
  test-systemd.py scenarios
                           operator-nspawn-scenarios, the pair of restart-promoted, under
                           dirtyrep.service with systemctl and dirtyrepctl, in one container:
                           a second `dirtyrepd --bus=system` exits naming the lock (main PID,
                           lock, bus name owner, /run/dirtyrep unchanged, replication goes on);
                           Peer= added and `systemctl reload`: LastCommitted never 0 (polled
                           through it), the role restarted, protected again with no full sync;
                           `dirtyrepctl maintenance t on`: the guest answers every INCR for 5 s
                           (the old primary's SplitBrainTimeoutMs=2000, policy suspend), `off`
                           resyncs; the primary dies with another process on the VMM's service
                           port: `dirtyrepctl failover` exits non-zero with "Address already in
                           use", the standby keeps its committed epoch and no VMM runs; the port
                           freed, the retry returns once the guest answers INCR above the last
                           acknowledged value.
  test-systemd.py failover-scope
                           systemd-failover-scope, the same container without /dev/kvm: the
                           primary is dr-linkprimary, the failover "VMM" a program that reports
                           ready; the scope, the role file, the VMM's survival of `systemctl
                           restart`/`stop`, the reattach, and a demotion stopping the scope.
                           The debootstrap result is made once per build directory
                           (BUILDDIR/control-nspawn-debootstrap, remade when the package
                           list changes); each run boots a fresh overlay of it.

Exit 0 pass, 1 fail, 77 skip (says why: no systemd-nspawn, no debootstrap, the Debian
archive unreachable or a download failed, no /dev/kvm, not root).
"""
import glob
import os
import re
import shutil
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from nspawn import (ENV, build_option, check, debootstrap_tree, fail, install, log, read, remove_tree,  # noqa: E402
                    run, run_group, runtime_packages, umount_under, usr_build)


def find_one(dest, suffix):
    hits = [os.path.join(d, f) for d, _, fs in os.walk(dest) for f in fs
            if os.path.join(d, f).endswith(suffix)]
    check(len(hits) == 1, f"expected one installed {suffix}, found {hits}")
    return hits[0]


def test_units(tmp):
    builddir = ENV["DR_BUILDDIR"]
    prefix = build_option(builddir, "prefix")
    dest = os.path.join(tmp, "dest")
    install(builddir, dest)
    # Every control-plane file where the system looks for it.
    for suffix in ("/systemd/system/dirtyrep.service", "/systemd/system/dirtyrep-vmm@.service", "/sysusers.d/dirtyrep.conf", "/tmpfiles.d/dirtyrep.conf",
                   "/dbus-1/system.d/org.dirtyrep1.conf", "/bash-completion/completions/dirtyrepctl",
                   "/man1/dirtyrepctl.1", "/man8/dirtyrepd.8", "/man5/dirtyrep.conf.5",
                   "/sbin/dirtyrepd", "/bin/dirtyrepctl"):
        log("installed:", os.path.relpath(find_one(dest, suffix), dest))
    unit = find_one(dest, "/systemd/system/dirtyrep.service")
    text = open(unit).read()
    for want in ("Type=notify", "BusName=org.dirtyrep1", "WatchdogSec=", f"ExecStart={prefix}/sbin/dirtyrepd",
                 "DeviceAllow=/dev/kvm rw", "CAP_NET_ADMIN"):
        check(want in text, f"unit lacks {want!r}")

    # verify checks that ExecStart= exists: show the installed tree at its real place, in a
    # private mount namespace (an overlay of the install over the prefix), nothing on the host changes.
    lower = os.path.join(dest, prefix.lstrip("/"))
    # The VMM template, as an instance (verify needs one).
    vmm_unit = os.path.join(tmp, "dirtyrep-vmm@t.service")
    shutil.copy(find_one(dest, "/systemd/system/dirtyrep-vmm@.service"), vmm_unit)
    script = (f"mount -t overlay overlay -o lowerdir={lower}:{prefix} {prefix} && "
              f"exec systemd-analyze verify --man=no {unit} {vmm_unit}")
    if not os.path.isdir(prefix):
        fail(f"prefix {prefix} does not exist on this host")
    c = run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script])
    log(f"systemd-analyze verify: exit {c.returncode}, stdout {c.stdout!r}, stderr {c.stderr!r}")
    check(c.returncode == 0 and c.stderr == "", "systemd-analyze verify is not clean")

    c = run(["systemd-analyze", "security", "--offline=true", "--no-pager", unit])
    score = re.search(r"Overall exposure level for \S+: (.*)", c.stdout + c.stderr)
    log("systemd-analyze security --offline:", score.group(1) if score else (c.stdout + c.stderr)[-300:])

    # The policy is well-formed XML that dbus-daemon accepts (the control-dbus test uses it for real).
    policy = find_one(dest, "/dbus-1/system.d/org.dirtyrep1.conf")
    import xml.dom.minidom
    xml.dom.minidom.parse(policy)
    log("PASS: installed files in place, systemd-analyze verify clean")


INSIDE = r"""#!/bin/sh
# Runs inside the container as dr-test.service; results go to /run/dr-results.
R=/run/dr-results
exec > $R/log 2>&1
set -x
getent group dirtyrep > $R/group
ls -ld /run/dirtyrep /var/lib/dirtyrep /etc/dirtyrep/vm.d > $R/tmpfiles 2>&1
systemd-analyze verify --man=no dirtyrep.service 2> $R/verify.err; echo $? > $R/verify.rc

# The standby "host": a second dirtyrepd as a transient unit with its own configuration.
systemd-run --unit=dr-standby --property=Type=exec /usr/sbin/dirtyrepd --bus=none \
    --config /etc/dirtyrep-standby/dirtyrep.conf --config-dir /etc/dirtyrep-standby/vm.d
systemd-run --unit=dr-vmm --property=Type=exec /usr/bin/dirtyrep-vmm --name t --kernel /run/dr/dirtier.elf \
    --cpus 1 --memory 128M --control /run/dirtyrep/t.sock --console $R/console.log --append "ws=4M rate=5000"

systemctl start dirtyrep; echo $? > $R/start.rc
systemctl is-active dirtyrep > $R/active
for i in $(seq 150); do dirtyrepctl status t | grep -q "primary, protected" && break; sleep 0.2; done
dirtyrepctl status > $R/status.txt; echo $? > $R/status.rc
dirtyrepctl checkpoint t > $R/checkpoint.txt; echo $? > $R/checkpoint.rc
dirtyrepctl list --no-legend > $R/list.txt
setpriv --reuid=65534 --regid=65534 --clear-groups dirtyrepctl checkpoint t 2> $R/nobody.err; echo $? > $R/nobody.rc
setpriv --reuid=65534 --regid=65534 --clear-groups dirtyrepctl status t > $R/nobody-status.txt; echo $? > $R/nobody-status.rc
# A member of group dirtyrep (created by sysusers.d) may change things without being root.
gid=$(getent group dirtyrep | cut -d: -f3)
setpriv --reuid=65534 --regid=65534 --groups="$gid" dirtyrepctl checkpoint t > $R/member.txt 2> $R/member.err; echo $? > $R/member.rc
systemctl reload dirtyrep; echo $? > $R/reload.rc

# A hung daemon: the watchdog (shortened here) kills it and systemd restarts it.
mkdir -p /run/systemd/system/dirtyrep.service.d
printf '[Service]\nWatchdogSec=2s\nTimeoutAbortSec=2s\n' > /run/systemd/system/dirtyrep.service.d/test.conf
systemctl daemon-reload
systemctl restart dirtyrep
old=$(systemctl show -p MainPID --value dirtyrep)
restarts=$(systemctl show -p NRestarts --value dirtyrep)
kill -STOP "$old"
new=$old
for i in $(seq 150); do
    new=$(systemctl show -p MainPID --value dirtyrep)
    [ "$new" != "$old" ] && [ "$new" != 0 ] && [ "$(systemctl is-active dirtyrep)" = active ] && break
    sleep 0.2
done
echo "$old $new $restarts $(systemctl show -p NRestarts --value dirtyrep)" > $R/watchdog.txt
for i in $(seq 150); do dirtyrepctl status t | grep -q "primary, protected" && break; sleep 0.2; done
dirtyrepctl status t > $R/status2.txt; echo $? > $R/status2.rc
journalctl -u dirtyrep --no-pager > $R/journal.txt

# A suspended primary: its standby stops answering (SIGSTOP), the split-brain guard
# (SplitBrainPolicy=suspend after SplitBrainTimeoutMs=5000, the defaults) suspends the VM.
# systemctl stop must leave it suspended (the dirtier guest's once-a-second console
# report stops), and the restarted daemon must come back suspended.
sbpid=$(systemctl show -p MainPID --value dr-standby)
kill -STOP "$sbpid"
for i in $(seq 150); do dirtyrepctl status t | grep -q "primary, suspended" && break; sleep 0.2; done
dirtyrepctl status t > $R/suspended.txt

systemctl stop dirtyrep; echo $? > $R/stop.rc
systemctl show -p ActiveState -p Result -p ExecMainStatus dirtyrep > $R/stopped.txt
c1=$(wc -c < $R/console.log); sleep 3; c2=$(wc -c < $R/console.log)
echo "$c1 $c2" > $R/console-stopped.txt
systemctl start dirtyrep
for i in $(seq 150); do dirtyrepctl status t | grep -q "primary, suspended" && break; sleep 0.2; done
dirtyrepctl status t > $R/suspended2.txt
c1=$(wc -c < $R/console.log); sleep 3; c2=$(wc -c < $R/console.log)
echo "$c1 $c2" > $R/console-restarted.txt
systemctl stop dirtyrep; echo $? > $R/stop2.rc
kill -CONT "$sbpid"
journalctl -u dr-vmm --no-pager > $R/vmm-journal.txt
systemctl stop dr-vmm dr-standby
echo done > $R/done
systemctl poweroff
"""

# The old primary "host" of operator-restart-promoted and operator-nspawn-scenarios: a second
# dirtyrepd (/etc/dirtyrep-old, its VMM running the kv guest) as transient units, with
# dirtyrep.service as its standby. Leaves the pair protected and the guest answering (v1).
PRIMARY_HOST = r"""#!/bin/bash
R=/run/dr-results
exec > $R/log 2>&1
set -x
# One INCR k through the guest's service port (RESP); prints the integer reply or nothing.
incr() {
    local line
    exec 3<>/dev/tcp/127.0.0.1/6380 || return 1
    printf '*2\r\n$4\r\nINCR\r\n$1\r\nk\r\n' >&3
    read -t 3 -r line <&3
    exec 3>&-
    line=${line//[^0-9]/}
    [ -n "$line" ] && echo "$line"
}
incr_retry() { for i in $(seq 100); do v=$(incr) && [ -n "$v" ] && { echo "$v"; return 0; }; sleep 0.1; done; return 1; }
# The processes in the VMM's scope, from /proc (no procps in the container).
vmm_pids() { grep -l 'dirtyrep-vmm-t\.scope' /proc/[0-9]*/cgroup 2>/dev/null | cut -d/ -f3 | sort -n | tr '\n' ' '; }
# Waits up to 60 s for `dirtyrepctl status t` to show $1.
wait_status() { for i in $(seq 300); do dirtyrepctl status t | grep -q "$1" && return 0; sleep 0.2; done; return 1; }

mkdir -p /run/dirtyrep-old
systemd-run --unit=dr-oldvmm --property=Type=exec /usr/bin/dirtyrep-vmm --name t --kernel /run/dr/kv.elf \
    --memory 64M --control /run/dirtyrep-old/t.sock --console /run/dr-results/old-console.log \
    --service-listen 127.0.0.1:6380
systemd-run --unit=dr-oldprimary --property=Type=exec /usr/sbin/dirtyrepd --bus=none --config /etc/dirtyrep-old/dirtyrep.conf --config-dir /etc/dirtyrep-old/vm.d
systemctl start dirtyrep; echo $? > $R/start.rc
wait_status "standby, protected"
dirtyrepctl status t > $R/status-standby.txt
v1=$(incr_retry); echo "$v1" > $R/v1
"""

# operator-restart-promoted: the standby host's dirtyrep.service fails over, and a restart of it
# must not touch the guest (its VMM runs in dirtyrep-vmm-t.scope). The old primary host is
# SIGKILLed (a dead host).
INSIDE_RESTART = PRIMARY_HOST + r"""
systemd-analyze verify --man=no dirtyrep-vmm@t.service 2> $R/verify-vmm.err; echo $? > $R/verify-vmm.rc

# The primary host dies.
systemctl kill -s KILL dr-oldprimary dr-oldvmm
for i in $(seq 100); do dirtyrepctl failover t > $R/failover.txt 2> $R/failover.err; rc=$?; [ $rc = 0 ] && break; sleep 0.2; done
echo $rc > $R/failover.rc
v2=$(incr); echo "$v2" > $R/v2
systemctl is-active dirtyrep-vmm-t.scope > $R/scope-active
vmm_pids > $R/pids-before
cat /var/lib/dirtyrep/t.role > $R/role 2>&1

# The operator restarts the daemon: the guest is not touched.
systemctl restart dirtyrep; echo $? > $R/restart.rc
v3=$(incr_retry); echo "$v3" > $R/v3
vmm_pids > $R/pids-after-restart
wait_status "t: primary, unprotected"
dirtyrepctl status t > $R/status-restarted.txt; echo $? > $R/status-restarted.rc
# Stopped altogether, the guest still answers; started again, the daemon reattaches.
systemctl stop dirtyrep; echo $? > $R/stop.rc
v4=$(incr_retry); echo "$v4" > $R/v4
vmm_pids > $R/pids-after-stop
systemctl start dirtyrep
wait_status "t: primary, unprotected"
dirtyrepctl status t > $R/status-again.txt
v5=$(incr_retry); echo "$v5" > $R/v5
journalctl -u dirtyrep --no-pager > $R/journal.txt
systemctl stop dirtyrep dirtyrep-vmm-t.scope
echo done > $R/done
systemctl poweroff
"""

TEST_UNIT_BASH = """[Unit]
Description=dirtyrep systemd test
After=dbus.service systemd-sysusers.service systemd-tmpfiles-setup.service
[Service]
Type=oneshot
ExecStart=/bin/bash /run/dr/inside.sh
"""


def restart_promoted_setup(root, etc, drdir, script=INSIDE_RESTART, standby="Peer=127.0.0.1:7742\n", primary=""):
    """Configuration of PRIMARY_HOST: dirtyrep.service is the standby (its t.conf gets the
    standby lines), /etc/dirtyrep-old the primary (its t.conf gets the primary lines); script runs inside."""
    with open(os.path.join(etc, "vm.d/t.conf"), "w") as f:
        f.write("[VM]\nRole=standby\nListen=127.0.0.1:7741\nSecretFile=/etc/dirtyrep/secret\n"
                "FailoverPolicy=manual\nVmm=/usr/bin/dirtyrep-vmm\n"
                "VmmArgs=--service-listen 127.0.0.1:6380 --console /run/dirtyrep/t-console.log\n" + standby)
    old = os.path.join(root, "etc/dirtyrep-old")
    os.makedirs(os.path.join(old, "vm.d"))
    with open(os.path.join(old, "dirtyrep.conf"), "w") as f:
        f.write("[Daemon]\nRuntimeDirectory=/run/dirtyrep-old\nStateDirectory=/var/lib/dirtyrep-old\n")
    with open(os.path.join(old, "vm.d/t.conf"), "w") as f:
        f.write("[VM]\nRole=primary\nPeer=127.0.0.1:7741\nSecretFile=/etc/dirtyrep/secret\n" + primary)
    os.makedirs(os.path.join(root, "etc/dirtyrep/vmm"), exist_ok=True)
    with open(os.path.join(root, "etc/dirtyrep/vmm/t.conf"), "w") as f:
        f.write("VMM_ARGS=--kernel /run/dr/kv.elf --memory 64M\n")
    with open(os.path.join(drdir, "inside.sh"), "w") as f:
        f.write(script)
    shutil.copy(ENV["DR_GUEST_KV"], os.path.join(drdir, "kv.elf"))
    with open(os.path.join(root, "etc/systemd/system/dr-test.service"), "w") as f:
        f.write(TEST_UNIT_BASH)


def num(res, name):
    v = read(res, name).strip()
    return int(v) if v.isdigit() else None


def primary_host_check(res, journal):
    """PRIMARY_HOST's part: dirtyrep.service started and protects the old primary, whose guest answered (v1)."""
    check(read(res, "start.rc").strip() == "0", f"systemctl start dirtyrep failed:\n{journal[-3000:]}")
    log("standby before the scenarios:\n" + read(res, "status-standby.txt"))
    check("standby, protected" in read(res, "status-standby.txt"), "the standby never got protected")
    check(num(res, "v1") is not None, "the guest never answered through the old primary")


def restart_promoted_check(res):
    journal = read(res, "journal.txt")
    check(read(res, "verify-vmm.rc").strip() == "0" and read(res, "verify-vmm.err") == "",
          f"systemd-analyze verify dirtyrep-vmm@t.service: {read(res, 'verify-vmm.err')!r}")
    primary_host_check(res, journal)
    v = [num(res, f"v{i}") for i in range(1, 6)]
    log(f"INCR k: before the failover {v[0]}, after it {v[1]}, after `systemctl restart dirtyrep` {v[2]}, "
        f"with the daemon stopped {v[3]}, after it started again {v[4]}")
    check(read(res, "failover.rc").strip() == "0" and "now primary" in read(res, "failover.txt"),
          f"dirtyrepctl failover: {read(res, 'failover.rc')} {read(res, 'failover.txt')} {read(res, 'failover.err')}"
          f"\n{journal[-3000:]}")
    check(v[1] is not None and v[1] > v[0],
          f"the guest did not answer at once after `dirtyrepctl failover` returned (v2={v[1]}, v1={v[0]})")
    check(read(res, "scope-active").strip() == "active", "the failover VMM is not in dirtyrep-vmm-t.scope")
    check("role=primary" in read(res, "role"), f"the role was not persisted: {read(res, 'role')!r}")
    before = read(res, "pids-before").split()
    check(len(before) >= 1, "no process in dirtyrep-vmm-t.scope")
    check(read(res, "restart.rc").strip() == "0", "systemctl restart dirtyrep failed")
    check(read(res, "pids-after-restart").split() == before,
          f"the VMM changed across `systemctl restart dirtyrep`: {before} -> {read(res, 'pids-after-restart')}")
    check(v[2] is not None and v[2] > v[1], f"the guest lost state or stopped answering across the restart: {v}")
    log("after the restart:\n" + read(res, "status-restarted.txt"))
    check("t: primary, unprotected" in read(res, "status-restarted.txt"),
          "the restarted daemon did not come back as the VM's primary")
    check(read(res, "stop.rc").strip() == "0" and read(res, "pids-after-stop").split() == before,
          "the VMM did not survive `systemctl stop dirtyrep`")
    check(v[3] is not None and v[3] > v[2], f"the guest did not answer with the daemon stopped: {v}")
    check("t: primary, unprotected" in read(res, "status-again.txt"), "no reattach after the start")
    check(v[4] is not None and v[4] > v[3], f"the guest did not answer after the reattach: {v}")
    check("reattaching to its VMM in dirtyrep-vmm-t.scope" in journal, "the journal does not show the reattach")
    log("PASS: failover answered once the guest ran; the VMM in its own scope kept serving across "
        "`systemctl restart` and `stop`/`start` of dirtyrep; the role was persisted and reattached")
    return 0


# operator-nspawn-scenarios: issue 19's operator scenarios on one PRIMARY_HOST pair, in this order
# (the failover kills the old primary, so it comes last): a second dirtyrepd started as the unit
# would; `systemctl reload` with Peer= added to the standby's t.conf; `dirtyrepctl maintenance`
# on and off; a failover that fails (the VMM's service port held), then succeeds on retry.
INSIDE_SCENARIOS = PRIMARY_HOST + r"""
committed() { busctl get-property org.dirtyrep1 /org/dirtyrep1/vm/t org.dirtyrep1.VM LastCommitted | cut -d' ' -f2; }
# Waits up to 60 s for the replica's committed epoch to pass $1; prints it.
committed_past() { local c; for i in $(seq 300); do c=$(committed); [ "${c:-0}" -gt "$1" ] && break; sleep 0.2; done; echo "$c"; }
mark() { echo "$1 $(date +%s.%N)" >> $R/times; }

mark second-daemon
main=$(systemctl show -p MainPID --value dirtyrep)
c=$(committed); echo "$main $(cat /run/dirtyrep/dirtyrepd.lock) $c" > $R/second-before
ls -l /run/dirtyrep > $R/rundir-before
timeout 20 /usr/sbin/dirtyrepd --bus=system > $R/second.out 2> $R/second.err; echo $? > $R/second.rc
ls -l /run/dirtyrep > $R/rundir-after
owner=$(busctl status org.dirtyrep1 | sed -n 's/^PID=//p')
echo "$(systemctl show -p MainPID --value dirtyrep) $(cat /run/dirtyrep/dirtyrepd.lock) $owner $(committed_past $c)" \
    > $R/second-after
dirtyrepctl status t > $R/status-second.txt
v=$(incr); echo "$v" > $R/v-second

mark reload
c=$(committed); echo "$c" > $R/committed-before-reload
# LastCommitted, as fast as busctl reads it, through the reload and 1 s after.
( set +x; while [ ! -e $R/reload.rc ]; do committed; done
  for i in $(seq 20); do committed; sleep 0.05; done ) > $R/reload-committed 2>&1 &
poller=$!
echo "Peer=127.0.0.1:7742" >> /etc/dirtyrep/vm.d/t.conf
systemctl reload dirtyrep > $R/reload.txt 2>&1; echo $? > $R/reload.rc
wait $poller
committed_past "$c" > /dev/null
wait_status "standby, protected"
dirtyrepctl status t > $R/status-reloaded.txt

mark maintenance
c=$(committed); echo "$c" > $R/committed-before-maintenance
dirtyrepctl maintenance t on > $R/maint-on.txt 2>&1; echo $? > $R/maint-on.rc
dirtyrepctl status t > $R/status-maint.txt
# INCRs for 5 s, more than twice the old primary's SplitBrainTimeoutMs=2000: "MS VALUE" per try.
t0=$(date +%s%N)
while ms=$(( ($(date +%s%N) - t0) / 1000000 )); [ $ms -lt 5000 ]; do echo "$ms $(incr)" >> $R/maint-incr; sleep 0.1; done
dirtyrepctl maintenance t off > $R/maint-off.txt 2>&1; echo $? > $R/maint-off.rc
committed_past "$c" > /dev/null
wait_status "standby, protected"
dirtyrepctl status t > $R/status-maint-off.txt

mark failover-retry
v=$(incr_retry); echo "$v" > $R/v-before-kill
# The primary host dies; then another process holds the service port the failover VMM must listen on.
systemctl kill -s KILL dr-oldprimary dr-oldvmm
for i in $(seq 50); do systemctl -q is-active dr-oldvmm || break; sleep 0.1; done
systemd-run --unit=dr-blocker --property=Type=exec systemd-socket-activate -l 127.0.0.1:6380 sleep infinity
for i in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/6380) && break; sleep 0.1; done
wait_status "waiting for promote"
c=$(committed)
dirtyrepctl failover t > $R/failover1.txt 2> $R/failover1.err; echo $? > $R/failover1.rc
dirtyrepctl status t > $R/status-failed-activation.txt
echo "$c $(committed)" > $R/committed-failed-activation
vmm_pids > $R/pids-failed-activation
# The VMM has exited (and been reaped); systemd notices the scope's empty cgroup a moment later.
systemctl is-active dirtyrep-vmm-t.scope > $R/scope-at-once
for i in $(seq 50); do [ "$(systemctl is-active dirtyrep-vmm-t.scope)" != active ] && break; sleep 0.1; done
systemctl is-active dirtyrep-vmm-t.scope > $R/scope-failed-activation
systemctl stop dr-blocker
dirtyrepctl failover t > $R/failover2.txt 2> $R/failover2.err; echo $? > $R/failover2.rc
v=$(incr); echo "$v" > $R/v-after-failover
systemctl is-active dirtyrep-vmm-t.scope > $R/scope-promoted
vmm_pids > $R/pids-promoted
dirtyrepctl status t > $R/status-promoted.txt
mark end

journalctl -u dirtyrep --no-pager > $R/journal.txt
systemctl stop dirtyrep dirtyrep-vmm-t.scope
echo done > $R/done
systemctl poweroff
"""
SCENARIOS_SPLIT_MS = 2000


def scenarios_setup(root, etc, drdir):
    restart_promoted_setup(root, etc, drdir, INSIDE_SCENARIOS, standby="",
                           primary=f"SplitBrainPolicy=suspend\nSplitBrainTimeoutMs={SCENARIOS_SPLIT_MS}\n")


def status_num(text, pattern):
    m = re.search(pattern, text)
    return int(m.group(1)) if m else None


def scenarios_check(res):
    journal = read(res, "journal.txt")
    primary_host_check(res, journal)
    marks = [line.split() for line in read(res, "times").splitlines()]
    log("scenario times: " + ", ".join(f"{a[0]} {float(b[1]) - float(a[1]):.1f} s" for a, b in zip(marks, marks[1:])))

    # A second daemon, same configuration: exits naming the lock, the first keeps everything.
    before, after = read(res, "second-before").split(), read(res, "second-after").split()
    err = read(res, "second.err")
    log(f"second dirtyrepd: exit {read(res, 'second.rc').strip()}: {err.strip()[:300]}")
    check(read(res, "second.rc").strip() == "1", f"the second dirtyrepd exited {read(res, 'second.rc').strip()}")
    check(len(before) == 3 and f"Another dirtyrepd (PID {before[0]}) is running" in err and
          "/run/dirtyrep/dirtyrepd.lock" in err and "exits without touching anything" in err, f"unclear error: {err}")
    check("D-Bus API" not in err and "role started" not in err, f"the second daemon got further than the lock: {err}")
    check(len(after) == 4 and after[:3] == [before[0]] * 3 and before[1] == before[0],
          f"main PID, lock and bus name owner before {before[:2]}, after {after[:3]}")
    check(int(after[3]) > int(before[2]), f"replication stopped after the second daemon: committed {before[2]} -> "
          f"{after[3]}")
    check(read(res, "rundir-after") == read(res, "rundir-before"),
          f"/run/dirtyrep changed:\n{read(res, 'rundir-before')}->\n{read(res, 'rundir-after')}")
    check("t: standby, protected" in read(res, "status-second.txt"), "the standby is not protected after it")
    check((num(res, "v-second") or 0) > num(res, "v1"), "the guest stopped answering after the second daemon")
    log(f"the first (PID {before[0]}) kept its lock, bus name and runtime directory; committed {before[2]} -> "
        f"{after[3]}")

    # systemctl reload with Peer= added: the standby's role restarts on the same replica.
    polled = [int(x) for x in re.findall(r"^(\d+)$", read(res, "reload-committed"), re.M)]
    reloaded = read(res, "status-reloaded.txt")
    log(f"systemctl reload: exit {read(res, 'reload.rc').strip()}; LastCommitted polled {len(polled)} times "
        f"through it, lowest {min(polled) if polled else None}; after it:\n{reloaded}")
    check(read(res, "reload.rc").strip() == "0", f"systemctl reload dirtyrep failed: {read(res, 'reload.txt')}")
    check(re.search(r"VM t: configuration changed, restarting its role", journal) and
          re.search(r"Reloaded: 0 VM\(s\) added, 0 removed, 1 restarted", journal),
          "the reload did not restart the VM's role with the new configuration")
    check(len(polled) > 0 and min(polled) > 0, f"LastCommitted dropped to 0 during the reload: {polled}")
    check("t: standby, protected" in reloaded and
          status_num(reloaded, r"Epoch: committed (\d+)") > num(res, "committed-before-reload"),
          "the standby did not resume replicating after the reload")
    check(status_num(reloaded, r"Syncs: (\d+) full") == 0,
          "the primary full-synced the restarted standby: the reload dropped the replica")

    # Maintenance: the primary keeps serving past its split-brain timeout; off resyncs.
    maint = read(res, "status-maint.txt")
    check(read(res, "maint-on.rc").strip() == "0" and "t: standby, maintenance" in maint,
          f"maintenance on: {read(res, 'maint-on.txt')}\n{maint}")
    tries = [line.split() for line in read(res, "maint-incr").splitlines()]
    answered = [(int(t[0]), int(t[1])) for t in tries if len(t) == 2]
    log(f"maintenance: {len(answered)} of {len(tries)} INCRs answered over "
        f"{tries[-1][0] if tries else 0} ms (SplitBrainTimeoutMs={SCENARIOS_SPLIT_MS}); "
        f"values {answered[0][1] if answered else None}..{answered[-1][1] if answered else None}")
    check(tries and len(answered) == len(tries), f"INCRs went unanswered during maintenance: {tries}")
    check(all(b[1] > a[1] for a, b in zip(answered, answered[1:])), f"INCR did not count up: {answered}")
    check(answered[-1][0] > 2 * SCENARIOS_SPLIT_MS, "maintenance was not held past the split-brain timeout")
    off = read(res, "status-maint-off.txt")
    check(read(res, "maint-off.rc").strip() == "0" and "t: standby, protected" in off and
          status_num(off, r"Epoch: committed (\d+)") > num(res, "committed-before-maintenance"),
          f"maintenance off did not resync: {read(res, 'maint-off.txt')}\n{off}")

    # A failover whose VMM cannot start fails with the VMM's error, keeps the replica; the retry works.
    e1 = read(res, "failover1.err")
    log(f"failover with the port held: exit {read(res, 'failover1.rc').strip()}: {e1.strip()[:300]}")
    check(read(res, "failover1.rc").strip() not in ("", "0"), f"failover succeeded with the port held: "
          f"{read(res, 'failover1.txt')}")
    check("Address already in use" in e1, f"the failover did not report the VMM's own error: {e1!r}")
    kept = read(res, "committed-failed-activation").split()
    check("t: standby" in read(res, "status-failed-activation.txt") and len(kept) == 2 and kept[0] == kept[1] and
          int(kept[0]) > 0, f"the failed activation did not leave the standby on its replica: committed {kept}\n"
          f"{read(res, 'status-failed-activation.txt')}")
    log(f"dirtyrep-vmm-t.scope right after the failed activation: {read(res, 'scope-at-once').strip()}, "
        f"then {read(res, 'scope-failed-activation').strip()}")
    check(read(res, "scope-failed-activation").strip() != "active" and not read(res, "pids-failed-activation").split(),
          f"a VMM still runs after the failed activation: dirtyrep-vmm-t.scope "
          f"{read(res, 'scope-failed-activation').strip()}, pids {read(res, 'pids-failed-activation')!r}")
    check(read(res, "failover2.rc").strip() == "0" and "now primary" in read(res, "failover2.txt"),
          f"the retried failover: {read(res, 'failover2.txt')} {read(res, 'failover2.err')}\n{journal[-3000:]}")
    va, vb = num(res, "v-before-kill"), num(res, "v-after-failover")
    log(f"INCR k: {va} acknowledged before the primary died, {vb} right after the retried failover")
    check(va is not None and vb is not None and vb > va, f"the guest lost state or did not answer: {va} -> {vb}")
    check("t: primary" in read(res, "status-promoted.txt"), "not primary after the failover")
    scope_log = "\n".join(line for line in journal.splitlines() if "dirtyrep-vmm-t.scope" in line or "unit of its own" in line)
    check(read(res, "scope-promoted").strip() == "active" and read(res, "pids-promoted").split(),
          f"the retried failover's VMM is not in dirtyrep-vmm-t.scope (scope {read(res, 'scope-promoted').strip()}, "
          f"pids {read(res, 'pids-promoted')!r}):\n{scope_log}")
    log("PASS: under systemd, a second dirtyrepd touched nothing, `systemctl reload` kept the replica, "
        "maintenance kept the primary serving and resynced, a failed activation kept the replica and the retry "
        "served the guest's state")
    return 0


# systemd-failover-scope: the same promotion under real systemd without /dev/kvm: the primary is
# dr-linkprimary (the replication protocol on synthetic RAM) and the "VMM" a program that only
# reports ready (fd 5) and stays. Checks the daemon's side: the scope, the role file, the VMM
# untouched by `systemctl restart`/`stop`, the reattach, and a demotion that stops the scope.
INSIDE_SCOPE = r"""#!/bin/bash
R=/run/dr-results
exec > $R/log 2>&1
set -x
vmm_pids() { grep -l 'dirtyrep-vmm-t\.scope' /proc/[0-9]*/cgroup 2>/dev/null | cut -d/ -f3 | sort -n | tr '\n' ' '; }
systemctl start dirtyrep; echo $? > $R/start.rc
systemd-run --unit=dr-lp /run/dr/dr-linkprimary --connect 127.0.0.1:7741 --secret /etc/dirtyrep/secret --name t \
    --pages 1024
for i in $(seq 150); do dirtyrepctl status t | grep -q "standby, protected" && break; sleep 0.2; done
dirtyrepctl status t > $R/status-standby.txt
systemctl kill -s KILL dr-lp
for i in $(seq 100); do dirtyrepctl failover t > $R/failover.txt 2>&1; rc=$?; [ $rc = 0 ] && break; sleep 0.2; done
echo $rc > $R/failover.rc
systemctl is-active dirtyrep-vmm-t.scope > $R/scope-active
vmm_pids > $R/pids-before
cat /var/lib/dirtyrep/t.role > $R/role 2>&1
systemctl restart dirtyrep; echo $? > $R/restart.rc
vmm_pids > $R/pids-after-restart
dirtyrepctl status t > $R/status-restarted.txt
systemctl stop dirtyrep; echo $? > $R/stop.rc
vmm_pids > $R/pids-after-stop
systemctl start dirtyrep
dirtyrepctl failover t > $R/demote.txt 2>&1; echo $? > $R/demote.rc
for i in $(seq 50); do [ "$(systemctl is-active dirtyrep-vmm-t.scope)" != active ] && break; sleep 0.1; done
systemctl is-active dirtyrep-vmm-t.scope > $R/scope-after-demote
vmm_pids > $R/pids-after-demote
ls /var/lib/dirtyrep > $R/statedir
journalctl -u dirtyrep --no-pager > $R/journal.txt
echo done > $R/done
systemctl poweroff
"""


def failover_scope_setup(root, etc, drdir, b):
    with open(os.path.join(etc, "vm.d/t.conf"), "w") as f:
        f.write("[VM]\nRole=standby\nListen=127.0.0.1:7741\nPeer=127.0.0.1:7742\nSecretFile=/etc/dirtyrep/secret\n"
                "FailoverPolicy=manual\nVmm=/run/dr/fakevmm\n")
    with open(os.path.join(drdir, "inside.sh"), "w") as f:
        f.write(INSIDE_SCOPE)
    with open(os.path.join(drdir, "fakevmm"), "w") as f:
        f.write("#!/bin/bash\necho \"fakevmm $*\"\necho 1 >&5\nexec sleep infinity\n")
    os.chmod(os.path.join(drdir, "fakevmm"), 0o755)
    shutil.copy(os.path.join(b, "tests/integration/dr-linkprimary"), drdir)
    with open(os.path.join(root, "etc/systemd/system/dr-test.service"), "w") as f:
        f.write(TEST_UNIT_BASH)


def failover_scope_check(res):
    journal = read(res, "journal.txt")
    check(read(res, "start.rc").strip() == "0", f"systemctl start dirtyrep failed:\n{journal[-3000:]}")
    check("standby, protected" in read(res, "status-standby.txt"), f"never protected:\n{journal[-3000:]}")
    check(read(res, "failover.rc").strip() == "0" and "now primary" in read(res, "failover.txt"),
          f"failover: {read(res, 'failover.txt')}\n{journal[-3000:]}")
    check(read(res, "scope-active").strip() == "active", "the VMM is not in dirtyrep-vmm-t.scope")
    role = read(res, "role")
    check("role=primary" in role and "unit=dirtyrep-vmm-t.scope" in role, f"role file: {role!r}")
    pids = read(res, "pids-before").split()
    log(f"VMM in dirtyrep-vmm-t.scope: pids {pids}; role file {role.split()}")
    check(len(pids) == 1, f"processes in the scope: {pids}")
    check(read(res, "restart.rc").strip() == "0" and read(res, "pids-after-restart").split() == pids,
          f"the VMM did not survive `systemctl restart dirtyrep`: {read(res, 'pids-after-restart')!r}")
    check("t: primary" in read(res, "status-restarted.txt"), "the restarted daemon is not the VM's primary")
    check(read(res, "stop.rc").strip() == "0" and read(res, "pids-after-stop").split() == pids,
          f"the VMM did not survive `systemctl stop dirtyrep`: {read(res, 'pids-after-stop')!r}")
    check(journal.count("reattaching to its VMM in dirtyrep-vmm-t.scope") == 2, "no reattach after restart/start")
    check(read(res, "demote.rc").strip() == "0" and "now standby" in read(res, "demote.txt"),
          f"demotion: {read(res, 'demote.txt')}")
    check(read(res, "scope-after-demote").strip() != "active" and read(res, "pids-after-demote").split() == [],
          "the demotion did not stop the VMM's scope")
    check("t.role" not in read(res, "statedir").split(), "the role file outlived the demotion")
    log("PASS: the failover VMM ran in its own scope, survived restart and stop of dirtyrep, the daemon "
        "reattached from the role file, and a demotion stopped the scope")
    return 0


TEST_UNIT = """[Unit]
Description=dirtyrep systemd test
After=dbus.service systemd-sysusers.service systemd-tmpfiles-setup.service
[Service]
Type=oneshot
ExecStart=/bin/sh /run/dr/inside.sh
"""


def sweep_stale_runs():
    """A run killed hard (meson's timeout sends SIGKILL 0.5 s after SIGTERM) leaves its directory: remove it."""
    for d in glob.glob(os.path.join(tempfile.gettempdir(), "dr-nspawn-*-*")):
        m = re.match(r"dr-nspawn-(\d+)-", os.path.basename(d))
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            log(f"removing {d} left by a killed run")
            remove_tree(d)


def test_nspawn(mode="nspawn"):
    if not shutil.which("systemd-nspawn"):
        print("SKIP: systemd-nspawn is not installed (package systemd-container)")
        return 77
    if not shutil.which("debootstrap"):
        print("SKIP: debootstrap is not installed (package debootstrap)")
        return 77
    # Our mounts (the overlay root, anything a broken debootstrap leaves) live in a private mount
    # namespace: they go away with this process, however it ends. unshare execs in place (same PID).
    if ENV.get("DR_NSPAWN_MNTNS") != str(os.getpid()):
        os.environ["DR_NSPAWN_MNTNS"] = str(os.getpid())
        os.execvp("unshare", ["unshare", "--mount", "--propagation", "private", sys.executable,
                              os.path.abspath(__file__), mode])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("killed by SIGTERM (meson timeout?)"))
    sweep_stale_runs()
    builddir = ENV["DR_BUILDDIR"]
    t_start = time.time()
    b = usr_build(builddir)
    t_built = time.time()
    pkgs = runtime_packages(b)
    cache, why, lock = debootstrap_tree(builddir, pkgs)
    if not cache:
        print(f"SKIP: no Debian 12 tree for the container: {why}")
        return 77
    t_tree = time.time()
    with tempfile.TemporaryDirectory(prefix=f"dr-nspawn-{os.getpid()}-") as tmp:
        root = os.path.join(tmp, "root")
        try:
            return nspawn_in(tmp, root, cache, b, t_start, t_built, t_tree, mode)
        finally:
            umount_under(root)
            lock.close()


def nspawn_in(tmp, root, cache, b, t_start, t_built, t_tree, mode="nspawn"):
    # A fresh copy of the cached tree for this run: an overlay whose upper layer is this run's.
    upper, work = os.path.join(tmp, "upper"), os.path.join(tmp, "work")
    for d in (root, upper, work):
        os.makedirs(d)
    if any(c in p for p in (cache, upper, work) for c in ",:"):
        c = run(["cp", "-a", "--reflink=auto", cache + "/.", root])
        check(c.returncode == 0, f"copying the cached tree: {c.stderr}")
    else:
        c = run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={cache},upperdir={upper},workdir={work}", root])
        check(c.returncode == 0, f"mounting the overlay over the cached tree: {c.stderr}")
    install(b, root)
    # Debian 12 is merged-/usr: the unit dir from systemd.pc, /lib/systemd/system, is /usr/lib/systemd/system.
    check(os.path.islink(os.path.join(root, "lib")), "the debootstrap tree is not merged-/usr")
    check(os.path.exists(os.path.join(root, "usr/lib/systemd/system/dirtyrep.service")), "unit not installed")
    with open(os.path.join(root, "etc/machine-id"), "w"):
        pass  # empty: the container boots with a fresh one

    # The operator's part: configuration and secret.
    etc = os.path.join(root, "etc/dirtyrep")
    os.makedirs(os.path.join(etc, "vm.d"), exist_ok=True)
    with open(os.open(os.path.join(etc, "secret"), os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write("nspawn-test-shared-secret-0123456789\n")
    with open(os.path.join(etc, "vm.d/t.conf"), "w") as f:
        f.write("[VM]\nRole=primary\nPeer=127.0.0.1:7741\nSecretFile=/etc/dirtyrep/secret\n")
    sb = os.path.join(root, "etc/dirtyrep-standby")
    os.makedirs(os.path.join(sb, "vm.d"))
    with open(os.path.join(sb, "dirtyrep.conf"), "w") as f:
        f.write("[Daemon]\nRuntimeDirectory=/run/dirtyrep-standby\nStateDirectory=/var/lib/dirtyrep-standby\n")
    with open(os.path.join(sb, "vm.d/t.conf"), "w") as f:
        f.write("[VM]\nRole=standby\nListen=127.0.0.1:7741\nSecretFile=/etc/dirtyrep/secret\n")
    with open(os.path.join(root, "etc/systemd/system/dr-test.service"), "w") as f:
        f.write(TEST_UNIT)
    drdir = os.path.join(tmp, "dr")
    os.makedirs(drdir)
    with open(os.path.join(drdir, "inside.sh"), "w") as f:
        f.write(INSIDE)
    shutil.copy(ENV["DR_GUEST_DIRTIER"], os.path.join(drdir, "dirtier.elf"))
    if mode == "restart-promoted":
        restart_promoted_setup(root, etc, drdir)
    elif mode == "failover-scope":
        failover_scope_setup(root, etc, drdir, b)
    elif mode == "scenarios":
        scenarios_setup(root, etc, drdir)
    res = os.path.join(tmp, "res")
    os.makedirs(res)

    cmd = ["systemd-nspawn", "-D", root, "--register=no", "--keep-unit", "--private-network",
           "-M", "drtest" + str(os.getpid()),
           f"--bind={res}:/run/dr-results", f"--bind-ro={drdir}:/run/dr"] + \
        (["--bind=/dev/kvm"] if mode != "failover-scope" else []) + \
        ["-b", "--", "systemd.wants=dr-test.service", "systemd.firstboot=off"]
    t0 = time.time()
    rc, boot = run_group(cmd, 240, grace=15)
    t_end = time.time()
    log(f"container ran {t_end - t0:.1f}s, exit {rc}")
    log(f"timing: --prefix=/usr build {t_built - t_start:.1f} s, Debian tree {t_tree - t_built:.1f} s, "
        f"install and setup {t0 - t_tree:.1f} s, container {t_end - t0:.1f} s, total {t_end - t_start:.1f} s")
    if rc is None:
        log(boot[-3000:])
        fail("the container did not finish within 240 s: " + read(res, "log")[-3000:])
    if "Failed to" in boot and not os.path.exists(os.path.join(res, "log")):
        log(boot[-3000:])
        fail("the container did not boot")
    inside = read(res, "log")
    if not read(res, "done"):
        log(boot[-2000:])
        log(inside[-4000:])
        fail("the in-container script did not finish")

    if mode == "restart-promoted":
        return restart_promoted_check(res)
    if mode == "failover-scope":
        return failover_scope_check(res)
    if mode == "scenarios":
        return scenarios_check(res)
    check("dirtyrep:" in read(res, "group"), f"sysusers.d did not create group dirtyrep: {read(res, 'group')!r}")
    check(read(res, "verify.rc").strip() == "0" and read(res, "verify.err") == "",
          f"systemd-analyze verify in the container: {read(res, 'verify.err')!r}")
    check(read(res, "start.rc").strip() == "0", f"systemctl start dirtyrep failed:\n{read(res, 'journal.txt')[-3000:]}")
    check(read(res, "active").strip() == "active", "dirtyrep not active after start")
    status = read(res, "status.txt")
    log("dirtyrepctl status in the container:\n" + status)
    check(read(res, "status.rc").strip() == "0" and "t: primary, protected" in status and
          re.search(r"Epoch: sealed [1-9]\d*, committed [1-9]", status), "status over the container's bus")
    cp = read(res, "checkpoint.txt")
    check(read(res, "checkpoint.rc").strip() == "0" and re.match(r"VM t: sealed epoch \d+", cp), f"checkpoint: {cp!r}")
    log(cp.strip())
    check(read(res, "nobody.rc").strip() == "5" and "permission denied" in read(res, "nobody.err"),
          f"nobody's checkpoint: {read(res, 'nobody.rc')} {read(res, 'nobody.err')}")
    # 0 protected, 10 unprotected (the pair may be between epochs of a resync): either way it was read.
    check(read(res, "nobody-status.rc").strip() in ("0", "10"),
          f"nobody cannot read the status: exit {read(res, 'nobody-status.rc').strip()}")
    check(read(res, "member.rc").strip() == "0" and re.match(r"VM t: sealed epoch \d+", read(res, "member.txt")),
          f"a member of group dirtyrep was refused: {read(res, 'member.rc')} {read(res, 'member.err')}")
    log("uid 65534 in group dirtyrep: " + read(res, "member.txt").strip())
    check(read(res, "reload.rc").strip() == "0", "systemctl reload dirtyrep failed")
    wd = read(res, "watchdog.txt").split()
    log(f"watchdog: main PID {wd[0] if wd else '?'} stopped, now {wd[1] if len(wd) > 1 else '?'}, "
        f"restarts {wd[2:] }")
    journal = read(res, "journal.txt")
    check(len(wd) == 4 and wd[0] != wd[1] and int(wd[3]) > int(wd[2]),
          f"the hung daemon was not restarted: {wd}\n{journal[-2000:]}")
    check(re.search(r"[Ww]atchdog timeout", journal), f"no watchdog timeout in the journal:\n{journal[-2000:]}")
    check(read(res, "status2.rc").strip() == "0" and "t: primary, protected" in read(res, "status2.txt"),
          "dirtyrepctl after the watchdog restart")
    susp = read(res, "suspended.txt")
    log("standby SIGSTOPped:\n" + susp)
    check("t: primary, suspended" in susp, f"the primary did not suspend when its standby stopped: {susp}")
    stopped = read(res, "stopped.txt")
    check(read(res, "stop.rc").strip() == "0" and "ActiveState=inactive" in stopped and "Result=success" in stopped,
          f"systemctl stop not clean: {stopped}")
    c = [int(x) for x in read(res, "console-stopped.txt").split()]
    log(f"console of the suspended VM over 3 s after systemctl stop: {c[0]} -> {c[1]} bytes")
    check(len(c) == 2 and c[0] > 0 and c[1] == c[0], f"the suspended VM ran after systemctl stop dirtyrep: {c}")
    check("stays SUSPENDED" in read(res, "vmm-journal.txt"),
          "the VMM's agent did not keep the VM suspended when dirtyrepd stopped")
    susp2 = read(res, "suspended2.txt")
    check("t: primary, suspended" in susp2, f"the restarted daemon did not come back suspended: {susp2}")
    c = [int(x) for x in read(res, "console-restarted.txt").split()]
    check(len(c) == 2 and c[1] == c[0], f"the suspended VM ran after dirtyrepd restarted: {c}")
    check(read(res, "stop2.rc").strip() == "0", "the second systemctl stop failed")
    log("PASS: systemctl start/reload/stop, dirtyrepctl over the container's bus, policy, watchdog restart, "
        "a suspended primary stays suspended across systemctl stop and start")
    return 0


def main():
    if len(sys.argv) != 2 or sys.argv[1] not in ("units", "nspawn", "restart-promoted", "failover-scope", "scenarios"):
        print(__doc__)
        return 2
    if os.geteuid() != 0:
        print("SKIP: needs root (mount namespaces, systemd-nspawn)")
        return 77
    if not shutil.which("systemd-analyze"):
        print("SKIP: systemd-analyze is not installed")
        return 77
    if sys.argv[1] in ("nspawn", "restart-promoted", "scenarios") and not os.path.exists("/dev/kvm"):
        print("SKIP: /dev/kvm missing")
        return 77
    if sys.argv[1] in ("nspawn", "restart-promoted", "failover-scope", "scenarios"):
        return test_nspawn(sys.argv[1])
    with tempfile.TemporaryDirectory(prefix="dr-systemd-") as tmp:
        test_units(tmp)
        return 0


if __name__ == "__main__":
    sys.exit(main())

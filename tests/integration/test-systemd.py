#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""dirtyrep under systemd, with real parts.

  test-systemd.py units    `meson install --destdir`: every file in its place;
                           `systemd-analyze verify --man=no` of the installed unit
                           prints nothing (any stderr output fails)
  test-systemd.py nspawn   the project built with --prefix=/usr and installed with
                           `meson install --destdir` into a Debian 12 tree (this host's
                           /usr with the install laid over it, a copy of /etc), booted
                           with `systemd-nspawn -b --register=no --keep-unit
                           --private-network`, /dev/kvm bound in; inside:
                           `systemctl start dirtyrep` with a primary and a standby VM
                           (loopback) and the reference VMM running a guest,
                           `dirtyrepctl status/checkpoint` over the container's system
                           bus, the bus policy (nobody refused, a member of group
                           dirtyrep allowed), `systemctl reload`, a hung
                           daemon (SIGSTOP) killed and restarted by the watchdog, and a
                           clean `systemctl stop`.

Exit 0 pass, 1 fail, 77 skip (says why: no systemd-nspawn, no /dev/kvm, not root).
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ENV = os.environ


def log(*a):
    print(*a, flush=True)


def fail(msg):
    log("FAIL:", msg)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def run(cmd, **kw):
    log("+", " ".join(cmd))
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def build_option(builddir, name):
    import json
    opts = json.loads(subprocess.check_output(["meson", "introspect", "--buildoptions", builddir]))
    return next(o["value"] for o in opts if o["name"] == name)


def install(builddir, dest):
    c = run(["meson", "install", "-C", builddir, "--destdir", dest, "--no-rebuild", "--quiet"])
    check(c.returncode == 0, f"meson install failed: {c.stdout} {c.stderr}")


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
    for suffix in ("/systemd/system/dirtyrep.service", "/sysusers.d/dirtyrep.conf", "/tmpfiles.d/dirtyrep.conf",
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
    script = (f"mount -t overlay overlay -o lowerdir={lower}:{prefix} {prefix} && "
              f"exec systemd-analyze verify --man=no {unit}")
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

systemctl stop dirtyrep; echo $? > $R/stop.rc
systemctl show -p ActiveState -p Result -p ExecMainStatus dirtyrep > $R/stopped.txt
systemctl stop dr-vmm dr-standby
echo done > $R/done
systemctl poweroff
"""

TEST_UNIT = """[Unit]
Description=dirtyrep systemd test
After=dbus.service systemd-sysusers.service systemd-tmpfiles-setup.service
[Service]
Type=oneshot
ExecStart=/bin/sh /run/dr/inside.sh
"""


def usr_build(builddir):
    """The project configured like a distribution package (--prefix=/usr), kept next to the test build."""
    b = os.path.join(builddir, "control-nspawn-usr")
    if not os.path.exists(os.path.join(b, "build.ninja")):
        c = run(["meson", "setup", b, ENV["DR_SRCDIR"], "--prefix=/usr", "-Dguests=false", "-Dwerror=true"])
        check(c.returncode == 0, f"meson setup --prefix=/usr failed: {c.stdout[-2000:]} {c.stderr[-2000:]}")
    c = run(["ninja", "-C", b])
    check(c.returncode == 0, f"building the --prefix=/usr tree failed: {c.stdout[-3000:]}")
    return b


def read(res, name):
    p = os.path.join(res, name)
    return open(p, errors="replace").read() if os.path.exists(p) else ""


def test_nspawn(tmp):
    if not shutil.which("systemd-nspawn"):
        print("SKIP: systemd-nspawn is not installed (package systemd-container)")
        return 77
    if not os.path.isfile("/usr/lib/systemd/systemd"):
        print("SKIP: no /usr/lib/systemd/systemd to boot in the container")
        return 77
    if os.path.islink("/usr") or not os.path.islink("/bin"):
        print("SKIP: the container tree is built from this host's merged /usr, which this host lacks")
        return 77
    b = usr_build(ENV["DR_BUILDDIR"])
    dest = os.path.join(tmp, "dest")
    install(b, dest)
    # Debian 12 is merged-/usr: /lib is /usr/lib (the unit dir from systemd.pc is /lib/systemd/system).
    if os.path.isdir(os.path.join(dest, "lib")):
        shutil.copytree(os.path.join(dest, "lib"), os.path.join(dest, "usr", "lib"), dirs_exist_ok=True)
        shutil.rmtree(os.path.join(dest, "lib"))
    check(os.path.exists(os.path.join(dest, "usr/lib/systemd/system/dirtyrep.service")), "unit not installed")

    root = os.path.join(tmp, "root")
    os.makedirs(root)
    for d in ("usr", "var", "run", "tmp", "proc", "sys", "dev", "root", "home", "srv", "opt", "mnt", "media"):
        os.makedirs(os.path.join(root, d))
    for l in ("bin", "sbin", "lib", "lib64"):
        os.symlink("usr/" + l, os.path.join(root, l))
    shutil.copytree("/etc", os.path.join(root, "etc"), symlinks=True)
    os.unlink(os.path.join(root, "etc/os-release"))
    shutil.copy("/usr/lib/os-release", os.path.join(root, "etc/os-release"))
    with open(os.path.join(root, "etc/machine-id"), "w"):
        pass
    if os.path.isdir(os.path.join(dest, "etc")):
        shutil.copytree(os.path.join(dest, "etc"), os.path.join(root, "etc"), dirs_exist_ok=True)
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
    res = os.path.join(tmp, "res")
    os.makedirs(res)

    cmd = ["systemd-nspawn", "-D", root, "--register=no", "--keep-unit", "--private-network",
           "-M", "drtest" + str(os.getpid()), f"--overlay-ro=/usr:{os.path.join(dest, 'usr')}:/usr",
           f"--bind={res}:/run/dr-results", f"--bind-ro={drdir}:/run/dr", "--bind=/dev/kvm",
           "-b", "--", "systemd.wants=dr-test.service", "systemd.firstboot=off"]
    t0 = time.time()
    log("+", " ".join(cmd))
    try:
        c = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        log((e.stdout or b"")[-3000:])
        fail("the container did not finish within 240 s: " + read(res, "log")[-3000:])
    boot = c.stdout + c.stderr
    log(f"container ran {time.time() - t0:.1f}s, exit {c.returncode}")
    if "Failed to" in boot and not os.path.exists(os.path.join(res, "log")):
        log(boot[-3000:])
        fail("the container did not boot")
    inside = read(res, "log")
    if not read(res, "done"):
        log(boot[-2000:])
        log(inside[-4000:])
        fail("the in-container script did not finish")

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
    check(read(res, "nobody-status.rc").strip() == "0", "nobody cannot read the status")
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
    stopped = read(res, "stopped.txt")
    check(read(res, "stop.rc").strip() == "0" and "ActiveState=inactive" in stopped and "Result=success" in stopped,
          f"systemctl stop not clean: {stopped}")
    log("PASS: systemctl start/reload/stop, dirtyrepctl over the container's bus, policy, watchdog restart")
    return 0


def main():
    if len(sys.argv) != 2 or sys.argv[1] not in ("units", "nspawn"):
        print(__doc__)
        return 2
    if os.geteuid() != 0:
        print("SKIP: needs root (mount namespaces, systemd-nspawn)")
        return 77
    if not shutil.which("systemd-analyze"):
        print("SKIP: systemd-analyze is not installed")
        return 77
    if sys.argv[1] == "nspawn" and not os.path.exists("/dev/kvm"):
        print("SKIP: /dev/kvm missing")
        return 77
    with tempfile.TemporaryDirectory(prefix="dr-systemd-") as tmp:
        if sys.argv[1] == "units":
            test_units(tmp)
            return 0
        return test_nspawn(tmp)


if __name__ == "__main__":
    sys.exit(main())

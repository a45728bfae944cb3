# SPDX-License-Identifier: GPL-2.0-or-later
"""The Debian 12 tree of the Pacemaker tests' containers, cached in the build directory.

nspawn.py's tree (test-systemd.py's: systemd, dbus, the runtime libraries of the installed executables) plus the cluster
stack, installed with apt-get inside the tree (`systemd-nspawn --pipe`, the host's network):
pacemaker, corosync, crmsh, resource-agents (ocf-tester), fence-agents, libxml2-utils. Made once per build directory
(BUILDDIR/pacemaker-nspawn-tree, remade when the recipe or the package list changes); each container boots a
fresh overlay of it. Reuses nspawn.py's helpers (debootstrap, mirror, runtime packages) unchanged.
"""
import fcntl
import os
import subprocess
import time

import nspawn as tsd

log, fail, check, run = tsd.log, tsd.fail, tsd.check, tsd.run
# test-systemd's limit (420 s) is too short on a loaded host: measured 383 s at load average 12 on 2 CPUs.
tsd.DEBOOTSTRAP_TIMEOUT = 1200

# libxml2-utils: ocf-tester checks the agent's meta-data against ra-api-1.dtd with xmllint.
CLUSTER_PACKAGES = ("pacemaker", "corosync", "crmsh", "resource-agents", "fence-agents", "libxml2-utils")
EXTRA_BASE = ("iproute2", "procps", "python3")
RECIPE = 1
APT_TIMEOUT = 600  # measured: about 25 s from the host's mirror


def cluster_tree(builddir, pkgs):
    """Returns (path, None, lock) or (None, why, None), like test-systemd's debootstrap_tree(); hold lock
    (shared) while the tree is in use."""
    cache = os.path.join(builddir, "pacemaker-nspawn-tree")
    partial, stamp = cache + ".partial", cache + ".stamp"
    base = sorted(set(pkgs) | set(EXTRA_BASE))
    base_want = f"recipe {RECIPE}: debootstrap --variant=minbase --merged-usr --include={','.join(base)} {tsd.SUITE}"
    want = f"{base_want}; apt-get install --no-install-recommends {' '.join(CLUSTER_PACKAGES)}"

    def current():
        have = open(stamp).read().splitlines() if os.path.exists(stamp) else []
        ok = have and have[0] == want and os.path.exists(os.path.join(cache, "usr/sbin/pacemakerd"))
        return (have[1] if len(have) > 1 else "?") if ok else None

    lock = open(cache + ".lock", "w")
    fcntl.flock(lock, fcntl.LOCK_SH)
    if not current():
        fcntl.flock(lock, fcntl.LOCK_UN)
        fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        if current():
            log(f"reusing the cached tree {cache} ({current()})")
            fcntl.flock(lock, fcntl.LOCK_SH)
            return cache, None, lock
        t0 = time.time()
        # test-systemd's make_tree() debootstraps into partial and renames it to cache with its stamp; a
        # tree whose package installation failed keeps that stamp, and the next run only retries apt-get.
        # Only the cluster packages changed (the same debootstrap): apt-get adds them to the tree.
        old = open(stamp).read().splitlines()[:1] if os.path.exists(stamp) else []
        if old and old[0].startswith(base_want + ";") and os.path.exists(os.path.join(cache, "usr/lib/os-release")):
            os.unlink(stamp)
            with open(stamp + ".base", "w") as f:
                f.write(base_want + "\n")
        have = open(stamp + ".base").read().splitlines()[:1] if os.path.exists(stamp + ".base") else []
        if have != [base_want] or not os.path.exists(os.path.join(cache, "usr/lib/os-release")):
            made, why = tsd.make_tree(cache, partial, stamp + ".base", base_want, base)
            if not made:
                lock.close()
                return None, why, None
        # No service starts while packages install (there is no booted systemd, but be explicit).
        rc_d = os.path.join(cache, "usr/sbin/policy-rc.d")
        with open(rc_d, "w") as f:
            f.write("#!/bin/sh\nexit 101\n")
        os.chmod(rc_d, 0o755)
        cmd = ["systemd-nspawn", "-q", "-D", cache, "--register=no", "--keep-unit", "--pipe", "--setenv=DEBIAN_FRONTEND=noninteractive",
               "sh", "-c", "apt-get update -q && apt-get install -y -q --no-install-recommends "
               + " ".join(CLUSTER_PACKAGES) + " && apt-get clean"]
        rc, out = tsd.run_group(cmd, APT_TIMEOUT)
        os.unlink(rc_d)
        if rc != 0:
            log(out[-4000:])
            lock.close()
            errs = [l for l in out.splitlines() if any(e in l for e in tsd.NETWORK_ERRORS + ("Could not resolve",
                                                                                            "Unable to fetch"))]
            if errs or rc is None:
                return None, f"apt-get could not download the cluster packages: {errs[0] if errs else 'timeout'}", None
            fail(f"apt-get install of the cluster packages failed (exit {rc})")
        size = subprocess.run(["du", "-sm", cache], capture_output=True, text=True).stdout.split()[0]
        note = f"made in {time.time() - t0:.0f} s, {size} MB, {time.strftime('%Y-%m-%d %H:%M')}"
        log(f"cluster tree {note}")
        with open(stamp, "w") as f:
            f.write(f"{want}\n{note}\n")
        os.unlink(stamp + ".base")
        fcntl.flock(lock, fcntl.LOCK_SH)
        return cache, None, lock
    except BaseException:
        lock.close()
        raise


if __name__ == "__main__":  # make the tree by hand: pmtree.py BUILDDIR
    import sys
    b = tsd.usr_build(sys.argv[1]) if len(sys.argv) > 1 else None
    print(cluster_tree(sys.argv[1], tsd.runtime_packages(b))[:2])

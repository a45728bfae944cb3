# SPDX-License-Identifier: GPL-2.0-or-later
"""Containers for the tests under real systemd (test-systemd.py, test-pacemaker.py through
pmtree.py): the project built with --prefix=/usr and installed with `meson install
--destdir`, a Debian 12 tree made by debootstrap (systemd, dbus and the packages of the
libraries the installed executables need) cached in the build directory, processes run
in their own process group and killed with whatever they left in other sessions.

A failure (fail()) is final: FAIL and exit 1.
"""
import fcntl
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request

from loopback import check, fail, log  # noqa: F401 (re-exported)

ENV = os.environ


def run(cmd, **kw):
    log("+", " ".join(cmd))
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def build_option(builddir, name):
    opts = json.loads(subprocess.check_output(["meson", "introspect", "--buildoptions", builddir]))
    return next(o["value"] for o in opts if o["name"] == name)


def install(builddir, dest):
    c = run(["meson", "install", "-C", builddir, "--destdir", dest, "--no-rebuild", "--quiet"])
    check(c.returncode == 0, f"meson install failed: {c.stdout} {c.stderr}")


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


# The container tree: Debian 12 made by debootstrap, cached in the build directory.
SUITE = "bookworm"
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus")
# Bump when the way the cached tree is made changes (the package list is compared by itself).
TREE_RECIPE = 1
# Measured: 38-40 s from deb.debian.org into an empty cache (a 203 MB tree). meson's timeout (720 s) covers this
# limit plus a fresh --prefix=/usr build and the boot, so a stalled download ends in a skip, not a timeout.
DEBOOTSTRAP_TIMEOUT = 420
# debootstrap's messages when the archive cannot be reached or a download fails: a skip, not a failure.
NETWORK_ERRORS = ("Failed getting release file", "Couldn't download", "Temporary failure in name resolution",
                  "unable to resolve host", "Network is unreachable", "Connection refused", "Connection timed out",
                  "Name or service not known", "No route to host")


def debian_mirror():
    """The host's Debian 12 archive (the first enabled 'deb' source for the suite), else deb.debian.org."""
    sources = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")) + \
        sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))
    for path in sources:
        try:
            text = open(path).read()
        except OSError:
            continue
        if path.endswith(".sources"):  # deb822 stanzas
            for stanza in re.split(r"\n[ \t]*\n", text):
                fields, key = {}, None
                for line in stanza.splitlines():
                    if not line.strip() or line.lstrip().startswith("#"):
                        continue
                    if line[0] in " \t" and key:
                        fields[key] += " " + line.strip()
                        continue
                    key, _, value = line.partition(":")
                    key = key.strip().lower()
                    fields[key] = value.strip()
                if (fields.get("enabled", "yes").lower() != "no" and "deb" in fields.get("types", "").split() and
                        SUITE in fields.get("suites", "").split() and fields.get("uris")):
                    return fields["uris"].split()[0].rstrip("/"), path
        else:
            for line in text.splitlines():
                m = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
                if m and m.group(2) == SUITE:
                    return m.group(1).rstrip("/"), path
    return "http://deb.debian.org/debian", "default"


def runtime_packages(b):
    """The Debian packages holding the shared libraries of the installed executables (ldd, dpkg -S)."""
    targets = json.loads(subprocess.check_output(["meson", "introspect", "--targets", b]))
    exes = [f for t in targets if t["type"] == "executable" and t.get("installed") for f in t["filename"]]
    check(exes, "no installed executables in the --prefix=/usr build")
    libs = set()
    for exe in exes:
        out = subprocess.run(["ldd", exe], capture_output=True, text=True).stdout
        check("not found" not in out, f"ldd {exe}: {out}")
        libs |= {m.group(1) for m in re.finditer(r"(/\S+) \(0x", out)}

    def variants(p):  # dpkg knows a library by one name: /lib or /usr/lib, the symlink or its target
        out = set()
        for q in (p, os.path.realpath(p)):
            out |= {q, q[4:] if q.startswith("/usr/") else "/usr" + q}
        return out

    cands = sorted(set().union(*(variants(lib) for lib in libs)))
    owners = {}
    for line in subprocess.run(["dpkg-query", "-S"] + cands, capture_output=True, text=True).stdout.splitlines():
        if line.startswith("diversion"):
            continue
        pkgs, _, path = line.partition(": ")
        owners[path] = [p.split(":")[0] for p in pkgs.split(", ")]
    pkgs = set(BASE_PACKAGES)
    for lib in sorted(libs):
        hit = next((owners[v] for v in sorted(variants(lib)) if v in owners), None)
        check(hit, f"no Debian package owns {lib} (dpkg -S); the container cannot provide it")
        pkgs |= set(hit)
    log(f"runtime libraries of {', '.join(os.path.basename(e) for e in exes)}: {', '.join(sorted(libs))}")
    return sorted(pkgs)


def umount_under(path):
    """Detaches every mount at or below path (deepest first)."""
    path = os.path.realpath(path)
    mps = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if mp == path or mp.startswith(path + "/"):
                mps.append(mp)
    for mp in sorted(mps, key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True)


def remove_tree(path):
    if os.path.lexists(path):
        umount_under(path)
        shutil.rmtree(path, ignore_errors=True)


def children(pid):
    kids = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{d}/stat").read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(d))
    return kids


def container_init(pid):
    """The PID (in our namespace) of the init of the container that systemd-nspawn pid runs, or None while
    there is none yet. Not simply nspawn's child: nspawn first forks an "outer child" (our PID namespace, a new
    mount namespace) that forks the container's init into a new PID namespace and exits, 5-20 ms measured; init
    is then reparented to nspawn (a subreaper). Init is the child that is PID 1 of its own namespace (NSpid)."""
    for kid in children(pid):
        try:
            status = open(f"/proc/{kid}/status").read()
        except OSError:
            continue
        nspid = next((l.split()[1:] for l in status.splitlines() if l.startswith("NSpid:")), [])
        if len(nspid) > 1 and nspid[-1] == "1":
            return kid
    return None


def kill_group(p):
    """SIGKILL to p's process group and to p's children in other sessions: a container's init (the child of
    systemd-nspawn) outlives a killed nspawn, and SIGKILL to it ends everything in its PID namespace."""
    for pid in children(p.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def run_group(cmd, timeout, grace=0):
    """Runs cmd in its own process group: returns (exit code or None on timeout, output).
    On a timeout (after SIGTERM and grace seconds) or on any exception the whole group is killed."""
    log("+", " ".join(cmd))
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, errors="replace", start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
        return p.returncode, out
    except subprocess.TimeoutExpired:
        if grace:
            p.terminate()
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        kill_group(p)
        try:
            out, _ = p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            out = ""
        return None, out or ""
    except BaseException:
        kill_group(p)
        raise


def debootstrap_tree(builddir, pkgs):
    """The Debian 12 tree, made once per build directory. Returns (path, None, lock) or (None, why it cannot be
    made, None); the caller holds the shared lock while it uses the tree, so no other run remakes it meanwhile."""
    cache = os.path.join(builddir, "control-nspawn-debootstrap")
    partial, stamp = cache + ".partial", cache + ".stamp"
    want = f"recipe {TREE_RECIPE}: debootstrap --variant=minbase --merged-usr --include={','.join(pkgs)} {SUITE}"

    def current():
        have = open(stamp).read().splitlines() if os.path.exists(stamp) else []
        if have and have[0] == want and os.path.exists(os.path.join(cache, "usr/lib/os-release")):
            return have[1] if len(have) > 1 else "?"
        return None

    lock = open(cache + ".lock", "w")
    fcntl.flock(lock, fcntl.LOCK_SH)
    if not current():
        fcntl.flock(lock, fcntl.LOCK_UN)
        fcntl.flock(lock, fcntl.LOCK_EX)  # one maker, and nobody using the old tree
    try:
        if current():
            log(f"reusing the cached tree {cache} ({current()})")
            fcntl.flock(lock, fcntl.LOCK_SH)
            return cache, None, lock
        made, why = make_tree(cache, partial, stamp, want, pkgs)
        if made:
            fcntl.flock(lock, fcntl.LOCK_SH)
            return cache, None, lock
        lock.close()
        return None, why, None
    except BaseException:
        lock.close()
        raise


def make_tree(cache, partial, stamp, want, pkgs):
    """debootstrap into cache.partial, renamed to cache when it succeeded. Returns (True, None) or (False, why):
    an unreachable archive or a failed download is a skip; any other debootstrap failure fails the test."""
    if os.path.exists(stamp):
        os.unlink(stamp)
    remove_tree(cache)
    remove_tree(partial)

    mirror, origin = debian_mirror()
    log(f"Debian archive: {mirror} (from {origin})")
    if mirror.startswith(("http://", "https://")):
        release = f"{mirror}/dists/{SUITE}/Release"
        try:
            urllib.request.urlopen(release, timeout=30).read(1)
        except Exception as e:
            return False, f"the Debian archive is unreachable ({release}: {e})"
    cmd = ["debootstrap", "--variant=minbase", "--merged-usr", "--include=" + ",".join(pkgs), SUITE, partial,
           mirror]
    t0 = time.time()
    try:
        rc, out = run_group(cmd, DEBOOTSTRAP_TIMEOUT)
        took = time.time() - t0
        if rc != 0:
            dlog = read(os.path.join(partial, "debootstrap"), "debootstrap.log")
            log(out[-3000:])
            log(dlog[-3000:])
            if rc is None:
                return False, f"debootstrap did not finish within {DEBOOTSTRAP_TIMEOUT} s from {mirror}"
            errors = [l for l in (out + dlog).splitlines() if any(e in l for e in NETWORK_ERRORS)]
            if errors:
                return False, f"debootstrap could not download from {mirror}: {errors[0].strip()}"
            last = [l for l in (out + dlog).splitlines() if l.startswith("E:")]
            fail(f"debootstrap failed (exit {rc}) after {took:.0f} s: {last[-1] if last else 'see above'}")
        for deb in glob.glob(os.path.join(partial, "var/cache/apt/archives/*.deb")):
            os.unlink(deb)
        umount_under(partial)
        os.rename(partial, cache)
    finally:
        remove_tree(partial)  # whatever a failed or interrupted debootstrap left
    check(os.path.exists(os.path.join(cache, "usr/lib/os-release")), "debootstrap made no tree")
    size = subprocess.run(["du", "-sm", cache], capture_output=True, text=True).stdout.split()[0]
    note = f"made by debootstrap in {took:.0f} s from {mirror}, {size} MB, {time.strftime('%Y-%m-%d %H:%M')}"
    log(f"debootstrap took {took:.1f} s; cached in {cache} ({size} MB)")
    with open(stamp, "w") as f:
        f.write(f"{want}\n{note}\n")
    return True, None

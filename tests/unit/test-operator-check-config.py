#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""operator-check-config: `dirtyrepd --check-config` on what an operator writes.

1. Every example configuration in the man pages (docs/man/*.[158], the
   .nf/.fi blocks that hold a [Daemon] or [VM] section) is extracted and
   checked as the unit would run it (--sandbox=unit). Only what is
   host-specific is replaced: SecretFile= (a real secret file of the test)
   and Vmm= (the dirtyrep-vmm just built).
2. Each mistake of issue 19 is caught, with a message that names it: a
   standby with FailoverPolicy=auto and no Peer=, a missing or unreadable
   secret file, VmmArgs= that set what activation passes (abbreviations
   included), VmmArgs= the VMM itself rejects (its --check), paths the
   unit's sandbox makes read-only or private, a misspelt key.
3. systemd-style values are accepted (booleans, time spans).
No KVM is needed: nothing is started but `dirtyrep-vmm --check`.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

ENV = os.environ
FAILED = []


def log(*a):
    print(*a, flush=True)


def check(cond, msg):
    if not cond:
        log("FAIL:", msg)
        FAILED.append(msg)
    return cond


def troff_text(line):
    return (line.replace("\\-", "-").replace("\\(aq", "'").replace("\\e", "\\").replace("\\&", "")
            .replace('\\(dq', '"'))


def man_examples(path):
    """[(host files)] from a man page: each [VM] block with the [Daemon] block before it, if any,
    and the VM name from the vm.d/NAME.conf the text names before the block."""
    lines = open(path).read().splitlines()
    hosts, pending_daemon, name, block, inside = [], None, "vm", [], False
    for line in lines:
        if line.startswith(".nf"):
            inside, block = True, []
            continue
        if line.startswith(".fi") and inside:
            inside = False
            text = "\n".join(troff_text(l) for l in block) + "\n"
            if re.search(r"^\[Daemon\]", text, re.M):
                pending_daemon = text
            elif re.search(r"^\[VM\]", text, re.M):
                hosts.append({"daemon": pending_daemon, "vm": text, "name": name})
                pending_daemon = None
            continue
        if inside:
            block.append(line)
        else:
            m = re.search(r"vm\.d/([A-Za-z0-9_.-]+)\.conf", troff_text(line))
            if m and m.group(1) != "NAME":
                name = m.group(1)
    return hosts


def write_host(tmp, tag, daemon_text, vm_name, vm_text):
    d = os.path.join(tmp, tag)
    os.makedirs(os.path.join(d, "vm.d"), exist_ok=True)
    main = os.path.join(d, "dirtyrep.conf")
    with open(main, "w") as f:
        f.write(daemon_text or "")
    with open(os.path.join(d, "vm.d", vm_name + ".conf"), "w") as f:
        f.write(vm_text)
    return main, os.path.join(d, "vm.d")


def check_config(main, vm_dir, *extra, sandbox="unit"):
    c = subprocess.run([ENV["DR_DIRTYREPD"], "-c", main, "-d", vm_dir, f"--sandbox={sandbox}", *extra,
                        "--check-config"], capture_output=True, text=True, timeout=60)
    return c.returncode, c.stdout, c.stderr


def main(tmp):
    for k in ("DR_DIRTYREPD", "DR_VMM", "DR_SRCDIR"):
        if k not in ENV:
            log(f"{k} not set")
            return 1
    secret = os.path.join(tmp, "web.key")
    with open(os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(b"operator-check-config-secret-0123456789\n")
    vmm = ENV["DR_VMM"]

    def localize(text):
        text = re.sub(r"^SecretFile=.*$", f"SecretFile={secret}", text, flags=re.M)
        text = re.sub(r"^Vmm=.*$", "", text, flags=re.M)
        return text.replace("[VM]\n", f"[VM]\nVmm={vmm}\n", 1)

    # --- 1. the man pages' examples ---
    mandir = os.path.join(ENV["DR_SRCDIR"], "docs", "man")
    n = 0
    for page in sorted(os.listdir(mandir)):
        for i, h in enumerate(man_examples(os.path.join(mandir, page))):
            main_file, vm_dir = write_host(tmp, f"{page}-{i}", h["daemon"], h["name"], localize(h["vm"]))
            rc, out, err = check_config(main_file, vm_dir)
            ok = check(rc == 0 and "Configuration OK: 1 VM(s), paths fit dirtyrep.service's sandbox" in out,
                       f"{page} example {i} ({h['name']}) fails --check-config: exit {rc}\n{err}{out}")
            if ok:
                log(f"{page}: example {i} ({h['name']}): {out.splitlines()[1].strip()}")
            n += 1
    check(n >= 2, f"only {n} example configurations found in the man pages")

    # --- 2. the mistakes, each caught ---
    standby = (f"[VM]\nRole=standby\nListen=192.0.2.2:7000\nPeer=192.0.2.1:7000\nSecretFile={secret}\n"
               f"Vmm={vmm}\nControlSocket=/run/dirtyrep/web.sock\n")
    mistakes = [
        ("auto failover without Peer=", standby.replace("Peer=192.0.2.1:7000\n", "") + "FailoverPolicy=auto\n",
         "web.conf:7: FailoverPolicy=auto requires Peer=ADDRESS:PORT"),
        ("missing secret file", standby.replace(secret, os.path.join(tmp, "nope.key")),
         "SecretFile=: " + os.path.join(tmp, "nope.key") + ": cannot open secret file: No such file or directory"),
        ("secret readable by others", standby.replace(secret, os.path.join(tmp, "open.key")),
         "secret file has mode 0644, must not be accessible by group or others (chmod 0600)"),
        ("secret file is a directory", standby.replace(secret, tmp), "secret file is a directory"),
        ("--mem abbreviates --memory", standby + "VmmArgs=--mem 2G\n",
         "VmmArgs=: --mem is read by the VMM as --memory, which must not be set here: the RAM size is the replica's"),
        ("-m2G", standby + "VmmArgs=-m2G\n", "VmmArgs=: -m2G (--memory) must not be set here"),
        ("--control", standby + "VmmArgs=--control=/run/dirtyrep/x.sock\n",
         "activation passes --control with ControlSocket="),
        ("--cpus", standby + "VmmArgs=--cpus 2\n", "the vCPU count is the replica's"),
        ("VmmArgs the VMM rejects", standby + "VmmArgs=--tracking fast\n",
         "the VMM rejects the arguments failover would start it with: "),
        ("an unknown VMM option", standby + "VmmArgs=--frobnicate\n", "unrecognized option '--frobnicate'"),
        ("console in a read-only path", standby + "VmmArgs=--console /var/log/web-console.log\n",
         "/var/log/web-console.log is read-only for dirtyrep.service (ProtectSystem=strict; writable: "
         "/run/dirtyrep, /var/lib/dirtyrep)"),
        ("console in the private /tmp", standby + "VmmArgs=--console=/tmp/web.log\n",
         "/tmp/web.log is in the service's private /tmp (PrivateTmp=yes)"),
        ("control socket outside the runtime directory", standby.replace("/run/dirtyrep/web.sock", "/run/web.sock"),
         "ControlSocket= directory /run is read-only for dirtyrep.service"),
        ("misspelt key", standby + "FailoverPolcy=auto\n",
         "unknown key FailoverPolcy= in section [VM], did you mean FailoverPolicy=?"),
        ("misspelt key, case", standby + "epochms=20\n", "did you mean EpochMs=?"),
        ("a bad time span", standby + "EpochMs=20 parsecs\n", "EpochMs=20 parsecs: not a time span"),
        ("a Vmm= that does not exist", standby.replace(f"Vmm={vmm}", "Vmm=/nonexistent/dirtyrep-vmm"),
         "Vmm=/nonexistent/dirtyrep-vmm cannot be run: No such file or directory"),
    ]
    open_key = os.path.join(tmp, "open.key")
    with open(open_key, "wb") as f:
        f.write(b"operator-check-config-secret-0123456789\n")
    os.chmod(open_key, 0o644)
    for i, (what, text, want) in enumerate(mistakes):
        main_file, vm_dir = write_host(tmp, f"mistake-{i}", "", "web", text)
        rc, out, err = check_config(main_file, vm_dir)
        if check(rc == 1 and want in err, f"{what}: exit {rc}, expected 1 and {want!r} in:\n{err}{out}"):
            line = next(l for l in err.splitlines() if want in l)
            log(f"caught: {what}: {line}")
    # The daemon's own paths, in [Daemon].
    main_file, vm_dir = write_host(tmp, "daemon-paths", "[Daemon]\nStateDirectory=/srv/dirtyrep\n", "web", standby)
    rc, out, err = check_config(main_file, vm_dir)
    check(rc == 1 and "StateDirectory= /srv/dirtyrep is read-only for dirtyrep.service" in err,
          f"StateDirectory= outside the sandbox: exit {rc}\n{err}")
    # Everything wrong at once: every error reported, not only the first.
    main_file, vm_dir = write_host(tmp, "all", "", "web",
                                   standby.replace(secret, os.path.join(tmp, "nope.key")) +
                                   "VmmArgs=--console /var/log/x --frobnicate\n")
    rc, out, err = check_config(main_file, vm_dir)
    for want in ("cannot open secret file", "is read-only for dirtyrep.service", "unrecognized option"):
        check(want in err, f"all at once: {want!r} missing:\n{err}")
    # --sandbox=none: the same file without the sandbox checks (dirtyrepd run by hand).
    main_file, vm_dir = write_host(tmp, "nosandbox", "", "web",
                                   standby + "VmmArgs=--console /var/log/web-console.log\n")
    rc, out, err = check_config(main_file, vm_dir, sandbox="none")
    check(rc == 0 and "Configuration OK: 1 VM(s)\n" in out, f"--sandbox=none: exit {rc}\n{err}{out}")

    # --- 3. systemd-style values ---
    main_file, vm_dir = write_host(tmp, "values", "[Daemon]\nHeartbeatIntervalMs=50ms\n", "web",
                                   standby + "PreCopy=off\nOutputCommit=true\nConsoleCommit=1\nEpochMs=20ms\n"
                                   "SplitBrainTimeoutMs=2s\nTLS=no\n")
    rc, out, err = check_config(main_file, vm_dir)
    check(rc == 0, f"systemd-style values refused: exit {rc}\n{err}")

    # The VMM's --check itself: accepts what activation passes, refuses garbage, opens nothing.
    c = subprocess.run([vmm, "--check", "--name", "web", "--control", "/run/dirtyrep/web.sock", "--restore",
                        "/nonexistent", "--ram-fd", "3", "--ready-fd", "5"], capture_output=True, text=True)
    check(c.returncode == 0, f"dirtyrep-vmm --check with activation's arguments: {c.returncode} {c.stderr}")
    c = subprocess.run([vmm, "--check", "--restore", "/x", "--ram-fd", "3", "--memory", "3"],
                       capture_output=True, text=True)
    check(c.returncode != 0 and "Invalid --memory" in c.stderr, f"--check accepted --memory 3: {c.stderr}")

    # dirtyrepd's table of the VMM's options (VmmArgs= conflicts, abbreviations) against the VMM's own
    # --help: an option the table lacks would make getopt's abbreviation rule resolve differently.
    helptext = subprocess.run([vmm, "--help"], capture_output=True, text=True).stdout
    vmm_opts = set(re.findall(r"^\s+(?:-\w )?--([a-z][a-z-]*)", helptext, re.M))
    src = open(os.path.join(ENV["DR_SRCDIR"], "daemon", "config-check.c")).read()
    table = src[src.index("vmm_options[] = {"):src.index("};", src.index("vmm_options[] = {"))]
    daemon_opts = set(re.findall(r'\{"([a-z-]+)", ', table))
    check(vmm_opts and vmm_opts == daemon_opts,
          f"daemon/config-check.c vmm_options differ from dirtyrep-vmm --help: only in the VMM {vmm_opts - daemon_opts}, "
          f"only in the table {daemon_opts - vmm_opts}")

    if FAILED:
        log(f"{len(FAILED)} check(s) failed")
        return 1
    log("PASS: man page examples pass, every mistake caught")
    return 0


if __name__ == "__main__":
    TMP = tempfile.mkdtemp(prefix="dr-check-")
    try:
        rc = main(TMP)
    finally:
        shutil.rmtree(TMP, ignore_errors=True)
    sys.exit(rc)

#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Runs one test under the ASan+UBSan build and fails it when any process it
started reported a sanitizer error, whatever the test itself concluded.

  sanitize-wrap.py CMD [ARGS...]      (scripts/test: meson test --wrapper)

A test starts daemons (dirtyrepd, dirtyrep-vmm, dirtyrepctl, helpers) and
usually looks only at their behaviour: a daemon that reports a leak when it
exits on SIGTERM, or a UBSan error in a path the test does not check, would
go unnoticed in its stderr file. So every sanitized process of the test
writes its reports to files of its own (ASAN_OPTIONS / UBSAN_OPTIONS
log_path, one file per PID, made only when there is something to report)
in a directory of this run; after the test this script reads them, prints
them, and turns the test's result into a failure if any holds an error.

Only a report made entirely of known-benign warnings (BENIGN below, each
with its continuation lines) is printed and passes; any other report fails
the test, whatever it says: an unknown line may be an error this script does
not know (e.g. "LeakSanitizer has encountered a fatal error": the leak check
never ran).

Reports are read only when every process of the test has ended: the wrapper
is a child subreaper (PR_SET_CHILD_SUBREAPER), so the test's daemons that
outlive it, in any process group, become its children, and it waits for them
for DR_SANITIZE_GRACE seconds (default 30). One still running then is sent
SIGTERM (it writes its leak report on exit), then SIGKILL after 10 s, and
fails the test: its reports could not be trusted to be complete.

The directory is DR_SANITIZE_LOGDIR/<test>-XXXX (default: the system's temp
directory), mode 1777 so a process running as another user (the tests use
setpriv to nobody) can write there too; it is removed when empty.
Exit: the test's own status, or 1 when a sanitizer report other than a
benign warning was found, or a process of the test outlived it.
"""
import ctypes
import errno
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

# Warnings known to be harmless, each a regular expression for its first line followed by ones
# for the lines that may continue it. A report passes only if every one of its lines is part of
# one of these; anything else is an error.
BENIGN = [
    # A thread switching stacks (swapcontext, or a coroutine library): ASan cannot follow it.
    [r"==\d+==WARNING: ASan doesn't fully support makecontext/swapcontext functions and may produce false "
     r"positives in some cases!"],
    [r"==\d+==WARNING: ASan is ignoring requested __asan_handle_no_return: stack type: \w+ top: 0x[0-9a-f]+; "
     r"bottom 0x[0-9a-f]+; size: 0x[0-9a-f]+ \(-?\d+\)",
     r"False positive error reports may follow",
     r"For details see https://github\.com/google/sanitizers/issues/189"],
]
BENIGN_RE = [[re.compile(p) for p in w] for w in BENIGN]
MAX_LINES = 150
PR_SET_CHILD_SUBREAPER = 36


def add_option(env, var, key, value):
    """VAR's options with key=value replacing any earlier key (the sanitizers take the last one, but be plain)."""
    opts = [o for o in env.get(var, "").replace(",", ":").split(":") if o and not o.startswith(key + "=")]
    env[var] = ":".join(opts + [f"{key}={value}"])


def benign(text):
    """True when every non-empty line of a report belongs to a known-benign warning."""
    lines = [l.rstrip() for l in text.splitlines() if l.strip()]
    i = 0
    while i < len(lines):
        for first, *cont in BENIGN_RE:
            if first.fullmatch(lines[i]):
                i += 1
                while i < len(lines) and any(c.fullmatch(lines[i]) for c in cont):
                    i += 1
                break
        else:
            return False
    return True


def scan(logdir):
    """(errors, notes): lists of (path, text) for every report file in logdir; notes are the
    reports made only of known-benign warnings."""
    errors, notes = [], []
    for name in sorted(os.listdir(logdir)):
        path = os.path.join(logdir, name)
        with open(path, errors="replace") as f:
            text = f.read()
        if not text.strip():
            continue
        (notes if benign(text) else errors).append((path, text))
    return errors, notes


def descendants():
    """PIDs and names of the processes whose parent chain leads to this one."""
    me = os.getpid()
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = f.read()
            except OSError:
                continue
            # pid (comm) state ppid ...: comm may hold spaces and parentheses.
            comm = st[st.index("(") + 1:st.rindex(")")]
            parent[int(d)] = (int(st[st.rindex(")") + 2:].split()[1]), comm)
    out = {}
    for pid in parent:
        p, seen = pid, 0
        while p in parent and p != me and seen < 4096:
            p, seen = parent[p][0], seen + 1
        if p == me and pid != me:
            out[pid] = parent[pid][1]
    return out


def reap_orphans(child_pid, stop):
    """While the test runs: reaps the orphans reparented to us as soon as they exit, so a test that
    polls for a process of its own to be gone (kill(pid, 0)) does not see a zombie of ours."""
    me = str(os.getpid())
    while not stop.wait(0.05):
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) == child_pid:
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = f.read()
            except OSError:
                continue
            fields = st[st.rindex(")") + 2:].split()
            if fields[0] == "Z" and fields[1] == me:
                try:
                    os.waitpid(int(d), os.WNOHANG)
                except ChildProcessError:
                    pass


def reap():
    """Reaps every exited child (orphans of the test reparented to us); True when none is left."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            return False


def wait_all(grace):
    """Waits for every remaining process of the test; returns the ones that had to be killed."""
    end = time.monotonic() + grace
    while not reap() and time.monotonic() < end:
        time.sleep(0.05)
    left = descendants()
    if not left:
        reap()
        return {}
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        for pid in descendants():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + wait
        while not reap() and time.monotonic() < end:
            time.sleep(0.05)
        if not descendants():
            break
    return left


def show(kind, reports):
    for path, text in reports:
        lines = text.splitlines()
        print(f"=== sanitizer {kind}: {os.path.basename(path)} ({len(lines)} lines) ===", flush=True)
        print("\n".join(lines[:MAX_LINES]), flush=True)
        if len(lines) > MAX_LINES:
            print(f"... {len(lines) - MAX_LINES} more lines in {path}", flush=True)


def main(argv):
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    base = os.environ.get("DR_SANITIZE_LOGDIR") or tempfile.gettempdir()
    os.makedirs(base, exist_ok=True)
    logdir = tempfile.mkdtemp(prefix=os.path.basename(argv[0]) + "-", dir=base)
    os.chmod(logdir, 0o1777)
    env = dict(os.environ)
    for var, tag in (("ASAN_OPTIONS", "asan"), ("UBSAN_OPTIONS", "ubsan")):
        add_option(env, var, "log_path", os.path.join(logdir, tag))
        add_option(env, var, "log_exe_name", "1")
    add_option(env, "UBSAN_OPTIONS", "halt_on_error", "1")

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"sanitize-wrap: prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno() or errno.EINVAL)}",
              file=sys.stderr)
        return 1
    child = subprocess.Popen(argv, env=env)
    # meson's timeout signals the whole process group; pass a signal sent to us alone on too,
    # then wait for the test, so its daemons' reports are still read.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: child.send_signal(s))
    stop = threading.Event()
    reaper = threading.Thread(target=reap_orphans, args=(child.pid, stop), daemon=True)
    reaper.start()
    rc = child.wait()
    stop.set()
    reaper.join()
    # Then for every process it left behind: a daemon's leak report is written when it exits.
    left = wait_all(float(os.environ.get("DR_SANITIZE_GRACE", "30")))

    errors, notes = scan(logdir)
    show("output (benign warning)", notes)
    show("ERROR", errors)
    if not errors and not notes:
        os.rmdir(logdir)
    if left:
        print("FAIL: process(es) of this test still ran after it exited and the grace period: "
              + ", ".join(f"{pid} ({comm})" for pid, comm in sorted(left.items()))
              + "; they were killed, so their sanitizer reports may be missing. Stop every process the test "
              "starts before it exits.", flush=True)
    if errors:
        print(f"FAIL: {len(errors)} sanitizer report(s) from processes of this test "
              f"(the test itself exited {rc}); reports kept in {logdir}", flush=True)
    if errors or left:
        return 1
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

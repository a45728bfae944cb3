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

The directory is DR_SANITIZE_LOGDIR/<test>-XXXX (default: the system's temp
directory), mode 1777 so a process running as another user (the tests use
setpriv to nobody) can write there too; it is removed when empty.
Exit: the test's own status, or 1 when a sanitizer error was found.
"""
import os
import re
import signal
import subprocess
import sys
import tempfile

# A line that makes a report an error (everything else, e.g. a WARNING, is printed only).
ERROR_RE = re.compile(r"^==\d+==ERROR: (Address|Leak)Sanitizer|: runtime error: |^SUMMARY: (Address|Leak|Undefined)",
                      re.M)
MAX_LINES = 150


def add_option(env, var, key, value):
    """VAR's options with key=value replacing any earlier key (the sanitizers take the last one, but be plain)."""
    opts = [o for o in env.get(var, "").replace(",", ":").split(":") if o and not o.startswith(key + "=")]
    env[var] = ":".join(opts + [f"{key}={value}"])


def scan(logdir):
    """(errors, notes): lists of (path, text) for every report file in logdir."""
    errors, notes = [], []
    for name in sorted(os.listdir(logdir)):
        path = os.path.join(logdir, name)
        with open(path, errors="replace") as f:
            text = f.read()
        if not text.strip():
            continue
        (errors if ERROR_RE.search(text) else notes).append((path, text))
    return errors, notes


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

    child = subprocess.Popen(argv, env=env)
    # meson's timeout signals the whole process group; pass a signal sent to us alone on too,
    # then wait for the test, so its daemons' reports are still read.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: child.send_signal(s))
    rc = child.wait()

    errors, notes = scan(logdir)
    show("output (not an error)", notes)
    show("ERROR", errors)
    if not errors and not notes:
        os.rmdir(logdir)
    if errors:
        print(f"FAIL: {len(errors)} sanitizer report(s) from processes of this test "
              f"(the test itself exited {rc}); reports kept in {logdir}", flush=True)
        return 1
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

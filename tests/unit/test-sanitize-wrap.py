#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""tests/sanitize-wrap.py, the wrapper scripts/test runs every sanitized test
under, fails a test whose child process reported a sanitizer error even when
the test itself passed.

Always: fake report files written where the wrapper's ASAN_OPTIONS /
UBSAN_OPTIONS log_path point (errors fail the test, a warning only is
printed, nothing passes through the test's own status). In a sanitized build
(DR_SANITIZE_CANARY set) also for real: a "test" that starts
sanitize-canary in the background, ignores its status and exits 0 must fail
for a UBSan error and for a leak, and pass for a clean run.
"""
import os
import subprocess
import sys
import tempfile

SRC = os.environ["DR_SRCDIR"]
WRAP = os.path.join(SRC, "tests", "sanitize-wrap.py")
failed = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failed.append(what)


def wrap(tmp, script, *args):
    env = dict(os.environ, DR_SANITIZE_LOGDIR=tmp)
    c = subprocess.run([sys.executable, WRAP, "sh", "-c", script, "sh", *args], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    return c.returncode, c.stdout


# A fake report, written the way a sanitized process would: to <log_path>.<pid>.
FAKE = r'''p=$(printf %s "$UBSAN_OPTIONS" | tr : '\n' | sed -n 's/^log_path=//p')
printf '%s\n' "$1" > "$p.$$"
exit "$2"
'''
ASAN = "=================================================================\n==12==ERROR: AddressSanitizer: heap-buffer-overflow on address 0x6020\nSUMMARY: AddressSanitizer: heap-buffer-overflow x.c:3 in main"
LSAN = "==12==ERROR: LeakSanitizer: detected memory leaks\nDirect leak of 4242 byte(s) in 1 object(s)\nSUMMARY: AddressSanitizer: 4242 byte(s) leaked in 1 allocation(s)."
UBSAN = "daemon/main.c:12:5: runtime error: signed integer overflow: 2147483647 + 1 cannot be represented in type 'int'"
WARN = "==12==WARNING: ASan doesn't fully support makecontext/swapcontext functions"


def main():
    with tempfile.TemporaryDirectory(prefix="dr-sanwrap-") as tmp:
        for name, report in (("ASan", ASAN), ("LSan", LSAN), ("UBSan", UBSAN)):
            rc, out = wrap(tmp, FAKE, report, "0")
            check(rc == 1 and "sanitizer ERROR" in out, f"fake {name} report fails a test that exited 0 (rc {rc})")
        rc, out = wrap(tmp, FAKE, WARN, "0")
        check(rc == 0 and "not an error" in out, f"a sanitizer warning alone is printed, not a failure (rc {rc})")
        for code in (0, 1, 77):
            rc, _ = wrap(tmp, "exit $1", str(code))
            check(rc == code, f"no reports: the test's own status {code} passes through (rc {rc})")

        canary = os.environ.get("DR_SANITIZE_CANARY")
        if not canary:
            print("note: not a sanitized build, sanitize-canary not built: only the log scanning was checked")
        else:
            # A daemon-like child: started in the background, its status ignored, the test exits 0.
            daemon = '"$1" "$2" & wait; exit 0'
            for mode, want in (("ubsan", "runtime error"), ("leak", "LeakSanitizer: detected memory leaks")):
                rc, out = wrap(tmp, daemon, canary, mode)
                check(rc == 1 and want in out, f"real {mode} in a child whose status is ignored fails the test (rc {rc})")
                if rc != 1:
                    print(out)
                    if os.environ.get("DR_CC_ID") == "gcc":
                        print("note: gcc's libubsan is a runtime of its own next to libasan and ignores log_path "
                              "there; scripts/test builds the sanitized tree with clang for this reason")
            rc, out = wrap(tmp, daemon, canary, "clean")
            check(rc == 0, f"a clean child passes (rc {rc})")
            if rc != 0:
                print(out)
    if failed:
        print(f"{len(failed)} check(s) failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

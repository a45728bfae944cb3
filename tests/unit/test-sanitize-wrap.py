#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""tests/sanitize-wrap.py, the wrapper scripts/test runs every sanitized test
under, fails a test whose child process reported a sanitizer error even when
the test itself passed.

Always: fake report files written where the wrapper's ASAN_OPTIONS /
UBSAN_OPTIONS log_path point (errors fail the test, and so does any report
that is not a known-benign warning, e.g. LeakSanitizer's fatal error; a
benign warning only is printed; without reports the test's own status
passes through); a report written by a process of the test after the test
exited (in its own session) is still read; a process that outlives the
grace period is stopped and fails the test. In a sanitized build
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


def wrap(tmp, script, *args, env=None):
    env = dict(os.environ, DR_SANITIZE_LOGDIR=tmp, **(env or {}))
    c = subprocess.run([sys.executable, WRAP, "sh", "-c", script, "sh", *args], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60, cwd=tmp)
    return c.returncode, c.stdout


# A fake report, written the way a sanitized process would: to <log_path>.<pid>.
FAKE = r'''p=$(printf %s "$UBSAN_OPTIONS" | tr : '\n' | sed -n 's/^log_path=//p')
printf '%s\n' "$1" > "$p.$$"
exit "$2"
'''
ASAN = "=================================================================\n==12==ERROR: AddressSanitizer: heap-buffer-overflow on address 0x6020\nSUMMARY: AddressSanitizer: heap-buffer-overflow x.c:3 in main"
LSAN = "==12==ERROR: LeakSanitizer: detected memory leaks\nDirect leak of 4242 byte(s) in 1 object(s)\nSUMMARY: AddressSanitizer: 4242 byte(s) leaked in 1 allocation(s)."
UBSAN = "daemon/main.c:12:5: runtime error: signed integer overflow: 2147483647 + 1 cannot be represented in type 'int'"
WARN = ("==12==WARNING: ASan doesn't fully support makecontext/swapcontext functions and may produce false "
        "positives in some cases!")
WARN2 = ("==7==WARNING: ASan is ignoring requested __asan_handle_no_return: stack type: default top: 0x7ffd4a2c8000; "
         "bottom 0x7f3a1c0fe000; size: 0x0002d81ca000 (12482486272)\nFalse positive error reports may follow\n"
         "For details see https://github.com/google/sanitizers/issues/189")
# Reports that are no known-benign warning, none with an "ERROR:" line: each must fail.
UNKNOWN = [
    ("LSan fatal error (the leak check never ran)",
     "==1234==LeakSanitizer has encountered a fatal error.\n==1234==HINT: For debugging, try setting environment "
     "variable LSAN_OPTIONS=verbosity=1:log_threads=1\n==1234==HINT: LeakSanitizer does not work under ptrace "
     "(strace, gdb, etc)"),
    ("an unknown warning", "==12==WARNING: AddressSanitizer failed to allocate 0x10000 bytes"),
    ("a benign warning followed by something else", WARN + "\nsome other line"),
    ("a CHECK failure", "==9==AddressSanitizer CHECK failed: asan_thread.cpp:369 \"((ptr[0] == kCurrentStackFrameMagic)) != (0)\""),
]
# A daemon the test leaves behind: it reports only after the test has exited.
LATE = r'''p=$(printf %s "$UBSAN_OPTIONS" | tr : '\n' | sed -n 's/^log_path=//p')
setsid sh -c 'sleep 1.5; printf "%s\n" "$1" > "$2.$$"' sh "$1" "$p" </dev/null >/dev/null 2>&1 &
exit 0
'''
# A test that starts a daemon in its own session, stops it and waits, polling kill(pid, 0), until it
# is gone: the wrapper (its subreaper) must reap it meanwhile, or the test sees a zombie forever.
ORPHAN_GONE = r'''(setsid sh -c 'echo $$ > "$0"; exec sleep 60' "$PWD/orphan.pid" </dev/null >/dev/null 2>&1 &)
while [ ! -s "$PWD/orphan.pid" ]; do sleep 0.05; done
sleep 0.2; pid=$(cat "$PWD/orphan.pid"); rm -f "$PWD/orphan.pid"
kill "$pid"
n=0; while kill -0 "$pid" 2>/dev/null; do n=$((n + 1)); [ $n -gt 100 ] && exit 3; sleep 0.05; done
exit "$1"
'''
# One that does not stop by itself: it writes its (leak) report only on SIGTERM.
LINGER = r'''p=$(printf %s "$UBSAN_OPTIONS" | tr : '\n' | sed -n 's/^log_path=//p')
setsid sh -c 'trap "printf \"%s\n\" \"$1\" > \"$2.\$\$\"; exit 0" TERM; while :; do sleep 0.1; done' sh "$1" "$p" \
  </dev/null >/dev/null 2>&1 &
exit 0
'''


def main():
    with tempfile.TemporaryDirectory(prefix="dr-sanwrap-") as tmp:
        for name, report in (("ASan", ASAN), ("LSan", LSAN), ("UBSan", UBSAN)):
            rc, out = wrap(tmp, FAKE, report, "0")
            check(rc == 1 and "sanitizer ERROR" in out, f"fake {name} report fails a test that exited 0 (rc {rc})")
        for w in (WARN, WARN2, WARN + "\n" + WARN2):
            rc, out = wrap(tmp, FAKE, w, "0")
            check(rc == 0 and "benign warning" in out, f"a known-benign warning alone is printed, not a failure (rc {rc})")
        for what, report in UNKNOWN:
            rc, out = wrap(tmp, FAKE, report, "0")
            check(rc == 1 and "sanitizer ERROR" in out, f"{what}: fails a test that exited 0 (rc {rc})")
        rc, out = wrap(tmp, LATE, LSAN)
        check(rc == 1 and "LeakSanitizer: detected memory leaks" in out,
              f"a report written 1.5 s after the test exited, by a process in its own session, fails it (rc {rc})")
        rc, out = wrap(tmp, ORPHAN_GONE, "0")
        check(rc == 0, f"an orphan that exits while the test runs is reaped at once: the test sees it gone (rc {rc})")
        rc, out = wrap(tmp, LINGER, LSAN, env={"DR_SANITIZE_GRACE": "1"})
        check(rc == 1 and "still ran after it exited" in out and "LeakSanitizer: detected memory leaks" in out,
              f"a process outliving the grace period is stopped with SIGTERM, its report read, the test failed "
              f"(rc {rc})")
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

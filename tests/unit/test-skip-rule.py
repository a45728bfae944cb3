#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""tests/lib/skiprule.py, scripts/test's summary and skip rule, on crafted and on
real meson test logs.

1. Crafted testlog.json lines (the fields meson 1.0 writes: name, result,
   env, ...; no suite field): a skipped kvm-suite test and a skipped test
   marked DR_NEEDS fail the run on a machine that has KVM and root, and are
   named; the same skips pass where KVM or root is missing; a skip of an
   unmarked test passes; failures count; a bad or missing log is an error.
2. A real one: a throwaway meson project with a kvm-suite test, a DR_NEEDS
   test and an unmarked test that all exit 77, run by this machine's meson
   (so the rule is tested on the log format meson really writes).
3. This build's test metadata (meson-info/intro-tests.json): every test that
   needs KVM or root (the kvm suite, repl-*, commit-waits-for-ack,
   failover-*, faults-short, systemd-*, control-*, security-*) is marked, so none can skip unnoticed.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

SRC = os.environ["DR_SRCDIR"]
RULE = os.path.join(SRC, "tests", "lib", "skiprule.py")
failed = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failed.append(what)


def rule(paths, have=None, env=None):
    args = [sys.executable, RULE] + (["--have", ",".join(have)] if have is not None else []) + paths
    c = subprocess.run(args, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, **(env or {})))
    return c.returncode, c.stdout + c.stderr


def entry(name, result, needs=None):
    env = {"PATH": "/usr/bin", "MALLOC_PERTURB_": "42"}
    if needs is not None:
        env["DR_NEEDS"] = needs
    return {"name": name, "stdout": "SKIP: /dev/kvm missing\n" if result == "SKIP" else "", "result": result,
            "starttime": 1.0, "duration": 0.1, "returncode": 77 if result == "SKIP" else 0, "env": env,
            "command": ["/bin/true"]}


def write(tmp, name, entries):
    p = os.path.join(tmp, name)
    with open(p, "w") as f:
        for e in entries:
            f.write(json.dumps(e) + "\n")
    return p


def crafted(tmp):
    ok = [entry("dirtyrep:unit / common", "OK"), entry("dirtyrep:fuzz / fuzz-frame", "OK")]
    kvm_skip = entry("dirtyrep:kvm / harvest-ring-1cpu", "SKIP")
    repl_skip = entry("dirtyrep:integration / repl-dirtier-ring-1cpu", "SKIP", "kvm")
    fo_skip = entry("dirtyrep:integration / failover-kill", "SKIP", "kvm root")
    plain_skip = entry("dirtyrep:integration / guest-qemu-kv", "SKIP")

    p = write(tmp, "all-ok.json", ok)
    rc, out = rule([p], ["kvm", "root"])
    check(rc == 0 and "2 passed, 0 failed, 0 skipped" in out, f"all passed: exit 0 and counted ({rc}: {out.strip()})")

    p = write(tmp, "kvm.json", ok + [kvm_skip])
    rc, out = rule([p], ["kvm", "root"])
    check(rc == 1 and "dirtyrep:kvm / harvest-ring-1cpu" in out and "1 skipped" in out,
          f"a skipped kvm-suite test fails where KVM is, and is named ({rc})")
    rc, out = rule([p], [])
    check(rc == 0, f"the same skip passes on a machine without KVM ({rc}: {out.strip()})")
    p2 = write(tmp, "kvm-multi.json", [entry("dirtyrep:integration+kvm / x", "SKIP")])
    rc, out = rule([p2], ["kvm"])
    check(rc == 1, f"the suite is found among several in the name, 'dirtyrep:integration+kvm / x' ({rc})")

    p = write(tmp, "marked.json", ok + [repl_skip, fo_skip])
    rc, out = rule([p], ["kvm", "root"])
    check(rc == 1 and "repl-dirtier-ring-1cpu" in out and "failover-kill" in out,
          f"skipped DR_NEEDS tests fail with both named ({rc}: {out.strip()})")
    rc, out = rule([p], ["kvm"])
    failing = "\n".join(l for l in out.splitlines() if not l.startswith("NOT RUN"))
    check(rc == 1 and "repl-dirtier-ring-1cpu" in failing and "failover-kill" not in failing,
          f"KVM without root: only the KVM-only test fails ({rc}: {out.strip()})")
    rc, out = rule([p], ["root"])
    check(rc == 0, f"root without KVM: neither fails ({rc})")
    check("NOT RUN: 2 test(s) need kvm" in out and "repl-dirtier-ring-1cpu" in out,
          f"root without KVM: the KVM test is named as not run ({out.strip()})")
    rc, out = rule([p], None, {"CI": "true"})
    have_kvm = os.access("/dev/kvm", os.R_OK | os.W_OK)
    check((rc == 1) == have_kvm,
          f"CI=true changes nothing: the machine's own /dev/kvm and uid decide ({rc}: {out.strip()})")

    p = write(tmp, "bare.json", [entry("faults-short", "SKIP", "kvm,root")])
    rc, out = rule([p], ["kvm", "root"])
    check(rc == 1, f"a name without a suite prefix: DR_NEEDS alone decides ({rc})")

    p = write(tmp, "plain.json", ok + [plain_skip])
    rc, out = rule([p], ["kvm", "root"])
    check(rc == 0 and "1 skipped" in out, f"a skip of a test that needs neither passes ({rc}: {out.strip()})")

    p = write(tmp, "fail.json", ok + [entry("dirtyrep:unit / link", "FAIL"), entry("dirtyrep:unit / x", "TIMEOUT")])
    rc, out = rule([p], [])
    check(rc == 1 and "2 passed, 2 failed" in out, f"failures and timeouts fail ({rc}: {out.strip()})")

    # Two logs (the plain and the sanitized stage): a skip in the second one counts too.
    a, b = write(tmp, "a.json", ok), write(tmp, "b.json", [kvm_skip])
    rc, out = rule([a, b], ["kvm"])
    check(rc == 1 and "2 passed, 0 failed, 1 skipped" in out, f"every log given is read ({rc}: {out.strip()})")

    rc, out = rule([os.path.join(tmp, "missing.json")], ["kvm"])
    check(rc == 2, f"a missing log is an error, not an empty pass ({rc})")
    p = os.path.join(tmp, "garbage.json")
    with open(p, "w") as f:
        f.write('{"name": "x", "result": "OK"}\nnot json\n')
    rc, out = rule([p], ["kvm"])
    check(rc == 2 and "garbage.json:2" in out, f"a line that is not JSON is an error naming it ({rc}: {out.strip()})")
    p = write(tmp, "typo.json", [entry("dirtyrep:integration / y", "SKIP", "kvmm")])
    rc, out = rule([p], ["kvm"])
    check(rc == 2 and "kvmm" in out, f"an unknown DR_NEEDS word is an error, not ignored ({rc})")


MESON_PROJECT = """project('skiprule', version : '0')
sh = find_program('sh')
test('k', sh, args : ['-c', 'exit 77'], suite : 'kvm')
test('marked', sh, args : ['-c', 'exit 77'], suite : 'integration', env : {'DR_NEEDS' : 'kvm root'})
test('unmarked', sh, args : ['-c', 'exit 77'], suite : 'integration')
test('passes', sh, args : ['-c', 'exit 0'], suite : 'unit')
"""


def real_meson(tmp):
    meson = shutil.which("meson")
    if not meson:
        check(False, "meson is not in PATH for the real-log check")
        return
    src, build = os.path.join(tmp, "proj"), os.path.join(tmp, "proj-build")
    os.mkdir(src)
    with open(os.path.join(src, "meson.build"), "w") as f:
        f.write(MESON_PROJECT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESON")}
    c = subprocess.run([meson, "setup", build, src], capture_output=True, text=True, timeout=120, env=env)
    if c.returncode != 0:
        check(False, f"meson setup of the throwaway project: {c.stdout[-500:]} {c.stderr[-500:]}")
        return
    subprocess.run([meson, "test", "-C", build], capture_output=True, text=True, timeout=120, env=env)
    log = os.path.join(build, "meson-logs", "testlog.json")
    entries = [json.loads(l) for l in open(log) if l.strip()]
    names = sorted(e["name"] for e in entries)
    print("meson wrote:", names, "fields:", sorted(entries[0]))
    check(all("suite" not in e for e in entries) and "skiprule:kvm / k" in names,
          "meson's log has no suite field; the suite is in the name")
    rc, out = rule([log], ["kvm", "root"])
    check(rc == 1 and "skiprule:kvm / k" in out and "marked" in out and "unmarked" not in out
          and "1 passed, 0 failed, 3 skipped" in out,
          f"on meson's real log the kvm-suite and the marked test fail, the unmarked one does not ({rc}: {out})")
    rc, out = rule([log], [])
    check(rc == 0, f"the same real log passes on a machine with neither ({rc})")


# What must be marked, by name: the tests in this project that need KVM or root.
REQUIRED = [(r"^repl-", {"kvm"}), (r"^commit-waits-for-ack$", {"kvm"}), (r"^failover-", {"kvm", "root"}), (r"^faults-short$", {"kvm", "root"}),
            (r"^systemd-nspawn$", {"kvm", "root"}), (r"^systemd-units$", {"root"}), (r"^control-", {"kvm"}),
            (r"^security-(tls|tamper|preauth)", {"kvm"}), (r"^security-caps$", {"root"}),
            (r"^qemu-(repl|badinput|restore|failover)", {"kvm"}), (r"^operator-(reload|failover|maintenance|restart)", {"kvm", "root"}),
            (r"^pacemaker-(ocf|kill|partition)", {"kvm", "root"}), (r"^pacemaker-cluster-smoke$", {"root"})]


def build_metadata():
    build = os.environ.get("DR_BUILDDIR")
    path = os.path.join(build or "", "meson-info", "intro-tests.json")
    if not build or not os.path.exists(path):
        check(False, f"this build's test metadata {path} (DR_BUILDDIR)")
        return
    sys.path.insert(0, os.path.dirname(RULE))  # tests/lib, as every test imports it
    import skiprule as sr
    tests = json.load(open(path))
    seen = {pat: 0 for pat, _ in REQUIRED}
    unmarked = []
    for t in tests:
        suites = [s.rpartition(":")[2] for s in t["suite"]]
        needs = sr.needs_of({"name": f"dirtyrep:{'+'.join(suites)} / {t['name']}", "env": t.get("env") or {}})
        if "kvm" in suites and "kvm" not in needs:
            unmarked.append(t["name"])
        for pat, want in REQUIRED:
            if re.search(pat, t["name"]):
                seen[pat] += 1
                if not want <= needs:
                    unmarked.append(f"{t['name']} (has {sorted(needs)}, needs {sorted(want)})")
    kvm_suite = sum(1 for t in tests if any(s.endswith(":kvm") for s in t["suite"]))
    print(f"{len(tests)} tests in this build, {kvm_suite} in the kvm suite; matched: {seen}")
    check(kvm_suite > 0 and all(seen.values()), "every kind of KVM/root test exists in this build")
    check(not unmarked, f"every test that needs KVM or root is marked (unmarked: {unmarked})")


def main():
    with tempfile.TemporaryDirectory(prefix="dr-skiprule-") as tmp:
        crafted(tmp)
        real_meson(tmp)
        build_metadata()
    if failed:
        print(f"FAIL: {len(failed)} check(s)")
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())

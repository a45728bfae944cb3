#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""The summary and the skip rule of scripts/test, from meson's machine-readable
test logs (meson-logs/testlog.json, one JSON object per line and test run).

  skiprule.py [--have kvm,root] TESTLOG.json...

Prints "N passed, N failed, N skipped". A test that needs KVM or root must
run where they are, not skip: it is listed and the exit status is 1. What a
test needs is taken from
- its suite: meson writes no suite field, the suite is in the test name,
  "dirtyrep:kvm / name" (or "dirtyrep:kvm+other / name"); every test of the
  kvm suite needs KVM;
- DR_NEEDS= in the test's environment (set per test in meson.build, e.g.
  "kvm root"; testlog.json records each test's environment), for the tests
  of other suites that need them (repl-*, failover-*, faults-short,
  systemd-*, control-*, security-*).
What the machine has: /dev/kvm readable and writable, effective uid 0 (CI
runs on a machine of the same kind as the developers', so CI=true changes
nothing: a machine whose kernel offers no /dev/kvm skips the KVM tests, and
the summary then says so on a line of its own, with their count, so a run
that proved nothing about KVM never reads as one that did). --have
overrides the detection (the unit test uses it).
Exit: 0 when nothing failed and no such test skipped, 1 otherwise, 2 on bad
input (a missing or unreadable log is an error, never an empty pass).
"""
import json
import os
import sys

# Every suite whose tests all need something, and what.
SUITE_NEEDS = {"kvm": {"kvm"}}
KNOWN = {"kvm", "root"}
PASS = {"OK", "EXPECTEDFAIL"}


def suites_of(name):
    """The suites in a meson test name, "project:suite1+suite2 / test" -> ["suite1", "suite2"]."""
    head, sep, _ = name.partition(" / ")
    if not sep:
        return []  # meson leaves the prefix out when the project has only one suite
    _, colon, suites = head.rpartition(":")
    return suites.split("+") if colon and suites else []


def needs_of(entry):
    needs = set()
    for s in suites_of(entry.get("name", "")):
        needs |= SUITE_NEEDS.get(s, set())
    env = entry.get("env") or {}
    for word in env.get("DR_NEEDS", "").replace(",", " ").split():
        if word not in KNOWN:
            raise ValueError(f"{entry.get('name')}: unknown DR_NEEDS word {word!r} (known: {', '.join(sorted(KNOWN))})")
        needs.add(word)
    return needs


def machine_has():
    have = set()
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        have.add("kvm")
    if os.geteuid() == 0:
        have.add("root")
    return have


def evaluate(entries, have):
    """(passed, failed, skipped, bad, lacking): bad lists (name, needs) of tests that skipped
    although the machine has everything they need; lacking maps each need the machine lacks
    to the names of the skipped tests that needed it."""
    passed = failed = skipped = 0
    bad = []
    lacking = {}
    for t in entries:
        res = t["result"]
        if res in PASS:
            passed += 1
        elif res == "SKIP":
            skipped += 1
            needs = needs_of(t)
            if needs and needs <= have:
                bad.append((t["name"], needs))
            for n in needs - have:
                lacking.setdefault(n, []).append(t["name"])
        else:
            failed += 1
    return passed, failed, skipped, bad, lacking


def main(argv):
    have = None
    if argv[:1] == ["--have"] and len(argv) >= 2:
        have = {w for w in argv[1].split(",") if w}
        argv = argv[2:]
    if not argv or argv[0].startswith("-"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    if have is None:
        have = machine_has()
    entries = []
    try:
        for path in argv:
            with open(path) as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            t = json.loads(line)
                        except ValueError as e:
                            raise ValueError(f"{path}:{n}: not JSON: {e}") from None
                        if not isinstance(t, dict) or "name" not in t or "result" not in t:
                            raise ValueError(f"{path}:{n}: no name or result")
                        entries.append(t)
        passed, failed, skipped, bad, lacking = evaluate(entries, have)
    except (OSError, ValueError) as e:
        print(f"skip-rule: {e}", file=sys.stderr)
        return 2
    for need, names in sorted(lacking.items()):
        what = "/dev/kvm" if need == "kvm" else "root"
        print(f"NOT RUN: {len(names)} test(s) need {need} and this machine has no {what}; they proved nothing here: "
              + ", ".join(sorted(set(n.rpartition(' / ')[2] for n in names))))
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    if bad:
        print(f"{len(bad)} test(s) skipped although this machine has what they need "
              f"({', '.join(sorted(have))}); their logs say why:")
        for name, needs in bad:
            print(f"  {name} (needs {' and '.join(sorted(needs))})")
        print("Install what the SKIP line names (scripts/deps.sh) or fix the test; a skip here is a failure.")
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Two trees' benchmark figures side by side: the medians of interleaved runs of
bench/report.py (each tree's own script on its own release build) and their ratio.

  bench/compare.py --base DIR [DIR ...] --new DIR [DIR ...] [--json OUT]

Each DIR is a --out-dir of bench/report.py (its latest.json). A key counts only in
the runs that wrote it; the number of runs behind each median is printed, so a
section that failed in some runs shows as fewer samples, never as a zero.
"""
import argparse
import json
import os
import statistics
import sys


def figures(d):
    with open(os.path.join(d, "latest.json")) as f:
        j = json.load(f)
    return {k: v for k, v in j.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}, j.get("run", {})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", nargs="+", required=True)
    ap.add_argument("--new", nargs="+", required=True)
    ap.add_argument("--json")
    a = ap.parse_args()
    base = [figures(d) for d in a.base]
    new = [figures(d) for d in a.new]
    keys = sorted({k for f, _ in base + new for k in f})
    rows = []
    print("| key | base median (n) | new median (n) | new / base |")
    print("|---|---|---|---|")
    for k in keys:
        b = [f[k] for f, _ in base if k in f]
        n = [f[k] for f, _ in new if k in f]
        bm = statistics.median(b) if b else None
        nm = statistics.median(n) if n else None
        ratio = round(nm / bm, 3) if b and n and bm else None
        rows.append({"key": k, "base": b, "new": n, "base_median": bm, "new_median": nm, "ratio": ratio})
        fmt = lambda m, xs: f"{m:g} ({len(xs)})" if xs else "- (0)"  # noqa: E731
        print(f"| {k} | {fmt(bm, b)} | {fmt(nm, n)} | {ratio if ratio is not None else '-'} |")
    loads = [r.get("loadavg_at_end", ["?"])[0] for _, r in base + new]
    print(f"\nruns: base {len(base)}, new {len(new)}; load average (1 min) at the end of each: {', '.join(loads)}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"base": a.base, "new": a.new, "rows": rows,
                       "runs": [r for _, r in base + new]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

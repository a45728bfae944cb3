#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Checkpoint image benchmarks (issue 6). Not part of the test suites.

For each guest size (default 1G and 4G): boots dirtyrep-vmm with the
dirtier guest stamping a working set of half the RAM (capped at the low
RAM range), takes a full image and incremental images with dr-imager
(raw, then LZ4), and reports:

  write_mbps_full / write_mbps_incr   page data bytes / image_capture_write() time
                                      (includes fsync of every file and the directory)
  pause_us_full / pause_us_incr       the VM's pause per image (final collect + reset,
                                      re-copy of re-dirtied pages, SaveState, resume)
  restore_ms_full / restore_ms_chain  dirtyrep-vmm --restore-image until --ready-fd
                                      says the vCPUs run (time to the first guest
                                      instruction), from the full image and from the
                                      last incremental image (chain of 3)
  copy_vs_map_*                       dr-imager restore-bench: filling a memfd from the
                                      chain (copy_ms) vs. mapping the raw runs MAP_PRIVATE
                                      (map_ms) and then touching every page (first touch)

The page cache is warm (the images were just written): dropping caches would
disturb the other users of a shared machine.

Usage: meson compile -C build && bench/image-bench.py [--build build] [--sizes 1G,4G] [--dir /var/tmp]
Prints one JSON object per size.
"""
import argparse
import json
import os

from imagebench import bench_size, parse_size


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--sizes", default="1G,4G")
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--interval-ms", type=int, default=1000)
    a = ap.parse_args()
    for s in a.sizes.split(","):
        print(json.dumps(bench_size(os.path.abspath(a.build), parse_size(s), a.dir, a.interval_ms)), flush=True)


if __name__ == "__main__":
    main()

#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Runs the libFuzzer builds of the fuzz targets ONE AT A TIME for a fixed
# time each and writes what libFuzzer reported to a results directory.
#
#   tests/fuzz/run-all.sh BUILDDIR SECONDS [TARGET...]
#
# BUILDDIR is a clang build with -Dfuzzers=true (see docs/fuzzing.md).
# Without TARGETs every *-libfuzzer in BUILDDIR/tests/fuzz is run. If the
# file $RESULTS/queue exists, targets are taken from it one line at a time
# instead (lines may be appended while the script runs); a target whose
# result file already exists is skipped.
#
# Each run starts from the seeds in tests/fuzz/corpus/<target>/ and works on a
# copy (the checked-in corpus is only changed by hand, after -merge=1).
# Per target: $RESULTS/<target>.log (libFuzzer's full stderr),
# $RESULTS/<target>.stats (the final lines: last status line, "Done N runs",
# -print_final_stats), crash-/leak-/timeout- artifacts in $RESULTS/artifacts/.
# A line per target is appended to $RESULTS/summary.
set -u

builddir=${1:?usage: run-all.sh BUILDDIR SECONDS [TARGET...]}
secs=${2:?usage: run-all.sh BUILDDIR SECONDS [TARGET...]}
shift 2
srcdir=$(cd "$(dirname "$0")" && pwd)
results=${RESULTS:-$srcdir/results}
work=${WORKDIR:-$(mktemp -d /tmp/dr-fuzz.XXXXXX)}
mkdir -p "$results/artifacts" "$work"

run_one() {
        local t=$1 bin="$builddir/tests/fuzz/$1-libfuzzer"
        local log="$results/$t.log" corpus="$work/$t" start end rc
        if [ ! -x "$bin" ]; then
                echo "$t: $bin missing" | tee -a "$results/summary"
                return
        fi
        rm -rf "$corpus" && mkdir -p "$corpus"
        [ -d "$srcdir/corpus/$t" ] && cp -r "$srcdir/corpus/$t/." "$corpus/"
        # Run a copy: rebuilding the tree while a fuzzer runs must not matter.
        cp "$bin" "$work/$t.bin"
        start=$(date +%s)
        nice -n 19 "$work/$t.bin" -max_total_time="$secs" -timeout=10 \
                -rss_limit_mb=2048 -print_final_stats=1 \
                -artifact_prefix="$results/artifacts/$t-" "$corpus" >"$log" 2>&1
        rc=$?
        end=$(date +%s)
        {
                grep -E '^#[0-9]+' "$log" | tail -n 1
                grep -E '^(Done [0-9]+ runs|stat::)' "$log"
                grep -E '^(==[0-9]+==ERROR|SUMMARY:|artifact_prefix|Test unit written)' "$log"
        } >"$results/$t.stats"
        echo "$t rc=$rc wall=$((end - start))s corpus_files=$(ls "$corpus" | wc -l)" \
             "$(grep -E '^(Done|stat::number_of_executed_units|stat::average_exec_per_sec)' "$log" | tr '\n' ' ')" \
             "$(grep -E '^#[0-9]+' "$log" | tail -n 1)" >>"$results/summary"
}

if [ $# -gt 0 ]; then
        for t in "$@"; do run_one "$t"; done
elif [ -f "$results/queue" ]; then
        n=1
        while :; do
                t=$(sed -n "${n}p" "$results/queue")
                if [ -z "$t" ]; then
                        # Wait a while for more targets to be queued.
                        [ -f "$results/queue.done" ] && break
                        sleep 30
                        continue
                fi
                n=$((n + 1))
                [ -f "$results/$t.stats" ] && continue
                run_one "$t"
        done
else
        for bin in "$builddir"/tests/fuzz/*-libfuzzer; do
                run_one "$(basename "${bin%-libfuzzer}")"
        done
fi

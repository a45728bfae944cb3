#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Prints a Markdown table of the runs recorded by run-all.sh: figures are
# read from libFuzzer's own final lines in RESULTS/<target>.stats.
#
#   tests/fuzz/results-table.sh [RESULTS]
set -eu
srcdir=$(cd "$(dirname "$0")" && pwd)
results=${1:-$srcdir/results}

echo "| target | runtime | total execs | exec/s | coverage (cov / ft) | corpus after run | outcome |"
echo "|---|---|---|---|---|---|---|"
for f in "$results"/*.stats; do
        t=$(basename "$f" .stats)
        secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$f")
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$f")
        rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$f")
        last=$(grep -E '^#[0-9]+' "$f" | tail -n 1)
        cov=$(echo "$last" | sed -n 's/.* cov: \([0-9]*\) ft: \([0-9]*\).*/\1 \/ \2/p')
        corp=$(echo "$last" | sed -n 's/.* corp: \([0-9]*\/[0-9a-zA-Z]*\).*/\1/p')
        outcome=$(grep -E '^SUMMARY:' "$f" | head -n 1 | sed 's/^SUMMARY: //')
        if [ -z "$secs" ]; then
                # Stopped early: libFuzzer prints no "Done" line; the log has the last status.
                secs="stopped"
        else
                secs="${secs} s"
        fi
        echo "| $t | $secs | $execs | $rate | $cov | $corp | ${outcome:-no crash, leak or timeout} |"
done

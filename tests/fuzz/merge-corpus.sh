#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Adds what a run-all.sh run found to the checked-in corpora, minimized:
# for each TARGET, libFuzzer's -merge=1 takes from WORKDIR/<target> only
# the inputs that add coverage to tests/fuzz/corpus/<target>/ (whose named
# seeds and crashers all stay), and those are copied in (named by their
# SHA-1, as libFuzzer names them). One target at a time.
#
#   [MAX_BYTES=N] tests/fuzz/merge-corpus.sh BUILDDIR WORKDIR [TARGET...]
#
# MAX_BYTES: only inputs up to N bytes are considered (keeps the checked-in
# corpora of targets with large inputs, image files and VM states, small).
set -eu
builddir=${1:?usage: merge-corpus.sh BUILDDIR WORKDIR [TARGET...]}
work=${2:?usage: merge-corpus.sh BUILDDIR WORKDIR [TARGET...]}
shift 2
srcdir=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d /tmp/dr-merge.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
        for d in "$work"/*/; do targets+=("$(basename "$d")"); done
fi
for t in "${targets[@]}"; do
        [ -d "$work/$t" ] && [ -x "$builddir/tests/fuzz/$t-libfuzzer" ] || continue
        rm -rf "${tmp:?}/$t" && mkdir -p "$tmp/$t" "$srcdir/corpus/$t"
        cp -r "$srcdir/corpus/$t/." "$tmp/$t/"
        before=$(ls "$tmp/$t" | wc -l)
        mkdir -p "$tmp/$t.in"
        find "$work/$t" -maxdepth 1 -type f -size -"$((${MAX_BYTES:-1048576} + 1))"c -exec cp {} "$tmp/$t.in/" \;
        nice -n 19 "$builddir/tests/fuzz/$t-libfuzzer" -merge=1 -timeout=30 "$tmp/$t" "$tmp/$t.in" \
                >"$tmp/$t.log" 2>&1 || { tail -n 5 "$tmp/$t.log"; continue; }
        for f in "$tmp/$t"/*; do
                [ -e "$srcdir/corpus/$t/$(basename "$f")" ] || cp "$f" "$srcdir/corpus/$t/"
        done
        echo "$t: $before -> $(ls "$srcdir/corpus/$t" | wc -l) files, $(du -sk --apparent-size "$srcdir/corpus/$t" | cut -f1) KiB" \
             "($(grep -E '^MERGE-OUTER: [0-9]+ new files' "$tmp/$t.log" || true))"
done

#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
# The README's first command, ./scripts/demo, on this build (DR_BUILD_DIR): two
# hosts, replication, checkpoint images, a Redis client, the primary killed and
# the standby failing over with no acknowledged write lost. The demo exits 0 only
# when all of that worked. Exit 77 (skip) without /dev/kvm or root, as the other
# tests that run a VM.
set -euo pipefail
if [ ! -c /dev/kvm ] || [ "$(id -u)" != 0 ]; then
  echo "SKIP: the demo needs /dev/kvm and root"
  exit 77
fi
exec "${DR_SRCDIR:?}/scripts/demo"

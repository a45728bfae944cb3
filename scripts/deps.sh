#!/usr/bin/env bash
# Sourced by scripts/test, scripts/demo and bench/run: installs what the
# build and the tests need from Debian 12's archive when it is missing.
DR_DEPS=(
  meson ninja-build pkg-config gcc binutils uuid-dev libjson-c-dev
  protobuf-c-compiler libprotobuf-c-dev libsystemd-dev liblz4-dev
  libnl-3-dev libnl-route-3-dev libssl-dev openssl
  python3 python3-prometheus-client iproute2 redis-tools qemu-system-x86 clang clang-format
  dbus-daemon systemd systemd-container util-linux debootstrap debian-archive-keyring
  universal-ctags
)

dr_install_deps() {
  local missing=() p
  for p in "${DR_DEPS[@]}" "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "Missing packages: ${missing[*]}; run as root or install them first." >&2
    return 1
  fi
  echo "Installing: ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

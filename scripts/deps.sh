#!/usr/bin/env bash
# Install the Debian packages ember needs that are missing. Usage: scripts/deps.sh [--test]
# --test adds what the test suite uses beyond the build (numpy, for the checkpoint reader check;
# clang and its fuzzer/sanitizer runtimes, for scripts/fuzz.sh).
set -euo pipefail
pkgs=(build-essential cmake pkg-config libopenblas-dev libjansson-dev libxxhash-dev libmicrohttpd-dev librocksdb-dev libopenmpi-dev openmpi-bin)
[[ "${1:-}" == "--test" ]] && pkgs+=(python3-numpy clang libclang-rt-14-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
echo "installing: ${missing[*]}" >&2
SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

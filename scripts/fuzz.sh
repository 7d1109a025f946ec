#!/usr/bin/env bash
# Fuzz the inference server's request parsers with libFuzzer (tests/fuzz/fuzz_request.c,
# docs/SERVING.md "Fuzzing"): install clang and its fuzzer/sanitizer runtimes if missing,
# build build-fuzz with clang -DEMBER_FUZZ=ON, and run fuzz_request for SECONDS (default
# 60) on a working copy of the seed corpus, build-fuzz/corpus/ (the committed corpus,
# tests/fuzz/corpus_request/, is only read). Fails when libFuzzer finds a crash, a leak,
# undefined behaviour, a broken invariant, a timeout or an out-of-memory; the input that
# did it is then in build-fuzz/artifacts/ (replay it: build-fuzz/fuzz_request FILE).
# Usage: scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [[ "$secs" -eq 0 ]]; then
  echo "usage: scripts/fuzz.sh [SECONDS]" >&2
  exit 2
fi
pkgs=(clang libclang-rt-14-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "installing: ${missing[*]}" >&2
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
CC=clang cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DEMBER_FUZZ=ON >/dev/null
cmake --build build-fuzz -j"$(nproc)" --target fuzz_request
work=build-fuzz/corpus art=build-fuzz/artifacts log=build-fuzz/fuzz.log
rm -rf "$art"
mkdir -p "$work" "$art"
cp tests/fuzz/corpus_request/* "$work"/ # on top of what earlier runs found
echo "fuzz_request: ${secs} s on $(ls "$work" | wc -l) inputs (log: $log)"
rc=0
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  build-fuzz/fuzz_request -max_total_time="$secs" -max_len=65536 -timeout=10 -rss_limit_mb=4096 \
  -dict=tests/fuzz/request.dict -artifact_prefix="$art/" -print_final_stats=1 "$work" >"$log" 2>&1 || rc=$?
found=$(ls "$art")
if [[ $rc -ne 0 || -n "$found" ]]; then
  tail -n 60 "$log" >&2
  echo "fuzz_request FAILED (exit $rc); inputs in $art/: ${found:-none}" >&2
  exit 1
fi
grep -E '^(Done|stat::(number_of_executed_units|average_exec_per_sec|new_units_added))' "$log" || true

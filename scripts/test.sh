#!/usr/bin/env bash
# The whole test suite: install what is missing, build (Release) and run every test,
# then build and run them again under AddressSanitizer + UndefinedBehaviorSanitizer,
# then fuzz the server's request parsers for 20 s (scripts/fuzz.sh, with clang).
# Usage: scripts/test.sh [--no-sanitize]   (--no-sanitize skips the last two)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh --test
jobs=$(nproc)
echo "== Release build + tests"
scripts/build.sh build
(cd build && ctest --output-on-failure -j"$jobs")
if [[ "${1:-}" != "--no-sanitize" ]]; then
  echo "== AddressSanitizer + UndefinedBehaviorSanitizer build + tests"
  cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DEMBER_SANITIZE=ON >/dev/null
  cmake --build build-asan -j"$jobs"
  (cd build-asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
     EMBER_SANITIZED=1 ctest --output-on-failure -j"$jobs")
  echo "== libFuzzer: the request parsers, 20 s"
  scripts/fuzz.sh 20
fi

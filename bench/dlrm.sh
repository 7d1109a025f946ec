#!/usr/bin/env bash
# bench/dlrm.sh - reproduces the foundation issue's figures from a fresh build:
#   1. the machine's sgemm rate (OpenBLAS, 2 threads) -> the DLRM roofline;
#   2. training speed, ember vs PyTorch (bench/dlrm_torch.py), alternating, N runs each:
#      Kaggle config batch 2048 and 128 with SGD, embedding-heavy config batch 2048
#      (ember row-wise AdaGrad vs torch.optim.Adagrad on sparse gradients);
#   3. quality on `ember gen` data: 1M rows, one epoch, batch 128 SGD lr 0.1 and batch
#      2048 row-wise AdaGrad, ember vs PyTorch, beside the planted optimum; ember's AUC
#      at 0.25M / 1M / 4M training rows.
#   4. the roofline measured against itself: PAIRS alternating pairs, in one process, of
#      the peak sgemm (2048x512x512, 2 OpenBLAS threads) and Kaggle batch-2048 SGD training
#      steps (`ember bench --vs-sgemm`), the ratio of their GFLOP/s per pair; once with
#      ember's AVX-512 linear kernels and once with the OpenBLAS tiles (--blas-linear), the
#      two runs alternating REPS times.
# Takes long (tens of minutes); not part of the test suite. Last line: one JSON object.
# Env: REPS (default 3), PAIRS (default 7), OUT (default bench/out), SKIP_QUALITY=1,
# SKIP_SPEED=1, SKIP_PAIRED=1.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-3}
OUT=${OUT:-bench/out}
PY=/usr/bin/python3
mkdir -p "$OUT"
scripts/deps.sh
need=()
for p in python3-torch python3-sklearn python3-numpy; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [[ ${#need[@]} -gt 0 ]]; then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
scripts/build.sh build
# OpenBLAS picks its kernels from a table of CPU models and falls back to its SSE3
# ("Prescott") ones on a newer CPU; ember re-runs itself with the right OPENBLAS_CORETYPE
# (src/core/blas.c). Give the same kernels to the PyTorch peer and to sgemm_peak.
# ember's pick for this CPU (src/core/blas.c) even when the environment carries an
# OPENBLAS_CORETYPE (a machine may set a common one, e.g. Haswell on an AVX-512 CPU,
# which cuts sgemm and the PyTorch peer by a third); BLAS_CORE=NAME chooses
OPENBLAS_CORETYPE=${BLAS_CORE:-$(env -u OPENBLAS_CORETYPE build/ember version | sed -n 's/^blas_core=//p')}
export OPENBLAS_CORETYPE
echo "OpenBLAS kernels: $OPENBLAS_CORETYPE" >&2
EMBER=build/ember
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

# 1. sgemm roofline
cc -O2 bench/sgemm_peak.c -I/usr/include/x86_64-linux-gnu/openblas-pthread -lopenblas -o "$OUT/sgemm_peak"
: > "$OUT/sgemm.jsonl"
for r in $(seq "$REPS"); do OPENBLAS_NUM_THREADS=2 "$OUT/sgemm_peak" >> "$OUT/sgemm.jsonl"; done
log "sgemm: $(tail -n1 "$OUT/sgemm.jsonl")"

# 2. speed, alternating ember / torch
if [[ -z "${SKIP_SPEED:-}" ]]; then
  : > "$OUT/speed.jsonl"
  cases=("kaggle 2048 sgd sgd 40" "kaggle 128 sgd sgd 300" "embheavy 2048 rowwise_adagrad adagrad 20")
  for r in $(seq "$REPS"); do
    for c in "${cases[@]}"; do
      read -r cfg batch eopt topt steps <<< "$c"
      e=$($EMBER bench --workload "$cfg" --batch "$batch" --opt "$eopt" --steps "$steps" --warmup 5 --threads 2)
      echo "{\"side\":\"ember\",\"run\":$r,\"r\":$e}" >> "$OUT/speed.jsonl"
      t=$($PY bench/dlrm_torch.py speed --config "$cfg" --batch "$batch" --opt "$topt" --steps "$steps" --warmup 5 --threads 2 | tail -n1)
      echo "{\"side\":\"torch\",\"run\":$r,\"r\":$t}" >> "$OUT/speed.jsonl"
      log "$cfg b$batch: ember $(echo "$e" | grep -o '"examples_per_s":[0-9.]*') torch $(echo "$t" | grep -o '"examples_per_s":[0-9.]*')"
    done
  done
fi

# 4. paired against sgemm, in one process (written here, before the long quality part)
if [[ -z "${SKIP_PAIRED:-}" ]]; then
  : > "$OUT/paired.jsonl"
  for r in $(seq "$REPS"); do
    for lin in "" --blas-linear; do
      e=$($EMBER bench --workload kaggle --batch 2048 --opt sgd --steps 10 --warmup 3 --threads 2 --vs-sgemm "${PAIRS:-7}" $lin)
      echo "{\"run\":$r,\"r\":$e}" >> "$OUT/paired.jsonl"
      log "paired ${lin:-kernels}: $(echo "$e" | grep -o '"ratio_median":[0-9.]*')"
    done
  done
fi

# 3. quality
if [[ -z "${SKIP_QUALITY:-}" ]]; then
  D="$OUT/data"
  if [[ ! -f "$D/GEN4M" ]]; then
    log "generating 4M training rows + 200k test rows"
    $EMBER gen --out "$D" --rows 4000000 --test-rows 200000 --seed 1 > /dev/null
    head -n 1000000 "$D/train.tsv" > "$D/train1m.tsv"
    touch "$D/GEN4M"
  fi
  common=(--test "$D/test.tsv" --test-prob "$D/test.prob" --quiet)
  : > "$OUT/quality.jsonl"
  for rows in 250000 1000000 4000000; do
    log "ember batch 128 SGD, $rows rows"
    $EMBER train --train "$D/train.tsv" --train-limit "$rows" "${common[@]}" --batch 128 --lr 0.1 --out "$OUT/q_sgd_$rows" > /dev/null
    echo "{\"side\":\"ember\",\"setting\":\"b128_sgd\",\"rows\":$rows,\"report\":$(tr -d '\n' < "$OUT/q_sgd_$rows/report.json")}" >> "$OUT/quality.jsonl"
  done
  log "ember batch 2048 row-wise AdaGrad, 1M rows"
  $EMBER train --train "$D/train1m.tsv" "${common[@]}" --batch 2048 --dense-opt adagrad --sparse-opt rowwise_adagrad \
    --lr "${RW_LR:-0.006}" --out "$OUT/q_rw_1m" > /dev/null
  echo "{\"side\":\"ember\",\"setting\":\"b2048_rowwise\",\"rows\":1000000,\"report\":$(tr -d '\n' < "$OUT/q_rw_1m/report.json")}" >> "$OUT/quality.jsonl"
  log "torch batch 128 SGD, 1M rows"
  t=$($PY bench/dlrm_torch.py quality --train "$D/train1m.tsv" --test "$D/test.tsv" --batch 128 --lr 0.1 --opt sgd | tail -n1)
  echo "{\"side\":\"torch\",\"setting\":\"b128_sgd\",\"rows\":1000000,\"r\":$t}" >> "$OUT/quality.jsonl"
  log "torch batch 2048 row-wise AdaGrad, 1M rows"
  t=$($PY bench/dlrm_torch.py quality --train "$D/train1m.tsv" --test "$D/test.tsv" --batch 2048 --lr "${RW_LR:-0.006}" --opt rowwise_adagrad | tail -n1)
  echo "{\"side\":\"torch\",\"setting\":\"b2048_rowwise\",\"rows\":1000000,\"r\":$t}" >> "$OUT/quality.jsonl"
fi

$PY bench/summarize.py "$OUT"

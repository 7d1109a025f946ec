#!/usr/bin/env bash
# bench/seqmodel.sh - reproduces issue 4's sequence-model figures (docs/BENCHMARKS.md,
# "Issue 4: sequence model") from a fresh build:
#   1. data: `ember gen --seq-len-mean MEAN --seed SEED` (ROWS training rows, TEST_ROWS test
#      rows, the candidate item in C10, a planted history term) twice: "kaggle" with the
#      generator's default (Kaggle) cardinalities, C10 93,145 ids, and "small" with
#      --cardinality SMALL_CARD (C10 1,000 ids, every id seen often); each converted to
#      ember binary with the history column and without it;
#   2. quality, per dataset, one epoch each, the Kaggle DLRM (D=16, 13-512-256-64-16, top
#      (width)-512-256-1; tables of the data's cardinalities), batch 2048, AdaGrad +
#      row-wise AdaGrad, lr LR, THREADS threads:
#        base      the same DLRM without the history (the files without the column)
#        full      --seq-share C10 --seq-blocks full:LAYERS      (every layer gdpa + hsp)
#        compskip  --seq-share C10 --seq-blocks compskip:LAYERS  (odd layers swa, cached hsp)
#      test AUC / NE of each beside the planted optimum (the .prob file);
#   3. speed: base, full and compskip alternated REPS times on the first TIME_ROWS rows of
#      "kaggle" (histories of ~17.5 events), and on "long" (LONG_ROWS rows, --seq-len-mean
#      LONG_MEAN, the model keeping LONG_MAX events: ~100-event histories, where attention
#      dominates the tower); training seconds from report.json (the machine is shared:
#      medians reported) and the tower's forward FLOPs per example each run counts
#      (seqtower.h).
# Takes ~20-25 minutes on 2 cores. Last line of stdout: one JSON object.
# Env: OUT (default bench/out/seqmodel), BUILD (default build), ROWS (1000000), TEST_ROWS
# (100000), SEED (3), MEAN (20), SEQ_MAX (64), LAYERS (2), LR (0.006), REPS (3),
# TIME_ROWS (200000), THREADS (2), SMALL_CARD, LONG_ROWS (100000), LONG_MEAN (128),
# LONG_MAX (256).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/seqmodel}
BUILD=${BUILD:-build}
ROWS=${ROWS:-1000000}
TEST_ROWS=${TEST_ROWS:-100000}
SEED=${SEED:-3}
MEAN=${MEAN:-20}
SEQ_MAX=${SEQ_MAX:-64}
LAYERS=${LAYERS:-2}
LR=${LR:-0.006}
REPS=${REPS:-3}
TIME_ROWS=${TIME_ROWS:-200000}
THREADS=${THREADS:-2}
LONG_ROWS=${LONG_ROWS:-100000}
LONG_MEAN=${LONG_MEAN:-128}
LONG_MAX=${LONG_MAX:-256}
SMALL_CARD=${SMALL_CARD:-9,12,30,5,40,3,8,25,4,1000,7,11,20,6,15,50,3,9,13,4,35,6,10,18,5,22}
PY=/usr/bin/python3
mkdir -p "$OUT"
scripts/build.sh "$BUILD"
EMBER=$BUILD/ember
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

# 1. data (kept between runs when the generator's arguments are the same)
make_data() { # dir, rows, test rows, mean length, extra gen arguments
  local D=$1 rows=$2 test_rows=$3 mean=$4; shift 4
  local want="gen --rows $rows --test-rows $test_rows --seed $SEED --seq-len-mean $mean $*"
  if [[ -f $D/STAMP && "$(cat "$D/STAMP")" == "$want" && -f $D/test.prob ]]; then return; fi
  rm -rf "$D"
  log "ember $want"
  $EMBER gen --out "$D" --rows "$rows" --test-rows "$test_rows" --seed "$SEED" --seq-len-mean "$mean" "$@" >&2
  $EMBER convert --seq 1 "$D/train.tsv" "$D/train.bin" >&2
  $EMBER convert --seq 1 "$D/test.tsv" "$D/test.bin" >&2
  cut -f1-40 "$D/train.tsv" > "$D/train0.tsv"
  cut -f1-40 "$D/test.tsv" > "$D/test0.tsv"
  $EMBER convert "$D/train0.tsv" "$D/train0.bin" >&2
  $EMBER convert "$D/test0.tsv" "$D/test0.bin" >&2
  rm -f "$D/train.tsv" "$D/test.tsv" "$D/train0.tsv" "$D/test0.tsv"
  echo "$want" > "$D/STAMP"
}
make_data "$OUT/data_kaggle" "$ROWS" "$TEST_ROWS" "$MEAN"
make_data "$OUT/data_small" "$ROWS" "$TEST_ROWS" "$MEAN" --cardinality "$SMALL_CARD"
make_data "$OUT/data_long" "$LONG_ROWS" 1000 "$LONG_MEAN" --seq-max "$((2 * LONG_MAX))"

common=(--batch 2048 --dense-opt adagrad --sparse-opt rowwise_adagrad --lr "$LR" --threads "$THREADS" --quiet)
seqopt=(--seq-share C10)
train() { # name, then ember train arguments
  local name=$1; shift
  log "train $name: $*"
  $EMBER train "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1 || { cat "$OUT/$name.log" >&2; exit 1; }
  grep -E "^(test|optimum|sequence tower:)" "$OUT/$name.log" >&2 || true
}

# 2. quality
for ds in kaggle small; do
  D=$OUT/data_$ds
  rows=()
  [[ $ds == small ]] && rows=(--rows "$SMALL_CARD")
  train "${ds}_base" --train "$D/train0.bin" --test "$D/test0.bin" --test-prob "$D/test.prob" "${rows[@]}" "${common[@]}"
  for kind in full compskip; do
    train "${ds}_$kind" --train "$D/train.bin" --test "$D/test.bin" --test-prob "$D/test.prob" "${rows[@]}" \
      "${common[@]}" "${seqopt[@]}" --seq-max "$SEQ_MAX" --seq-blocks "$kind:$LAYERS"
  done
done

# 3. speed, alternating (no evaluation: training seconds only)
for r in $(seq "$REPS"); do
  for ds in kaggle long; do
    D=$OUT/data_$ds
    limit=(--train-limit "$TIME_ROWS")
    smax=(--seq-max "$SEQ_MAX")
    [[ $ds == long ]] && limit=() && smax=(--seq-max "$LONG_MAX")
    for kind in base full compskip; do
      if [[ $kind == base ]]; then
        train "time_${ds}_${kind}_$r" --train "$D/train0.bin" "${limit[@]}" "${common[@]}"
      else
        train "time_${ds}_${kind}_$r" --train "$D/train.bin" "${limit[@]}" "${common[@]}" "${seqopt[@]}" "${smax[@]}" \
          --seq-blocks "$kind:$LAYERS"
      fi
    done
  done
done

# summary
$PY - "$OUT" "$REPS" <<'PYEOF'
import json, os, statistics, sys
out, reps = sys.argv[1], int(sys.argv[2])
rep = lambda n: json.load(open(os.path.join(out, n, "report.json")))
res = {}
for ds in ("kaggle", "small"):
    d = {"optimum": {k: rep(f"{ds}_base")["optimum"][k] for k in ("auc", "ne")}}
    for n in ("base", "full", "compskip"):
        r = rep(f"{ds}_{n}")
        d[n] = {"auc": r["test"]["auc"], "ne": r["test"]["ne"], "train_s": r["run"]["train_seconds"],
                "examples_per_s": r["run"]["examples_per_s"]}
        if "seq" in r:
            d[n]["tower_mflop_per_example"] = r["seq"]["forward_flops_per_example"] / 1e6
            d[n]["events_per_example"] = r["seq"]["events_per_example"]
            d[n]["blocks"] = r["model"]["seq"]["blocks"]
    d["history_gain_auc"] = {k: d[k]["auc"] - d["base"]["auc"] for k in ("full", "compskip")}
    d["compskip_minus_full"] = {"auc": d["compskip"]["auc"] - d["full"]["auc"], "ne": d["compskip"]["ne"] - d["full"]["ne"]}
    res[ds] = d
for ds in ("kaggle", "long"):
    t = {k: [rep(f"time_{ds}_{k}_{i}")["run"]["train_seconds"] for i in range(1, reps + 1)] for k in ("base", "full", "compskip")}
    med = {k: statistics.median(v) for k, v in t.items()}
    fl = {k: rep(f"time_{ds}_{k}_1")["seq"]["forward_flops_per_example"] / 1e6 for k in ("full", "compskip")}
    ev = rep(f"time_{ds}_full_1")["seq"]["events_per_example"]
    tower = {k: med[k] - med["base"] for k in ("full", "compskip")}
    res[f"speed_{ds}"] = {
        "rows": rep(f"time_{ds}_base_1")["run"]["examples"], "events_per_example": ev, "train_s": t, "median_s": med,
        "tower_mflop_per_example": fl,
        "compskip_tower_flops_saved": 1 - fl["compskip"] / fl["full"],
        "compskip_train_time_saved": 1 - med["compskip"] / med["full"],
        "compskip_tower_time_saved": 1 - tower["compskip"] / tower["full"] if tower["full"] > 0 else None,
    }
res["compskip_minus_full_auc"] = {ds: res[ds]["compskip_minus_full"]["auc"] for ds in ("kaggle", "small")}
print(json.dumps(res))
PYEOF

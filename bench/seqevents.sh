#!/usr/bin/env bash
# bench/seqevents.sh - issue 4's event-level personalization figures (docs/BENCHMARKS.md,
# "Issue 4: event-level personalization"): Kunlun's per-event-type sub-towers
# (--seq-events) against the shared sequence tower at similar or lower FLOPs.
#   1. data: `ember gen --seq-len-mean MEAN --seed SEED --cardinality SMALL_CARD` (ROWS
#      training rows, TEST_ROWS test rows; C10 of 1,000 ids holds the candidate; event
#      types 0/1/2 = click/cart/order drawn 85/10/5%) twice: "default" (the planted
#      history term weighs the types 1, 2, 3) and "typed" (--seq-type-weights TYPED_W:
#      an order says 24x what a click says); each converted to binary with and without
#      the history column;
#   2. quality, per dataset, one epoch each (as bench/seqmodel.sh): the Kaggle DLRM (D=16,
#      13-512-256-64-16, top (width)-512-256-1), batch 2048, AdaGrad + row-wise AdaGrad lr
#      LR, THREADS threads, --seq-share C10 --seq-max 64, 2 heads:
#        base      no history
#        cs        the shared tower, --seq-blocks compskip:2
#        full      the shared tower, --seq-blocks full:2
#        ev        --seq-events EV        (carts + orders wide and deep, clicks narrow)
#        ev16      --seq-events EV16      (the same at width D)
#        evdrop    --seq-events EVDROP    (carts + orders only: clicks dropped)
#      and, on "typed", cs and ev16 again with --seed 2 and 3 (other initialisations);
#      test AUC / NE beside the planted optimum, the tower's forward FLOPs per example
#      (seqtower.c counts them) and the whole model's (MLPs + interaction + tower);
#   3. speed: base, cs and ev16 alternated REPS times on the first TIME_ROWS rows of "typed"
#      (training seconds from report.json and the process's CPU seconds; medians; the
#      1-minute load average before each run is recorded: the machine is shared).
# Takes ~30-60 minutes on 2 shared cores. RESUME=1 skips runs whose report.json exists.
# Last line of stdout: one JSON object.
# Env: OUT (default bench/out/seqevents), BUILD (default build), ROWS (500000), TEST_ROWS
# (50000), SEED (3), MEAN (20), LR (0.006), THREADS (2), REPS (3), TIME_ROWS (200000),
# TYPED_W (0.25,1,6), EV, EV16, EVDROP, SMALL_CARD.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/seqevents}
BUILD=${BUILD:-build}
ROWS=${ROWS:-500000}
TEST_ROWS=${TEST_ROWS:-50000}
SEED=${SEED:-3}
MEAN=${MEAN:-20}
LR=${LR:-0.006}
THREADS=${THREADS:-2}
REPS=${REPS:-3}
TIME_ROWS=${TIME_ROWS:-200000}
TYPED_W=${TYPED_W:-0.25,1,6}
EV=${EV:-"1,2:w32:h4:full:2;0:w8:h1:swa:4"}
EV16=${EV16:-"1,2:w16:h2:full:2;0:w8:h1:swa:4"}
EVDROP=${EVDROP:-"1,2:w32:h4:full:2"}
SMALL_CARD=${SMALL_CARD:-9,12,30,5,40,3,8,25,4,1000,7,11,20,6,15,50,3,9,13,4,35,6,10,18,5,22}
RESUME=${RESUME:-0}
PY=/usr/bin/python3
mkdir -p "$OUT"
[[ -x $BUILD/ember ]] || scripts/build.sh "$BUILD"
EMBER=$BUILD/ember
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

# 1. data (kept between runs when the generator's arguments are the same)
make_data() { # dir, extra gen arguments
  local D=$1; shift
  local want="gen --rows $ROWS --test-rows $TEST_ROWS --seed $SEED --seq-len-mean $MEAN --cardinality $SMALL_CARD $*"
  if [[ -f $D/STAMP && "$(cat "$D/STAMP")" == "$want" && -f $D/test.prob ]]; then return; fi
  rm -rf "$D"
  log "ember $want"
  $EMBER $want --out "$D" >&2
  $EMBER convert --seq 1 "$D/train.tsv" "$D/train.bin" >&2
  $EMBER convert --seq 1 "$D/test.tsv" "$D/test.bin" >&2
  cut -f1-40 "$D/train.tsv" > "$D/train0.tsv"
  cut -f1-40 "$D/test.tsv" > "$D/test0.tsv"
  $EMBER convert "$D/train0.tsv" "$D/train0.bin" >&2
  $EMBER convert "$D/test0.tsv" "$D/test0.bin" >&2
  rm -f "$D/train.tsv" "$D/test.tsv" "$D/train0.tsv" "$D/test0.tsv"
  echo "$want" > "$D/STAMP"
}
make_data "$OUT/data_default"
make_data "$OUT/data_typed" --seq-type-weights "$TYPED_W"

common=(--rows "$SMALL_CARD" --batch 2048 --dense-opt adagrad --sparse-opt rowwise_adagrad --lr "$LR" --threads "$THREADS" --quiet)
seqopt=(--seq-share C10 --seq-max 64)
train() { # name, then ember train arguments
  local name=$1; shift
  if [[ $RESUME == 1 && -f $OUT/$name/report.json ]]; then return; fi
  log "train $name: $*"
  echo "load_before $(cut -d' ' -f1 /proc/loadavg)" > "$OUT/$name.load"
  # the process's CPU seconds too: on a loaded machine they move far less than wall time
  ( TIMEFORMAT='cpu %U %S wall %R'; time $EMBER train "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1 ) 2> "$OUT/$name.time" ||
    { cat "$OUT/$name.log" >&2; exit 1; }
  grep -E "^(test|optimum|sequence tower:)" "$OUT/$name.log" >&2 || true
}
model() { # name, data dir, kind [, extra arguments]
  local name=$1 D=$2 kind=$3; shift 3
  local io=(--train "$D/train.bin" --test "$D/test.bin" --test-prob "$D/test.prob")
  case $kind in
    base) train "$name" --train "$D/train0.bin" --test "$D/test0.bin" --test-prob "$D/test.prob" "${common[@]}" "$@" ;;
    cs|full) train "$name" "${io[@]}" "${common[@]}" "${seqopt[@]}" --seq-blocks "$([[ $kind == cs ]] && echo compskip || echo full):2" "$@" ;;
    ev) train "$name" "${io[@]}" "${common[@]}" "${seqopt[@]}" --seq-events "$EV" "$@" ;;
    ev16) train "$name" "${io[@]}" "${common[@]}" "${seqopt[@]}" --seq-events "$EV16" "$@" ;;
    evdrop) train "$name" "${io[@]}" "${common[@]}" "${seqopt[@]}" --seq-events "$EVDROP" "$@" ;;
  esac
}

# 2. quality
for ds in typed default; do
  for kind in base cs full ev ev16 evdrop; do model "${ds}_$kind" "$OUT/data_$ds" $kind; done
done
for s in 2 3; do
  for kind in cs ev16; do model "typed_${kind}_seed$s" "$OUT/data_typed" $kind --seed "$s"; done
done

# 3. speed, alternating (no evaluation: training seconds only)
for r in $(seq "$REPS"); do
  for kind in base cs ev16; do
    D=$OUT/data_typed
    case $kind in
      base) train "time_${kind}_$r" --train "$D/train0.bin" --train-limit "$TIME_ROWS" "${common[@]}" ;;
      cs) train "time_${kind}_$r" --train "$D/train.bin" --train-limit "$TIME_ROWS" "${common[@]}" "${seqopt[@]}" --seq-blocks compskip:2 ;;
      ev16) train "time_${kind}_$r" --train "$D/train.bin" --train-limit "$TIME_ROWS" "${common[@]}" "${seqopt[@]}" --seq-events "$EV16" ;;
    esac
  done
done

# summary
$PY - "$OUT" "$REPS" <<'PYEOF'
import json, os, statistics, sys
out, reps = sys.argv[1], int(sys.argv[2])
rep = lambda n: json.load(open(os.path.join(out, n, "report.json")))
def cpu(n):
    """user + system CPU seconds of the whole run (reading, training, checkpoint)"""
    try:
        f = open(os.path.join(out, n + ".time")).read().split()
        return round(float(f[1]) + float(f[2]), 2)
    except (OSError, IndexError, ValueError):
        return None
def load(n):
    try:
        return float(open(os.path.join(out, n + ".load")).read().split()[1])
    except OSError:
        return None
def model_mflop(r):
    """Forward MFLOP per example: MLPs (2 in out per layer), the dot interaction (2 D per
    pair of the F vectors), the tower (its own count)."""
    m = r["model"]
    mlp = sum(2 * a * b for s in (m["bot"], m["top"]) for a, b in zip(s[:-1], s[1:]))
    D = m["dim"]  # top[0] = D + F (F + 1) / 2: solve for F
    F = round((-1 + (1 + 8 * (m["top"][0] - D)) ** 0.5) / 2)
    inter = 2 * D * F * (F + 1) / 2
    tower = r["seq"]["forward_flops_per_example"] if "seq" in r else 0
    return (mlp + inter + tower) / 1e6
res = {}
for ds in ("typed", "default"):
    d = {"optimum": {k: rep(f"{ds}_base")["optimum"][k] for k in ("auc", "ne")}}
    for n in ("base", "cs", "full", "ev", "ev16", "evdrop"):
        r = rep(f"{ds}_{n}")
        d[n] = {"auc": r["test"]["auc"], "ne": r["test"]["ne"], "train_s": r["run"]["train_seconds"],
                "model_mflop_per_example": round(model_mflop(r), 4)}
        if "seq" in r:
            d[n]["tower_mflop_per_example"] = round(r["seq"]["forward_flops_per_example"] / 1e6, 4)
            q = r["model"]["seq"]
            d[n]["tower"] = q.get("events", q["blocks"])
        m = r["model"]
        d[n]["tower_vectors"] = round((-1 + (1 + 8 * (m["top"][0] - m["dim"])) ** 0.5) / 2) - len(m["rows"])
    for e in ("ev", "ev16"):
        d[f"{e}_minus_cs"] = {"auc": d[e]["auc"] - d["cs"]["auc"], "ne": d[e]["ne"] - d["cs"]["ne"],
                              "tower_flops_ratio": d[e]["tower_mflop_per_example"] / d["cs"]["tower_mflop_per_example"],
                              "model_flops_ratio": (d[e]["model_mflop_per_example"]) / d["cs"]["model_mflop_per_example"]}
    res[ds] = d
seeds = {n: [{"auc": res["typed"][n]["auc"], "ne": res["typed"][n]["ne"]}] +
         [{"auc": rep(f"typed_{n}_seed{s}")["test"]["auc"], "ne": rep(f"typed_{n}_seed{s}")["test"]["ne"]} for s in (2, 3)]
         for n in ("cs", "ev16")}
res["typed_seeds_1_2_3"] = seeds
res["typed_seed_mean"] = {n: {k: statistics.mean(x[k] for x in v) for k in ("auc", "ne")} for n, v in seeds.items()}
t = {k: [rep(f"time_{k}_{i}")["run"]["train_seconds"] for i in range(1, reps + 1)] for k in ("base", "cs", "ev16")}
med = {k: statistics.median(v) for k, v in t.items()}
c = {k: [cpu(f"time_{k}_{i}") for i in range(1, reps + 1)] for k in ("base", "cs", "ev16")}
cmed = {k: statistics.median(v) if None not in v else None for k, v in c.items()}
res["speed_typed"] = {"rows": rep("time_base_1")["run"]["examples"], "train_s": t, "median_s": med,
                      "cpu_s": c, "median_cpu_s": cmed,
                      "ev16_tower_cpu_vs_cs": (cmed["ev16"] - cmed["base"]) / (cmed["cs"] - cmed["base"])
                      if None not in cmed.values() and cmed["cs"] > cmed["base"] else None,
                      "load_before": {k: [load(f"time_{k}_{i}") for i in range(1, reps + 1)] for k in t},
                      "ev16_tower_time_vs_cs": (med["ev16"] - med["base"]) / (med["cs"] - med["base"])
                      if med["cs"] > med["base"] else None}
print(json.dumps(res))
PYEOF

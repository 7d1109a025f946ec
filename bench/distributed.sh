#!/usr/bin/env bash
# bench/distributed.sh - reproduces issue 6's figures from a fresh build (not part of the
# test suite; ~15 minutes on 2 cores). Last line of stdout: one JSON object.
#   1. bytes moved per step on 4 ranks: the Kaggle DLRM (Kaggle cardinalities, D=16) on
#      the planner's placement (--sharding auto), batch PER_RANK per rank, against the
#      planner's model: per rank, the forward all-to-all bytes leaving it (planner
#      send_r), the backward ones (planner recv_r: what it receives forward is what it
#      sends back), and the all-reduce of the dense and data-parallel tables' gradients
#      (a reduce-scatter + all-gather sends 2 (N-1)/N of the payload); the ids' input
#      all-to-all is not in the planner's model and is reported apart;
#   2. `ember plan --simulate`: 1D against 2D from 8 to 4,096 ranks (docs/PLANNER.md);
#   3. quality: the same data trained on 2 ranks with fp32, fp16 and bf16 all-to-all,
#      and on 4 ranks in 1D against 2D (2 replica groups of 2, averaged every 1 and 8
#      steps, momentum-scaled row-wise AdaGrad), test AUC beside one process;
#   4. throughput on this 2-core machine: one process with 2 threads against 2 ranks
#      with 1 thread each, the same global batch;
#   5. the dense all-reduce in buckets overlapped with the backward (--bucket-kb 512,
#      3 buckets for this model) against one bucket after it (--bucket-kb 0): 2 ranks x
#      1 thread, alternating, OVL_REPS times each; per run the throughput and each
#      rank's mean dense-backward time and exposed all-reduce wait (report.json).
# Env: OUT (default bench/out/distributed), ROWS (training rows, default 300000),
# PER_RANK (default 512), STEPS (bytes run, default 20), SKIP_QUALITY=1, OVL_REPS
# (default 3), PARTS (default "bytes simulate quality throughput overlap").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/distributed}
ROWS=${ROWS:-300000}
PER_RANK=${PER_RANK:-512}
STEPS=${STEPS:-20}
OVL_REPS=${OVL_REPS:-3}
PARTS=${PARTS:-bytes simulate quality throughput overlap}
part() { [[ " $PARTS " == *" $1 "* ]]; }
mkdir -p "$OUT"
scripts/deps.sh
scripts/build.sh build >&2
EMBER=build/ember
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
# ember re-executes itself with the right OpenBLAS kernels; give mpirun's ranks the same
# ember's pick for this CPU (src/core/blas.c) even when the environment carries an
# OPENBLAS_CORETYPE (a machine may set a common one, e.g. Haswell on an AVX-512 CPU,
# which cuts sgemm and the PyTorch peer by a third); BLAS_CORE=NAME chooses
OPENBLAS_CORETYPE=${BLAS_CORE:-$(env -u OPENBLAS_CORETYPE $EMBER version | sed -n 's/^blas_core=//p')}
export OPENBLAS_CORETYPE
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
mp() { local np=$1; shift; mpirun --oversubscribe -np "$np" "$EMBER" "$@"; }

D="$OUT/data"
if [[ ! -f "$D/DONE_$ROWS" ]]; then
  log "generating $ROWS training rows + 50k test rows (Kaggle cardinalities)"
  $EMBER gen --out "$D" --rows "$ROWS" --test-rows 50000 --seed 5 > /dev/null
  touch "$D/DONE_$ROWS"
fi

# 1. bytes per step against the planner
if part bytes; then
log "bytes: 4 ranks, planner placement, batch $PER_RANK per rank, $STEPS steps"
mp 4 train --train "$D/train.tsv" --batch "$PER_RANK" --threads 1 --max-steps "$STEPS" --sharding auto \
  --dense-opt adagrad --sparse-opt rowwise_adagrad --lr 0.006 --out "$OUT/bytes" --quiet > "$OUT/bytes.out"
cp "$OUT/bytes/report.json" "$OUT/bytes.json"
fi

# 2. the planner's simulation
if part simulate; then $EMBER plan --simulate > "$OUT/simulate.txt"; fi

# 3. quality
common=(--train "$D/train.tsv" --test "$D/test.tsv" --test-prob "$D/test.prob" --dense-opt adagrad
        --sparse-opt rowwise_adagrad --lr 0.006 --quiet)
if [[ -z "${SKIP_QUALITY:-}" ]] && part quality; then
  log "quality: one process, global batch 1024"
  $EMBER train "${common[@]}" --batch 1024 --threads 2 --out "$OUT/q_one" > "$OUT/q_one.out"
  for p in fp32 fp16 bf16; do
    log "quality: 2 ranks, $p all-to-all"
    mp 2 train "${common[@]}" --batch 512 --threads 1 --comm-prec "$p" --out "$OUT/q_2_$p" > "$OUT/q_2_$p.out"
  done
  log "quality: 4 ranks 1D"
  mp 4 train "${common[@]}" --batch 256 --threads 1 --out "$OUT/q_4_1d" > "$OUT/q_4_1d.out"
  for k in 1 8; do
    log "quality: 4 ranks 2D (2 groups of 2), sync every $k"
    mp 4 train "${common[@]}" --batch 256 --threads 1 --group 2 --sync-every "$k" --out "$OUT/q_4_2d_k$k" > "$OUT/q_4_2d_k$k.out"
  done
fi

# 4. throughput, the same global batch, 100k rows
if part throughput; then
log "throughput: one process 2 threads vs 2 ranks x 1 thread"
$EMBER train --train "$D/train.tsv" --train-limit 100000 --batch 1024 --threads 2 --quiet --out "$OUT/t_one" > "$OUT/t_one.out"
mp 2 train --train "$D/train.tsv" --train-limit 100000 --batch 512 --threads 1 --quiet --out "$OUT/t_2" > "$OUT/t_2.out"
fi

# 5. bucketed all-reduce overlapped with the backward, against one bucket after it
if part overlap; then
  for r in $(seq 1 "$OVL_REPS"); do
    for kb in 0 512; do
      log "overlap: 2 ranks x 1 thread, --bucket-kb $kb, round $r (load $(cut -d' ' -f1 /proc/loadavg))"
      mp 2 train --train "$D/train.tsv" --train-limit 100000 --batch "$PER_RANK" --threads 1 --bucket-kb "$kb" \
        --dense-opt adagrad --sparse-opt rowwise_adagrad --lr 0.006 --quiet --out "$OUT/ovl_${kb}_$r" > "$OUT/ovl_${kb}_$r.out"
      echo "{\"kb\":$kb,\"round\":$r,\"load\":$(cut -d' ' -f1 /proc/loadavg),\"report\":$(cat "$OUT/ovl_${kb}_$r/report.json")}" >> "$OUT/overlap.jsonl"
      rm -f "$OUT/ovl_${kb}_$r/"*.safetensors
    done
  done
fi

python3 - "$OUT" <<'EOF'
import json, os, re, statistics, sys
out = sys.argv[1]
res = {}
if os.path.exists(os.path.join(out, "bytes.json")):
    r = json.load(open(os.path.join(out, "bytes.json")))
    N = r["world"]
    pl = r.get("planner", {})
    rows = []
    ar_model = pl["allreduce_payload"] * 2 * (N - 1) / N  # dense + data-parallel tables, reduce-scatter + all-gather
    for q, b in enumerate(r["bytes_per_step"]):
        ps, pr = pl["send"][q], pl["recv"][q]
        ar = b["allreduce"] + b["dp"]
        meas = b["pooled"] + b["grads"] + ar
        model = ps + pr + ar_model
        rows.append({"rank": q, "fwd": b["pooled"], "plan_send": ps, "bwd": b["grads"], "plan_recv": pr,
                     "fwd_err": (b["pooled"] - ps) / ps if ps else None, "bwd_err": (b["grads"] - pr) / pr if pr else None,
                     "allreduce": ar, "plan_allreduce": ar_model, "allreduce_err": (ar - ar_model) / ar_model,
                     "total": meas, "plan_total": model, "total_err": (meas - model) / model,
                     "ids_not_modelled": b["ids"]})
    tot_fwd = sum(x["fwd"] for x in rows); tot_plan = sum(x["plan_send"] for x in rows)
    types = [p["type"] for p in r["placement"]]
    res["bytes"] = {"world": N, "batch_per_rank": r["batch_per_rank"], "placement": {t: types.count(t) for t in set(types)},
                    "ranks": rows, "max_abs_total_err": max(abs(x["total_err"]) for x in rows),
                    "total_fwd": tot_fwd, "total_plan": tot_plan}
def rep(name):
    p = os.path.join(out, name, "report.json")
    return json.load(open(p)) if os.path.exists(p) else None
def auc_one():
    t = open(os.path.join(out, "q_one.out")).read() if os.path.exists(os.path.join(out, "q_one.out")) else ""
    m = re.search(r"^test\s+AUC ([0-9.]+)", t, re.M); o = re.search(r"^optimum\s+AUC ([0-9.]+)", t, re.M)
    return (float(m.group(1)) if m else None, float(o.group(1)) if o else None)
q = {}
a1, opt = auc_one()
if a1 is not None: q["one_process"] = a1; q["optimum"] = opt
for n in ["q_2_fp32", "q_2_fp16", "q_2_bf16", "q_4_1d", "q_4_2d_k1", "q_4_2d_k8"]:
    x = rep(n)
    if x and x.get("test"): q[n] = x["test"]["auc"]
if q: res["quality_auc"] = q
if os.path.exists(os.path.join(out, "t_one.out")):
    t1 = open(os.path.join(out, "t_one.out")).read()
    m = re.search(r"\(([0-9.]+) examples/s\)", t1)
    t2 = rep("t_2")
    res["throughput"] = {"one_process_2threads": float(m.group(1)) if m else None,
                         "two_ranks_1thread": t2["examples_per_s"] if t2 else None}
if os.path.exists(os.path.join(out, "overlap.jsonl")):
    runs = [json.loads(l) for l in open(os.path.join(out, "overlap.jsonl")) if l.strip()]
    ov = {}
    for kb in sorted({x["kb"] for x in runs}):
        xs = [x for x in runs if x["kb"] == kb]
        med = lambda f: statistics.median(f(x) for x in xs)
        ov["bucket_kb_%d" % kb] = {
            "runs": len(xs), "buckets": xs[0]["report"].get("allreduce_buckets"),
            "examples_per_s": med(lambda x: x["report"]["examples_per_s"]),
            "dense_backward_ms": med(lambda x: max(t["dense_backward"] for t in x["report"]["seconds_per_step"]) * 1e3),
            "allreduce_wait_ms": med(lambda x: max(t["allreduce_wait"] for t in x["report"]["seconds_per_step"]) * 1e3),
            "load": [x["load"] for x in xs]}
    res["overlap"] = ov
print(json.dumps(res))
EOF

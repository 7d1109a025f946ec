#!/usr/bin/env bash
# bench/exfm.sh - reproduces issue 5's streaming / ExFM figures (docs/BENCHMARKS.md,
# "Issue 5: streaming and ExFM") from a fresh build:
#   1. data, per seed: `ember gen --drift --rows ROWS --windows GEN_WINDOWS --seed SEED`
#      (3 verticals sharing 0.5/0.3/0.2 of the traffic, ids churning, per-id weights
#      rotating), converted to ember binary (stream.bin beside its stream.side sidecar);
#   2. the pipeline, per seed: `ember exfm` - the teacher (D=16, 13-128-64-16, top
#      (w)-128-64-1, 200k rows per table plus a 3-row table holding the example's
#      vertical, a product feature; options TEACHER, by default Adam lr 0.001 for the
#      dense part and AdaGrad lr 0.1 for the tables: docs/BENCHMARKS.md) streams all
#      verticals in windows of WINDOW
#      examples, each evaluated before training (progressive), logging every
#      prediction to teacher.das; then for each vertical 0..2 and each mode a student
#      (D=8, 13-32-8, top (w)-32-1, 50k rows per table) streams its own vertical from
#      position STUDENT_FROM on (the teacher has that much history when the students
#      start), joined with the log:
#        none          the student alone
#        serving       + distillation into its serving head
#        aux           + the auxiliary distillation head (beta-scaled into the backbone)
#        aux+adapter   + the student adapter's target
#      AdaGrad (dense and sparse), lr LR, batch 128, THREADS threads, extra student
#      options STUDENT (e.g. "--distill-weight 2"); PAR seeds run at once;
#   3. figures: per student and mode the progressive NE over its whole stream and over
#      the second half of its windows, mean and std over the seeds, and the paired
#      (same seed) NE change against the student alone;
#   4. overhead, on the first seed's data, student of vertical OVH_V, REPS alternations:
#      the plain student (`ember stream --vertical V`, no log) against the ExFM student
#      (`--teacher-log --distill aux+adapter`), wall time of reading + evaluation +
#      training + join; plus the teacher's logging time (appending + fsync) pro rata
#      of the student's examples.
# Defaults are the issue's size (3M examples per seed, 3 seeds); ~25 min on 2 cores
# shared with other jobs (load average ~10). Last line of stdout: one JSON object.
# Env: OUT (bench/out/exfm), BUILD (build), ROWS (3000000), GEN_WINDOWS (30),
# WINDOW (50000), SEEDS ("1 2 3"), STUDENT_FROM (ROWS/3), LR (0.05: students),
# TEACHER ("--teacher-dense-opt adam --teacher-dense-lr 0.001 --teacher-sparse-lr 0.1
# --teacher-vertical-feature 3"),
# STUDENT (""), THREADS (1), PAR (3), OVH_V (2), REPS (3), MODES (none,serving,aux,aux+adapter).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/exfm}
BUILD=${BUILD:-build}
ROWS=${ROWS:-3000000}
GEN_WINDOWS=${GEN_WINDOWS:-30}
WINDOW=${WINDOW:-50000}
SEEDS=${SEEDS:-"1 2 3"}
STUDENT_FROM=${STUDENT_FROM:-$((ROWS / 3))}
LR=${LR:-0.05}
TEACHER=${TEACHER:-"--teacher-dense-opt adam --teacher-dense-lr 0.001 --teacher-sparse-lr 0.1 --teacher-vertical-feature 3"}
STUDENT=${STUDENT:-""}
THREADS=${THREADS:-1}
PAR=${PAR:-3}
OVH_V=${OVH_V:-2}
REPS=${REPS:-3}
MODES=${MODES:-none,serving,aux,aux+adapter}
PY=/usr/bin/python3
mkdir -p "$OUT"
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build "$BUILD" -j"$(nproc)" --target ember_cli >&2
EMBER=$BUILD/ember
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

# 1. data (kept between runs when the generator's arguments are the same)
make_data() { # dir, seed
  local D=$1 seed=$2
  local want="gen --drift --rows $ROWS --windows $GEN_WINDOWS --seed $seed"
  if [[ -f $D/STAMP && "$(cat "$D/STAMP")" == "$want" && -f $D/stream.bin ]]; then return; fi
  rm -rf "$D"
  log "ember $want"
  $EMBER gen --drift --out "$D" --rows "$ROWS" --windows "$GEN_WINDOWS" --seed "$seed" >&2
  $EMBER convert "$D/stream.tsv" "$D/stream.bin" >&2
  rm -f "$D/stream.tsv"
  echo "$want" > "$D/STAMP"
}

common=(--window "$WINDOW" --batch 128 --dense-opt adagrad --sparse-opt adagrad --lr "$LR" --threads "$THREADS" --quiet)

# 2. the pipeline per seed (resumable: a finished run is reused). The seeds' pipelines
# run as PAR concurrent processes of THREADS threads each: the models are small, and one
# thread per process beats a 2-thread pool per process by 2-3x here (results are bitwise
# the same for any thread count, so this changes timings only).
for s in $SEEDS; do make_data "$OUT/data_s$s" "$s"; done
run_seed() { # seed
  local s=$1 R=$OUT/run_s$1
  local want="exfm rows $ROWS window $WINDOW from $STUDENT_FROM lr $LR teacher $TEACHER student $STUDENT modes $MODES seed $s"
  if [[ -f $R.json && -f $R/STAMP && "$(cat "$R/STAMP")" == "$want" ]] && tail -1 "$R.json" | grep -q '"students"'; then
    log "reusing $R.json"; return
  fi
  rm -rf "$R"; mkdir -p "$R"; echo "$want" > "$R/STAMP"
  log "ember exfm seed $s"
  # shellcheck disable=SC2086 # TEACHER and STUDENT are lists of options
  $EMBER exfm --data "$OUT/data_s$s/stream.bin" --out "$R" --students 3 --modes "$MODES" --student-from "$STUDENT_FROM" \
    $TEACHER $STUDENT --seed "$s" "${common[@]}" > "$R.json"
  log "seed $s done: $(tail -c 200 "$R.json")"
  rm -f "$R"/*/checkpoint.safetensors # the figures need windows.jsonl only
}
pids=()
for s in $SEEDS; do
  while (( $(jobs -rp | wc -l) >= PAR )); do sleep 2; done
  run_seed "$s" & pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done

# 4. overhead of logging + joining against the plain student
first=${SEEDS%% *}
D=$OUT/data_s$first
student=(--rows-cap 50000 --dim 8 --bot 13-32-8 --top 359-32-1 --seed "$first" --vertical "$OVH_V" --from "$STUDENT_FROM")
: > "$OUT/overhead.jsonl"
for r in $(seq 1 "$REPS"); do
  for kind in plain exfm; do
    rm -rf "$OUT/ovh_$kind"
    extra=()
    # shellcheck disable=SC2206
    [[ $kind == exfm ]] && extra=(--teacher-log "$OUT/run_s$first/teacher.das" --distill aux+adapter $STUDENT)
    log "overhead rep $r: $kind"
    $EMBER stream --data "$D/stream.bin" --out "$OUT/ovh_$kind" "${common[@]}" "${student[@]}" "${extra[@]}" |
      sed "s/^{/{\"kind\":\"$kind\",\"rep\":$r,/" >> "$OUT/overhead.jsonl"
  done
done

# 3. + 4. summary: the last line is one JSON object
$PY - "$OUT" "$SEEDS" "$MODES" "$ROWS" "$WINDOW" "$STUDENT_FROM" "$OVH_V" <<'EOF'
import json, math, statistics, sys
out, seeds, modes = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(",")
rows, window, sfrom, ovh_v = map(int, sys.argv[4:8])
runs = {s: json.loads(open(f"{out}/run_s{s}.json").read().strip().splitlines()[-1]) for s in seeds}
def ms(xs):
    return {"mean": round(statistics.mean(xs), 6), "std": round(statistics.stdev(xs), 6) if len(xs) > 1 else 0.0}
res = {"rows": rows, "window": window, "student_from": sfrom, "seeds": [int(s) for s in seeds], "students": {}}
res["teacher"] = {k: ms([runs[s]["teacher"][k] for s in seeds]) for k in ("ne", "ne_second_half", "auc")}
print("teacher   NE %.4f +- %.4f" % (res["teacher"]["ne"]["mean"], res["teacher"]["ne"]["std"]), file=sys.stderr)
for v in range(3):
    st = {}
    for m in modes:
        per = [runs[s]["students"][v][m] for s in seeds]
        d = {k: ms([p[k] for p in per]) for k in ("ne", "ne_second_half", "auc")}
        d["ne_per_seed"] = [round(p["ne"], 6) for p in per]
        if m != "none":
            base = [runs[s]["students"][v]["none"] for s in seeds]
            for k in ("ne", "ne_second_half"):
                diffs = [100 * (p[k] - b[k]) / b[k] for p, b in zip(per, base)]
                d["delta_pct_" + k] = ms(diffs)  # negative: better than alone
        st[m] = d
        print("vertical %d %-12s NE %.4f +- %.4f  second half %.4f +- %.4f%s" % (
            v, m, d["ne"]["mean"], d["ne"]["std"], d["ne_second_half"]["mean"], d["ne_second_half"]["std"],
            "" if m == "none" else "  vs alone %+.3f%% +- %.3f%%" % (d["delta_pct_ne"]["mean"], d["delta_pct_ne"]["std"])),
            file=sys.stderr)
    # the teacher's progressive NE on this student's own examples (the join's report):
    # how much better than the student alone the teacher is where the student serves
    tne = []
    for s in seeds:
        n = ll = ck = 0.0
        for line in open(f"{out}/run_s{s}/v{v}-{modes[0]}/windows.jsonl"):
            w = json.loads(line)
            t = w["teacher"]["eval"]
            n += t["n"]; ll += t["n"] * t["logloss"]; ck += t["n"] * t["ctr"]
        p = ck / n
        tne.append(ll / n / -(p * math.log(p) + (1 - p) * math.log(1 - p)))
    st["teacher_on_stream"] = {"ne": ms(tne), "ne_per_seed": [round(x, 6) for x in tne]}
    print("vertical %d teacher on its stream NE %.4f +- %.4f" % (v, st["teacher_on_stream"]["ne"]["mean"],
          st["teacher_on_stream"]["ne"]["std"]), file=sys.stderr)
    res["students"][str(v)] = st
ov = [json.loads(l) for l in open(f"{out}/overhead.jsonl")]
def tot(r): return r["train_s"] + r["eval_s"] + r["read_s"] + r["join_s"]
plain = [tot(r) for r in ov if r["kind"] == "plain"]
ex = [r for r in ov if r["kind"] == "exfm"]
t = runs[seeds[0]]["teacher"]
log_share = t["log_s"] * (ex[0]["examples"] / t["examples"]) if ex and t["examples"] else 0.0
pm, em = statistics.median(plain), statistics.median([tot(r) for r in ex])
res["overhead"] = {"vertical": ovh_v, "plain_s": round(pm, 3), "exfm_s": round(em, 3),
                   "join_s": round(statistics.median([r["join_s"] for r in ex]), 3),
                   "teacher_log_s_share": round(log_share, 3), "teacher_log_s_total": round(t["log_s"], 3),
                   "overhead_pct": round(100 * (em + log_share - pm) / pm, 2),
                   "join_pct": round(100 * statistics.median([r["join_s"] for r in ex]) / pm, 2)}
print("overhead: plain %.1f s, exfm %.1f s (join %.2f s), teacher logging share %.2f s: %+.1f%%" % (
    pm, em, res["overhead"]["join_s"], log_share, res["overhead"]["overhead_pct"]), file=sys.stderr)
print(json.dumps(res, separators=(",", ":")))
EOF

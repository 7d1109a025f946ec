#!/usr/bin/env bash
# bench/embedding_store.sh - issue 3's figures (docs/BENCHMARKS.md "Issue 3: embedding
# store") from a fresh build. Sections, each writing $OUT/<section>.json (one JSON
# object) and run in order; the last line on stdout joins them: {"<section>": {...}, ...}.
#   fiited   `ember gen` data (1M training rows, 100k test rows, Kaggle cardinalities
#            capped at 1M rows per table), D=64, batch 2048, AdaGrad / row-wise AdaGrad:
#            the full-dimension dense model; FIITED at several budgets (memory-vs-AUC);
#            row-level pruning (a dynamic table evicting the least frequently used rows)
#            at the memory each FIITED run ended with. Memory is what the tables hold
#            (`ember inspect --json`: weights, optimizer state, metadata, hash) and the
#            process's resident set at the end of training (VmRSS, after the last prune).
#   dynamic  `ember gen --drift` stream (1M rows, 30 windows, 5% of each field's ids
#            replaced per window): lookups + fused updates of a dynamic table under a
#            byte budget against the dense table on the same batches (bench/embstore_ops.c,
#            outside the model), memory against the budget, a checkpoint round trip that
#            must keep every id; and `ember train --tables dynamic` end to end on it.
#   ssd      the SSD tier (bench/embedding_store_ssd.sh, in $OUT/ssd): `ember gen` data (1M
#            rows, Kaggle cardinalities, Zipf ids), D=16, batch 2048, row-wise AdaGrad:
#            --tables ssd whose tables take 4x the run's embedding memory limit (row
#            cache + RocksDB's caches) against --tables dynamic with every row in memory,
#            runs alternated: test AUC, throughput ratio, cache hit rate, RSS.
#   (more sections append below: write $OUT/<name>.json, add the name)
# Takes ~35-40 min on 2 cores; not part of the test suite.
# Env: OUT (default bench/out/embedding_store), BUILD (default build-bench-es),
#      SECTIONS (default "fiited dynamic"), FRACS (FIITED budgets as fractions; 1 = unpruned),
#      PRUNE_EVERY (default 50), THREADS (default 2), KEEP=1 keeps the runs' checkpoints,
#      RERUN=1 repeats runs already recorded in $OUT/runs (by default they are kept, so
#      more budgets can be added to the curve later: FRACS="0.2" bench/embedding_store.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/embedding_store}
BUILD=${BUILD:-build-bench-es}
SECTIONS=${SECTIONS:-"fiited dynamic ssd"}
FRACS=${FRACS:-"1 0.1 0.05 0.03"}
PRUNE_EVERY=${PRUNE_EVERY:-50}
THREADS=${THREADS:-2}
mkdir -p "$OUT"
scripts/build.sh "$BUILD"
EMBER=$BUILD/ember
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
jnum() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval('d'+sys.argv[2]))" "$@"; }

# One `ember train` run: name, then train flags. Leaves $OUT/runs/<name>/{report.json,
# train.log,inspect.json} and $OUT/runs/<name>.json: AUC, NE, table bytes, RSS, speed.
train_run() {
  local name=$1; shift
  local d=$OUT/runs/$name
  if [[ -z "${RERUN:-}" && -s $OUT/runs/$name.json ]]; then log "train $name: recorded"; return; fi
  mkdir -p "$d"
  log "train $name: $*"
  "$EMBER" train --out "$d" --quiet --threads "$THREADS" "$@" > "$d/train.log" 2>&1
  "$EMBER" inspect --json "$d/checkpoint.safetensors" > "$d/inspect.json"
  python3 - "$d" "$name" > "$OUT/runs/$name.json" <<'EOF'
import json, re, sys
d, name = sys.argv[1], sys.argv[2]
rep = json.load(open(d + "/report.json")); ins = json.load(open(d + "/inspect.json"))
log = open(d + "/train.log").read()
m = re.search(r"peak RSS (\d+) MB, now (\d+) MB", log)
allt = ins["per_table"][-1]
test = rep.get("test") or {}  # null without --test (the drift stream)
print(json.dumps({"name": name, "kind": ins["kind"], "auc": test.get("auc"), "ne": test.get("ne"),
                  "optimum_auc": rep["optimum"]["auc"] if rep.get("optimum") else None,
                  "table_bytes": allt["bytes"], "table_rows": allt["rows"], "live_chunks": allt["live_chunks"],
                  "chunks": allt["chunks"], "peak_rss_mb": int(m.group(1)), "end_rss_mb": int(m.group(2)),
                  "examples_per_s": rep["run"]["examples_per_s"], "train_seconds": rep["run"]["train_seconds"]}))
EOF
  log "  -> $(cat "$OUT/runs/$name.json")"
  [[ -n "${KEEP:-}" ]] || rm -f "$d/checkpoint.safetensors"
}

section_fiited() {
  local g=$OUT/gen
  if [[ ! -f $g/train.bin ]]; then
    "$EMBER" gen --out "$g" --rows 1000000 --test-rows 100000 --seed 1 >&2
    "$EMBER" convert "$g/train.tsv" "$g/train.bin" >&2
  fi
  local common=(--train "$g/train.bin" --test "$g/test.tsv" --test-prob "$g/test.prob" --dim 64 --rows-cap 1000000
                --batch 2048 --dense-opt adagrad --sparse-opt rowwise_adagrad --lr 0.006)
  train_run dense "${common[@]}"
  for f in $FRACS; do
    train_run "fiited_$f" "${common[@]}" --tables fiited --fiited-chunks 4 --fiited-budget "$f" \
      --fiited-prune-every "$PRUNE_EVERY"
    awk "BEGIN { exit !($f < 1) }" || continue # budget 1 = FIITED unpruned: no row pruning to compare
    # row-level pruning at the same memory: one per-table row budget R (water-filling over
    # the tables' capped cardinalities) so that the tables hold about what FIITED held
    local fb r
    fb=$(jnum "$OUT/runs/fiited_$f.json" '["table_bytes"]')
    r=$(python3 - "$fb" <<'EOF'
import sys
held = float(sys.argv[1])
card = [1460,583,10131227,2202608,305,24,12517,633,3,93145,5683,8351593,3194,27,14992,5461306,10,5652,2173,4,7046547,18,15,286181,105,142572]
card = [min(c, 1000000) for c in card]
row = 64 * 4 + 4 + 24 + 32 + 4 + 24   # em_dyn_row_bytes at D=64, row-wise AdaGrad
lo, hi = 1, max(card)
while lo < hi:                          # the largest R with sum min(card, R) * row <= held
    mid = (lo + hi + 1) // 2
    if sum(min(c, mid) for c in card) * row <= held: lo = mid
    else: hi = mid - 1
print(lo)
EOF
)
    train_run "rows_$f" "${common[@]}" --tables dynamic --dyn-evict lfu --dyn-rows "$r" --table-init-scale 0.01
  done
  python3 - "$OUT" > "$OUT/fiited.json" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
runs = {os.path.basename(p)[:-5]: json.load(open(p)) for p in glob.glob(f"{out}/runs/*.json")}
names = ["dense"] + sorted((n for n in runs if n.startswith("fiited_")), key=lambda n: -float(n[7:]))
full = runs.get("fiited_1")  # FIITED with the whole budget: never prunes
base = runs["dense"]
curve = []
for n in names:
    if not n.startswith("fiited_") or n == "fiited_1": continue
    f, r = runs[n], runs.get("rows_" + n[len("fiited_"):])
    curve.append({"budget": float(n[len("fiited_"):]), "fiited_auc": f["auc"], "fiited_auc_loss": base["auc"] - f["auc"],
                  "fiited_table_bytes": f["table_bytes"], "fiited_cut": 1 - f["table_bytes"] / base["table_bytes"],
                  "fiited_end_rss_mb": f["end_rss_mb"], "fiited_peak_rss_mb": f["peak_rss_mb"],
                  "fiited_live_chunks": f["live_chunks"], "fiited_examples_per_s": f["examples_per_s"],
                  "rows_auc": r and r["auc"], "rows_auc_loss": r and base["auc"] - r["auc"],
                  "rows_table_bytes": r and r["table_bytes"], "rows_end_rss_mb": r and r["end_rss_mb"]})
def best(maxloss):
    ok = [c["fiited_cut"] for c in curve if c["fiited_auc_loss"] <= maxloss]
    return max(ok) if ok else None
print(json.dumps({"fiited_unpruned_auc": full and full["auc"], "fiited_unpruned_table_bytes": full and full["table_bytes"],
                  "dense_auc": base["auc"], "dense_table_bytes": base["table_bytes"], "dense_end_rss_mb": base["end_rss_mb"],
                  "dense_examples_per_s": base["examples_per_s"], "optimum_auc": base["optimum_auc"], "curve": curve,
                  "best_cut_at_loss_0.001": best(0.001), "best_cut_at_loss_0.005": best(0.005),
                  "target_65_at_0.001_met": (best(0.001) or 0) >= 0.65, "target_90_at_0.005_met": (best(0.005) or 0) >= 0.90}))
EOF
  log "fiited: $(cat "$OUT/fiited.json")"
}

section_dynamic() {
  local g=$OUT/drift
  if [[ ! -f $g/stream.bin ]]; then
    "$EMBER" gen --drift --out "$g" --rows 1000000 --seed 1 >&2
    "$EMBER" convert "$g/stream.tsv" "$g/stream.bin" >&2
  fi
  local budget=$((16 * 1024 * 1024)) # bytes per table
  cc -O2 -Iinclude bench/embstore_ops.c "$BUILD"/libem_data.a "$BUILD"/libem_sparse.a "$BUILD"/libem_optim.a \
    "$BUILD"/libem_core.a -lopenblas -ljansson -lxxhash -lpthread -lm -o "$OUT/embstore_ops"
  if [[ -n "${RERUN:-}" || ! -s $OUT/ops.json ]]; then
    log "ops: dynamic vs dense lookups + updates, 150 batches of 2048, D=64 (load before: $(cut -d' ' -f1-3 /proc/loadavg))"
    "$OUT/embstore_ops" "$g/stream.bin" 1000000 2048 150 64 "$budget" "$THREADS" "$OUT/ops.ckpt" > "$OUT/ops.json"
  fi
  log "  -> $(cat "$OUT/ops.json")"
  local common=(--train "$g/stream.bin" --dim 64 --batch 2048 --dense-opt adagrad --sparse-opt rowwise_adagrad --lr 0.006)
  train_run drift_dense "${common[@]}" --rows-cap 1000000
  train_run drift_dynamic "${common[@]}" --tables dynamic --dyn-bytes "$budget"
  python3 - "$OUT" "$budget" > "$OUT/dynamic.json" <<'EOF'
import json, sys
out, budget = sys.argv[1], int(sys.argv[2])
ops = json.load(open(out + "/ops.json"))
dd, dy = (json.load(open(f"{out}/runs/{n}.json")) for n in ("drift_dense", "drift_dynamic"))
ins = json.load(open(out + "/runs/drift_dynamic/inspect.json"))
tabs = ins["per_table"][:-1]
print(json.dumps({"ops": ops, "ops_target_50pct_met": ops["dynamic_over_dense"] >= 0.5,
                  "train_dense_examples_per_s": dd["examples_per_s"], "train_dynamic_examples_per_s": dy["examples_per_s"],
                  "train_dynamic_over_dense": dy["examples_per_s"] / dd["examples_per_s"],
                  "budget_bytes_per_table": budget, "max_table_bytes": max(t["bytes"] for t in tabs),
                  "max_table_rows": max(t["rows"] for t in tabs), "budget_rows_per_table": tabs[0]["max_rows"],
                  "rows_within_budget": all(t["rows"] <= t["max_rows"] for t in tabs),
                  "dynamic_table_bytes": dy["table_bytes"], "dense_table_bytes": dd["table_bytes"],
                  "dynamic_end_rss_mb": dy["end_rss_mb"], "dense_end_rss_mb": dd["end_rss_mb"],
                  "evictions": ins["per_table"][-1]["evictions"], "inserts": ins["per_table"][-1]["inserts"],
                  "ckpt_every_id_kept": ops["ckpt_every_id_kept"]}))
EOF
  log "dynamic: $(cat "$OUT/dynamic.json")"
}

section_ssd() {
  OUT="$OUT/ssd" EMBER="$EMBER" bench/embedding_store_ssd.sh | tail -n1 |
    python3 -c "import json, sys; print(json.dumps(json.load(sys.stdin)['issue3_ssd']))" > "$OUT/ssd.json"
  log "ssd: $(cat "$OUT/ssd.json")"
}

for s in $SECTIONS; do "section_$s"; done
python3 - "$OUT" $SECTIONS <<'EOF'
import json, sys
out, secs = sys.argv[1], sys.argv[2:]
print(json.dumps({s: json.load(open(f"{out}/{s}.json")) for s in secs}, separators=(",", ":")))
EOF

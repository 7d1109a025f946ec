#!/usr/bin/env bash
# bench/embedding_store_ssd.sh - issue 3's SSD-tier figure: DLRM training on `ember gen`
# data (Kaggle cardinalities, Zipf ids) with SSD tables (--tables ssd: rows and
# optimizer state in RocksDB behind a cache of hot rows) whose tables take 4x the run's
# embedding memory limit, against the same model with every row in memory (--tables
# dynamic, no budget: the same values, bitwise). Reports test AUC of both, training
# throughput (runs alternated, REPS pairs; medians and the median of the pair ratios,
# since other work on the machine moves absolute figures), the cache hit rate, the
# prefetch's share of it (`ember train` loads the next batch's rows in the background
# while the current one trains: rows it loaded that a forward then found, from the final
# checkpoint's ssd.meta counters, training only), the peak RSS and the store's size on disk.
#
# The memory limit: the in-memory run's tables hold TABLE_MB (rows, optimizer state,
# per-row metadata, hash; `tables: dynamic, ... MB held`); the SSD run may use
# LIMIT_MB = TABLE_MB / 4 for its tables: the row cache (--ssd-cache-mb) plus RocksDB's
# block cache (4 MiB) and memtables (2 x 4 MiB).
#
# Takes long (about 4 runs of 2-5 minutes); not part of the test suite.
# Env: OUT (default bench/out/ssd), ROWS (1000000), TEST_ROWS (100000), REPS (2),
#      EMBER (a built binary; default: scripts/build.sh build), KEEP=1 keeps the run
#      directories. Last line: one JSON object.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/ssd}
ROWS=${ROWS:-1000000}
TEST_ROWS=${TEST_ROWS:-100000}
REPS=${REPS:-2}
if [[ -z "${EMBER:-}" ]]; then
  scripts/deps.sh
  scripts/build.sh build
  EMBER=build/ember
fi
mkdir -p "$OUT"
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
avail_mb=$(df -Pm "$OUT" | awk 'NR == 2 {print $4}')
if [[ "$avail_mb" -lt 1500 ]]; then
  echo "embedding_store_ssd.sh: $avail_mb MB free under $OUT; the data and the store need about 1.5 GB" >&2
  exit 1
fi

D="$OUT/data"
if [[ ! -f "$D/GEN_$ROWS" ]]; then
  log "generating $ROWS training rows + $TEST_ROWS test rows (Kaggle cardinalities, Zipf ids)"
  rm -rf "$D"
  $EMBER gen --out "$D" --rows "$ROWS" --test-rows "$TEST_ROWS" --seed 1 > /dev/null
  touch "$D/GEN_$ROWS"
fi
common=(--train "$D/train.tsv" --test "$D/test.tsv" --test-prob "$D/test.prob" --quiet --threads 2
        --batch 2048 --dense-opt adagrad --sparse-opt rowwise_adagrad --lr 0.006)

# run NAME ARGS...: one training run; peak RSS (kB) in NAME.rss, the store's size on
# disk (MB, from the final checkpoint's tables) in NAME.disk, load average in NAME.load.
run() {
  local name=$1
  shift
  rm -rf "${OUT:?}/$name" "$OUT/store"
  cut -d' ' -f1 /proc/loadavg > "$OUT/$name.load"
  /usr/bin/time -f "%M" -o "$OUT/$name.rss" "$EMBER" train "${common[@]}" "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1
  local ck="$OUT/$name/checkpoint.safetensors"
  if [[ -d "$ck.ssd" ]]; then du -sm "$ck.ssd" | cut -f1 > "$OUT/$name.disk"; else echo 0 > "$OUT/$name.disk"; fi
  # the SSD tier's counters at the final checkpoint (after training, before the test
  # evaluation): ssd.counts I64[11] of CKPT.ssd/ssd.meta (safetensors)
  python3 - "$ck.ssd/ssd.meta" > "$OUT/$name.counts" <<'PY'
import json, os, struct, sys
p = sys.argv[1]
if not os.path.exists(p):
    print("{}"); sys.exit(0)
b = open(p, "rb").read()
n = struct.unpack("<Q", b[:8])[0]
h = json.loads(b[8:8 + n])
lo, hi = h["ssd.counts"]["data_offsets"]
c = struct.unpack("<11q", b[8 + n + lo:8 + n + hi])
names = ["step", "disk_rows", "rows", "hits", "misses", "prefetch_hits", "evictions", "writebacks", "prefetched",
         "bytes_written", "bytes_read"]
print(json.dumps(dict(zip(names, c))))
PY
  [[ -n "${KEEP:-}" ]] || rm -rf "$ck" "$ck.ssd" "$OUT/store"
  log "$name: $(grep -o '"examples_per_s":[0-9.]*' "$OUT/$name/report.json"), $(grep '^tables:' "$OUT/$name.log")"
}

log "in-memory run 1 (sizes the limit)"
run mem1 --tables dynamic
table_mb=$(sed -n 's/^tables: dynamic, [0-9]* rows, \([0-9.]*\) MB held.*/\1/p' "$OUT/mem1.log")
limit_mb=$(python3 -c "print(int($table_mb / 4))")
cache_mb=$((limit_mb - 12))
if [[ "$cache_mb" -lt 1 ]]; then
  echo "embedding_store_ssd.sh: a limit of $limit_mb MB does not cover RocksDB's 12 MB; use more ROWS" >&2
  exit 1
fi
log "in-memory tables hold $table_mb MB: limit $limit_mb MB, row cache $cache_mb MB"
for r in $(seq "$REPS"); do
  run "ssd$r" --tables ssd --ssd-dir "$OUT/store" --ssd-cache-mb "$cache_mb"
  if [[ "$r" -gt 1 ]]; then run "mem$r" --tables dynamic; fi
done
# pairs: (ssd1, mem1), (ssd2, mem2), ...: each SSD run next to an in-memory one
python3 - "$OUT" "$REPS" "$table_mb" "$limit_mb" "$cache_mb" "$ROWS" <<'EOF'
import json, re, statistics, sys
out, reps, table_mb, limit_mb, cache_mb, rows = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
def load(name):
    r = json.load(open(f"{out}/{name}/report.json"))
    log = open(f"{out}/{name}.log").read()
    hit = re.search(r"hit rate ([0-9.]+)", log)
    return {"auc": r["test"]["auc"], "logloss": r["test"]["logloss"], "ex_s": r["run"]["examples_per_s"],
            "rss_mb": int(open(f"{out}/{name}.rss").read().split()[-1]) / 1024.0,
            "disk_mb": int(open(f"{out}/{name}.disk").read()), "load": float(open(f"{out}/{name}.load").read()),
            "hit_rate": float(hit.group(1)) if hit else None, "tables": (re.search(r"^tables: .*$", log, re.M) or [""])[0],
            "counts": json.load(open(f"{out}/{name}.counts"))}
mem = [load(f"mem{r}") for r in range(1, reps + 1)]
ssd = [load(f"ssd{r}") for r in range(1, reps + 1)]
for i in range(reps):
    print(f"pair {i + 1}: in-memory {mem[i]['ex_s']:.0f} ex/s (load {mem[i]['load']}), SSD {ssd[i]['ex_s']:.0f} ex/s "
          f"(load {ssd[i]['load']}), ratio {ssd[i]['ex_s'] / mem[i]['ex_s']:.3f}; AUC {mem[i]['auc']:.5f} vs "
          f"{ssd[i]['auc']:.5f}; hit rate {ssd[i]['hit_rate']}; RSS {mem[i]['rss_mb']:.0f} vs {ssd[i]['rss_mb']:.0f} MB; "
          f"training counters {ssd[i]['counts']}", file=sys.stderr)
c = ssd[0]["counts"]
look = c.get("hits", 0) + c.get("misses", 0)
ratios = [s["ex_s"] / m["ex_s"] for s, m in zip(ssd, mem)]
res = {"issue3_ssd": {
    "train_rows": rows, "table_mb_in_memory": table_mb, "limit_mb": limit_mb, "row_cache_mb": cache_mb,
    "tables_over_limit": round(table_mb / limit_mb, 2), "store_disk_mb": ssd[-1]["disk_mb"],
    "auc_in_memory": mem[0]["auc"], "auc_ssd": ssd[0]["auc"], "auc_diff": round(mem[0]["auc"] - ssd[0]["auc"], 6),
    "ex_s_in_memory": statistics.median(m["ex_s"] for m in mem), "ex_s_ssd": statistics.median(s["ex_s"] for s in ssd),
    "throughput_ratio_median": round(statistics.median(ratios), 3), "throughput_ratios": [round(x, 3) for x in ratios],
    "hit_rate": ssd[0]["hit_rate"],
    "train_hit_rate": round(c["hits"] / look, 4) if look else None,
    "train_prefetch_hits": c.get("prefetch_hits"), "train_prefetched": c.get("prefetched"),
    "train_hit_rate_without_prefetch_hits": round((c["hits"] - c["prefetch_hits"]) / look, 4) if look else None,
    "peak_rss_mb_in_memory": round(max(m["rss_mb"] for m in mem), 1),
    "peak_rss_mb_ssd": round(max(s["rss_mb"] for s in ssd), 1),
    "auc_within_0.001": abs(mem[0]["auc"] - ssd[0]["auc"]) <= 0.001, "throughput_ge_50pct": statistics.median(ratios) >= 0.5}}
print(json.dumps(res))
EOF

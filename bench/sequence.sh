#!/usr/bin/env bash
# bench/sequence.sh - reproduces issue 4's attention figures from a fresh build:
#   1. the machine's sgemm rate (OpenBLAS, 2 threads; bench/sgemm_peak.c), measured
#      REPS times up front and once more inside every round, next to the attention
#      runs (the machine is shared; the best rate seen is the one reported against);
#   2. self attention forward + backward, batch 256, 2 heads, head dim 32, lognormal
#      lengths (mean ~64, sigma 1, sample 0 at the max 1024; `ember bench` draws them
#      from --seed and dumps them so every side sees the same batch), alternating
#      REPS times: ember Jagged Flash Attention (--workload jattn), ember's padded
#      dense path (--workload attn_padded), PyTorch padded dense attention
#      (bench/attn_torch.py, one process per run: peak RSS is per process);
#   3. a summary: medians, speedups, peak-memory ratios, fraction of sgemm counted on
#      useful (unpadded) FLOPs (forward 4*dh*H*L^2 per sample, backward 2.5x).
# Takes a few minutes (PyTorch needs ~20 s and ~8 GB per step); not part of the test
# suite. Last line: one JSON object.
# Env: REPS (default 3), OUT (default bench/out/sequence), BUILD (build dir, default
# build), SEED (default 1), CAUSAL=1 (causal mask everywhere), SKIP_TORCH=1.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-3}
OUT=${OUT:-bench/out/sequence}
BUILD=${BUILD:-build}
SEED=${SEED:-1}
PY=/usr/bin/python3
mkdir -p "$OUT"
scripts/deps.sh
need=()
for p in python3-torch python3-numpy; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [[ ${#need[@]} -gt 0 ]]; then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
scripts/build.sh "$BUILD"
# OpenBLAS picks its kernels from a table of CPU models and falls back to its SSE3
# ("Prescott") ones on a newer CPU; ember re-runs itself with the right OPENBLAS_CORETYPE
# (src/core/blas.c). Give the same kernels to the PyTorch peer and to sgemm_peak.
# ember's pick for this CPU (src/core/blas.c) even when the environment carries an
# OPENBLAS_CORETYPE (a machine may set a common one, e.g. Haswell on an AVX-512 CPU,
# which cuts sgemm and the PyTorch peer by a third); BLAS_CORE=NAME chooses
OPENBLAS_CORETYPE=${BLAS_CORE:-$(env -u OPENBLAS_CORETYPE "$BUILD"/ember version | sed -n 's/^blas_core=//p')}
export OPENBLAS_CORETYPE
echo "OpenBLAS kernels: $OPENBLAS_CORETYPE" >&2
EMBER=$BUILD/ember
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
shape=(--batch 256 --heads 2 --head-dim 32 --max-len 1024 --mean-len 64 --seed "$SEED" --threads 2)
tshape=(--heads 2 --head-dim 32 --max-len 1024 --seed "$SEED" --threads 2)
if [[ -n "${CAUSAL:-}" ]]; then shape+=(--causal); tshape+=(--causal); fi

# 1. sgemm rate
cc -O2 bench/sgemm_peak.c -I/usr/include/x86_64-linux-gnu/openblas-pthread -lopenblas -o "$OUT/sgemm_peak"
: > "$OUT/sgemm.jsonl"
for r in $(seq "$REPS"); do OPENBLAS_NUM_THREADS=2 "$OUT/sgemm_peak" >> "$OUT/sgemm.jsonl"; done
log "sgemm: $(tail -n1 "$OUT/sgemm.jsonl")"

# 2. the lengths, then alternating runs
$EMBER bench --workload jattn "${shape[@]}" --steps 1 --warmup 0 --dump-lengths "$OUT/lengths.txt" > /dev/null
: > "$OUT/attn.jsonl"
for r in $(seq "$REPS"); do
  OPENBLAS_NUM_THREADS=2 "$OUT/sgemm_peak" >> "$OUT/sgemm.jsonl"
  j=$($EMBER bench --workload jattn "${shape[@]}" --steps 20 --warmup 3)
  echo "{\"side\":\"jattn\",\"run\":$r,\"r\":$j}" >> "$OUT/attn.jsonl"
  p=$($EMBER bench --workload attn_padded "${shape[@]}" --steps 3 --warmup 1)
  echo "{\"side\":\"ember_padded\",\"run\":$r,\"r\":$p}" >> "$OUT/attn.jsonl"
  msg="jattn $(echo "$j" | grep -o '"ms_per_step":[0-9.]*') padded $(echo "$p" | grep -o '"ms_per_step":[0-9.]*')"
  if [[ -z "${SKIP_TORCH:-}" ]]; then
    t=$($PY bench/attn_torch.py --lengths "$OUT/lengths.txt" "${tshape[@]}" --steps 2 --warmup 1 | tail -n1)
    echo "{\"side\":\"torch_padded\",\"run\":$r,\"r\":$t}" >> "$OUT/attn.jsonl"
    msg="$msg torch $(echo "$t" | grep -o '"ms_per_step": [0-9.]*')"
  fi
  log "run $r: $msg"
done

# 3. summary
$PY - "$OUT" <<'PYEOF'
import json, os, statistics, sys
out = sys.argv[1]
med = statistics.median
sg = [json.loads(l) for l in open(os.path.join(out, "sgemm.jsonl"))]
runs = [json.loads(l) for l in open(os.path.join(out, "attn.jsonl"))]
# the best sgemm rate seen: the conservative denominator on a shared machine
res = {"sgemm_gflops": max(r["sgemm_gflops"] for r in sg), "sgemm_gflops_median": med(r["sgemm_gflops"] for r in sg)}
sides = {}
for r in runs:
    sides.setdefault(r["side"], []).append(r["r"])
first = runs[0]["r"]
res["shape"] = {k: first[k] for k in ("batch", "heads", "head_dim", "max_len", "mean_len", "total_rows", "causal", "threads")}
res["useful_gflop"] = first["useful_gflop"]
res["padded_gflop"] = first["padded_gflop"]
for s, xs in sides.items():
    res[s] = {"runs": len(xs), "ms_per_step": med(x["ms_per_step"] for x in xs),
              "peak_rss_mb": med(x["peak_rss_mb"] for x in xs),
              "useful_gflops": med(x["useful_gflops"] for x in xs)}
    if "tensor_mb" in xs[0]:
        res[s]["tensor_mb"] = xs[0]["tensor_mb"]
        res[s]["ms_fwd"] = med(x["ms_fwd"] for x in xs)
        res[s]["ms_bwd"] = med(x["ms_bwd"] for x in xs)
j = res["jattn"]
j["fraction_of_sgemm"] = round(j["useful_gflops"] / res["sgemm_gflops"], 4)
for base in ("ember_padded", "torch_padded"):
    if base in res:
        res[f"speedup_vs_{base}"] = round(res[base]["ms_per_step"] / j["ms_per_step"], 1)
        res[f"peak_mem_ratio_vs_{base}"] = round(res[base]["peak_rss_mb"] / j["peak_rss_mb"], 1)
res["targets"] = {"speedup_vs_torch_ge_30": res.get("speedup_vs_torch_padded", 0) >= 30,
                  "mem_ratio_vs_torch_ge_50": res.get("peak_mem_ratio_vs_torch_padded", 0) >= 50,
                  "fraction_of_sgemm_ge_0.25": j["fraction_of_sgemm"] >= 0.25}
print("sgemm %.1f GFLOP/s; jattn %.1f ms (%.1f GFLOP/s useful, %.1f%% of sgemm, %.1f MB RSS)"
      % (res["sgemm_gflops"], j["ms_per_step"], j["useful_gflops"], 100 * j["fraction_of_sgemm"], j["peak_rss_mb"]), file=sys.stderr)
for base in ("ember_padded", "torch_padded"):
    if base in res:
        print("  %s: %.0f ms, %.0f MB -> jattn %.1fx faster, %.1fx less peak memory"
              % (base, res[base]["ms_per_step"], res[base]["peak_rss_mb"], res[f"speedup_vs_{base}"],
                 res[f"peak_mem_ratio_vs_{base}"]), file=sys.stderr)
print(json.dumps(res))
PYEOF

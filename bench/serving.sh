#!/usr/bin/env bash
# bench/serving.sh - reproduces issue 7's serving figures from a fresh build:
#   1. the machine's sgemm rate (OpenBLAS, 2 threads; bench/sgemm_peak.c), REPS times up
#      front and once in every round; the best rate seen is the roofline;
#   2. a Kaggle-config checkpoint (full Criteo Kaggle cardinalities, ~2.2 GB): `ember gen`
#      20k rows, `ember train` on 4096 of them (a second one with another seed for the
#      reload test);
#   3. a sweep of peak HTTP throughput: `ember serve` with each of SERVE_PEAK settings, wrk
#      posting binary requests of 256, 1024 and 2048 examples (and JSON of 256) on 4
#      connections; examples/s = requests/s x examples per request;
#   4. REPS alternating rounds of: in-process inference (`ember bench --workload kaggle
#      --infer`, batch 2048 on 2 threads, batch 1 on 2 and on 1 thread), PyTorch eager inference (`dlrm_torch.py infer`, batch
#      1, 256, 2048), the best peak setting of the sweep again, and the 1,000 requests/s
#      latency test of single binary examples for each of SERVE_LAT settings (wrk paced by
#      bench/wrk/predict.lua, WRK_RATE);
#   5. single JSON examples at the same rate once, for reference;
#   6. hot reload under load: wrk posting single binary examples as fast as it can (8
#      connections) while the server is reloaded RELOADS times by POST /admin/reload
#      (alternating two checkpoints) and once by SIGHUP; wrk's non-2xx responses and
#      socket errors must be 0;
#   7. a summary: medians, ratios, targets.
# wrk, the server and the in-process runs share this machine's cores: nothing is pinned.
# wrk's latency is its own measurement (first byte written to last byte read, on
# loopback), pacing waits excluded.
# OpenBLAS: a DYNAMIC_ARCH OpenBLAS that does not know the CPU model falls back to
# generic (Prescott, SSE3) kernels, ~10x slower than the AVX-512 ones (OpenBLAS 0.3.21 on
# Emerald Rapids does). If OPENBLAS_CORETYPE is unset and OpenBLAS reports Prescott on a
# CPU with AVX-512 (AVX2), the script sets OPENBLAS_CORETYPE=SkylakeX (Haswell) for every
# process it starts, ember and PyTorch alike, and says so in the summary.
# Takes ~15-20 minutes; not part of the test suite. Last line of stdout: one JSON object;
# raw results in $OUT (*.jsonl, wrk_*.txt, server logs).
# Env: REPS (default 3), OUT (default bench/out/serving), BUILD (build dir, default
# build-serving), DUR (seconds per timed wrk run, default 20), SWEEP_DUR (default 10),
# RATE (latency test requests/s, default 1000), RELOADS (default 4), SKIP_TORCH=1,
# SERVE_PEAK / SERVE_LAT (';'-separated lists of `ember serve` option sets).
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-3}
OUT=${OUT:-bench/out/serving}
BUILD=${BUILD:-build-serving}
DUR=${DUR:-20}
SWEEP_DUR=${SWEEP_DUR:-10}
RATE=${RATE:-1000}
RELOADS=${RELOADS:-4}
SERVE_PEAK=${SERVE_PEAK:-"--max-batch 2048 --threads 4;--max-batch 4096 --threads 8 --max-body 4194304;--max-batch 1024 --threads 4"}
SERVE_LAT=${SERVE_LAT:-"--infer-threads 2 --max-wait-us 200;--infer-threads 1 --max-wait-us 50"}
PY=/usr/bin/python3
mkdir -p "$OUT"
scripts/deps.sh
need=()
for p in python3-torch python3-numpy wrk curl; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [[ ${#need[@]} -gt 0 ]]; then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
scripts/build.sh "$BUILD" >&2
EMBER=$BUILD/ember
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
load() { cut -d' ' -f1 /proc/loadavg; }

# 1. sgemm rate, and OpenBLAS's kernels
cc -O2 bench/sgemm_peak.c -I/usr/include/x86_64-linux-gnu/openblas-pthread -lopenblas -o "$OUT/sgemm_peak"
core=$(OPENBLAS_VERBOSE=2 OPENBLAS_NUM_THREADS=1 "$OUT/sgemm_peak" 2>&1 >/dev/null | sed -n 's/^Core: *//p' | head -n1)
coretype_set=""
if [[ -z "${OPENBLAS_CORETYPE:-}" && "$core" == "Prescott" ]]; then
  if grep -qw avx512f /proc/cpuinfo; then coretype_set=SkylakeX; elif grep -qw avx2 /proc/cpuinfo; then coretype_set=Haswell; fi
  if [[ -n "$coretype_set" ]]; then
    export OPENBLAS_CORETYPE=$coretype_set
    log "OpenBLAS detected core '$core' (generic kernels) on a CPU with $( [[ $coretype_set == SkylakeX ]] && echo AVX-512 || echo AVX2 ): OPENBLAS_CORETYPE=$coretype_set for every run"
  fi
fi
core_used=$(OPENBLAS_VERBOSE=2 OPENBLAS_NUM_THREADS=1 "$OUT/sgemm_peak" 2>&1 >/dev/null | sed -n 's/^Core: *//p' | head -n1)
printf '{"detected":"%s","coretype_env":"%s","set_by_script":"%s","used":"%s"}\n' \
  "$core" "${OPENBLAS_CORETYPE:-}" "$coretype_set" "$core_used" > "$OUT/openblas.json"
: > "$OUT/sgemm.jsonl"
for r in $(seq "$REPS"); do OPENBLAS_NUM_THREADS=2 "$OUT/sgemm_peak" >> "$OUT/sgemm.jsonl"; done
log "sgemm ($core_used kernels): $(tail -n1 "$OUT/sgemm.jsonl")"

# 2. checkpoints (Kaggle model, full cardinalities)
CK=$OUT/ckpt
rm -rf "$CK"
mkdir -p "$CK"
$EMBER gen --out "$CK/data" --rows 20000 --test-rows 1000 --seed 1 > /dev/null
$EMBER train --train "$CK/data/train.tsv" --train-limit 4096 --batch 128 --out "$CK/a" --quiet > /dev/null
$EMBER train --train "$CK/data/train.tsv" --train-limit 2048 --batch 128 --seed 2 --out "$CK/b" --quiet > /dev/null
MODEL=$CK/a/checkpoint.safetensors
MODEL_B=$CK/b/checkpoint.safetensors
log "checkpoints: $(du -h "$MODEL" | cut -f1) each"

# request bodies
B=$OUT/bodies
mkdir -p "$B"
mk() { $PY bench/wrk/make_bodies.py --mode "$1" --per-request "$2" --requests "$3" --seed "$4" --out "$5" > /dev/null; }
mk bin 1 4096 1 "$B/bin1"
mk json 1 1024 2 "$B/json1"
mk bin 256 64 3 "$B/bin256"
mk bin 1024 16 4 "$B/bin1024"
mk bin 2048 8 5 "$B/bin2048"
mk json 256 16 6 "$B/json256"
rec=$((8 + 4 * 13 + 8 * 26))

SPID=""
stop_server() {
  if [[ -n "$SPID" ]]; then
    kill -TERM "$SPID" 2>/dev/null || true
    wait "$SPID" 2>/dev/null || true
    SPID=""
  fi
}
trap stop_server EXIT
# start_server NAME [serve options...]: sets SPID and PORT
start_server() {
  local name=$1; shift
  "$EMBER" serve --model "$MODEL" --port 0 "$@" > "$OUT/serve_$name.log" 2> "$OUT/serve_$name.err" &
  SPID=$!
  PORT=""
  for _ in $(seq 1200); do
    PORT=$(sed -n 's|.*listening on http://[^:]*:\([0-9][0-9]*\).*|\1|p' "$OUT/serve_$name.log" | head -n1)
    [[ -n "$PORT" ]] && return 0
    if ! kill -0 "$SPID" 2>/dev/null; then
      echo "ember serve $* exited:" >&2; cat "$OUT/serve_$name.err" >&2; SPID=""; return 1
    fi
    sleep 0.1
  done
  echo "ember serve $* did not start" >&2
  return 1
}
# wrk_start NAME RATE THREADS CONNS SECONDS BODIES MODE PER_REQUEST: wrk against $PORT in
# the background, its output in $OUT/wrk_NAME.txt; sets WPID
wrk_start() {
  local name=$1 rate=$2 t=$3 c=$4 d=$5 file=$6 mode=$7 k=$8
  local bytes=$((16 + k * rec)) wr=""
  [[ "$rate" != 0 ]] && wr=$(awk -v r="$rate" -v t="$t" 'BEGIN { print r / t }')
  WRK_RATE=$wr wrk -t"$t" -c"$c" -d"${d}s" --latency -s bench/wrk/predict.lua "http://127.0.0.1:$PORT" \
    -- "$file" "$mode" "$bytes" > "$OUT/wrk_$name.txt" &
  WPID=$!
}
# wrk_result NAME MODE PER_REQUEST THREADS CONNS RATE LOAD [key=value ...]: appends the
# run's JSON line to $OUT/wrk.jsonl and echoes it. Failed requests: wrk's "Non-2xx or 3xx
# responses" and "Socket errors" lines.
wrk_result() {
  local name=$1 mode=$2 k=$3 t=$4 c=$5 rate=$6 l0=$7; shift 7
  local raw=$OUT/wrk_$name.txt j non2xx sock extra=""
  j=$(sed -n 's/^WRKJSON //p' "$raw")
  [[ -n "$j" ]] || { echo "wrk $name: no result" >&2; cat "$raw" >&2; return 1; }
  non2xx=$(sed -n 's/.*Non-2xx or 3xx responses: *\([0-9]*\).*/\1/p' "$raw"); non2xx=${non2xx:-0}
  sock=$(sed -n 's/.*Socket errors: connect \([0-9]*\), read \([0-9]*\), write \([0-9]*\), timeout \([0-9]*\).*/\1+\2+\3+\4/p' "$raw")
  sock=$((${sock:-0}))
  for kv in "$@"; do extra="$extra,\"${kv%%=*}\":${kv#*=}"; done
  local line="{\"name\":\"$name\",\"mode\":\"$mode\",\"per_request\":$k,\"threads\":$t,\"conns\":$c,\"rate_target\":$rate,\"load_before\":$l0,\"non2xx\":$non2xx,\"socket_errors\":$sock$extra,\"wrk\":$j}"
  echo "$line" >> "$OUT/wrk.jsonl"
  echo "$line"
}
# run_wrk NAME RATE THREADS CONNS SECONDS BODIES MODE PER_REQUEST [key=value ...]: one run
run_wrk() {
  local name=$1 rate=$2 t=$3 c=$4 d=$5 file=$6 mode=$7 k=$8; shift 8
  local l0
  l0=$(load)
  wrk_start "$name" "$rate" "$t" "$c" "$d" "$file" "$mode" "$k"
  wait "$WPID"
  wrk_result "$name" "$mode" "$k" "$t" "$c" "$rate" "$l0" "$@"
}
rps() { echo "$1" | grep -o '"requests_per_s":[0-9.]*' | cut -d: -f2; }
p99() { echo "$1" | grep -o '"p99":[0-9]*' | cut -d: -f2; }

: > "$OUT/wrk.jsonl"
: > "$OUT/inproc.jsonl"

# 3. peak-throughput sweep
IFS=';' read -r -a peak_cfgs <<< "$SERVE_PEAK"
IFS=';' read -r -a lat_cfgs <<< "$SERVE_LAT"
best_eps=0 best_cfg=0 best_k=0
for i in "${!peak_cfgs[@]}"; do
  # shellcheck disable=SC2086
  start_server "peak$i" ${peak_cfgs[$i]}
  for k in 256 1024 2048; do
    j=$(run_wrk "sweep_c${i}_bin$k" 0 2 4 "$SWEEP_DUR" "$B/bin$k" bin "$k" "cfg=$i" "phase=\"sweep\"")
    eps=$(awk -v r="$(rps "$j")" -v k="$k" 'BEGIN { printf "%.0f", r * k }')
    log "peak sweep [${peak_cfgs[$i]}] bin x$k: $eps examples/s"
    if (( eps > best_eps )); then best_eps=$eps best_cfg=$i best_k=$k; fi
  done
  j=$(run_wrk "sweep_c${i}_json256" 0 2 4 "$SWEEP_DUR" "$B/json256" json 256 "cfg=$i" "phase=\"sweep\"")
  log "peak sweep [${peak_cfgs[$i]}] json x256: $(awk -v r="$(rps "$j")" 'BEGIN { printf "%.0f", r * 256 }') examples/s"
  stop_server
done
log "best peak setting: [${peak_cfgs[$best_cfg]}] with $best_k examples per request"

# 4. alternating rounds
for r in $(seq "$REPS"); do
  OPENBLAS_NUM_THREADS=2 "$OUT/sgemm_peak" >> "$OUT/sgemm.jsonl"
  for bt in 2048:2 1:2 1:1; do
    b=${bt%%:*} th=${bt#*:}
    e=$($EMBER bench --workload kaggle --infer --batch "$b" --threads "$th")
    echo "{\"side\":\"ember\",\"run\":$r,\"batch\":$b,\"threads\":$th,\"load_before\":$(load),\"r\":$e}" >> "$OUT/inproc.jsonl"
    log "round $r ember in-process b$b ${th}t: $(echo "$e" | grep -o '"examples_per_s":[0-9.]*\|"us_p99":[0-9.]*' | tr '\n' ' ')"
  done
  if [[ -z "${SKIP_TORCH:-}" ]]; then
    for b in 1 256 2048; do
      steps=()
      [[ $b == 1 ]] && steps=(--steps 5000)
      t=$($PY bench/dlrm_torch.py infer --config kaggle --batch "$b" --threads 2 "${steps[@]}" | tail -n1)
      echo "{\"side\":\"torch\",\"run\":$r,\"batch\":$b,\"load_before\":$(load),\"r\":$t}" >> "$OUT/inproc.jsonl"
      log "round $r torch b$b: $(echo "$t" | grep -o '"examples_per_s": [0-9.]*\|"us_p99": [0-9.]*' | tr '\n' ' ')"
    done
  fi
  # shellcheck disable=SC2086
  start_server "peak_best" ${peak_cfgs[$best_cfg]}
  j=$(run_wrk "peak_r$r" 0 2 4 "$DUR" "$B/bin$best_k" bin "$best_k" "cfg=$best_cfg" "phase=\"peak\"" "run=$r")
  log "round $r HTTP peak: $(awk -v r="$(rps "$j")" -v k="$best_k" 'BEGIN { printf "%.0f", r * k }') examples/s"
  stop_server
  for i in "${!lat_cfgs[@]}"; do
    # shellcheck disable=SC2086
    start_server "lat$i" ${lat_cfgs[$i]}
    j=$(run_wrk "lat_c${i}_r$r" "$RATE" 1 8 "$DUR" "$B/bin1" bin 1 "cfg=$i" "phase=\"latency\"" "run=$r")
    log "round $r latency [${lat_cfgs[$i]}]: $(rps "$j") req/s, p99 $(p99 "$j") us"
    if [[ $r == 1 && $i == 0 ]]; then
      j=$(run_wrk "lat_json_c$i" "$RATE" 1 8 "$DUR" "$B/json1" json 1 "cfg=$i" "phase=\"latency_json\"")
      log "JSON latency [${lat_cfgs[$i]}]: $(rps "$j") req/s, p99 $(p99 "$j") us"
    fi
    stop_server
  done
done

# 6. hot reload under load: wrk runs until the reloads are done, then gets SIGINT
# (it stops and prints its results)
: > "$OUT/reload.jsonl"
start_server reload
l0=$(load)
wrk_start reload 0 1 8 3600 "$B/bin1" bin 1
sleep 5
for n in $(seq "$RELOADS"); do
  m=$MODEL_B; (( n % 2 == 0 )) && m=$MODEL
  t0=$(date +%s.%N)
  code=$(curl -s -o "$OUT/reload_$n.out" -w '%{http_code}' -X POST "http://127.0.0.1:$PORT/admin/reload" -d "{\"model\": \"$m\"}")
  t1=$(date +%s.%N)
  ans=$(cat "$OUT/reload_$n.out"); [[ -n "$ans" ]] || ans=null
  echo "{\"n\":$n,\"how\":\"POST\",\"model\":\"$m\",\"http_code\":$code,\"seconds\":$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }'),\"answer\":$ans}" >> "$OUT/reload.jsonl"
  log "reload $n ($m): HTTP $code $ans"
  sleep 2
done
# SIGHUP reloads --model; the CLI reports on stderr
kill -HUP "$SPID"
for _ in $(seq 1200); do grep -q "SIGHUP" "$OUT/serve_reload.err" && break; sleep 0.1; done
hup=$(grep "SIGHUP" "$OUT/serve_reload.err" | tail -n1 || true)
ok=false; [[ "$hup" == *reloaded* ]] && ok=true
echo "{\"n\":$((RELOADS + 1)),\"how\":\"SIGHUP\",\"ok\":$ok,\"message\":$($PY -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$hup")}" >> "$OUT/reload.jsonl"
log "SIGHUP: $hup"
sleep 3
kill -INT "$WPID"
wait "$WPID" || true
wrk_result reload bin 1 1 8 0 "$l0" "phase=\"reload\"" > "$OUT/reload_wrk.json"
curl -s "http://127.0.0.1:$PORT/metrics" > "$OUT/reload_metrics.txt"
stop_server
log "reload under load: $(grep -o '"non2xx":[0-9]*,"socket_errors":[0-9]*' "$OUT/reload_wrk.json"), $(rps "$(cat "$OUT/reload_wrk.json")") req/s"

# 7. summary
$PY - "$OUT" "$SERVE_PEAK" "$SERVE_LAT" "$RATE" <<'PYEOF'
import json, os, statistics, sys
out, peak_cfgs, lat_cfgs, rate = sys.argv[1], sys.argv[2].split(";"), sys.argv[3].split(";"), float(sys.argv[4])
med = statistics.median
rd = lambda p: [json.loads(l) for l in open(os.path.join(out, p)) if l.strip()]
sg, inproc, wrk, reload = rd("sgemm.jsonl"), rd("inproc.jsonl"), rd("wrk.jsonl"), rd("reload.jsonl")
res = {"openblas": json.load(open(os.path.join(out, "openblas.json")))}
res["sgemm_gflops"] = max(r["sgemm_gflops"] for r in sg)
res["sgemm_gflops_median"] = med(r["sgemm_gflops"] for r in sg)
res["sgemm_runs"] = [r["sgemm_gflops"] for r in sg]

def side(s, b, th=2):
    return [x for x in inproc if x["side"] == s and x["batch"] == b and x.get("threads", 2) == th]

def summ(xs, keys):
    d = {"runs": len(xs)}
    for k in keys:
        d[k] = round(med(x["r"][k] for x in xs), 2)
        d[k + "_runs"] = [round(x["r"][k], 2) for x in xs]
    return d

ekeys = ["examples_per_s", "ms_per_batch", "gflops", "us_p50", "us_p99", "ms_embed", "ms_dense", "dense_gflops"]
tkeys = ["examples_per_s", "ms_per_batch", "us_p50", "us_p99"]
ip = {}
for b in (2048, 1):
    if side("ember", b):
        ip["ember_b%d" % b] = summ(side("ember", b), ekeys)
if side("ember", 1, 1):
    ip["ember_b1_1thread"] = summ(side("ember", 1, 1), ekeys)
e0 = side("ember", 2048)[0]["r"]
res["fwd_flop_per_example"] = e0["fwd_flop_per_example"]
res["fwd_flop_breakdown"] = {"mlp": e0["mlp_flop"], "interaction": e0["interaction_flop"]}
eb = ip["ember_b2048"]
eb["fraction_of_sgemm"] = round(eb["gflops"] / res["sgemm_gflops"], 4)
eb["dense_fraction_of_sgemm"] = round(eb["dense_gflops"] / res["sgemm_gflops"], 4)
torch_best = 0
for b in (1, 256, 2048):
    if side("torch", b):
        ip["torch_b%d" % b] = summ(side("torch", b), tkeys)
        torch_best = max(torch_best, ip["torch_b%d" % b]["examples_per_s"])
res["inprocess"] = ip
res["torch_best_examples_per_s"] = torch_best or None

def w(x):
    r = {"requests_per_s": x["wrk"]["requests_per_s"], "examples_per_s": round(x["wrk"]["requests_per_s"] * x["per_request"], 1),
         "p50_ms": x["wrk"]["latency_us"]["p50"] / 1e3, "p90_ms": x["wrk"]["latency_us"]["p90"] / 1e3,
         "p99_ms": x["wrk"]["latency_us"]["p99"] / 1e3, "p99_9_ms": x["wrk"]["latency_us"]["p99_9"] / 1e3,
         "non2xx": x["non2xx"], "socket_errors": x["socket_errors"], "requests": x["wrk"]["requests"],
         "load_before": x["load_before"]}
    return r

res["peak_sweep"] = [dict(serve=peak_cfgs[x["cfg"]], mode=x["mode"], per_request=x["per_request"], **w(x))
                     for x in wrk if x.get("phase") == "sweep"]
pk = [x for x in wrk if x.get("phase") == "peak"]
if pk:
    res["http_peak"] = {"serve": peak_cfgs[pk[0]["cfg"]], "per_request": pk[0]["per_request"], "conns": pk[0]["conns"],
                        "examples_per_s": round(med(w(x)["examples_per_s"] for x in pk), 1),
                        "examples_per_s_runs": [w(x)["examples_per_s"] for x in pk],
                        "p99_ms_runs": [w(x)["p99_ms"] for x in pk]}
lat = {}
for i, c in enumerate(lat_cfgs):
    xs = [w(x) for x in wrk if x.get("phase") == "latency" and x["cfg"] == i]
    if xs:
        lat[c] = {"rate_target": rate, "runs": len(xs),
                  **{k: round(med(x[k] for x in xs), 3) for k in ("requests_per_s", "p50_ms", "p90_ms", "p99_ms", "p99_9_ms")},
                  "p99_ms_runs": [x["p99_ms"] for x in xs], "requests_per_s_runs": [x["requests_per_s"] for x in xs],
                  "errors": sum(x["non2xx"] + x["socket_errors"] for x in xs)}
res["latency_1000rps"] = lat
best_lat = min(lat, key=lambda c: lat[c]["p99_ms"]) if lat else None
res["latency_best_setting"] = best_lat
lj = [w(x) for x in wrk if x.get("phase") == "latency_json"]
if lj:
    res["latency_json"] = lj[0]
rw = json.load(open(os.path.join(out, "reload_wrk.json")))
res["reload_under_load"] = {"reloads": reload, "wrk": w(rw), "failed_requests": rw["non2xx"] + rw["socket_errors"]}
ratio = res["http_peak"]["examples_per_s"] / torch_best if torch_best and pk else None
res["http_peak_vs_torch_best"] = round(ratio, 2) if ratio else None
if torch_best:
    res["inprocess_b2048_vs_torch_best"] = round(eb["examples_per_s"] / torch_best, 2)
if "torch_b1" in ip and "ember_b1" in ip:
    res["inprocess_b1_vs_torch_b1"] = round(ip["ember_b1"]["examples_per_s"] / ip["torch_b1"]["examples_per_s"], 2)
reload_ok = res["reload_under_load"]["failed_requests"] == 0 and all(
    r.get("http_code") == 200 or r.get("ok") is True for r in reload)
res["targets"] = {
    "p99_le_1ms_at_1000rps": bool(best_lat and lat[best_lat]["p99_ms"] <= 1.0 and lat[best_lat]["requests_per_s"] >= 0.95 * rate),
    "http_peak_ge_2x_torch_best": bool(ratio and ratio >= 2.0),
    "inprocess_ge_80pct_sgemm": eb["fraction_of_sgemm"] >= 0.8,
    "reload_zero_failures": reload_ok,
}
L = lat.get(best_lat, {})
print("sgemm %.1f GFLOP/s (%s kernels); in-process b2048 %.0f ex/s = %.1f GFLOP/s = %.1f%% of sgemm; b1 p99 %.0f us"
      % (res["sgemm_gflops"], res["openblas"]["used"], eb["examples_per_s"], eb["gflops"], 100 * eb["fraction_of_sgemm"],
         ip.get("ember_b1", {}).get("us_p99", 0)), file=sys.stderr)
if torch_best:
    print("PyTorch best %.0f ex/s; HTTP peak %.0f ex/s (%.2fx)" % (torch_best, res["http_peak"]["examples_per_s"], ratio or 0),
          file=sys.stderr)
if L:
    print("latency at %.0f req/s [%s]: %.0f req/s achieved, p50 %.3f p99 %.3f ms" % (rate, best_lat, L["requests_per_s"],
          L["p50_ms"], L["p99_ms"]), file=sys.stderr)
print("reload under load: %d failed of %d requests" % (res["reload_under_load"]["failed_requests"], rw["wrk"]["requests"]),
      file=sys.stderr)
print("targets: %s" % res["targets"], file=sys.stderr)
print(json.dumps(res))
PYEOF

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
#      --infer`: batch 2048 on 2 threads, with VS_SGEMM pairs of sgemm and em_infer runs
#      in the same process, `--vs-sgemm`; batch 1 on 2 and on 1 thread), PyTorch eager
#      inference (`dlrm_torch.py infer`, batch 1, 256, 2048), the best peak setting of
#      the sweep again, and the 1,000 requests/s latency test of single binary examples
#      for each of SERVE_LAT settings (wrk paced by bench/wrk/predict.lua, WRK_RATE);
#   5. single JSON examples at the same rate once, for reference;
#   6. hot reload under load: wrk posting single binary examples as fast as it can (8
#      connections) while the server is reloaded RELOADS times by POST /admin/reload
#      (alternating two checkpoints), then, in a second wrk run, RELOADS times by SIGHUP;
#      wrk's non-2xx responses and socket errors (timeouts included) must be 0;
#   7. a summary: medians, ratios, targets.
# wrk, the server and the in-process runs share this machine's cores: nothing is pinned.
# wrk's latency is its own measurement (first byte written to last byte read, on
# loopback), pacing waits excluded.
# OpenBLAS: a DYNAMIC_ARCH OpenBLAS that does not know the CPU model falls back to
# generic (Prescott, SSE3) kernels, ~10x slower than the AVX-512 ones (OpenBLAS 0.3.21
# on Emerald Rapids does); ember switches itself to better ones, and the script gives
# the same OPENBLAS_CORETYPE (`ember version`'s blas_core) to PyTorch and sgemm_peak.
# Takes 20-60 minutes (more with QUIET_WAIT and RETRY on a busy machine); not part of the
# test suite. Last line of stdout: one JSON object;
# raw results in $OUT (*.jsonl, wrk_*.txt, server logs).
# Env: REPS (default 3), OUT (default bench/out/serving), BUILD (build dir, default
# build-serving), DUR (seconds per timed wrk run, default 20), SWEEP_DUR (default 10),
# RATE (latency test requests/s, default 1000), RELOADS (default 4), SKIP_TORCH=1,
# VS_SGEMM (pairs per round of the paired sgemm / em_infer measurement, default 9; 0: none),
# SERVE_PEAK / SERVE_LAT (';'-separated lists of `ember serve` option sets), QUIET_WAIT
# (seconds to wait before each measurement for a second with the CPUs < 10% busy,
# default 0), RETRY (repeat a measurement up to N more times while others and steal
# took more than OTHERS_MAX % of the CPUs, default 0 and 10), RESUME=1 (keep $OUT's
# results and checkpoints, run only the measurements not recorded yet), KEEP_CKPT=1 (keep
# the two 2.2 GB checkpoints in $OUT/ckpt; by default they are deleted at the end; ~6 GB
# free are needed while the script runs). Every measurement
# records busy_before (% of the CPUs busy in the second before it started, the server up
# and idle), others_cpu_pct and steal_pct (see cpu_mark below).
set -Eeuo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-3}
OUT=${OUT:-bench/out/serving}
BUILD=${BUILD:-build-serving}
DUR=${DUR:-20}
SWEEP_DUR=${SWEEP_DUR:-10}
RATE=${RATE:-1000}
RELOADS=${RELOADS:-4}
VS_SGEMM=${VS_SGEMM:-9}
QUIET_WAIT=${QUIET_WAIT:-0}
RESUME=${RESUME:-}
RETRY=${RETRY:-0}
OTHERS_MAX=${OTHERS_MAX:-10}
# the first setting of both lists is the same server (the defaults, max batch 2048): one
# configuration for both figures; the others show what one option changes
SERVE_PEAK=${SERVE_PEAK:-"--max-batch 2048;--max-batch 2048 --threads 4;--max-batch 4096 --max-body 4194304"}
SERVE_LAT=${SERVE_LAT:-"--max-batch 2048;--max-batch 2048 --max-wait-us 0;--max-batch 2048 --threads 4"}
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
trap 'echo "bench/serving.sh: line $LINENO: \"$BASH_COMMAND\" failed" >&2' ERR
# busy: percent of all CPUs busy over the last second (/proc/stat). load: with
# QUIET_WAIT=S, first wait up to S seconds for a second under 10% busy (other people's
# jobs share the machine); echoes the last busy figure.
busy() {
  local a b
  a=$(awk '/^cpu /{ print $2+$3+$4+$7+$8+$9, $5+$6 }' /proc/stat)
  sleep 1
  b=$(awk '/^cpu /{ print $2+$3+$4+$7+$8+$9, $5+$6 }' /proc/stat)
  awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " "); u = y[1] - x[1]; i = y[2] - x[2];
    printf "%.1f", ((u + i) > 0 ? 100 * u / (u + i) : 0) }'
}
load() {
  local end=$((SECONDS + QUIET_WAIT)) p
  p=$(busy)
  while awk -v p="$p" 'BEGIN { exit !(p >= 10) }' && (( SECONDS < end )); do p=$(busy); done
  echo "$p"
}
# cpu_mark / others: how much of the machine others took between the two calls, in % of
# all its CPUs: OTHERS = processes other than this script's (busy time in /proc/stat
# minus what this shell's waited-for descendants (`times`) and the running server used),
# STEAL = time the hypervisor ran other guests while this one's CPUs wanted to run
# (/proc/stat steal). Both calls must run in the same shell (not in a $(...) of their own).
TCK=$(getconf CLK_TCK)
NCPU=$(nproc)
cpu_mark() {
  local srv=0
  [[ -n "$SPID" && -r /proc/$SPID/stat ]] && srv=$(awk '{ print $14 + $15 }' "/proc/$SPID/stat")
  times > "$OUT/.times" # a builtin with a redirect runs in this shell; $(times) would not
  MARK="$(date +%s.%N) $(awk '/^cpu /{ print $2+$3+$4+$7+$8, $9 }' /proc/stat) $(tail -n1 "$OUT/.times") $srv"
}
others() {
  local m0=$MARK r
  cpu_mark
  r=$(awk -v a="$m0" -v b="$MARK" -v tck="$TCK" -v n="$NCPU" '
    function sec(t, p) { split(t, p, "m"); return p[1] * 60 + substr(p[2], 1, length(p[2]) - 1) }
    BEGIN { split(a, x, " "); split(b, y, " "); w = (y[1] - x[1]) * n; busy = (y[2] - x[2]) / tck;
      own = sec(y[4]) + sec(y[5]) - sec(x[4]) - sec(x[5]) + (y[6] - x[6]) / tck;
      o = busy - own; if (o < 0) o = 0;
      printf "%.1f %.1f", (w > 0 ? 100 * o / w : 0), (w > 0 ? 100 * (y[3] - x[3]) / tck / w : 0) }')
  OTHERS=${r% *} STEAL=${r#* }
}
SPID="" MARK="" OTHERS=0 STEAL=0 LAST=""
calm() { awk -v o="$OTHERS" -v s="$STEAL" -v m="$OTHERS_MAX" 'BEGIN { exit !(o + s <= m) }'; }

# 1. sgemm rate, and OpenBLAS's kernels: OpenBLAS picks them from a table of CPU models
# and falls back to its SSE3 ("Prescott") ones on a newer CPU; ember re-runs itself with
# the right OPENBLAS_CORETYPE (src/core/blas.c). The PyTorch peer and sgemm_peak get the
# same kernels.
cc -O2 bench/sgemm_peak.c -I/usr/include/x86_64-linux-gnu/openblas-pthread -lopenblas -o "$OUT/sgemm_peak"
core=$(env -u OPENBLAS_CORETYPE OPENBLAS_VERBOSE=2 OPENBLAS_NUM_THREADS=1 "$OUT/sgemm_peak" 2>&1 >/dev/null |
  sed -n 's/^Core: *//p' | head -n1)
# ember's pick for this CPU (src/core/blas.c) even when the environment carries an
# OPENBLAS_CORETYPE (a machine may set a common one, e.g. Haswell on an AVX-512 CPU,
# which cuts sgemm and the PyTorch peer by a third); BLAS_CORE=NAME chooses
OPENBLAS_CORETYPE=${BLAS_CORE:-$(env -u OPENBLAS_CORETYPE "$EMBER" version | sed -n 's/^blas_core=//p')}
export OPENBLAS_CORETYPE
core_used=$(OPENBLAS_VERBOSE=2 OPENBLAS_NUM_THREADS=1 "$OUT/sgemm_peak" 2>&1 >/dev/null | sed -n 's/^Core: *//p' | head -n1)
log "OpenBLAS kernels: $core_used (OpenBLAS alone picks $core)"
printf '{"detected":"%s","coretype_env":"%s","used":"%s"}\n' "$core" "$OPENBLAS_CORETYPE" "$core_used" > "$OUT/openblas.json"
if [[ -z "$RESUME" ]]; then : > "$OUT/sgemm.jsonl"; : > "$OUT/wrk.jsonl"; : > "$OUT/inproc.jsonl"; fi
touch "$OUT/sgemm.jsonl" "$OUT/wrk.jsonl" "$OUT/inproc.jsonl"
# sgemm_run ROUND: one sgemm measurement (median of 7 inside), retried as the others are;
# round 0 = before the rounds
sgemm_run() {
  local a
  for a in $(seq 0 "$RETRY"); do
    load > /dev/null
    cpu_mark
    OPENBLAS_NUM_THREADS=2 "$OUT/sgemm_peak" > "$OUT/.sgemm"
    others
    echo "{\"round\":$1,\"attempt\":$a,\"others_cpu_pct\":$OTHERS,\"steal_pct\":$STEAL,\"r\":$(cat "$OUT/.sgemm")}" >> "$OUT/sgemm.jsonl"
    if calm; then break; fi
  done
}
for r in $(seq "$REPS"); do sgemm_run 0; done
log "sgemm ($core_used kernels): $(tail -n1 "$OUT/sgemm.jsonl")"

# 2. checkpoints (Kaggle model, full cardinalities)
CK=$OUT/ckpt
MODEL=$CK/a/checkpoint.safetensors
MODEL_B=$CK/b/checkpoint.safetensors
if [[ -z "$RESUME" || ! -f "$MODEL" || ! -f "$MODEL_B" ]]; then
  free_kb=$(df -Pk "$OUT" | awk 'NR == 2 { print $4 }')
  if (( free_kb < 6 * 1024 * 1024 )); then
    echo "bench/serving.sh: need ~6 GB free under $OUT for two 2.2 GB checkpoints, have $((free_kb / 1024)) MB" >&2
    exit 1
  fi
  rm -rf "$CK"
  mkdir -p "$CK"
  $EMBER gen --out "$CK/data" --rows 20000 --test-rows 1000 --seed 1 > /dev/null
  $EMBER train --train "$CK/data/train.tsv" --train-limit 4096 --batch 128 --out "$CK/a" --quiet > /dev/null
  $EMBER train --train "$CK/data/train.tsv" --train-limit 2048 --batch 128 --seed 2 --out "$CK/b" --quiet > /dev/null
fi
log "checkpoints: $(du -h "$MODEL" | cut -f1) each"

# request bodies
B=$OUT/bodies
mkdir -p "$B"
mk() { [[ -n "$RESUME" && -s "$5" ]] && return 0; $PY bench/wrk/make_bodies.py --mode "$1" --per-request "$2" --requests "$3" --seed "$4" --out "$5" > /dev/null; }
mk bin 1 4096 1 "$B/bin1"
mk json 1 1024 2 "$B/json1"
mk bin 256 64 3 "$B/bin256"
mk bin 1024 16 4 "$B/bin1024"
mk bin 2048 8 5 "$B/bin2048"
mk json 256 16 6 "$B/json256"
rec=$((8 + 4 * 13 + 8 * 26))

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
# wrk_result NAME MODE PER_REQUEST THREADS CONNS RATE BUSY OTHERS STEAL [key=value ...]: appends
# the run's JSON line to $OUT/wrk.jsonl and echoes it. Failed requests: wrk's "Non-2xx or
# 3xx responses" and "Socket errors" lines.
wrk_result() {
  local name=$1 mode=$2 k=$3 t=$4 c=$5 rate=$6 l0=$7 oth=$8 stl=$9; shift 9
  local raw=$OUT/wrk_$name.txt j non2xx sock extra=""
  j=$(sed -n 's/^WRKJSON //p' "$raw")
  [[ -n "$j" ]] || { echo "wrk $name: no result" >&2; cat "$raw" >&2; return 1; }
  non2xx=$(sed -n 's/.*Non-2xx or 3xx responses: *\([0-9]*\).*/\1/p' "$raw"); non2xx=${non2xx:-0}
  sock=$(sed -n 's/.*Socket errors: connect \([0-9]*\), read \([0-9]*\), write \([0-9]*\), timeout \([0-9]*\).*/\1+\2+\3+\4/p' "$raw")
  sock=$((${sock:-0}))
  for kv in "$@"; do extra="$extra,\"${kv%%=*}\":${kv#*=}"; done
  local line="{\"name\":\"$name\",\"mode\":\"$mode\",\"per_request\":$k,\"threads\":$t,\"conns\":$c,\"rate_target\":$rate,\"busy_before\":$l0,\"others_cpu_pct\":$oth,\"steal_pct\":$stl,\"non2xx\":$non2xx,\"socket_errors\":$sock$extra,\"wrk\":$j}"
  echo "$line" >> "$OUT/wrk.jsonl"
  echo "$line"
}
# run_wrk NAME RATE THREADS CONNS SECONDS BODIES MODE PER_REQUEST [key=value ...]: one
# measurement, repeated up to RETRY times while others used more than OTHERS_MAX % of
# the CPUs during it (every attempt is kept in wrk.jsonl; the summary takes the least
# disturbed); echoes the last attempt's line
run_wrk() {
  local name=$1 rate=$2 t=$3 c=$4 d=$5 file=$6 mode=$7 k=$8; shift 8
  local l0 a line
  if [[ -n "$RESUME" ]] && grep -q "^{\"name\":\"$name\"," "$OUT/wrk.jsonl"; then
    grep "^{\"name\":\"$name\"," "$OUT/wrk.jsonl" | tail -n1
    return 0
  fi
  for a in $(seq 0 "$RETRY"); do
    l0=$(load)
    cpu_mark
    wrk_start "$name" "$rate" "$t" "$c" "$d" "$file" "$mode" "$k"
    wait "$WPID"
    others
    line=$(wrk_result "$name" "$mode" "$k" "$t" "$c" "$rate" "$l0" "$OTHERS" "$STEAL" "$@" "attempt=$a")
    if calm; then break; fi
    if [[ $a -lt $RETRY ]]; then log "  ($name disturbed: others $OTHERS%, steal $STEAL% of the CPUs; again)"; fi
  done
  echo "$line"
}
# inproc SIDE RUN BATCH THREADS COMMAND...: one in-process measurement (the command's
# last line is its JSON), retried as run_wrk does; sets LAST to the last attempt's JSON
inproc() {
  local side=$1 r=$2 b=$3 th=$4; shift 4
  local l0 a key="{\"side\":\"$side\",\"run\":$r,\"batch\":$b,\"threads\":$th,"
  if [[ -n "$RESUME" ]] && grep -qF "$key" "$OUT/inproc.jsonl"; then
    LAST=$(grep -F "$key" "$OUT/inproc.jsonl" | tail -n1 | sed 's/.*,"r"://; s/}$//')
    OTHERS=- STEAL=-
    return 0
  fi
  for a in $(seq 0 "$RETRY"); do
    l0=$(load)
    cpu_mark
    LAST=$("$@" | tail -n1)
    others
    echo "{\"side\":\"$side\",\"run\":$r,\"batch\":$b,\"threads\":$th,\"attempt\":$a,\"busy_before\":$l0,\"others_cpu_pct\":$OTHERS,\"steal_pct\":$STEAL,\"r\":$LAST}" >> "$OUT/inproc.jsonl"
    if calm; then break; fi
    if [[ $a -lt $RETRY ]]; then log "  ($side b$b run $r disturbed: others $OTHERS%, steal $STEAL% of the CPUs; again)"; fi
  done
}
# recorded NAME...: RESUME is set and every named wrk measurement is in wrk.jsonl
recorded() {
  [[ -n "$RESUME" ]] || return 1
  local n
  for n in "$@"; do grep -q "^{\"name\":\"$n\"," "$OUT/wrk.jsonl" || return 1; done
}
rps() { echo "$1" | grep -o '"requests_per_s":[0-9.]*' | cut -d: -f2; }
p99() { echo "$1" | grep -o '"p99":[0-9]*' | cut -d: -f2; }
oth() { echo "$1" | grep -o '"others_cpu_pct":[0-9.]*,"steal_pct":[0-9.]*' | sed 's/"others_cpu_pct":\([0-9.]*\),"steal_pct":\([0-9.]*\)/\1%, steal \2/'; }


# 3. peak-throughput sweep
IFS=';' read -r -a peak_cfgs <<< "$SERVE_PEAK"
IFS=';' read -r -a lat_cfgs <<< "$SERVE_LAT"
best_eps=0 best_cfg=0 best_k=0
for i in "${!peak_cfgs[@]}"; do
  # shellcheck disable=SC2086
  recorded "sweep_c${i}_bin256" "sweep_c${i}_bin1024" "sweep_c${i}_bin2048" "sweep_c${i}_json256" ||
    start_server "peak$i" ${peak_cfgs[$i]}
  for k in 256 1024 2048; do
    j=$(run_wrk "sweep_c${i}_bin$k" 0 2 4 "$SWEEP_DUR" "$B/bin$k" bin "$k" "cfg=$i" "phase=\"sweep\"")
    eps=$(awk -v r="$(rps "$j")" -v k="$k" 'BEGIN { printf "%.0f", r * k }')
    log "peak sweep [${peak_cfgs[$i]}] bin x$k: $eps examples/s, others $(oth "$j")%"
    if (( eps > best_eps )); then best_eps=$eps best_cfg=$i best_k=$k; fi
  done
  j=$(run_wrk "sweep_c${i}_json256" 0 2 4 "$SWEEP_DUR" "$B/json256" json 256 "cfg=$i" "phase=\"sweep\"")
  log "peak sweep [${peak_cfgs[$i]}] json x256: $(awk -v r="$(rps "$j")" 'BEGIN { printf "%.0f", r * 256 }') examples/s, others $(oth "$j")%"
  stop_server
done
log "best peak setting: [${peak_cfgs[$best_cfg]}] with $best_k examples per request"

# 4. alternating rounds
for r in $(seq "$REPS"); do
  sgemm_run "$r"
  for bt in 2048:2 1:2 1:1; do
    b=${bt%%:*} th=${bt#*:}
    stages=()
    [[ $b == 2048 ]] && stages=(--stages --vs-sgemm "$VS_SGEMM")
    inproc ember "$r" "$b" "$th" "$EMBER" bench --workload kaggle --infer --batch "$b" --threads "$th" "${stages[@]}"
    log "round $r ember in-process b$b ${th}t: $(echo "$LAST" | grep -o '"examples_per_s":[0-9.]*\|"us_p99":[0-9.]*' | tr '\n' ' ')others $OTHERS%, steal $STEAL%"
  done
  if [[ -z "${SKIP_TORCH:-}" ]]; then
    for b in 1 256 2048; do
      steps=()
      [[ $b == 1 ]] && steps=(--steps 5000)
      inproc torch "$r" "$b" 2 "$PY" bench/dlrm_torch.py infer --config kaggle --batch "$b" --threads 2 "${steps[@]}"
      log "round $r torch b$b: $(echo "$LAST" | grep -o '"examples_per_s": [0-9.]*\|"us_p99": [0-9.]*' | tr '\n' ' ')others $OTHERS%, steal $STEAL%"
    done
  fi
  # shellcheck disable=SC2086
  recorded "peak_r$r" || start_server "peak_best" ${peak_cfgs[$best_cfg]}
  j=$(run_wrk "peak_r$r" 0 2 4 "$DUR" "$B/bin$best_k" bin "$best_k" "cfg=$best_cfg" "phase=\"peak\"" "run=$r")
  log "round $r HTTP peak: $(awk -v r="$(rps "$j")" -v k="$best_k" 'BEGIN { printf "%.0f", r * k }') examples/s, others $(oth "$j")%"
  stop_server
  for i in "${!lat_cfgs[@]}"; do
    need=("lat_c${i}_r$r")
    [[ $r == 1 && $i == 0 ]] && need+=("lat_json_c$i")
    # shellcheck disable=SC2086
    recorded "${need[@]}" || start_server "lat$i" ${lat_cfgs[$i]}
    j=$(run_wrk "lat_c${i}_r$r" "$RATE" 1 8 "$DUR" "$B/bin1" bin 1 "cfg=$i" "phase=\"latency\"" "run=$r")
    log "round $r latency [${lat_cfgs[$i]}]: $(rps "$j") req/s, p99 $(p99 "$j") us, others $(oth "$j")%"
    if [[ $r == 1 && $i == 0 ]]; then
      j=$(run_wrk "lat_json_c$i" "$RATE" 1 8 "$DUR" "$B/json1" json 1 "cfg=$i" "phase=\"latency_json\"")
      log "JSON latency [${lat_cfgs[$i]}]: $(rps "$j") req/s, p99 $(p99 "$j") us"
    fi
    stop_server
  done
done

# 6. hot reload under load, twice: wrk posts single binary examples as fast as it can
# on 8 connections (its default 2 s timeout: a request answered later counts as a socket
# error) while the server is reloaded RELOADS times, first by POST /admin/reload
# (alternating the two checkpoints), then, in a second wrk run, by SIGHUP (reloads
# --model). wrk runs until the reloads are done, then gets SIGINT (it stops and prints
# its results).
: > "$OUT/reload.jsonl"
start_server reload
for how in POST SIGHUP; do
  l0=$(load)
  cpu_mark
  wrk_start "reload_$how" 0 1 8 3600 "$B/bin1" bin 1
  sleep 5
  for n in $(seq "$RELOADS"); do
    t0=$(date +%s.%N)
    if [[ $how == POST ]]; then
      m=$MODEL_B; (( n % 2 == 0 )) && m=$MODEL
      code=$(curl -s -o "$OUT/reload_$n.out" -w '%{http_code}' -X POST "http://127.0.0.1:$PORT/admin/reload" -d "{\"model\": \"$m\"}")
      ans=$(cat "$OUT/reload_$n.out"); [[ -n "$ans" ]] || ans=null
      ok=false; [[ $code == 200 ]] && ok=true
    else
      m=$MODEL
      before=$(grep -c "SIGHUP" "$OUT/serve_reload.err" || true)
      kill -HUP "$SPID"
      for _ in $(seq 1200); do (( $(grep -c "SIGHUP" "$OUT/serve_reload.err" || true) > before )) && break; sleep 0.1; done
      msg=$(grep "SIGHUP" "$OUT/serve_reload.err" | tail -n1 || true)
      ans=$($PY -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$msg")
      code=null ok=false; [[ "$msg" == *reloaded* ]] && ok=true
    fi
    t1=$(date +%s.%N)
    echo "{\"n\":$n,\"how\":\"$how\",\"model\":\"$m\",\"ok\":$ok,\"http_code\":$code,\"seconds\":$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }'),\"answer\":$ans}" >> "$OUT/reload.jsonl"
    log "reload $how $n ($m): $ok in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s: $ans"
    sleep 2
  done
  sleep 3
  kill -INT "$WPID"
  wait "$WPID" || true
  others
  j=$(wrk_result "reload_$how" bin 1 1 8 0 "$l0" "$OTHERS" "$STEAL" "phase=\"reload\"" "how=\"$how\"")
  log "reload by $how under load: $(echo "$j" | grep -o '"non2xx":[0-9]*,"socket_errors":[0-9]*'), $(rps "$j") req/s, p99 $(p99 "$j") us, max $(echo "$j" | grep -o '"max":[0-9]*' | cut -d: -f2) us"
done
curl -s "http://127.0.0.1:$PORT/metrics" > "$OUT/reload_metrics.txt"
stop_server
[[ -n "${KEEP_CKPT:-}" ]] || rm -rf "$CK" # 4.4 GB; RESUME makes them again

# 7. summary
$PY - "$OUT" "$SERVE_PEAK" "$SERVE_LAT" "$RATE" "$OTHERS_MAX" <<'PYEOF'
import json, os, statistics, sys
out, peak_cfgs, lat_cfgs, rate = sys.argv[1], sys.argv[2].split(";"), sys.argv[3].split(";"), float(sys.argv[4])
omax = float(sys.argv[5])
med = statistics.median
rd = lambda p: [json.loads(l) for l in open(os.path.join(out, p)) if l.strip()]
sgx, inproc, wrk, reload = rd("sgemm.jsonl"), rd("inproc.jsonl"), rd("wrk.jsonl"), rd("reload.jsonl")
sg = [x["r"] for x in sgx]
dist = lambda x: x["others_cpu_pct"] + x["steal_pct"]

def least_disturbed(xs, key):
    """Of the attempts of one measurement (same key), the one others disturbed least."""
    best = {}
    for x in xs:
        k = key(x)
        if k not in best or dist(x) < dist(best[k]):
            best[k] = x
    return list(best.values())

inproc = least_disturbed(inproc, lambda x: (x["side"], x["batch"], x["threads"], x["run"]))
wrk = least_disturbed(wrk, lambda x: x["name"])
cpu = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")]
res = {"machine": {"cpus": os.cpu_count(), "model": cpu[0] if cpu else None},
       "openblas": json.load(open(os.path.join(out, "openblas.json")))}
res["sgemm_gflops"] = max(r["sgemm_gflops"] for r in sg)
res["sgemm_gflops_median"] = med(r["sgemm_gflops"] for r in sg)
res["sgemm_runs"] = [r["sgemm_gflops"] for r in sg]
res["sgemm_others_steal_pct_runs"] = [[x["others_cpu_pct"], x["steal_pct"]] for x in sgx]
sgc = [x["r"]["sgemm_gflops"] for x in sgx if dist(x) <= omax]
res["sgemm_gflops_undisturbed_median"] = med(sgc) if sgc else None
res["dlrm_gemm_gflops"] = max(r["dlrm_gemm_gflops"] for r in sg)
g = lambda v: float("%.5g" % v)

def side(s, b, th=2):
    return sorted((x for x in inproc if x["side"] == s and x["batch"] == b and x["threads"] == th), key=lambda x: x["run"])

def summ(xs, keys):
    """Medians over the runs (each run: its least disturbed attempt); runs where others
    and steal took more than OTHERS_MAX % of the CPUs are listed as disturbed, and the
    first key's median over the other runs is given too."""
    d = {"runs": len(xs)}
    for k in keys:
        d[k] = g(med(x["r"][k] for x in xs))
        d[k + "_runs"] = [g(x["r"][k]) for x in xs]
    d["others_steal_pct_runs"] = [[x["others_cpu_pct"], x["steal_pct"]] for x in xs]
    d["disturbed_runs"] = [x["run"] for x in xs if dist(x) > omax]
    calm = [x for x in xs if dist(x) <= omax]
    if calm and len(calm) < len(xs):
        d[keys[0] + "_undisturbed"] = g(med(x["r"][keys[0]] for x in calm))
    return d

ekeys = ["examples_per_s", "ms_per_batch", "gflops", "us_p50", "us_p99", "ms_embed", "ms_dense", "dense_gflops"]
tkeys = ["examples_per_s", "ms_per_batch", "us_p50", "us_p99"]
ip = {}
for name, s_, b, th in (("ember_b2048", "ember", 2048, 2), ("ember_b1", "ember", 1, 2), ("ember_b1_1thread", "ember", 1, 1)):
    if side(s_, b, th):
        ip[name] = summ(side(s_, b, th), ekeys)
e0 = side("ember", 2048)[0]["r"]
res["fwd_flop_per_example"] = e0["fwd_flop_per_example"]
res["fwd_flop_breakdown"] = {"mlp": e0["mlp_flop"], "interaction": e0["interaction_flop"]}
eb = ip["ember_b2048"]
eb["fraction_of_sgemm"] = round(eb["gflops"] / res["sgemm_gflops"], 4)
if sgc:
    eb["fraction_of_sgemm_undisturbed_median"] = round(eb["gflops"] / med(sgc), 4)
# the machine's speed drifts: each round's in-process figure against the sgemm rate
# measured just before it in the same round
fr = []
for x in side("ember", 2048):
    rs = [y["r"]["sgemm_gflops"] for y in sgx if y.get("round") == x["run"]]
    if rs:
        fr.append(round(x["r"]["gflops"] / max(rs), 4))
if fr:
    eb["fraction_of_same_round_sgemm_runs"] = fr
    eb["fraction_of_same_round_sgemm"] = round(med(fr), 4)
st = [x["r"]["stages"] for x in side("ember", 2048) if "stages" in x["r"]]
if st:
    tot = [sum(y["ms"] for y in z) for z in st]
    eb["stages"] = [{"name": z["name"], "in": z["in"], "out": z["out"], "ms": g(med(q[k]["ms"] for q in st)),
                     "gflops": g(med(q[k]["gflops"] for q in st)),
                     "share": round(med(q[k]["ms"] / t for q, t in zip(st, tot)), 4)} for k, z in enumerate(st[0])]
eb["dense_fraction_of_sgemm"] = round(eb["dense_gflops"] / res["sgemm_gflops"], 4)
# the model-shape roofline: the forward's own GEMMs, one OpenBLAS call per layer over the
# batch on 2 OpenBLAS threads, timed in the same process (ember bench --infer)
rf = [x["r"]["gemm_roofline_gflops"] for x in side("ember", 2048) if "gemm_roofline_gflops" in x["r"]]
if rf:
    eb["gemm_roofline_gflops_runs"] = rf
    eb["fraction_of_gemm_roofline_runs"] = [round(x["r"]["gflops"] / x["r"]["gemm_roofline_gflops"], 4)
                                            for x in side("ember", 2048) if "gemm_roofline_gflops" in x["r"]]
    eb["fraction_of_gemm_roofline"] = round(med(eb["fraction_of_gemm_roofline_runs"]), 4)
# the paired measurement (ember bench --vs-sgemm): sgemm 2048x512x512 and em_infer in turn
# in one process, the ratio per pair; all rounds' pairs pooled
vs = [x["r"]["vs_sgemm"] for x in side("ember", 2048) if "vs_sgemm" in x["r"]]
if vs:
    rs = sorted(r for v in vs for r in v["ratios"])
    q = statistics.quantiles(rs, n=4) if len(rs) > 1 else [rs[0]] * 3
    eb["vs_sgemm"] = {"rounds": len(vs), "pairs": len(rs), "ratio_median": round(med(rs), 4),
                      "ratio_min": rs[0], "ratio_max": rs[-1], "ratio_q1": round(q[0], 4), "ratio_q3": round(q[2], 4),
                      "ratio_median_runs": [v["ratio_median"] for v in vs],
                      "sgemm_gflops_median": g(med(s for v in vs for s in v["sgemm_gflops_runs"])),
                      "sgemm_gflops_best": max(v["sgemm_gflops_best"] for v in vs),
                      "infer_gflops_median": g(med(s for v in vs for s in v["infer_gflops_runs"])),
                      "infer_gflops_best": max(v["infer_gflops_best"] for v in vs)}
torch_best, torch_best_b = 0, None
for b in (1, 256, 2048):
    if side("torch", b):
        ip["torch_b%d" % b] = summ(side("torch", b), tkeys)
        if ip["torch_b%d" % b]["examples_per_s"] > torch_best:
            torch_best, torch_best_b = ip["torch_b%d" % b]["examples_per_s"], b
res["inprocess"] = ip
res["torch_best_examples_per_s"] = torch_best or None
res["torch_best_batch"] = torch_best_b

def w(x):
    lat = x["wrk"]["latency_us"]
    return {"requests_per_s": x["wrk"]["requests_per_s"], "examples_per_s": round(x["wrk"]["requests_per_s"] * x["per_request"], 1),
            "p50_ms": lat["p50"] / 1e3, "p90_ms": lat["p90"] / 1e3, "p99_ms": lat["p99"] / 1e3, "p99_9_ms": lat["p99_9"] / 1e3,
            "non2xx": x["non2xx"], "socket_errors": x["socket_errors"], "requests": x["wrk"]["requests"],
            "others_pct": x["others_cpu_pct"], "steal_pct": x["steal_pct"]}

res["peak_sweep"] = [dict(serve=peak_cfgs[x["cfg"]], mode=x["mode"], per_request=x["per_request"], conns=x["conns"], **w(x))
                     for x in wrk if x.get("phase") == "sweep"]
pk = sorted((x for x in wrk if x.get("phase") == "peak"), key=lambda x: x["run"])
if pk:
    res["http_peak"] = {"serve": peak_cfgs[pk[0]["cfg"]], "per_request": pk[0]["per_request"], "conns": pk[0]["conns"],
                        "examples_per_s": g(med(w(x)["examples_per_s"] for x in pk)),
                        "examples_per_s_runs": [w(x)["examples_per_s"] for x in pk],
                        "p99_ms_runs": [w(x)["p99_ms"] for x in pk],
                        "others_steal_pct_runs": [[x["others_cpu_pct"], x["steal_pct"]] for x in pk],
                        "best_of_sweep_and_runs": max([w(x)["examples_per_s"] for x in pk] +
                                                      [y["examples_per_s"] for y in res["peak_sweep"]])}
lat = {}
for i, c in enumerate(lat_cfgs):
    xs = [w(x) for x in sorted(wrk, key=lambda x: x.get("run", 0)) if x.get("phase") == "latency" and x["cfg"] == i]
    if xs:
        lat[c] = {"rate_target": rate, "runs": len(xs),
                  **{k: g(med(x[k] for x in xs)) for k in ("requests_per_s", "p50_ms", "p90_ms", "p99_ms", "p99_9_ms")},
                  "p99_ms_runs": [x["p99_ms"] for x in xs], "p50_ms_runs": [x["p50_ms"] for x in xs],
                  "requests_per_s_runs": [x["requests_per_s"] for x in xs],
                  "errors": sum(x["non2xx"] + x["socket_errors"] for x in xs),
                  "others_steal_pct_runs": [[x["others_pct"], x["steal_pct"]] for x in xs]}
res["latency"] = lat
best_lat = min(lat, key=lambda c: lat[c]["p99_ms"]) if lat else None
res["latency_best_setting"] = best_lat
# one server for both figures: the HTTP peak's setting, measured at 1,000 req/s too
pk_cfg = peak_cfgs[pk[0]["cfg"]] if pk else None
if pk_cfg in lat:
    res["latency_of_peak_setting"] = {"serve": pk_cfg, **{k: lat[pk_cfg][k] for k in ("p50_ms", "p99_ms", "p99_ms_runs", "requests_per_s")}}
lj = [w(x) for x in wrk if x.get("phase") == "latency_json"]
if lj:
    res["latency_json"] = lj[0]
ru = {}
for how in ("POST", "SIGHUP"):
    xs = [x for x in wrk if x.get("phase") == "reload" and x.get("how") == how]
    if xs:
        x = xs[0]
        ru[how] = {"reloads": [r for r in reload if r["how"] == how], "wrk": dict(w(x), max_ms=x["wrk"]["latency_us"]["max"] / 1e3),
                   "timeouts": x["wrk"]["errors"]["timeout"], "failed_requests": x["non2xx"] + x["socket_errors"]}
res["reload_under_load"] = ru
ratio = res["http_peak"]["examples_per_s"] / torch_best if torch_best and pk else None
res["http_peak_vs_torch_best"] = round(ratio, 2) if ratio else None
if torch_best:
    res["inprocess_b2048_vs_torch_best"] = round(eb["examples_per_s"] / torch_best, 2)
if "torch_b1" in ip and "ember_b1_1thread" in ip:
    res["inprocess_b1_vs_torch_b1"] = round(ip["ember_b1_1thread"]["examples_per_s"] / ip["torch_b1"]["examples_per_s"], 2)
reload_ok = all(v["failed_requests"] == 0 for v in ru.values()) and all(r["ok"] for r in reload)
L = lat.get(best_lat, {})
res["targets"] = {
    "p99_le_1ms_at_1000rps": bool(L and L["p99_ms"] <= 1.0 and L["requests_per_s"] >= 0.95 * rate),
    "p99_le_1ms_with_the_peak_setting": bool(pk_cfg in lat and lat[pk_cfg]["p99_ms"] <= 1.0
                                             and lat[pk_cfg]["requests_per_s"] >= 0.95 * rate),
    "http_peak_ge_2x_torch_best": bool(ratio and ratio >= 2.0),
    "inprocess_ge_80pct_sgemm": eb["fraction_of_sgemm"] >= 0.8,
    "inprocess_ge_80pct_sgemm_paired": bool("vs_sgemm" in eb and eb["vs_sgemm"]["ratio_median"] >= 0.8),
    "reload_zero_failures": reload_ok,
    "reload_zero_failures_by_how": {h: v["failed_requests"] == 0 and all(r["ok"] for r in v["reloads"]) for h, v in ru.items()},
}
e = sys.stderr
print("sgemm %.1f GFLOP/s best (%.1f median; %s kernels); in-process b2048 %.0f ex/s = %.1f GFLOP/s = %.1f%% of sgemm"
      % (res["sgemm_gflops"], res["sgemm_gflops_median"], res["openblas"]["used"], eb["examples_per_s"], eb["gflops"],
         100 * eb["fraction_of_sgemm"]), file=e)
if "fraction_of_gemm_roofline" in eb:
    print("in-process b2048 against the model's own GEMMs (OpenBLAS, one call per layer): %.1f%%; same-round sgemm: %s"
          % (100 * eb["fraction_of_gemm_roofline"], eb.get("fraction_of_same_round_sgemm")), file=e)
if "vs_sgemm" in eb:
    v = eb["vs_sgemm"]
    print("in-process b2048 / sgemm, paired in one process: median %.3f over %d pairs (quartiles %.3f-%.3f, range %.3f-%.3f); "
          "sgemm median %.1f best %.1f, em_infer median %.1f best %.1f GFLOP/s"
          % (v["ratio_median"], v["pairs"], v["ratio_q1"], v["ratio_q3"], v["ratio_min"], v["ratio_max"],
             v["sgemm_gflops_median"], v["sgemm_gflops_best"], v["infer_gflops_median"], v["infer_gflops_best"]), file=e)
if torch_best:
    print("PyTorch best %.0f ex/s (batch %d); HTTP peak %.0f ex/s (%.2fx)"
          % (torch_best, torch_best_b, res["http_peak"]["examples_per_s"], ratio or 0), file=e)
if L:
    print("latency at %.0f req/s [%s]: %.0f req/s achieved, p50 %.3f p99 %.3f ms"
          % (rate, best_lat, L["requests_per_s"], L["p50_ms"], L["p99_ms"]), file=e)
for h, v in ru.items():
    print("reload by %s under load: %d failed (%d timeouts) of %d requests; %d of %d reloads ok"
          % (h, v["failed_requests"], v["timeouts"], v["wrk"]["requests"], sum(r["ok"] for r in v["reloads"]), len(v["reloads"])), file=e)
print("targets: %s" % res["targets"], file=e)
print(json.dumps(res))
PYEOF

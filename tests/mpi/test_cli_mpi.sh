#!/usr/bin/env bash
# test_cli_mpi.sh EMBER MPIRUN - `mpirun -np N ember train` end to end (CTest runs it):
#   - 2 ranks, row-wise tables, 40 steps: a checkpoint and report.json; the same run
#     again gives a bitwise-identical checkpoint (deterministic);
#   - that checkpoint resumed on 4 ranks with table-wise tables (resharding across world
#     sizes); its test AUC equals what one process (ember eval) computes from the
#     checkpoint it wrote; one process also resumes from it;
#   - the planner's placement (--sharding auto) and fp16 all-to-all train;
#   - 2D sparse parallelism (4 ranks in 2 replica groups) trains and checkpoints;
#   - bad options fail with exit code 2 and a message.
set -euo pipefail
EMBER=$1
MPIRUN=$2
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
ROWS=9,12,30,5,40,3,8,25,4,1000,7,11,20,6,15,50,3,9,13,4,35,6,10,18,5,22
"$EMBER" gen --out "$T/d" --rows 4000 --test-rows 1000 --seed 2 --cardinality "$ROWS" > /dev/null
common=(--train "$T/d/train.tsv" --test "$T/d/test.tsv" --rows "$ROWS" --threads 1 --quiet
        --dim 8 --bot 13-32-8 --top 359-32-1 --dense-opt adagrad --sparse-opt rowwise_adagrad --lr 0.02)
mp() { local np=$1; shift; "$MPIRUN" --oversubscribe -np "$np" "$EMBER" "$@"; }

mp 2 train "${common[@]}" --batch 32 --sharding row --max-steps 40 --out "$T/a" > "$T/a.out"
grep -q '"steps":40' "$T/a/report.json" || fail "2 ranks: report.json: $(cat "$T/a/report.json")"
grep -q '^placement: 0 table-wise, 26 row-wise, 0 column-wise' "$T/a.out" || fail "2 ranks: placement: $(cat "$T/a.out")"
mp 2 train "${common[@]}" --batch 32 --sharding row --max-steps 40 --out "$T/a2" > /dev/null
cmp -s "$T/a/checkpoint.safetensors" "$T/a2/checkpoint.safetensors" || fail "two identical runs gave different checkpoints"
echo "ok   2 ranks, row-wise, deterministic"

mp 4 train "${common[@]}" --batch 16 --sharding table --resume "$T/a/checkpoint.safetensors" --out "$T/b" > "$T/b.out"
auc_dist=$(sed -n 's/^test *AUC \([0-9.]*\).*/\1/p' "$T/b.out")
[[ -n "$auc_dist" ]] || fail "4 ranks: no test AUC: $(cat "$T/b.out")"
grep -q '"world":4' "$T/b/report.json" || fail "4 ranks: report.json"
auc_one=$("$EMBER" eval --model "$T/b/checkpoint.safetensors" --test "$T/d/test.tsv" | sed -n 's/.*"auc":\([0-9.]*\).*/\1/p')
python3 -c "import sys; a, b = float('$auc_dist'), float('$auc_one'); sys.exit(0 if abs(a - b) < 1e-4 else 1)" ||
  fail "AUC of the distributed evaluation $auc_dist != one process's $auc_one"
"$EMBER" train "${common[@]}" --threads 2 --batch 64 --resume "$T/b/checkpoint.safetensors" --epochs 2 --out "$T/c" > /dev/null ||
  fail "one process cannot resume from a distributed checkpoint"
echo "ok   2 ranks -> 4 ranks (row-wise -> table-wise) -> one process; AUC $auc_dist = $auc_one"

mp 2 train "${common[@]}" --batch 32 --comm-prec fp16 --max-steps 20 --out "$T/e" > "$T/e.out"
grep -q 'planner' "$T/e.out" || fail "auto placement not from the planner: $(cat "$T/e.out")"
grep -q '"comm_prec":"fp16"' "$T/e/report.json" || fail "fp16: report.json"
echo "ok   planner placement, fp16 all-to-all"

mp 4 train "${common[@]}" --batch 16 --sharding row --group 2 --sync-every 3 --max-steps 20 --out "$T/f" > "$T/f.out" 2> "$T/f.err"
grep -q '2 replica groups of 2 ranks' "$T/f.err" || fail "2D: $(cat "$T/f.err")"
grep -q '"group":2' "$T/f/report.json" || fail "2D: report.json: $(cat "$T/f/report.json")"
"$EMBER" eval --model "$T/f/checkpoint.safetensors" --test "$T/d/test.tsv" > /dev/null || fail "2D checkpoint not readable by one process"
echo "ok   2D: 2 replica groups of 2 ranks"

mp 2 train "${common[@]}" --sparse-opt adagrad --batch 32 --sharding column --max-steps 10 --out "$T/g" > "$T/g.out"
grep -q '26 column-wise' "$T/g.out" || fail "column-wise: $(cat "$T/g.out")"
echo "ok   column-wise"

set +e
mp 2 train "${common[@]}" --sharding diagonal --out "$T/x" > /dev/null 2> "$T/x.err"; rc=$?
set -e
[[ $rc -ne 0 ]] && grep -q "sharding 'diagonal'" "$T/x.err" || fail "bad --sharding: rc $rc, $(cat "$T/x.err")"
set +e
mp 2 train --rows "$ROWS" --threads 1 --out "$T/y" > /dev/null 2> "$T/y.err"; rc=$?
set -e
[[ $rc -ne 0 ]] && grep -q "train is required" "$T/y.err" || fail "no --train: rc $rc, $(cat "$T/y.err")"
echo "ok   bad options"

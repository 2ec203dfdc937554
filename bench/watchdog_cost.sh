#!/usr/bin/env bash
# Cost of the collective watchdog (parallel.timeout_s): the tiny demo on 2 ranks with the
# watchdog off (0) and on (600 s), interleaved ROUNDS times; prints the mean tokens/s of each
# and their ratio. The watchdog is a deadline compared inside the existing polling wait, so
# the ratio should be 1 within noise.
#   bench/watchdog_cost.sh [ROUNDS] [STEPS]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROUNDS="${1:-3}"
STEPS="${2:-60}"
run() {  # run TIMEOUT -> mean tokens/s after the first step
  local out
  out="$(mktemp -d)"
  OMP_NUM_THREADS=1 mpirun --allow-run-as-root --oversubscribe --bind-to none -n 2 \
    "$ROOT/build/moeforge" train --config "$ROOT/configs/tiny.yaml" --set train.steps="$STEPS" \
    --set train.warmup_steps=5 --set checkpoint.every=0 --set train.eval_every=0 \
    --set parallel.timeout_s="$1" --set train.out_dir="$out" 2>&1 |
    awk -F'|' '/^step/ && NR > 2 {gsub(/tok\/s/, "", $7); s += $7; n++} END {printf "%.0f", s / n}'
  rm -rf "$out"
}
off=0; on=0
for ((r = 1; r <= ROUNDS; r++)); do
  a="$(run 0)"; b="$(run 600)"
  echo "round $r: watchdog off $a tok/s, on $b tok/s"
  off=$((off + a)); on=$((on + b))
done
awk -v a="$off" -v b="$on" -v n="$ROUNDS" \
  'BEGIN {printf "mean: off %.0f tok/s, on %.0f tok/s, on/off %.3f\n", a / n, b / n, b / a}'

#!/usr/bin/env bash
# Memory per rank at several ep_size on the same number of ranks (issue 21: expert parallelism
# must not hold more per rank than data parallelism, and less as ep grows).
#
#   bench/ep_memory.sh [NP] [EP_SIZES] [STEPS] [CONFIG] [extra --set overrides...]
#   bench/ep_memory.sh 4 "1 2 4" 30 configs/tiny.yaml
#   MOEFORGE_BIN=/other/build/moeforge bench/ep_memory.sh ...   # another build (before/after)
#
# Per ep_size, one `moeforge train` under mpirun (eval and checkpoints off). Prints the trainer's
# peak_memory_mib (peak RSS, max over ranks, metrics.jsonl) and, sampled every 0.5 s from
# /proc/PID/smaps_rollup of this run's own ranks, the largest Rss, Pss and private (clean+dirty)
# memory of any rank. Rss counts the shared pages of the libraries (~200 MiB here, the same in
# every rank) in full; Pss splits them between the ranks; private excludes them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NP="${1:-2}"
EPS="${2:-1 $NP}"
STEPS="${3:-30}"
CONFIG="${4:-$ROOT/configs/tiny.yaml}"
shift $(($# >= 4 ? 4 : $#))
BIN="${MOEFORGE_BIN:-$ROOT/build/moeforge}"

# Largest value (kB) of each smaps_rollup field over the ranks, kept in the file $1.
sample() {
  local launcher=$1 file=$2 pid line
  for pid in $(pgrep -P "$launcher" || true); do
    line="$(awk '/^Rss:/ {r = $2} /^Pss:/ {p = $2} /^Private_(Clean|Dirty):/ {v += $2}
      END {if (r) print r, p, v}' "/proc/$pid/smaps_rollup" 2>/dev/null || true)"
    if [[ -n "$line" ]]; then echo "$line" >>"$file"; fi  # a rank may just have exited
  done
}

printf "%-8s %-8s %-18s %-12s %-12s %-12s\n" ranks ep_size peak_memory_mib max_rss_mib \
  max_pss_mib max_private_mib
for EP in $EPS; do
  OUT_DIR="$(mktemp -d)"
  mpirun --allow-run-as-root --oversubscribe -n "$NP" "$BIN" train \
    --config "$CONFIG" --set train.steps="$STEPS" --set parallel.ep_size="$EP" \
    --set checkpoint.every=0 --set train.eval_every=0 --set train.out_dir="$OUT_DIR/run" "$@" \
    >"$OUT_DIR/log" 2>&1 &
  LAUNCHER=$!
  while kill -0 "$LAUNCHER" 2>/dev/null; do
    sample "$LAUNCHER" "$OUT_DIR/samples"
    sleep 0.5
  done
  wait "$LAUNCHER" || { echo "ep_size $EP failed (log: $OUT_DIR/log)"; continue; }
  peak="$(grep -o '"peak_memory_mib":[0-9.]*' "$OUT_DIR/run/metrics.jsonl" | tail -1 | cut -d: -f2)"
  read -r rss pss private < <(awk '$1 > r {r = $1} $2 > p {p = $2} $3 > v {v = $3}
    END {printf "%d %d %d\n", r / 1024, p / 1024, v / 1024}' "$OUT_DIR/samples")
  printf "%-8s %-8s %-18.0f %-12s %-12s %-12s\n" "$NP" "$EP" "$peak" "$rss" "$pss" "$private"
  rm -rf "$OUT_DIR"
done

#!/usr/bin/env bash
# Resident memory of every rank over a long training run: proves that memory stays flat (the
# expert-parallel leak of issue 20 grew ~27 MB per step on configs/tiny.yaml at ep_size 2).
#
#   bench/rss_long_run.sh [STEPS] [NP] [extra --set overrides...]
#
# Samples VmRSS of each moeforge rank every 2 s next to the last step printed, and prints a
# table of (step, max RSS over ranks in MiB) plus the growth from the first sample after
# step 50 to the end.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STEPS="${1:-500}"
NP="${2:-2}"
shift $(($# >= 2 ? 2 : $#))
LOG="$(mktemp)"
OUT_DIR="$(mktemp -d)"
mpirun --allow-run-as-root --oversubscribe -n "$NP" "$ROOT/build/moeforge" train \
  --config "$ROOT/configs/tiny.yaml" --set train.steps="$STEPS" --set parallel.ep_size="$NP" \
  --set checkpoint.every=0 --set train.eval_every=0 --set train.out_dir="$OUT_DIR" "$@" >"$LOG" 2>&1 &
LAUNCHER=$!
echo "step  max_rss_mib"
while kill -0 "$LAUNCHER" 2>/dev/null; do
  sleep 2
  step="$(grep -oE '^step +[0-9]+' "$LOG" | tail -1 | grep -oE '[0-9]+$' || true)"
  rss=0
  for pid in $(pgrep -f "build/moeforge train" || true); do
    kb="$(awk '/VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)"
    ((kb > rss)) && rss=$kb
  done
  [[ -n "$step" && "$rss" -gt 0 ]] && echo "$step $((rss / 1024))"
done | tee "$LOG.rss"
wait "$LAUNCHER" || echo "training exited with status $? (log: $LOG)"
awk '$1 ~ /^[0-9]+$/ && $1 >= 50 && !first {first = $2; s = $1} $1 ~ /^[0-9]+$/ {last = $2; l = $1}
  END {printf "RSS after step %d: %d MiB; after step %d: %d MiB; growth %+d MiB\n", s, first, l, last, last - first}' "$LOG.rss"
rm -rf "$OUT_DIR"

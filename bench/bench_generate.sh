#!/usr/bin/env bash
# KV cache vs recomputing the prefix: tokens/s of `moeforge generate` (greedy) on a run, both
# ways in interleaved rounds, medians and the ratio. The outputs must be identical (checked).
#   bench/bench_generate.sh RUN_DIR [NEW_TOKENS=120] [ROUNDS=3]   (prompt + tokens ≤ max_seq_len)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN="${1:?usage: bench/bench_generate.sh RUN_DIR [NEW_TOKENS] [ROUNDS]}"
TOKENS="${2:-120}"
ROUNDS="${3:-3}"
BIN="$ROOT/build/moeforge"
rate() { sed -n 's/.* \([0-9.]*\) tokens\/s.*/\1/p' "$1"; }
declare -a cached uncached
for ((r = 0; r < ROUNDS; r++)); do
  for mode in cache nocache; do
    flag=""; [[ $mode == nocache ]] && flag="--no-cache"
    OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" "$BIN" generate --from "$RUN" --prompt "The " \
      --max-tokens "$TOKENS" --ids $flag >"/tmp/bench_generate.$mode.out" 2>"/tmp/bench_generate.$mode.err" ||
      { cat "/tmp/bench_generate.$mode.err" >&2; exit 1; }
    if [[ $mode == cache ]]; then cached+=("$(rate /tmp/bench_generate.cache.err)")
    else uncached+=("$(rate /tmp/bench_generate.nocache.err)"); fi
  done
  cmp -s /tmp/bench_generate.cache.out /tmp/bench_generate.nocache.out ||
    { echo "outputs differ between cache and no cache" >&2; exit 1; }
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mc="$(median "${cached[@]}")"; mu="$(median "${uncached[@]}")"
echo "generate $TOKENS tokens, greedy, $ROUNDS interleaved rounds (tokens/s: cache ${cached[*]} | no cache ${uncached[*]})"
echo "median tokens/s: KV cache $mc, no cache $mu, ratio $(awk -v a="$mc" -v b="$mu" 'BEGIN {printf "%.2f", a / b}')x (outputs identical)"

#!/bin/bash
# End-to-end tokens/s of configs/small.yaml on 2 emulated nodes x 1 rank (ep_size 2: the expert
# all-to-all and the gradient all-reduce cross the link), overlap off (parallel.comm_worker
# false) and on (overlap_degree 2) at each link rate, plus the bytes each step put on the link
# (total, and each node's sent bytes: one direction of the full-duplex link each):
#
#   launch/cluster.sh run --nodes 2 --slots 1 -- bench/cluster_e2e.sh
#   RATES="off 25gbit 5gbit 1gbit 400mbit" STEPS=4 OUT=/tmp/e2e  (defaults)
#   MODES="off:parallel.comm_worker=false on:parallel.overlap_degree=2"  (default)
#       space-separated LABEL:KEY=VALUE[,KEY=VALUE...], each KEY=VALUE passed as --set
#   BURST=BYTES tbf burst (default: launch/cluster.sh's, rate x 1 ms and at least 256 KiB)
#   RESUME=DIR  resume every run from this checkpoint (e.g. runs/small/checkpoints/step-00000120)
#       and run STEPS steps after it: routing as trained, not as initialised. From the initial
#       weights small.yaml's router collapses within a few steps (MaxVio 7: every token's picks
#       on one EP rank), so each exchange runs one way and one rank does all expert work.
# Step time = median of steps 3.. (the first two include start-up).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
B="${B:-$ROOT/build/moeforge}"
C="$ROOT/launch/cluster.sh"
STEPS="${STEPS:-4}"
OUT="${OUT:-/tmp/moeforge-cluster-e2e}"
if [[ -n ${RESUME:-} ]]; then
  first=$(python3 -c "import json; print(json.load(open('$RESUME/checkpoint.json'))['step'])")
  A="train --config $ROOT/configs/small.yaml --resume $RESUME --set train.steps=$((first + STEPS))
     --set train.eval_every=0 --set checkpoint.every=0 --set parallel.ep_size=2"
else
  A="train --config $ROOT/configs/small.yaml --set train.steps=$STEPS --set train.warmup_steps=2
     --set train.eval_every=0 --set checkpoint.every=0 --set parallel.ep_size=2"
fi
mkdir -p "$OUT"
MODE_LIST=()
for m in ${MODES:-off:parallel.comm_worker=false on:parallel.overlap_degree=2}; do
  sets=${m#*:}; MODE_LIST+=("${m%%:*}:--set ${sets//,/ --set }")
done
# Bytes each node has sent so far ("node0 node1 ..."): each is one direction of the link.
sent() { "$C" traffic "$MOEFORGE_CLUSTER" | awk '{printf "%s ", $3}'; }
for rate in ${RATES:-off 25gbit 5gbit 1gbit 400mbit}; do
  "$C" shape "$MOEFORGE_CLUSTER" "$rate" ${BURST:-}
  for mode in "${MODE_LIST[@]}"; do
    m=${mode%%:*}; extra=${mode#*:}; run="$OUT/$rate-$m"
    b0=$(sent)
    rm -rf "$run"
    # shellcheck disable=SC2086
    "$C" mpirun -n 2 -x OMP_NUM_THREADS=1 --bind-to none "$B" $A $extra \
      --set train.out_dir="$run" >"$run.log" 2>&1 || { echo "FAIL $rate $m"; tail -5 "$run.log"; continue; }
    b1=$(sent)
    rm -rf "$run/checkpoints"  # the final checkpoint (~0.4 GB for small.yaml) is not needed
    step=$(python3 -c "
import json, statistics
rows = [json.loads(l) for l in open('$run/metrics.jsonl')]
print('%.3f' % statistics.median([r['step_seconds'] for r in rows if 'step_seconds' in r][2:]))")
    per_node=$(python3 -c "
b0 = [int(x) for x in '$b0'.split()]; b1 = [int(x) for x in '$b1'.split()]
d = [(y - x) / $STEPS / 1e6 for x, y in zip(b0, b1)]
print('%.0f (%s)' % (sum(d), ' / '.join('%.0f' % v for v in d)))")
    echo "rate $rate overlap $m: $(awk '/throughput/ {print $2}' "$run.log") tok/s, median step ${step} s, link MB/step $per_node"
  done
done

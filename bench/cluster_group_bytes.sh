#!/bin/bash
# Cross-node bytes of group-limited routing with each parallel.dedup_dispatch (none: a row per
# pick; rank: per token and rank; node: per token and node, two hops), on
# emulated nodes (launch/cluster.sh). One EP group spans the nodes; with num_groups = nodes
# and topk_groups 1 every token's experts sit on one node.
#
#   launch/cluster.sh run --nodes 2 --slots 1 -- bench/cluster_group_bytes.sh   # ep 2
#   launch/cluster.sh run --nodes 2 --slots 2 -- bench/cluster_group_bytes.sh   # ep 4
#   CONFIG=configs/tiny.yaml STEPS=10 REPEATS=2 DISPATCH="none rank node" (defaults)
#
# Prints, per (routing, dispatch), the bytes both nodes sent on their links over the run (from
# the links' counters, so every byte MPI put on the wire: rows, gradients, counts), the final
# training loss and tokens/s.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
B="${B:-$ROOT/build/moeforge}"
C="$ROOT/launch/cluster.sh"
CONFIG="${CONFIG:-$ROOT/configs/tiny.yaml}"
STEPS="${STEPS:-10}"
OUT="${OUT:-/tmp/moeforge-group-bytes}"
NODES=$("$C" traffic "$MOEFORGE_CLUSTER" | wc -l)
RANKS=$(awk '{ split($2, s, "="); n += s[2] } END { print n }' \
  "/run/moeforge-cluster/$MOEFORGE_CLUSTER/hostfile")
mkdir -p "$OUT"
sent() { "$C" traffic "$MOEFORGE_CLUSTER" | awk '{ s += $3 } END { printf "%.0f\n", s }'; }
echo "nodes $NODES, ranks $RANKS, ep_size $RANKS, $CONFIG, $STEPS steps"
for repeat in $(seq "${REPEATS:-2}"); do
  for routing in "unrestricted:" \
    "group-limited:--set moe.router.num_groups=$NODES --set moe.router.topk_groups=1"; do
    for dispatch in ${DISPATCH:-none rank node}; do
      name=${routing%%:*}; run="$OUT/$name-$dispatch-$repeat"
      extra="${routing#*:} --set parallel.dedup_dispatch=$dispatch"
      b0=$(sent)
      # shellcheck disable=SC2086
      "$C" mpirun -n "$RANKS" -x OMP_NUM_THREADS=1 --bind-to none "$B" train --config "$CONFIG" \
        --set train.steps="$STEPS" --set train.eval_every=0 --set checkpoint.every=0 \
        --set parallel.ep_size="$RANKS" $extra --set train.out_dir="$run" --overwrite \
        >"$run.log" 2>&1 || { echo "FAIL $name $dispatch"; tail -5 "$run.log"; continue; }
      b1=$(sent)
      loss=$(python3 -c "
import json
rows = [json.loads(l) for l in open('$run/metrics.jsonl')]
print('%.5f' % [r['loss'] for r in rows if 'loss' in r][-1])")
      printf '%-14s %-6s cross-node bytes %12d  final loss %s  %s tok/s\n' "$name" "$dispatch" \
        $((b1 - b0)) "$loss" "$(awk '/throughput/ {print $2}' "$run.log")"
    done
  done
done

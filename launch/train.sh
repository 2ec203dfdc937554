#!/usr/bin/env bash
# Sets up (first run only), then trains under mpirun.
#
#   launch/train.sh CONFIG [moeforge train options...]
#
# Environment:
#   NP=2                 ranks (default 2)
#   HOSTFILE=path        passed to mpirun --hostfile (multi-node)
#   THREADS_PER_RANK=n   OMP/torch threads per rank (default: cores / ranks on this node, >= 1)
#   BIND=none|core|socket  mpirun --bind-to (default none: ranks may share cores here)
#   MPIRUN_ARGS="..."    extra mpirun arguments (e.g. "--map-by ppr:4:node")
#   SKIP_SETUP=1         do not run launch/setup.sh (e.g. inside a SLURM job after setup)
# Example: NP=4 HOSTFILE=hosts launch/train.sh configs/small.yaml --set parallel.ep_size=2
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# -lt 1 ]]; then
  echo "usage: launch/train.sh CONFIG [--set key=value ...] [--resume [PATH]]" >&2
  exit 2
fi
CONFIG="$1"; shift
[[ "${SKIP_SETUP:-0}" == 1 ]] || "$ROOT/launch/setup.sh"

NP="${NP:-2}"
CORES="$(nproc)"
THREADS="${THREADS_PER_RANK:-$(( CORES / NP > 0 ? CORES / NP : 1 ))}"
ARGS=(-n "$NP" --bind-to "${BIND:-none}" -x "OMP_NUM_THREADS=$THREADS")
if [[ -n "${HOSTFILE:-}" ]]; then
  ARGS+=(--hostfile "$HOSTFILE")
  # A node whose network goes down leaves mpirun waiting for TCP's default timeouts (minutes to
  # forever); keepalives on OpenMPI's control connections end the job ~20 s after the loss
  # instead (docs/reliability.md).
  ARGS+=(--mca oob_tcp_keepalive_time 10 --mca oob_tcp_keepalive_intvl 5
    --mca oob_tcp_keepalive_probes 3)
  # Over TCP, one connection per pair of ranks ran an all-to-all at half the link rate per
  # direction; two restore it (harmless where InfiniBand or another transport is used instead).
  ARGS+=(--mca btl_tcp_links 2)
fi
# Root and more ranks than cores are normal on small machines and containers.
[[ $(id -u) -eq 0 ]] && ARGS+=(--allow-run-as-root)
ARGS+=(--oversubscribe)
# shellcheck disable=SC2206
EXTRA=(${MPIRUN_ARGS:-})
CMD=(mpirun "${ARGS[@]}" "${EXTRA[@]}" "$ROOT/build/moeforge" train --config "$CONFIG" "$@")
echo "[train] ${CMD[*]}"
exec "${CMD[@]}"

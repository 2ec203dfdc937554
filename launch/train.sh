#!/usr/bin/env bash
# Sets up (first run only), then trains under mpirun.
#
#   launch/train.sh CONFIG [moeforge train options...]
#   launch/train.sh --help
#
# When the job fails, moeforge's own error is printed last and the launcher's abort banner is
# left out of the terminal (it is kept in a log file, named at the end); the exit code is
# mpirun's.
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
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
if [[ $# -lt 1 ]]; then
  usage >&2
  exit 2
fi
if [[ "$1" == -h || "$1" == --help ]]; then
  usage
  echo "moeforge train options: build/moeforge train --help"
  exit 0
fi
if [[ "$1" == -* ]]; then
  echo "launch/train.sh: the first argument is the config file, got option '$1' (launch/train.sh --help)" >&2
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

# The launcher's abort banners are blocks between lines of dashes; drop those that are
# boilerplate, pass everything else through as it comes.
LOG="$(mktemp "${TMPDIR:-/tmp}/moeforge-train.XXXXXX.log")"
filter_launcher_noise() {
  awk '
    /^-----------------*$/ { if (inblock) { if (!noise) printf "%s", block; inblock = 0; block = ""; next }
                 inblock = 1; noise = 0; block = $0 "\n"; next }
    inblock { block = block $0 "\n"
              if ($0 ~ /MPI_ABORT|exited due to|non-zero status|process returned|Primary job|aborted|prterun|mpirun has exited|was killed/) noise = 1
              next }
    /^moeforge: (error|stopped)/ { next }  # printed last, once, from the log
    /^\[[^]]*\] [0-9]+ more process(es)? ha(s|ve) sent help message/ { next }
    /^\[[^]]*\] Set MCA parameter "orte_base_help_aggregate"/ { next }
    { print; fflush() }
    END { if (inblock && !noise) printf "%s", block }'
}
set +e
"${CMD[@]}" 2> >(tee "$LOG" | filter_launcher_noise >&2)
rc=$?
set -e
wait 2>/dev/null || true  # the filter finishes writing
if [[ $rc -ne 0 ]]; then
  errors="$(grep -E '^moeforge: (error|stopped)' "$LOG" | awk '!seen[$0]++' || true)"
  [[ -n "$errors" ]] && printf '%s\n' "$errors" >&2
  echo "[train] failed with exit code $rc (the launcher's full report: $LOG)" >&2
else
  rm -f "$LOG"
fi
exit $rc

#!/usr/bin/env bash
# The worked example of docs/observability.md: a short run of configs/tiny.yaml on 2 ranks with
# TensorBoard on, then the figures of docs/images/observability/ drawn from its event files.
# The only writer of that folder.
#
#   launch/observability_example.sh            # run in runs/observability, figures in docs/
#   OUT=/tmp/obs FIGURES=/tmp/obs/figures launch/observability_example.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/runs/observability}"
FIGURES="${FIGURES:-$ROOT/docs/images/observability}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
MOEFORGE="${MOEFORGE:-$ROOT/build/moeforge}"

ARGS=(-n 2 --bind-to none --oversubscribe -x OMP_NUM_THREADS=1)
[[ $(id -u) -eq 0 ]] && ARGS+=(--allow-run-as-root)
mpirun "${ARGS[@]}" "$MOEFORGE" train --config "$ROOT/configs/tiny.yaml" --overwrite \
  --set train.out_dir="$OUT" --set train.steps=100 --set train.eval_every=25 \
  --set moe.balancing.expert_bias.rate=0.001 --set logging.expert_load_every=20
"$PYTHON" "$ROOT/launch/plot_observability.py" "$OUT" --out "$FIGURES"
echo "[observability] figures in $FIGURES; open the run: $PYTHON -m tensorboard.main --logdir $OUT"

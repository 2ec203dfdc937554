#!/usr/bin/env python3
"""Draw what TensorBoard shows of a moeforge run, read through TensorBoard's own reader.

    .venv/bin/python launch/plot_observability.py RUN_DIR --out docs/images/observability

Reads RUN_DIR/tensorboard/ with tensorboard's EventAccumulator (the loader behind
`tensorboard --logdir`) and RUN_DIR/expert_load.jsonl, and writes into --out:
  loss.png               train/loss and train/val_loss
  throughput.png         throughput/tflops (per rank) and throughput/mfu
  load_across_layers.png moe/max_vio_p50, _p90, max and moe/load_cv_p50, _p90, _max
  load_cv_by_layer.png   layer_load_cv/block_NN: each MoE layer's coefficient of variation
  expert_load_by_rank.png  the last dump: tokens each rank routed to each expert, per layer
docs/observability.md shows them (launch/observability_example.sh makes the run and calls this).
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tensorboard.backend.event_processing import event_accumulator  # noqa: E402


def load_scalars(run_dir):
    path = os.path.join(run_dir, "tensorboard")
    if not os.path.isdir(path):
        sys.exit(f"{path}: no TensorBoard directory (was logging.tensorboard false?)")
    accumulator = event_accumulator.EventAccumulator(
        path, size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    return {tag: ([e.step for e in accumulator.Scalars(tag)],
                  [e.value for e in accumulator.Scalars(tag)])
            for tag in accumulator.Tags()["scalars"]}


def line_plot(scalars, tags, ylabel, path, labels=None, styles=None):
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, tag in enumerate(tags):
        if tag not in scalars:
            continue
        steps, values = scalars[tag]
        ax.plot(steps, values, (styles or {}).get(tag, "-"), label=(labels or {}).get(tag, tag))
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def throughput_plot(scalars, path):
    fig, ax = plt.subplots(figsize=(7, 4))
    steps, tflops = scalars["throughput/tflops"]
    ax.plot(steps, tflops, color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("model TFLOP/s per rank", color="tab:blue")
    twin = ax.twinx()
    steps, mfu = scalars["throughput/mfu"]
    twin.plot(steps, [100 * v for v in mfu], color="tab:orange", alpha=0.7)
    twin.set_ylabel("MFU (%)", color="tab:orange")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def expert_load_plot(run_dir, path):
    dump_path = os.path.join(run_dir, "expert_load.jsonl")
    with open(dump_path) as f:
        dumps = [json.loads(line) for line in f if line.strip()]
    if not dumps:
        sys.exit(f"{dump_path}: no rows (logging.expert_load_every = 0?)")
    last = dumps[-1]
    layers = last["moe_layers"]
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 2.8), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        load = np.array(layer["tokens_per_expert_by_rank"], dtype=float)
        image = ax.imshow(load, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(f"block {layer['layer']}", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("rank")
        ax.set_yticks(range(load.shape[0]))
        fig.colorbar(image, ax=ax)
    fig.suptitle(f"tokens routed to each expert by each rank, step {last['step']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory (train.out_dir)")
    parser.add_argument("--out", required=True, help="directory for the PNGs")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    scalars = load_scalars(args.run)
    line_plot(scalars, ["train/loss", "train/val_loss"], "LM loss (nats/token)",
              os.path.join(args.out, "loss.png"), styles={"train/val_loss": "o--"})
    throughput_plot(scalars, os.path.join(args.out, "throughput.png"))
    line_plot(scalars, ["moe/max_vio_p50", "moe/max_vio_p90", "moe/max_vio",
                        "moe/load_cv_p50", "moe/load_cv_p90", "moe/load_cv_max"],
              "across MoE layers", os.path.join(args.out, "load_across_layers.png"),
              styles={"moe/load_cv_p50": "--", "moe/load_cv_p90": "--", "moe/load_cv_max": "--"})
    per_layer = sorted(tag for tag in scalars if tag.startswith("layer_load_cv/"))
    line_plot(scalars, per_layer, "coefficient of variation of tokens per expert",
              os.path.join(args.out, "load_cv_by_layer.png"))
    expert_load_plot(args.run, os.path.join(args.out, "expert_load_by_rank.png"))
    for tag in ("throughput/tflops", "throughput/mfu", "train/loss", "moe/max_vio"):
        steps, values = scalars[tag]
        tail = values[len(values) // 2:]
        print(f"{tag:<22} last {values[-1]:.4g}, median of the second half {np.median(tail):.4g}")


if __name__ == "__main__":
    main()

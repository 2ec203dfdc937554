#!/usr/bin/env python3
"""Turn moeforge runs' metrics.jsonl into PNGs and a summary table.

    .venv/bin/python launch/plot_metrics.py runs/a runs/b ... --out docs/images/balancing

Writes into --out:
  loss.png                    training loss (smoothed) and validation loss of every run
  max_vio.png                 global-batch MaxVio (max over MoE layers) of every run
  load_<run>_layer<L>.png     heatmap of expert load (experts × steps) per MoE layer, each
                              step's load divided by its mean (1 = perfectly balanced)
and prints a Markdown table: final val loss, global MaxVio averaged over the last 20% of
steps, micro-batch MaxVio likewise, mean tokens/s (steps after the first).
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_run(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    steps, evals = [], []
    try:
        with open(path) as f:
            for line_no, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    sys.exit(f"{path}:{line_no}: not JSON: {e}")
                (evals if "val_loss" in record else steps).append(record)
    except OSError as e:
        sys.exit(f"cannot read {path}: {e.strerror}")
    if not steps:
        sys.exit(f"{path}: no step records")
    return steps, evals


def smooth(values, window=10):
    values = np.asarray(values, dtype=float)
    if len(values) < window:
        return values
    kernel = np.ones(window) / window
    head = [values[: i + 1].mean() for i in range(window - 1)]
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def tail_mean(values, fraction=0.2):
    n = max(1, int(round(len(values) * fraction)))
    return float(np.mean(values[-n:]))


def save_line_plot(fig, ax, ylabel, path):
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (train.out_dir)")
    parser.add_argument("--out", required=True, help="directory for the PNGs")
    parser.add_argument("--names", help="comma-separated labels (default: directory names)")
    args = parser.parse_args()
    names = args.names.split(",") if args.names else [os.path.basename(os.path.normpath(r)) for r in args.runs]
    if len(names) != len(args.runs):
        sys.exit(f"--names has {len(names)} labels for {len(args.runs)} runs")
    os.makedirs(args.out, exist_ok=True)
    runs = [read_run(r) for r in args.runs]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (steps, evals) in zip(names, runs):
        x = [s["step"] for s in steps]
        line, = ax.plot(x, smooth([s["loss"] for s in steps]), label=f"{name} (train)")
        if evals:
            ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o--",
                    color=line.get_color(), label=f"{name} (val)")
    ax.set_yscale("log")
    save_line_plot(fig, ax, "LM loss (nats/token)", os.path.join(args.out, "loss.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (steps, _) in zip(names, runs):
        ax.plot([s["step"] for s in steps], smooth([s["max_vio"] for s in steps]), label=name)
    save_line_plot(fig, ax, "global MaxVio (max over layers, smoothed)",
                   os.path.join(args.out, "max_vio.png"))

    for name, (steps, _) in zip(names, runs):
        layers = steps[0].get("moe_layers", [])
        for index, layer in enumerate(layers):
            load = np.array([s["moe_layers"][index]["expert_load"] for s in steps], dtype=float)
            relative = load / np.maximum(load.mean(axis=1, keepdims=True), 1e-12)
            fig, ax = plt.subplots(figsize=(7, 3.2))
            image = ax.imshow(relative.T, aspect="auto", cmap="magma", vmin=0,
                              vmax=max(2.0, float(np.percentile(relative, 99))),
                              extent=[steps[0]["step"] - 0.5, steps[-1]["step"] + 0.5,
                                      load.shape[1] - 0.5, -0.5], interpolation="nearest")
            ax.set_xlabel("step")
            ax.set_ylabel("expert")
            ax.set_title(f"{name}: layer {layer['layer']} load / mean load")
            fig.colorbar(image, ax=ax)
            fig.tight_layout()
            fig.savefig(os.path.join(args.out, f"load_{name}_layer{layer['layer']}.png"), dpi=110)
            plt.close(fig)

    print("| run | final val loss | global MaxVio (last 20%) | micro-batch MaxVio (last 20%) | tokens/s |")
    print("|---|---|---|---|---|")
    for name, (steps, evals) in zip(names, runs):
        val = f"{evals[-1]['val_loss']:.4f}" if evals else "n/a"
        vio = tail_mean([s["max_vio"] for s in steps])
        micro = tail_mean([s.get("max_vio_micro", float("nan")) for s in steps])
        speed = np.mean([s["tokens_per_s"] for s in steps[1:]] or [steps[0]["tokens_per_s"]])
        print(f"| {name} | {val} | {vio:.3f} | {micro:.3f} | {speed:,.0f} |")


if __name__ == "__main__":
    main()

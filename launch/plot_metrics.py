#!/usr/bin/env python3
"""Turn moeforge runs' metrics.jsonl into PNGs and a summary table.

    .venv/bin/python launch/plot_metrics.py runs/a runs/b ... --out runs/plots

Writes into --out:
  loss.png                    training loss of every run, raw (thin) and as a moving average
                              over SMOOTH steps (thick), plus validation loss (points)
  max_vio.png                 global-batch MaxVio (max over MoE layers; 0 = perfectly
                              balanced) of every run, raw and moving average
  load_<run>_layer<L>.png     heatmap of expert load (experts × steps) per MoE layer, each
                              step's load divided by its mean (1 = balanced, white); one
                              colour scale shared by every heatmap of the call, from 0 to the
                              largest value over all runs, so runs compare directly
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
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


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


def smooth(values, window):
    values = np.asarray(values, dtype=float)
    if len(values) < window:
        return values
    kernel = np.ones(window) / window
    head = [values[: i + 1].mean() for i in range(window - 1)]
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def tail_mean(values, fraction=0.2):
    n = max(1, int(round(len(values) * fraction)))
    return float(np.mean(values[-n:]))


SMOOTH = 10  # moving-average window of the loss and MaxVio curves (steps)


def finish_line_plot(fig, ax, ylabel, title):
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def loss_figure(names, runs):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (steps, evals) in zip(names, runs):
        x = [s["step"] for s in steps]
        raw = [s["loss"] for s in steps]
        line, = ax.plot(x, smooth(raw, SMOOTH), label=f"{name} train (mean of {SMOOTH} steps)")
        ax.plot(x, raw, color=line.get_color(), alpha=0.25, linewidth=0.7,
                label=f"{name} train (each step)")
        if evals:
            ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o--",
                    color=line.get_color(), label=f"{name} validation")
    ax.set_yscale("log")
    return finish_line_plot(
        fig, ax, "LM loss (nats/token, log scale)",
        f"Language-model loss: thick = moving average over {SMOOTH} steps, thin = raw")


def max_vio_figure(names, runs):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axhline(0, color="black", linewidth=1, label="0 = perfectly balanced")
    for name, (steps, _) in zip(names, runs):
        x = [s["step"] for s in steps]
        raw = [s["max_vio"] for s in steps]
        line, = ax.plot(x, smooth(raw, SMOOTH), label=f"{name} (mean of {SMOOTH} steps)")
        ax.plot(x, raw, color=line.get_color(), alpha=0.25, linewidth=0.7)
    ax.set_ylim(bottom=-0.05 * max(1e-9, ax.get_ylim()[1]))
    return finish_line_plot(
        fig, ax, "global MaxVio = max load / mean load − 1\n(0 = perfectly balanced)",
        f"Load imbalance, worst MoE layer: thick = moving average over {SMOOTH} steps, "
        "thin = raw")


def relative_loads(steps):
    """{layer: [steps, experts] load / mean load of that step} for one run."""
    out = {}
    for index, layer in enumerate(steps[0].get("moe_layers", [])):
        load = np.array([s["moe_layers"][index]["expert_load"] for s in steps], dtype=float)
        out[layer["layer"]] = load / np.maximum(load.mean(axis=1, keepdims=True), 1e-12)
    return out


def load_figures(names, runs):
    """{file name: figure} of every run's load heatmaps, on one colour scale for all of them."""
    loads = [relative_loads(steps) for steps, _ in runs]
    vmax = max([2.0] + [float(r.max()) for layers in loads for r in layers.values()])
    # White at 1 (balanced), blue below (starved experts), red above (overloaded ones).
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    figures = {}
    for name, (steps, _), layers in zip(names, runs, loads):
        for layer, relative in layers.items():
            experts = relative.shape[1]
            fig, ax = plt.subplots(figsize=(7, 3.2))
            image = ax.imshow(relative.T, aspect="auto", cmap="RdBu_r", norm=norm,
                              extent=[steps[0]["step"] - 0.5, steps[-1]["step"] + 0.5,
                                      experts - 0.5, -0.5], interpolation="nearest")
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("expert (index)")
            if experts <= 16:
                ax.set_yticks(range(experts))
            else:
                ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"{name}: layer {layer} expert load / mean load", fontsize=9)
            bar = fig.colorbar(image, ax=ax)
            bar.set_label(f"load / mean (1 = balanced)\nscale 0–{vmax:.1f}, same for all runs",
                          fontsize=8)
            fig.tight_layout()
            figures[f"load_{name}_layer{layer}.png"] = fig
    return figures


def metrics_figures(names, runs):
    """{file name: matplotlib Figure} of every plot, not saved."""
    figures = {"loss.png": loss_figure(names, runs), "max_vio.png": max_vio_figure(names, runs)}
    figures.update(load_figures(names, runs))
    return figures


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
    for file_name, fig in metrics_figures(names, runs).items():
        fig.savefig(os.path.join(args.out, file_name), dpi=110)
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

#!/usr/bin/env python3
"""Plots of a `moeforge analyze` report (docs/routing_analysis.md explains each).

    .venv/bin/python launch/plot_analysis.py REPORT_DIR

Reads REPORT_DIR/report.json and writes beside it:
  token_expert_mi.png   per MoE block: I(token id; expert) against H(expert) and H(token)
  co_routing.png        per pair of consecutive MoE blocks: log2 lift of (expert, next expert)
  expert_magnitude.png  per MoE block: each expert's mean output norm / median, threshold line
  drop_positions.png    fraction of routed slots dropped by capacity, by position in sequence
  stability.png         (with --compare) fraction of tokens keeping their expert set per block
"""
import argparse
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def grid(count, width=4):
    cols = max(1, min(width, count))
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.axis("off")
    return fig, list(axes.flat[:count])


def plot_mi(report, out):
    layers = report["layers"]
    blocks = [str(layer["block"]) for layer in layers]
    mi = [layer["token_expert_mi"] for layer in layers]
    x = np.arange(len(blocks))
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(blocks) + 2), 3.6))
    ax.bar(x - 0.2, [m["mi_bits"] for m in mi], 0.4, label="I(token; expert)",
           yerr=[[0] * len(mi), [m["bias_bits"] for m in mi]], capsize=3)
    ax.bar(x + 0.2, [m["expert_entropy_bits"] for m in mi], 0.4, label="H(expert)", alpha=0.5)
    ax.axhline(mi[0]["token_entropy_bits"], color="k", ls="--", lw=1, label="H(token)")
    ax.set_xticks(x, blocks)
    ax.set_xlabel("MoE block")
    ax.set_ylabel("bits")
    ax.set_title("How much the expert is decided by the token id\n(whisker: plug-in bias)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "token_expert_mi.png"), dpi=110)
    plt.close(fig)


def plot_co_routing(report, out):
    pairs = report["co_routing"]
    if not pairs:
        return
    fig, axes = grid(len(pairs))
    image = None
    for ax, pair in zip(axes, pairs):
        lift = np.array(pair["lift"])
        with np.errstate(divide="ignore"):
            log_lift = np.where(lift > 0, np.log2(np.maximum(lift, 1e-12)), np.nan)
        image = ax.imshow(log_lift, cmap="RdBu_r", vmin=-3, vmax=3)
        ax.set_title(f"block {pair['first_block']} → {pair['next_block']}\n"
                     f"I = {pair['mi_bits']:.3f} bits", fontsize=9)
        ax.set_xlabel(f"expert at block {pair['next_block']}")
        ax.set_ylabel(f"expert at block {pair['first_block']}")
    fig.colorbar(image, ax=axes, label="log2 lift (0 = independent; blank = never)")
    fig.savefig(os.path.join(out, "co_routing.png"), dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_magnitudes(report, out):
    layers = report["layers"]
    fig, axes = grid(len(layers))
    for ax, layer in zip(axes, layers):
        m = layer["expert_magnitude"]
        median = m["median"] if m["median"] > 0 else 1.0
        ratios = np.array(m["mean_norm"]) / median
        supers = {s["expert"] for s in m["super_experts"]}
        colors = ["tab:red" if e in supers else "tab:blue" for e in range(len(ratios))]
        ax.bar(np.arange(len(ratios)), ratios, color=colors)
        ax.axhline(m["threshold"] / median, color="k", ls="--", lw=1)
        ax.set_title(f"block {layer['block']}: {len(supers)} super expert(s)", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("mean output norm / median")
    fig.suptitle(f"Expert output magnitude (dashed: median + {report['outlier_mads']} robust σ)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "expert_magnitude.png"), dpi=110)
    plt.close(fig)


def binned(values, bins):
    values = np.asarray(values, dtype=float)
    edges = np.linspace(0, len(values), bins + 1).astype(int)
    return edges[:-1], np.array([values[a:b].sum() for a, b in zip(edges[:-1], edges[1:])])


def plot_drops(report, out):
    fig, ax = plt.subplots(figsize=(6, 3.6))
    seq_len = report["probe"]["seq_len"]
    bins = min(64, seq_len)
    any_drop = False
    for layer in report["layers"]:
        starts, routed = binned(layer["drops"]["routed"], bins)
        _, dropped = binned(layer["drops"]["dropped"], bins)
        any_drop |= dropped.sum() > 0
        ax.plot(starts, dropped / np.maximum(routed, 1), marker=".", label=f"block {layer['block']}")
    ax.set_xlabel("position in sequence")
    ax.set_ylabel("dropped fraction of routed slots")
    title = f"Capacity drops by position (capacity factor {report['capacity_factor']})"
    if not any_drop:
        title += "\nno drops: dropless, or capacity never reached"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "drop_positions.png"), dpi=110)
    plt.close(fig)


def plot_stability(report, out):
    stability = report.get("stability")
    if not stability:
        return
    blocks = [str(layer["block"]) for layer in report["layers"]]
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(blocks) + 2), 3.6))
    ax.bar(blocks, stability["per_layer"])
    ax.axhline(stability["all_layers"], color="k", ls="--", lw=1, label="every block")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("MoE block")
    ax.set_ylabel("tokens with the same expert set")
    ax.set_title(f"Routing stability against\n{report['compare']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "stability.png"), dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("report_dir", help="the --out directory of moeforge analyze")
    args = parser.parse_args()
    path = os.path.join(args.report_dir, "report.json")
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"plot_analysis.py: cannot read {path}: {e}")
    for plot in (plot_mi, plot_co_routing, plot_magnitudes, plot_drops, plot_stability):
        plot(report, args.report_dir)
    print(f"plots written to {args.report_dir}")


if __name__ == "__main__":
    main()

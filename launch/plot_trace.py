#!/usr/bin/env python3
"""Render moeforge's per-rank Chrome trace files as one timeline PNG.

    .venv/bin/python launch/plot_trace.py RUN_DIR/trace --out trace.png [--step-window MS]

RUN_DIR/trace/rank-N.json (written with logging.trace: true) hold trace events; this draws one
row per (rank, lane) — compute and comm — with each span as a bar, coloured by kind. The JSON
files themselves open in Perfetto (ui.perfetto.dev) or chrome://tracing.
"""
import argparse
import glob
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {"experts": "#1f77b4", "shared experts": "#17becf", "forward": "#c7c7c7",
           "backward": "#dddddd", "dispatch a2a": "#ff7f0e", "combine a2a": "#d62728",
           "all_to_all": "#ff7f0e", "all_reduce": "#2ca02c", "gradient sync (wait)": "#98df8a"}


def colour(name):
    for key, value in COLOURS.items():
        if name.startswith(key):
            return value
    return "#9467bd"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace_dir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--step-window", type=float, default=0,
                        help="show only the last MS milliseconds (0 = everything)")
    args = parser.parse_args()
    files = sorted(glob.glob(os.path.join(args.trace_dir, "rank-*.json")))
    if not files:
        sys.exit(f"{args.trace_dir}: no rank-*.json trace files")
    rows, spans = [], []
    for path in files:
        with open(path) as f:
            events = json.load(f)["traceEvents"]
        for e in events:
            if e.get("ph") != "X":
                continue
            row = f"rank {e['pid']} {e['cat']}"
            if row not in rows:
                rows.append(row)
            spans.append((rows.index(row), e["ts"] / 1000.0, e["dur"] / 1000.0, e["name"], e["cat"]))
    end = max(start + dur for _, start, dur, _, _ in spans)
    begin = end - args.step_window if args.step_window > 0 else min(s for _, s, _, _, _ in spans)
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.55 * len(rows)))
    for row, start, dur, name, lane in spans:
        if start + dur < begin:
            continue
        # Coarse spans (forward, backward) behind, phases and collectives on top.
        height = 0.8 if name in ("forward", "backward") else 0.55
        ax.broken_barh([(start - begin, dur)], (row - height / 2, height), color=colour(name),
                       edgecolor="none", zorder=1 if height == 0.8 else 2)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows)
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLOURS.values()]
    ax.legend(handles, COLOURS.keys(), fontsize=7, ncol=5, loc="upper center",
              bbox_to_anchor=(0.5, -0.25))
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out} ({len(spans)} spans, {len(rows)} rows)")


if __name__ == "__main__":
    main()

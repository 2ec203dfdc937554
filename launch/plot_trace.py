#!/usr/bin/env python3
"""Render moeforge's per-rank Chrome trace files as one timeline PNG.

    .venv/bin/python launch/plot_trace.py RUN_DIR/trace --out trace.png [--step-window MS]

RUN_DIR/trace/rank-N.json (written with logging.trace: true) hold trace events; this draws one
row per (rank, lane) — compute (the training thread) and comm, comm 2, ... (the communication
worker's collectives in flight at once) — with
each span as a bar coloured by its phase; backward phases of the MoE layers are hatched in their
forward phase's colour. Dashed vertical lines mark step boundaries (the trainer's "step N"
spans). The title states the run (out_dir, ranks, ep_size, overlap, simulated link) from
RUN_DIR/config.resolved.yaml. Time is in milliseconds from the start of the window shown.
The JSON files themselves open in Perfetto (ui.perfetto.dev) or chrome://tracing.
"""
import argparse
import glob
import json
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

# Every span name the C++ records (trainer/trainer.cpp, moe/moe_layer.cpp through the trainer's
# PhaseObserver, parallel/queued_communicator.cpp on the comm lane), in legend order, with its
# style (face colour, hatch). Comm-lane names are normalised first (sizes dropped, see phase()).
# A name not listed still gets a legend entry, in a fallback colour (see styles_for()).
PHASES = {
    # trainer, compute lane: coarse spans drawn behind the phases
    "forward": ("#e0e0e0", ""),
    "backward": ("#c8c8c8", ""),
    # MoE layer forward, compute lane (moe/moe_layer.cpp)
    "route": ("#9467bd", ""),
    "balance": ("#c5b0d5", ""),
    "capacity": ("#7b4173", ""),
    "plan+counts a2a": ("#e377c2", ""),
    "permute": ("#bcbd22", ""),
    "dispatch a2a": ("#ff7f0e", ""),
    "experts": ("#1f77b4", ""),
    "shared experts": ("#17becf", ""),
    "combine a2a": ("#d62728", ""),
    "unpermute": ("#8c564b", ""),
    # MoE layer backward, compute lane: hatched, forward counterpart's colour
    "unpermute backward": ("#8c564b", "////"),
    "combine a2a backward": ("#d62728", "////"),
    "experts backward": ("#1f77b4", "////"),
    "shared experts backward": ("#17becf", "////"),
    "dispatch a2a backward": ("#ff7f0e", "////"),
    "permute + route backward": ("#bcbd22", "////"),
    # trainer, compute lane, after backward
    "gradient sync (wait)": ("#98df8a", ""),
    "clip + optimizer": ("#393b79", ""),
    # comm lane (collectives on the communication worker)
    "all_to_all": ("#ffbb78", ""),
    "all_to_all (sync)": ("#ad494a", ""),
    "all_to_all_v (sync)": ("#f7b6d2", ""),
    "all_reduce": ("#2ca02c", ""),
    "all_reduce (sync)": ("#637939", ""),
    "reduce_scatter": ("#31a354", "xx"),
    "reduce_scatter (sync)": ("#74c476", "xx"),
    "all_gather": ("#3182bd", "xx"),
    "broadcast": ("#636363", ""),
    "barrier": ("#000000", ""),
}
COARSE = ("forward", "backward")
FALLBACK = ["#843c39", "#d6616b", "#e7969c", "#8ca252", "#b5cf6b", "#cedb9c", "#e7ba52",
            "#a55194", "#de9ed6", "#6b6ecf", "#9c9ede", "#525252"]


def phase(name):
    """The phase a span belongs to: comm spans carry sizes ("all_to_all 1024→1081 rows",
    "all_reduce 2580 KiB", "reduce_scatter 4096"); drop them."""
    return re.sub(r"\s+\d[\d→]*( rows| KiB)?$", "", name)


def styles_for(names):
    """(colour, hatch) for each phase name, fixed for known names, distinct fallbacks else."""
    styles, spare = {}, iter(FALLBACK)
    for name in names:
        if name in PHASES:
            styles[name] = PHASES[name]
        else:
            styles[name] = (next(spare, "#7f7f7f"), "..")
    return styles


def read_trace(trace_dir):
    """Spans [(rank, lane, start_ms, dur_ms, name)] and step spans [(rank, start, dur, name)]."""
    files = sorted(glob.glob(os.path.join(trace_dir, "rank-*.json")))
    if not files:
        sys.exit(f"{trace_dir}: no rank-*.json trace files")
    spans, steps = [], []
    for path in files:
        try:
            with open(path) as f:
                events = json.load(f)["traceEvents"]
        except (OSError, ValueError, KeyError) as e:
            sys.exit(f"{path}: not a trace file: {e}")
        for e in events:
            if e.get("ph") != "X":
                continue
            span = (e["pid"], e["cat"], e["ts"] / 1000.0, e["dur"] / 1000.0, e["name"])
            (steps if e["cat"] == "step" else spans).append(span)
    if not spans:
        sys.exit(f"{trace_dir}: no spans")
    return spans, steps


def read_config(trace_dir):
    """The run's config.resolved.yaml (next to trace/), or {} if there is none."""
    path = os.path.join(os.path.dirname(os.path.abspath(trace_dir)), "config.resolved.yaml")
    try:
        import yaml
        with open(path) as f:
            return yaml.safe_load(f) or {}
    except (OSError, ImportError):
        return {}


def describe_run(config, ranks, steps):
    """One title line: which run, how it was split and linked, which steps."""
    parallel = config.get("parallel", {})
    link = parallel.get("simulated_link", {})
    parts = [os.path.basename(os.path.normpath(config.get("train", {}).get("out_dir", "run"))),
             f"{ranks} ranks"]
    if parallel:
        parts += [f"ep_size {parallel.get('ep_size')}",
                  f"overlap_degree {parallel.get('overlap_degree')}",
                  "comm worker " + ("on" if parallel.get("comm_worker", True) else "off"),
                  f"bucket_mb {parallel.get('bucket_mb')}"]
        if link.get("bandwidth_gbps", 0) > 0 or link.get("latency_us", 0) > 0:
            parts.append(f"simulated link {link.get('bandwidth_gbps')} GB/s + "
                         f"{link.get('latency_us')} µs latency")
        else:
            parts.append("no simulated link")
    numbers = sorted({int(n) for *_, name in steps for n in re.findall(r"\d+", name)})
    if numbers:
        parts.append(f"steps {numbers[0]}–{numbers[-1]}" if len(numbers) > 1
                     else f"step {numbers[0]}")
    return " | ".join(parts)


def trace_figure(trace_dir, step_window_ms=0.0):
    """The timeline as a matplotlib Figure (not saved)."""
    spans, steps = read_trace(trace_dir)
    rows = sorted({(rank, lane) for rank, lane, *_ in spans},
                  key=lambda r: (r[0], 0 if r[1] == "compute" else 1, r[1]))
    end = max(start + dur for _, _, start, dur, _ in spans + steps)
    begin = (end - step_window_ms if step_window_ms > 0
             else min(start for _, _, start, _, _ in spans + steps))
    shown = [s for s in spans if s[2] + s[3] >= begin]
    present = {phase(name) for *_, name in shown}
    order = [n for n in PHASES if n in present] + sorted(present - set(PHASES))
    styles = styles_for(order)

    fig, ax = plt.subplots(figsize=(13, 1.6 + 0.6 * len(rows)))
    for rank, lane, start, dur, name in shown:
        row = rows.index((rank, lane))
        colour, hatch = styles[phase(name)]
        coarse = phase(name) in COARSE
        height = 0.8 if coarse else 0.55
        ax.broken_barh([(start - begin, dur)], (row - height / 2, height), facecolor=colour,
                       hatch=hatch, edgecolor="white" if hatch else "none", linewidth=0,
                       zorder=1 if coarse else 2, gid=phase(name))
    # Step boundaries: the first rank's "step N" spans (all ranks meet in the step's collectives),
    # a line where each step starts and one where the last ends.
    first_rank = min(rank for rank, *_ in steps) if steps else None
    own = sorted((s for s in steps if s[0] == first_rank and s[2] + s[3] >= begin),
                 key=lambda s: s[2])
    edges = [s[2] for s in own] + ([own[-1][2] + own[-1][3]] if own else [])
    for edge in edges:
        if edge >= begin:
            ax.axvline(edge - begin, color="black", linestyle="--", linewidth=0.8, zorder=3,
                       gid="step boundary")
    for _, _, start, _, name in own:
        ax.text(max(start, begin) - begin, -0.6, f" {name}", fontsize=8, va="bottom")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"rank {rank} {lane}" for rank, lane in rows])
    ax.set_ylim(len(rows) - 0.5, -0.9)
    ax.set_xlim(-0.005 * (end - begin), 1.005 * (end - begin))  # boundaries at the edges show
    window = (f"last {step_window_ms:g} ms of the trace" if step_window_ms > 0
              else "whole trace")
    ax.set_xlabel(f"time (ms) since the start of the window shown ({window})")
    ax.set_ylabel("rank and thread (lane)")
    ax.set_title(describe_run(read_config(trace_dir), len({r for r, _ in rows}), steps),
                 fontsize=9)
    handles = [Patch(facecolor=styles[n][0], hatch=styles[n][1], edgecolor="white", label=n)
               for n in order]
    if edges:
        handles.append(plt.Line2D([], [], color="black", linestyle="--", linewidth=0.8,
                                  label="step boundary"))
    ax.legend(handles=handles, fontsize=7, ncol=6, loc="upper center",
              bbox_to_anchor=(0.5, -0.18 - 0.3 / len(rows)), frameon=False)
    fig.tight_layout()
    return fig


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace_dir", help="RUN_DIR/trace (rank-N.json files)")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--step-window", type=float, default=0, metavar="MS",
                        help="show only the last MS milliseconds of the trace, in milliseconds "
                             "(0 = everything)")
    args = parser.parse_args()
    fig = trace_figure(args.trace_dir, args.step_window)
    fig.savefig(args.out, dpi=110, bbox_inches="tight")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

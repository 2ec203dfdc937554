#!/usr/bin/env python3
"""Every plot renders from a tiny real run and shows what it promises.

A 3-step run of the tiny model on 2 ranks (ep_size 2, overlap_degree 2, simulated link,
logging.trace) is made in a temporary directory; then, reading the matplotlib figures that
launch/plot_trace.py and launch/plot_metrics.py build (not the PNGs):
  trace   every phase in the trace files (read here, independently of the script) has a legend
          entry; every bar's colour is its legend entry's; legend styles are distinct; the MoE
          backward phases are recorded and drawn; step boundaries are drawn; the title names
          ranks, ep_size, overlap_degree, link and steps; the time axis says milliseconds; a
          phase name the palette does not know still gets its own legend entry.
  metrics the loss plot says its smoothing; the MaxVio plot says 0 = perfectly balanced; load
          heatmaps of two runs (the real one and a collapsed one made here) share one colour
          scale that reaches the collapsed run's value, have a labelled colour bar and integer
          expert ticks; every axis is labelled.
Both command lines run and write their PNGs, and every image link in README.md and docs/*.md
points to a file (launch/make_doc_images.sh regenerates them).
"""
import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

failures = []


def check(condition, message):
    print(("ok    " if condition else "FAIL  ") + message)
    if not condition:
        failures.append(message)


def load_script(source_dir, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(source_dir, "launch",
                                                                     name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_run(args, out):
    command = [args.mpiexec, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none",
               "-n", "2", args.moeforge, "train",
               "--config", os.path.join(args.source_dir, "configs", "tiny.yaml")]
    for setting in (f"train.out_dir={out}", "train.steps=3", "train.warmup_steps=1",
                    "train.micro_batch_size=4", "train.seq_len=64", "train.eval_every=3",
                    "train.eval_batches=1", "model.num_layers=2", "checkpoint.every=0",
                    "parallel.ep_size=2", "parallel.overlap_degree=2", "logging.trace=true",
                    "logging.trace_steps=2", "parallel.simulated_link.bandwidth_gbps=1",
                    "parallel.simulated_link.latency_us=20"):
        command += ["--set", setting]
    result = subprocess.run(command, capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    if result.returncode != 0:
        sys.exit(f"tiny run failed:\n{result.stdout}\n{result.stderr}")


def phases_in_trace(trace_dir):
    """Phase names of the spans, sizes stripped, read without the plotting script."""
    names = set()
    for file in sorted(os.listdir(trace_dir)):
        with open(os.path.join(trace_dir, file)) as f:
            for e in json.load(f)["traceEvents"]:
                if e.get("ph") == "X" and e["cat"] != "step":
                    names.add(re.sub(r" \d.*$", "", e["name"]))
    return names


def legend_styles(ax):
    legend = ax.get_legend()
    styles = {}
    for handle, text in zip(legend.legend_handles, legend.get_texts()):
        face = handle.get_facecolor() if hasattr(handle, "get_hatch") else handle.get_color()
        styles[text.get_text()] = (tuple(round(c, 3) for c in face) if not isinstance(face, str)
                                   else face, getattr(handle, "get_hatch", lambda: "")() or "")
    return styles


def check_trace(plot_trace, run):
    trace_dir = os.path.join(run, "trace")
    fig = plot_trace.trace_figure(trace_dir)
    ax = fig.axes[0]
    styles = legend_styles(ax)
    present = phases_in_trace(trace_dir)
    check(not present - set(styles),
          f"trace: every phase in the trace has a legend entry (missing: "
          f"{sorted(present - set(styles))})")
    expected = {"forward", "backward", "route", "dispatch a2a", "experts", "shared experts",
                "combine a2a", "unpermute", "experts backward", "dispatch a2a backward",
                "combine a2a backward", "unpermute backward", "shared experts backward",
                "permute + route backward", "gradient sync (wait)", "clip + optimizer",
                "all_to_all", "all_reduce"}
    check(expected <= present, f"trace: forward, backward (MoE phases included) and collectives "
                               f"recorded (missing: {sorted(expected - present)})")
    phase_styles = {k: v for k, v in styles.items() if k != "step boundary"}
    check(len(set(phase_styles.values())) == len(phase_styles),
          "trace: distinct legend styles for distinct phases")
    check(phase_styles.get("dispatch a2a") != phase_styles.get("all_to_all"),
          "trace: dispatch a2a (compute wait) and all_to_all (comm) look different")
    wrong = set()
    bars = [c for c in ax.collections if c.get_gid()]
    for bar in bars:
        face = tuple(round(c, 3) for c in bar.get_facecolor()[0])
        if bar.get_gid() not in styles or styles[bar.get_gid()][0] != face or \
                styles[bar.get_gid()][1] != (bar.get_hatch() or ""):
            wrong.add(bar.get_gid())
    check(bars and not wrong, f"trace: {len(bars)} bars drawn in their legend entry's style "
                              f"(wrong: {sorted(wrong)})")
    drawn = {bar.get_gid() for bar in bars}
    check({"experts backward", "dispatch a2a backward"} <= drawn,
          "trace: MoE backward phases drawn over the backward bar")
    lines = [line for line in ax.get_lines() if line.get_gid() == "step boundary"]
    check(len(lines) == 3 and "step boundary" in styles,
          f"trace: step boundaries of the 2 traced steps drawn ({len(lines)} lines) and in the "
          "legend")
    title = ax.get_title()
    for part in ("2 ranks", "ep_size 2", "overlap_degree 2", "simulated link 1 GB/s", "20 µs",
                 "steps 2–3"):
        check(part in title, f"trace: title states {part!r} ({title!r})")
    check("ms" in ax.get_xlabel() and ax.get_ylabel(), f"trace: axes labelled, time in ms "
                                                       f"({ax.get_xlabel()!r})")
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    check(ticks == ["rank 0 compute", "rank 0 comm", "rank 1 compute", "rank 1 comm"],
          f"trace: one row per rank and lane ({ticks})")
    windowed = plot_trace.trace_figure(trace_dir, 5.0).axes[0]
    check(abs(windowed.get_xlim()[1] - 5.0) < 0.1 and "last 5 ms" in windowed.get_xlabel(),
          f"trace: --step-window 5 shows the last 5 ms and says so ({windowed.get_xlabel()!r})")


def check_unknown_phase(plot_trace, work):
    # A span name the palette does not know must still get a legend entry of its own.
    trace_dir = os.path.join(work, "synthetic", "trace")
    os.makedirs(trace_dir)
    events = [{"ph": "X", "name": n, "cat": lane, "pid": 0, "tid": 1, "ts": t, "dur": 10}
              for t, (n, lane) in enumerate([("experts", "compute"), ("mystery phase", "compute"),
                                             ("all_to_all 4→5 rows", "comm")])]
    with open(os.path.join(trace_dir, "rank-0.json"), "w") as f:
        json.dump({"traceEvents": events}, f)
    styles = legend_styles(plot_trace.trace_figure(trace_dir).axes[0])
    check(set(styles) == {"experts", "mystery phase", "all_to_all"},
          f"trace: legend derived from the phases present, unknown ones included ({sorted(styles)})")
    check(len(set(styles.values())) == 3, "trace: the unknown phase gets a style of its own")


def collapsed_run(work):
    # Every token to expert 0 of 4 (top-1): load / mean = 4 for expert 0, 0 for the rest.
    run = os.path.join(work, "collapsed")
    os.makedirs(run)
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        for step in range(1, 6):
            layer = {"layer": 0, "expert_load": [400, 0, 0, 0], "max_vio": 3.0}
            f.write(json.dumps({"step": step, "loss": 5.0 - step * 0.1, "max_vio": 3.0,
                                "max_vio_micro": 3.0, "tokens_per_s": 1000.0,
                                "moe_layers": [layer]}) + "\n")
    return run


def check_metrics(plot_metrics, run, collapsed):
    names = ["tiny", "collapsed"]
    figures = plot_metrics.metrics_figures(names, [plot_metrics.read_run(run),
                                                   plot_metrics.read_run(collapsed)])
    expected = {"loss.png", "max_vio.png", "load_tiny_layer0.png", "load_tiny_layer1.png",
                "load_collapsed_layer0.png"}
    check(set(figures) == expected, f"metrics: figures {sorted(figures)}")
    for file_name, fig in figures.items():
        for ax in fig.axes:
            check(bool(ax.get_ylabel()) and (bool(ax.get_xlabel()) or ax is not fig.axes[0]),
                  f"metrics: {file_name}: axes labelled ({ax.get_xlabel()!r}, "
                  f"{ax.get_ylabel()!r})")
    loss = figures["loss.png"].axes[0]
    legend = [t.get_text() for t in loss.get_legend().get_texts()]
    window = plot_metrics.SMOOTH
    check(f"tiny train (mean of {window} steps)" in legend and "tiny train (each step)" in legend
          and "tiny validation" in legend, f"metrics: loss legend says raw, smoothed, val ({legend})")
    check(f"moving average over {window} steps" in loss.get_title(),
          f"metrics: loss title states the smoothing ({loss.get_title()!r})")
    check("nats/token" in loss.get_ylabel(), "metrics: loss axis in nats/token")
    vio = figures["max_vio.png"].axes[0]
    vio_text = vio.get_ylabel() + " ".join(t.get_text() for t in vio.get_legend().get_texts())
    check("0 = perfectly balanced" in vio_text, "metrics: MaxVio plot says 0 = perfectly balanced")
    scales, bars = set(), []
    for file_name in sorted(f for f in figures if f.startswith("load_")):
        image_ax, bar_ax = figures[file_name].axes
        image = image_ax.get_images()[0]
        scales.add((image.norm.vmin, image.norm.vmax))
        bars.append(bar_ax.get_ylabel())
        experts = 4 if "collapsed" in file_name else 8
        ticks = [t.get_text() for t in image_ax.get_yticklabels()]
        check(ticks == [str(i) for i in range(experts)],
              f"metrics: {file_name}: integer expert ticks ({ticks})")
        check("expert" in image_ax.get_ylabel() and image_ax.get_xlabel() == "step",
              f"metrics: {file_name}: axes labelled")
    check(len(scales) == 1, f"metrics: one colour scale for every heatmap ({scales})")
    vmin, vmax = scales.pop() if len(scales) == 1 else (None, None)
    check(vmin == 0 and vmax is not None and vmax >= 4.0,
          f"metrics: scale 0..{vmax} reaches the collapsed run's load / mean of 4")
    check(all("load / mean" in b and "same for all runs" in b for b in bars),
          f"metrics: colour bars labelled ({bars[0]!r})")


def check_command_lines(args, run, collapsed, work):
    python = sys.executable
    launch = os.path.join(args.source_dir, "launch")
    out = os.path.join(work, "plots")
    result = subprocess.run([python, os.path.join(launch, "plot_metrics.py"), run, collapsed,
                             "--names", "tiny,collapsed", "--out", out],
                            capture_output=True, text=True)
    check(result.returncode == 0 and "| collapsed | n/a | 3.000" in result.stdout,
          f"plot_metrics.py runs and prints the table {result.stderr[-300:]}")
    for png in ("loss.png", "max_vio.png", "load_tiny_layer1.png", "load_collapsed_layer0.png"):
        path = os.path.join(out, png)
        check(os.path.exists(path) and os.path.getsize(path) > 1000, f"wrote {png}")
    trace_png = os.path.join(work, "trace.png")
    result = subprocess.run([python, os.path.join(launch, "plot_trace.py"),
                             os.path.join(run, "trace"), "--out", trace_png],
                            capture_output=True, text=True)
    check(result.returncode == 0 and os.path.getsize(trace_png) > 1000,
          f"plot_trace.py writes the PNG {result.stderr[-300:]}")
    result = subprocess.run([python, os.path.join(launch, "plot_trace.py"), "--help"],
                            capture_output=True, text=True)
    check("milliseconds" in result.stdout, "plot_trace.py --help says --step-window is in ms")
    for script in ("plot_trace.py", "plot_metrics.py"):
        path = os.path.join(launch, script)
        with open(path) as f:
            shebang = f.readline().startswith("#!")
        check(os.access(path, os.X_OK) and shebang, f"{script} is executable with a shebang")


def doc_images(source_dir):
    """(markdown file, link target) of every image the docs show: README.md and docs/*.md."""
    files = [os.path.join(source_dir, "README.md")] + sorted(
        os.path.join(source_dir, "docs", f) for f in os.listdir(os.path.join(source_dir, "docs"))
        if f.endswith(".md"))
    links = []
    for path in files:
        with open(path) as f:
            for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", f.read()):
                links.append((path, target))
    return links


def check_doc_images(source_dir):
    links = doc_images(source_dir)
    missing = [f"{os.path.relpath(md, source_dir)}: {target}" for md, target in links
               if not os.path.isfile(os.path.join(os.path.dirname(md), target))]
    check(links and not missing, f"docs: all {len(links)} image links point to files "
                                 f"(missing: {missing})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moeforge", required=True)
    parser.add_argument("--source-dir", required=True)
    parser.add_argument("--mpiexec", default="mpiexec")
    parser.add_argument("--run", help="use this run directory instead of training one")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="moeforge-plots-")
    try:
        run = args.run or os.path.join(work, "tiny")
        if not args.run:
            tiny_run(args, run)
        plot_trace = load_script(args.source_dir, "plot_trace")
        plot_metrics = load_script(args.source_dir, "plot_metrics")
        check_trace(plot_trace, run)
        check_unknown_phase(plot_trace, work)
        collapsed = collapsed_run(work)
        check_metrics(plot_metrics, run, collapsed)
        check_command_lines(args, run, collapsed, work)
        check_doc_images(args.source_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if failures:
        sys.exit(f"{len(failures)} check(s) failed")
    print("all plot checks passed")


if __name__ == "__main__":
    main()

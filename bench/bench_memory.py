#!/usr/bin/env python3
"""Memory and speed of the precision / optimizer-sharding modes, side by side in one run.

For each config, trains a few steps in every mode (a fresh `moeforge train` under mpirun each)
and prints per rank: the accounted weights, gradients and optimizer state (counted from the
tensors by the trainer, printed in its start banner), the measured peak RSS (max over ranks,
from metrics.jsonl), and tokens/s (median of the steps after the first). Ratios are against fp32
with replicated AdamW on the same number of ranks.

    .venv/bin/python bench/bench_memory.py [--configs configs/small.yaml ...] [--steps 4]
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, "build", "moeforge")
BANNER = re.compile(r"parameters ([\d.]+) MiB \| gradients ([\d.]+) MiB \| "
                    r"optimizer state ([\d.]+) MiB \| activations ~([\d.]+) MiB")

# (label, ranks, overrides); the first mode of each rank count is that count's baseline.
MODES = [
    ("fp32", 1, []),
    ("bf16", 1, ["train.precision=bf16"]),
    ("bf16 + recompute moe_act", 1, ["train.precision=bf16", "train.recompute=moe_act"]),
    ("bf16 + recompute moe", 1, ["train.precision=bf16", "train.recompute=moe"]),
    ("bf16 + recompute attention", 1, ["train.precision=bf16", "train.recompute=attention"]),
    ("bf16 + recompute block", 1, ["train.precision=bf16", "train.recompute=block"]),
    ("fp32", 2, []),
    ("bf16 + ZeRO-1", 2, ["train.precision=bf16", "parallel.distributed_optimizer=true"]),
    ("fp32", 4, []),
    ("fp32 + ZeRO-1", 4, ["parallel.distributed_optimizer=true"]),
    ("bf16 + ZeRO-1", 4, ["train.precision=bf16", "parallel.distributed_optimizer=true"]),
]


def run_mode(config, ranks, overrides, steps, out_dir):
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np",
           str(ranks), BINARY, "train", "--config", config, "--overwrite",
           "--set", f"train.steps={steps}", "--set", "train.warmup_steps=1",
           "--set", "checkpoint.every=0", "--set", "train.eval_batches=1",
           "--set", f"train.out_dir={out_dir}"]
    for item in overrides:
        cmd += ["--set", item]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, os.cpu_count() // ranks)))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stdout}\n{out.stderr}")
    params, grads, optim, acts = map(float, BANNER.search(out.stdout).groups())
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))
            if '"loss"' in line]
    return {"params": params, "grads": grads, "optim": optim, "acts": acts,
            "peak": max(r["peak_memory_mib"] for r in rows),
            "tok_s": statistics.median(r["tokens_per_s"] for r in rows[1:]),
            "loss": rows[-1]["loss"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+",
                        default=["configs/small.yaml", "configs/cpu_240m.yaml"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-ranks", type=int, default=4)
    parser.add_argument("--ranks", type=int, nargs="+", help="only modes at these rank counts")
    args = parser.parse_args()
    for config in args.configs:
        print(f"\n## {config} ({args.steps} steps per mode)\n")
        print("| mode | ranks | weights MiB | grads MiB | optimizer MiB | weights+optimizer "
              "(vs fp32 replicated) | +grads (vs fp32) | peak RSS MiB | tokens/s (vs fp32) |")
        print("|---|---|---|---|---|---|---|---|---|")
        baseline = {}
        with tempfile.TemporaryDirectory() as scratch:
            for label, ranks, overrides in MODES:
                if ranks > args.max_ranks or (args.ranks and ranks not in args.ranks):
                    continue
                r = run_mode(os.path.join(ROOT, config), ranks, overrides, args.steps,
                             os.path.join(scratch, f"{ranks}-{len(baseline)}"))
                base = baseline.setdefault(ranks, r)
                static = r["params"] + r["optim"]
                base_static = base["params"] + base["optim"]
                with_grads = static + r["grads"]
                print(f"| {label} | {ranks} | {r['params']:.0f} | {r['grads']:.0f} | "
                      f"{r['optim']:.0f} | {static:.0f} ({static / base_static:.1%}) | "
                      f"{with_grads:.0f} ({with_grads / (base_static + base['grads']):.1%}) | "
                      f"{r['peak']:.0f} | {r['tok_s']:.0f} ({r['tok_s'] / base['tok_s']:.2f}) |",
                      flush=True)


if __name__ == "__main__":
    main()

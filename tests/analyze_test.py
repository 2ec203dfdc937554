#!/usr/bin/env python3
"""`moeforge analyze` end to end, as a user runs it.

1. A tiny 3-block MoE run trains 6 steps (checkpoints at steps 3 and 6).
2. analyze --from the run --compare its step-3 checkpoint, with a capacity factor that drops:
   report.json holds every section with consistent shapes and bounds, and every plot exists.
3. analyze of a checkpoint against itself gives stability exactly 1.0.
4. Bad flags are refused with one clear message and a non-zero exit.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

failures = []


def check(condition, message):
    print(("ok    " if condition else "FAIL  ") + message)
    if not condition:
        failures.append(message)


def run(binary, args, env=None):
    result = subprocess.run([binary] + args, capture_output=True, text=True, env=env)
    return result.returncode, result.stdout + result.stderr


TINY = ["--set", "model.hidden_size=32", "--set", "model.num_layers=3", "--set",
        "model.num_heads=2", "--set", "model.num_kv_heads=1", "--set", "model.max_seq_len=32",
        "--set", "moe.num_experts=4", "--set", "moe.top_k=2", "--set", "moe.expert_ffn_size=32",
        "--set", "train.seq_len=32", "--set", "train.micro_batch_size=4", "--set",
        "train.steps=6", "--set", "train.warmup_steps=1", "--set", "train.eval_every=0",
        "--set", "checkpoint.every=3", "--set", "checkpoint.keep=2"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--moeforge", required=True)
    parser.add_argument("--source-dir", required=True)
    args = parser.parse_args()
    binary = args.moeforge
    work = tempfile.mkdtemp(prefix="moeforge-analyze-")
    try:
        run_dir = os.path.join(work, "run")
        code, out = run(binary, ["train", "--config",
                                 os.path.join(args.source_dir, "configs", "tiny.yaml"),
                                 "--set", f"train.out_dir={run_dir}"] + TINY)
        if code != 0:
            sys.exit(f"training failed:\n{out}")
        early = os.path.join(run_dir, "checkpoints", "step-00000003")
        check(os.path.isdir(early), "the run keeps its step-3 checkpoint")

        report_dir = os.path.join(work, "report")
        code, out = run(binary, ["analyze", "--from", run_dir, "--compare", early, "--windows",
                                 "8", "--capacity-factor", "0.5", "--out", report_dir])
        check(code == 0, f"analyze --compare exits 0 ({out[-800:] if code else ''})")
        with open(os.path.join(report_dir, "report.json")) as f:
            report = json.load(f)
        for key in ("model", "compare", "data", "probe", "num_experts", "top_k",
                    "capacity_factor", "layers", "co_routing", "stability"):
            check(key in report, f"report.json has '{key}'")
        check(report["probe"]["tokens"] == 8 * 32, "probe = 8 windows × 32 tokens")
        check(len(report["layers"]) == 3 and len(report["co_routing"]) == 2,
              "3 MoE blocks, 2 consecutive pairs")
        for layer in report["layers"]:
            mi = layer["token_expert_mi"]
            check(0 <= mi["mi_bits"] <= min(mi["token_entropy_bits"], mi["expert_entropy_bits"])
                  + 1e-9, f"block {layer['block']}: 0 ≤ I ≤ min(H(token), H(expert))")
            check(len(layer["drops"]["routed"]) == 32 and sum(layer["drops"]["routed"]) ==
                  8 * 32 * 2, f"block {layer['block']}: every slot routed once, by position")
            check(len(layer["expert_magnitude"]["mean_norm"]) == 4, "a mean norm per expert")
        check(any(sum(layer["drops"]["dropped"]) > 0 for layer in report["layers"]),
              "capacity factor 0.5 drops slots")
        pair = report["co_routing"][0]
        check(abs(sum(map(sum, pair["joint"])) - 1) < 1e-9, "co-routing joint sums to 1")
        stability = report["stability"]
        check(0 <= stability["all_layers"] <= min(stability["per_layer"]) <= 1,
              "all-layer stability ≤ each layer's")
        for png in ("token_expert_mi", "co_routing", "expert_magnitude", "drop_positions",
                    "stability"):
            path = os.path.join(report_dir, png + ".png")
            check(os.path.exists(path) and os.path.getsize(path) > 1000, f"{png}.png written")
        check(os.path.exists(os.path.join(report_dir, "report.md")), "report.md written")

        same_dir = os.path.join(work, "same")
        code, out = run(binary, ["analyze", "--from", early, "--compare", early, "--windows", "4",
                                 "--no-plots", "--out", same_dir])
        check(code == 0, "analyze of a checkpoint against itself exits 0")
        if code == 0:
            with open(os.path.join(same_dir, "report.json")) as f:
                same = json.load(f)
            check(same["stability"]["all_layers"] == 1.0 and
                  all(s == 1.0 for s in same["stability"]["per_layer"]),
                  "identical checkpoints: stability 1.0")

        for flags, needle in ((["--windows", "0"], "--windows"),
                              (["--capacity-factor=-1"], "--capacity-factor"),
                              (["--capacity-factor", "65"], "--capacity-factor"),
                              (["--outlier-mads", "0"], "--outlier-mads"),
                              (["--micro-batch", "0"], "--micro-batch"),
                              (["--compare", os.path.join(work, "nope")], "--compare")):
            code, out = run(binary, ["analyze", "--from", run_dir, "--out",
                                     os.path.join(work, "bad")] + flags)
            check(code != 0 and needle in out and out.count("error") == 1,
                  f"{' '.join(flags)}: refused with one message naming the flag")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if failures:
        sys.exit(f"{len(failures)} check(s) failed")
    print("all checks passed")


if __name__ == "__main__":
    main()

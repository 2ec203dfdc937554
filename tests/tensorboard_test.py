#!/usr/bin/env python3
"""moeforge's TensorBoard event files and FLOP rates against the real clients and a hand count.

A short 2-rank run crashes after step 4 (MOEFORGE_FAIL_AT; checkpoint at step 3) and is resumed
to step 6, as runs are in practice. Then:

1. TensorBoard's own record reader reads every event file with its CRC32C checks, and its
   EventAccumulator (what `tensorboard --logdir` uses) returns, for every tag, exactly the steps
   and values of metrics.jsonl: every number of every row, each step once (the resumed file's
   session start makes TensorBoard drop the crashed run's step 4, as metrics.jsonl does).
2. tflops in metrics.jsonl equals a FLOP count written here from the resolved config (6 × active
   matmul parameters + causal attention, routed experts k of E) × tokens/s / ranks; mfu is
   tflops over the peak the run printed.
3. expert_load.jsonl's per-rank tokens per expert sum over the ranks to metrics.jsonl's loads.
"""
import argparse
import glob
import json
import math
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np
import yaml
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow

failures = []

# The tag of each top-level metrics.jsonl key (docs/observability.md); other keys: train/<key>.
GROUPS = {
    "throughput": {"tokens_per_s", "step_seconds", "tflops", "mfu", "hfu"},
    "memory": {"peak_memory_mib"},
    "moe": {"max_vio", "max_vio_micro", "max_vio_p50", "max_vio_p90", "load_cv_p50",
            "load_cv_p90", "load_cv_max", "dropped_frac", "null_frac", "bias_abs_max"},
}


def check(condition, message):
    print(("ok    " if condition else "FAIL  ") + message)
    if not condition:
        failures.append(message)


def tag_of(key):
    for group, keys in GROUPS.items():
        if key in keys:
            return f"{group}/{key}"
    return f"train/{key}"


def expected_scalars(rows):
    """{tag: [(step, value)]} from metrics.jsonl rows: every number but the step."""
    scalars = {}
    for row in rows:
        step = row["step"]
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                scalars.setdefault(tag_of(key), []).append((step, value))
        for layer in row.get("moe_layers", []):
            for key, value in layer.items():
                if key != "layer" and isinstance(value, (int, float)):
                    scalars.setdefault(f"layer_{key}/block_{layer['layer']:02d}", []).append(
                        (step, value))
    return scalars


def read_records(path):
    """Every record of an event file through TensorBoard's reader (which checks both CRCs)."""
    reader = pywrap_tensorflow.PyRecordReader_New(path)
    events = []
    while True:
        try:
            reader.GetNext()
        except errors.OutOfRangeError:
            return events
        events.append(event_pb2.Event.FromString(reader.record()))


def hand_flops_per_token(c):
    """Training FLOPs per token: 3 × (2 × active matmul parameters + causal attention)."""
    m, moe = c["model"], c["moe"]
    hidden, heads, kv_heads = m["hidden_size"], m["num_heads"], m["num_kv_heads"]
    head_dim = m["head_dim"] or hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    attention = 2 * hidden * q + 2 * hidden * kv + (q + 2 * kv if m["qkv_bias"] else 0)
    shared_ffn = moe["shared_expert_ffn_size"] or moe["expert_ffn_size"]
    active = m["vocab_size"] * hidden  # LM head
    for block in range(m["num_layers"]):
        first_moe = moe["first_k_dense"]
        is_moe = block >= first_moe and (block - first_moe) % moe["layer_freq"] == 0
        if is_moe:
            mlp = (hidden * (moe["num_experts"] + moe["router"]["num_null_experts"])
                   + moe["top_k"] * 3 * hidden * moe["expert_ffn_size"]
                   + moe["num_shared_experts"] * 3 * hidden * shared_ffn)
        else:
            mlp = 3 * hidden * m["ffn_size"]
        active += attention + mlp
    seq = c["train"]["seq_len"]
    return 3 * (2 * active + m["num_layers"] * 2 * seq * q)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--moeforge", required=True)
    parser.add_argument("--source-dir", required=True)
    parser.add_argument("--mpiexec", required=True)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="moeforge-tensorboard-")
    out = os.path.join(work, "run")
    command = [args.mpiexec, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none",
               "-n", "2", args.moeforge, "train",
               "--config", os.path.join(args.source_dir, "configs/tiny.yaml")]
    for setting in [f"train.out_dir={out}", "train.steps=6", "train.warmup_steps=1",
                    "train.eval_every=3", "train.eval_batches=1", "checkpoint.every=3",
                    "logging.expert_load_every=2", "moe.balancing.expert_bias.rate=0.001",
                    "data.builtin_bytes=200000"]:
        command += ["--set", setting]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    crashed = subprocess.run(command, env=dict(env, MOEFORGE_FAIL_AT="0:5"), capture_output=True,
                             text=True)
    check(crashed.returncode != 0 and "step     4/6" in crashed.stdout,
          "first run logged step 4, then failed at step 5 (checkpoint at step 3)")
    resumed = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True)
    if resumed.returncode != 0:
        raise SystemExit(f"resumed run failed:\n{resumed.stdout}\n{resumed.stderr}")
    print(resumed.stdout)

    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    expected = expected_scalars(rows)
    step_rows = [row for row in rows if "loss" in row]
    check([row["step"] for row in step_rows] == list(range(1, 7)), "metrics.jsonl: steps 1..6 once")

    # 1. TensorBoard's reader: records and CRCs, then every tag and value.
    files = sorted(glob.glob(os.path.join(out, "tensorboard", "events.out.tfevents.*")))
    check(len(files) == 2, f"two event files (first run, resumed run): {len(files)}")
    for path in files:
        events = read_records(path)
        check(events and events[0].file_version == "brain.Event:2",
              f"{os.path.basename(path)}: {len(events)} records pass TensorBoard's CRC32C checks, "
              "the first is the file version")
    starts = [e.step for e in read_records(files[-1]) if e.HasField("session_log")]
    check(starts == [4], f"the resumed file starts a session at step 4: {starts}")
    accumulator = event_accumulator.EventAccumulator(
        os.path.join(out, "tensorboard"), size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    check(tags == set(expected),
          f"TensorBoard has exactly the {len(expected)} tags of metrics.jsonl "
          f"(missing {sorted(set(expected) - tags)}, extra {sorted(tags - set(expected))})")
    for name in ("train/loss", "train/val_loss", "train/lr", "train/grad_norm",
                 "train/aux_loss", "train/z_loss", "throughput/tokens_per_s",
                 "throughput/tflops", "throughput/mfu", "memory/peak_memory_mib",
                 "moe/max_vio_p90", "moe/load_cv_max", "moe/bias_abs_max",
                 "layer_load_cv/block_00", "layer_max_vio/block_03", "layer_dropped_frac/block_01",
                 "layer_null_frac/block_02", "layer_bias_abs_max/block_00"):
        check(name in tags, f"tag {name}")
    mismatched = []
    for tag in sorted(tags & set(expected)):
        got = [(e.step, e.value) for e in accumulator.Scalars(tag)]
        want = [(step, float(np.float32(value))) for step, value in expected[tag]]
        if got != want:
            mismatched.append(f"{tag}: TensorBoard {got} vs metrics.jsonl {want}")
    check(not mismatched, f"every tag's steps and values equal metrics.jsonl's (float32): "
          f"{mismatched[:3]}")

    # 2. TFLOP/s against the hand count, MFU against the printed peak.
    config = yaml.safe_load(open(os.path.join(out, "config.resolved.yaml")))
    per_token = hand_flops_per_token(config)
    errors_ = [abs(r["tflops"] - per_token * r["tokens_per_s"] / 2 / 1e12) / r["tflops"]
               for r in step_rows]
    check(max(errors_) < 1e-9, f"tflops = {per_token:.0f} FLOPs/token (hand count) × tokens/s / "
          f"2 ranks, every step (worst relative error {max(errors_):.1e})")
    # Each start measures its own peak: steps 1-3 come from the first run, 4-6 from the resumed.
    for run, output, steps in ((1, crashed.stdout, range(1, 4)), (2, resumed.stdout, range(4, 7))):
        printed = re.search(r"measured peak of ([0-9.e+-]+) TFLOP/s", output)
        check(printed is not None, f"run {run} printed the peak it measured")
        if printed:
            peak = float(printed.group(1))
            rows_of_run = [r for r in step_rows if r["step"] in steps]
            ok = all(math.isclose(r["mfu"], r["tflops"] / peak, rel_tol=5e-3) for r in rows_of_run)
            check(ok, f"run {run}: mfu = tflops / {peak} TFLOP/s (the printed, rounded peak)")
    check(all(r["hfu"] >= r["mfu"] > 0 for r in step_rows), "0 < mfu ≤ hfu")
    check(re.search(r"step +6/6 .*TFLOP/s, [0-9.]+% MFU", resumed.stdout) is not None,
          "the step line shows TFLOP/s and MFU")
    check(re.search(r"model FLOPs .*TFLOP/s per rank, MFU [0-9.]+%", resumed.stdout) is not None,
          "the summary shows TFLOP/s and MFU")

    # 3. The per-rank dump against the global loads.
    dumps = [json.loads(line) for line in open(os.path.join(out, "expert_load.jsonl"))]
    check([d["step"] for d in dumps] == [2, 4, 6], f"expert_load.jsonl at steps 2, 4, 6: "
          f"{[d['step'] for d in dumps]}")
    by_step = {row["step"]: row for row in step_rows}
    sums_ok = True
    for dump in dumps:
        for layer, totals in zip(dump["moe_layers"], by_step[dump["step"]]["moe_layers"]):
            per_rank = np.array(layer["tokens_per_expert_by_rank"])
            sums_ok &= per_rank.shape == (2, 8) and layer["layer"] == totals["layer"]
            sums_ok &= per_rank.sum(axis=0).tolist() == totals["expert_load"]
    check(sums_ok, "each dump: [2 ranks × 8 experts] per layer, summing to the step's expert_load")

    shutil.rmtree(work)
    print(f"\n{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

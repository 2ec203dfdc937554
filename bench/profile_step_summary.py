#!/usr/bin/env python3
"""Milliseconds per training step by category, from a Kineto Chrome trace that
`MOEFORGE_PROFILE=FILE moeforge train ...` wrote (trainer/step_profiler.hpp).

    MOEFORGE_PROFILE=/tmp/small.json build/moeforge train --config configs/small.yaml \\
        --set train.steps=6 --set logging.trace_steps=3 ...
    python3 bench/profile_step_summary.py /tmp/small.json

Forward ops are charged to the innermost model scope around them (RECORD_USER_SCOPE in
trainer/model/model.cpp and trainer/trainer.cpp); inside the MoE layer, whose code opens no
scopes, by op name (routing, permutation, expert GEMMs, SwiGLU elementwise, combine). Backward
nodes (autograd::engine::evaluate_function) are charged to the category of the forward op with
their sequence number; backward time outside any node is autograd's own bookkeeping.
"""
import argparse
import bisect
import collections
import json
import re

# Ops inside the "moe" scope, by name (first match wins); the rest is "moe: other". GatheredExperts
# (CPU fp32) is the experts' whole backward in one node: its GEMMs, SwiGLU elementwise work and
# row gathers all count as experts there. In CPU fp32 the shared experts run through it too (one
# expert, unit gates), and the GEMMs are moe/cpu_gemm's oneDNN calls (moeforge::onednn_mm_out;
# the routed experts' moeforge::brgemm_tiles), so routed and shared experts are one category.
MOE_OPS = [
    ("moe: experts (GEMMs; CPU fp32: routed and shared, with SwiGLU and row gathers)",
     r"grouped_mm|^aten::mm$|mm_out|brgemm_tiles|GroupedMatmul|GatheredExperts|^aten::bmm$"),
    ("moe: routing (router, top-k, aux/z-loss, counters)",
     r"topk|softmax|sigmoid|logsumexp|bincount|one_hot|histc|entropy|scatter_add|log$|"
     r"^aten::mean|^aten::sum"),
    ("moe: permutation (argsort, index_select, all-to-all)",
     r"argsort|sort|index_select|gather|AllToAll|all_to_all|cumsum|floor_divide|repeat"),
    ("moe: SwiGLU elementwise", r"silu|Silu"),
    ("moe: combine (gate scaling, index_add)", r"index_add|index_copy|IndexAdd|scatter"),
]
# Custom autograd functions (C++ CppNode<...>) have no forward op with their sequence number.
CUSTOM_NODES = [("moe: experts (GEMMs; CPU fp32: routed and shared, with SwiGLU and row gathers)",
                 r"GroupedMatmul"), ("RMSNorm", r"RmsNorm"),
                # moe/projection's node: attention's q/k/v and o, the router, the LM head.
                ("projections (attention q/k/v/o, router, LM head)", r"Projection"),
                ("attention", r"Rotary"), ("loss (cross-entropy)", r"CrossEntropy"),
                ("moe: permutation (argsort, index_select, all-to-all)", r"AllToAll|Exchange")]
SCOPE_CATEGORY = {
    "embedding": "embedding", "norm": "RMSNorm", "attention": "attention",
    "dense mlp": "dense FFN", "lm head": "LM head", "loss": "loss (cross-entropy)",
    "moe": "moe", "clip + optimizer": "clip + optimizer", "gradient sync": "gradient sync",
}


def moe_category(op_name):
    for category, pattern in MOE_OPS:
        if re.search(pattern, op_name):
            return category
    return "moe: other"


class Intervals:
    """User scopes of one thread: the innermost one around a time point."""

    def __init__(self, scopes):
        self.scopes = sorted(scopes, key=lambda e: (e["ts"], -e["dur"]))
        self.starts = [e["ts"] for e in self.scopes]

    def innermost(self, ts, names):
        best = None
        for e in self.scopes[:bisect.bisect_right(self.starts, ts)]:
            if e["name"] in names and e["ts"] <= ts < e["ts"] + e["dur"]:
                if best is None or e["dur"] < best["dur"]:
                    best = e
        return best


def top_level(ops):
    """Ops not nested in another op of the list (same thread)."""
    result, end = [], -1.0
    for e in sorted(ops, key=lambda e: (e["ts"], -e["dur"])):
        if e["ts"] >= end:
            result.append(e)
            end = e["ts"] + e["dur"]
    return result


def summarise(events):
    scopes = [e for e in events if e.get("cat") == "user_annotation" and "dur" in e]
    ops = [e for e in events if e.get("cat") == "cpu_op" and "dur" in e]
    steps = [e for e in scopes if e["name"] == "train_step"]
    main_tid = steps[0]["tid"]
    scopes = [e for e in scopes if e["tid"] == main_tid]
    ops = [e for e in ops if e["tid"] == main_tid]
    intervals = Intervals(scopes)
    categories = set(SCOPE_CATEGORY)
    totals = collections.Counter()

    router_matmul = {}  # moe scope start -> ts of its first matmul (the router's)

    def forward_category(op):
        scope = intervals.innermost(op["ts"], categories)
        if scope is None:
            return "other (outside model scopes)"
        category = SCOPE_CATEGORY[scope["name"]]
        if category != "moe":
            return category
        if op["name"] in ("aten::matmul", "aten::linear"):
            # The router's projection runs first in the layer; later ones are shared experts.
            first = router_matmul.setdefault(scope["ts"], op["ts"])
            return ("moe: routing (router, top-k, aux/z-loss, counters)" if first == op["ts"]
                    else "moe: shared experts (GEMMs)")
        return moe_category(op["name"])

    # Sequence number -> category of the forward op that made the autograd node.
    by_sequence = {}
    backward_nodes = []
    for op in sorted(ops, key=lambda e: e["ts"]):
        sequence = op.get("args", {}).get("Sequence number")
        if op["name"].startswith("autograd::engine::evaluate_function"):
            backward_nodes.append(op)
        elif sequence is not None and sequence >= 0 and sequence not in by_sequence:
            if intervals.innermost(op["ts"], {"backward"}) is None:
                by_sequence[sequence] = forward_category(op)

    backward_scopes = [e for e in scopes if e["name"] == "backward"]
    in_backward = lambda e: any(b["ts"] <= e["ts"] < b["ts"] + b["dur"] for b in backward_scopes)
    nodes = top_level([n for n in backward_nodes if in_backward(n)])
    node_time = 0.0
    for node in nodes:
        sequence = node.get("args", {}).get("Sequence number")
        if "AccumulateGrad" in node["name"]:
            category = "parameter gradients (AccumulateGrad, sync hooks)"
        else:
            category = by_sequence.get(sequence) or next(
                (c for c, pattern in CUSTOM_NODES if re.search(pattern, node["name"])),
                "unmatched nodes")
        if category == "moe: other" or category.startswith("moe"):
            # Custom functions (grouped matmul, all-to-all) carry their own names.
            named = moe_category(node["name"])
            category = named if named != "moe: other" else category
        totals[f"bwd {category}"] += node["dur"]
        node_time += node["dur"]
    totals["bwd autograd engine (between nodes)"] += (
        sum(b["dur"] for b in backward_scopes) - node_time)

    for op in top_level([o for o in ops if not in_backward(o)]):
        category = forward_category(op)
        in_forward = category not in ("clip + optimizer", "gradient sync")
        totals[f"fwd {category}" if in_forward else category] += op["dur"]
    step_time = sum(s["dur"] for s in steps)
    accounted = sum(totals.values())
    totals["step: between ops (dispatch gaps, host work)"] += step_time - accounted
    return totals, step_time, len(steps)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("trace")
    parser.add_argument("--markdown", action="store_true", help="a table for docs/benchmarks.md")
    args = parser.parse_args()
    events = json.load(open(args.trace))["traceEvents"]
    totals, step_time, steps = summarise(events)
    per_step = lambda us: us / steps / 1e3
    print(f"{args.trace}: {steps} steps, {per_step(step_time):.1f} ms per step")
    if args.markdown:
        print("| category | ms/step | share |\n|---|---:|---:|")
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1]):
        share = 100 * us / step_time
        if args.markdown:
            print(f"| {name} | {per_step(us):.1f} | {share:.0f}% |")
        else:
            print(f"  {per_step(us):8.2f} ms {share:5.1f}%  {name}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Sums the GPU kernels (or, without any, the CPU ops) of a Chrome trace written by
bench_gpu --profile: time per kernel name, largest first, with its share of the total.

  python3 bench/trace_summary.py TRACE.json [--top 15]
"""
import argparse
import collections
import json


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("trace")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    events = json.load(open(args.trace))["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    chosen = kernels or [e for e in events if e.get("cat") == "cpu_op" and "dur" in e]
    totals, counts = collections.Counter(), collections.Counter()
    for e in chosen:
        totals[e["name"]] += e["dur"]
        counts[e["name"]] += 1
    total = sum(totals.values())
    span = (max(e["ts"] + e["dur"] for e in chosen) - min(e["ts"] for e in chosen)) if chosen else 0
    what = "GPU kernels" if kernels else "CPU ops"
    print(f"{args.trace}: {what} {total / 1e3:.2f} ms busy over a {span / 1e3:.2f} ms span")
    for name, us in totals.most_common(args.top):
        print(f"  {us / 1e3:8.2f} ms {100 * us / max(total, 1):5.1f}% x{counts[name]:<4} {name[:110]}")


if __name__ == "__main__":
    main()

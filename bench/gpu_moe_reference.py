#!/usr/bin/env python3
"""PyTorch-eager MoE reference for bench_gpu: the same shapes, timed the same way, side by side.

A torchtitan-style eager MoE layer in ~30 lines: fp32 router + top-k, sort the routed slots by
expert, three torch._grouped_mm calls (gate, up, down) with SwiGLU, gate-weighted index_add back
to the tokens; forward + backward in bf16. It counts the same FLOPs as bench_gpu (18·N·H·F for
N = T·k routed rows) and reports TFLOP/s.

  python3 bench/gpu_moe_reference.py --json ref.jsonl [--quick] [--device cuda|cpu]
  python3 bench/gpu_moe_reference.py --compare moeforge.jsonl ref.jsonl   # ratio table
"""
import argparse
import json
import time

SHAPES = [("mixtral T8k", 4096, 8, 2, 14336, 8192),
          ("mixtral T16k", 4096, 8, 2, 14336, 16384),
          ("deepseek-v2-lite T16k", 2048, 64, 6, 1408, 16384),
          ("deepseek-v3-shard T8k", 7168, 64, 8, 2048, 8192)]
QUICK = [("tiny", 64, 8, 2, 128, 512), ("tiny-fine", 64, 16, 4, 32, 512)]


def eager_moe(torch, x, router, w_gate, w_up, w_down, top_k):
    scores = torch.softmax(x.float() @ router.float().t(), dim=-1)
    gates, ids = torch.topk(scores, top_k, dim=-1)
    gates = gates / gates.sum(-1, keepdim=True)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // top_k
    counts = torch.bincount(flat, minlength=w_gate.shape[0])
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    rows = x[token]
    h = torch.nn.functional.silu(torch._grouped_mm(rows, w_gate.transpose(1, 2), offs=offsets))
    h = h * torch._grouped_mm(rows, w_up.transpose(1, 2), offs=offsets)
    out = torch._grouped_mm(h, w_down.transpose(1, 2), offs=offsets)
    weighted = out.float() * gates.reshape(-1)[order].unsqueeze(1)
    return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add(0, token, weighted)


def median_seconds(torch, device, warmup, iterations, body):
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()
    for _ in range(warmup):
        body()
    sync()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        body()
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def run(args):
    import torch
    torch.manual_seed(20261127)
    iterations = 3 if args.quick else 10
    out = open(args.json, "a") if args.json else None
    for name, hidden, experts, top_k, ffn, tokens in (QUICK if args.quick else SHAPES):
        bf16 = dict(device=args.device, dtype=torch.bfloat16)
        router = (torch.randn(experts, hidden, **bf16) * 0.02).requires_grad_()
        w_gate = (torch.randn(experts, ffn, hidden, **bf16) * 0.02).requires_grad_()
        w_up = (torch.randn(experts, ffn, hidden, **bf16) * 0.02).requires_grad_()
        w_down = (torch.randn(experts, hidden, ffn, **bf16) * 0.02).requires_grad_()
        x = torch.randn(tokens, hidden, **bf16).requires_grad_()
        dy = torch.randn(tokens, hidden, device=args.device)
        params = [router, w_gate, w_up, w_down, x]

        def body():  # as in training: gradients start as None every step
            for p in params:
                p.grad = None
            eager_moe(torch, x, router, w_gate, w_up, w_down, top_k).backward(dy)
        seconds = median_seconds(torch, args.device, 2, iterations, body)
        tflops = 18.0 * tokens * top_k * hidden * ffn / seconds / 1e12
        print(f"{name:<24} eager torch._grouped_mm f+b {seconds * 1e3:9.2f} ms {tflops:8.1f} TFLOP/s")
        if out:
            out.write(json.dumps({"kind": "moe_layer_eager", "name": name, "seconds": seconds,
                                  "tflops": tflops}) + "\n")


def compare(moeforge_path, reference_path):
    ours = {r["name"]: r for r in map(json.loads, open(moeforge_path)) if r["kind"] == "moe_layer"}
    eager = {r["name"]: r for r in map(json.loads, open(reference_path))
             if r["kind"] == "moe_layer_eager"}
    print(f"{'MoE layer bf16 f+b':<24} {'moeforge TF/s':>14} {'matmul TF/s':>12} {'of matmul':>10}"
          f" {'eager TF/s':>11} {'vs eager':>9}")
    for name, r in ours.items():
        e = eager.get(name)
        ratio = f"{r['tflops'] / e['tflops']:8.2f}x" if e else "      -"
        print(f"{name:<24} {r['tflops']:14.1f} {r['matmul_tflops']:12.1f} "
              f"{100 * r['tflops'] / r['matmul_tflops']:9.0f}% "
              f"{e['tflops'] if e else float('nan'):11.1f} {ratio}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compare", nargs=2, metavar=("MOEFORGE_JSON", "REFERENCE_JSON"))
    args = parser.parse_args()
    if args.compare:
        compare(*args.compare)
    else:
        run(args)

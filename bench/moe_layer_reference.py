#!/usr/bin/env python3
"""PyTorch-eager references for bench_moe_layer: one case, timed, as a JSON line.

    moe_layer_reference.py IMPL --tokens T --hidden H --experts E --top-k K --ffn F --iters N

IMPL is one of
  eager  torchtitan-style MoE: softmax top-k router, tokens sorted by expert, separate w1/w3/w2
         through torch._grouped_mm, SwiGLU, gate-weighted index_add combine (the same math as
         moeforge's layer without balancing terms);
  hf     transformers' MixtralSparseMoeBlock with experts_implementation "grouped_mm";
  dense  a dense SwiGLU of intermediate K·F on the same T tokens (the same FLOPs as the
         routed experts).
Forward + backward of sum(out) per iteration, fp32, the thread count of the caller
(OMP_NUM_THREADS). Prints {"seconds": median per iteration, "peak_mib": peak RSS growth over the
RSS before the module was built} — the definitions bench_moe_layer uses for its own cases.
"""

import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F


def current_rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class EagerMoE(torch.nn.Module):
    """~40 lines of eager PyTorch: what a user could write instead of using a framework."""

    def __init__(self, hidden, experts, top_k, ffn):
        super().__init__()
        self.top_k = top_k
        self.router = torch.nn.Parameter(torch.randn(experts, hidden) * 0.02)
        self.w1 = torch.nn.Parameter(torch.randn(experts, hidden, ffn) * 0.02)
        self.w3 = torch.nn.Parameter(torch.randn(experts, hidden, ffn) * 0.02)
        self.w2 = torch.nn.Parameter(torch.randn(experts, ffn, hidden) * 0.02)

    def forward(self, x):
        experts = self.w1.shape[0]
        scores = F.linear(x, self.router).softmax(dim=-1)
        gates, ids = scores.topk(self.top_k, dim=-1)
        gates = gates / gates.sum(dim=-1, keepdim=True)
        flat_ids = ids.reshape(-1)
        order = flat_ids.argsort(stable=True)
        token_of_row = order // self.top_k
        counts = torch.bincount(flat_ids, minlength=experts)
        offsets = counts.cumsum(0).to(torch.int32)
        rows = x.index_select(0, token_of_row)
        h = F.silu(torch._grouped_mm(rows, self.w1, offs=offsets)) * torch._grouped_mm(
            rows, self.w3, offs=offsets
        )
        out = torch._grouped_mm(h, self.w2, offs=offsets)
        out = out * gates.reshape(-1)[order].unsqueeze(1)
        return torch.zeros_like(x).index_add(0, token_of_row, out)


class DenseSwiGLU(torch.nn.Module):
    def __init__(self, hidden, ffn):
        super().__init__()
        self.w_gate = torch.nn.Linear(hidden, ffn, bias=False)
        self.w_up = torch.nn.Linear(hidden, ffn, bias=False)
        self.w_down = torch.nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class HfMixtralBlock(torch.nn.Module):
    def __init__(self, hidden, experts, top_k, ffn):
        super().__init__()
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        config = MixtralConfig(
            hidden_size=hidden,
            intermediate_size=ffn,
            num_local_experts=experts,
            num_experts_per_tok=top_k,
        )
        config._experts_implementation = "grouped_mm"
        self.block = MixtralSparseMoeBlock(config)
        with torch.no_grad():
            for p in self.block.parameters():
                p.normal_(0, 0.02)

    def forward(self, x):
        return self.block(x.unsqueeze(0)).squeeze(0)


def build(args):
    if args.impl == "eager":
        return EagerMoE(args.hidden, args.experts, args.top_k, args.ffn)
    if args.impl == "hf":
        return HfMixtralBlock(args.hidden, args.experts, args.top_k, args.ffn)
    return DenseSwiGLU(args.hidden, args.top_k * args.ffn)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("impl", choices=["eager", "hf", "dense"])
    for name in ["tokens", "hidden", "experts", "top-k", "ffn", "iters"]:
        parser.add_argument(f"--{name}", type=int, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    baseline = current_rss_mib()
    module = build(args)
    x = torch.randn(args.tokens, args.hidden, requires_grad=True)

    def step():
        module.zero_grad(set_to_none=True)  # LibTorch's default too
        module(x).sum().backward()

    step()  # warm-up, as the C++ cases do
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline
    print(json.dumps({"seconds": statistics.median(times), "peak_mib": peak}))


if __name__ == "__main__":
    main()

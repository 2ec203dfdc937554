#!/usr/bin/env python3
"""Whole-model training speed and peak memory: moeforge vs the same architecture as a Hugging
Face transformers model trained in a plain eager-PyTorch AdamW loop (issue 21).

For each config, rounds alternate moeforge, eager, moeforge, eager, ... Each round is a fresh
process training `--steps` steps of one micro-batch shape (micro_batch_size x seq_len x
grad_accum tokens per step, fp32, `--threads` threads, same glibc malloc tuning for both). A
round's figure is the median tokens/s over its steps after the first `--warmup`; the table shows
the median over rounds with the min-max spread, the peak RSS (max resident set, getrusage of
the training process itself) and the ratios moeforge / eager.

    .venv/bin/python bench/bench_model_vs_eager.py [--configs configs/tiny.yaml ...]
        [--steps 20] [--warmup 5] [--rounds 3] [--binary [LABEL=]build/moeforge ...]

MFU is moeforge's own (model FLOPs per token over a matmul peak measured on the device, from its
metrics); the eager loop's is the same FLOPs per token at its tokens/s. 1 / eager MFU bounds the
speed-up over eager that any implementation of the same FLOPs could reach on this machine.

Several --binary (e.g. builds before and after a change) run in the same interleaved rounds;
each gets its ratio to eager and to the first binary. --env LABEL:VAR=VALUE gives one of them
extra environment, e.g. the same binary with MOEFORGE_CPU_GEMM=aten (MKL's sgemm for the fp32
products instead of oneDNN).

The eager side is `Qwen2MoeForCausalLM` (transformers 5: `grouped_mm` experts, `sdpa`
attention), the closest Hugging Face family: routed experts with softmax top-k renormalised,
shared experts (one MLP of num_shared x shared width, the sum of the shared experts), dense
first blocks (mlp_only_layers), GQA, RoPE, RMSNorm, untied LM head, no qkv bias. Differences:
HF multiplies the shared experts by a learned sigmoid gate (one H->1 projection per MoE block;
moeforge's shared experts are ungated), HF's aux loss pools the layers (moeforge sums per-layer
losses), and HF has no router z-loss: the loop adds mean(logsumexp(router logits)^2) per MoE
layer from the router logits HF returns. `--hf-arch mixtral` runs MixtralForCausalLM instead
(no shared experts: less work than moeforge).

Internal: `bench_model_vs_eager.py eager RESOLVED_CONFIG STEPS ...` is one eager round (prints
one JSON line).
"""
import argparse
import json
import math
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# moeforge calls mallopt with these itself (trainer/common/host_allocator.hpp); Python gets the
# same through glibc's tunables, so neither side wins by allocator settings.
GLIBC_TUNABLES = ("glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1073741824:"
                  "glibc.malloc.top_pad=67108864")


def child_env(threads):
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                GLIBC_TUNABLES=GLIBC_TUNABLES)


# ---- moeforge ----------------------------------------------------------------------------------

def run_moeforge(binary, config, steps, warmup, threads, out_dir, extra, launcher, env):
    cmd = shlex.split(launcher) + [binary, "train", "--config", config, "--overwrite",
           "--set", f"train.steps={steps}", "--set", "train.warmup_steps=1",
           "--set", f"train.eval_every={steps + 1}", "--set", "train.eval_batches=1",
           "--set", f"checkpoint.every={steps + 1}", "--set", "checkpoint.keep=1",
           "--set", "parallel.ep_size=1", "--set", f"train.threads_per_rank={threads}",
           "--set", "logging.every=1", "--set", f"train.out_dir={out_dir}"]
    for item in extra:
        cmd += ["--set", item]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**child_env(threads), **env})
    if out.returncode != 0:
        sys.exit(f"moeforge failed ({out.returncode}): {' '.join(cmd)}\n{out.stdout}\n{out.stderr}")
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))
            if '"tokens_per_s"' in line]
    return {"tok_s": statistics.median(r["tokens_per_s"] for r in rows[warmup:]),
            "mfu": statistics.median(r.get("mfu", 0.0) for r in rows[warmup:]),
            "peak_mib": max(r["peak_memory_mib"] for r in rows),
            "loss": rows[-1]["loss"]}


# ---- the eager transformers loop ---------------------------------------------------------------

def load_resolved(path):
    import yaml

    def numbers(node):  # YAML 1.1 reads "1e-06" (no dot) as a string
        if isinstance(node, dict):
            return {k: numbers(v) for k, v in node.items()}
        if isinstance(node, str):
            try:
                return float(node)
            except ValueError:
                return node
        return node

    with open(path) as f:
        return numbers(yaml.safe_load(f))


def hf_model(cfg, arch):
    import torch
    import transformers
    m, moe = cfg["model"], cfg["moe"]
    if moe.get("layer_freq", 1) != 1 or moe["router"]["score"] != "softmax":
        sys.exit("bench: only layer_freq 1 with softmax routing has a transformers twin here")
    head_dim = m["head_dim"] or m["hidden_size"] // m["num_heads"]
    shared_width = moe["shared_expert_ffn_size"] or moe["expert_ffn_size"]
    common = dict(vocab_size=m["vocab_size"], hidden_size=m["hidden_size"],
                  num_hidden_layers=m["num_layers"], num_attention_heads=m["num_heads"],
                  num_key_value_heads=m["num_kv_heads"], head_dim=head_dim,
                  max_position_embeddings=m["max_seq_len"], rms_norm_eps=m["rms_norm_eps"],
                  rope_parameters={"rope_type": "default", "rope_theta": m["rope_theta"]},
                  tie_word_embeddings=m["tie_embeddings"], initializer_range=m["init_std"],
                  num_experts_per_tok=moe["top_k"], output_router_logits=True,
                  router_aux_loss_coef=moe["balancing"]["aux_loss"]["coeff"], use_cache=False)
    if arch == "mixtral":
        if moe["first_k_dense"]:
            sys.exit("bench: Mixtral has no dense blocks; use --hf-arch qwen2_moe")
        config = transformers.MixtralConfig(intermediate_size=moe["expert_ffn_size"],
                                            num_local_experts=moe["num_experts"],
                                            sliding_window=None, **common)
        model = transformers.MixtralForCausalLM(config)
    else:
        config = transformers.Qwen2MoeConfig(
            intermediate_size=m["ffn_size"], moe_intermediate_size=moe["expert_ffn_size"],
            shared_expert_intermediate_size=max(1, moe["num_shared_experts"] * shared_width),
            num_experts=moe["num_experts"], norm_topk_prob=moe["router"]["normalize_gates"],
            decoder_sparse_step=1, mlp_only_layers=list(range(moe["first_k_dense"])),
            qkv_bias=m["qkv_bias"], use_sliding_window=False, **common)
        model = transformers.Qwen2MoeForCausalLM(config)
    return model.to(torch.float32).train()


def corpus_bytes():
    # Byte-level text like moeforge's builtin corpus: the repository's own documentation.
    chunks = []
    for folder in ("docs", "configs", "."):
        base = os.path.join(ROOT, folder)
        for name in sorted(os.listdir(base)):
            if name.endswith((".md", ".yaml")):
                with open(os.path.join(base, name), "rb") as f:
                    chunks.append(f.read())
    return b"".join(chunks)


def learning_rate(t, step):
    if t["warmup_steps"] > 0 and step < t["warmup_steps"]:
        return t["lr"] * (step + 1) / t["warmup_steps"]
    span = max(1, t["steps"] - t["warmup_steps"])
    progress = min(1.0, (step - t["warmup_steps"]) / span)
    return t["min_lr"] + 0.5 * (t["lr"] - t["min_lr"]) * (1 + math.cos(math.pi * progress))


def eager_round(resolved, steps, warmup, threads, arch):
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    cfg = load_resolved(resolved)
    t, moe = cfg["train"], cfg["moe"]
    torch.manual_seed(t["seed"])
    model = hf_model(cfg, arch)
    # AdamW as moeforge runs it: decay on matrices only (not norms, biases, the embedding).
    decay = [p for n, p in model.named_parameters()
             if p.dim() >= 2 and "embed_tokens" not in n and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters()
                if not (p.dim() >= 2 and "embed_tokens" not in n and "norm" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=t["lr"], betas=(t["beta1"], t["beta2"]), eps=t["eps"])
    schedule = dict(t, steps=steps, warmup_steps=1)
    data = torch.tensor(list(corpus_bytes()), dtype=torch.long) % cfg["model"]["vocab_size"]
    batch, seq, accum = t["micro_batch_size"], t["seq_len"], t["grad_accum"]
    z_coeff = moe["balancing"]["z_loss"]["coeff"]
    generator = torch.Generator().manual_seed(t["seed"])
    times, losses = [], []
    for step in range(steps):
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(schedule, step)
        optimizer.zero_grad(set_to_none=True)
        total_loss = 0.0
        for _ in range(accum):
            first = torch.randint(0, data.numel() - seq - 1, (batch,), generator=generator)
            rows = torch.stack([data[i:i + seq + 1] for i in first.tolist()])
            out = model(input_ids=rows[:, :seq], output_router_logits=True)
            loss = F.cross_entropy(out.logits.float().reshape(-1, out.logits.size(-1)),
                                   rows[:, 1:].reshape(-1))
            if moe["balancing"]["aux_loss"]["coeff"] > 0:
                loss = loss + model.router_aux_loss_coef * out.aux_loss
            if z_coeff > 0:
                z = sum(torch.logsumexp(r.float(), -1).square().mean() for r in out.router_logits)
                loss = loss + z_coeff * z
            (loss / accum).backward()
            total_loss += loss.item() / accum
        if t["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        optimizer.step()
        times.append(time.perf_counter() - start)
        losses.append(total_loss)
    tokens = batch * seq * accum
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"tok_s": statistics.median(tokens / s for s in times[warmup:]),
                      "peak_mib": peak_kib / 1024, "loss": losses[-1],
                      "experts": model.config._experts_implementation,
                      "attention": model.config._attn_implementation}))


def run_eager(resolved, steps, warmup, threads, arch):
    cmd = [sys.executable, os.path.abspath(__file__), "eager", resolved, str(steps), str(warmup),
           str(threads), arch]
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_env(threads))
    if out.returncode != 0:
        sys.exit(f"eager loop failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- the comparison ----------------------------------------------------------------------------

def spread(values):
    return f"{statistics.median(values):8.0f} ({min(values):.0f}-{max(values):.0f})"


def compare(args, config, work):
    run_dir = os.path.join(work, os.path.splitext(os.path.basename(config))[0])
    mf = {label: [] for label, _ in args.binaries}
    eager = []
    for round_index in range(args.rounds):
        line = []
        for label, binary in args.binaries:
            mf[label].append(run_moeforge(binary, config, args.steps, args.warmup, args.threads,
                                          run_dir, args.set, args.launcher,
                                          args.env_of.get(label, {})))
            line.append(f"{label} {mf[label][-1]['tok_s']:.0f} tok/s "
                        f"{mf[label][-1]['peak_mib']:.0f} MiB")
        resolved = os.path.join(run_dir, "config.resolved.yaml")
        eager.append(run_eager(resolved, args.steps, args.warmup, args.threads, args.hf_arch))
        line.append(f"eager {eager[-1]['tok_s']:.0f} tok/s {eager[-1]['peak_mib']:.0f} MiB")
        print(f"  {config} round {round_index + 1}: " + " | ".join(line), flush=True)
    return {"config": config, "mf": mf, "eager": eager}


def ratio_text(numerators, denominators):
    ratios = [a["tok_s"] / b["tok_s"] for a, b in zip(numerators, denominators)]
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def mfu_text(runs, reference):
    """MFU per round: moeforge's own (its metrics: model FLOPs over a matmul peak measured on the
    same device), or for the eager loop the same FLOPs per token at its tokens/s."""
    values = [r.get("mfu") or m["mfu"] * r["tok_s"] / m["tok_s"] for r, m in zip(runs, reference)]
    return values, f"{statistics.median(values):.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["configs/tiny.yaml", "configs/small.yaml"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of each median")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--binary", action="append", default=[],
                        help="[LABEL=]PATH of a moeforge binary (repeatable; default build/)")
    parser.add_argument("--env", action="append", default=[],
                        help="LABEL:VAR=VALUE, extra environment for one --binary (e.g. "
                             "--binary onednn=build/moeforge --binary aten=build/moeforge "
                             "--env aten:MOEFORGE_CPU_GEMM=aten)")
    parser.add_argument("--hf-arch", choices=["qwen2_moe", "mixtral"], default="qwen2_moe")
    parser.add_argument("--launcher", default="",
                        help="runs moeforge under this, e.g. 'mpirun -n 1 --bind-to none'")
    parser.add_argument("--set", action="append", default=[], help="extra moeforge override")
    args = parser.parse_args()
    args.binaries = [(b.split("=", 1) if "=" in b else (os.path.basename(os.path.dirname(
        os.path.abspath(b))) + "/moeforge", b)) for b in args.binary or
        [os.path.join(ROOT, "build", "moeforge")]]
    args.env_of = {}
    for item in args.env:
        label, _, assignment = item.partition(":")
        var, equals, value = assignment.partition("=")
        if not equals or label not in dict(args.binaries):
            sys.exit(f"--env {item}: expected LABEL:VAR=VALUE with LABEL one of the --binary labels")
        args.env_of.setdefault(label, {})[var] = value
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-model-") as work:
        for config in args.configs:
            results.append(compare(args, config, work))
    first = args.binaries[0][0]
    print(f"\n{'config':<20} {'run':<24} {'tokens/s':>22} {'vs eager':>18} "
          f"{'vs ' + first:>18} {'peak MiB':>9} {'MFU':>5}")
    for r in results:
        rows = [(label, runs) for label, runs in r["mf"].items()] + [("eager", r["eager"])]
        for label, runs in rows:
            vs_eager = ratio_text(runs, r["eager"]) if label != "eager" else ""
            vs_first = ratio_text(runs, r["mf"][first]) if label != first else ""
            print(f"{r['config']:<20} {label:<24} {spread([x['tok_s'] for x in runs]):>22} "
                  f"{vs_eager:>18} {vs_first:>18} {max(x['peak_mib'] for x in runs):>9.0f} "
                  f"{mfu_text(runs, r['mf'][first])[1]:>5}")
        eager_mfu, _ = mfu_text(r["eager"], r["mf"][first])
        ceilings = [1 / m for m in eager_mfu if m > 0]
        if ceilings:
            print(f"{r['config']:<20} ceiling vs eager (1 / eager MFU: no implementation of the "
                  f"same FLOPs beats eager by more) {statistics.median(ceilings):.2f} "
                  f"({min(ceilings):.2f}-{max(ceilings):.2f})")
    e = results[0]["eager"][0]
    print(f"(eager: transformers {args.hf_arch}, experts '{e['experts']}', attention "
          f"'{e['attention']}'; tokens/s: median over rounds (min-max); ratios: median of the "
          f"per-round ratios (min-max); peak: max RSS over rounds)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "eager":
        eager_round(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
                    sys.argv[6])
    else:
        main()

#!/usr/bin/env python3
"""Hugging Face interop, proved with the real client (transformers, CPU, fp32 / fp64).

    python tests/hf_interop_test.py --moeforge build/moeforge --source-dir .

1. Tiny random Llama (GQA, rope_theta, rms_norm_eps), Qwen2 (qkv bias, tied embeddings) and
   Mistral (one kv head, sliding window) made and saved by transformers; `moeforge import`; moeforge's float64 logits equal the
   float64 transformers logits (<= 1e-6 relative: transformers' RoPE tables are float32 even in
   float64), float32 ones within 1e-4.
2. `moeforge upcycle --method copy` of the Llama into 4 experts top-2: logits equal the dense
   logits (<= 1e-4 relative in fp32; <= 1e-9 in fp64 against moeforge's dense fp64 forward).
3. `moeforge export --format hf-mixtral`: transformers' MixtralForCausalLM loads it and gives
   moeforge's MoE logits and the dense logits (<= 1e-4 relative, fp32).
4. Qwen2 upcycled with a shared expert and a dense first block, exported as hf-qwen2-moe and
   loaded by Qwen2MoeForCausalLM: same logits. Dense model exported as hf-llama: same logits.
5. Round trips moeforge -> HF -> moeforge are exact: re-importing each export and exporting
   again gives bit-identical tensors, and the re-imported model's logits are bit-identical.
6. Continued pretraining from the upcycled checkpoint (of a dense moeforge model trained 60
   steps) starts at the dense model's loss on the same batch, not at a random-init loss, on one
   rank and on two ranks with ep_size 2.
Tolerances are relative Frobenius-norm errors.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

import transformers
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          MixtralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen2MoeForCausalLM)

FP32_TOL = 1e-4
FP64_TOL = 1e-9
# transformers computes RoPE angles in float32 even in a float64 model, which bounds how closely
# a float64 transformers model can agree with a float64 forward (moeforge's RoPE is float64).
HF_FP64_TOL = 1e-6
failures = []


def check(condition, message):
    print(("ok    " if condition else "FAIL  ") + message, flush=True)
    if not condition:
        failures.append(message)


def close(actual, expected, tol, label):
    error = rel(actual, expected)
    check(error <= tol, f"{label}: {error:.2e}")


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


class Moeforge:
    def __init__(self, binary, workdir):
        self.binary, self.workdir, self.calls = binary, workdir, 0

    def run(self, *args, expect_ok=True):
        result = subprocess.run([self.binary, *args], capture_output=True, text=True)
        if expect_ok and result.returncode != 0:
            print(result.stdout, result.stderr)
            raise SystemExit(f"moeforge {' '.join(args)} failed with {result.returncode}")
        return result

    def logits(self, source, tokens_file, dtype="float32"):
        self.calls += 1  # a fresh file each time: loaded tensors may map the file
        out = os.path.join(self.workdir, f"logits-{self.calls}.safetensors")
        self.run("forward", "--from", source, "--tokens", tokens_file, "--out", out,
                 "--dtype", dtype)
        return load_file(out)["logits"]


def hf_logits(model, tokens, dtype=torch.float32):
    model = model.to(dtype).eval()
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


def write_yaml(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def tensors_of(directory):
    result = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            result.update(load_file(os.path.join(directory, name)))
    return result


def make_tokenizer(directory, vocab_size):
    """A small byte-level BPE trained here, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["the router sends each token to its experts", "experts learn while the gate balances",
            "upcycling copies a dense model into a mixture of experts"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return fast


def families(mf, p, tokens, tokens_file):
    """Llama 3.x (llama3 RoPE scaling), Qwen3 (head_dim != hidden/heads, q/k norms), Qwen3-MoE
    (decoder_sparse_step, mlp_only_layers): import logits, upcycle + export back to transformers,
    bit-identical round trips, bf16 export, tokenizers carried along, refusals."""
    from safetensors import safe_open
    from transformers import (AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM,
                              Qwen3MoeConfig, Qwen3MoeForCausalLM)
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, initializer_range=0.08)
    l3 = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}, **common))  # tokens are 24 long: beyond 16
    l3.save_pretrained(p("llama3"))
    # 320 ids: the tokenizer's 256 bytes, merges and one special token fit (ids < 300).
    q3 = Qwen3ForCausalLM(Qwen3Config(num_hidden_layers=2, head_dim=32,
                                      **{**common, "vocab_size": 320}))
    q3.save_pretrained(p("qwen3"))
    tokenizer = make_tokenizer(p("qwen3"), vocab_size=300)
    q3m = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        num_hidden_layers=4, head_dim=16, moe_intermediate_size=32, num_experts=4,
        num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[3], norm_topk_prob=True,
        **common))
    q3m.save_pretrained(p("qwen3_moe"))
    refs = {}
    for name, model in (("llama3", l3), ("qwen3", q3), ("qwen3_moe", q3m)):
        refs[name] = hf_logits(model, tokens)
        close(mf.logits(p(name), tokens_file), refs[name], FP32_TOL,
              f"import {name}: float32 logits vs transformers")
        if name != "qwen3_moe":  # transformers' grouped-mm MoE experts have no float64 kernel
            close(mf.logits(p(name), tokens_file, "float64"),
                  hf_logits(model, tokens, torch.float64), HF_FP64_TOL,
                  f"import {name}: float64 logits vs transformers float64")

    # Upcycle (copy) Qwen3 -> export Qwen3-MoE, and Llama 3 -> Mixtral: transformers reproduces
    # the dense logits. No YAML: the model section comes from the source.
    for source, fmt, arch in (("qwen3", "hf-qwen3-moe", "Qwen3MoeForCausalLM"),
                              ("llama3", "hf-mixtral", "MixtralForCausalLM")):
        mf.run("upcycle", "--from", p(source), "--out", p(f"{source}_up"), "--set",
               "moe.num_experts=4", "--set", "moe.top_k=2", "--set", "moe.expert_ffn_size=128")
        mf.run("export", "--from", p(f"{source}_up"), "--format", fmt, "--out", p(f"{source}_hf"))
        exported = AutoModelForCausalLM.from_pretrained(p(f"{source}_hf"), dtype=torch.float32)
        check(type(exported).__name__ == arch, f"{fmt} loads as {arch}")
        close(hf_logits(exported, tokens), refs[source], FP32_TOL,
              f"upcycled {source} exported as {fmt}: transformers logits vs the dense model")

    # Round trips bit-identical (fp32); bf16 export has bf16 tensors and config dtype.
    for name, fmt in (("qwen3_moe", "hf-qwen3-moe"), ("qwen3", "hf-qwen3"), ("llama3", "hf-llama")):
        mf.run("import", "--from", p(name), "--out", p(f"{name}_run"))
        mf.run("export", "--from", p(f"{name}_run"), "--format", fmt, "--out", p(f"{name}_back"))
        source, back = tensors_of(p(name)), tensors_of(p(f"{name}_back"))
        check(source.keys() == back.keys() and all(torch.equal(source[k], back[k]) for k in source),
              f"{name} -> moeforge -> {fmt}: every tensor bit-identical")
    mf.run("export", "--from", p("qwen3_run"), "--format", "hf-qwen3", "--dtype", "bfloat16",
           "--out", p("qwen3_bf16"))
    with safe_open(p("qwen3_bf16", "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    with open(p("qwen3_bf16", "config.json")) as f:
        exported_dtype = json.load(f).get("dtype")
    check(dtypes == {"BF16"} and exported_dtype == "bfloat16",
          f"bf16 export: tensors {dtypes}, config dtype {exported_dtype}")
    bf16 = AutoModelForCausalLM.from_pretrained(p("qwen3_bf16"))
    check(next(bf16.parameters()).dtype == torch.bfloat16, "bf16 export loads as bfloat16")

    # The tokenizer travels: import/upcycle copy it, export writes it; AutoTokenizer agrees.
    sentence = "the gate sends experts a token"
    for directory in ("qwen3_up", "qwen3_hf", "qwen3_back"):
        loaded = AutoTokenizer.from_pretrained(p(directory))
        ids = loaded.encode(sentence)
        check(ids == tokenizer.encode(sentence) and loaded.decode(ids) == tokenizer.decode(ids),
              f"{directory}: AutoTokenizer encodes/decodes like the source tokenizer")

    # Refusals, each with its message.
    shutil.copytree(p("llama3"), p("yarn"))
    with open(p("yarn", "config.json")) as f:
        cfg = json.load(f)
    cfg["rope_parameters"]["rope_type"] = "yarn"
    with open(p("yarn", "config.json"), "w") as f:
        json.dump(cfg, f)
    r = mf.run("import", "--from", p("yarn"), "--out", p("yarn_run"), expect_ok=False)
    check(r.returncode == 2 and "rope_type 'yarn' is not supported" in r.stderr,
          f"unsupported RoPE type refused by name: {r.stderr.strip()}")
    r = mf.run("upcycle", "--from", p("qwen3"), "--out", p("bad_up"), "--set",
               "model.hidden_size=128", expect_ok=False)
    check(r.returncode == 2 and "model.hidden_size: 128 here, but" in r.stderr
          and "has 64" in r.stderr, f"contradicting model key names both values: {r.stderr.strip()}")
    shutil.copytree(p("qwen3"), p("big_vocab"))
    make_tokenizer(p("big_vocab"), vocab_size=400)
    r = mf.run("import", "--from", p("big_vocab"), "--out", p("big_run"), expect_ok=False)
    check(r.returncode == 2 and "token ids but the model's embedding has model.vocab_size = 320"
          in r.stderr, f"tokenizer larger than the embedding refused: {r.stderr.strip()}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--moeforge", required=True)
    parser.add_argument("--source-dir", required=True)
    parser.add_argument("--mpiexec", default="mpiexec")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    torch.manual_seed(0)
    work = tempfile.mkdtemp(prefix="moeforge-hf-")
    mf = Moeforge(os.path.abspath(args.moeforge), work)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, work {work}")
    p = lambda *parts: os.path.join(work, *parts)  # noqa: E731

    tokens = torch.randint(0, 256, (2, 24), dtype=torch.long)
    save_file({"tokens": tokens.contiguous()}, p("tokens.safetensors"))
    tokens_file = p("tokens.safetensors")

    # --- 1. import dense Llama and Qwen2 ------------------------------------------------------
    llama_cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=64, rope_theta=50000.0, rms_norm_eps=1e-5,
                            tie_word_embeddings=False, initializer_range=0.08)
    llama = LlamaForCausalLM(llama_cfg)
    llama.save_pretrained(p("llama"), safe_serialization=True)
    dense32 = hf_logits(llama, tokens)
    dense64 = hf_logits(llama, tokens, torch.float64)

    qwen_cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=64, rope_theta=1e6, rms_norm_eps=1e-6,
                           tie_word_embeddings=True, initializer_range=0.08)
    qwen = Qwen2ForCausalLM(qwen_cfg)
    with torch.no_grad():  # random q/k/v biases, so the test sees them
        for layer in qwen.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.1)
    qwen.save_pretrained(p("qwen2"), safe_serialization=True)
    qwen32 = hf_logits(qwen, tokens)
    qwen64 = hf_logits(qwen, tokens, torch.float64)

    ours_dense64 = {}
    mistral_cfg = MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=96,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                max_position_embeddings=256, sliding_window=32, rms_norm_eps=1e-5,
                                initializer_range=0.08)
    mistral = MistralForCausalLM(mistral_cfg)
    mistral.save_pretrained(p("mistral"), safe_serialization=True)
    mistral32, mistral64 = hf_logits(mistral, tokens), hf_logits(mistral, tokens, torch.float64)

    for name, ref32, ref64 in (("llama", dense32, dense64), ("qwen2", qwen32, qwen64),
                               ("mistral", mistral32, mistral64)):
        mf.run("import", "--from", p(name), "--out", p(f"{name}_run"))
        ours64 = ours_dense64[name] = mf.logits(p(f"{name}_run"), tokens_file, "float64")
        ours32 = mf.logits(p(f"{name}_run"), tokens_file)
        close(ours64, ref64, HF_FP64_TOL, f"import {name}: float64 logits vs transformers float64")
        close(ours32, ref32, FP32_TOL, f"import {name}: float32 logits vs transformers")

    # --- 2. upcycle (copy) --------------------------------------------------------------------
    moe_yaml = write_yaml(p("moe.yaml"), """
model: {vocab_size: 256, hidden_size: 64, num_layers: 2, num_heads: 4, num_kv_heads: 2,
        ffn_size: 128, max_seq_len: 64, rope_theta: 50000.0, rms_norm_eps: 1.0e-5}
moe: {num_experts: 4, top_k: 2, expert_ffn_size: 128}
train: {seq_len: 24, micro_batch_size: 2, steps: 4, warmup_steps: 0, eval_every: 0}
""")
    mf.run("upcycle", "--from", p("llama"), "--config", moe_yaml, "--out", p("moe_run"),
           "--method", "copy")
    moe32 = mf.logits(p("moe_run"), tokens_file)
    moe64 = mf.logits(p("moe_run"), tokens_file, "float64")
    close(moe32, dense32, FP32_TOL, "upcycle copy: MoE logits vs dense (fp32)")
    close(moe64, ours_dense64["llama"], FP64_TOL, "upcycle copy: MoE logits vs dense (fp64)")

    # --- 3. export as Mixtral, load with transformers -----------------------------------------
    mf.run("export", "--from", p("moe_run"), "--format", "hf-mixtral", "--out", p("mixtral"),
           "--shard-mb", "0.1")  # several shards + index
    check(os.path.exists(p("mixtral", "model.safetensors.index.json")),
          "hf-mixtral export is sharded with model.safetensors.index.json")
    mixtral = MixtralForCausalLM.from_pretrained(p("mixtral"), torch_dtype=torch.float32)
    mixtral32 = hf_logits(mixtral, tokens)
    close(mixtral32, moe32, FP32_TOL, "transformers Mixtral vs moeforge MoE forward")
    close(mixtral32, dense32, FP32_TOL, "transformers Mixtral vs dense Llama")

    # --- 4. Qwen2-MoE with a shared expert and a dense first block; hf-llama ------------------
    qmoe_yaml = write_yaml(p("qwen_moe.yaml"), """
model: {vocab_size: 256, hidden_size: 64, num_layers: 2, num_heads: 4, num_kv_heads: 2,
        ffn_size: 128, max_seq_len: 64, rope_theta: 1000000.0, rms_norm_eps: 1.0e-6,
        qkv_bias: true, tie_embeddings: true}
moe: {num_experts: 4, top_k: 2, expert_ffn_size: 128, num_shared_experts: 1, first_k_dense: 1}
train: {seq_len: 24}
""")
    mf.run("upcycle", "--from", p("qwen2"), "--config", qmoe_yaml, "--out", p("qmoe_run"),
           "--method", "noise", "--noise-std", "0.05")
    qmoe32 = mf.logits(p("qmoe_run"), tokens_file)
    mf.run("export", "--from", p("qmoe_run"), "--format", "hf-qwen2-moe", "--out", p("qwen2_moe"))
    hf_qmoe = Qwen2MoeForCausalLM.from_pretrained(p("qwen2_moe"), torch_dtype=torch.float32)
    hf_qmoe32 = hf_logits(hf_qmoe, tokens)
    close(hf_qmoe32, qmoe32, FP32_TOL, "transformers Qwen2-MoE vs moeforge (noise-upcycled, "
          "shared expert, dense block 0)")
    check(rel(qmoe32, qwen32) > 1e-4, "noise upcycling changes the function (as it should)")

    mf.run("export", "--from", p("llama_run"), "--format", "hf-llama", "--out", p("llama_out"))
    reloaded = LlamaForCausalLM.from_pretrained(p("llama_out"), torch_dtype=torch.float32)
    close(hf_logits(reloaded, tokens), dense32, FP32_TOL, "hf-llama export reloads exactly")

    # --- 5. round trips are exact ---------------------------------------------------------------
    for exported, fmt in (("mixtral", "hf-mixtral"), ("qwen2_moe", "hf-qwen2-moe"),
                          ("llama_out", "hf-llama")):
        mf.run("import", "--from", p(exported), "--out", p(f"{exported}_back"))
        mf.run("export", "--from", p(f"{exported}_back"), "--format", fmt,
               "--out", p(f"{exported}_again"))
        first, second = tensors_of(p(exported)), tensors_of(p(f"{exported}_again"))
        same = first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
        check(same, f"{fmt}: moeforge -> HF -> moeforge -> HF gives bit-identical tensors")
    back = mf.logits(p("mixtral_back"), tokens_file)
    check(torch.equal(back, moe32), "re-imported Mixtral: bit-identical moeforge logits")
    back = mf.logits(p("qwen2_moe_back"), tokens_file)
    check(torch.equal(back, qmoe32), "re-imported Qwen2-MoE: bit-identical moeforge logits")

    # --- 6. continued pretraining starts at the dense loss ---------------------------------------
    def first_loss(run_dir, config, init_from, ep_size=1):
        out = p(run_dir)
        command = ["train", "--config", config, "--init-from", init_from, "--set",
                   f"train.out_dir={out}", "--set", "data.builtin_bytes=300000"]
        if ep_size == 1:
            mf.run(*command)
        else:  # two ranks, experts split over both, each with half the batch
            command += ["--set", f"parallel.ep_size={ep_size}", "--set", "train.micro_batch_size=1"]
            result = subprocess.run([args.mpiexec, "--allow-run-as-root", "--oversubscribe",
                                     "--bind-to", "none", "-n", str(ep_size), mf.binary, *command],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                print(result.stdout, result.stderr)
                raise SystemExit("mpiexec moeforge train failed")
        with open(os.path.join(out, "metrics.jsonl")) as f:
            steps = [json.loads(line) for line in f if '"loss"' in line]
        return steps[0]["loss"]

    dense_yaml = write_yaml(p("dense.yaml"), """
model: {vocab_size: 256, hidden_size: 64, num_layers: 2, num_heads: 4, num_kv_heads: 2,
        ffn_size: 128, max_seq_len: 64, rope_theta: 50000.0, rms_norm_eps: 1.0e-5}
moe: {first_k_dense: 2}
train: {seq_len: 24, micro_batch_size: 2, steps: 60, warmup_steps: 5, eval_every: 0, lr: 0.003}
""")
    # A dense model of our own that has learned something, then upcycled from its checkpoint.
    mf.run("train", "--config", dense_yaml, "--set", f"train.out_dir={p('dense_trained')}",
           "--set", "data.builtin_bytes=300000")
    mf.run("upcycle", "--from", p("dense_trained"), "--config", moe_yaml, "--out",
           p("moe_from_own"))
    dense_loss = first_loss("dense_again", dense_yaml, p("dense_trained"))
    moe_loss = first_loss("moe_continued", p("moe_from_own", "config.yaml"), p("moe_from_own"))
    random_loss = math.log(256)
    check(abs(moe_loss - dense_loss) <= 1e-4 * dense_loss,
          f"continued pretraining: first MoE loss {moe_loss:.5f} = dense loss {dense_loss:.5f}")
    check(moe_loss < random_loss - 1.0,
          f"... far below a random init's ~{random_loss:.2f}")
    moe_loss_ep2 = first_loss("moe_continued_ep2", p("moe_from_own", "config.yaml"),
                              p("moe_from_own"), ep_size=2)
    check(abs(moe_loss_ep2 - dense_loss) <= 1e-4 * dense_loss,
          f"... and on 2 ranks with ep_size 2: {moe_loss_ep2:.5f}")

    # --- bad input is a clear error ------------------------------------------------------------
    broken = p("broken_hf")
    shutil.copytree(p("llama"), broken)
    with open(os.path.join(broken, "config.json")) as f:
        cfg = json.load(f)
    cfg["model_type"] = "gpt2"
    with open(os.path.join(broken, "config.json"), "w") as f:
        json.dump(cfg, f)
    r = mf.run("import", "--from", broken, "--out", p("x"), expect_ok=False)
    check(r.returncode == 2 and "model_type 'gpt2' is not supported" in r.stderr,
          f"unsupported model_type is a clear error: {r.stderr.strip()}")
    r = mf.run("export", "--from", p("qmoe_run"), "--format", "hf-mixtral", "--out", p("y"),
               expect_ok=False)
    check(r.returncode == 2 and "Mixtral has no shared experts" in r.stderr,
          f"unrepresentable export is refused with the reason: {r.stderr.strip()}")

    families(mf, p, tokens, tokens_file)

    # A checkpoint whose tensors do not match its config.json: the message names the HF tensor
    # and its file (not moeforge's internal name only).
    shutil.copytree(p("llama"), p("llama_bad"))
    with open(p("llama_bad", "config.json")) as f:
        bad = json.load(f)
    bad["intermediate_size"] = 96
    with open(p("llama_bad", "config.json"), "w") as f:
        json.dump(bad, f)
    r = mf.run("import", "--from", p("llama_bad"), "--out", p("z"), expect_ok=False)
    check(r.returncode == 2 and "tensor 'model.layers.0.mlp." in r.stderr
          and "llama_bad/model.safetensors" in r.stderr,
          f"wrong-shape HF tensor named with its file: {r.stderr.strip()}")

    if not args.keep:
        shutil.rmtree(work)
    if failures:
        print(f"{len(failures)} check(s) failed")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

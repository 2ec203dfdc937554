#pragma once
// Single-process model conversion subcommands of `moeforge` (see README "Upcycling a Hugging
// Face model"):
//   import   --from HF_DIR --out RUN_DIR            dense or MoE HF model -> moeforge checkpoint
//   upcycle  --from DIR --config moe.yaml --out RUN_DIR [--method copy|noise|drop|granular]
//   export   --from CKPT --format hf-mixtral|hf-qwen2-moe|hf-llama --out HF_DIR
//   forward  --from DIR --tokens FILE --out FILE   logits of a [B, S] I64 "tokens" tensor
//            (or --text FILE / --prompt TEXT: one sequence, tokenised like the model's data)
// DIR/CKPT: a moeforge run directory, checkpoints directory or checkpoint, or (import, upcycle,
// forward) a Hugging Face directory. A run directory written here holds config.yaml and
// checkpoints/step-00000000; `moeforge train --config RUN_DIR/config.yaml --init-from RUN_DIR`
// continues from it with any ep_size.
#include <cstdint>
#include <string>
#include <vector>

#include "trainer/convert/upcycle.hpp"

namespace moeforge {

struct ConvertArgs {
  std::string from, out, config_path, format, tokens, dtype;
  std::string text, prompt, tokenizer;  // forward: text input instead of --tokens
  std::vector<std::string> overrides;
  UpcycleOptions upcycle;
  double shard_mb = 5120;
  bool drop_expert_bias = false;
};

// Each returns 0; UserError on bad input (the caller prints it and exits non-zero).
int import_command(const ConvertArgs& args);
int upcycle_command(const ConvertArgs& args);
int export_command(const ConvertArgs& args);
int forward_command(const ConvertArgs& args);

}  // namespace moeforge

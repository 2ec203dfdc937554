#pragma once
// Using a trained model (README "Use the model you trained"):
//   generate --from DIR --prompt TEXT [--max-tokens N --temperature T --top-k K --top-p P]
//            continue a prompt (single process; KV cache)
//   eval     --from DIR [--text FILE | --data PREFIX] [--split val|train|all]
//            loss, perplexity and per-layer routing statistics (any number of ranks, any ep_size)
// DIR: a moeforge run, checkpoints directory or checkpoint, or a Hugging Face directory.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "trainer/config/config.hpp"
#include "trainer/inference/generation.hpp"

namespace moeforge {

struct GenerateArgs {
  std::string from, prompt, prompt_file, tokenizer;
  SamplingOptions sampling;
  bool no_cache = false;
  bool print_ids = false;  // also print the generated ids (one line)
};

// Single process. Prints the prompt and its continuation to stdout, statistics to stderr.
int generate_command(const GenerateArgs& args);

struct EvalArgs {
  std::string from, text, data, split, json_out;
  std::vector<std::string> overrides;
  std::optional<int64_t> windows, micro_batch_size;
  int ep_size = 1;
};

// The config a model is evaluated (or analysed) under: the checkpoint's own, its data section
// included, or for a Hugging Face directory defaults around its model; then --text / --data,
// the --set overrides and --ep-size.
Config eval_config(const EvalArgs& args);

// Collective over MPI_COMM_WORLD; returns the exit code every rank agrees on.
int eval_command(const EvalArgs& args, int rank, int world_size);

}  // namespace moeforge

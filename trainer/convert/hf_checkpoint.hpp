#pragma once
// Hugging Face model directories (config.json + safetensors, sharded with
// model.safetensors.index.json or single-file), in both directions.
//
// Import: dense Llama / Mistral / Qwen2 and MoE Mixtral / Qwen2-MoE become a moeforge Config
// (model and moe sections; the rest from `base`) plus weights by checkpoint name, in fp32.
// Export: hf-llama (dense models), hf-mixtral, hf-qwen2-moe. What a format cannot express
// (e.g. shared experts in Mixtral, sigmoid routing, a non-zero expert bias) is refused with the
// reason, never silently dropped. Tensor names follow transformers' legacy per-expert layout,
// which every Hugging Face loader and serving stack reads.
#include <cstdint>
#include <map>
#include <string>

#include "trainer/config/config.hpp"
#include "trainer/model/model_weights.hpp"

namespace moeforge::hf {

struct ImportedModel {
  Config config;
  WeightMap weights;
  std::string model_type;  // config.json's model_type
  // Where each tensor came from, for messages: our name -> "'HF name' in FILE".
  std::map<std::string, std::string> origin;
};

// True when `dir` holds a config.json (a Hugging Face model directory).
bool is_hf_directory(const std::string& dir);

// The moeforge config of an HF model directory: `base` with the model section (and the MoE
// layout) from config.json, tensors not read. UserError naming the file and key.
Config read_config(const std::string& dir, const Config& base, std::string* model_type = nullptr);

// UserError naming the file and key (config.json) or tensor (safetensors) on bad input.
ImportedModel import_directory(const std::string& dir, const Config& base);

struct ExportOptions {
  std::string format;  // hf-llama | hf-mixtral | hf-qwen2-moe | hf-qwen3 | hf-qwen3-moe
  uint64_t max_shard_bytes = 5ULL << 30;
  std::string dtype = "float32";  // float32 | bfloat16 | float16
  bool drop_expert_bias = false;  // allow losing a non-zero aux-loss-free bias
};

// Writes config.json and the safetensors shards (+ index when sharded) into `out_dir`.
void export_directory(const Config& config, const WeightMap& weights, const ExportOptions& options,
                      const std::string& out_dir);

}  // namespace moeforge::hf

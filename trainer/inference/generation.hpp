#pragma once
// Autoregressive generation from a trained model (`moeforge generate`): greedy or sampled
// (temperature, top-k, top-p), with a KV cache so that each new token costs one position's
// forward pass instead of the whole prefix's. Single process (the model holds every expert).
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "trainer/model/model.hpp"

namespace moeforge {

struct SamplingOptions {
  int64_t max_new_tokens = 200;
  double temperature = 0.0;           // 0 = greedy (argmax); otherwise logits / temperature
  int64_t top_k = 0;                  // > 0: sample among the k most likely tokens only
  double top_p = 1.0;                 // < 1: sample among the smallest set holding this probability
  uint64_t seed = 1234;               // sampling is deterministic for a seed
  bool use_cache = true;              // false: recompute the whole prefix every token (reference)
  std::optional<int64_t> stop_token;  // generation ends after emitting it
};

// The id chosen from one position's logits [V] (float32 or float64) under `options`.
int64_t choose_token(const at::Tensor& logits, const SamplingOptions& options,
                     at::Generator& generator);

// Continues `prompt` (non-empty ids) by up to max_new_tokens ids and returns the new ids only.
// `on_token` (optional) sees each id as it is chosen. The model must be in eval mode; its
// context (model.max_seq_len) bounds prompt + new tokens (UserError beyond).
std::vector<int64_t> generate(DecoderLMImpl& model, const std::vector<int64_t>& prompt,
                              const SamplingOptions& options, int64_t max_seq_len,
                              const std::function<void(int64_t)>& on_token = {});

}  // namespace moeforge

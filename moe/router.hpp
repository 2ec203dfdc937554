#pragma once
// Router (spine step 1): logits = x·Wrᵀ in fp32, scores = softmax | sigmoid, top-k selection on
// (scores + expert_bias) — the bias steers *which* experts are picked (auxiliary-loss-free
// balancing) but never the gate values — and gates gathered from the unbiased scores,
// optionally renormalised over the k picks, times scaling_factor.
#include <torch/nn/module.h>

#include "trainer/config.hpp"

namespace moeforge::moe {

struct RouterOutput {
  at::Tensor logits;      // [T, E] fp32
  at::Tensor scores;      // [T, E] fp32, differentiable
  at::Tensor expert_ids;  // [T, k] int64 global expert ids, best first
  at::Tensor gates;       // [T, k] fp32, differentiable
};

class RouterImpl : public torch::nn::Module {
 public:
  RouterImpl(int64_t hidden_size, const MoeConfig& config);

  // x: [T, H] (any float dtype; routed in fp32).
  RouterOutput forward(const at::Tensor& x);

  at::Tensor weight;       // [E, H] fp32 parameter
  at::Tensor expert_bias;  // [E] fp32 buffer; updated by the balancer, never by the optimizer

 private:
  int64_t num_experts_;
  int64_t top_k_;
  RouterConfig config_;
};
TORCH_MODULE(Router);

}  // namespace moeforge::moe

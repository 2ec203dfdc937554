#pragma once
// Router (spine step 1): logits = x·Wrᵀ in fp32 over the routing pool (E real experts, then
// num_null_experts null experts), scores = softmax | sigmoid, then one of
//
//   token_choice   top-k per token on (scores + expert_bias); with group-limited routing only
//                  inside the token's best topk_groups groups (DeepSeek-V3 node-limited style).
//   expert_choice  each expert takes its top-C tokens of the micro-batch (Zhou et al. 2022);
//                  a token gets 0..E experts.
//
// The bias steers *which* experts are picked (auxiliary-loss-free balancing) but never the gate
// values: gates come from the unbiased scores, optionally renormalised over the k picks, times
// scaling_factor. Null experts (AdaMoE) take part in the selection and gate normalisation but
// produce 0 and are never dispatched.
#include <torch/nn/module.h>

#include "moe/moe_config.hpp"

namespace moeforge::moe {

struct RouterOutput {
  at::Tensor logits;      // [T, P] fp32 over the pool P = E + null experts
  at::Tensor scores;      // [T, P] fp32, differentiable
  at::Tensor expert_ids;  // [T, k] int64 pool ids (≥ E: null expert); expert_choice: k = E
  at::Tensor gates;       // [T, k] fp32, differentiable
  at::Tensor selected;    // [T, k] bool: the pick is real (undefined = all; expert_choice sets it)
};

class RouterImpl : public torch::nn::Module {
 public:
  RouterImpl(int64_t hidden_size, const MoeConfig& config);

  // x: [T, H] (any float dtype; routed in fp32). `capacity_factor` is used by expert_choice.
  // `noise_seed` seeds the training jitter: the trainer passes the same seed for the same
  // (step, micro-batch, rank, layer), so a replayed forward routes identically.
  RouterOutput forward(const at::Tensor& x, double capacity_factor = 0.0, uint64_t noise_seed = 0);

  int64_t pool_size() const { return pool_; }

  at::Tensor weight;       // [P, H] fp32 parameter
  at::Tensor expert_bias;  // [P] fp32 buffer; updated by the balancer, never by the optimizer

 private:
  at::Tensor selection_scores(const at::Tensor& scores) const;  // + bias, group mask
  int64_t num_experts_;
  int64_t pool_;
  int64_t top_k_;
  RouterConfig config_;
};
TORCH_MODULE(Router);

}  // namespace moeforge::moe

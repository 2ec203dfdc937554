#include "moe/router.hpp"

#include <ATen/ATen.h>

namespace moeforge::moe {

RouterImpl::RouterImpl(int64_t hidden_size, const MoeConfig& config)
    : num_experts_(config.num_experts), top_k_(config.top_k), config_(config.router) {
  weight = register_parameter("weight", at::zeros({num_experts_, hidden_size}, at::kFloat));
  expert_bias = register_buffer("expert_bias", at::zeros({num_experts_}, at::kFloat));
}

RouterOutput RouterImpl::forward(const at::Tensor& x) {
  RouterOutput out;
  out.logits = at::matmul(x.to(at::kFloat), weight.t());  // [T, E]
  out.scores = config_.score == "sigmoid" ? at::sigmoid(out.logits) : at::softmax(out.logits, -1);
  {
    at::NoGradGuard no_grad;
    const auto selection = out.scores.detach() + expert_bias;  // bias: selection only
    out.expert_ids = std::get<1>(at::topk(selection, top_k_, /*dim=*/-1));  // [T, k]
  }
  auto gates = out.scores.gather(1, out.expert_ids);  // [T, k]
  if (config_.normalize_gates && top_k_ > 1) gates = gates / gates.sum(-1, true).clamp_min(1e-20);
  out.gates = gates * config_.scaling_factor;
  return out;
}

}  // namespace moeforge::moe

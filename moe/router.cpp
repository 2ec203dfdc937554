#include "moe/router.hpp"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <limits>

#include "moe/compute_precision.hpp"
#include "moe/projection.hpp"

namespace moeforge::moe {

RouterImpl::RouterImpl(int64_t hidden_size, const MoeConfig& config)
    : num_experts_(config.num_experts),
      pool_(config.num_experts + config.router.num_null_experts),
      top_k_(config.top_k),
      config_(config.router) {
  weight = register_parameter("weight", at::zeros({pool_, hidden_size}, at::kFloat));
  expert_bias = register_buffer("expert_bias", at::zeros({pool_}, at::kFloat));
}

at::Tensor RouterImpl::selection_scores(const at::Tensor& scores) const {
  auto selection = scores.detach() + expert_bias;  // bias: selection only
  const int64_t groups = config_.num_groups;
  if (groups <= 1) return selection;
  // Group-limited: score each group by the sum of its best top_k/topk_groups selection scores,
  // keep the best topk_groups groups, and hide the other groups' experts. Null experts are in
  // no group and stay eligible.
  const int64_t tokens = scores.size(0);
  const int64_t per_group = num_experts_ / groups;
  const auto real = selection.narrow(1, 0, num_experts_).view({tokens, groups, per_group});
  const int64_t best = std::clamp<int64_t>(top_k_ / config_.topk_groups, 1, per_group);
  const auto group_score = std::get<0>(real.topk(best, -1)).sum(-1);           // [T, G]
  const auto chosen = std::get<1>(group_score.topk(config_.topk_groups, -1));  // [T, g]
  const auto flags = scores.options().dtype(at::kBool);
  auto allowed = at::zeros({tokens, groups}, flags).scatter_(1, chosen, true);
  auto mask = allowed.unsqueeze(-1).expand({tokens, groups, per_group}).reshape({tokens, -1});
  if (pool_ > num_experts_)
    mask = at::cat({mask, at::ones({tokens, pool_ - num_experts_}, flags)}, 1);
  return selection.masked_fill(mask.logical_not(), -std::numeric_limits<float>::infinity());
}

RouterOutput RouterImpl::forward(const at::Tensor& x, double capacity_factor, uint64_t noise_seed) {
  RouterOutput out;
  const NoAutocast fp32_routing;  // also under train.precision: bf16
  // fp32 routing (float64 when the model runs in float64, for reference runs).
  const auto type = at::promote_types(weight.scalar_type(), at::kFloat);
  auto input = x.to(type);
  if (is_training() && config_.jitter_eps > 0) {
    // Multiplicative jitter (Switch Transformer) from a seeded generator: reproducible.
    auto generator = at::make_generator<at::CPUGeneratorImpl>(noise_seed);
    const auto noise = at::empty(input.sizes(), type)
                           .uniform_(1.0 - config_.jitter_eps, 1.0 + config_.jitter_eps, generator);
    input = input * noise.to(input.device());
  }
  out.logits = projection(input, weight.to(type));  // [T, P]
  out.scores = config_.score == ScoreFunction::kSigmoid ? at::sigmoid(out.logits)
                                                        : at::softmax(out.logits, -1);
  const int64_t tokens = x.size(0);
  if (config_.routing == Routing::kExpertChoice) {
    {
      at::NoGradGuard no_grad;
      // Each expert takes its top-C tokens by (biased) selection score.
      const int64_t capacity = expert_choice_capacity(capacity_factor, tokens, top_k_, pool_);
      const auto picked =
          std::get<1>(selection_scores(out.scores).t().topk(capacity, -1));  // [E, C]
      const auto options = out.scores.options();
      out.selected = at::zeros({pool_, tokens}, options.dtype(at::kBool))
                         .scatter_(1, picked, true)
                         .t()
                         .contiguous();
      out.expert_ids =
          at::arange(pool_, options.dtype(at::kLong)).expand({tokens, pool_}).contiguous();
    }
    out.gates = out.scores * config_.scaling_factor;  // unbiased scores, no renormalisation
    return out;
  }
  {
    at::NoGradGuard no_grad;
    out.expert_ids = std::get<1>(at::topk(selection_scores(out.scores), top_k_, -1));  // [T, k]
  }
  auto gates = out.scores.gather(1, out.expert_ids);  // [T, k]
  if (config_.normalize_gates && top_k_ > 1) gates = gates / gates.sum(-1, true).clamp_min(1e-20);
  out.gates = gates * config_.scaling_factor;
  return out;
}

}  // namespace moeforge::moe

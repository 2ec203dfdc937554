#include "moe/load_balancing.hpp"

#include <ATen/ATen.h>

namespace moeforge::moe {
namespace {

// Σ_i f_i P_i · E over one group of tokens: scores [n, E], ids [n, k].
at::Tensor aux_loss_over(const at::Tensor& scores, const at::Tensor& ids, int64_t num_experts) {
  const auto probs = scores / scores.sum(-1, true).clamp_min(1e-20);
  const auto fraction =
      expert_load(ids, num_experts).to(at::kFloat) / static_cast<double>(ids.numel());
  const auto mean_prob = probs.mean(0);  // [E]
  return (fraction * mean_prob).sum() * static_cast<double>(num_experts);
}

}  // namespace

at::Tensor aux_loss(const at::Tensor& scores, const at::Tensor& expert_ids, int64_t num_experts,
                    const std::string& scope, int64_t seq_len) {
  if (scope == "sequence") {
    const int64_t tokens = scores.size(0);
    TORCH_CHECK(seq_len > 0 && tokens % seq_len == 0, "sequence aux loss: ", tokens,
                " tokens are not whole sequences of ", seq_len);
    const int64_t sequences = tokens / seq_len;
    const int64_t k = expert_ids.size(1);
    // Per-sequence f and P without a loop: [B, S, E] views.
    const auto probs = scores / scores.sum(-1, true).clamp_min(1e-20);
    const auto mean_prob = probs.view({sequences, seq_len, num_experts}).mean(1);  // [B, E]
    auto counts = at::zeros({sequences, num_experts}, at::kFloat);
    const auto ids = expert_ids.view({sequences, seq_len * k});
    counts.scatter_add_(1, ids, at::ones(ids.sizes(), at::kFloat));
    const auto fraction = counts / static_cast<double>(seq_len * k);
    return (fraction * mean_prob).sum(-1).mean() * static_cast<double>(num_experts);
  }
  return aux_loss_over(scores, expert_ids, num_experts);
}

at::Tensor z_loss(const at::Tensor& logits) { return at::logsumexp(logits, -1).square().mean(); }

at::Tensor expert_load(const at::Tensor& expert_ids, int64_t num_experts) {
  return at::bincount(expert_ids.reshape({-1}), {}, num_experts);
}

double max_violation(const at::Tensor& load) {
  const auto as_double = load.to(at::kDouble);
  const double mean = as_double.mean().item<double>();
  if (mean <= 0) return 0.0;
  return as_double.max().item<double>() / mean - 1.0;
}

double router_entropy(const at::Tensor& scores) {
  const auto probs = scores.detach().to(at::kDouble);
  const auto normalised = probs / probs.sum(-1, true).clamp_min(1e-300);
  return -(normalised * normalised.clamp_min(1e-300).log()).sum(-1).mean().item<double>();
}

}  // namespace moeforge::moe

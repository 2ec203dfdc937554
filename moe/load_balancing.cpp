#include "moe/load_balancing.hpp"

#include <ATen/ATen.h>

namespace moeforge::moe {
namespace {

// [T, P] float: how many of token t's selected slots picked expert e (0 or 1 each).
at::Tensor slot_counts(const at::Tensor& expert_ids, const at::Tensor& selected, int64_t pool) {
  auto ones = at::ones(expert_ids.sizes(), at::kFloat);
  if (selected.defined()) ones = ones * selected.to(at::kFloat);
  return at::zeros({expert_ids.size(0), pool}, at::kFloat).scatter_add_(1, expert_ids, ones);
}

}  // namespace

at::Tensor aux_loss(const at::Tensor& scores, const at::Tensor& expert_ids,
                    const at::Tensor& selected, const std::string& scope, int64_t seq_len,
                    const at::Tensor& global_fraction) {
  const int64_t tokens = scores.size(0);
  const int64_t pool = scores.size(1);
  const auto probs = scores / scores.sum(-1, true).clamp_min(1e-20);  // [T, P]
  const auto scale = static_cast<double>(pool);
  if (scope == "sequence") {
    TORCH_CHECK(seq_len > 0 && tokens % seq_len == 0, "sequence aux loss: ", tokens,
                " tokens are not whole sequences of ", seq_len);
    const int64_t sequences = tokens / seq_len;
    const auto counts = slot_counts(expert_ids, selected, pool).view({sequences, seq_len, pool});
    const auto per_sequence = counts.sum(1);  // [B, P]
    const auto fraction = per_sequence / per_sequence.sum(-1, true).clamp_min(1.0);
    const auto mean_prob = probs.view({sequences, seq_len, pool}).mean(1);  // [B, P]
    return (fraction * mean_prob).sum(-1).mean() * scale;
  }
  at::Tensor fraction;
  if (scope == "global_batch" && global_fraction.defined()) {
    fraction = global_fraction.to(at::kFloat);
  } else {
    const auto counts = slot_counts(expert_ids, selected, pool).sum(0);  // [P]
    fraction = counts / counts.sum().clamp_min(1.0);
  }
  return (fraction * probs.mean(0)).sum() * scale;
}

at::Tensor z_loss(const at::Tensor& logits) {
  return at::logsumexp(logits, -1).square().mean();
}

at::Tensor expert_load(const at::Tensor& expert_ids, const at::Tensor& selected, int64_t pool) {
  const auto ids =
      selected.defined() ? expert_ids.masked_select(selected) : expert_ids.reshape({-1});
  return at::bincount(ids, {}, pool);
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

#include "moe/load_balancing.hpp"

#include <ATen/ATen.h>

namespace moeforge::moe {
namespace {

// [T, P] float: how many of token t's selected slots picked expert e (0 or 1 each).
at::Tensor slot_counts(const at::Tensor& expert_ids, const at::Tensor& selected, int64_t pool) {
  const auto options = expert_ids.options().dtype(at::kFloat);
  const auto ones =
      selected.defined() ? selected.to(at::kFloat) : at::ones(expert_ids.sizes(), options);
  return at::zeros({expert_ids.size(0), pool}, options).scatter_add_(1, expert_ids, ones);
}

}  // namespace

at::Tensor aux_loss(const at::Tensor& scores, const at::Tensor& expert_ids,
                    const at::Tensor& selected, AuxLossScope scope, int64_t seq_len,
                    const at::Tensor& global_fraction) {
  const int64_t tokens = scores.size(0);
  const int64_t pool = scores.size(1);
  const auto probs = scores / scores.sum(-1, true).clamp_min(1e-20);  // [T, P]
  const auto scale = static_cast<double>(pool);
  if (scope == AuxLossScope::kSequence) {
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
  if (scope == AuxLossScope::kGlobalBatch && global_fraction.defined()) {
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

at::Tensor count_ids(const at::Tensor& ids, int64_t n, const at::Tensor& weight) {
  const auto flat = ids.reshape({-1});
  const auto options = flat.options().dtype(at::kLong);
  const auto counted =
      weight.defined() ? weight.reshape({-1}).to(at::kLong) : at::ones(flat.sizes(), options);
  return at::zeros({n}, options).index_add_(0, flat, counted);
}

at::Tensor expert_load(const at::Tensor& expert_ids, const at::Tensor& selected, int64_t pool) {
  return count_ids(expert_ids, pool, selected);
}

at::Tensor max_violation_tensor(const at::Tensor& load) {
  const auto as_double = load.to(at::kDouble);
  const auto mean = as_double.mean();
  // 0 when there are no tokens (mean 0) instead of 0/0.
  return at::where(mean > 0, as_double.max() / mean.clamp_min(1e-300) - 1.0, at::zeros_like(mean));
}

double max_violation(const at::Tensor& load) {
  return max_violation_tensor(load).item<double>();
}

at::Tensor router_entropy(const at::Tensor& scores) {
  const auto probs = scores.detach().to(at::kDouble);
  const auto normalised = probs / probs.sum(-1, true).clamp_min(1e-300);
  return -(normalised * normalised.clamp_min(1e-300).log()).sum(-1).mean();
}

}  // namespace moeforge::moe

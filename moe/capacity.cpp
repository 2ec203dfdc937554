#include "moe/capacity.hpp"

#include <ATen/ATen.h>

#include <cmath>

#include "moe/load_balancing.hpp"

namespace moeforge::moe {

at::Tensor capacity_keep_mask(const at::Tensor& expert_ids, const at::Tensor& gates,
                              int64_t num_experts, int64_t capacity, DropPolicy drop_policy) {
  at::NoGradGuard no_grad;
  const auto ids = expert_ids.reshape({-1});  // [N] slot s = t*k + j
  const int64_t slots = ids.numel();
  // Order slots by expert, and within an expert by priority (best first).
  at::Tensor order;
  if (drop_policy == DropPolicy::kProbs) {
    const auto by_gate = at::argsort(gates.detach().reshape({-1}), /*stable=*/true, 0, true);
    const auto by_expert = at::argsort(ids.index_select(0, by_gate), /*stable=*/true);
    order = by_gate.index_select(0, by_expert);
  } else {  // position: earliest slot first
    order = at::argsort(ids, /*stable=*/true);
  }
  const auto sorted_ids = ids.index_select(0, order);
  const auto counts = count_ids(ids, num_experts);
  const auto starts = at::cumsum(counts, 0) - counts;  // first sorted row per expert
  const auto rank_in_expert =
      at::arange(slots, ids.options().dtype(at::kLong)) - starts.index_select(0, sorted_ids);
  auto keep = at::zeros({slots}, ids.options().dtype(at::kBool));
  keep.index_put_({order}, rank_in_expert < capacity);
  return keep.view(expert_ids.sizes());
}

}  // namespace moeforge::moe

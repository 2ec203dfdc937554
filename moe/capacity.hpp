#pragma once
// Capacity limit (spine step 3). With factor c > 0 each expert accepts at most
//   capacity = ceil(c · T · k / E)
// of this rank's T·k routed slots; the others are dropped (their output is 0, the token keeps
// its residual). Policy "probs" keeps each expert's highest-gate slots; "position" keeps the
// earliest slots in (token, slot) order. factor 0 = dropless: every slot is kept.
#include <ATen/core/Tensor.h>

#include "moe/moe_config.hpp"

namespace moeforge::moe {

// expert_ids [T, k], gates [T, k] -> keep mask [T, k] bool.
at::Tensor capacity_keep_mask(const at::Tensor& expert_ids, const at::Tensor& gates,
                              int64_t num_experts, int64_t capacity, DropPolicy drop_policy);

}  // namespace moeforge::moe

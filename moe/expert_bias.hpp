#pragma once
// Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert fp32 bias added to the scores used
// for top-k selection only. Once per optimizer step, from the load of the whole global batch
// (all micro-batches, summed over every rank):
//   b_i += rate · sign(mean(load) − load_i),   then optionally b -= mean(b).
// The rate follows a two-phase schedule: `rate`, then `final_rate` for the last `final_phase`
// fraction of train.steps (DeepSeek-V3 stops updating for the final tokens).
#include <ATen/core/Tensor.h>

#include "moe/moe_config.hpp"

namespace moeforge::moe {

// Rate for the optimizer step with 0-based index `step` of `total_steps`.
double expert_bias_rate(const ExpertBiasConfig& config, int64_t step, int64_t total_steps);

// bias [P] fp32 (in place); global_load [P] any numeric dtype.
void update_expert_bias(at::Tensor& bias, const at::Tensor& global_load, double rate,
                        bool mean_center);

}  // namespace moeforge::moe

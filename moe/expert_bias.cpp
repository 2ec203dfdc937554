#include "moe/expert_bias.hpp"

#include <ATen/ATen.h>

#include <cmath>

namespace moeforge::moe {

double expert_bias_rate(const ExpertBiasConfig& config, int64_t step, int64_t total_steps) {
  const auto final_steps =
      static_cast<int64_t>(std::llround(config.final_phase * static_cast<double>(total_steps)));
  return step >= total_steps - final_steps ? config.final_rate : config.rate;
}

void update_expert_bias(at::Tensor& bias, const at::Tensor& global_load, double rate,
                        bool mean_center) {
  at::NoGradGuard no_grad;
  if (rate > 0) {
    const auto load = global_load.to(at::kDouble);
    bias.add_((at::sign(load.mean() - load) * rate).to(bias.scalar_type()));
  }
  if (mean_center) bias.sub_(bias.mean());
}

}  // namespace moeforge::moe

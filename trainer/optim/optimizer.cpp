#include "trainer/optim/optimizer.hpp"

#include <ATen/ATen.h>

#include <cmath>

#include "trainer/model/model.hpp"

namespace moeforge {

bool AdamW::decays(const std::string& name) {
  return parameter_role(name) == ParameterRole::kMatrix;
}

AdamW::AdamW(const std::vector<std::pair<std::string, at::Tensor>>& named_parameters,
             const TrainConfig& config)
    : beta1_(config.beta1),
      beta2_(config.beta2),
      eps_(config.eps),
      weight_decay_(config.weight_decay) {
  for (const auto& [name, param] : named_parameters) {
    OptimizerSlot slot;
    slot.name = name;
    slot.param = param;
    slot.decay = decays(name);
    slot.exp_avg = at::zeros_like(param, at::kFloat);
    slot.exp_avg_sq = at::zeros_like(param, at::kFloat);
    slots_.push_back(std::move(slot));
  }
}

void AdamW::step(double lr) {
  at::NoGradGuard no_grad;
  ++steps_taken_;
  const double bias1 = 1.0 - std::pow(beta1_, static_cast<double>(steps_taken_));
  const double bias2 = 1.0 - std::pow(beta2_, static_cast<double>(steps_taken_));
  for (auto& slot : slots_) {
    const auto& grad = slot.param.grad();
    if (!grad.defined()) continue;
    const auto g = grad.to(at::kFloat);
    slot.exp_avg.mul_(beta1_).add_(g, 1.0 - beta1_);
    slot.exp_avg_sq.mul_(beta2_).addcmul_(g, g, 1.0 - beta2_);
    if (slot.decay && weight_decay_ > 0) slot.param.mul_(1.0 - lr * weight_decay_);
    const auto denom = (slot.exp_avg_sq / bias2).sqrt_().add_(eps_);
    slot.param.addcdiv_(slot.exp_avg, denom, -lr / bias1);
  }
}

void AdamW::zero_grad() {
  // Undefined rather than zero: the first backward then hands its gradient over instead of
  // adding it to zeros (one pass less over every gradient per step). Gradient sync defines
  // every gradient again before the step reads it.
  for (auto& slot : slots_) slot.param.mutable_grad() = at::Tensor();
}

double learning_rate(const TrainConfig& config, int64_t step) {
  if (config.warmup_steps > 0 && step < config.warmup_steps) {
    return config.lr * static_cast<double>(step + 1) / static_cast<double>(config.warmup_steps);
  }
  const double span = static_cast<double>(std::max<int64_t>(1, config.steps - config.warmup_steps));
  const double progress = std::min(1.0, static_cast<double>(step - config.warmup_steps) / span);
  return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + std::cos(M_PI * progress));
}

}  // namespace moeforge

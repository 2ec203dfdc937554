#include "trainer/optim/optimizer.hpp"

#include <ATen/ATen.h>

#include <cmath>

#include "parallel/shard_layout.hpp"
#include "trainer/model/model.hpp"

namespace moeforge {
namespace {

// This member's part of a whole fp32 tensor: its chunk when sharded, else the tensor.
at::Tensor own_part(const at::Tensor& whole, parallel::Communicator* shard_group) {
  if (shard_group == nullptr) return whole;
  return parallel::chunk_of(whole, shard_group->size(), shard_group->rank());
}

// The whole tensor of `shape` from this member's part (all-gathered when sharded).
at::Tensor whole_of(const at::Tensor& part, parallel::Communicator* shard_group,
                    at::IntArrayRef shape) {
  if (shard_group == nullptr) return part;
  return parallel::whole_from_chunks(shard_group->all_gather(part), shape);
}

// at::_fused_adamw_ (one pass over each tensor: master, gradient and both moments read and
// written together instead of ~8 separate passes) takes fp32 CPU tensors. It divides by
// sqrt(bias2) after the square root, where AdamW::step's loop divides exp_avg_sq first: the same
// update to rounding.
bool fused_kernel_applies(const std::vector<OptimizerSlot>& slots,
                          const std::vector<at::Tensor>& grads) {
  for (size_t i = 0; i < slots.size(); ++i) {
    const auto& master = slots[i].master;
    if (!master.device().is_cpu() || master.scalar_type() != at::kFloat ||
        !grads[i].device().is_cpu() || grads[i].scalar_type() != at::kFloat ||
        !grads[i].sizes().equals(master.sizes()))
      return false;
  }
  return true;
}

void fused_step(std::vector<OptimizerSlot>& slots, const std::vector<at::Tensor>& grads,
                int64_t steps_taken, double lr, double beta1, double beta2, double eps,
                double weight_decay) {
  const auto step = at::full({}, static_cast<double>(steps_taken), at::kFloat);
  for (const bool decay : {true, false}) {  // one call per weight-decay group
    std::vector<at::Tensor> masters, group_grads, exp_avgs, exp_avg_sqs, steps;
    for (size_t i = 0; i < slots.size(); ++i) {
      if (slots[i].decay != decay) continue;
      masters.push_back(slots[i].master);
      group_grads.push_back(grads[i]);
      exp_avgs.push_back(slots[i].exp_avg);
      exp_avg_sqs.push_back(slots[i].exp_avg_sq);
      steps.push_back(step);
    }
    if (masters.empty()) continue;
    at::_fused_adamw_(masters, group_grads, exp_avgs, exp_avg_sqs, {}, steps, lr, beta1, beta2,
                      decay ? weight_decay : 0.0, eps, /*amsgrad=*/false, /*maximize=*/false);
  }
  for (auto& slot : slots)
    if (slot.shard_group == nullptr && !slot.master.is_same(slot.param))
      slot.param.copy_(slot.master);  // bf16 compute copy of the fp32 master
}

std::vector<ParameterToOptimize> unsharded(
    const std::vector<std::pair<std::string, at::Tensor>>& named_parameters) {
  std::vector<ParameterToOptimize> result;
  for (const auto& [name, param] : named_parameters) result.push_back({name, param});
  return result;
}

}  // namespace

bool AdamW::decays(const std::string& name) {
  return parameter_role(name) == ParameterRole::kMatrix;
}

AdamW::AdamW(const std::vector<ParameterToOptimize>& parameters, const TrainConfig& config)
    : beta1_(config.beta1),
      beta2_(config.beta2),
      eps_(config.eps),
      weight_decay_(config.weight_decay) {
  at::NoGradGuard no_grad;
  for (const auto& [name, param, shard_group, separate_master] : parameters) {
    OptimizerSlot slot;
    slot.name = name;
    slot.param = param;
    slot.decay = decays(name);
    slot.shard_group = shard_group;
    const bool own_master =
        shard_group == nullptr && !separate_master && param.scalar_type() == at::kFloat;
    slot.master = own_master ? param : own_part(param.detach().to(at::kFloat), shard_group).clone();
    slot.exp_avg = at::zeros_like(slot.master, at::kFloat);
    slot.exp_avg_sq = at::zeros_like(slot.master, at::kFloat);
    slots_.push_back(std::move(slot));
  }
}

AdamW::AdamW(const std::vector<std::pair<std::string, at::Tensor>>& named_parameters,
             const TrainConfig& config)
    : AdamW(unsharded(named_parameters), config) {}

void AdamW::step(double lr, const std::vector<at::Tensor>& grads) {
  at::NoGradGuard no_grad;
  ++steps_taken_;
  if (fused_kernel_applies(slots_, grads)) {
    fused_step(slots_, grads, steps_taken_, lr, beta1_, beta2_, eps_, weight_decay_);
    return;
  }
  const double bias1 = 1.0 - std::pow(beta1_, static_cast<double>(steps_taken_));
  const double bias2 = 1.0 - std::pow(beta2_, static_cast<double>(steps_taken_));
  for (size_t i = 0; i < slots_.size(); ++i) {
    auto& slot = slots_[i];
    const auto g = grads[i].to(at::kFloat);
    slot.exp_avg.mul_(beta1_).add_(g, 1.0 - beta1_);
    slot.exp_avg_sq.mul_(beta2_).addcmul_(g, g, 1.0 - beta2_);
    if (slot.decay && weight_decay_ > 0) slot.master.mul_(1.0 - lr * weight_decay_);
    const auto denom = (slot.exp_avg_sq / bias2).sqrt_().add_(eps_);
    slot.master.addcdiv_(slot.exp_avg, denom, -lr / bias1);
    if (slot.shard_group == nullptr && !slot.master.is_same(slot.param))
      slot.param.copy_(slot.master);  // bf16 compute copy of the fp32 master
  }
}

SlotState AdamW::whole_state(size_t index) const {
  const auto& slot = slots_[index];
  const auto shape = slot.param.sizes();
  return {whole_of(slot.master, slot.shard_group, shape),
          whole_of(slot.exp_avg, slot.shard_group, shape),
          whole_of(slot.exp_avg_sq, slot.shard_group, shape)};
}

void AdamW::load_whole_state(size_t index, const SlotState& state) {
  at::NoGradGuard no_grad;
  auto& slot = slots_[index];
  slot.master.copy_(own_part(state.master.to(at::kFloat), slot.shard_group));
  slot.exp_avg.copy_(own_part(state.exp_avg.to(at::kFloat), slot.shard_group));
  slot.exp_avg_sq.copy_(own_part(state.exp_avg_sq.to(at::kFloat), slot.shard_group));
  if (!slot.master.is_same(slot.param)) slot.param.copy_(state.master);
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

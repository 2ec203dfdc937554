#pragma once
// AdamW with decoupled weight decay and the learning-rate schedule.
//
// Decay applies to matrices only: norms, biases and the token embedding are excluded (a choice:
// decaying them hurts small models and buys nothing). State (exp_avg, exp_avg_sq) is fp32 and
// kept per named parameter so checkpoints can store it under global parameter names.
#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "trainer/config/config.hpp"

namespace moeforge {

struct OptimizerSlot {
  std::string name;  // local parameter name (experts stacked)
  at::Tensor param;
  bool decay = true;
  at::Tensor exp_avg;     // same shape as param, fp32
  at::Tensor exp_avg_sq;  // same shape as param, fp32
};

class AdamW {
 public:
  AdamW(const std::vector<std::pair<std::string, at::Tensor>>& named_parameters,
        const TrainConfig& config);

  // One update with learning rate `lr` from the parameters' current .grad().
  void step(double lr);
  void zero_grad();

  int64_t steps_taken() const { return steps_taken_; }
  void set_steps_taken(int64_t steps) { steps_taken_ = steps; }
  std::vector<OptimizerSlot>& slots() { return slots_; }

  static bool decays(const std::string& name);

 private:
  std::vector<OptimizerSlot> slots_;
  double beta1_, beta2_, eps_, weight_decay_;
  int64_t steps_taken_ = 0;
};

// Linear warmup over warmup_steps to lr, then cosine decay to min_lr at `steps`.
// `step` is 0-based (the step about to be taken).
double learning_rate(const TrainConfig& config, int64_t step);

}  // namespace moeforge

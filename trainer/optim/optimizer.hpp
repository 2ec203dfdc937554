#pragma once
// AdamW with decoupled weight decay, fp32 master weights, and the learning-rate schedule.
//
// Decay applies to matrices only: norms, biases and the token embedding are excluded (a choice:
// decaying them hurts small models and buys nothing). Every slot's state is fp32: the master
// weights (the parameter itself when it is fp32 and not sharded; a copy when the model computes
// in bf16, train.precision: bf16) and the moments exp_avg, exp_avg_sq. With a shard group
// (parallel.distributed_optimizer, ZeRO-1) a slot holds only this member's chunk of them
// (parallel/shard_layout.hpp). Checkpoints see whole tensors through whole_state(), so they do
// not depend on precision or sharding.
#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "parallel/communicator.hpp"
#include "trainer/config/config.hpp"

namespace moeforge {

struct ParameterToOptimize {
  std::string name;  // local parameter name (experts stacked)
  at::Tensor param;  // fp32 when the optimizer is built: its values become the masters
  parallel::Communicator* shard_group = nullptr;  // set: keep only this member's chunk
  bool separate_master = false;  // the caller will store `param` in 16 bits: keep an fp32 copy
};

struct OptimizerSlot {
  std::string name;
  at::Tensor param;  // the model's parameter, in its compute dtype
  bool decay = true;
  parallel::Communicator* shard_group = nullptr;
  at::Tensor master;      // fp32; `param` itself, a copy, or this member's chunk (1-D)
  at::Tensor exp_avg;     // like master
  at::Tensor exp_avg_sq;  // like master
};

// A slot's state as whole fp32 tensors of the parameter's shape (what checkpoints store).
struct SlotState {
  at::Tensor master, exp_avg, exp_avg_sq;
};

class AdamW {
 public:
  AdamW(const std::vector<ParameterToOptimize>& parameters, const TrainConfig& config);
  // Unsharded, parameters as they are (tools that only read or write checkpoints).
  AdamW(const std::vector<std::pair<std::string, at::Tensor>>& named_parameters,
        const TrainConfig& config);

  // One update with learning rate `lr`; `grads[i]` is slot i's fp32 gradient, shaped like its
  // master. Unsharded parameters that are not their own masters get the new values; sharded
  // ones are gathered by the caller (parallel::GradientSynchronizer::all_gather_parameters).
  void step(double lr, const std::vector<at::Tensor>& grads);

  // Collective over the slot's shard group when sharded (every member, same slot order).
  SlotState whole_state(size_t slot) const;
  // Takes this member's part of `state` and sets the parameter from the master.
  void load_whole_state(size_t slot, const SlotState& state);

  int64_t steps_taken() const { return steps_taken_; }
  void set_steps_taken(int64_t steps) { steps_taken_ = steps; }
  std::vector<OptimizerSlot>& slots() { return slots_; }
  const std::vector<OptimizerSlot>& slots() const { return slots_; }

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

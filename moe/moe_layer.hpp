#pragma once
// The MoE layer: the whole MoE step, readable top to bottom in moe_layer.cpp.
//
//   x [T, H] → route → balance → capacity → permute → dispatch → experts → combine/unpermute
//            (+ shared experts on all tokens)
//
// Parallelism comes from outside: the layer is given the expert-parallel communicator and
// holds only its E/ep experts; with ep = 1 the same code runs without communication.
// Collective when ep > 1: every EP-group member must run forward and backward together.
#include <torch/nn/module.h>

#include "moe/experts.hpp"
#include "moe/phase_timer.hpp"
#include "moe/router.hpp"
#include "moe/token_dispatcher.hpp"
#include "trainer/config.hpp"

namespace moeforge::moe {

// Per-call routing statistics (no gradient), read by the trainer for telemetry and the
// expert-bias update.
struct RoutingStats {
  at::Tensor load;       // [E] int64 routed slots per global expert on this rank (pre-drop)
  int64_t dropped = 0;   // slots dropped by the capacity limit
  int64_t slots = 0;     // T·k
  double entropy = 0.0;  // mean router entropy (nats)
};

struct MoeOutput {
  at::Tensor y;         // [T, H]
  at::Tensor aux_loss;  // scalar, un-weighted (coefficient applied by the model)
  at::Tensor z_loss;    // scalar, un-weighted
};

class MoeLayerImpl : public torch::nn::Module {
 public:
  MoeLayerImpl(int64_t hidden_size, const MoeConfig& config, parallel::Communicator& ep);

  // x: [T, H]; seq_len: tokens per sequence (for sequence-scope aux loss).
  MoeOutput forward(const at::Tensor& x, int64_t seq_len);

  const RoutingStats& last_stats() const { return stats_; }
  int64_t first_local_expert() const { return dispatcher_.first_local_expert(); }
  int64_t num_local_experts() const { return dispatcher_.num_local_experts(); }

  // Optional per-step timing of forward (not owned; null = off).
  void set_phase_timer(PhaseTimer* timer) { timer_ = timer; }

  Router router{nullptr};
  GroupedExperts experts{nullptr};
  FeedForward shared_experts{nullptr};  // null when num_shared_experts == 0

 private:
  MoeConfig config_;
  TokenDispatcher dispatcher_;
  RoutingStats stats_;
  PhaseTimer* timer_ = nullptr;
};
TORCH_MODULE(MoeLayer);

}  // namespace moeforge::moe

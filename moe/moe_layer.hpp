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

// Routing statistics of the last forward, kept on the layer's device so that reading them needs
// no host synchronisation inside the layer: the trainer sums them over micro-batches and reads
// them once per step.
struct RoutingCounters {
  at::Tensor load;         // [P] int64 selected slots per pool expert on this rank (pre-drop)
  at::Tensor slot_counts;  // [3] int64: selected slots, null-expert slots, kept rows
  at::Tensor entropy;      // 0-dim float64: mean router entropy (nats)
};

// The same numbers on the host (one synchronisation to read them).
struct RoutingStats {
  at::Tensor load;         // [P] int64 selected slots per pool expert on this rank (pre-drop)
  int64_t dropped = 0;     // slots to real experts dropped by the capacity limit
  int64_t slots = 0;       // selected slots (T·k for token choice), null experts included
  int64_t null_slots = 0;  // selected slots that picked a null expert
  int64_t rows = 0;        // rows sent to the experts (kept slots to real experts)
  double entropy = 0.0;    // mean router entropy (nats)
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

  const RoutingCounters& last_counters() const { return counters_; }
  RoutingStats last_stats() const;
  int64_t first_local_expert() const { return dispatcher_.first_local_expert(); }
  int64_t num_local_experts() const { return dispatcher_.num_local_experts(); }
  int64_t num_experts() const { return config_.num_experts; }

  // Optional per-step timing of forward (not owned; null = off).
  void set_phase_timer(PhaseTimer* timer) { timer_ = timer; }

  // Global-batch aux loss: f over the whole global batch ([P] fractions, no gradient), set by
  // the trainer before the micro-batches of an optimizer step; undefined = this micro-batch's.
  void set_global_load_fraction(at::Tensor fraction) { global_fraction_ = std::move(fraction); }

  // Router jitter seed for the next forward calls (see RouterImpl::set_noise_seed).
  void set_noise_seed(uint64_t seed) { router->set_noise_seed(seed); }

  int64_t pool_size() const { return router->pool_size(); }

  // Pipeline chunks of dispatch / experts / combine (parallel.overlap_degree).
  void set_overlap_degree(int64_t chunks) { overlap_degree_ = chunks; }

  Router router{nullptr};
  GroupedExperts experts{nullptr};
  FeedForward shared_experts{nullptr};  // null when num_shared_experts == 0

 private:
  at::Tensor padded_experts_forward(const at::Tensor& rows,
                                    const std::vector<int64_t>& rows_per_expert, int64_t capacity);
  MoeConfig config_;
  TokenDispatcher dispatcher_;
  RoutingCounters counters_;
  at::Tensor global_fraction_;
  int64_t overlap_degree_ = 1;
  PhaseTimer* timer_ = nullptr;
};
TORCH_MODULE(MoeLayer);

}  // namespace moeforge::moe

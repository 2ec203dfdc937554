#pragma once
// The MoE layer: the whole MoE step, readable top to bottom in moe_layer.cpp.
//
//   x [T, H] → route → balance → capacity → permute → dispatch → experts → combine/unpermute
//            (+ shared experts on all tokens)
//
// Parallelism comes from outside: the layer is given the expert-parallel communicator and
// holds only its E/ep experts; with ep = 1 the same code runs without communication.
// Everything a forward needs comes in through its arguments and everything it reports goes out
// in its result: no call order to follow. Collective when ep > 1: every EP-group member must
// run forward and backward together.
#include <torch/nn/module.h>

#include <memory>

#include "moe/experts.hpp"
#include "moe/moe_config.hpp"
#include "moe/node_hop.hpp"
#include "moe/phase_observer.hpp"
#include "moe/router.hpp"
#include "moe/routing_recorder.hpp"
#include "moe/token_dispatcher.hpp"

namespace moeforge::moe {

// Which activations of the layer are recomputed in backward instead of stored
// (train.recompute; parallel/recompute.hpp). Results are bitwise the same either way.
struct MoeRecompute {
  bool layer = false;              // the whole layer: router, dispatch, experts, combine
  bool expert_activation = false;  // the routed experts' SwiGLU activation + second GEMM
};

// Which form of the routed experts a forward takes. kAuto: the gathered experts where every
// expert is local (ep 1, CPU fp32: moe/gathered_experts.hpp), else the dispatch pipeline, whose
// experts are gated_expert_rows in CPU fp32 and the grouped-GEMM GroupedExperts otherwise (bf16,
// CUDA, padded capacity, a recorded forward). Tests and benchmarks force the pipeline (kPipeline)
// or its grouped-GEMM experts (kGroupedGemm) to compare the forms.
enum class ExpertPath { kAuto, kPipeline, kGroupedGemm };

// Per-forward inputs besides the tokens.
struct RoutingInputs {
  // Global-batch aux scope: f over the whole global batch ([P] fractions, no gradient);
  // undefined = this micro-batch's own.
  at::Tensor global_load_fraction;
  uint64_t noise_seed = 0;  // router jitter seed (the same seed routes the same way)
};

// Routing statistics of one forward, on the layer's device (reading them is the caller's
// choice of when to synchronise): the trainer sums them over micro-batches and reads them once
// per step.
struct RoutingCounters {
  at::Tensor load;         // [P] int64 selected slots per pool expert on this rank (pre-drop)
  at::Tensor slot_counts;  // [3] int64: selected slots, null-expert slots, kept rows
  at::Tensor entropy;      // 0-dim float64: mean router entropy (nats)
};

// The same numbers on the host.
struct RoutingStats {
  at::Tensor load;         // [P] int64 (CPU)
  int64_t dropped = 0;     // slots to real experts dropped by the capacity limit
  int64_t slots = 0;       // selected slots (T·k for token choice), null experts included
  int64_t null_slots = 0;  // selected slots that picked a null expert
  int64_t rows = 0;        // rows sent to the experts (kept slots to real experts)
  double entropy = 0.0;    // mean router entropy (nats)
};
RoutingStats read_stats(const RoutingCounters& counters);  // one host synchronisation

struct MoeOutput {
  at::Tensor y;         // [T, H]
  at::Tensor aux_loss;  // scalar, un-weighted (coefficient applied by the model)
  at::Tensor z_loss;    // scalar, un-weighted
  RoutingCounters counters;
};

class MoeLayerImpl : public torch::nn::Module {
 public:
  MoeLayerImpl(int64_t hidden_size, const MoeConfig& config, parallel::Communicator& ep);

  // x: [T, H]; seq_len: tokens per sequence (for sequence-scope aux loss).
  MoeOutput forward(const at::Tensor& x, int64_t seq_len, const RoutingInputs& inputs = {});

  // The same forward in three steps, so that two micro-batches can run through the layer
  // interleaved (parallel.micro_batch_overlap) and one's tokens cross the network while the
  // other computes: `begin` routes, plans (the counts exchange) and starts the dispatch;
  // `advance` runs the experts and starts the combine; `end` waits for the combine and returns
  // what forward() returns. forward() is the three in a row. Paths with no exchange to wait for
  // (all experts local, the two-hop dispatch, the whole layer recomputed, the routing
  // recorder) finish inside `begin`. Every EP rank must make the same calls in the same order.
  struct InFlight;
  std::shared_ptr<InFlight> begin(const at::Tensor& x, int64_t seq_len,
                                  const RoutingInputs& inputs = {});
  void advance(InFlight& flight);
  MoeOutput end(InFlight& flight);

  int64_t first_local_expert() const { return dispatcher_.first_local_expert(); }
  int64_t num_local_experts() const { return dispatcher_.num_local_experts(); }
  int64_t num_experts() const { return config_.num_experts; }
  int64_t pool_size() const { return router->pool_size(); }

  // Pipeline chunks of dispatch / experts / combine (parallel.overlap_degree).
  void set_overlap_degree(int64_t chunks) { overlap_degree_ = chunks; }
  // What the all-to-all sends (parallel.dedup_dispatch): one row per pick, per (token, EP rank)
  // (moe/token_dispatcher.hpp) or per (token, node) (moe/node_hop.hpp; needs the EP group's
  // `ranks_per_node`, and uses per-rank rows when the group is on one node or the layout is
  // unknown = 0). The routing recorder keeps per-pick rows, so a recorded forward sends those;
  // padded capacity takes per-rank rows instead of the node hop.
  void set_dedup_dispatch(DispatchDedup mode, int64_t ranks_per_node = 0);
  // Whether the node hop is in use (the two-hop dispatch applies to this EP group).
  bool uses_node_hop() const { return node_hop_ != nullptr; }
  void set_recompute(MoeRecompute recompute);
  void force_expert_path(ExpertPath path) { expert_path_ = path; }
  // Tracing / timing of the phases (not owned; null = none).
  void set_observer(PhaseObserver* observer) { observer_ = observer; }
  // Routing analysis: each forward's picks, drops and expert output norms (not owned; null =
  // none, and then nothing extra is computed).
  void set_recorder(RoutingRecorder* recorder) { recorder_ = recorder; }

  Router router{nullptr};
  GroupedExperts experts{nullptr};
  FeedForward shared_experts{nullptr};  // null when num_shared_experts == 0

 private:
  struct Kept {
    at::Tensor mask;       // [T, k] bool, undefined = every slot
    int64_t capacity = 0;  // per expert; 0 = dropless
  };
  struct Pipeline;  // spine steps 4-7 in flight, pipelined over the plans' chunks
  void mark(const char* phase) const;
  std::shared_ptr<InFlight> begin_stored(const at::Tensor& x, int64_t seq_len,
                                         const RoutingInputs& inputs);
  MoeOutput forward_stored(const at::Tensor& x, int64_t seq_len, const RoutingInputs& inputs);
  MoeOutput forward_recomputed(const at::Tensor& x, int64_t seq_len, const RoutingInputs& inputs);
  MoeOutput balance(const RouterOutput& route, int64_t seq_len,
                    const at::Tensor& global_load_fraction) const;
  Kept keep_mask(const RouterOutput& route, int64_t tokens) const;
  // `slot_norms` (optional, [T·k] fp32): receives each kept slot's expert output norm.
  // `with_shared`: run the shared experts on x inside the pipeline (false: the caller does).
  at::Tensor dispatch_experts_combine(const at::Tensor& x, const at::Tensor& gates,
                                      const std::vector<DispatchPlan>& plans, int64_t capacity,
                                      at::Tensor* slot_norms = nullptr, bool with_shared = true);
  std::unique_ptr<Pipeline> start_pipeline(const at::Tensor& x, const at::Tensor& gates,
                                           std::vector<DispatchPlan> plans, int64_t capacity,
                                           at::Tensor* slot_norms, bool with_shared);
  void start_dispatch(Pipeline& p, int64_t chunk);
  void run_shared(Pipeline& p, int64_t begin, int64_t count);
  void pipeline_experts(Pipeline& p);
  at::Tensor finish_pipeline(Pipeline& p);
  at::Tensor node_hop_experts_combine(const at::Tensor& x, const at::Tensor& gates,
                                      const at::Tensor& expert_ids, const at::Tensor& keep,
                                      int64_t chunks);
  void record(const RouterOutput& route, const Kept& kept, const at::Tensor& slot_norms,
              int64_t seq_len) const;
  bool cpu_fp32_experts(const at::Tensor& x, int64_t capacity) const;
  bool gathers_in_experts(const at::Tensor& x, int64_t capacity) const;
  at::Tensor gathered_experts_combine(const at::Tensor& x, const at::Tensor& gates,
                                      const DispatchPlan& plan);
  at::Tensor run_experts(Pipeline& p, int64_t chunk, const at::Tensor& received);
  at::Tensor padded_experts_forward(const at::Tensor& rows,
                                    const std::vector<int64_t>& rows_per_expert, int64_t capacity);
  MoeConfig config_;
  TokenDispatcher dispatcher_;
  int64_t overlap_degree_ = 1;
  DispatchDedup dedup_ = DispatchDedup::kNone;
  parallel::Communicator& ep_;
  std::unique_ptr<NodeHop> node_hop_;
  ExpertPath expert_path_ = ExpertPath::kAuto;
  MoeRecompute recompute_;
  PhaseObserver* observer_ = nullptr;
  RoutingRecorder* recorder_ = nullptr;
};
TORCH_MODULE(MoeLayer);

}  // namespace moeforge::moe

#include "moe/moe_layer.hpp"

#include <ATen/ATen.h>

#include "moe/capacity.hpp"
#include "moe/compute_precision.hpp"
#include "moe/gathered_experts.hpp"
#include "moe/grouped_matmul.hpp"
#include "moe/load_balancing.hpp"
#include "parallel/recompute.hpp"

namespace moeforge::moe {

MoeLayerImpl::MoeLayerImpl(int64_t hidden_size, const MoeConfig& config, parallel::Communicator& ep)
    : config_(config), dispatcher_(ep, config.num_experts), ep_(ep) {
  router = register_module("router", Router(hidden_size, config));
  experts = register_module("experts", GroupedExperts(dispatcher_.num_local_experts(), hidden_size,
                                                      config.expert_ffn_size));
  if (config.num_shared_experts > 0) {
    shared_experts = register_module(
        "shared_experts",
        FeedForward(hidden_size, config.num_shared_experts * shared_expert_size(config)));
  }
}

RoutingStats read_stats(const RoutingCounters& counters) {
  RoutingStats stats;
  stats.load = counters.load.cpu();
  const auto counts = counters.slot_counts.cpu();
  stats.slots = counts[0].item<int64_t>();
  stats.null_slots = counts[1].item<int64_t>();
  stats.rows = counts[2].item<int64_t>();
  stats.dropped = stats.slots - stats.null_slots - stats.rows;
  stats.entropy = counters.entropy.item<double>();
  return stats;
}

void MoeLayerImpl::mark(const char* phase) const {
  if (observer_) observer_->phase_done(phase);
}

namespace {
// Backward phases for the observer: a hook on a tensor runs when its gradient is complete, i.e.
// right after the backward of everything that consumed it, so it ends the phase that produced
// that gradient (charged, as in the forward, the time since the previous mark). Registered only
// with an observer and when the tensor takes part in backward; mark() reads observer_ when the
// hook runs, so an observer removed before backward records nothing.
template <class Callback>
void on_gradient(bool observed, const at::Tensor& t, Callback callback) {
  if (observed && t.requires_grad()) t.register_hook([callback](const at::Tensor&) { callback(); });
}
}  // namespace

void MoeLayerImpl::set_dedup_dispatch(DispatchDedup mode, int64_t ranks_per_node) {
  dedup_ = mode;
  node_hop_.reset();
  const int64_t ep = dispatcher_.ep_size();
  // Two hops only where the EP group spans nodes of equal consecutive runs.
  if (mode == DispatchDedup::kNode && ranks_per_node > 0 && ranks_per_node < ep &&
      ep % ranks_per_node == 0)
    node_hop_ = std::make_unique<NodeHop>(ep_, config_.num_experts, ranks_per_node);
}

void MoeLayerImpl::set_recompute(MoeRecompute recompute) {
  recompute_ = recompute;
  experts->set_recompute_activation(recompute.expert_activation);
}

// Spine steps 4-7 in flight: the plans' chunks and their pending exchanges.
struct MoeLayerImpl::Pipeline {
  at::Tensor x, gates;
  std::vector<DispatchPlan> plans;
  int64_t capacity = 0;
  at::Tensor* slot_norms = nullptr;  // routing analysis: each kept slot's expert output norm
  bool shared = false;               // run the shared experts inside the pipeline
  bool gated_rows = false;  // experts are gated_expert_rows: the gates travel with the rows
  bool observed = false;
  std::vector<at::Tensor> permuted, shared_parts;
  std::vector<PendingRows> dispatched, pair_gates, combining;
  int64_t chunks() const { return static_cast<int64_t>(plans.size()); }
};

// A forward between begin() and end(): the output (y set once the combine is back) and, while
// exchanges are in flight, the pipeline that owns them.
struct MoeLayerImpl::InFlight {
  MoeOutput out;
  std::unique_ptr<Pipeline> pipeline;  // null: finished inside begin()
  bool advanced = false;
};

MoeOutput MoeLayerImpl::forward(const at::Tensor& x, int64_t seq_len, const RoutingInputs& inputs) {
  if (recompute_.layer) return forward_recomputed(x, seq_len, inputs);
  return forward_stored(x, seq_len, inputs);
}

std::shared_ptr<MoeLayerImpl::InFlight> MoeLayerImpl::begin(const at::Tensor& x, int64_t seq_len,
                                                            const RoutingInputs& inputs) {
  if (!recompute_.layer) return begin_stored(x, seq_len, inputs);
  auto flight = std::make_shared<InFlight>();
  flight->out = forward_recomputed(x, seq_len, inputs);
  return flight;
}

void MoeLayerImpl::advance(InFlight& flight) {
  if (flight.advanced) return;
  flight.advanced = true;
  if (flight.pipeline) pipeline_experts(*flight.pipeline);
}

MoeOutput MoeLayerImpl::end(InFlight& flight) {
  advance(flight);
  if (flight.pipeline) {
    const auto dtype = flight.pipeline->x.scalar_type();
    // The combine sums in fp32 (the gates'); the block's residual stream keeps x's dtype.
    flight.out.y = finish_pipeline(*flight.pipeline).to(dtype);
    flight.pipeline.reset();
  }
  return flight.out;
}

MoeOutput MoeLayerImpl::forward_stored(const at::Tensor& x, int64_t seq_len,
                                       const RoutingInputs& inputs) {
  return end(*begin_stored(x, seq_len, inputs));
}

// The whole layer as one recomputed region: only x is kept. The recompute routes with the same
// jitter seed and replays the forward's counts exchange (TokenDispatcher::counts_on_host); the
// row all-to-alls run again. The counters (no gradient) come from the forward.
MoeOutput MoeLayerImpl::forward_recomputed(const at::Tensor& x, int64_t seq_len,
                                           const RoutingInputs& inputs) {
  auto counters = std::make_shared<RoutingCounters>();
  const auto region = [this, seq_len, inputs, counters](const std::vector<at::Tensor>& in) {
    auto out = forward_stored(in[0], seq_len, inputs);
    *counters = std::move(out.counters);
    return std::vector<at::Tensor>{out.y, out.aux_loss, out.z_loss};
  };
  auto outputs = parallel::recompute_in_backward(region, {x}, parameters());
  return {outputs[0], outputs[1], outputs[2], *counters};
}

// The MoE step, spine steps 1-7 (docs/architecture.md, "One MoE layer"), up to the started
// dispatch; end() finishes it.
std::shared_ptr<MoeLayerImpl::InFlight> MoeLayerImpl::begin_stored(const at::Tensor& x,
                                                                   int64_t seq_len,
                                                                   const RoutingInputs& inputs) {
  if (observer_) observer_->forward_started();
  auto flight = std::make_shared<InFlight>();
  auto& out = flight->out;
  const double factor = capacity_factor(config_.capacity, config_.router.routing, is_training());
  const RouterOutput route = router->forward(x, factor, inputs.noise_seed);  // ids, gates [T, k]
  mark("route");
  out = balance(route, seq_len, inputs.global_load_fraction);
  mark("balance");
  const Kept kept = keep_mask(route, x.size(0));
  const auto slots = out.counters.load.sum();
  out.counters.slot_counts = at::stack(
      {slots,
       out.counters.load.narrow(0, config_.num_experts, pool_size() - config_.num_experts).sum(),
       kept.mask.defined() ? kept.mask.sum().to(at::kLong) : slots});
  mark("capacity");
  const bool gathered = gathers_in_experts(x, kept.capacity);
  const int64_t chunks =
      gathered ? 1 : std::clamp<int64_t>(overlap_degree_, 1, std::max<int64_t>(1, x.size(0)));
  const bool dedup = dedup_ != DispatchDedup::kNone && !gathered && recorder_ == nullptr;
  if (dedup && node_hop_ && !(config_.capacity.pad && kept.capacity > 0)) {
    out.y = node_hop_experts_combine(x, route.gates, route.expert_ids, kept.mask, chunks)
                .to(x.scalar_type());
    return flight;
  }
  auto plans = dispatcher_.plan_chunks(route.expert_ids, kept.mask, chunks, dedup);
  mark("plan+counts a2a");
  if (gathered) {
    out.y = gathered_experts_combine(x, route.gates, plans.front());
    return flight;
  }
  if (recorder_) {
    auto slot_norms = at::zeros({route.expert_ids.numel()}, x.options().dtype(at::kFloat));
    out.y = dispatch_experts_combine(x, route.gates, plans, kept.capacity, &slot_norms)
                .to(x.scalar_type());
    record(route, kept, slot_norms, seq_len);
    return flight;
  }
  flight->pipeline = start_pipeline(x, route.gates, std::move(plans), kept.capacity,
                                    /*slot_norms=*/nullptr, /*with_shared=*/true);
  return flight;
}

void MoeLayerImpl::record(const RouterOutput& route, const Kept& kept, const at::Tensor& slot_norms,
                          int64_t seq_len) const {
  const auto& ids = route.expert_ids;
  const auto all = at::ones(ids.sizes(), ids.options().dtype(at::kBool));
  recorder_->record({seq_len, ids.detach(), route.selected.defined() ? route.selected : all,
                     kept.mask.defined() ? kept.mask : all, slot_norms.view(ids.sizes())});
}

// Spine step 2: loss-based balancing terms (weighted by the model) and the load counters.
MoeOutput MoeLayerImpl::balance(const RouterOutput& route, int64_t seq_len,
                                const at::Tensor& global_load_fraction) const {
  const auto& balancing = config_.balancing;
  MoeOutput out;
  out.aux_loss = balancing.aux_loss.coeff > 0
                     ? aux_loss(route.scores, route.expert_ids, route.selected,
                                balancing.aux_loss.scope, seq_len, global_load_fraction)
                     : at::zeros({}, route.logits.options());
  out.z_loss =
      balancing.z_loss.coeff > 0 ? z_loss(route.logits) : at::zeros({}, route.logits.options());
  out.counters.load = expert_load(route.expert_ids, route.selected, pool_size());
  out.counters.entropy = router_entropy(route.scores);
  return out;
}

// Spine step 3: selected picks of real experts (null experts are never dispatched), within
// each expert's capacity (token choice; factor 0 = dropless). Expert choice: C per expert.
MoeLayerImpl::Kept MoeLayerImpl::keep_mask(const RouterOutput& route, int64_t tokens) const {
  const int64_t num_experts = config_.num_experts;
  const double factor = capacity_factor(config_.capacity, config_.router.routing, is_training());
  Kept kept{route.selected, 0};
  if (pool_size() > num_experts) {
    const auto real = route.expert_ids < num_experts;
    kept.mask = kept.mask.defined() ? kept.mask.logical_and(real) : real;
  }
  if (config_.router.routing == Routing::kExpertChoice) {
    kept.capacity = expert_choice_capacity(factor, tokens, config_.top_k, num_experts);
  } else if (factor > 0) {
    kept.capacity = expert_capacity(factor, tokens, config_.top_k, num_experts);
    const auto within = capacity_keep_mask(route.expert_ids, route.gates, pool_size(),
                                           kept.capacity, config_.capacity.drop_policy);
    kept.mask = kept.mask.defined() ? kept.mask.logical_and(within) : within;
  }
  return kept;
}

// Spine steps 4-7, pipelined over the plans' chunks: later chunks' dispatches and chunk c-1's
// combine are in flight while chunk c is in the experts; the shared experts run on the first
// half of the tokens while the first dispatch is in flight and on the second half while the
// last combine is. Backward runs the same pipeline in reverse (parallel/all_to_all.hpp).
at::Tensor MoeLayerImpl::dispatch_experts_combine(const at::Tensor& x, const at::Tensor& gates,
                                                  const std::vector<DispatchPlan>& plans,
                                                  int64_t capacity, at::Tensor* slot_norms,
                                                  bool with_shared) {
  auto pipeline = start_pipeline(x, gates, plans, capacity, slot_norms, with_shared);
  pipeline_experts(*pipeline);
  return finish_pipeline(*pipeline);
}

// Permute every chunk, start every dispatch, and run the first half of the shared experts
// while they are in flight.
std::unique_ptr<MoeLayerImpl::Pipeline> MoeLayerImpl::start_pipeline(
    const at::Tensor& x, const at::Tensor& gates, std::vector<DispatchPlan> plans, int64_t capacity,
    at::Tensor* slot_norms, bool with_shared) {
  auto p = std::make_unique<Pipeline>();
  p->x = x;
  p->gates = gates;
  p->plans = std::move(plans);
  p->capacity = capacity;
  p->slot_norms = slot_norms;
  p->shared = shared_experts && with_shared;
  p->gated_rows = expert_path_ != ExpertPath::kGroupedGemm && cpu_fp32_experts(x, capacity);
  p->observed = observer_ != nullptr && at::GradMode::is_enabled();
  const auto chunks = p->chunks();
  // The layer's input is fresh per forward inside a model; a caller's leaf would keep the hook.
  if (!x.is_leaf()) on_gradient(p->observed, x, [this] { mark("permute + route backward"); });
  const auto rows = to_compute_dtype(x, x);  // bf16 under autocast: experts and a2a in bf16
  for (const auto& plan : p->plans) {
    p->permuted.push_back(dispatcher_.permute(rows, plan));  // [N_c, H]
    on_gradient(p->observed, p->permuted.back(), [this] { mark("dispatch a2a backward"); });
  }
  mark("permute");
  p->dispatched.resize(chunks);
  p->pair_gates.resize(chunks);
  p->combining.resize(chunks);
  // Every chunk's dispatch at once: the worker sends them back to back in chunk order, so the
  // link stays busy through the experts (and, with micro-batch overlap, through the other
  // micro-batch's attention).
  for (int64_t c = 0; c < chunks; ++c) start_dispatch(*p, c);
  if (p->shared) run_shared(*p, 0, x.size(0) / 2);
  return p;
}

void MoeLayerImpl::start_dispatch(Pipeline& p, int64_t chunk) {
  const auto& plan = p.plans[chunk];
  p.dispatched[chunk] = dispatcher_.start_dispatch(p.permuted[chunk], plan);
  if (plan.deduplicated || p.gated_rows)
    p.pair_gates[chunk] = dispatcher_.start_gates(p.gates, plan);
}

void MoeLayerImpl::run_shared(Pipeline& p, int64_t begin, int64_t count) {
  const auto part = p.x.narrow(0, begin, count);
  on_gradient(p.observed, part, [this] { mark("shared experts backward"); });
  p.shared_parts.push_back(shared_experts->forward(part));
  mark("shared experts");
}

// Each chunk through the experts as its rows arrive, its combine started at once; the second
// half of the shared experts while the last combine is in flight.
void MoeLayerImpl::pipeline_experts(Pipeline& p) {
  for (int64_t c = 0; c < p.chunks(); ++c) {
    // [R_c, H] by local expert, or deduplicated [U_c, H]: one row per (token, source rank).
    const auto received = dispatcher_.finish(p.dispatched[c]);
    mark("dispatch a2a");
    on_gradient(p.observed, received, [this] { mark("experts backward"); });
    const auto expert_rows = run_experts(p, c, received);
    on_gradient(p.observed, expert_rows, [this] { mark("combine a2a backward"); });
    p.combining[c] = dispatcher_.start_combine(expert_rows, p.plans[c]);
  }
  const int64_t tokens = p.x.size(0), split = tokens / 2;
  if (p.shared) run_shared(p, split, tokens - split);
}

// y[t] = Σ_j gate[t, j] · out[t, j], each token's rows added in (global expert, slot) order.
at::Tensor MoeLayerImpl::finish_pipeline(Pipeline& p) {
  at::Tensor y;
  for (int64_t c = 0; c < p.chunks(); ++c) {
    const auto combined = dispatcher_.finish(p.combining[c]);  // [N_c, H]
    mark("combine a2a");
    on_gradient(p.observed, combined, [this] { mark("unpermute backward"); });
    // Routing analysis: each row is one kept slot's expert output, before its gate.
    if (p.slot_norms)
      p.slot_norms->index_copy_(0, p.plans[c].slot_order,
                                combined.detach().to(at::kFloat).norm(2, {1}));
    y = dispatcher_.unpermute(combined, p.gated_rows ? at::Tensor() : p.gates, p.plans[c], y);
    mark("unpermute");
  }
  auto out = p.shared ? y + at::cat(p.shared_parts, 0) : y;
  // The layer's backward starts here: restart the observer's clock.
  on_gradient(p.observed, out, [this] {
    if (observer_) observer_->forward_started();
  });
  return out;
}

// Two-hop dispatch (moe/node_hop.hpp): each token once to each node holding one of its experts,
// the shared experts computed while those rows cross the network, then the rank-deduplicated
// pipeline inside the gateway's node on the rows it received, and one row per (token, node)
// back. `chunks` must be the same on every EP rank (the gateways' row counts differ).
at::Tensor MoeLayerImpl::node_hop_experts_combine(const at::Tensor& x, const at::Tensor& gates,
                                                  const at::Tensor& expert_ids,
                                                  const at::Tensor& keep, int64_t chunks) {
  const auto hop = node_hop_->plan(expert_ids, keep);
  const auto rows = to_compute_dtype(x, x);
  const auto pending = node_hop_->start(rows, gates, expert_ids, keep, hop);
  mark("node hop plan + a2a start");
  at::Tensor shared;
  if (shared_experts) {
    shared = shared_experts->forward(x);
    mark("shared experts");
  }
  const auto in = node_hop_->finish(pending);
  mark("node hop a2a");
  const auto plans = dispatcher_.plan_chunks(in.expert_ids, in.keep, chunks, /*deduplicate=*/true);
  mark("plan+counts a2a");
  const auto node_out = dispatch_experts_combine(in.rows, in.gates, plans, /*capacity=*/0,
                                                 /*slot_norms=*/nullptr, /*with_shared=*/false);
  auto y = node_hop_->combine(node_out.to(rows.scalar_type()), hop,
                              at::zeros(x.sizes(), node_out.options()));
  mark("node combine a2a");
  return shared.defined() ? y + shared : y;
}

// The experts of moe/gathered_experts.hpp serve CPU fp32 rows; padding to capacity and the
// routing recorder (which measures ungated output rows) take the grouped-GEMM experts.
bool MoeLayerImpl::cpu_fp32_experts(const at::Tensor& x, int64_t capacity) const {
  return gathered_experts_apply(x) && recorder_ == nullptr &&
         !(config_.capacity.pad && capacity > 0);
}

// All experts local, CPU fp32: steps 4-7 expert by expert, with no [T·k, H] tensor.
bool MoeLayerImpl::gathers_in_experts(const at::Tensor& x, int64_t capacity) const {
  return expert_path_ == ExpertPath::kAuto && dispatcher_.ep_size() == 1 &&
         cpu_fp32_experts(x, capacity);
}

at::Tensor MoeLayerImpl::gathered_experts_combine(const at::Tensor& x, const at::Tensor& gates,
                                                  const DispatchPlan& plan) {
  const bool observed = observer_ != nullptr && at::GradMode::is_enabled();
  if (!x.is_leaf()) on_gradient(observed, x, [this] { mark("experts backward"); });
  const auto row_gates = gates.reshape({-1}).index_select(0, plan.slot_order).to(at::kFloat);
  auto y = gathered_experts(x, row_gates, plan.token_of_row, plan.rows_per_local_expert,
                            experts->w_gate, experts->w_up, experts->w_down);
  mark("experts");
  if (shared_experts) {
    y = y + shared_experts->forward(x);
    mark("shared experts");
  }
  on_gradient(observed, y, [this] {
    if (observer_) observer_->forward_started();
  });
  return y;
}

// Spine step 6 on one chunk's received rows: one output row per received row, gate-weighted
// where the gates came with the rows, and for a deduplicated plan the sum over the row's pairs
// (the local experts it feeds). CPU fp32 runs the gathered experts' code: on the rows in place
// (gated_expert_rows), or, deduplicated, gathering each expert's pairs from the received rows
// and adding back into them (gathered_experts with pair_row: expand and reduce in one pass,
// keeping [U_c, H] instead of [R_c, H]). Otherwise the grouped-GEMM experts on expanded rows.
at::Tensor MoeLayerImpl::run_experts(Pipeline& p, int64_t chunk, const at::Tensor& received) {
  const auto& plan = p.plans[chunk];
  const auto& counts = plan.rows_per_local_expert;
  at::Tensor out;
  if (p.gated_rows) {
    const auto gates = dispatcher_.finish(p.pair_gates[chunk]).reshape({-1});
    out = plan.deduplicated ? gathered_experts(received, gates, plan.pair_row, counts,
                                               experts->w_gate, experts->w_up, experts->w_down)
                            : gated_expert_rows(received, gates, counts, experts->w_gate,
                                                experts->w_up, experts->w_down);
  } else {
    const auto rows = dispatcher_.expand(received, plan);  // [R_c, H] by local expert
    out = config_.capacity.pad && p.capacity > 0 ? padded_experts_forward(rows, counts, p.capacity)
                                                 : experts->forward(rows, counts);
    if (plan.deduplicated)
      out = dispatcher_.reduce(out, dispatcher_.finish(p.pair_gates[chunk]), plan);
  }
  mark("experts");
  return out;
}

at::Tensor MoeLayerImpl::padded_experts_forward(const at::Tensor& rows,
                                                const std::vector<int64_t>& rows_per_expert,
                                                int64_t capacity) {
  // Static shapes: every local expert gets ep·capacity rows (each source sends ≤ capacity),
  // the real rows first, zero rows after; only the real rows' outputs are kept.
  const int64_t ep = static_cast<int64_t>(dispatcher_.ep_size());
  const auto padded = pad_groups(rows_per_expert, ep * capacity, 1, rows.device());
  const auto padded_rows =
      at::zeros({padded.rows, rows.size(1)}, rows.options()).index_copy(0, padded.positions, rows);
  return experts->forward(padded_rows, padded.counts).index_select(0, padded.positions);
}

}  // namespace moeforge::moe

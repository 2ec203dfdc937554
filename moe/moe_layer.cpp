#include "moe/moe_layer.hpp"

#include <ATen/ATen.h>

#include "moe/capacity.hpp"
#include "moe/compute_precision.hpp"
#include "moe/load_balancing.hpp"
#include "parallel/trace.hpp"

namespace moeforge::moe {

MoeLayerImpl::MoeLayerImpl(int64_t hidden_size, const MoeConfig& config, parallel::Communicator& ep)
    : config_(config), dispatcher_(ep, config.num_experts) {
  router = register_module("router", Router(hidden_size, config));
  experts = register_module("experts", GroupedExperts(dispatcher_.num_local_experts(), hidden_size,
                                                      config.expert_ffn_size));
  if (config.num_shared_experts > 0) {
    const int64_t shared_size =
        config.shared_expert_ffn_size > 0 ? config.shared_expert_ffn_size : config.expert_ffn_size;
    shared_experts = register_module(
        "shared_experts", FeedForward(hidden_size, config.num_shared_experts * shared_size));
  }
}

at::Tensor MoeLayerImpl::padded_experts_forward(const at::Tensor& rows,
                                                const std::vector<int64_t>& rows_per_expert,
                                                int64_t capacity) {
  // Static shapes: every local expert gets ep·capacity rows (each source sends ≤ capacity),
  // the real rows first, zero rows after; only the real rows' outputs are kept.
  const int64_t ep = static_cast<int64_t>(dispatcher_.ep_size());
  std::vector<int64_t> padded_counts;
  std::vector<int64_t> positions;
  int64_t padded_offset = 0;
  for (const int64_t count : rows_per_expert) {
    const int64_t padded = std::max(count, ep * capacity);
    for (int64_t r = 0; r < count; ++r) positions.push_back(padded_offset + r);
    padded_counts.push_back(padded);
    padded_offset += padded;
  }
  const auto index = at::tensor(positions, at::kLong).to(rows.device());
  const auto padded_rows =
      at::zeros({padded_offset, rows.size(1)}, rows.options()).index_copy(0, index, rows);
  return experts->forward(padded_rows, padded_counts).index_select(0, index);
}

RoutingStats MoeLayerImpl::last_stats() const {
  RoutingStats stats;
  stats.load = counters_.load.cpu();
  const auto counts = counters_.slot_counts.cpu();
  stats.slots = counts[0].item<int64_t>();
  stats.null_slots = counts[1].item<int64_t>();
  stats.rows = counts[2].item<int64_t>();
  stats.dropped = stats.slots - stats.null_slots - stats.rows;
  stats.entropy = counters_.entropy.item<double>();
  return stats;
}

MoeOutput MoeLayerImpl::forward(const at::Tensor& x, int64_t seq_len) {
  const int64_t tokens = x.size(0);
  const int64_t num_experts = config_.num_experts;
  const auto& balancing = config_.balancing;
  MoeOutput out;
  auto last = parallel::trace::Clock::now();
  const auto mark = [this, &last](const char* phase) {
    if (timer_) timer_->mark(phase);
    if (parallel::trace::enabled()) {
      const auto now = parallel::trace::Clock::now();
      parallel::trace::record("compute", phase, last, now);
      last = now;
    }
  };
  if (timer_) timer_->start();

  // 1 route: fp32 logits/scores, selection on (scores + bias), gates from unbiased scores.
  const bool expert_choice = config_.router.routing == "expert_choice";
  const auto& capacity_config = config_.capacity;
  const double factor = is_training() ? capacity_config.factor : capacity_config.eval_factor;
  const double expert_choice_factor = !is_training() && capacity_config.eval_factor > 0
                                          ? capacity_config.eval_factor
                                          : capacity_config.factor;
  const RouterOutput route = router->forward(x, expert_choice_factor);  // ids, gates: [T, k]
  mark("route");

  // 2 balance: loss-based terms (weighted by the model) and load for telemetry / bias update.
  const int64_t pool = router->pool_size();
  out.aux_loss = balancing.aux_loss.coeff > 0
                     ? aux_loss(route.scores, route.expert_ids, route.selected,
                                balancing.aux_loss.scope, seq_len, global_fraction_)
                     : at::zeros({}, route.logits.options());
  out.z_loss =
      balancing.z_loss.coeff > 0 ? z_loss(route.logits) : at::zeros({}, route.logits.options());
  counters_.load = expert_load(route.expert_ids, route.selected, pool);
  counters_.entropy = router_entropy(route.scores);

  // 3 keep mask: selected picks of real experts (null experts are never dispatched), within
  // each expert's capacity (token choice; factor 0 = dropless). Expert choice: C per expert.
  at::Tensor keep = route.selected;
  if (pool > num_experts) {
    const auto real = route.expert_ids < num_experts;
    keep = keep.defined() ? keep.logical_and(real) : real;
  }
  int64_t capacity = 0;
  if (expert_choice) {
    capacity = expert_choice_capacity(expert_choice_factor, tokens, config_.top_k, num_experts);
  } else if (factor > 0) {
    capacity = expert_capacity(factor, tokens, config_.top_k, num_experts);
    const auto within = capacity_keep_mask(route.expert_ids, route.gates, pool, capacity,
                                           capacity_config.drop_policy);
    keep = keep.defined() ? keep.logical_and(within) : within;
  }
  {
    const auto slots = counters_.load.sum();
    const auto rows = keep.defined() ? keep.sum().to(at::kLong) : slots;
    counters_.slot_counts =
        at::stack({slots, counters_.load.narrow(0, num_experts, pool - num_experts).sum(), rows});
  }
  mark("balance+capacity");

  // 4 permute: rows sorted by global expert id, in `overlap_degree` chunks of consecutive
  // tokens; counts agreed with the EP group in one exchange.
  const int64_t chunks = std::clamp<int64_t>(overlap_degree_, 1, std::max<int64_t>(1, tokens));
  const auto plans = dispatcher_.plan_chunks(route.expert_ids, keep, chunks);
  mark("plan+counts a2a");
  std::vector<at::Tensor> permuted;
  const auto rows = to_compute_dtype(x, x);  // bf16 under autocast: experts and a2a in bf16
  for (const auto& plan : plans) permuted.push_back(dispatcher_.permute(rows, plan));  // [N_c, H]
  mark("permute");

  // 5-7 pipelined: chunk c+1's dispatch and chunk c-1's combine are in flight while chunk c
  // is in the experts; the shared experts run while the first dispatch is in flight. Backward
  // runs the same pipeline in reverse (parallel/all_to_all.hpp).
  std::vector<PendingRows> dispatched(chunks), combining(chunks);
  dispatched[0] = dispatcher_.start_dispatch(permuted[0], plans[0]);
  // Shared experts run on every token, independent of routing: the first half of the tokens
  // while the first dispatch is in flight, the second half while the last combine is (and in
  // backward, mirrored, while the first and last gradient exchanges are).
  const int64_t shared_split = tokens / 2;
  std::vector<at::Tensor> shared_parts;
  if (shared_experts) {
    shared_parts.push_back(shared_experts->forward(x.narrow(0, 0, shared_split)));
    mark("shared experts");
  }
  for (int64_t c = 0; c < chunks; ++c) {
    if (c + 1 < chunks)
      dispatched[c + 1] = dispatcher_.start_dispatch(permuted[c + 1], plans[c + 1]);
    const auto local_rows = dispatcher_.finish(dispatched[c]);  // [R_c, H] by local expert
    mark("dispatch a2a");
    const auto expert_out =
        capacity_config.pad && capacity > 0
            ? padded_experts_forward(local_rows, plans[c].rows_per_local_expert, capacity)
            : experts->forward(local_rows, plans[c].rows_per_local_expert);  // [R_c, H]
    mark("experts");
    combining[c] = dispatcher_.start_combine(expert_out, plans[c]);
  }
  at::Tensor shared;
  if (shared_experts) {
    shared_parts.push_back(
        shared_experts->forward(x.narrow(0, shared_split, tokens - shared_split)));
    shared = at::cat(shared_parts, 0);  // [T, H]
    mark("shared experts");
  }
  // y[t] = Σ_j gate[t, j] · out[t, j], each token's rows added in (global expert, slot) order.
  at::Tensor y;
  for (int64_t c = 0; c < chunks; ++c) {
    const auto combined = dispatcher_.finish(combining[c]);  // [N_c, H]
    mark("combine a2a");
    y = dispatcher_.unpermute(combined, route.gates, plans[c], y);
    mark("unpermute");
  }
  out.y = shared.defined() ? y + shared : y;
  return out;
}

}  // namespace moeforge::moe

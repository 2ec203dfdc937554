#include "moe/moe_layer.hpp"

#include <ATen/ATen.h>

#include "moe/capacity.hpp"
#include "moe/load_balancing.hpp"

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

MoeOutput MoeLayerImpl::forward(const at::Tensor& x, int64_t seq_len) {
  const int64_t tokens = x.size(0);
  const int64_t num_experts = config_.num_experts;
  const auto& balancing = config_.balancing;
  MoeOutput out;
  const auto mark = [this](const char* phase) {
    if (timer_) timer_->mark(phase);
  };
  if (timer_) timer_->start();

  // 1 route: fp32 logits/scores, top-k on (scores + bias), gates from unbiased scores.
  const RouterOutput route = router->forward(x);  // ids, gates: [T, k]
  mark("route");

  // 2 balance: loss-based terms (weighted by the model) and load for telemetry / bias update.
  out.aux_loss =
      balancing.aux_loss.coeff > 0
          ? aux_loss(route.scores, route.expert_ids, num_experts, balancing.aux_loss.scope, seq_len)
          : at::zeros({}, at::kFloat);
  out.z_loss = balancing.z_loss.coeff > 0 ? z_loss(route.logits) : at::zeros({}, at::kFloat);
  stats_.load = expert_load(route.expert_ids, num_experts);
  stats_.entropy = router_entropy(route.scores);
  stats_.slots = route.expert_ids.numel();

  // 3 capacity: drop (token, slot) pairs over each expert's capacity; factor 0 = dropless.
  at::Tensor keep;
  if (is_training() && config_.capacity.factor > 0) {
    const int64_t capacity =
        expert_capacity(config_.capacity.factor, tokens, config_.top_k, num_experts);
    keep = capacity_keep_mask(route.expert_ids, route.gates, num_experts, capacity,
                              config_.capacity.drop_policy);
    stats_.dropped = stats_.slots - keep.sum().item<int64_t>();
  } else {
    stats_.dropped = 0;
  }
  mark("balance+capacity");

  // 4 permute: rows sorted by global expert id; counts agreed with the EP group.
  const DispatchPlan plan = dispatcher_.plan(route.expert_ids, keep);
  mark("plan+counts a2a");
  const auto permuted = dispatcher_.permute(x, plan);  // [N, H]
  mark("permute");

  // 5 dispatch: all-to-all-v to the ranks owning the experts.
  const auto local_rows = dispatcher_.dispatch(permuted, plan);  // [R, H] by local expert
  mark("dispatch a2a");

  // + shared experts on every token (independent of routing).
  at::Tensor shared;
  if (shared_experts) shared = shared_experts->forward(x);  // [T, H]
  if (shared_experts) mark("shared experts");

  // 6 experts: grouped SwiGLU over contiguous per-expert blocks.
  const auto expert_out = experts->forward(local_rows, plan.rows_per_local_expert);  // [R, H]
  mark("experts");

  // 7 combine: all-to-all-v back, then y[t] = Σ_j gate[t, j] · out[t, j] in slot order.
  const auto combined = dispatcher_.combine(expert_out, plan);  // [N, H]
  mark("combine a2a");
  out.y = dispatcher_.unpermute(combined, route.gates, plan);  // [T, H]
  if (shared.defined()) out.y = out.y + shared;
  mark("unpermute");
  return out;
}

}  // namespace moeforge::moe

#include "moe/node_hop.hpp"

#include <ATen/ATen.h>

#include "moe/token_dispatcher.hpp"
#include "parallel/recompute.hpp"

namespace moeforge::moe {

NodeHop::NodeHop(parallel::Communicator& ep, int64_t num_experts, int64_t ranks_per_node)
    : ep_(ep),
      num_experts_(num_experts),
      ranks_per_node_(ranks_per_node),
      nodes_(ranks_per_node > 0 ? ep.size() / ranks_per_node : 0) {
  TORCH_CHECK(ranks_per_node > 0 && ep.size() % ranks_per_node == 0,
              "the EP group's ranks per node must divide its size");
  TORCH_CHECK(num_experts % nodes_ == 0, "num_experts must be divisible by the nodes");
}

int NodeHop::gateway(int64_t node) const {
  return static_cast<int>(node * ranks_per_node_ + ep_.rank() % ranks_per_node_);
}

NodeHopPlan NodeHop::plan(const at::Tensor& expert_ids, const at::Tensor& keep) const {
  at::NoGradGuard no_grad;
  const int64_t tokens = expert_ids.size(0), ep = ep_.size();
  const auto options = expert_ids.options().dtype(at::kLong);
  // Distinct (node, token) keys of the kept picks: node · T + token (dropped picks: node N).
  auto node = at::floor_divide(expert_ids, num_experts_ / nodes_);
  if (keep.defined()) node = at::where(keep, node, at::full({}, nodes_, options));
  const auto present = destination_token_keys(node, nodes_).second.narrow(0, 0, nodes_ * tokens);
  std::vector<int64_t> gateways;
  for (int64_t n = 0; n < nodes_; ++n) gateways.push_back(gateway(n));
  const auto send_counts =
      at::zeros({ep}, options)
          .index_copy_(0, at::tensor(gateways, options),
                       present.view({nodes_, tokens}).sum(1, false, at::kLong));
  // [ep] rows to each rank, then [ep] rows from each: one exchange, one host copy.
  const auto counts = parallel::replayed_exchange(send_counts, [&] {
    const std::vector<int64_t> one(ep, 1);
    return at::cat({send_counts, ep_.all_to_all_v(send_counts, one, one).to(send_counts.device())})
        .cpu();
  });
  const int64_t* count = counts.data_ptr<int64_t>();
  NodeHopPlan plan;
  const auto present_keys = at::nonzero(present).view({-1});  // by node, then token
  const int64_t divisor = std::max<int64_t>(1, tokens);
  plan.unique_token = present_keys.remainder(divisor);
  plan.unique_node = at::floor_divide(present_keys, divisor);
  int64_t offset = 0;
  for (int64_t n = 0; n < nodes_; ++n) {
    plan.send.push_back({static_cast<int>(gateways[n]), offset, count[gateways[n]]});
    offset += count[gateways[n]];
  }
  for (int64_t p = 0; p < ep; ++p) {
    plan.recv.push_back({static_cast<int>(p), plan.received, count[ep + p]});
    plan.received += count[ep + p];
  }
  return plan;
}

PendingNodeHop NodeHop::start(const at::Tensor& x, const at::Tensor& gates,
                              const at::Tensor& expert_ids, const at::Tensor& keep,
                              const NodeHopPlan& plan) const {
  PendingNodeHop pending;
  {
    // Each row's picks on its node keep their expert id; the others are dropped (id E).
    at::NoGradGuard no_grad;
    const auto ids = expert_ids.index_select(0, plan.unique_token);
    auto on_node = at::floor_divide(ids, num_experts_ / nodes_) == plan.unique_node.unsqueeze(1);
    if (keep.defined()) on_node = on_node.logical_and(keep.index_select(0, plan.unique_token));
    pending.expert_ids =
        ep_.all_to_all_blocks(at::where(on_node, ids, at::full({}, num_experts_, ids.options())),
                              plan.send, plan.recv, plan.received);
  }
  pending.rows = parallel::start_all_to_all_blocks(take_rows(x, plan.unique_token), ep_, plan.send,
                                                   plan.recv, plan.received);
  pending.gates = parallel::start_all_to_all_blocks(gates.index_select(0, plan.unique_token), ep_,
                                                    plan.send, plan.recv, plan.received);
  return pending;
}

NodeHopRows NodeHop::finish(const PendingNodeHop& pending) const {
  NodeHopRows in;
  in.rows = parallel::finish_all_to_all_blocks(pending.rows);
  in.gates = parallel::finish_all_to_all_blocks(pending.gates);
  in.expert_ids = pending.expert_ids;
  in.keep = pending.expert_ids < num_experts_;
  return in;
}

at::Tensor NodeHop::combine(const at::Tensor& node_out, const NodeHopPlan& plan,
                            const at::Tensor& into) const {
  const auto back = parallel::all_to_all_blocks_autograd(node_out, ep_, plan.recv, plan.send,
                                                         plan.unique_token.size(0));
  return into.index_add(0, plan.unique_token, back.to(into.scalar_type()));  // [T, H]
}

}  // namespace moeforge::moe

#pragma once
// The node hop of the two-hop dispatch (parallel.dedup_dispatch: node), DeepSeek-V3's scheme for
// EP groups that span nodes. A token goes across the network once to each node that holds one
// of its experts, to the "gateway" of that node: the rank there with this rank's local index,
// so each rank talks over the network only to its counterparts. With the row go the token's k
// gates and expert ids (picks on other nodes or dropped marked with id E). The gateway runs the
// rank-deduplicated dispatch inside its node on what it received (moe/token_dispatcher.hpp) and
// sends back one row per (token, node): the gate-weighted sum over that node's experts.
// With group-limited routing aligned to nodes (num_groups = nodes, topk_groups = m) a token
// crosses the network at most m times each way, whatever k is.
//
// Layout: EP-group ranks [n·rpn, (n+1)·rpn) share node n (mpirun's by-slot mapping;
// parallel::ep_ranks_per_node checks it). Collective over the EP group, like the dispatcher.
#include <ATen/core/Tensor.h>

#include <vector>

#include "parallel/all_to_all.hpp"
#include "parallel/communicator.hpp"

namespace moeforge::moe {

struct NodeHopPlan {
  at::Tensor unique_token;               // [U] token of each row sent: by node, then token
  at::Tensor unique_node;                // [U] the node each row goes to
  std::vector<parallel::RowBlock> send;  // one block per node, to its gateway
  std::vector<parallel::RowBlock> recv;  // [ep] by source rank (only counterparts send)
  int64_t received = 0;
};

// What a gateway received, ready for the dispatcher: the picks not on this node are dropped.
struct NodeHopRows {
  at::Tensor rows;        // [U_in, H]
  at::Tensor gates;       // [U_in, k]
  at::Tensor expert_ids;  // [U_in, k] int64, E where dropped
  at::Tensor keep;        // [U_in, k] bool
};

struct PendingNodeHop {
  parallel::PendingExchange rows, gates;
  at::Tensor expert_ids;
};

class NodeHop {
 public:
  // `ep` is the expert-parallel group (not owned); `ranks_per_node` divides its size.
  NodeHop(parallel::Communicator& ep, int64_t num_experts, int64_t ranks_per_node);

  // expert_ids [T, k]; keep [T, k] bool or undefined. Agrees on the row counts with the EP group
  // (one counts exchange, replayed inside a recomputed region).
  NodeHopPlan plan(const at::Tensor& expert_ids, const at::Tensor& keep) const;
  // Sends the rows x [T, H] and the gates [T, k] (differentiable) and the expert ids; the ids go
  // first and are waited for, the rows and gates are in flight when this returns.
  PendingNodeHop start(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& expert_ids,
                       const at::Tensor& keep, const NodeHopPlan& plan) const;
  NodeHopRows finish(const PendingNodeHop& pending) const;
  // The gateway's outputs [U_in, H] back to their sources, added into `into` [T, H].
  at::Tensor combine(const at::Tensor& node_out, const NodeHopPlan& plan,
                     const at::Tensor& into) const;

  int64_t nodes() const { return nodes_; }

 private:
  int gateway(int64_t node) const;
  parallel::Communicator& ep_;
  int64_t num_experts_;
  int64_t ranks_per_node_;
  int64_t nodes_;
};

}  // namespace moeforge::moe

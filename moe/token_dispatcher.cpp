#include "moe/token_dispatcher.hpp"

#include <ATen/ATen.h>

#include <numeric>

#include "parallel/all_to_all.hpp"

namespace moeforge::moe {

TokenDispatcher::TokenDispatcher(parallel::Communicator& ep, int64_t num_experts)
    : ep_(ep),
      num_experts_(num_experts),
      num_local_experts_(num_experts / ep.size()),
      first_local_expert_(ep.rank() * (num_experts / ep.size())) {
  TORCH_CHECK(num_experts % ep.size() == 0, "num_experts must be divisible by ep_size");
}

DispatchPlan TokenDispatcher::plan(const at::Tensor& expert_ids, const at::Tensor& keep) const {
  at::NoGradGuard no_grad;
  const int64_t ep = ep_.size();
  DispatchPlan plan;
  plan.num_tokens = expert_ids.size(0);
  plan.top_k = expert_ids.size(1);
  auto flat_ids = expert_ids.reshape({-1});  // [T*k]
  auto slots = at::arange(flat_ids.numel(), at::kLong);
  if (keep.defined()) {
    const auto kept = keep.reshape({-1});
    slots = slots.masked_select(kept);
    flat_ids = flat_ids.masked_select(kept);
  }
  // Stable sort keeps slot order within an expert, so the permutation is ep-independent.
  const auto by_expert = at::argsort(flat_ids, /*stable=*/true);
  plan.slot_order = slots.index_select(0, by_expert);
  plan.token_of_row = at::floor_divide(plan.slot_order, plan.top_k);

  // counts[g] rows for global expert g; experts of EP rank p are the block p*El..(p+1)*El.
  const auto counts = at::bincount(flat_ids, {}, num_experts_).contiguous();  // [E]
  const int64_t* count = counts.data_ptr<int64_t>();
  const int64_t local = num_local_experts_;
  plan.send_rows.assign(ep, 0);
  for (int64_t g = 0; g < num_experts_; ++g) plan.send_rows[g / local] += count[g];

  // Counts exchange: row p of `send` = my counts for EP rank p's local experts.
  const auto received_counts =
      ep_.all_to_all_v(counts.view({ep, local}), std::vector<int64_t>(ep, 1),
                       std::vector<int64_t>(ep, 1))
          .contiguous();  // [ep, El]: rows from source p for each local expert
  const int64_t* recv = received_counts.data_ptr<int64_t>();
  plan.recv_rows.assign(ep, 0);
  plan.rows_per_local_expert.assign(local, 0);
  // Send blocks: rows of global expert g are contiguous in the permuted order and go to EP rank
  // g / El. Receive blocks: expert-major layout (local expert, then source rank), so the
  // experts read contiguous per-expert rows with no reorder after the exchange.
  int64_t offset = 0;
  for (int64_t g = 0; g < num_experts_; ++g) {
    plan.send_blocks.push_back({static_cast<int>(g / local), offset, count[g]});
    offset += count[g];
  }
  offset = 0;
  for (int64_t e = 0; e < local; ++e)
    for (int64_t p = 0; p < ep; ++p) {
      const int64_t rows = recv[p * local + e];
      plan.recv_blocks.push_back({static_cast<int>(p), offset, rows});
      offset += rows;
      plan.recv_rows[p] += rows;
      plan.rows_per_local_expert[e] += rows;
    }
  return plan;
}

at::Tensor TokenDispatcher::permute(const at::Tensor& x, const DispatchPlan& plan) const {
  return x.index_select(0, plan.token_of_row);  // [N, H]
}

at::Tensor TokenDispatcher::dispatch(const at::Tensor& permuted, const DispatchPlan& plan) const {
  if (ep_.size() == 1) return permuted;  // already grouped by expert
  const int64_t received =
      std::accumulate(plan.recv_rows.begin(), plan.recv_rows.end(), int64_t{0});
  return parallel::all_to_all_blocks_autograd(permuted, ep_, plan.send_blocks, plan.recv_blocks,
                                              received);  // [R, H] (local expert, source)
}

at::Tensor TokenDispatcher::combine(const at::Tensor& expert_out, const DispatchPlan& plan) const {
  if (ep_.size() == 1) return expert_out;
  // The reverse exchange: each (expert, source) block goes back to its place on the source.
  return parallel::all_to_all_blocks_autograd(expert_out, ep_, plan.recv_blocks, plan.send_blocks,
                                              plan.slot_order.size(0));  // [N, H]
}

at::Tensor TokenDispatcher::unpermute(const at::Tensor& combined, const at::Tensor& gates,
                                      const DispatchPlan& plan) const {
  // Weight each row by its slot's gate, then add rows into their token in permuted-row order
  // (by global expert, then slot): that order does not depend on ep_size, and nothing of
  // size [T·k, H] is materialised. Dropped slots have no row and contribute 0.
  const auto row_gates =
      gates.reshape({-1}).index_select(0, plan.slot_order).to(combined.scalar_type());  // [N]
  return at::zeros({plan.num_tokens, combined.size(1)}, combined.options())
      .index_add(0, plan.token_of_row, combined * row_gates.unsqueeze(1));  // [T, H]
}

}  // namespace moeforge::moe

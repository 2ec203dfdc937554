#include "moe/token_dispatcher.hpp"

#include <ATen/ATen.h>

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
  std::vector<int64_t> block_start(ep * local, 0);  // start of (source p, expert e) in recv rows
  int64_t offset = 0;
  for (int64_t p = 0; p < ep; ++p) {
    for (int64_t e = 0; e < local; ++e) {
      block_start[p * local + e] = offset;
      offset += recv[p * local + e];
      plan.recv_rows[p] += recv[p * local + e];
      plan.rows_per_local_expert[e] += recv[p * local + e];
    }
  }
  // Received rows arrive as (source, local expert); experts want (local expert, source).
  auto order = at::empty({offset}, at::kLong);
  int64_t* out = order.data_ptr<int64_t>();
  int64_t position = 0;
  for (int64_t e = 0; e < local; ++e)
    for (int64_t p = 0; p < ep; ++p)
      for (int64_t r = 0; r < recv[p * local + e]; ++r) out[position++] = block_start[p * local + e] + r;
  plan.local_order = order;
  return plan;
}

at::Tensor TokenDispatcher::permute(const at::Tensor& x, const DispatchPlan& plan) const {
  return x.index_select(0, plan.token_of_row);  // [N, H]
}

at::Tensor TokenDispatcher::dispatch(const at::Tensor& permuted, const DispatchPlan& plan) const {
  auto received = ep_.size() == 1
                      ? permuted
                      : parallel::all_to_all_v_autograd(permuted, ep_, plan.send_rows,
                                                        plan.recv_rows);  // [R, H] (src, e)
  if (ep_.size() == 1) return received;  // already grouped by expert
  return received.index_select(0, plan.local_order);  // [R, H] (e, src)
}

at::Tensor TokenDispatcher::combine(const at::Tensor& expert_out, const DispatchPlan& plan) const {
  if (ep_.size() == 1) return expert_out;
  // Undo the (e, src) grouping, then send each source its rows back.
  auto by_source = at::empty_like(expert_out).index_copy(0, plan.local_order, expert_out);
  return parallel::all_to_all_v_autograd(by_source, ep_, plan.recv_rows, plan.send_rows);
}

at::Tensor TokenDispatcher::unpermute(const at::Tensor& combined, const at::Tensor& gates,
                                      const DispatchPlan& plan) const {
  const int64_t hidden = combined.size(1);
  const int64_t slots = plan.num_tokens * plan.top_k;
  // Scatter rows back to their (token, slot) place; dropped slots stay 0.
  auto per_slot = at::zeros({slots, hidden}, combined.options()).index_copy(0, plan.slot_order, combined);
  auto weighted = per_slot.view({plan.num_tokens, plan.top_k, hidden}) *
                  gates.to(combined.scalar_type()).unsqueeze(-1);
  return weighted.sum(1);  // [T, H]
}

}  // namespace moeforge::moe

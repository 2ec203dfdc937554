#include "moe/token_dispatcher.hpp"

#include <ATen/ATen.h>

#include <numeric>

#include "moe/load_balancing.hpp"
#include "parallel/all_to_all.hpp"
#include "parallel/recompute.hpp"

namespace moeforge::moe {

TokenDispatcher::TokenDispatcher(parallel::Communicator& ep, int64_t num_experts)
    : ep_(ep),
      num_experts_(num_experts),
      num_local_experts_(num_experts / ep.size()),
      first_local_expert_(ep.rank() * (num_experts / ep.size())) {
  TORCH_CHECK(num_experts % ep.size() == 0, "num_experts must be divisible by ep_size");
}

DispatchPlan TokenDispatcher::plan(const at::Tensor& expert_ids, const at::Tensor& keep) const {
  return std::move(plan_chunks(expert_ids, keep, 1).front());
}

std::vector<DispatchPlan> TokenDispatcher::plan_chunks(const at::Tensor& expert_ids,
                                                       const at::Tensor& keep,
                                                       int64_t chunks) const {
  at::NoGradGuard no_grad;
  const int64_t ep = ep_.size();
  const int64_t tokens = expert_ids.size(0), top_k = expert_ids.size(1);
  const int64_t local = num_local_experts_;
  const auto index_options = expert_ids.options().dtype(at::kLong);
  chunks = std::max<int64_t>(1, chunks);
  std::vector<DispatchPlan> plans(chunks);
  std::vector<at::Tensor> chunk_counts;  // [E + 1] per chunk; the last counts dropped slots
  for (int64_t c = 0; c < chunks; ++c) {
    auto& plan = plans[c];
    plan.num_tokens = tokens;
    plan.top_k = top_k;
    // Chunk c: tokens [c·T/n, (c+1)·T/n), i.e. flat slots [first·k, last·k).
    const int64_t first = c * tokens / chunks, last = (c + 1) * tokens / chunks;
    auto flat_ids = expert_ids.narrow(0, first, last - first).reshape({-1});
    // Dropped slots get the id E, so they sort after every expert's rows and are cut off once
    // the counts are on the host: no data-dependent shape (and host read) before that.
    if (keep.defined())
      flat_ids = at::where(keep.narrow(0, first, last - first).reshape({-1}), flat_ids,
                           at::full({}, num_experts_, index_options));
    // Stable sort keeps slot order within an expert, so the permutation is ep-independent.
    const auto by_expert = at::argsort(flat_ids, /*stable=*/true);
    plan.slot_order =
        at::arange(first * top_k, last * top_k, index_options).index_select(0, by_expert);
    chunk_counts.push_back(count_ids(flat_ids, num_experts_ + 1));
  }
  const auto counts = at::stack(chunk_counts).narrow(1, 0, num_experts_);  // [chunks, E]
  const auto host = counts_on_host(counts);
  const int64_t* count_data = host.data_ptr<int64_t>();
  const int64_t* recv = count_data + chunks * num_experts_;  // [ep, chunks, El] from each source
  for (int64_t c = 0; c < chunks; ++c) {
    auto& plan = plans[c];
    const int64_t* count = count_data + c * num_experts_;
    plan.send_rows.assign(ep, 0);
    plan.recv_rows.assign(ep, 0);
    plan.rows_per_local_expert.assign(local, 0);
    // Send blocks: rows of global expert g are contiguous in the permuted order and go to EP
    // rank g / El. Receive blocks: expert-major layout (local expert, then source rank), so the
    // experts read contiguous per-expert rows with no reorder after the exchange.
    int64_t offset = 0;
    for (int64_t g = 0; g < num_experts_; ++g) {
      plan.send_blocks.push_back({static_cast<int>(g / local), offset, count[g]});
      plan.send_rows[g / local] += count[g];
      offset += count[g];
    }
    plan.slot_order = plan.slot_order.narrow(0, 0, offset);  // the kept rows
    plan.token_of_row = at::floor_divide(plan.slot_order, top_k);
    offset = 0;
    for (int64_t e = 0; e < local; ++e)
      for (int64_t p = 0; p < ep; ++p) {
        const int64_t rows = recv[(p * chunks + c) * local + e];
        plan.recv_blocks.push_back({static_cast<int>(p), offset, rows});
        offset += rows;
        plan.recv_rows[p] += rows;
        plan.rows_per_local_expert[e] += rows;
      }
  }
  return plans;
}

at::Tensor TokenDispatcher::counts_on_host(const at::Tensor& counts) const {
  // Inside a recomputed region (train.recompute) the forward's counts are replayed instead of
  // exchanged again: the recompute must lay rows out exactly as the forward did.
  return parallel::replayed_exchange(counts, [&] { return exchange_counts(counts); });
}

at::Tensor TokenDispatcher::exchange_counts(const at::Tensor& counts) const {
  // The layer's one host synchronisation: this rank's [chunks, E] counts, then what every EP
  // rank sends here ([ep, chunks, El]), exchanged in one all-to-all and copied in one transfer.
  const int64_t ep = ep_.size(), chunks = counts.size(0);
  if (ep == 1) return at::cat({counts.reshape({-1}), counts.reshape({-1})}).cpu();
  const auto send_counts =
      counts.view({chunks, ep, num_local_experts_}).permute({1, 0, 2}).contiguous();
  const auto received =
      ep_.all_to_all_v(send_counts, std::vector<int64_t>(ep, 1), std::vector<int64_t>(ep, 1));
  return at::cat({counts.reshape({-1}), received.reshape({-1}).to(counts.device())}).cpu();
}

at::Tensor TokenDispatcher::permute(const at::Tensor& x, const DispatchPlan& plan) const {
  // On CUDA, advanced indexing: its backward is a sorted accumulate instead of index_select's
  // atomic index_add (k atomic adds per token row). On the CPU both sum in index order.
  if (x.is_cuda()) return x.index({plan.token_of_row});  // [N, H]
  return x.index_select(0, plan.token_of_row);           // [N, H]
}

at::Tensor TokenDispatcher::dispatch(const at::Tensor& permuted, const DispatchPlan& plan) const {
  return finish(start_dispatch(permuted, plan));  // [R, H] (local expert, source)
}

at::Tensor TokenDispatcher::combine(const at::Tensor& expert_out, const DispatchPlan& plan) const {
  return finish(start_combine(expert_out, plan));  // [N, H]
}

PendingRows TokenDispatcher::start_dispatch(const at::Tensor& permuted,
                                            const DispatchPlan& plan) const {
  if (ep_.size() == 1) return {permuted, {}};
  const int64_t received =
      std::accumulate(plan.recv_rows.begin(), plan.recv_rows.end(), int64_t{0});
  return {{},
          parallel::start_all_to_all_blocks(permuted, ep_, plan.send_blocks, plan.recv_blocks,
                                            received)};
}

PendingRows TokenDispatcher::start_combine(const at::Tensor& expert_out,
                                           const DispatchPlan& plan) const {
  if (ep_.size() == 1) return {expert_out, {}};
  // The reverse exchange: each (expert, source) block goes back to its place on the source.
  return {{},
          parallel::start_all_to_all_blocks(expert_out, ep_, plan.recv_blocks, plan.send_blocks,
                                            plan.slot_order.size(0))};
}

at::Tensor TokenDispatcher::finish(const PendingRows& pending) const {
  return pending.ready.defined() ? pending.ready
                                 : parallel::finish_all_to_all_blocks(pending.exchange);
}

at::Tensor TokenDispatcher::unpermute(const at::Tensor& combined, const at::Tensor& gates,
                                      const DispatchPlan& plan, const at::Tensor& into) const {
  // Weight each row by its slot's gate, then add rows into their token in permuted-row order
  // (by global expert, then slot): that order does not depend on ep_size, and nothing of
  // size [T·k, H] is materialised. Dropped slots have no row and contribute 0. The sum is in
  // at least the gates' precision (fp32), also when the rows are bf16.
  const auto type = at::promote_types(combined.scalar_type(), gates.scalar_type());
  const auto row_gates = gates.reshape({-1}).index_select(0, plan.slot_order).to(type);  // [N]
  const auto base = into.defined() ? into
                                   : at::zeros({plan.num_tokens, combined.size(1)},
                                               combined.options().dtype(type));
  return base.index_add(0, plan.token_of_row,
                        combined.to(type) * row_gates.unsqueeze(1));  // [T, H]
}

}  // namespace moeforge::moe

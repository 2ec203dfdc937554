#include "moe/token_dispatcher.hpp"

#include <ATen/ATen.h>

#include <numeric>
#include <utility>

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

namespace {

// Slots of tokens [first, last) as flat expert ids; dropped slots (keep false) get the id E, so
// they sort after every expert's rows and are cut off once the counts are on the host: no
// data-dependent shape (and host read) before that.
at::Tensor chunk_slot_ids(const at::Tensor& expert_ids, const at::Tensor& keep, int64_t first,
                          int64_t last, int64_t num_experts) {
  const auto flat_ids = expert_ids.narrow(0, first, last - first).reshape({-1});
  if (!keep.defined()) return flat_ids;
  return at::where(keep.narrow(0, first, last - first).reshape({-1}), flat_ids,
                   at::full({}, num_experts, flat_ids.options()));
}

// Rows this rank receives for its experts: one per (local expert, source) pair.
int64_t pairs_received(const DispatchPlan& plan) {
  return std::accumulate(plan.recv_rows.begin(), plan.recv_rows.end(), int64_t{0});
}

// Send blocks: rows of global expert g = p·El + e are contiguous in the permuted order and go to
// EP rank p. Receive blocks: expert-major layout (local expert, then source rank), so the
// experts read contiguous per-expert rows with no reorder after the exchange. `sent(p, e)` and
// `received(p, e)`: rows this rank sends to p for its local expert e / receives from p for e.
template <class Sent, class Received>
void lay_out_blocks(DispatchPlan& plan, int64_t ep, int64_t local, Sent sent, Received received) {
  plan.send_rows.assign(ep, 0);
  plan.recv_rows.assign(ep, 0);
  plan.rows_per_local_expert.assign(local, 0);
  int64_t offset = 0;
  for (int64_t p = 0; p < ep; ++p)
    for (int64_t e = 0; e < local; ++e) {
      plan.send_blocks.push_back({static_cast<int>(p), offset, sent(p, e)});
      plan.send_rows[p] += sent(p, e);
      offset += sent(p, e);
    }
  offset = 0;
  for (int64_t e = 0; e < local; ++e)
    for (int64_t p = 0; p < ep; ++p) {
      plan.recv_blocks.push_back({static_cast<int>(p), offset, received(p, e)});
      offset += received(p, e);
      plan.recv_rows[p] += received(p, e);
      plan.rows_per_local_expert[e] += received(p, e);
    }
}

}  // namespace

std::vector<DispatchPlan> TokenDispatcher::plan_chunks(const at::Tensor& expert_ids,
                                                       const at::Tensor& keep, int64_t chunks,
                                                       bool deduplicate) const {
  at::NoGradGuard no_grad;
  const int64_t ep = ep_.size(), local = num_local_experts_;
  const int64_t tokens = expert_ids.size(0), top_k = expert_ids.size(1);
  const int64_t width = local + (deduplicate ? 1 : 0);  // counts per destination rank
  chunks = std::max<int64_t>(1, chunks);
  std::vector<DispatchPlan> plans(chunks);
  std::vector<at::Tensor> chunk_counts;        // [ep, width] per chunk
  std::vector<at::Tensor> slot_keys, present;  // deduplicated plans, per chunk
  // Chunk c: tokens [c·T/n, (c+1)·T/n), i.e. flat slots [first·k, last·k).
  const auto first_token = [&](int64_t c) { return c * tokens / chunks; };
  for (int64_t c = 0; c < chunks; ++c) {
    auto& plan = plans[c];
    plan.num_tokens = tokens;
    plan.top_k = top_k;
    const int64_t first = first_token(c), last = first_token(c + 1);
    const auto flat_ids = chunk_slot_ids(expert_ids, keep, first, last, num_experts_);
    // Stable sort keeps slot order within an expert, so the permutation is ep-independent.
    plan.slot_order = at::arange(first * top_k, last * top_k, flat_ids.options())
                          .index_select(0, at::argsort(flat_ids, /*stable=*/true));
    auto counts =
        count_ids(flat_ids, num_experts_ + 1).narrow(0, 0, num_experts_).view({ep, local});
    if (deduplicate) {  // the rows per destination rank join the counts exchange
      auto [keys, marks] =
          destination_token_keys(at::floor_divide(flat_ids, local).view({last - first, top_k}), ep);
      const auto unique_rows =
          marks.view({ep + 1, last - first}).narrow(0, 0, ep).sum(1, false, at::kLong);
      counts = at::cat({counts, unique_rows.unsqueeze(1)}, 1);
      slot_keys.push_back(std::move(keys));
      present.push_back(std::move(marks));
    }
    chunk_counts.push_back(counts);
  }
  const auto host = counts_on_host(at::stack(chunk_counts));  // [chunks, ep, width] counts
  const int64_t* count_data = host.data_ptr<int64_t>();
  const int64_t* recv = count_data + chunks * ep * width;  // [ep, chunks, width] from each source
  for (int64_t c = 0; c < chunks; ++c) {
    auto& plan = plans[c];
    const int64_t* count = count_data + c * ep * width;
    lay_out_blocks(
        plan, ep, local, [&](int64_t p, int64_t e) { return count[p * width + e]; },
        [&](int64_t p, int64_t e) { return recv[(p * chunks + c) * width + e]; });
    const int64_t kept = std::accumulate(plan.send_rows.begin(), plan.send_rows.end(), int64_t{0});
    plan.slot_order = plan.slot_order.narrow(0, 0, kept);
    plan.token_of_row = at::floor_divide(plan.slot_order, top_k);
    if (!deduplicate) continue;
    std::vector<int64_t> sent(ep), received(ep);
    for (int64_t p = 0; p < ep; ++p) {
      sent[p] = count[p * width + local];
      received[p] = recv[(p * chunks + c) * width + local];
    }
    plan_unique_rows(plan, slot_keys[c], present[c], first_token(c), sent, received);
  }
  return plans;
}

void TokenDispatcher::plan_unique_rows(DispatchPlan& plan, const at::Tensor& slot_keys,
                                       const at::Tensor& present, int64_t first_token,
                                       const std::vector<int64_t>& sent,
                                       const std::vector<int64_t>& received) const {
  const int64_t ep = ep_.size();
  const int64_t chunk_tokens = present.size(0) / (ep + 1);
  const auto options = slot_keys.options();
  plan.deduplicated = true;
  // The rows on the wire are the present keys in order: by destination rank, then token.
  const auto real = present.narrow(0, 0, ep * chunk_tokens);
  const int64_t divisor = std::max<int64_t>(1, chunk_tokens);  // an empty chunk has no keys
  plan.unique_token = at::nonzero(real).view({-1}).remainder(divisor) + first_token;
  std::vector<int64_t> send_start(ep), recv_start(ep);
  int64_t sent_rows = 0;
  for (int64_t p = 0; p < ep; ++p) {
    plan.unique_send.push_back({static_cast<int>(p), sent_rows, sent[p]});
    send_start[p] = sent_rows;
    sent_rows += sent[p];
    plan.unique_recv.push_back({static_cast<int>(p), plan.unique_received, received[p]});
    recv_start[p] = plan.unique_received;
    plan.unique_received += received[p];
  }
  // Each kept pair's row within its destination's block (the rank of its key among the present
  // keys, less the block's start), sent beside the pairs so the receiver knows which row feeds
  // which (local expert, source) pair.
  const auto row_of_key = real.to(at::kLong).cumsum(0) - 1;
  const auto pair_keys = slot_keys.index_select(0, plan.slot_order - first_token * plan.top_k);
  const auto pair_destination = at::floor_divide(pair_keys, divisor);
  const auto row_in_block = row_of_key.index_select(0, pair_keys) -
                            at::tensor(send_start, options).index_select(0, pair_destination);
  const auto received_row = ep_.all_to_all_blocks(row_in_block.unsqueeze(1), plan.send_blocks,
                                                  plan.recv_blocks, pairs_received(plan))
                                .view({-1});
  // Received rows are laid out by source: add the start of the pair's source block.
  std::vector<int64_t> block_start, block_rows;
  for (const auto& block : plan.recv_blocks) {
    block_start.push_back(recv_start[block.peer]);
    block_rows.push_back(block.rows);
  }
  plan.pair_row = received_row + at::repeat_interleave(at::tensor(block_start, options),
                                                       at::tensor(block_rows, options));
}

at::Tensor TokenDispatcher::counts_on_host(const at::Tensor& counts) const {
  // Inside a recomputed region (train.recompute) the forward's counts are replayed instead of
  // exchanged again: the recompute must lay rows out exactly as the forward did.
  return parallel::replayed_exchange(counts, [&] { return exchange_counts(counts); });
}

at::Tensor TokenDispatcher::exchange_counts(const at::Tensor& counts) const {
  // The layer's one host synchronisation: this rank's [chunks, ep, W] counts, then what every EP
  // rank sends here ([ep, chunks, W]), exchanged in one all-to-all and copied in one transfer.
  const int64_t ep = ep_.size();
  if (ep == 1) return at::cat({counts.reshape({-1}), counts.reshape({-1})}).cpu();
  const auto send_counts = counts.permute({1, 0, 2}).contiguous();
  const auto received =
      ep_.all_to_all_v(send_counts, std::vector<int64_t>(ep, 1), std::vector<int64_t>(ep, 1));
  return at::cat({counts.reshape({-1}), received.reshape({-1}).to(counts.device())}).cpu();
}

std::pair<at::Tensor, at::Tensor> destination_token_keys(const at::Tensor& destination,
                                                         int64_t destinations) {
  const int64_t tokens = destination.size(0);
  const auto keys =
      (destination * tokens + at::arange(tokens, destination.options()).unsqueeze(1)).reshape({-1});
  auto present = at::zeros({(destinations + 1) * tokens}, destination.options().dtype(at::kBool))
                     .index_fill_(0, keys, true);
  return {keys, present};
}

at::Tensor take_rows(const at::Tensor& x, const at::Tensor& index) {
  // index_select's CUDA backward does k atomic adds per token row; on the CPU both sum in
  // index order.
  if (x.is_cuda()) return x.index({index});
  return x.index_select(0, index);
}

at::Tensor TokenDispatcher::permute(const at::Tensor& x, const DispatchPlan& plan) const {
  // [N, H] one row per kept pair, or [U, H] one per (token, destination) when deduplicated.
  return take_rows(x, plan.deduplicated ? plan.unique_token : plan.token_of_row);
}

at::Tensor TokenDispatcher::expand(const at::Tensor& received, const DispatchPlan& plan) const {
  return plan.deduplicated ? take_rows(received, plan.pair_row) : received;  // [R, H]
}

at::Tensor TokenDispatcher::reduce(const at::Tensor& expert_out, const at::Tensor& pair_gates,
                                   const DispatchPlan& plan) const {
  // Summed in at least the gates' precision, sent in the experts' dtype (bf16 rows stay bf16).
  const auto type = at::promote_types(expert_out.scalar_type(), pair_gates.scalar_type());
  return at::zeros({plan.unique_received, expert_out.size(1)}, expert_out.options().dtype(type))
      .index_add(0, plan.pair_row, expert_out.to(type) * pair_gates.to(type))
      .to(expert_out.scalar_type());  // [U_in, H]
}

PendingRows TokenDispatcher::start_gates(const at::Tensor& gates, const DispatchPlan& plan) const {
  const auto pair_gates = gates.reshape({-1}).index_select(0, plan.slot_order).unsqueeze(1);
  if (ep_.size() == 1) return {pair_gates, {}};
  return {{},
          parallel::start_all_to_all_blocks(pair_gates, ep_, plan.send_blocks, plan.recv_blocks,
                                            pairs_received(plan))};
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
  if (plan.deduplicated)
    return {{},
            parallel::start_all_to_all_blocks(permuted, ep_, plan.unique_send, plan.unique_recv,
                                              plan.unique_received)};
  return {{},
          parallel::start_all_to_all_blocks(permuted, ep_, plan.send_blocks, plan.recv_blocks,
                                            pairs_received(plan))};
}

PendingRows TokenDispatcher::start_combine(const at::Tensor& expert_out,
                                           const DispatchPlan& plan) const {
  if (ep_.size() == 1) return {expert_out, {}};
  // The reverse exchange: each (expert, source) block goes back to its place on the source.
  if (plan.deduplicated)
    return {{},
            parallel::start_all_to_all_blocks(expert_out, ep_, plan.unique_recv, plan.unique_send,
                                              plan.unique_token.size(0))};
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
  const auto type = gates.defined() ? at::promote_types(combined.scalar_type(), gates.scalar_type())
                                    : combined.scalar_type();
  const auto base = into.defined() ? into
                                   : at::zeros({plan.num_tokens, combined.size(1)},
                                               combined.options().dtype(type));
  // Deduplicated: one row per (token, rank), its gates already applied by reduce(); no gates:
  // rows gate-weighted on the expert side (gated_expert_rows).
  if (plan.deduplicated) return base.index_add(0, plan.unique_token, combined.to(type));
  if (!gates.defined()) return base.index_add(0, plan.token_of_row, combined.to(type));
  const auto row_gates = gates.reshape({-1}).index_select(0, plan.slot_order).to(type);  // [N]
  return base.index_add(0, plan.token_of_row,
                        combined.to(type) * row_gates.unsqueeze(1));  // [T, H]
}

}  // namespace moeforge::moe

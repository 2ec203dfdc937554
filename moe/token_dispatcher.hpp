#pragma once
// Token dispatcher: spine steps 4 (permute), 5 (dispatch), 7 (combine + unpermute).
//
// plan()      sorts this rank's kept (token, slot) pairs by global expert id and agrees with the
//             EP group on how many rows go where (one counts all-to-all). The plan is computed
//             once per layer call and reused by combine and by backward (autograd keeps it).
// permute()   x [T, H] -> xp [N, H], rows grouped by global expert (N = kept slots).
// dispatch()  xp -> [R, H] rows for this rank's E/ep local experts, grouped by local expert,
//             then by source rank (R = rows received). Differentiable block all-to-all that
//             writes rows straight into that layout (no reorder pass after the exchange).
// combine()   inverse of dispatch: expert outputs [R, H] -> [N, H] back on the source rank.
// unpermute() y[t] = Σ_j gate[t, j] · out[t, j], summed in permuted-row order (global expert,
//             then slot); dropped slots contribute 0. The row order is the same for every
//             ep_size, so the result does not depend on it (CPU index_add is sequential).
//             Without gates the rows come gate-weighted from the expert side
//             (moe/gathered_experts.hpp, gated_expert_rows: the gates go out beside the rows,
//             start_gates()), and the same sum runs on the same products.
//
// Deduplicated dispatch (plan_chunks(..., deduplicate = true); parallel.dedup_dispatch): a token
// goes to each EP rank once, however many of its k experts live there. The receiver copies the
// row to each local expert that needs it (expand()), weights the expert outputs by their gates
// (exchanged alongside, start_gates()) and sums them per token (reduce()), so the combine also
// sends one row per (token, rank). With group-limited routing aligned to ranks/nodes this is
// what turns "fewer groups per token" into fewer bytes on the wire. The sum of a token's
// outputs is then split by rank ((e0 + e1) on one rank, (e2 + e3) on another) instead of one
// chain: equal to the row dispatch within fp32 rounding, not bit for bit.
// Collective: plan/dispatch/combine must be called by every EP-group member in the same order.
#include <ATen/core/Tensor.h>

#include <utility>
#include <vector>

#include "parallel/all_to_all.hpp"
#include "parallel/communicator.hpp"

namespace moeforge::moe {

// Rows of x [T, H] at `index`: index_select on the CPU; on CUDA advanced indexing, whose
// backward is a sorted accumulate instead of index_select's atomic index_add.
at::Tensor take_rows(const at::Tensor& x, const at::Tensor& index);

// Distinct (destination, token) pairs among picks. `destination` [T, k]: where each pick goes,
// `destinations` for dropped picks. Returns each pick's key destination·T + token ([T·k]) and
// which of the (destinations + 1)·T keys occur ([(destinations + 1)·T] bool).
std::pair<at::Tensor, at::Tensor> destination_token_keys(const at::Tensor& destination,
                                                         int64_t destinations);

struct DispatchPlan {
  int64_t num_tokens = 0;
  int64_t top_k = 0;
  at::Tensor slot_order;                        // [N] int64 flat slot ids (t*k + j) by expert
  at::Tensor token_of_row;                      // [N] int64 token of each permuted row
  std::vector<int64_t> send_rows;               // [ep] rows this rank sends to each EP rank
  std::vector<int64_t> recv_rows;               // [ep] rows this rank receives from each
  std::vector<parallel::RowBlock> send_blocks;  // [E] one per global expert, permuted order
  std::vector<parallel::RowBlock> recv_blocks;  // [El·ep] (local expert, source) layout
  std::vector<int64_t> rows_per_local_expert;   // [E/ep]
  // Deduplicated dispatch only (deduplicated = true): the rows on the wire are one per
  // (token, destination rank); the pair blocks above then carry the gates and the row indices.
  bool deduplicated = false;
  at::Tensor unique_token;                      // [U] int64 token of each row sent
  std::vector<parallel::RowBlock> unique_send;  // [ep] by destination rank
  std::vector<parallel::RowBlock> unique_recv;  // [ep] by source rank
  int64_t unique_received = 0;                  // rows received (sum of unique_recv)
  at::Tensor pair_row;  // [R] int64: received row of each (local expert, source) pair
};

// Rows on their way: either already here (no exchange needed, ep = 1) or in flight.
struct PendingRows {
  at::Tensor ready;
  parallel::PendingExchange exchange;
};

class TokenDispatcher {
 public:
  // `ep` is the expert-parallel group (size 1 = all experts local). Not owned.
  TokenDispatcher(parallel::Communicator& ep, int64_t num_experts);

  // expert_ids [T, k] int64; keep [T, k] bool or undefined (= keep all).
  DispatchPlan plan(const at::Tensor& expert_ids, const at::Tensor& keep) const;
  // One plan per chunk of consecutive tokens (chunk c: tokens [c·T/n, (c+1)·T/n)), agreed with
  // the EP group in a single counts exchange. Each plan indexes the full x / gates.
  // `deduplicate`: one row per (token, destination rank) on the wire (see above).
  std::vector<DispatchPlan> plan_chunks(const at::Tensor& expert_ids, const at::Tensor& keep,
                                        int64_t chunks, bool deduplicate = false) const;
  at::Tensor permute(const at::Tensor& x, const DispatchPlan& plan) const;
  at::Tensor dispatch(const at::Tensor& permuted, const DispatchPlan& plan) const;
  at::Tensor combine(const at::Tensor& expert_out, const DispatchPlan& plan) const;
  // `into` (optional, [T, H]): add to it instead of to zeros (chunked pipelines). `gates`
  // undefined: `combined` is gate-weighted already.
  at::Tensor unpermute(const at::Tensor& combined, const at::Tensor& gates,
                       const DispatchPlan& plan, const at::Tensor& into = {}) const;
  // Asynchronous dispatch / combine (parallel::start_all_to_all_blocks); finish() waits.
  PendingRows start_dispatch(const at::Tensor& permuted, const DispatchPlan& plan) const;
  PendingRows start_combine(const at::Tensor& expert_out, const DispatchPlan& plan) const;
  at::Tensor finish(const PendingRows& pending) const;
  // The row gates [T, k] -> [R, 1] beside the pairs on the expert side (differentiable: the
  // gates' gradient comes back the same way). Deduplicated plans: received rows [U_in, H] ->
  // one row per (local expert, source) pair [R, H]; expert outputs [R, H] weighted by those
  // gates and summed per received row -> [U_in, H] in the outputs' dtype (summed in fp32). The
  // CPU fp32 experts do expand, experts and reduce in one pass (moe/gathered_experts.hpp).
  PendingRows start_gates(const at::Tensor& gates, const DispatchPlan& plan) const;
  at::Tensor expand(const at::Tensor& received, const DispatchPlan& plan) const;
  at::Tensor reduce(const at::Tensor& expert_out, const at::Tensor& pair_gates,
                    const DispatchPlan& plan) const;

  int64_t num_local_experts() const { return num_local_experts_; }
  int64_t first_local_expert() const { return first_local_expert_; }
  int ep_size() const { return ep_.size(); }

 private:
  // [chunks, E] counts (any device) -> host int64: these counts flattened, then the
  // [ep, chunks, E/ep] counts each EP rank sends to this one.
  // Replayed inside a recomputed region (parallel::replayed_exchange).
  // `counts` is [chunks, ep, W]: per destination rank its W = El pair counts per local expert
  // (+ 1 unique-row count for deduplicated plans).
  at::Tensor counts_on_host(const at::Tensor& counts) const;
  at::Tensor exchange_counts(const at::Tensor& counts) const;
  // Deduplicated plan of one chunk, once the counts are on the host: which tokens go where and
  // where each received pair's row is (one small index exchange).
  // `slot_keys` [T_c·k]: destination rank · T_c + token within the chunk of each slot (ep for
  // dropped slots); `present` [(ep + 1) · T_c] bool: which keys occur.
  void plan_unique_rows(DispatchPlan& plan, const at::Tensor& slot_keys, const at::Tensor& present,
                        int64_t first_token, const std::vector<int64_t>& sent,
                        const std::vector<int64_t>& received) const;
  parallel::Communicator& ep_;
  int64_t num_experts_;
  int64_t num_local_experts_;
  int64_t first_local_expert_;
};

}  // namespace moeforge::moe

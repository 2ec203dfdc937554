#include "moe/gathered_experts.hpp"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/autocast_mode.h>
#include <ATen/record_function.h>
#include <torch/autograd.h>

#include <algorithm>
#include <cstring>
#include <numeric>

#include "moe/cpu_gemm.hpp"
#include "moe/row_kernels.hpp"

namespace moeforge::moe {
namespace {

constexpr int64_t kRowGrain = 16;  // rows per parallel task: a row is H floats of copy or add
// An expert's rows go through in blocks of at most this many, so the scratch stays bounded
// whatever the routing imbalance (a hot expert can hold several times its share of the rows).
constexpr int64_t kBlockRows = 2048;

// out[r] = src[index[r]] for the first out.size(0) rows.
void gather_rows(const at::Tensor& src, const int64_t* index, const at::Tensor& out) {
  RECORD_FUNCTION("moeforge::gather_rows", {});
  const int64_t width = src.size(1);
  const float* from = src.const_data_ptr<float>();
  float* to = out.data_ptr<float>();
  at::parallel_for(0, out.size(0), kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      std::memcpy(to + r * width, from + index[r] * width, width * sizeof(float));
  });
}

// dst[index[r]] += scale[r] · rows[r] (scale null: 1). Race-free without atomics because no
// token appears twice among one expert's rows.
void add_rows(const at::Tensor& dst, const int64_t* index, const at::Tensor& rows,
              const float* scale) {
  RECORD_FUNCTION("moeforge::add_rows", {});
  const int64_t width = rows.size(1);
  const float* from = rows.const_data_ptr<float>();
  float* to = dst.data_ptr<float>();
  at::parallel_for(0, rows.size(0), kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      add_scaled(width, scale ? scale[r] : 1.0F, from + r * width, to + index[r] * width);
  });
}

// An fp32 [rows, width] tensor (rows may be strided) from row `first` on, as the row kernels
// take it.
RowBlock<const float> block(const at::Tensor& t, int64_t first) {
  return {t.const_data_ptr<float>() + first * t.stride(0), t.stride(0)};
}
RowBlock<float> mutable_block(const at::Tensor& t, int64_t first) {
  return {t.data_ptr<float>() + first * t.stride(0), t.stride(0)};
}

// kernel(first, count) over row ranges of n rows of `width` floats: on every intra-op thread
// when called outside the experts' shares (one share: a single expert, e.g. the shared experts),
// inline inside a share (at::parallel_for does not nest).
template <class Kernel>
void over_rows(int64_t n, int64_t width, const Kernel& kernel) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { kernel(begin, end - begin); });
}

// Scratch blocks reused by every expert, sized for the largest one; the [rows, H] blocks only
// where rows are gathered (the rows form reads and writes its blocks in place). `activation`
// holds h = silu(g)·u in both directions: a contiguous GEMM operand (a strided one would be
// copied by LibTorch's oneDNN wrapper).
struct Scratch {
  Scratch(int64_t max_rows, int64_t hidden, int64_t ffn, bool row_blocks,
          const at::TensorOptions& options)
      : rows(at::empty({row_blocks ? max_rows : 0, hidden}, options)),
        other_rows(at::empty({row_blocks ? max_rows : 0, hidden}, options)),
        activation(at::empty({max_rows, ffn}, options)) {}
  at::Tensor rows, other_rows, activation;
};

// Rows of scratch: the largest expert's, at most one block.
int64_t scratch_rows(const std::vector<int64_t>& counts) {
  return counts.empty() ? 0 : std::min(kBlockRows, *std::max_element(counts.begin(), counts.end()));
}

// Each thread's experts (ascending within a share). Assigned largest first to the least loaded
// share (longest-processing-time first; deterministic: ties go to the lower share), an expert
// costing its rows plus kExpertCost for the per-expert fixed work (its products' packing and
// tails, its scratch). Shares run concurrently with each op single-threaded, which beats
// threading every small GEMM and elementwise op of a fine-grained layer (each a fork and join).
// One share (every op multi-threaded) when there is one thread or the largest share would exceed
// an even split by 25% (one large expert, or fewer experts than threads).
constexpr int64_t kExpertCost = 32;  // rows' worth
using Shares = std::vector<std::vector<int64_t>>;
Shares thread_shares(const std::vector<int64_t>& rows) {
  const auto experts = static_cast<int64_t>(rows.size());
  const int64_t threads = at::get_num_threads();
  std::vector<int64_t> all(experts);
  std::iota(all.begin(), all.end(), int64_t{0});
  if (threads < 2) return {all};
  const auto cost = [&](int64_t e) { return rows[e] > 0 ? rows[e] + kExpertCost : 0; };
  std::vector<int64_t> by_cost = all;
  std::stable_sort(by_cost.begin(), by_cost.end(),
                   [&](int64_t a, int64_t b) { return cost(a) > cost(b); });
  Shares shares(threads);
  std::vector<int64_t> load(threads, 0);
  for (const int64_t e : by_cost) {
    const auto least = std::min_element(load.begin(), load.end()) - load.begin();
    shares[least].push_back(e);
    load[least] += cost(e);
  }
  const int64_t total = std::accumulate(load.begin(), load.end(), int64_t{0});
  const int64_t largest = *std::max_element(load.begin(), load.end());
  if (largest * threads * 4 > total * 5) return {all};
  for (auto& share : shares) std::sort(share.begin(), share.end());
  return shares;
}

// per_block(e, first row, rows, share, first block of e) for every block of at most kBlockRows
// rows of every expert, each share's experts in order (once with 0 rows for an expert without
// rows), shares concurrently.
template <class PerBlock>
void for_each_expert(const std::vector<int64_t>& rows, const Shares& shares,
                     const PerBlock& per_block) {
  std::vector<int64_t> first(rows.size() + 1, 0);
  std::partial_sum(rows.begin(), rows.end(), first.begin() + 1);
  const auto run_share = [&](int64_t share) {
    for (const int64_t e : shares[share]) {
      int64_t done = 0;
      do {
        per_block(e, first[e] + done, std::min(kBlockRows, rows[e] - done), share, done == 0);
        done += kBlockRows;
      } while (done < rows[e]);
    }
  };
  if (shares.size() == 1) return run_share(0);
  // The shares call ATen ops, which read thread-local state: autograd's grad mode (off inside a
  // custom function), the profiler's. OpenMP's threads start without the caller's.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, static_cast<int64_t>(shares.size()), 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard state(caller_state);
    for (int64_t share = begin; share < end; ++share) run_share(share);
  });
}

// One output (y or dx) per share, so concurrent shares never add into the same token; the
// first is the result, the others are added into it after the shares finish.
std::vector<at::Tensor> share_outputs(const at::Tensor& like, size_t shares) {
  std::vector<at::Tensor> outputs;
  for (size_t s = 0; s < shares; ++s) outputs.push_back(at::zeros_like(like));
  return outputs;
}

at::Tensor sum_shares(const std::vector<at::Tensor>& outputs) {
  for (size_t s = 1; s < outputs.size(); ++s) outputs[0].add_(outputs[s]);
  return outputs[0];
}

// An expert's n rows of `src`: gathered through `index` into `scratch` (the gathered form), or
// the consecutive block from row `first` (the rows form: no index).
at::Tensor expert_rows(const at::Tensor& src, const int64_t* index, int64_t first, int64_t n,
                       const at::Tensor& scratch) {
  if (index == nullptr) return src.narrow(0, first, n);
  const auto rows = scratch.narrow(0, 0, n);
  gather_rows(src, index, rows);
  return rows;
}

// The routed experts, expert by expert, in two forms that share every step but where the rows
// live: gathered (rows gathered from the token rows x [T, H] through token_of_row, gate-weighted
// outputs added into y [T, H]) or rows (x is [R, H] already grouped by expert, as the
// expert-parallel all-to-all delivers it, and y [R, H] is each row's gate-weighted output,
// written in place; token_of_row is empty and unused).
class GatheredExperts : public torch::autograd::Function<GatheredExperts> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& row_gates, const at::Tensor& w_gate,
                            const at::Tensor& w_up, const at::Tensor& w_down,
                            const at::Tensor& token_of_row, std::vector<int64_t> rows_per_expert,
                            bool gathered, RowCounts row_counts) {
    const auto shares = thread_shares(rows_per_expert);
    Outputs out(x, row_gates, w_gate, token_of_row, gathered, scratch_rows(rows_per_expert),
                shares.size(), row_counts);
    for_each_expert(rows_per_expert, shares,
                    [&](int64_t e, int64_t first, int64_t n, int64_t s, bool /*first_block*/) {
                      if (n > 0) out.add_block(e, first, n, s, w_gate, w_up, w_down);
                    });
    ctx->save_for_backward(
        {x, row_gates, w_gate, w_up, w_down, token_of_row, out.gate_out, out.up_out});
    ctx->saved_data["rows"] = rows_per_expert;
    ctx->saved_data["gathered"] = gathered;
    ctx->saved_data["row_counts"] = static_cast<int64_t>(row_counts);
    return sum_shares(out.y);
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto rows_per_expert = ctx->saved_data["rows"].toIntVector();
    const auto shares = thread_shares(rows_per_expert);
    Gradients grads(saved, grad_outputs[0].contiguous(), scratch_rows(rows_per_expert),
                    shares.size(), ctx->saved_data["gathered"].toBool(), ctx->needs_input_grad(1),
                    static_cast<RowCounts>(ctx->saved_data["row_counts"].toInt()));
    for_each_expert(rows_per_expert, shares,
                    [&](int64_t e, int64_t first, int64_t n, int64_t s, bool first_block) {
                      if (n > 0)
                        grads.add_block(e, first, n, grads.shares[s], first_block);
                      else
                        grads.zero_expert(e);
                    });
    return {grads.x(),    grads.row_gates, grads.w_gate, grads.w_up,  grads.w_down,
            at::Tensor(), at::Tensor(),    at::Tensor(), at::Tensor()};
  }

 private:
  // Forward, block by block: the two GEMM outputs kept for backward, and y.
  struct Outputs {
    Outputs(const at::Tensor& x_in, const at::Tensor& gates_in, const at::Tensor& wg,
            const at::Tensor& tokens_in, bool gathered_rows, int64_t max_rows, size_t num_shares,
            RowCounts counts)
        : gathered(gathered_rows),
          row_counts(counts),
          x(x_in),
          gates(gates_in),
          tokens(tokens_in),
          gate_out(at::empty({gates_in.size(0), wg.size(1)}, x_in.options())),
          up_out(at::empty_like(gate_out)),
          // Gathered: one y per share (shares may add into the same token); rows: one y whose
          // disjoint row blocks the shares write.
          y(gathered ? share_outputs(x_in, num_shares)
                     : std::vector<at::Tensor>{
                           at::empty({gates_in.size(0), x_in.size(1)}, x_in.options())}) {
      for (size_t s = 0; s < num_shares; ++s)
        scratch.emplace_back(max_rows, x_in.size(1), wg.size(1), gathered, x_in.options());
    }

    void add_block(int64_t e, int64_t first, int64_t n, int64_t s, const at::Tensor& wg,
                   const at::Tensor& wu, const at::Tensor& wd) {
      const int64_t* index = gathered ? tokens.const_data_ptr<int64_t>() + first : nullptr;
      const auto rows = expert_rows(x, index, first, n, scratch[s].rows);
      auto g = gate_out.narrow(0, first, n), u = up_out.narrow(0, first, n);
      gemm_into(g, rows, wg[e].t(), false, row_counts);
      gemm_into(u, rows, wu[e].t(), false, row_counts);
      auto h = scratch[s].activation.narrow(0, 0, n);
      over_rows(n, h.size(1), [&](int64_t r, int64_t count) {
        swiglu_rows(count, h.size(1), block(g, r), block(u, r), mutable_block(h, r));
      });
      if (gathered) {
        auto out = scratch[s].other_rows.narrow(0, 0, n);
        gemm_into(out, h, wd[e].t(), false, row_counts);
        add_rows(y[s], index, out, gates.const_data_ptr<float>() + first);
      } else {
        auto out = y[0].narrow(0, first, n);
        gemm_into(out, h, wd[e].t(), false, row_counts);
        out.mul_(gates.narrow(0, first, n).unsqueeze(1));
      }
    }

    bool gathered;
    RowCounts row_counts;
    at::Tensor x, gates, tokens, gate_out, up_out;
    std::vector<at::Tensor> y;
    std::vector<Scratch> scratch;
  };

  // One thread share's scratch and, gathered, its part of dx (rows: the shares write disjoint
  // rows of one dx).
  struct Share {
    Share(const at::Tensor& x_in, const at::Tensor& wg, int64_t max_rows, const at::Tensor& dx)
        : scratch(max_rows, x_in.size(1), wg.size(1), !dx.defined(), x_in.options()),
          dh(at::empty({max_rows, wg.size(1)}, x_in.options())),
          d_gate(at::empty({max_rows, wg.size(1)}, x_in.options())),
          d_up(at::empty_like(d_gate)),
          x(dx.defined() ? dx : at::zeros_like(x_in)) {}
    Scratch scratch;
    at::Tensor dh, d_gate, d_up;  // [rows, F] each
    at::Tensor x;                 // this share's dx (or all of it)
  };

  // Backward, expert by expert; each block recomputes silu(g)·u from the kept GEMM outputs.
  struct Gradients {
    Gradients(const std::vector<at::Tensor>& saved, at::Tensor grad_y, int64_t max_rows,
              size_t num_shares, bool gathered_rows, bool gate_gradient, RowCounts counts)
        : gathered(gathered_rows),
          row_counts(counts),
          x_in(saved[0]),
          gates_in(saved[1]),
          wg(saved[2]),
          wu(saved[3]),
          wd(saved[4]),
          tokens(saved[5]),
          gate_out(saved[6]),
          up_out(saved[7]),
          dy(std::move(grad_y)),
          row_gates(gate_gradient ? at::empty_like(gates_in) : at::Tensor()),
          w_gate(at::empty_like(wg)),  // every expert's slice is written: by a GEMM or zeroed
          w_up(at::empty_like(wu)),
          w_down(at::empty_like(wd)) {
      const auto rows_dx = gathered ? at::Tensor() : at::empty_like(x_in);
      for (size_t s = 0; s < num_shares; ++s) shares.emplace_back(x_in, wg, max_rows, rows_dx);
    }

    at::Tensor x() const {
      if (!gathered) return shares.front().x;
      std::vector<at::Tensor> dx;
      for (const auto& share : shares) dx.push_back(share.x);
      return sum_shares(dx);
    }

    // An expert that received no rows has a zero gradient.
    void zero_expert(int64_t e) {
      w_gate[e].zero_();
      w_up[e].zero_();
      w_down[e].zero_();
    }

    // One block of expert e's rows; the weight gradients are written by its first block and
    // accumulated by the others.
    void add_block(int64_t e, int64_t first, int64_t n, Share& share, bool first_block) {
      const int64_t* index = gathered ? tokens.const_data_ptr<int64_t>() + first : nullptr;
      auto& scratch = share.scratch;
      const auto rows = expert_rows(x_in, index, first, n, scratch.rows);
      const auto dy_rows = expert_rows(dy, index, first, n, scratch.other_rows);
      const auto g = gate_out.narrow(0, first, n), u = up_out.narrow(0, first, n);
      const float* gate = gates_in.const_data_ptr<float>() + first;
      const int64_t ffn = wg.size(1);
      auto d_gate = share.d_gate.narrow(0, 0, n), d_up = share.d_up.narrow(0, 0, n);
      auto h = scratch.activation.narrow(0, 0, n);  // silu(g)·u, then gate · h
      over_rows(n, ffn, [&](int64_t r, int64_t count) {
        swiglu_rows(count, ffn, block(g, r), block(u, r), mutable_block(h, r));
      });
      // d(output row) = gate · dy: through w_down, dh = gate · (dy · w_down); the gate's own
      // gradient is ⟨dy, out⟩ = ⟨dy · w_down, h⟩, with no need to keep or recompute out.
      auto dh = share.dh.narrow(0, 0, n);
      gemm_into(dh, dy_rows, wd[e], false, row_counts);
      // Gates that need no gradient (the shared experts' ones) skip the dots.
      float* gate_grad = row_gates.defined() ? row_gates.data_ptr<float>() + first : nullptr;
      over_rows(n, ffn, [&](int64_t r, int64_t count) {
        row_dots_then_scale(count, ffn, block(dh, r), mutable_block(h, r), gate + r,
                            gate_grad ? gate_grad + r : nullptr);
      });
      gemm_into(w_down[e], dy_rows.t(), h, /*accumulate=*/!first_block, row_counts);
      over_rows(n, ffn, [&](int64_t r, int64_t count) {
        swiglu_rows_backward(count, ffn, block(dh, r), block(g, r), block(u, r), gate + r,
                             mutable_block(d_gate, r), mutable_block(d_up, r));
      });
      // The gate and up projections back separately, straight into their gradients and dx:
      // through oneDNN as fast as one [dg | du]·[Wg; Wu] GEMM each way (bench_moe_layer), without
      // that one's per-expert weight concatenation and gradient split (3 · 2F·H floats copied).
      gemm_into(w_gate[e], d_gate.t(), rows, /*accumulate=*/!first_block, row_counts);
      gemm_into(w_up[e], d_up.t(), rows, /*accumulate=*/!first_block, row_counts);
      // Gathered: into dy_rows' scratch (no longer needed), then added to the tokens' rows.
      auto d_rows = index ? scratch.other_rows.narrow(0, 0, n) : share.x.narrow(0, first, n);
      gemm_into(d_rows, d_gate, wg[e], false, row_counts);
      gemm_into(d_rows, d_up, wu[e], /*accumulate=*/true, row_counts);
      if (index) add_rows(share.x, index, d_rows, nullptr);
    }

    bool gathered;
    RowCounts row_counts;
    at::Tensor x_in, gates_in, wg, wu, wd, tokens, gate_out, up_out, dy;
    at::Tensor row_gates, w_gate, w_up, w_down;  // the gradients (x's: the shares' sum)
    std::vector<Share> shares;
  };
};

}  // namespace

at::Tensor gathered_experts(const at::Tensor& x, const at::Tensor& row_gates,
                            const at::Tensor& token_of_row,
                            const std::vector<int64_t>& rows_per_expert, const at::Tensor& w_gate,
                            const at::Tensor& w_up, const at::Tensor& w_down) {
  TORCH_CHECK(gathered_experts_apply(x) && row_gates.scalar_type() == at::kFloat &&
                  token_of_row.scalar_type() == at::kLong,
              "gathered_experts: CPU fp32 rows and gates, int64 token indices expected");
  return GatheredExperts::apply(x.contiguous(), row_gates.contiguous(), w_gate, w_up, w_down,
                                token_of_row.contiguous(), rows_per_expert, /*gathered=*/true,
                                RowCounts::kPerStep);
}

at::Tensor gated_expert_rows(const at::Tensor& rows, const at::Tensor& row_gates,
                             const std::vector<int64_t>& rows_per_expert, const at::Tensor& w_gate,
                             const at::Tensor& w_up, const at::Tensor& w_down,
                             RowCounts row_counts) {
  TORCH_CHECK(gathered_experts_apply(rows) && row_gates.scalar_type() == at::kFloat &&
                  row_gates.numel() == rows.size(0),
              "gated_expert_rows: CPU fp32 rows and one fp32 gate per row expected");
  return GatheredExperts::apply(rows.contiguous(), row_gates.reshape({-1}).contiguous(), w_gate,
                                w_up, w_down, at::empty({0}, rows.options().dtype(at::kLong)),
                                rows_per_expert, /*gathered=*/false, row_counts);
}

bool gathered_experts_apply(const at::Tensor& x) {
  return x.is_cpu() && x.scalar_type() == at::kFloat &&
         !at::autocast::is_autocast_enabled(at::kCPU);
}

}  // namespace moeforge::moe

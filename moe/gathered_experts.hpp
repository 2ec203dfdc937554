#pragma once
// The routed experts and the gate-weighted combine as one autograd function, expert by expert,
// on the CPU in fp32: every expert local (ep_size 1; x = the layer's tokens), and at ep > 1 on
// the rows the all-to-all delivered (gated_expert_rows below, or gathered_experts over the
// deduplicated dispatch's received rows, token_of_row = each pair's received row).
//
// The pipeline (permute → grouped GEMMs → unpermute) materialises several [N, H] tensors for
// N = T·k routed rows and keeps some for backward; with fine-grained experts (large k) those
// are k times the layer's input and every pass over them is memory-bound. Here each expert
// gathers its own rows from x into a scratch block that stays in cache, runs its SwiGLU, and
// adds gate · output straight into y; backward gathers again instead of keeping rows. Kept for
// backward: x (the caller holds it anyway), the gates and the two [N, F] GEMM outputs — what
// train.recompute: moe_act keeps in the pipeline. No [N, H] tensor outlives one expert.
//
// Numerics: the same per-expert GEMMs; y[t] accumulates its rows in (expert, slot) order as the
// pipeline's index_add does, so the result is ep-independent as before (within fp32 rounding
// of the fused elementwise work).
#include <ATen/core/Tensor.h>

#include <vector>

#include "moe/cpu_gemm.hpp"

namespace moeforge::moe {

// y [T, H] (fp32) = Σ_r row_gates[r] · SwiGLU_e(r)(x[token_of_row[r]]), where rows r are grouped
// by expert (rows_per_expert[e] consecutive rows for expert e) and no token appears twice in
// one expert's rows. Weights in GroupedExperts' layout: w_gate, w_up [E, F, H]; w_down [E, H, F].
// Differentiable in x, row_gates and the three weights.
at::Tensor gathered_experts(const at::Tensor& x, const at::Tensor& row_gates,
                            const at::Tensor& token_of_row,
                            const std::vector<int64_t>& rows_per_expert, const at::Tensor& w_gate,
                            const at::Tensor& w_up, const at::Tensor& w_down);

// The same experts on rows already grouped by expert — what the expert-parallel all-to-all
// delivers: out [R, H] (fp32), out[r] = row_gates[r] · SwiGLU_e(r)(rows[r]) ([R] or [R, 1]
// gates). Kept for backward: rows, gates and the two [R, F] GEMM outputs, where the grouped-GEMM
// experts keep four [R, F] tensors (silu's input and output, up, their product) and the combine
// kept the returned rows for the gates' gradient. Differentiable in rows, gates and weights.
// row_counts: kPerStep for routed experts, kFixed for a dense FeedForward run as one expert
// (moe/cpu_gemm.hpp: which kernel its products take).
at::Tensor gated_expert_rows(const at::Tensor& rows, const at::Tensor& row_gates,
                             const std::vector<int64_t>& rows_per_expert, const at::Tensor& w_gate,
                             const at::Tensor& w_up, const at::Tensor& w_down,
                             RowCounts row_counts = RowCounts::kPerStep);

// Whether gathered_experts and gated_expert_rows serve x: a CPU fp32 input with no autocast (bf16
// takes the pipeline, whose grouped GEMMs bound oneDNN's shape cache).
bool gathered_experts_apply(const at::Tensor& x);

}  // namespace moeforge::moe

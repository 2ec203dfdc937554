#pragma once
// Elementwise work of the CPU fp32 experts on [rows, width] blocks (each operand with its own
// row stride, e.g. one half of a [rows, 2F] block), fused into one pass each where ATen takes
// several ops, and compiled for AVX-512, AVX2 and baseline x86-64 with the processor's best
// chosen at load time (the project is otherwise built for baseline x86-64, where ATen's own
// kernels dispatch the same way). exp is a polynomial (relative error < 2e-7), not libm's.
#include <cstdint>

namespace moeforge::moe {

// A [rows, width] fp32 block at `data` whose rows are `stride` floats apart.
template <class T>
struct RowBlock {
  T* data;
  int64_t stride;
};

// h = silu(g) · u.
void swiglu_rows(int64_t rows, int64_t width, RowBlock<const float> g, RowBlock<const float> u,
                 RowBlock<float> h);

// SwiGLU's backward for gate-weighted outputs: with t = gate[r] · dh,
//   d_up = t · silu(g),   d_g = t · u · silu'(g)   (silu'(g) = s · (1 + g · (1 − s)), s = σ(g)).
void swiglu_rows_backward(int64_t rows, int64_t width, RowBlock<const float> dh,
                          RowBlock<const float> g, RowBlock<const float> u, const float* gate,
                          RowBlock<float> d_g, RowBlock<float> d_up);

// dots[r] = ⟨a[r], b[r]⟩ summed in double (dots may be null: no dots), then b[r] *= scale[r].
void row_dots_then_scale(int64_t rows, int64_t width, RowBlock<const float> a, RowBlock<float> b,
                         const float* scale, float* dots);

// to[c][r] = from[r][c] for a [rows, cols] block `from` ([cols, rows] `to`): packs a transposed
// GEMM operand (moe/tiled_gemm).
void transpose_rows(int64_t rows, int64_t cols, RowBlock<const float> from, RowBlock<float> to);

// to[c] += s · from[c] for c < width.
void add_scaled(int64_t width, float s, const float* from, float* to);

}  // namespace moeforge::moe

#pragma once
// CPU fp32 products whose row count changes every step (the routed experts'), through oneDNN's
// brgemm micro-kernel in tiles of a fixed set of shapes.
//
// oneDNN's matmul primitive (gemm_into) is compiled for one shape and cached: an expert's row
// count changes every step, so gemm_into gives oneDNN the rows in steps of 64 (a bounded set of
// shapes) and MKL's AVX2 code the remainder. At fine-grained sizes (~128 rows per expert) that
// split costs a third of the experts' GEMM time (docs/benchmarks.md, "Experts through brgemm
// tiles"). LibTorch exports oneDNN's brgemm micro-kernel (at::native::cpublas::brgemm, kernels
// cached per thread by shape); here every product is cut into tiles of at most 64 rows and
// 256 x 256 panels, a remainder into pieces of 64·j rows, then powers of two, so the kernels
// come from a small fixed set whatever the rows, and every row runs AVX-512 code. A transposed
// operand (a weight used as Wᵀ, or activations as the reduction of a weight gradient) is
// packed panel by panel into a row-major buffer of the calling thread.
#include <ATen/core/Tensor.h>

namespace moeforge::moe {

// Whether tiled_gemm_into takes these operands: CPU fp32, 2-D, each operand row-major or a
// transposed view of a row-major matrix (unit stride in one dimension), out row-major.
bool tiled_gemm_takes(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b);

// out = a · b, or out += a · b with accumulate; out [M, N] must not overlap a or b.
void tiled_gemm_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                     bool accumulate);

}  // namespace moeforge::moe

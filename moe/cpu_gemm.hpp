#pragma once
// Matrix products for the CPU fp32 layers: which kernel runs them.
//
// LibTorch's at::mm takes MKL's sgemm for fp32 on the CPU, and MKL runs its AVX2 code on AMD
// processors; oneDNN's matmul (also inside LibTorch, used there only for 16-bit types) runs
// AVX-512 kernels and is ~2.2x faster on the AMD EPYC this project is measured on, at equal
// fp32 accuracy (docs/benchmarks.md, "fp32 GEMMs through oneDNN"). So CPU fp32 products go
// through oneDNN; everything else (CUDA, 16-bit, float64 references) through ATen as before.
//
// oneDNN builds and keeps one kernel per shape, and the experts see new row counts every step:
// the rows (and a reduction over rows) are split into a part that is a multiple of 64, which
// oneDNN takes, and a remainder of < 64 that MKL takes, so the shapes oneDNN sees stay few.
//
// MOEFORGE_CPU_GEMM=aten (or onednn, the default) chooses the kernel for a whole process: the
// benchmarks compare both in one build. If oneDNN refuses fp32 (older LibTorch builds), a
// one-time probe falls back to ATen and says so once on stderr.
#include <ATen/core/Tensor.h>

namespace moeforge::moe {

enum class CpuGemm { kOneDnn, kAten };

// The kernel CPU fp32 products use in this process (probed once).
CpuGemm cpu_gemm();

// Whether a product with this operand goes to oneDNN: a CPU fp32 tensor, and oneDNN chosen.
bool onednn_operand(const at::Tensor& t);

// Whether a product's row count (or its reduction over rows) is the same every step (dense
// layers, attention, the LM head) or changes every step (the routed experts'). With oneDNN
// chosen, the latter go through brgemm tiles (moe/tiled_gemm.hpp), which need no kernel per
// row count; MOEFORGE_EXPERT_GEMM=matmul (or tiles, the default) sends them through oneDNN's
// matmul like the others, for A/B measurements.
enum class RowCounts { kFixed, kPerStep };

// out = a · b, or out += a · b with accumulate: 2-D operands, any strides (e.g. views made by
// .t() or .narrow()); out [M, N] must not overlap a or b.
void gemm_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
               bool accumulate = false, RowCounts rows = RowCounts::kFixed);

// a · b as a new [M, N] tensor.
at::Tensor gemm(const at::Tensor& a, const at::Tensor& b);

}  // namespace moeforge::moe

#pragma once
// Grouped matrix multiply for experts: one call for all of a rank's experts.
//
//   out[rows of group g] = x[rows of group g] · w[g]      x [R, K], w [G, K, N] -> [R, N]
//
// Rows of group g are the rows_per_group[g] consecutive rows after those of groups < g (empty
// groups allowed). Uses ATen's at::_grouped_mm (one grouped GEMM on CUDA for bf16, a BLAS loop
// inside ATen on CPU for f32/bf16/f16), and a per-group mm_out loop otherwise (f64 references,
// fp32 on CUDA). Its
// own autograd function, so backward is also grouped: dx = dy·w[g]ᵀ per group and
// dw[g] = x_gᵀ·dy_g (zero for empty groups), without the per-group full-size zero tensors that
// autograd through narrow()/select() would allocate.
//
// 16-bit on the CPU: oneDNN (LibTorch's bf16 GEMMs there) JIT-compiles and keeps kernels per
// shape, and experts see new row counts every step, so resident memory grew without bound
// (~1.3 MiB per step in tests/test_distributed.cpp's ResidentMemory). Each group's rows are
// therefore rounded up to a multiple of 64 with zero rows, which bounds the distinct shapes; the
// padded rows' outputs are dropped and, being zero, add nothing to the weight gradients.
#include <ATen/core/Tensor.h>

#include <vector>

namespace moeforge::moe {

at::Tensor grouped_matmul(const at::Tensor& x, const at::Tensor& w,
                          const std::vector<int64_t>& rows_per_group);

// Row groups spread out with zero rows after each group's real rows: `counts` the padded sizes,
// `positions` [R] int64 the padded row of every real row (for index_copy / index_select).
struct PaddedGroups {
  std::vector<int64_t> counts;
  at::Tensor positions;
  int64_t rows = 0;  // Σ counts
};
PaddedGroups pad_groups(const std::vector<int64_t>& rows_per_group, int64_t padded_rows_of_group,
                        int64_t multiple, const at::Device& device);

}  // namespace moeforge::moe

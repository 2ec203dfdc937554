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
#include <ATen/core/Tensor.h>

#include <vector>

namespace moeforge::moe {

at::Tensor grouped_matmul(const at::Tensor& x, const at::Tensor& w,
                          const std::vector<int64_t>& rows_per_group);

}  // namespace moeforge::moe

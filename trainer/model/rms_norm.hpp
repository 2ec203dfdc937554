#pragma once
// RMSNorm as one autograd node: y = x · rsqrt(mean(x²) + eps) · weight over the last dimension.
// On the CPU in fp32 / float64 it is one pass per row forward and one backward (at::parallel_for
// over rows, accumulation in the input's type), saving only x and the per-row rstd; the
// composite formula it replaces ran ~7 ops and saved ~4 full-size intermediates. Other devices
// and dtypes (bf16 under autocast, CUDA) take that formula: upcast to fp32, normalise, cast back.
#include <ATen/core/Tensor.h>

namespace moeforge {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

// The composite formula (the reference, and the path for other devices and dtypes).
at::Tensor rms_norm_composite(const at::Tensor& x, const at::Tensor& weight, double eps);

}  // namespace moeforge

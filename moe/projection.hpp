#pragma once
// The layers' projections: x [..., K] · wᵀ (w [N, K], torch's Linear layout) + bias.
//
// CPU fp32 runs as its own autograd node whose forward and backward products go through
// gemm_into (moe/cpu_gemm.hpp), i.e. oneDNN: through at::linear the backward products would
// take ATen's kernel. Other devices and types (and MOEFORGE_CPU_GEMM=aten) are at::linear.
#include <ATen/core/Tensor.h>

namespace moeforge::moe {

at::Tensor projection(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias = {});

}  // namespace moeforge::moe

#pragma once
// Rotary position embedding (Hugging Face rotate_half convention) as one autograd node on the
// projections' own layout [B, S, heads, D]: y₁ = x₁·cos − x₂·sin, y₂ = x₂·cos + x₁·sin for the
// halves x₁ = x[..., :D/2], x₂ = x[..., D/2:]. Backward is the same rotation by −angle. On the CPU
// in fp32 / float64 one pass each way (at::parallel_for over rows, bit-identical to the
// composite); elsewhere the composite formula (views, cat, three elementwise products).
#include <ATen/core/Tensor.h>

namespace moeforge {

// cos and sin of position · frequency for the rotations above: [S, D/2] each, in `dtype`.
struct RotaryTable {
  at::Tensor cos, sin;
  int64_t first_position = -1;
  int64_t positions() const { return cos.defined() ? cos.size(0) : 0; }
};

// The table of positions first_position .. first_position + count - 1; computed in float64 on
// the host (inv_freq [D/2] float64), then cast and moved like `like`.
RotaryTable rotary_table(const at::Tensor& inv_freq, int64_t first_position, int64_t count,
                         const at::Tensor& like);

// x [B, S, heads, D] -> the rotated [B, S, heads, D]; `table` covers the S positions.
at::Tensor rotary_embedding(const at::Tensor& x, const RotaryTable& table);

// The composite formula (the reference, and the path for other devices and dtypes).
at::Tensor rotary_embedding_composite(const at::Tensor& x, const RotaryTable& table);

}  // namespace moeforge

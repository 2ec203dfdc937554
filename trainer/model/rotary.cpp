#include "trainer/model/rotary.hpp"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>

namespace moeforge {
namespace {

constexpr int64_t kGrainRows = 256;  // rows of D values per parallel_for task

// Rotates every row x[b, s, h, :] by position s's angles into y [B, S, heads, D] (contiguous);
// x may be strided (a view of a fused q/k/v projection) with unit stride in D. `sign` −1 is the
// inverse rotation (the backward).
template <typename T>
void rotate_rows(const T* x, at::IntArrayRef strides, const T* cos, const T* sin, T* y,
                 at::IntArrayRef sizes, T sign) {
  const int64_t seq = sizes[1], heads = sizes[2], dim = sizes[3], half = dim / 2;
  at::parallel_for(0, sizes[0] * seq * heads, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t head = r % heads, position = (r / heads) % seq, batch = r / (heads * seq);
      const T* c = cos + position * half;
      const T* s = sin + position * half;
      const T* x1 = x + batch * strides[0] + position * strides[1] + head * strides[2];
      const T* x2 = x1 + half;
      T* y1 = y + r * dim;
      T* y2 = y1 + half;
      for (int64_t i = 0; i < half; ++i) {
        const T ss = sign * s[i];
        y1[i] = x1[i] * c[i] - x2[i] * ss;
        y2[i] = x2[i] * c[i] + x1[i] * ss;
      }
    }
  });
}

at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, double sign) {
  const auto input = x.stride(3) == 1 ? x : x.contiguous();
  auto y = at::empty(input.sizes(), input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rotary_embedding", [&] {
    rotate_rows(input.const_data_ptr<scalar_t>(), input.strides(), cos.const_data_ptr<scalar_t>(),
                sin.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), input.sizes(),
                static_cast<scalar_t>(sign));
  });
  return y;
}

class RotaryFunction : public torch::autograd::Function<RotaryFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& cos, const at::Tensor& sin) {
    ctx->save_for_backward({cos, sin});  // the tables, not x: backward needs no activation
    return rotate(x, cos, sin, 1.0);
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    return {rotate(grads[0], saved[0], saved[1], -1.0), at::Tensor(), at::Tensor()};
  }
};

bool has_fused_kernel(const at::Tensor& x, const RotaryTable& table) {
  const auto type = x.scalar_type();
  return x.device().is_cpu() && (type == at::kFloat || type == at::kDouble) &&
         table.cos.scalar_type() == type && x.dim() == 4 && x.size(3) % 2 == 0 &&
         table.positions() == x.size(1) && table.cos.is_contiguous() && table.sin.is_contiguous();
}

}  // namespace

RotaryTable rotary_table(const at::Tensor& inv_freq, int64_t first_position, int64_t count,
                         const at::Tensor& like) {
  const auto positions = at::arange(first_position, first_position + count, at::kDouble);
  const auto angles = at::outer(positions, inv_freq);  // [S, D/2]
  return {angles.cos().to(like.options()), angles.sin().to(like.options()), first_position};
}

at::Tensor rotary_embedding_composite(const at::Tensor& x, const RotaryTable& table) {
  const int64_t half = x.size(3) / 2;
  // [S, D/2] -> [S, 1, D] against x [B, S, heads, D]
  const auto cos = at::cat({table.cos, table.cos}, -1).unsqueeze(1);
  const auto sin = at::cat({table.sin, table.sin}, -1).unsqueeze(1);
  const auto rotated = at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos + rotated * sin;
}

at::Tensor rotary_embedding(const at::Tensor& x, const RotaryTable& table) {
  if (!has_fused_kernel(x, table)) return rotary_embedding_composite(x, table);
  return RotaryFunction::apply(x, table.cos, table.sin);
}

}  // namespace moeforge

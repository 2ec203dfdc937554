#include "trainer/model/rms_norm.hpp"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>

#include <cmath>

namespace moeforge {
namespace {

// Rows per parallel_for task: a few hundred KiB of work each.
constexpr int64_t kGrainRows = 64;

// Σ a[i]·b[i] with several accumulators, so the loop vectorises without -ffast-math.
template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  T acc[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  T sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

template <typename T>
void forward_rows(const T* x, const T* w, T* y, T* rstd, int64_t rows, int64_t size, double eps) {
  at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * size;
      T* yr = y + r * size;
      const T inv =
          T(1) / std::sqrt(dot(xr, xr, size) / static_cast<T>(size) + static_cast<T>(eps));
      rstd[r] = inv;
      for (int64_t i = 0; i < size; ++i) yr[i] = xr[i] * inv * w[i];
    }
  });
}

// With x̂ = x·rstd and g = dy·w: dx = g·rstd − x·rstd³·mean(g·x), dw = Σ_rows dy·x̂. Each task sums
// its rows' dw into its own row of `partial` (one per thread), summed once at the end.
template <typename T>
void backward_rows(const T* x, const T* w, const T* rstd, const T* dy, T* dx, T* partial,
                   int64_t rows, int64_t size) {
  at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
    T* dw = partial + at::get_thread_num() * size;
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * size;
      const T* dyr = dy + r * size;
      T* dxr = dx + r * size;
      const T inv = rstd[r];
      T acc[8] = {};  // Σ dy·w·x, several accumulators as in dot()
      int64_t i = 0;
      for (; i + 8 <= size; i += 8)
        for (int j = 0; j < 8; ++j) acc[j] += dyr[i + j] * w[i + j] * xr[i + j];
      T gx = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      for (; i < size; ++i) gx += dyr[i] * w[i] * xr[i];
      const T scale = gx * inv * inv * inv / static_cast<T>(size);  // rstd³·mean(g·x)
      for (int64_t k = 0; k < size; ++k) {
        dxr[k] = dyr[k] * w[k] * inv - xr[k] * scale;
        dw[k] += dyr[k] * xr[k] * inv;
      }
    }
  });
}

class RmsNormFunction : public torch::autograd::Function<RmsNormFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, double eps) {
    const auto input = x.contiguous();
    const int64_t size = input.size(-1), rows = input.numel() / std::max<int64_t>(size, 1);
    auto y = at::empty_like(input);
    auto rstd = at::empty({rows}, input.options());
    const auto w = weight.contiguous();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rms_norm_forward", [&] {
      forward_rows(input.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                   y.mutable_data_ptr<scalar_t>(), rstd.mutable_data_ptr<scalar_t>(), rows, size,
                   eps);
    });
    ctx->save_for_backward({input, w, rstd});
    return y;
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &w = saved[1], &rstd = saved[2];
    const auto dy = grads[0].contiguous();
    const int64_t size = x.size(-1), rows = rstd.numel();
    auto dx = at::empty_like(x);
    auto partial = at::zeros({at::get_num_threads(), size}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rms_norm_backward", [&] {
      backward_rows(x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                    rstd.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
                    dx.mutable_data_ptr<scalar_t>(), partial.mutable_data_ptr<scalar_t>(), rows,
                    size);
    });
    return {dx, partial.sum(0), at::Tensor()};
  }
};

bool has_fused_kernel(const at::Tensor& x, const at::Tensor& weight) {
  const auto type = x.scalar_type();
  return x.device().is_cpu() && weight.device().is_cpu() && weight.scalar_type() == type &&
         (type == at::kFloat || type == at::kDouble) && x.size(-1) == weight.numel() &&
         x.numel() > 0;
}

}  // namespace

at::Tensor rms_norm_composite(const at::Tensor& x, const at::Tensor& weight, double eps) {
  // At least fp32 (bf16/f16 inputs are upcast); float64 stays float64 (reference runs).
  const auto type = at::promote_types(x.scalar_type(), at::kFloat);
  const auto xf = x.to(type);
  const auto normed = xf * at::rsqrt(xf.square().mean(-1, true) + eps);
  return (normed * weight.to(type)).to(x.scalar_type());
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  if (!has_fused_kernel(x, weight)) return rms_norm_composite(x, weight, eps);
  return RmsNormFunction::apply(x, weight, eps);
}

}  // namespace moeforge

#include "moe/projection.hpp"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/autograd.h>

#include "moe/cpu_gemm.hpp"

namespace moeforge::moe {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// y = x · wᵀ on [M, K] rows; saves x and w (what at::linear saves too).
class Projection : public torch::autograd::Function<Projection> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w) {
    const auto rows = x.reshape({-1, x.size(-1)});
    auto y = gemm(rows, w.t());
    ctx->save_for_backward({rows, w});
    auto shape = x.sizes().vec();
    shape.back() = w.size(0);
    return y.view(shape);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& rows = saved[0];
    const auto& w = saved[1];
    const auto dy = grads[0].reshape({-1, w.size(0)});
    at::Tensor dx, dw;
    if (ctx->needs_input_grad(0)) {
      auto shape = grads[0].sizes().vec();
      shape.back() = w.size(1);
      dx = gemm(dy, w).view(shape);
    }
    if (ctx->needs_input_grad(1)) dw = gemm(dy.t(), rows);
    return {dx, dw};
  }
};

bool takes_cpu_gemm(const at::Tensor& x, const at::Tensor& w) {
  // Under autocast at::linear would compute in bf16; this node would not.
  return onednn_operand(x) && onednn_operand(w) && w.dim() == 2 && x.dim() >= 1 &&
         !at::autocast::is_autocast_enabled(at::kCPU);
}

}  // namespace

at::Tensor projection(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
  if (!takes_cpu_gemm(x, w)) return at::linear(x, w, bias);
  const auto y = Projection::apply(x, w);
  return bias.defined() ? y + bias : y;
}

}  // namespace moeforge::moe

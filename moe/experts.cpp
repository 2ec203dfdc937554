#include "moe/experts.hpp"

#include <ATen/ATen.h>

#include "moe/compute_precision.hpp"
#include "moe/grouped_matmul.hpp"

namespace moeforge::moe {

at::Tensor swiglu(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                  const at::Tensor& w_down) {
  const auto gate = at::silu(at::matmul(x, w_gate.t()));  // [R, F]
  const auto up = at::matmul(x, w_up.t());                // [R, F]
  return at::matmul(gate * up, w_down.t());               // [R, H]
}

FeedForwardImpl::FeedForwardImpl(int64_t hidden_size, int64_t ffn_size) {
  w_gate = register_parameter("w_gate", at::zeros({ffn_size, hidden_size}));
  w_up = register_parameter("w_up", at::zeros({ffn_size, hidden_size}));
  w_down = register_parameter("w_down", at::zeros({hidden_size, ffn_size}));
}

at::Tensor FeedForwardImpl::forward(const at::Tensor& x) {
  return swiglu(x, w_gate, w_up, w_down);
}

GroupedExpertsImpl::GroupedExpertsImpl(int64_t num_local_experts, int64_t hidden_size,
                                       int64_t ffn_size) {
  w_gate = register_parameter("w_gate", at::zeros({num_local_experts, ffn_size, hidden_size}));
  w_up = register_parameter("w_up", at::zeros({num_local_experts, ffn_size, hidden_size}));
  w_down = register_parameter("w_down", at::zeros({num_local_experts, hidden_size, ffn_size}));
}

at::Tensor GroupedExpertsImpl::forward(const at::Tensor& x,
                                       const std::vector<int64_t>& rows_per_expert) {
  // Same SwiGLU as swiglu(), with every matmul grouped over the local experts; under autocast
  // in its dtype (grouped_matmul is not an autocast op, so the casts are explicit).
  const auto rows = to_compute_dtype(x, x);
  const auto weight = [&](const at::Tensor& w) { return to_compute_dtype(w, x).transpose(1, 2); };
  const auto gate = at::silu(grouped_matmul(rows, weight(w_gate), rows_per_expert));  // [R, F]
  const auto up = grouped_matmul(rows, weight(w_up), rows_per_expert);                // [R, F]
  return grouped_matmul(gate * up, weight(w_down), rows_per_expert);                  // [R, H]
}

}  // namespace moeforge::moe

#include "moe/experts.hpp"

#include <ATen/ATen.h>

#include "moe/compute_precision.hpp"
#include "moe/gathered_experts.hpp"
#include "moe/grouped_matmul.hpp"
#include "parallel/recompute.hpp"

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
  if (!gathered_experts_apply(x)) return swiglu(x, w_gate, w_up, w_down);
  // CPU fp32: the routed experts' kernel with one expert and unit gates (which get no
  // gradient): SwiGLU fused, two [T, F] kept for backward where the composite keeps four.
  const auto rows = x.reshape({-1, x.size(-1)});
  const auto unit_gates = at::ones({rows.size(0)}, rows.options());
  return gated_expert_rows(rows, unit_gates, {rows.size(0)}, w_gate.unsqueeze(0), w_up.unsqueeze(0),
                           w_down.unsqueeze(0), RowCounts::kFixed)
      .view(x.sizes());
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
  const auto weight = [](const at::Tensor& w, const at::Tensor& like) {
    return to_compute_dtype(w, like).transpose(1, 2);
  };
  const auto gate = grouped_matmul(rows, weight(w_gate, x), rows_per_expert);  // [R, F]
  const auto up = grouped_matmul(rows, weight(w_up, x), rows_per_expert);      // [R, F]
  // Captures the parameter, not this module: the region outlives the forward in the graph.
  const parallel::Region activation_and_down =
      [w_down = w_down, weight, rows_per_expert](const std::vector<at::Tensor>& in) {
        const auto& gate = in[0];
        const auto& up = in[1];
        return std::vector<at::Tensor>{
            grouped_matmul(at::silu(gate) * up, weight(w_down, gate), rows_per_expert)};  // [R, H]
      };
  if (!recompute_activation_) return activation_and_down({gate, up})[0];
  return parallel::recompute_in_backward(activation_and_down, {gate, up}, {w_down})[0];
}

}  // namespace moeforge::moe

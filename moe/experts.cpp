#include "moe/experts.hpp"

#include <ATen/ATen.h>

namespace moeforge::moe {

at::Tensor swiglu(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                  const at::Tensor& w_down) {
  const auto gate = at::silu(at::matmul(x, w_gate.t()));  // [R, F]
  const auto up = at::matmul(x, w_up.t());               // [R, F]
  return at::matmul(gate * up, w_down.t());              // [R, H]
}

FeedForwardImpl::FeedForwardImpl(int64_t hidden_size, int64_t ffn_size) {
  w_gate = register_parameter("w_gate", at::zeros({ffn_size, hidden_size}));
  w_up = register_parameter("w_up", at::zeros({ffn_size, hidden_size}));
  w_down = register_parameter("w_down", at::zeros({hidden_size, ffn_size}));
}

at::Tensor FeedForwardImpl::forward(const at::Tensor& x) { return swiglu(x, w_gate, w_up, w_down); }

GroupedExpertsImpl::GroupedExpertsImpl(int64_t num_local_experts, int64_t hidden_size,
                                       int64_t ffn_size) {
  w_gate = register_parameter("w_gate", at::zeros({num_local_experts, ffn_size, hidden_size}));
  w_up = register_parameter("w_up", at::zeros({num_local_experts, ffn_size, hidden_size}));
  w_down = register_parameter("w_down", at::zeros({num_local_experts, hidden_size, ffn_size}));
}

at::Tensor GroupedExpertsImpl::forward(const at::Tensor& x,
                                       const std::vector<int64_t>& rows_per_expert) {
  // CPU path: one GEMM chain per non-empty expert block (GEMMs of a few hundred rows keep the
  // BLAS efficient); the CUDA path replaces this with a grouped GEMM.
  std::vector<at::Tensor> outputs;
  outputs.reserve(rows_per_expert.size());
  int64_t offset = 0;
  for (size_t e = 0; e < rows_per_expert.size(); ++e) {
    const int64_t rows = rows_per_expert[e];
    if (rows == 0) continue;
    outputs.push_back(swiglu(x.narrow(0, offset, rows), w_gate[e], w_up[e], w_down[e]));
    offset += rows;
  }
  if (outputs.empty()) return x.mul(0);  // keeps the graph (and the collectives) connected
  return outputs.size() == 1 ? outputs.front() : at::cat(outputs);
}

}  // namespace moeforge::moe

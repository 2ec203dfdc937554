#pragma once
// SwiGLU feed-forward blocks (spine step 6).
//
// FeedForward: one dense SwiGLU, y = (silu(x·Wgᵀ) ⊙ (x·Wuᵀ))·Wdᵀ, weights in nn.Linear layout
//   (w_gate, w_up [F, H]; w_down [H, F]) so Hugging Face weights copy over unchanged. Used for
//   dense blocks and for the shared experts (n shared experts of size F == one of size n·F).
//   CPU fp32 runs it as gated_expert_rows with one expert and unit gates (moe/gathered_experts).
// GroupedExperts: this rank's E/ep experts stacked ([El, F, H] / [El, H, F]); forward takes rows
//   already grouped in contiguous per-expert blocks and runs them through grouped GEMMs —
//   no per-token loop, no expert ever sees another expert's tokens, nothing of shape [T, E, H].
#include <torch/nn/module.h>

#include <vector>

namespace moeforge::moe {

class FeedForwardImpl : public torch::nn::Module {
 public:
  FeedForwardImpl(int64_t hidden_size, int64_t ffn_size);
  at::Tensor forward(const at::Tensor& x);  // [..., H] -> [..., H]

  at::Tensor w_gate, w_up, w_down;
};
TORCH_MODULE(FeedForward);

class GroupedExpertsImpl : public torch::nn::Module {
 public:
  GroupedExpertsImpl(int64_t num_local_experts, int64_t hidden_size, int64_t ffn_size);

  // x [R, H] with rows_per_expert[e] consecutive rows for local expert e -> [R, H].
  at::Tensor forward(const at::Tensor& x, const std::vector<int64_t>& rows_per_expert);
  // Recompute silu(gate)·up and the second GEMM in backward instead of storing the activation
  // (train.recompute: moe_act): keeps the two [R, F] GEMM outputs instead of four [R, F].
  void set_recompute_activation(bool recompute) { recompute_activation_ = recompute; }

  at::Tensor w_gate, w_up;  // [El, F, H]
  at::Tensor w_down;        // [El, H, F]

 private:
  bool recompute_activation_ = false;
};
TORCH_MODULE(GroupedExperts);

// SwiGLU on one block of rows: the single definition both modules use.
at::Tensor swiglu(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                  const at::Tensor& w_down);

}  // namespace moeforge::moe

#include "trainer/model/flops.hpp"

#include "trainer/model/model.hpp"

namespace moeforge {
namespace {

// Matmul parameters of one block's parts (2 FLOPs per parameter per token in a forward).
struct BlockParams {
  int64_t attention = 0;    // q, k, v, o projections (+ q/k/v biases)
  int64_t mlp_total = 0;    // every parameter of the MLP
  int64_t mlp_active = 0;   // those one token uses
  int64_t expert_down = 0;  // MoE: the down GEMMs of the k routed slots (moe_act recompute)
  int64_t norms = 0;        // not matmuls: in the total only
};

BlockParams block_params(const Config& config, int64_t block) {
  const auto& m = config.model;
  const auto& moe = config.moe;
  const int64_t hidden = m.hidden_size, head_dim = head_dim_of(m);
  const int64_t q_width = m.num_heads * head_dim, kv_width = m.num_kv_heads * head_dim;
  BlockParams p;
  p.attention = hidden * q_width + 2 * hidden * kv_width + q_width * hidden +
                (m.qkv_bias ? q_width + 2 * kv_width : 0);
  p.norms = 2 * hidden + (m.qk_norm ? 2 * head_dim : 0);
  if (!is_moe_block(moe, block)) {
    p.mlp_total = p.mlp_active = 3 * hidden * m.ffn_size;
    return p;
  }
  const int64_t expert = 3 * hidden * moe.expert_ffn_size;
  const int64_t shared = moe.num_shared_experts * 3 * hidden * moe::shared_expert_size(moe);
  const int64_t router = hidden * (moe.num_experts + moe.router.num_null_experts);
  p.mlp_total = router + moe.num_experts * expert + shared;
  p.mlp_active = router + moe.top_k * expert + shared;
  p.expert_down = moe.top_k * hidden * moe.expert_ffn_size;
  return p;
}

// Forward FLOPs per token that train.recompute runs again in one block. A region inside a
// recomputed block runs a third time: once in the forward, once when the block is recomputed
// (without storing), once when its own recompute runs.
double recomputed_forward(const RecomputeConfig& recompute, const BlockParams& p,
                          double attention_core) {
  const double attention = 2.0 * static_cast<double>(p.attention) + attention_core;
  const double mlp = 2.0 * static_cast<double>(p.mlp_active);
  const bool is_moe = p.expert_down > 0;
  double flops = 0.0;
  if (recompute.block) flops += attention + mlp;
  if (recompute.attention) flops += attention;
  if (recompute.moe && is_moe) flops += mlp;
  if (recompute.moe_act && is_moe) flops += 2.0 * static_cast<double>(p.expert_down);
  return flops;
}

}  // namespace

FlopCount count_flops(const Config& config, int64_t seq_len) {
  const auto& m = config.model;
  const int64_t q_width = m.num_heads * head_dim_of(m);
  // Causal half of Q·Kᵀ and P·V: 2 products · 2 FLOPs · S · q_width / 2, per token per layer.
  const double attention_core = 2.0 * static_cast<double>(seq_len * q_width);
  FlopCount count;
  double recompute = 0.0;
  for (int64_t block = 0; block < m.num_layers; ++block) {
    const auto p = block_params(config, block);
    count.total_params += p.attention + p.mlp_total + p.norms;
    count.active_params += p.attention + p.mlp_active;
    recompute += recomputed_forward(config.train.recompute, p, attention_core);
  }
  const int64_t embedding = m.vocab_size * m.hidden_size;
  count.total_params += embedding + m.hidden_size + (m.tie_embeddings ? 0 : embedding);
  count.active_params += embedding;  // the LM head (tied or not)
  count.forward_per_token = 2.0 * static_cast<double>(count.active_params) +
                            attention_core * static_cast<double>(m.num_layers);
  count.training_per_token = 3.0 * count.forward_per_token;
  const auto& aux = config.moe.balancing.aux_loss;
  const bool routing_pre_pass = aux.coeff > 0 && aux.scope == moe::AuxLossScope::kGlobalBatch;
  count.recompute_per_token = recompute + (routing_pre_pass ? count.forward_per_token : 0.0);
  count.hardware_per_token = count.training_per_token + count.recompute_per_token;
  return count;
}

}  // namespace moeforge

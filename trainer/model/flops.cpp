#include "trainer/model/flops.hpp"

#include "trainer/model/model.hpp"

namespace moeforge {

FlopCount count_flops(const Config& config, int64_t seq_len) {
  const auto& m = config.model;
  const auto& moe = config.moe;
  const int64_t hidden = m.hidden_size, head_dim = head_dim_of(m);
  const int64_t q_width = m.num_heads * head_dim, kv_width = m.num_kv_heads * head_dim;
  const int64_t attention = hidden * q_width + 2 * hidden * kv_width + q_width * hidden +
                            (m.qkv_bias ? q_width + 2 * kv_width : 0);
  const int64_t expert = 3 * hidden * moe.expert_ffn_size;
  const int64_t shared = moe.num_shared_experts * 3 * hidden * moe::shared_expert_size(moe);
  const int64_t router = hidden * (moe.num_experts + moe.router.num_null_experts);
  const int64_t norms = 2 * hidden + (m.qk_norm ? 2 * head_dim : 0);
  FlopCount count;
  for (int64_t block = 0; block < m.num_layers; ++block) {
    const bool is_moe = is_moe_block(moe, block);
    const int64_t mlp_total =
        is_moe ? router + moe.num_experts * expert + shared : 3 * hidden * m.ffn_size;
    const int64_t mlp_active =
        is_moe ? router + moe.top_k * expert + shared : 3 * hidden * m.ffn_size;
    count.total_params += attention + mlp_total + norms;
    count.active_params += attention + mlp_active;
  }
  const int64_t embedding = m.vocab_size * hidden;
  count.total_params += embedding + hidden + (m.tie_embeddings ? 0 : embedding);
  count.active_params += embedding;  // the LM head (tied or not)
  const double core =
      2.0 * static_cast<double>(seq_len * q_width) * static_cast<double>(m.num_layers);
  count.forward_per_token = 2.0 * static_cast<double>(count.active_params) + core;
  count.training_per_token = 3.0 * count.forward_per_token;
  return count;
}

}  // namespace moeforge

#pragma once
// The MoE options (the `moe:` section of a config) and the rules derived from them, torch-free:
// which blocks are MoE, the shared-expert size, the capacity formulas. The trainer's config
// embeds MoeConfig; moe/ takes it and nothing else of the trainer.
#include <algorithm>
#include <cmath>
#include <cstdint>

namespace moeforge::moe {

enum class ScoreFunction { kSoftmax, kSigmoid };
enum class Routing { kTokenChoice, kExpertChoice };
enum class AuxLossScope { kMicroBatch, kSequence, kGlobalBatch };
enum class DropPolicy { kProbs, kPosition };  // over-full expert drops lowest gate / latest slot
// What the dispatch all-to-all sends (parallel.dedup_dispatch; moe/token_dispatcher.hpp,
// moe/node_hop.hpp): one row per kept pick, one per (token, EP rank), or one per (token, node)
// fanned out inside the node.
enum class DispatchDedup { kNone, kRank, kNode };

struct RouterConfig {
  ScoreFunction score = ScoreFunction::kSoftmax;
  Routing routing = Routing::kTokenChoice;
  bool normalize_gates = true;   // renormalise the k selected gates to sum to 1
  double scaling_factor = 1.0;   // multiplies the gates
  int64_t num_groups = 0;        // group-limited routing: expert groups (0/1 = off)
  int64_t topk_groups = 0;       // groups a token may use (group-limited routing)
  int64_t num_null_experts = 0;  // AdaMoE zero-compute experts in the top-k pool
  double jitter_eps = 0.0;       // router input × U(1-eps, 1+eps) in training
};

struct AuxLossConfig {
  double coeff = 0.0;
  AuxLossScope scope = AuxLossScope::kMicroBatch;
};

struct ZLossConfig {
  double coeff = 0.0;
};

struct ExpertBiasConfig {
  double rate = 0.0;  // 0 = auxiliary-loss-free balancing off
  bool mean_center = false;
  double final_rate = 0.0;   // rate in the final phase (DeepSeek-V3: 0)
  double final_phase = 0.0;  // fraction of train.steps at the end that use final_rate; 0 = none
};

struct BalancingConfig {
  AuxLossConfig aux_loss;
  ZLossConfig z_loss;
  ExpertBiasConfig expert_bias;
};

struct CapacityConfig {
  double factor = 0.0;       // training; 0 = dropless
  double eval_factor = 0.0;  // evaluation; 0 = dropless
  DropPolicy drop_policy = DropPolicy::kProbs;
  bool pad = false;  // pad every expert's rows to its capacity
};

struct MoeConfig {
  int64_t num_experts = 8;
  int64_t top_k = 2;
  int64_t expert_ffn_size = 256;
  int64_t num_shared_experts = 0;
  int64_t shared_expert_ffn_size = 0;  // 0 = same as expert_ffn_size
  int64_t first_k_dense = 0;           // the first k blocks use a dense FFN
  int64_t layer_freq = 1;              // after those, every layer_freq-th block is MoE
  RouterConfig router;
  BalancingConfig balancing;
  CapacityConfig capacity;
};

// Which blocks are MoE: blocks i >= first_k_dense with (i - first_k_dense) % layer_freq == 0.
inline bool is_moe_block(const MoeConfig& moe, int64_t block) {
  return block >= moe.first_k_dense && (block - moe.first_k_dense) % moe.layer_freq == 0;
}

// Intermediate size of one shared expert (shared_expert_ffn_size, or expert_ffn_size when 0).
inline int64_t shared_expert_size(const MoeConfig& moe) {
  return moe.shared_expert_ffn_size > 0 ? moe.shared_expert_ffn_size : moe.expert_ffn_size;
}

// Token-choice capacity per expert: ceil(factor · T · k / E).
inline int64_t expert_capacity(double factor, int64_t tokens, int64_t top_k, int64_t num_experts) {
  return static_cast<int64_t>(
      std::ceil(factor * static_cast<double>(tokens * top_k) / static_cast<double>(num_experts)));
}

// Expert-choice capacity C = min(T, ceil(factor · T · k / E)), factor 0 meaning 1.
inline int64_t expert_choice_capacity(double factor, int64_t tokens, int64_t top_k,
                                      int64_t num_experts) {
  return std::min(tokens, expert_capacity(factor > 0 ? factor : 1.0, tokens, top_k, num_experts));
}

// The capacity factor a layer applies: `factor` in training; in evaluation `eval_factor`
// (0 = dropless for token choice). Expert choice always needs a factor, so in evaluation it
// falls back to the training factor when eval_factor is 0.
inline double capacity_factor(const CapacityConfig& capacity, Routing routing, bool training) {
  if (training) return capacity.factor;
  if (routing == Routing::kExpertChoice && capacity.eval_factor <= 0) return capacity.factor;
  return capacity.eval_factor;
}

}  // namespace moeforge::moe

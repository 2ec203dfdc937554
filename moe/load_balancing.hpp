#pragma once
// Loss-based load balancing and routing telemetry (spine step 2).
//
//   aux loss (Switch / GShard):  E · Σ_i f_i · P_i
//     f_i = fraction of the T·k routed slots that picked expert i (no gradient),
//     P_i = mean over tokens of the token's normalised score for expert i (softmax scores
//           already sum to 1; sigmoid scores are divided by their per-token sum, DeepSeek-V3).
//     scope micro_batch: over all T tokens of this rank's micro-batch;
//     scope sequence:    computed per sequence of `seq_len` tokens, then averaged.
//     A perfectly uniform router gives exactly 1.
//   z-loss: mean over tokens of logsumexp(logits)².
#include <ATen/core/Tensor.h>

#include <string>

namespace moeforge::moe {

// scores [T, E] (differentiable), expert_ids [T, k]; seq_len is used for scope "sequence".
at::Tensor aux_loss(const at::Tensor& scores, const at::Tensor& expert_ids, int64_t num_experts,
                    const std::string& scope, int64_t seq_len);

// logits [T, E] -> scalar.
at::Tensor z_loss(const at::Tensor& logits);

// Routed slots per expert: [E] int64 (before capacity drops).
at::Tensor expert_load(const at::Tensor& expert_ids, int64_t num_experts);

// MaxVio = max_i load_i / mean(load) - 1 (0 for a perfectly balanced load, 0 for no tokens).
double max_violation(const at::Tensor& load);

// Mean over tokens of the entropy (nats) of the normalised routing distribution.
double router_entropy(const at::Tensor& scores);

}  // namespace moeforge::moe

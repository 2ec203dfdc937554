#pragma once
// Loss-based load balancing and routing telemetry (spine step 2).
//
//   aux loss (Switch / GShard / DeepSeek):  P · Σ_i f_i · p_i   over the routing pool of P experts
//     f_i = fraction of the selected routed slots that picked expert i (no gradient),
//     p_i = mean over tokens of the token's normalised score for expert i (softmax scores
//           already sum to 1; sigmoid scores are divided by their per-token sum, DeepSeek-V3).
//     scope micro_batch:  f and p over this rank's micro-batch;
//     scope sequence:     f and p per sequence of `seq_len` tokens, loss averaged over sequences;
//     scope global_batch: f over the whole global batch (all micro-batches of all data-parallel
//                         ranks, supplied by the trainer), p over this micro-batch: the mean of
//                         the micro-batch losses is exactly P · Σ f_global · p_global.
//     A perfectly uniform router gives exactly 1.
//   z-loss: mean over tokens of logsumexp(logits)².
#include <ATen/core/Tensor.h>

#include "moe/moe_config.hpp"

namespace moeforge::moe {

// scores [T, P] (differentiable); expert_ids [T, k]; selected [T, k] bool or undefined (= all).
// seq_len is used by scope "sequence"; global_fraction [P] by scope "global_batch" (undefined
// there = this micro-batch's own fraction, which is the global one for 1 rank × 1 micro-batch).
at::Tensor aux_loss(const at::Tensor& scores, const at::Tensor& expert_ids,
                    const at::Tensor& selected, AuxLossScope scope, int64_t seq_len,
                    const at::Tensor& global_fraction = {});

// logits [T, P] -> scalar.
at::Tensor z_loss(const at::Tensor& logits);

// Selected routed slots per pool expert: [pool] int64 (before capacity drops), on the ids'
// device, without a host synchronisation.
at::Tensor expert_load(const at::Tensor& expert_ids, const at::Tensor& selected, int64_t pool);

// How many entries of `ids` (any shape, int64 in [0, n)) hold each value, counting entry i
// weight[i] times (undefined weight = once each): [n] int64 on the ids' device. Unlike
// at::bincount it never reads the data on the host (bincount sizes its result from max(ids)).
at::Tensor count_ids(const at::Tensor& ids, int64_t n, const at::Tensor& weight = {});

// MaxVio = max_i load_i / mean(load) - 1 (0 for a perfectly balanced load, 0 for no tokens).
double max_violation(const at::Tensor& load);
// The same as a 0-dim float64 tensor on the load's device (no host synchronisation).
at::Tensor max_violation_tensor(const at::Tensor& load);

// Mean over tokens of the entropy (nats) of the normalised routing distribution: 0-dim float64
// on the scores' device.
at::Tensor router_entropy(const at::Tensor& scores);

}  // namespace moeforge::moe

#pragma once
// Routing-analysis metrics (`moeforge analyze`, docs/routing_analysis.md): pure functions of the
// routing captured on a probe set, so each can be checked on synthetic routers whose answers
// are known. Every tensor here is on the CPU; N = probe tokens, P = routing pool (E real experts,
// then null experts), E = real experts.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace moeforge {

// One MoE layer's routing of the N probe tokens (moe::RoutingRecord, concatenated over batches).
struct RoutingCapture {
  at::Tensor expert_ids;   // [N, k] int64 pool ids
  at::Tensor selected;     // [N, k] bool: a real pick
  at::Tensor kept;         // [N, k] bool: dispatched (not dropped by capacity, not a null expert)
  at::Tensor output_norm;  // [N, k] float: the expert's output norm for kept slots, else 0
};

// The set of experts each token picked: [N, P] bool (top-k order does not matter).
at::Tensor chosen_sets(const RoutingCapture& capture, int64_t pool_size);

// Fraction of the N tokens whose expert set is identical in `a` and `b` ([N, P] bool each).
// 1.0 = the same routing; a token counts as changed if any of its k picks changed.
double routing_stability(const at::Tensor& sets_a, const at::Tensor& sets_b);

// Fraction of tokens whose sets are identical in every layer (one [N, P] per layer each).
double all_layer_stability(const std::vector<at::Tensor>& sets_a,
                           const std::vector<at::Tensor>& sets_b);

// I(token id; expert) over the (token, picked expert) pairs — one pair per selected slot — by
// the plug-in estimator (empirical joint distribution), in bits. I ≤ min(H(token), H(expert)):
// a router deciding by token identity alone reaches H(expert) − H(expert | token), which is
// H(token) when it maps token ids one to one onto experts with k = 1. The plug-in estimate is
// biased upward by about (V' − 1)(E' − 1) / (2 · pairs · ln 2) bits (Miller–Madow; V', E' the
// token ids and experts seen): `bias_bits`, beside the estimate, says how much of I is noise.
struct TokenExpertInformation {
  double mi_bits = 0.0;
  double token_entropy_bits = 0.0;   // H(token), pair-weighted (= token frequency entropy)
  double expert_entropy_bits = 0.0;  // H(expert) over the pairs
  double bias_bits = 0.0;            // expected plug-in bias for independent variables
  int64_t pairs = 0;
  int64_t distinct_tokens = 0;
};
TokenExpertInformation token_expert_information(const at::Tensor& tokens, const at::Tensor& sets);

// Which experts are chosen together by consecutive layers: counts[i, j] = tokens that picked
// expert i at the first layer and j at the next (k_a · k_b pairs per token), normalised to the
// joint distribution. lift = joint / (row marginal · column marginal): 1 = as often as
// independent routing would pair them, > 1 = more. `mi_bits` = I(expert at l; expert at l+1).
struct CoRouting {
  at::Tensor joint;  // [P, P] float64, sums to 1
  at::Tensor lift;   // [P, P] float64; 0 where a marginal is 0
  double mi_bits = 0.0;
};
CoRouting co_routing(const at::Tensor& sets_first, const at::Tensor& sets_next);

// Per real expert: mean and max output norm over the slots it processed. "Super experts":
// experts whose mean norm exceeds median + mad_k · 1.4826 · MAD over the experts that processed
// any slot (1.4826·MAD estimates σ for normal data, robust to the outliers themselves).
struct ExpertMagnitudes {
  std::vector<double> mean_norm, max_norm;  // [E]; 0 for an expert that got no slot
  std::vector<int64_t> rows;                // [E] kept slots processed
  double median = 0.0, mad = 0.0, threshold = 0.0;
  std::vector<int64_t> super_experts;  // ids, by descending mean norm
};
ExpertMagnitudes expert_magnitudes(const RoutingCapture& capture, int64_t num_experts,
                                   double mad_k);

// Where in the sequence capacity drops happen: per position p (0 .. seq_len−1), the slots to
// real experts of tokens at p (`routed`) and how many of them were dropped (`dropped`).
// `positions` [N] int64: each token's position in its sequence.
struct DropPositions {
  std::vector<int64_t> routed, dropped;
};
DropPositions drop_positions(const RoutingCapture& capture, const at::Tensor& positions,
                             int64_t seq_len, int64_t num_experts);

// Shannon entropy in bits of counts (any shape, non-negative).
double entropy_bits(const at::Tensor& counts);

}  // namespace moeforge

#include "trainer/inference/routing_analysis.hpp"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

namespace moeforge {
namespace {

// How often each distinct value of `keys` [M] int64 occurs.
at::Tensor value_counts(const at::Tensor& keys) {
  if (keys.numel() == 0) return at::zeros({0}, at::kLong);
  return std::get<2>(at::unique_consecutive(std::get<0>(keys.sort()), false, true));
}

std::vector<double> to_vector(const at::Tensor& t) {
  const auto d = t.to(at::kDouble).contiguous();
  return {d.data_ptr<double>(), d.data_ptr<double>() + d.numel()};
}

std::vector<int64_t> to_int_vector(const at::Tensor& t) {
  const auto d = t.to(at::kLong).contiguous();
  return {d.data_ptr<int64_t>(), d.data_ptr<int64_t>() + d.numel()};
}

double median_of(std::vector<double> values) {
  if (values.empty()) return 0.0;
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

}  // namespace

double entropy_bits(const at::Tensor& counts) {
  const auto c = counts.to(at::kDouble).reshape({-1});
  const double total = c.sum().item<double>();
  if (total <= 0) return 0.0;
  const auto p = c.masked_select(c > 0) / total;
  return -(p * p.log2()).sum().item<double>();
}

at::Tensor chosen_sets(const RoutingCapture& capture, int64_t pool_size) {
  // Summed, not scattered: a set stays right even if a synthetic router repeats an id.
  const auto& ids = capture.expert_ids;
  return at::zeros({ids.size(0), pool_size}, at::kLong)
             .scatter_add_(1, ids, capture.selected.to(at::kLong)) > 0;
}

double routing_stability(const at::Tensor& sets_a, const at::Tensor& sets_b) {
  if (sets_a.size(0) == 0) return 1.0;
  return (sets_a == sets_b).all(1).to(at::kDouble).mean().item<double>();
}

double all_layer_stability(const std::vector<at::Tensor>& sets_a,
                           const std::vector<at::Tensor>& sets_b) {
  if (sets_a.empty() || sets_a.front().size(0) == 0) return 1.0;
  auto same = at::ones({sets_a.front().size(0)}, at::kBool);
  for (size_t l = 0; l < sets_a.size(); ++l) same &= (sets_a[l] == sets_b[l]).all(1);
  return same.to(at::kDouble).mean().item<double>();
}

TokenExpertInformation token_expert_information(const at::Tensor& tokens, const at::Tensor& sets) {
  TokenExpertInformation info;
  const auto pairs = sets.nonzero();  // [M, 2] (token index, expert)
  info.pairs = pairs.size(0);
  if (info.pairs == 0) return info;
  const auto token = tokens.index_select(0, pairs.select(1, 0));
  const auto expert = pairs.select(1, 1);
  const auto token_counts = value_counts(token);
  const auto expert_counts = value_counts(expert);
  info.distinct_tokens = token_counts.numel();
  info.token_entropy_bits = entropy_bits(token_counts);
  info.expert_entropy_bits = entropy_bits(expert_counts);
  const double joint = entropy_bits(value_counts(token * sets.size(1) + expert));
  // I = H(T) + H(E) − H(T, E); clamp the rounding residue of an exact 0.
  info.mi_bits = std::max(0.0, info.token_entropy_bits + info.expert_entropy_bits - joint);
  info.bias_bits = static_cast<double>((info.distinct_tokens - 1) * (expert_counts.numel() - 1)) /
                   (2.0 * static_cast<double>(info.pairs) * std::log(2.0));
  return info;
}

CoRouting co_routing(const at::Tensor& sets_first, const at::Tensor& sets_next) {
  CoRouting result;
  const auto counts = sets_first.to(at::kDouble).t().mm(sets_next.to(at::kDouble));  // [P, P]
  const double total = counts.sum().item<double>();
  result.joint = total > 0 ? counts / total : counts;
  const auto rows = result.joint.sum(1), cols = result.joint.sum(0);
  const auto independent = rows.unsqueeze(1) * cols.unsqueeze(0);
  result.lift = at::where(independent > 0, result.joint / independent.clamp_min(1e-300),
                          at::zeros_like(independent));
  result.mi_bits =
      std::max(0.0, entropy_bits(rows) + entropy_bits(cols) - entropy_bits(result.joint));
  return result;
}

ExpertMagnitudes expert_magnitudes(const RoutingCapture& capture, int64_t num_experts,
                                   double mad_k) {
  const auto real = capture.kept & (capture.expert_ids < num_experts);
  const auto ids = capture.expert_ids.masked_select(real);
  const auto norms = capture.output_norm.to(at::kDouble).masked_select(real);
  const auto rows = at::bincount(ids, {}, num_experts);
  const auto sums = at::bincount(ids, norms, num_experts);
  const auto maxima =
      at::zeros({num_experts}, at::kDouble).scatter_reduce(0, ids, norms, "amax", true);
  ExpertMagnitudes m;
  m.rows = to_int_vector(rows);
  m.mean_norm = to_vector(sums / rows.clamp_min(1).to(at::kDouble));
  m.max_norm = to_vector(maxima);
  std::vector<double> active;
  for (int64_t e = 0; e < num_experts; ++e)
    if (m.rows[e] > 0) active.push_back(m.mean_norm[e]);
  m.median = median_of(active);
  for (auto& v : active) v = std::abs(v - m.median);
  m.mad = median_of(active);
  m.threshold = m.median + mad_k * 1.4826 * m.mad;
  // Strictly above both: with MAD 0 (most experts equal) only a larger one is an outlier.
  for (int64_t e = 0; e < num_experts; ++e)
    if (m.rows[e] > 0 && m.mean_norm[e] > m.threshold && m.mean_norm[e] > m.median)
      m.super_experts.push_back(e);
  std::sort(m.super_experts.begin(), m.super_experts.end(),
            [&m](int64_t a, int64_t b) { return m.mean_norm[a] > m.mean_norm[b]; });
  return m;
}

DropPositions drop_positions(const RoutingCapture& capture, const at::Tensor& positions,
                             int64_t seq_len, int64_t num_experts) {
  const auto routed = capture.selected & (capture.expert_ids < num_experts);
  const auto dropped = routed & capture.kept.logical_not();
  const auto where = positions.unsqueeze(1).expand_as(capture.expert_ids);
  return {to_int_vector(at::bincount(where.masked_select(routed), {}, seq_len)),
          to_int_vector(at::bincount(where.masked_select(dropped), {}, seq_len))};
}

}  // namespace moeforge

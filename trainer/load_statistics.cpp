#include "trainer/load_statistics.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace moeforge {

LoadSpread load_spread(const std::vector<int64_t>& tokens_per_expert) {
  LoadSpread spread;
  if (tokens_per_expert.empty()) return spread;
  const auto [low, high] = std::minmax_element(tokens_per_expert.begin(), tokens_per_expert.end());
  spread.min = static_cast<double>(*low);
  spread.max = static_cast<double>(*high);
  const double n = static_cast<double>(tokens_per_expert.size());
  const double mean = static_cast<double>(std::accumulate(tokens_per_expert.begin(),
                                                          tokens_per_expert.end(), int64_t{0})) /
                      n;
  if (mean <= 0) return spread;
  double squares = 0.0;
  for (const auto count : tokens_per_expert)
    squares += (static_cast<double>(count) - mean) * (static_cast<double>(count) - mean);
  spread.cv = std::sqrt(squares / n) / mean;
  return spread;
}

double percentile(std::vector<double> values, double q) {
  if (values.empty()) return 0.0;
  std::sort(values.begin(), values.end());
  const double rank = q / 100.0 * static_cast<double>(values.size() - 1);
  const auto below = static_cast<size_t>(std::floor(rank));
  const size_t above = std::min(below + 1, values.size() - 1);
  return values[below] + (rank - static_cast<double>(below)) * (values[above] - values[below]);
}

void summarize_layers(StepMetrics& m) {
  if (m.layers.empty()) return;
  std::vector<double> max_vio, cv;
  double dropped = 0.0, null_slots = 0.0;
  for (const auto& layer : m.layers) {
    max_vio.push_back(layer.max_vio);
    cv.push_back(layer.load_cv);
    dropped += layer.dropped_frac;
    null_slots += layer.null_frac;
    m.bias_abs_max = std::max(m.bias_abs_max, layer.bias_abs_max);
  }
  m.max_vio_p50 = percentile(max_vio, 50);
  m.max_vio_p90 = percentile(max_vio, 90);
  m.load_cv_p50 = percentile(cv, 50);
  m.load_cv_p90 = percentile(cv, 90);
  m.load_cv_max = percentile(cv, 100);
  const double layers = static_cast<double>(m.layers.size());
  m.dropped_frac = dropped / layers;
  m.null_frac = null_slots / layers;
}

}  // namespace moeforge

#pragma once
// Expert-load statistics derived from the routed tokens per expert: the spread of one MoE
// layer's load, and the spread of the per-layer figures across a model's MoE layers.
#include <cstdint>
#include <vector>

#include "trainer/metrics.hpp"

namespace moeforge {

// Min, max and coefficient of variation (population std / mean) of tokens per expert.
// All zero when no token was routed.
struct LoadSpread {
  double min = 0.0, max = 0.0, cv = 0.0;
};
LoadSpread load_spread(const std::vector<int64_t>& tokens_per_expert);

// The q-th percentile (q in [0, 100]) with linear interpolation between the closest ranks
// (numpy.percentile's default); 0 for no values.
double percentile(std::vector<double> values, double q);

// Fills `m`'s across-layer fields from m.layers (whose per-layer fields are set): percentiles
// of MaxVio and CV, means of the dropped and null fractions, the largest bias magnitude.
void summarize_layers(StepMetrics& m);

}  // namespace moeforge

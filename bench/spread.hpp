#pragma once
// The median of interleaved benchmark rounds with their range: what every ratio table prints.
#include <algorithm>
#include <vector>

namespace moeforge::bench {

struct Spread {
  double median, min, max;
};

inline Spread spread_of(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return {values[values.size() / 2], values.front(), values.back()};
}

}  // namespace moeforge::bench

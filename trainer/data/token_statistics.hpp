#pragma once
// Token counts of an indexed dataset, computed in one pass and cached beside it
// (PREFIX.moeforge-stats.json, keyed by the .bin's size and modification time), so the
// vocabulary check and the unigram entropy cost one scan per dataset, not one per run.
#include <cstdint>
#include <vector>

#include "trainer/data/indexed_dataset.hpp"

namespace moeforge {

struct TokenStatistics {
  int64_t min_token = 0, max_token = -1;
  std::vector<int64_t> counts;  // counts[id] for id in [0, max_token]
};

// The cache is rewritten when missing or stale; a cache that cannot be written (read-only
// storage) only costs the scan again next time.
TokenStatistics token_statistics(const IndexedDataset& data);

}  // namespace moeforge

#pragma once
// What a run says about itself before its first step: what it trains (parameters, total and
// active per token), on what (tokens per step, the dataset's size and the epochs the run will
// make), how (ranks, precision, sharding) and with what memory; plus the notes the config
// loader made (values it adjusted) and anything unusual (resuming, extending a finished run).
#include <cstdint>
#include <string>

#include "trainer/config/config.hpp"
#include "trainer/data/data.hpp"
#include "trainer/optim/optimizer.hpp"

namespace moeforge {

struct RunShape {
  int world_size = 1;
  int ep_size = 1;
  int64_t start_step = 0;  // 0, or the step a resumed run continues from
  int64_t end_step = 0;    // where this invocation stops
};

// Several lines, no trailing newline.
std::string run_banner(const Config& config, const TokenDataset& data, const AdamW& optimizer,
                       const RunShape& shape);

}  // namespace moeforge

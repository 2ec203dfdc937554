#pragma once
// Loss, perplexity and routing statistics of a model on a dataset (`moeforge eval`).
// Collective over `world`: each round, every rank evaluates its micro-batch of windows —
// the same windows, in the same order, as the trainer's validation (round r, rank q: windows
// (r·world + q)·mbs ..), so eval of the validation split with as many windows as the trainer
// uses reproduces its validation loss. The last round is filled up with windows that count for
// nothing, so any number of windows works at any world size and ep_size.
#include <c10/core/Device.h>

#include <cstdint>
#include <vector>

#include "parallel/communicator.hpp"
#include "trainer/config/config.hpp"
#include "trainer/data/data.hpp"
#include "trainer/model/model.hpp"

namespace moeforge {

enum class EvalSplit { kValidation, kTrain, kAll };

struct EvalOptions {
  EvalSplit split = EvalSplit::kValidation;
  int64_t max_windows = 0;  // per split; 0 = every window of the split
  int64_t micro_batch_size = 4;
  int64_t seq_len = 128;
};

struct LayerRouting {
  int64_t block = 0;
  std::vector<int64_t> load;  // routed slots per global expert over every evaluated token
  double max_vio = 0.0;       // (max load − mean) / mean
  double router_entropy = 0.0;
  double dropped_frac = 0.0;  // of the slots routed to real experts
};

struct EvalResult {
  double loss = 0.0;        // mean cross-entropy per predicted token (nats)
  double perplexity = 0.0;  // exp(loss)
  int64_t tokens = 0;       // predicted tokens counted
  int64_t windows = 0;      // sequences evaluated
  std::vector<LayerRouting> layers;
};

EvalResult evaluate_model(DecoderLMImpl& model, const Config& config, const TokenDataset& data,
                          const EvalOptions& options, parallel::Communicator& world,
                          const c10::Device& device);

}  // namespace moeforge

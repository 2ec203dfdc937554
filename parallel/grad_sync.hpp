#pragma once
// Data-parallel gradient synchronisation in flattened buckets (not one collective per tensor).
//
// The loss on each rank is the mean over that rank's tokens, so the data-parallel gradient is
// the mean over the W ranks. Non-expert gradients: all-reduce-sum over world, divide by W.
// Expert gradients already hold the contributions of every rank in the EP group (they came back
// through the all-to-all), so: all-reduce-sum over the EDP group, divide by W (not by the EDP
// size). Both sets therefore equal the single-process gradient of the mean loss.
#include <ATen/core/Tensor.h>

#include <vector>

#include "parallel/communicator.hpp"

namespace moeforge::parallel {

class GradientSynchronizer {
 public:
  // `bucket_bytes`: flatten gradients of one dtype up to this many bytes per collective.
  GradientSynchronizer(std::vector<at::Tensor> parameters, Communicator& group, int world_size,
                       int64_t bucket_bytes);

  // Sums every parameter's .grad() over the group and divides by world_size, in place.
  // Parameters without a gradient get a zero gradient first (so all ranks send equal buckets).
  void synchronize();

  int64_t num_buckets() const { return static_cast<int64_t>(buckets_.size()); }

 private:
  std::vector<at::Tensor> parameters_;
  std::vector<std::vector<size_t>> buckets_;  // indices into parameters_
  Communicator& group_;
  int world_size_;
};

}  // namespace moeforge::parallel

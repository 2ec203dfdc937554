#pragma once
// Data-parallel gradient synchronisation in flattened buckets (not one collective per tensor).
//
// The loss on each rank is the mean over that rank's tokens, so the data-parallel gradient is
// the mean over the W ranks. Non-expert gradients: all-reduce-sum over world, divide by W.
// Expert gradients already hold the contributions of every rank in the EP group (they came back
// through the all-to-all), so: all-reduce-sum over the EDP group, divide by W (not by the EDP
// size). Both sets therefore equal the single-process gradient of the mean loss.
//
// Overlap (when constructed with overlap = true): buckets are filled in reverse parameter order
// (roughly the order backward produces gradients). Hooks on each parameter's gradient
// accumulator count finished gradients during a backward armed by prepare_for_backward(); a
// bucket whose gradients are all final is all-reduced at once, asynchronously, while backward
// goes on. Buckets are launched strictly in bucket order, so every rank issues the same
// collectives in the same order. synchronize() launches what is left and waits.
#include <ATen/core/Tensor.h>

#include <memory>
#include <vector>

#include "parallel/communicator.hpp"

namespace torch::autograd {
struct Node;
}

namespace moeforge::parallel {

class GradientSynchronizer {
 public:
  // `bucket_bytes`: flatten gradients of one dtype up to this many bytes per collective.
  GradientSynchronizer(std::vector<at::Tensor> parameters, Communicator& group, int world_size,
                       int64_t bucket_bytes, bool overlap = false);

  // Arms the hooks for the next backward (the last micro-batch of an optimizer step).
  void prepare_for_backward();

  // Sums every parameter's .grad() over the group and divides by world_size, in place.
  // Parameters without a gradient get a zero gradient first (so all ranks send equal buckets).
  void synchronize();

  // Buckets launched during the last armed backward (before synchronize()).
  int64_t launched_during_backward() const { return launched_during_backward_; }

 private:
  void on_gradient_ready(size_t bucket);
  void launch(size_t bucket);
  void finish(size_t bucket);

  std::vector<at::Tensor> parameters_;
  std::vector<std::vector<size_t>> buckets_;  // indices into parameters_
  Communicator& group_;
  int world_size_;
  bool overlap_;
  bool armed_ = false;
  std::vector<size_t> pending_;  // per bucket: gradients not yet final in this backward
  size_t next_launch_ = 0;
  std::vector<at::Tensor> flat_;
  std::vector<Work> work_;
  int64_t launched_during_backward_ = 0;
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators_;  // keep hooks alive
};

}  // namespace moeforge::parallel

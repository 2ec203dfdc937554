#pragma once
// Data-parallel gradient synchronisation in flattened buckets (not one collective per tensor).
//
// The loss on each rank is the mean over that rank's tokens, so the data-parallel gradient is
// the mean over the W ranks. Non-expert gradients: summed over world, divided by W. Expert
// gradients already hold the contributions of every rank in the EP group (they came back
// through the all-to-all), so: summed over the EDP group, divided by W (not by the EDP size).
// Both sets therefore equal the single-process gradient of the mean loss.
//
// fp32 gradients: a parameter stored in a 16-bit type (train.precision: bf16) gets an fp32
// gradient buffer; each backward's bf16 gradient is added into it as soon as it is final and
// then released, so micro-batches accumulate in fp32 (Megatron's main_grad).
//
// Sharded (parallel.distributed_optimizer, ZeRO-1; layout in parallel/shard_layout.hpp): each
// bucket is reduce-scattered instead of all-reduced, every member keeps the averaged gradient
// of its own chunk of each parameter, and after the optimizer updated those chunks
// all_gather_parameters() brings every member's chunks back into the parameters.
//
// Overlap (options.overlap): buckets are filled in reverse parameter order (roughly the order
// backward produces gradients). Hooks on each parameter's gradient accumulator count finished
// gradients during a backward armed by prepare_for_backward(); a bucket whose gradients are all
// final is reduced at once, asynchronously, while backward goes on. Buckets are launched
// strictly in bucket order, so every rank issues the same collectives in the same order.
// synchronize() launches what is left and waits.
#include <ATen/core/Tensor.h>

#include <memory>
#include <vector>

#include "parallel/communicator.hpp"

namespace torch::autograd {
struct Node;
}

namespace moeforge::parallel {

struct GradSyncOptions {
  int64_t bucket_bytes = 25 << 20;  // flatten gradients up to this many bytes per collective
  bool overlap = false;             // reduce buckets during the last backward (see above)
  bool shard = false;               // ZeRO-1: reduce-scatter, keep this member's chunks
  bool reduce_in_bf16 = false;      // communicate bf16 (half the bytes; sums rounded to bf16)
};

class GradientSynchronizer {
 public:
  GradientSynchronizer(std::vector<at::Tensor> parameters, Communicator& group, int world_size,
                       GradSyncOptions options);

  // Arms the hooks for the next backward (the last micro-batch of an optimizer step).
  void prepare_for_backward();

  // Averages every gradient over the data-parallel ranks (see above). Parameters without a
  // gradient count as zero (so all ranks send equal buckets).
  void synchronize();

  // After synchronize(): parameter i's averaged gradient — the whole tensor, or when sharded
  // this member's chunk ([chunk_elements], zero-padded). fp32 for 16-bit parameters. Writable:
  // clipping scales it in place.
  const at::Tensor& gradient(size_t i) const { return synced_[i]; }

  // Forgets every gradient before the next step's first backward.
  void zero_grad();

  // Sharded: `chunks[i]` is this member's updated chunk of parameter i (any dtype); every
  // member's chunks are gathered, bucket by bucket, into the parameters.
  void all_gather_parameters(const std::vector<at::Tensor>& chunks);

  Communicator& group() const { return group_; }
  const std::vector<at::Tensor>& parameters() const { return parameters_; }
  // Buckets launched during the last armed backward (before synchronize()).
  int64_t launched_during_backward() const { return launched_during_backward_; }

 private:
  void assign_buckets(int64_t bucket_bytes);
  void install_hooks();
  void on_gradient(size_t index, size_t bucket);
  at::ScalarType gradient_type(size_t index) const;  // fp32 for 16-bit parameters
  // The gradient backward accumulates for parameter i: fp32 buffer or the parameter's .grad.
  at::Tensor& accumulated(size_t index);
  void launch(size_t bucket);
  void finish(size_t bucket);

  std::vector<at::Tensor> parameters_;
  std::vector<bool> fp32_buffer_;             // per parameter: accumulates into fp32_grads_
  std::vector<at::Tensor> fp32_grads_;        // defined once its first gradient arrived
  std::vector<at::Tensor> synced_;            // per parameter: see gradient()
  std::vector<std::vector<size_t>> buckets_;  // indices into parameters_, one parameter dtype
  Communicator& group_;
  int world_size_;
  GradSyncOptions options_;
  bool armed_ = false;
  std::vector<size_t> pending_;  // per bucket: gradients not yet final in this backward
  size_t next_launch_ = 0;
  std::vector<Work> work_;
  int64_t launched_during_backward_ = 0;
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators_;  // keep hooks alive
};

}  // namespace moeforge::parallel

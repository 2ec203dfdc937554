#include "parallel/grad_sync.hpp"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>

#include "parallel/shard_layout.hpp"

namespace moeforge::parallel {
namespace {

bool is_16_bit(at::ScalarType type) {
  return type == at::kBFloat16 || type == at::kHalf;
}

}  // namespace

GradientSynchronizer::GradientSynchronizer(std::vector<at::Tensor> parameters, Communicator& group,
                                           int world_size, GradSyncOptions options)
    : parameters_(std::move(parameters)),
      group_(group),
      world_size_(world_size),
      options_(options) {
  for (const auto& p : parameters_) fp32_buffer_.push_back(is_16_bit(p.scalar_type()));
  fp32_grads_.resize(parameters_.size());
  synced_.resize(parameters_.size());
  assign_buckets(options_.bucket_bytes);
  work_.resize(buckets_.size());
  pending_.assign(buckets_.size(), 0);
  install_hooks();
}

void GradientSynchronizer::assign_buckets(int64_t bucket_bytes) {
  int64_t bytes_in_bucket = 0;
  for (size_t r = 0; r < parameters_.size(); ++r) {
    const size_t i = parameters_.size() - 1 - r;  // reverse order: backward's order, roughly
    const auto& p = parameters_[i];
    const int64_t bytes = p.numel() * (fp32_buffer_[i] ? 4 : p.element_size());
    // One parameter dtype per bucket (so one gradient dtype too): the all-gather of a sharded
    // bucket then travels in that dtype.
    const bool same_dtype =
        !buckets_.empty() && parameters_[buckets_.back().front()].scalar_type() == p.scalar_type();
    if (buckets_.empty() || !same_dtype || bytes_in_bucket + bytes > bucket_bytes) {
      buckets_.emplace_back();
      bytes_in_bucket = 0;
    }
    buckets_.back().push_back(i);
    bytes_in_bucket += bytes;
  }
}

at::ScalarType GradientSynchronizer::gradient_type(size_t index) const {
  return fp32_buffer_[index] ? at::kFloat : parameters_[index].scalar_type();
}

void GradientSynchronizer::install_hooks() {
  std::vector<size_t> bucket_of(parameters_.size());
  for (size_t b = 0; b < buckets_.size(); ++b)
    for (size_t i : buckets_[b]) bucket_of[i] = b;
  for (size_t i = 0; i < parameters_.size(); ++i) {
    if (!parameters_[i].requires_grad() || !(options_.overlap || fp32_buffer_[i])) continue;
    // Runs after the gradient has been accumulated into .grad.
    auto accumulator = torch::autograd::impl::grad_accumulator(parameters_[i]);
    const size_t bucket = bucket_of[i];
    accumulator->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
        [this, i, bucket](const torch::autograd::variable_list& outputs,
                          const torch::autograd::variable_list&) {
          on_gradient(i, bucket);
          return outputs;
        }));
    accumulators_.push_back(std::move(accumulator));
  }
}

void GradientSynchronizer::prepare_for_backward() {
  if (!options_.overlap) return;
  armed_ = true;
  next_launch_ = 0;
  launched_during_backward_ = 0;
  for (size_t b = 0; b < buckets_.size(); ++b) pending_[b] = buckets_[b].size();
}

void GradientSynchronizer::on_gradient(size_t index, size_t bucket) {
  if (fp32_buffer_[index]) {  // move this backward's 16-bit gradient into the fp32 buffer
    at::NoGradGuard no_grad;
    auto& grad = parameters_[index].mutable_grad();
    auto& buffer = fp32_grads_[index];
    if (grad.defined()) buffer = buffer.defined() ? buffer.add_(grad) : grad.to(at::kFloat);
    grad = at::Tensor();
  }
  if (!armed_ || pending_[bucket] == 0 || group_.size() == 1) return;
  --pending_[bucket];
  // In bucket order only: the same collective sequence on every rank.
  while (next_launch_ < buckets_.size() && pending_[next_launch_] == 0) {
    launch(next_launch_++);
    ++launched_during_backward_;
  }
}

at::Tensor& GradientSynchronizer::accumulated(size_t index) {
  auto& grad = fp32_buffer_[index] ? fp32_grads_[index] : parameters_[index].mutable_grad();
  if (!grad.defined()) {
    const auto& p = parameters_[index];
    grad = at::zeros(p.sizes(), p.options().dtype(gradient_type(index)));
  }
  return grad;
}

void GradientSynchronizer::launch(size_t bucket) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> grads;
  grads.reserve(buckets_[bucket].size());
  for (size_t index : buckets_[bucket]) grads.push_back(accumulated(index));
  at::Tensor flat;
  if (options_.shard) {
    flat = pack_rank_major(grads, group_.size());
  } else {
    for (auto& grad : grads) grad = grad.reshape({-1});
    flat = at::cat(grads);
  }
  if (options_.reduce_in_bf16) flat = flat.to(at::kBFloat16);
  work_[bucket] =
      options_.shard ? group_.reduce_scatter_async(flat) : group_.all_reduce_async(flat);
}

void GradientSynchronizer::finish(size_t bucket) {
  at::NoGradGuard no_grad;
  const auto type = accumulated(buckets_[bucket].front()).scalar_type();
  auto flat = work_[bucket].wait().to(type);
  work_[bucket] = Work();
  flat.div_(world_size_);
  int64_t offset = 0;
  for (size_t index : buckets_[bucket]) {
    auto& grad = accumulated(index);
    if (options_.shard) {  // keep this member's chunk; the whole gradient is not needed again
      const int64_t n = chunk_elements(grad.numel(), group_.size());
      synced_[index] = flat.narrow(0, offset, n);
      grad = at::Tensor();
      offset += n;
    } else {
      grad.copy_(flat.narrow(0, offset, grad.numel()).view_as(grad));
      synced_[index] = grad;
      offset += grad.numel();
    }
  }
}

void GradientSynchronizer::synchronize() {
  const size_t first_unlaunched = armed_ ? next_launch_ : 0;
  armed_ = false;
  if (group_.size() == 1 && !options_.shard) {  // nothing to exchange (one GPU, ep = world)
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < parameters_.size(); ++i) {
      synced_[i] = accumulated(i);
      if (world_size_ != 1) synced_[i].div_(world_size_);
    }
    return;
  }
  for (size_t b = first_unlaunched; b < buckets_.size(); ++b) launch(b);
  for (size_t b = 0; b < buckets_.size(); ++b) finish(b);
}

void GradientSynchronizer::zero_grad() {
  // Undefined rather than zero: the first backward then hands its gradient over instead of
  // adding it to zeros (one pass less over every gradient per step).
  for (size_t i = 0; i < parameters_.size(); ++i) {
    parameters_[i].mutable_grad() = at::Tensor();
    fp32_grads_[i] = at::Tensor();
    synced_[i] = at::Tensor();
  }
}

void GradientSynchronizer::all_gather_parameters(const std::vector<at::Tensor>& chunks) {
  at::NoGradGuard no_grad;
  // Two in flight: the next bucket travels while this one is unpacked, and the gathered
  // buffers never add up to a second copy of the model (all at once did: +0.85 GiB peak RSS per
  // rank on configs/cpu_240m.yaml).
  constexpr size_t kInFlight = 2;
  std::vector<Work> gathers(buckets_.size());
  const auto launch_gather = [&](size_t b) {
    std::vector<at::Tensor> mine;
    for (size_t index : buckets_[b])
      mine.push_back(chunks[index].to(parameters_[index].scalar_type()));
    gathers[b] = group_.all_gather_async(at::cat(mine));
  };
  for (size_t b = 0; b < std::min(kInFlight, buckets_.size()); ++b) launch_gather(b);
  for (size_t b = 0; b < buckets_.size(); ++b) {
    std::vector<at::Tensor> targets;
    for (size_t index : buckets_[b]) targets.push_back(parameters_[index]);
    unpack_rank_major(gathers[b].wait(), targets);
    gathers[b] = Work();
    if (b + kInFlight < buckets_.size()) launch_gather(b + kInFlight);
  }
}

}  // namespace moeforge::parallel

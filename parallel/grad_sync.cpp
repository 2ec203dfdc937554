#include "parallel/grad_sync.hpp"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>

namespace moeforge::parallel {

GradientSynchronizer::GradientSynchronizer(std::vector<at::Tensor> parameters, Communicator& group,
                                           int world_size, int64_t bucket_bytes, bool overlap)
    : parameters_(std::move(parameters)),
      group_(group),
      world_size_(world_size),
      overlap_(overlap) {
  int64_t bytes_in_bucket = 0;
  std::vector<size_t> bucket_of(parameters_.size());
  for (size_t r = 0; r < parameters_.size(); ++r) {
    const size_t i = parameters_.size() - 1 - r;  // reverse order: backward's order, roughly
    const auto& p = parameters_[i];
    const int64_t bytes = p.numel() * p.element_size();
    const bool same_dtype =
        !buckets_.empty() && parameters_[buckets_.back().front()].scalar_type() == p.scalar_type();
    if (buckets_.empty() || !same_dtype || bytes_in_bucket + bytes > bucket_bytes) {
      buckets_.emplace_back();
      bytes_in_bucket = 0;
    }
    buckets_.back().push_back(i);
    bucket_of[i] = buckets_.size() - 1;
    bytes_in_bucket += bytes;
  }
  flat_.resize(buckets_.size());
  work_.resize(buckets_.size());
  pending_.assign(buckets_.size(), 0);
  if (!overlap_) return;
  for (size_t i = 0; i < parameters_.size(); ++i) {
    if (!parameters_[i].requires_grad()) continue;
    // Runs after the gradient has been accumulated into .grad.
    auto accumulator = torch::autograd::impl::grad_accumulator(parameters_[i]);
    const size_t bucket = bucket_of[i];
    accumulator->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
        [this, bucket](const torch::autograd::variable_list& outputs,
                       const torch::autograd::variable_list&) {
          on_gradient_ready(bucket);
          return outputs;
        }));
    accumulators_.push_back(std::move(accumulator));
  }
}

void GradientSynchronizer::prepare_for_backward() {
  if (!overlap_) return;
  armed_ = true;
  next_launch_ = 0;
  launched_during_backward_ = 0;
  for (size_t b = 0; b < buckets_.size(); ++b) pending_[b] = buckets_[b].size();
}

void GradientSynchronizer::on_gradient_ready(size_t bucket) {
  if (!armed_ || pending_[bucket] == 0 || group_.size() == 1) return;
  --pending_[bucket];
  // In bucket order only: the same collective sequence on every rank.
  while (next_launch_ < buckets_.size() && pending_[next_launch_] == 0) {
    launch(next_launch_++);
    ++launched_during_backward_;
  }
}

void GradientSynchronizer::launch(size_t bucket) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> grads;
  grads.reserve(buckets_[bucket].size());
  for (size_t index : buckets_[bucket]) {
    auto& p = parameters_[index];
    if (!p.grad().defined()) p.mutable_grad() = at::zeros_like(p);
    grads.push_back(p.grad().reshape({-1}));
  }
  flat_[bucket] = at::cat(grads);
  work_[bucket] = group_.all_reduce_async(flat_[bucket]);
}

void GradientSynchronizer::finish(size_t bucket) {
  at::NoGradGuard no_grad;
  auto flat = work_[bucket].wait();
  flat.div_(world_size_);
  int64_t offset = 0;
  for (size_t index : buckets_[bucket]) {
    auto& grad = parameters_[index].mutable_grad();
    const int64_t n = grad.numel();
    grad.copy_(flat.narrow(0, offset, n).view_as(grad));
    offset += n;
  }
  flat_[bucket] = at::Tensor();
}

void GradientSynchronizer::synchronize() {
  if (group_.size() == 1) {  // nothing to exchange (one GPU, or ep = world for experts)
    armed_ = false;
    at::NoGradGuard no_grad;
    for (auto& p : parameters_) {
      if (!p.grad().defined()) p.mutable_grad() = at::zeros_like(p);
      if (world_size_ != 1) p.mutable_grad().div_(world_size_);
    }
    return;
  }
  const size_t first_unlaunched = armed_ ? next_launch_ : 0;
  armed_ = false;
  for (size_t b = first_unlaunched; b < buckets_.size(); ++b) launch(b);
  for (size_t b = 0; b < buckets_.size(); ++b) finish(b);
}

}  // namespace moeforge::parallel

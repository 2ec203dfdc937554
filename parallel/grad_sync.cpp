#include "parallel/grad_sync.hpp"

#include <ATen/ATen.h>

namespace moeforge::parallel {

GradientSynchronizer::GradientSynchronizer(std::vector<at::Tensor> parameters,
                                           Communicator& group, int world_size,
                                           int64_t bucket_bytes)
    : parameters_(std::move(parameters)), group_(group), world_size_(world_size) {
  int64_t bytes_in_bucket = 0;
  for (size_t i = 0; i < parameters_.size(); ++i) {
    const auto& p = parameters_[i];
    const int64_t bytes = p.numel() * p.element_size();
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

void GradientSynchronizer::synchronize() {
  at::NoGradGuard no_grad;
  for (const auto& bucket : buckets_) {
    std::vector<at::Tensor> grads;
    grads.reserve(bucket.size());
    for (size_t index : bucket) {
      auto& p = parameters_[index];
      if (!p.grad().defined()) p.mutable_grad() = at::zeros_like(p);
      grads.push_back(p.grad().reshape({-1}));
    }
    auto flat = at::cat(grads);
    group_.all_reduce(flat);
    flat.div_(world_size_);
    int64_t offset = 0;
    for (size_t index : bucket) {
      auto& grad = parameters_[index].mutable_grad();
      const int64_t n = grad.numel();
      grad.copy_(flat.narrow(0, offset, n).view_as(grad));
      offset += n;
    }
  }
}

}  // namespace moeforge::parallel

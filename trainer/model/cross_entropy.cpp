#include "trainer/model/cross_entropy.hpp"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>

#include <cmath>

namespace moeforge {
namespace {

constexpr int64_t kIgnore = -100;   // at::cross_entropy_loss's default ignore_index
constexpr int64_t kGrainRows = 16;  // rows of V logits per parallel_for task

template <typename T>
T row_logsumexp(const T* row, int64_t vocab) {
  T max = row[0];
  for (int64_t j = 1; j < vocab; ++j) max = std::max(max, row[j]);
  T sum = 0;
  for (int64_t j = 0; j < vocab; ++j) sum += std::exp(row[j] - max);
  return max + std::log(sum);
}

// Per row: lse[r] and loss[r] = lse − logit[target] (0 for ignored rows).
template <typename T>
void forward_rows(const T* logits, const int64_t* targets, T* lse, T* loss, int64_t rows,
                  int64_t vocab) {
  at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = logits + r * vocab;
      const int64_t target = targets[r];
      TORCH_CHECK(target == kIgnore || (target >= 0 && target < vocab), "cross_entropy: target ",
                  target, " is outside [0, ", vocab, ")");
      lse[r] = row_logsumexp(row, vocab);
      loss[r] = target == kIgnore ? T(0) : lse[r] - row[target];
    }
  });
}

template <typename T>
void backward_rows(const T* logits, const int64_t* targets, const T* lse, T scale, T* grad,
                   int64_t rows, int64_t vocab) {
  at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = logits + r * vocab;
      T* out = grad + r * vocab;
      if (targets[r] == kIgnore) {
        std::fill(out, out + vocab, T(0));
        continue;
      }
      for (int64_t j = 0; j < vocab; ++j) out[j] = std::exp(row[j] - lse[r]) * scale;
      out[targets[r]] -= scale;
    }
  });
}

class CrossEntropyFunction : public torch::autograd::Function<CrossEntropyFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits,
                            const at::Tensor& targets) {
    const auto input = logits.contiguous();
    const auto target = targets.contiguous();
    const int64_t rows = input.size(0), vocab = input.size(1);
    auto lse = at::empty({rows}, input.options());
    auto loss = at::empty({rows}, input.options());
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "cross_entropy_forward", [&] {
      forward_rows(input.const_data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(),
                   lse.mutable_data_ptr<scalar_t>(), loss.mutable_data_ptr<scalar_t>(), rows,
                   vocab);
    });
    const auto count = (target != kIgnore).sum();
    ctx->save_for_backward({input, target, lse, count});
    return loss.sum() / count;  // 0/0 = nan when every target is ignored, as at::cross_entropy
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &logits = saved[0], &target = saved[1], &lse = saved[2], &count = saved[3];
    auto grad = at::empty_like(logits);
    AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "cross_entropy_backward", [&] {
      const auto scale = (grads[0].to(at::kDouble) / count.to(at::kDouble)).item<double>();
      backward_rows(logits.const_data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(),
                    lse.const_data_ptr<scalar_t>(), static_cast<scalar_t>(scale),
                    grad.mutable_data_ptr<scalar_t>(), logits.size(0), logits.size(1));
    });
    return {grad, at::Tensor()};
  }
};

bool has_fused_kernel(const at::Tensor& logits, const at::Tensor& targets) {
  const auto type = logits.scalar_type();
  return logits.device().is_cpu() && (type == at::kFloat || type == at::kDouble) &&
         logits.dim() == 2 && logits.size(0) > 0 && logits.size(1) > 0 &&
         targets.scalar_type() == at::kLong && targets.dim() == 1 &&
         targets.size(0) == logits.size(0);
}

}  // namespace

at::Tensor cross_entropy(const at::Tensor& logits, const at::Tensor& targets) {
  if (!has_fused_kernel(logits, targets)) return at::cross_entropy_loss(logits, targets);
  return CrossEntropyFunction::apply(logits, targets);
}

}  // namespace moeforge

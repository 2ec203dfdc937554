#include "trainer/model/cross_entropy.hpp"

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <algorithm>

namespace moeforge {
namespace {

constexpr int64_t kIgnore = -100;     // at::cross_entropy_loss's default ignore_index
constexpr int64_t kChunkRows = 1024;  // bounds logsumexp's temporary to kChunkRows × V

// Built from ATen ops, whose CPU kernels are vectorised at run time (AVX2/AVX-512 exp): a
// hand-written row loop here is compiled for baseline x86-64 and its scalar exp was slower.
class CrossEntropyFunction : public torch::autograd::Function<CrossEntropyFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits,
                            const at::Tensor& targets) {
    const auto input = logits.contiguous();
    const int64_t rows = input.size(0), vocab = input.size(1);
    const auto valid = targets != kIgnore;
    TORCH_CHECK(at::logical_or(targets.ge(0).logical_and(targets.lt(vocab)), valid.logical_not())
                    .all()
                    .item<bool>(),
                "cross_entropy: a target is outside [0, ", vocab, ")");
    auto lse = at::empty({rows}, input.options());
    for (int64_t start = 0; start < rows; start += kChunkRows) {
      const int64_t count = std::min(kChunkRows, rows - start);
      auto part = lse.narrow(0, start, count);
      at::logsumexp_out(part, input.narrow(0, start, count), {1});
    }
    const auto safe = targets.masked_fill(valid.logical_not(), 0).unsqueeze(1);  // [N, 1]
    const auto picked = input.gather(1, safe).squeeze(1);
    const auto count = valid.sum();
    ctx->save_for_backward({input, safe, valid, lse, count});
    // 0/0 = nan when every target is ignored, as at::cross_entropy_loss
    return at::where(valid, lse - picked, 0.0).sum() / count;
  }

  // d/dlogits = (softmax − one-hot) · g / count on kept rows, 0 on ignored ones.
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &logits = saved[0], &safe = saved[1], &valid = saved[2], &lse = saved[3];
    const auto scale = grads[0] / saved[4];
    auto grad = at::sub(logits, lse.unsqueeze(1));
    grad.exp_().mul_(scale);
    grad.scatter_add_(1, safe, -scale.expand({logits.size(0), 1}).to(logits.scalar_type()));
    grad.masked_fill_(valid.logical_not().unsqueeze(1), 0.0);
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

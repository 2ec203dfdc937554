#pragma once
// Mean next-token cross-entropy as one autograd node that never materialises the log-softmax:
// forward keeps one logsumexp per row, backward writes the logits' gradient
// (softmax − one-hot) · g / count in the same row pass. Rows whose target is -100 are ignored
// (at::cross_entropy_loss's ignore_index), the mean is over the others. On the CPU in fp32 /
// float64 (at::parallel_for over rows, accumulation in the logits' type); elsewhere
// at::cross_entropy_loss.
#include <ATen/core/Tensor.h>

namespace moeforge {

// logits [N, V], targets [N] int64 -> scalar.
at::Tensor cross_entropy(const at::Tensor& logits, const at::Tensor& targets);

}  // namespace moeforge

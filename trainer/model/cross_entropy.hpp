#pragma once
// Mean next-token cross-entropy as one autograd node that never keeps the log-softmax: forward
// keeps one logsumexp per row (computed in row chunks, so its temporary stays small), backward
// builds the logits' gradient (softmax − one-hot) · g / count in its one output buffer. Rows
// whose target is -100 are ignored (at::cross_entropy_loss's ignore_index), the mean is over the
// others. CPU fp32 / float64; elsewhere at::cross_entropy_loss.
#include <ATen/core/Tensor.h>

namespace moeforge {

// logits [N, V], targets [N] int64 -> scalar.
at::Tensor cross_entropy(const at::Tensor& logits, const at::Tensor& targets);

}  // namespace moeforge

#pragma once
// ZeRO-1 layout (parallel.distributed_optimizer): every parameter's flattened elements are cut
// into `parts` equal chunks (the last padded with zeros), and member `part` of the group owns
// chunk `part` — its fp32 master weights, AdamW moments and reduced gradient.
//
// Per-parameter chunks (rather than cutting one flat buffer) keep each parameter's state
// addressable by name, so checkpoints stay the same with or without sharding and any group
// size can load them. A bucket of parameters travels "rank-major": member r's slice of the
// packed buffer is the concatenation of chunk r of every parameter in the bucket, which is
// exactly what a reduce-scatter hands to member r and what an all-gather collects from it.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace moeforge::parallel {

// Elements per member for a tensor of `numel` elements: ceil(numel / parts), padding included.
inline int64_t chunk_elements(int64_t numel, int parts) {
  return (numel + parts - 1) / parts;
}

// Member `part`'s chunk of `tensor` (flattened, zero-padded), as a new tensor.
at::Tensor chunk_of(const at::Tensor& tensor, int parts, int part);

// The whole tensor (shape `shape`) from every member's chunk: `gathered` is [parts, chunk].
at::Tensor whole_from_chunks(const at::Tensor& gathered, at::IntArrayRef shape);

// [parts · Σ chunks]: member r's slice holds chunk r of each tensor, in order (`tensors` are
// flattened and zero-padded to parts · chunk; one dtype for all).
at::Tensor pack_rank_major(const std::vector<at::Tensor>& tensors, int parts);

// Inverse of pack_rank_major for gathered chunks: `gathered` is [parts, Σ chunks]; writes every
// tensor's real elements into `targets` (any dtype: copy_ converts).
void unpack_rank_major(const at::Tensor& gathered, std::vector<at::Tensor>& targets);

}  // namespace moeforge::parallel

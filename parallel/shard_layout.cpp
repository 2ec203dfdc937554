#include "parallel/shard_layout.hpp"

#include <ATen/ATen.h>

namespace moeforge::parallel {

namespace {

// [parts, chunk] view of `tensor` flattened and zero-padded.
at::Tensor as_chunks(const at::Tensor& tensor, int parts) {
  const int64_t numel = tensor.numel();
  const int64_t chunk = chunk_elements(numel, parts);
  auto flat = tensor.reshape({-1});
  if (chunk * parts != numel) flat = at::constant_pad_nd(flat, {0, chunk * parts - numel});
  return flat.view({parts, chunk});
}

}  // namespace

at::Tensor chunk_of(const at::Tensor& tensor, int parts, int part) {
  return as_chunks(tensor, parts)[part].clone();
}

at::Tensor whole_from_chunks(const at::Tensor& gathered, at::IntArrayRef shape) {
  int64_t numel = 1;
  for (const auto size : shape) numel *= size;
  return gathered.reshape({-1}).narrow(0, 0, numel).view(shape);
}

at::Tensor pack_rank_major(const std::vector<at::Tensor>& tensors, int parts) {
  std::vector<at::Tensor> columns;  // each [parts, chunk]
  columns.reserve(tensors.size());
  for (const auto& tensor : tensors) columns.push_back(as_chunks(tensor, parts));
  return at::cat(columns, 1).reshape({-1});
}

void unpack_rank_major(const at::Tensor& gathered, std::vector<at::Tensor>& targets) {
  const int64_t parts = gathered.size(0);
  int64_t column = 0;
  for (auto& target : targets) {
    const int64_t chunk = chunk_elements(target.numel(), static_cast<int>(parts));
    target.copy_(whole_from_chunks(gathered.narrow(1, column, chunk), target.sizes()));
    column += chunk;
  }
}

}  // namespace moeforge::parallel

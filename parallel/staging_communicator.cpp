#include "parallel/staging_communicator.hpp"

#include <ATen/ATen.h>

namespace moeforge::parallel {

StagingCommunicator::StagingCommunicator(std::shared_ptr<Communicator> inner, c10::Device native)
    : inner_(std::move(inner)), native_(native) {}

void StagingCommunicator::in_place(at::Tensor& tensor,
                                   const std::function<void(at::Tensor&)>& collective) {
  if (is_native(tensor)) return collective(tensor);
  auto staged = tensor.to(native_).contiguous();
  collective(staged);
  tensor.copy_(staged);
}

void StagingCommunicator::all_reduce(at::Tensor& tensor, ReduceOp op) {
  in_place(tensor, [&](at::Tensor& t) { inner_->all_reduce(t, op); });
}

void StagingCommunicator::broadcast(at::Tensor& tensor, int root) {
  in_place(tensor, [&](at::Tensor& t) { inner_->broadcast(t, root); });
}

at::Tensor StagingCommunicator::all_to_all_v(const at::Tensor& input,
                                             const std::vector<int64_t>& send_rows,
                                             const std::vector<int64_t>& recv_rows) {
  return inner_->all_to_all_v(input.to(native_), send_rows, recv_rows).to(input.device());
}

at::Tensor StagingCommunicator::all_to_all_blocks(const at::Tensor& input,
                                                  const std::vector<RowBlock>& send,
                                                  const std::vector<RowBlock>& recv,
                                                  int64_t output_rows) {
  return inner_->all_to_all_blocks(input.to(native_), send, recv, output_rows).to(input.device());
}

at::Tensor StagingCommunicator::all_gather(const at::Tensor& tensor) {
  return inner_->all_gather(tensor.to(native_)).to(tensor.device());
}

at::Tensor StagingCommunicator::reduce_scatter(const at::Tensor& input) {
  return inner_->reduce_scatter(input.to(native_)).to(input.device());
}

Work StagingCommunicator::all_to_all_blocks_async(const at::Tensor& input,
                                                  const std::vector<RowBlock>& send,
                                                  const std::vector<RowBlock>& recv,
                                                  int64_t output_rows) {
  if (is_native(input)) return inner_->all_to_all_blocks_async(input, send, recv, output_rows);
  return Communicator::all_to_all_blocks_async(input, send, recv, output_rows);
}

Work StagingCommunicator::all_reduce_async(at::Tensor tensor, ReduceOp op) {
  if (is_native(tensor)) return inner_->all_reduce_async(tensor, op);
  return Communicator::all_reduce_async(tensor, op);
}

}  // namespace moeforge::parallel

#pragma once
// StagingCommunicator: lets a backend take tensors of any device. A backend moves data in its
// native memory only (MPI without CUDA support: host memory; NCCL: its GPU); this wrapper
// copies tensors that live elsewhere there and the results back to the caller's device, so the
// trainer can hand small host-side counters to NCCL, or CUDA tensors to MPI (a slower path,
// e.g. for several ranks sharing one GPU), without knowing which backend it has. Tensors
// already in native memory pass straight through, asynchronous calls included.
#include <c10/core/Device.h>

#include <memory>

#include "parallel/communicator.hpp"

namespace moeforge::parallel {

class StagingCommunicator final : public Communicator {
 public:
  StagingCommunicator(std::shared_ptr<Communicator> inner, c10::Device native);

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string backend() const override { return inner_->backend(); }
  void all_reduce(at::Tensor& tensor, ReduceOp op = ReduceOp::kSum) override;
  at::Tensor all_to_all_v(const at::Tensor& input, const std::vector<int64_t>& send_rows,
                          const std::vector<int64_t>& recv_rows) override;
  at::Tensor all_to_all_blocks(const at::Tensor& input, const std::vector<RowBlock>& send,
                               const std::vector<RowBlock>& recv, int64_t output_rows) override;
  void broadcast(at::Tensor& tensor, int root) override;
  at::Tensor all_gather(const at::Tensor& tensor) override;
  at::Tensor reduce_scatter(const at::Tensor& input) override;
  void barrier() override { inner_->barrier(); }
  Work all_to_all_blocks_async(const at::Tensor& input, const std::vector<RowBlock>& send,
                               const std::vector<RowBlock>& recv, int64_t output_rows) override;
  Work all_reduce_async(at::Tensor tensor, ReduceOp op = ReduceOp::kSum) override;
  // Host tensors pass straight through when the native memory is the host's.
  Communicator* split_phase_for_cpu() override {
    return native_.is_cpu() ? inner_->split_phase_for_cpu() : nullptr;
  }

 private:
  bool is_native(const at::Tensor& tensor) const { return tensor.device() == native_; }
  // Runs an in-place collective on a native copy of `tensor` and copies the result back.
  void in_place(at::Tensor& tensor, const std::function<void(at::Tensor&)>& collective);
  std::shared_ptr<Communicator> inner_;
  c10::Device native_;
};

}  // namespace moeforge::parallel

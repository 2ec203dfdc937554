#pragma once
// QueuedCommunicator: runs every collective of an inner communicator on the process's
// communication worker (parallel/comm_worker.hpp). Synchronous calls are submit + wait;
// the *_async calls return a Work at once. Collectives keep their per-group order because the
// worker is a FIFO.
#include <memory>

#include "parallel/communicator.hpp"

namespace moeforge::parallel {

class QueuedCommunicator final : public Communicator {
 public:
  explicit QueuedCommunicator(std::shared_ptr<Communicator> inner);

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string backend() const override { return inner_->backend() + "+worker"; }
  void all_reduce(at::Tensor& tensor, ReduceOp op = ReduceOp::kSum) override;
  at::Tensor all_to_all_v(const at::Tensor& input, const std::vector<int64_t>& send_rows,
                          const std::vector<int64_t>& recv_rows) override;
  at::Tensor all_to_all_blocks(const at::Tensor& input, const std::vector<RowBlock>& send,
                               const std::vector<RowBlock>& recv, int64_t output_rows) override;
  void broadcast(at::Tensor& tensor, int root) override;
  at::Tensor all_gather(const at::Tensor& tensor) override;
  void barrier() override;
  Work all_to_all_blocks_async(const at::Tensor& input, const std::vector<RowBlock>& send,
                               const std::vector<RowBlock>& recv, int64_t output_rows) override;
  Work all_reduce_async(at::Tensor tensor, ReduceOp op = ReduceOp::kSum) override;
  at::Tensor reduce_scatter(const at::Tensor& input) override;
  Work reduce_scatter_async(at::Tensor input) override;
  Work all_gather_async(at::Tensor tensor) override;

 private:
  // Runs `operation` on the worker and waits (inline when already on the worker thread).
  at::Tensor run(const std::function<at::Tensor()>& operation, const char* name);
  std::shared_ptr<Communicator> inner_;
};

}  // namespace moeforge::parallel

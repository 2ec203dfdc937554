#pragma once
// QueuedCommunicator: runs every collective of an inner communicator on the process's
// communication worker (parallel/comm_worker.hpp). Synchronous calls are submit + wait;
// the *_async calls return a Work at once. Collectives keep their per-group order because the
// worker starts them in submission order. Host tensors go split-phase (posted, then polled
// with the others in flight) when the inner communicator can post them.
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
  // Queues `collective` (one call on the inner communicator) on the worker: posted split-phase
  // when its tensors are on the `host` and the inner communicator can, else run in turn. `bulk`
  // marks the block exchanges, which are started one at a time per group, in order (run to
  // completion or posted alike, so host and device exchanges keep one order): they carry
  // the pipeline's chunks, and sharing the link would make every chunk arrive last. They are
  // point-to-point messages, ordered among themselves only, so collectives of the group (a
  // counts exchange) may pass them.
  Work submit(Collective collective, bool host, std::string name, bool bulk = false);
  // Submits and waits (runs inline when already on the worker thread).
  at::Tensor run(const Collective& collective, bool host, const char* name, bool bulk = false);
  std::shared_ptr<Communicator> inner_;
  Communicator* split_phase_;  // inner_->split_phase_for_cpu(), owned through inner_
};

}  // namespace moeforge::parallel

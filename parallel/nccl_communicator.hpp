#pragma once
// NcclCommunicator: Communicator over NCCL for CUDA tensors (built when LibTorch has CUDA).
//
// Bootstrapped from an MPI communicator: member 0 creates the ncclUniqueId and broadcasts it
// over MPI, then every member calls ncclCommInitRank with its MPI rank. Collectives are
// enqueued on the *current* CUDA stream of the tensor's device, so they are ordered with the
// compute that produced their inputs; the call returns once enqueued (stream semantics), except
// all_to_all_v's split sizes, which are host vectors agreed beforehand. all-to-all-v is a
// grouped ncclSend/ncclRecv per peer. Not thread-safe.
//
// The *_async calls run on a dedicated high-priority communication stream instead: it first
// waits for an event recorded on the current (compute) stream, so the inputs are ready; the
// returned Work's wait() makes the stream current at that moment wait for the exchange's
// completion event — compute waits only on the events it needs, and only when it needs them.
// Tensors crossing streams are recorded with the caching allocator (recordStream).
#include <memory>

#include "parallel/communicator.hpp"

namespace moeforge::parallel {

class NcclCommunicator final : public Communicator {
 public:
  // Collective over `bootstrap` (any backend that broadcasts host tensors: MPI, or the
  // one-process group). `device`: the CUDA device this rank uses.
  NcclCommunicator(Communicator& bootstrap, int device);
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "nccl"; }

  void all_reduce(at::Tensor& tensor, ReduceOp op) override;
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
  // Runs `enqueue` with the communication stream current, after it waited for the current
  // stream; returns Work whose wait() orders the then-current stream after it.
  Work on_comm_stream(const std::vector<at::Tensor>& inputs,
                      const std::function<at::Tensor()>& enqueue);
  struct Handle;
  std::unique_ptr<Handle> handle_;
  int rank_ = 0;
  int size_ = 1;
  int device_ = 0;
};

// True when this build has the NCCL backend and a CUDA device is visible.
bool nccl_available();

}  // namespace moeforge::parallel

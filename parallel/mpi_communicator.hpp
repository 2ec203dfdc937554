#pragma once
// MpiCommunicator: Communicator over an MPI communicator, for CPU tensors. Works within a node
// and across nodes (whatever transport OpenMPI picks). Owns the MPI_Comm it is given (frees it
// on destruction unless it is MPI_COMM_WORLD). Large messages are sent as rows of a contiguous
// derived datatype so counts stay within MPI's int range.
#include <mpi.h>

#include <memory>
#include <vector>

#include "parallel/communicator.hpp"

namespace moeforge::parallel {

class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm);
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "mpi"; }
  MPI_Comm mpi_comm() const { return comm_; }

  void all_reduce(at::Tensor& tensor, ReduceOp op) override;
  at::Tensor all_to_all_v(const at::Tensor& input, const std::vector<int64_t>& send_rows,
                          const std::vector<int64_t>& recv_rows) override;
  at::Tensor all_to_all_blocks(const at::Tensor& input, const std::vector<RowBlock>& send,
                               const std::vector<RowBlock>& recv, int64_t output_rows) override;
  void broadcast(at::Tensor& tensor, int root) override;
  at::Tensor all_gather(const at::Tensor& tensor) override;
  at::Tensor reduce_scatter(const at::Tensor& input) override;
  void barrier() override;
  // Posting: the collective's MPI requests are started and handed to the returned Posted,
  // which polls them with MPI_Testall (and enforces the timeout); buffers and count arrays are
  // kept alive in it until they complete.
  std::unique_ptr<Posted> post(const Collective& collective) override;
  Communicator* split_phase_for_cpu() override { return this; }

  // A new communicator for the members with the same `color`, ordered by `key` (MPI_Comm_split).
  // It inherits the timeout.
  std::unique_ptr<MpiCommunicator> split(int color, int key) const;

  // Watchdog: a collective that makes no progress for `seconds` (a peer stopped, died or is
  // stuck) prints which collective and which ranks, and aborts the whole job with exit code 3
  // instead of hanging. 0 = wait forever.
  void set_timeout(double seconds) { timeout_s_ = seconds; }

 private:
  // Waits for `requests` without occupying a core, within the timeout. `peers`: the group rank
  // of each request (point-to-point), to name the silent ones.
  void wait(std::vector<MPI_Request>& requests, const char* what,
            const std::vector<int>& peers = {}) const;
  void wait(MPI_Request request, const char* what) const;
  // Keeps `buffer` (a send buffer, a datatype, count arrays) alive until the collective being
  // posted completes; a blocking call waits before returning, so it needs nothing kept.
  void hold(std::shared_ptr<const void> buffer) const;
  void hold(const at::Tensor& buffer) const;
  [[noreturn]] void abort_on_timeout(std::vector<MPI_Request>& requests, const char* what,
                                     const std::vector<int>& peers) const;
  MPI_Comm comm_;
  int rank_ = 0;
  int size_ = 1;
  std::vector<int> world_ranks_;  // of each member
  double timeout_s_ = 0.0;
  struct InFlight;
  class PostedRequests;
  // Set while post() runs a collective: wait() hands its requests here instead of waiting.
  InFlight* posting_ = nullptr;
};

}  // namespace moeforge::parallel

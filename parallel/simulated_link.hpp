#pragma once
// Simulated link: makes every collective of an inner communicator take at least the time a
// network of `bandwidth_gbps` GB/s (10⁹ bytes/s, as in "25 GB/s") per rank and `latency_us`
// per message step would need for that collective's traffic, by sleeping out the remainder
// after the real operation (no CPU burnt). The modelled time counts from when this member
// entered the collective, so time spent waiting for a slower peer counts towards it (a
// transfer-starts-when-all-arrived model was tried: it charged the wait on top and made both
// blocking and overlapped steps slower; see docs/benchmarks.md). So ranks sharing one machine
// behave like ranks on a slower network, and overlap can be measured. Cost model (p = group size, B
// = bytes):
//   all-to-all (v / blocks): latency + max(bytes sent to others, bytes received) / bandwidth
//   all-reduce (ring):       2(p−1)·latency + 2(p−1)/p · B / bandwidth
//   all-gather (ring):       (p−1)·latency + (p−1)·B / bandwidth         (B per member)
//   broadcast:               ⌈log2 p⌉·latency + B / bandwidth
//   barrier:                 ⌈log2 p⌉·latency
// A group of one member costs nothing.
#include <memory>

#include "parallel/communicator.hpp"

namespace moeforge::parallel {

struct LinkModel {
  double bandwidth_gbps = 0.0;  // GB/s; 0 = link simulation off
  double latency_us = 0.0;

  double all_to_all_seconds(int64_t bytes_sent, int64_t bytes_received) const;
  double all_reduce_seconds(int64_t bytes, int members) const;
  double all_gather_seconds(int64_t bytes_per_member, int members) const;
  double broadcast_seconds(int64_t bytes, int members) const;
  double barrier_seconds(int members) const;
};

class SimulatedLinkCommunicator final : public Communicator {
 public:
  SimulatedLinkCommunicator(std::shared_ptr<Communicator> inner, LinkModel link);

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string backend() const override { return inner_->backend() + "+simulated-link"; }
  void all_reduce(at::Tensor& tensor, ReduceOp op = ReduceOp::kSum) override;
  at::Tensor all_to_all_v(const at::Tensor& input, const std::vector<int64_t>& send_rows,
                          const std::vector<int64_t>& recv_rows) override;
  at::Tensor all_to_all_blocks(const at::Tensor& input, const std::vector<RowBlock>& send,
                               const std::vector<RowBlock>& recv, int64_t output_rows) override;
  void broadcast(at::Tensor& tensor, int root) override;
  at::Tensor all_gather(const at::Tensor& tensor) override;
  void barrier() override;

 private:
  std::shared_ptr<Communicator> inner_;
  LinkModel link_;
};

}  // namespace moeforge::parallel

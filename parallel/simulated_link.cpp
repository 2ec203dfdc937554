#include "parallel/simulated_link.hpp"

#include <chrono>
#include <cmath>
#include <thread>

namespace moeforge::parallel {
namespace {

using Clock = std::chrono::steady_clock;

int64_t row_bytes(const at::Tensor& t) {
  return t.dim() == 0 || t.size(0) == 0 ? 0 : t.nbytes() / t.size(0);
}

double log2_steps(int members) {
  return members > 1 ? std::ceil(std::log2(members)) : 0.0;
}

// Runs `operation`, then sleeps until `seconds` have passed since it started.
template <typename F>
auto at_least(double seconds, F&& operation) {
  const auto start = Clock::now();
  auto finish = [&] {
    std::this_thread::sleep_until(start + std::chrono::duration_cast<Clock::duration>(
                                              std::chrono::duration<double>(seconds)));
  };
  if constexpr (std::is_void_v<decltype(operation())>) {
    operation();
    finish();
  } else {
    auto result = operation();
    finish();
    return result;
  }
}

}  // namespace

double LinkModel::all_to_all_seconds(int64_t bytes_sent, int64_t bytes_received) const {
  return latency_us * 1e-6 +
         static_cast<double>(std::max(bytes_sent, bytes_received)) / (bandwidth_gbps * 1e9);
}

double LinkModel::all_reduce_seconds(int64_t bytes, int members) const {
  if (members <= 1) return 0.0;
  const double p = members;
  return 2 * (p - 1) * latency_us * 1e-6 +
         2 * (p - 1) / p * static_cast<double>(bytes) / (bandwidth_gbps * 1e9);
}

double LinkModel::all_gather_seconds(int64_t bytes_per_member, int members) const {
  if (members <= 1) return 0.0;
  const double p = members;
  return (p - 1) * latency_us * 1e-6 +
         (p - 1) * static_cast<double>(bytes_per_member) / (bandwidth_gbps * 1e9);
}

double LinkModel::broadcast_seconds(int64_t bytes, int members) const {
  if (members <= 1) return 0.0;
  return log2_steps(members) * latency_us * 1e-6 +
         static_cast<double>(bytes) / (bandwidth_gbps * 1e9);
}

double LinkModel::barrier_seconds(int members) const {
  return log2_steps(members) * latency_us * 1e-6;
}

SimulatedLinkCommunicator::SimulatedLinkCommunicator(std::shared_ptr<Communicator> inner,
                                                     LinkModel link)
    : inner_(std::move(inner)), link_(link) {}

void SimulatedLinkCommunicator::all_reduce(at::Tensor& tensor, ReduceOp op) {
  at_least(link_.all_reduce_seconds(tensor.nbytes(), size()),
           [&] { inner_->all_reduce(tensor, op); });
}

at::Tensor SimulatedLinkCommunicator::all_to_all_v(const at::Tensor& input,
                                                   const std::vector<int64_t>& send_rows,
                                                   const std::vector<int64_t>& recv_rows) {
  if (size() <= 1) return inner_->all_to_all_v(input, send_rows, recv_rows);
  int64_t sent = 0, received = 0;
  for (int p = 0; p < size(); ++p) {
    if (p == rank()) continue;
    sent += send_rows[p];
    received += recv_rows[p];
  }
  const int64_t bytes = row_bytes(input);
  return at_least(link_.all_to_all_seconds(sent * bytes, received * bytes),
                  [&] { return inner_->all_to_all_v(input, send_rows, recv_rows); });
}

at::Tensor SimulatedLinkCommunicator::all_to_all_blocks(const at::Tensor& input,
                                                        const std::vector<RowBlock>& send,
                                                        const std::vector<RowBlock>& recv,
                                                        int64_t output_rows) {
  if (size() <= 1) return inner_->all_to_all_blocks(input, send, recv, output_rows);
  int64_t sent = 0, received = 0;
  for (const auto& b : send)
    if (b.peer != rank()) sent += b.rows;
  for (const auto& b : recv)
    if (b.peer != rank()) received += b.rows;
  const int64_t bytes = row_bytes(input);
  return at_least(link_.all_to_all_seconds(sent * bytes, received * bytes),
                  [&] { return inner_->all_to_all_blocks(input, send, recv, output_rows); });
}

void SimulatedLinkCommunicator::broadcast(at::Tensor& tensor, int root) {
  at_least(link_.broadcast_seconds(tensor.nbytes(), size()),
           [&] { inner_->broadcast(tensor, root); });
}

at::Tensor SimulatedLinkCommunicator::all_gather(const at::Tensor& tensor) {
  return at_least(link_.all_gather_seconds(tensor.nbytes(), size()),
                  [&] { return inner_->all_gather(tensor); });
}

void SimulatedLinkCommunicator::barrier() {
  at_least(link_.barrier_seconds(size()), [&] { inner_->barrier(); });
}

}  // namespace moeforge::parallel

#include "parallel/queued_communicator.hpp"

#include "parallel/comm_worker.hpp"

namespace moeforge::parallel {

QueuedCommunicator::QueuedCommunicator(std::shared_ptr<Communicator> inner)
    : inner_(std::move(inner)) {}

at::Tensor QueuedCommunicator::run(const std::function<at::Tensor()>& operation, const char* name) {
  auto& worker = CommWorker::instance();
  if (worker.on_worker_thread()) return operation();
  return worker.submit(operation, name).wait();
}

void QueuedCommunicator::all_reduce(at::Tensor& tensor, ReduceOp op) {
  run(
      [&] {
        inner_->all_reduce(tensor, op);
        return at::Tensor();
      },
      "all_reduce (sync)");
}

at::Tensor QueuedCommunicator::all_to_all_v(const at::Tensor& input,
                                            const std::vector<int64_t>& send_rows,
                                            const std::vector<int64_t>& recv_rows) {
  return run([&] { return inner_->all_to_all_v(input, send_rows, recv_rows); },
             "all_to_all_v (sync)");
}

at::Tensor QueuedCommunicator::all_to_all_blocks(const at::Tensor& input,
                                                 const std::vector<RowBlock>& send,
                                                 const std::vector<RowBlock>& recv,
                                                 int64_t output_rows) {
  return run([&] { return inner_->all_to_all_blocks(input, send, recv, output_rows); },
             "all_to_all (sync)");
}

void QueuedCommunicator::broadcast(at::Tensor& tensor, int root) {
  run(
      [&] {
        inner_->broadcast(tensor, root);
        return at::Tensor();
      },
      "broadcast");
}

at::Tensor QueuedCommunicator::all_gather(const at::Tensor& tensor) {
  return run([&] { return inner_->all_gather(tensor); }, "all_gather");
}

void QueuedCommunicator::barrier() {
  run(
      [&] {
        inner_->barrier();
        return at::Tensor();
      },
      "barrier");
}

Work QueuedCommunicator::all_to_all_blocks_async(const at::Tensor& input,
                                                 const std::vector<RowBlock>& send,
                                                 const std::vector<RowBlock>& recv,
                                                 int64_t output_rows) {
  // Captured by value: the caller goes on computing while this runs.
  auto inner = inner_;
  return CommWorker::instance().submit(
      [inner, input, send, recv, output_rows] {
        return inner->all_to_all_blocks(input, send, recv, output_rows);
      },
      "all_to_all " + std::to_string(input.size(0)) + "→" + std::to_string(output_rows) + " rows");
}

Work QueuedCommunicator::all_reduce_async(at::Tensor tensor, ReduceOp op) {
  auto inner = inner_;
  return CommWorker::instance().submit(
      [inner, tensor, op]() mutable {
        inner->all_reduce(tensor, op);
        return tensor;
      },
      "all_reduce " + std::to_string(tensor.nbytes() / 1024) + " KiB");
}

at::Tensor QueuedCommunicator::reduce_scatter(const at::Tensor& input) {
  return run([&] { return inner_->reduce_scatter(input); }, "reduce_scatter (sync)");
}

Work QueuedCommunicator::reduce_scatter_async(at::Tensor input) {
  auto inner = inner_;
  return CommWorker::instance().submit([inner, input] { return inner->reduce_scatter(input); },
                                       "reduce_scatter " + std::to_string(input.numel()));
}

Work QueuedCommunicator::all_gather_async(at::Tensor tensor) {
  auto inner = inner_;
  return CommWorker::instance().submit([inner, tensor] { return inner->all_gather(tensor); },
                                       "all_gather " + std::to_string(tensor.numel()));
}

}  // namespace moeforge::parallel

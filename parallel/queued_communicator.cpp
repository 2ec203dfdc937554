#include "parallel/queued_communicator.hpp"

#include "parallel/comm_worker.hpp"

namespace moeforge::parallel {
namespace {

bool on_host(const at::Tensor& tensor) {
  return tensor.device().is_cpu();
}

}  // namespace

QueuedCommunicator::QueuedCommunicator(std::shared_ptr<Communicator> inner)
    : inner_(std::move(inner)), split_phase_(inner_->split_phase_for_cpu()) {}

Work QueuedCommunicator::submit(Collective collective, bool host, std::string name, bool bulk) {
  auto& worker = CommWorker::instance();
  auto inner = inner_;  // keeps split_phase_ (inside it) alive too
  if (split_phase_ && host)
    return worker.submit_posted(
        [inner, target = split_phase_, collective = std::move(collective)] {
          return target->post(collective);
        },
        std::move(name), bulk ? this : nullptr);
  return worker.submit([inner, collective = std::move(collective)] { return collective(*inner); },
                       std::move(name), bulk ? this : nullptr);
}

at::Tensor QueuedCommunicator::run(const Collective& collective, bool host, const char* name,
                                   bool bulk) {
  if (CommWorker::instance().on_worker_thread()) return collective(*inner_);
  return submit(collective, host, name, bulk).wait();
}

void QueuedCommunicator::all_reduce(at::Tensor& tensor, ReduceOp op) {
  run(
      [&](Communicator& c) {
        c.all_reduce(tensor, op);
        return tensor;
      },
      on_host(tensor), "all_reduce (sync)");
}

at::Tensor QueuedCommunicator::all_to_all_v(const at::Tensor& input,
                                            const std::vector<int64_t>& send_rows,
                                            const std::vector<int64_t>& recv_rows) {
  return run([&](Communicator& c) { return c.all_to_all_v(input, send_rows, recv_rows); },
             on_host(input), "all_to_all_v (sync)");
}

at::Tensor QueuedCommunicator::all_to_all_blocks(const at::Tensor& input,
                                                 const std::vector<RowBlock>& send,
                                                 const std::vector<RowBlock>& recv,
                                                 int64_t output_rows) {
  return run([&](Communicator& c) { return c.all_to_all_blocks(input, send, recv, output_rows); },
             on_host(input), "all_to_all (sync)", /*bulk=*/true);
}

void QueuedCommunicator::broadcast(at::Tensor& tensor, int root) {
  run(
      [&](Communicator& c) {
        c.broadcast(tensor, root);
        return tensor;
      },
      on_host(tensor), "broadcast");
}

at::Tensor QueuedCommunicator::all_gather(const at::Tensor& tensor) {
  return run([&](Communicator& c) { return c.all_gather(tensor); }, on_host(tensor), "all_gather");
}

void QueuedCommunicator::barrier() {
  run(
      [](Communicator& c) {
        c.barrier();
        return at::Tensor();
      },
      /*host=*/true, "barrier");
}

at::Tensor QueuedCommunicator::reduce_scatter(const at::Tensor& input) {
  return run([&](Communicator& c) { return c.reduce_scatter(input); }, on_host(input),
             "reduce_scatter (sync)");
}

// The asynchronous forms capture their arguments by value: the caller goes on computing.

Work QueuedCommunicator::all_to_all_blocks_async(const at::Tensor& input,
                                                 const std::vector<RowBlock>& send,
                                                 const std::vector<RowBlock>& recv,
                                                 int64_t output_rows) {
  return submit(
      [input, send, recv, output_rows](Communicator& c) {
        return c.all_to_all_blocks(input, send, recv, output_rows);
      },
      on_host(input),
      "all_to_all " + std::to_string(input.size(0)) + "→" + std::to_string(output_rows) + " rows",
      /*bulk=*/true);
}

Work QueuedCommunicator::all_reduce_async(at::Tensor tensor, ReduceOp op) {
  return submit(
      [tensor, op](Communicator& c) mutable {
        c.all_reduce(tensor, op);
        return tensor;
      },
      on_host(tensor), "all_reduce " + std::to_string(tensor.nbytes() / 1024) + " KiB");
}

Work QueuedCommunicator::reduce_scatter_async(at::Tensor input) {
  return submit([input](Communicator& c) { return c.reduce_scatter(input); }, on_host(input),
                "reduce_scatter " + std::to_string(input.numel()));
}

Work QueuedCommunicator::all_gather_async(at::Tensor tensor) {
  return submit([tensor](Communicator& c) { return c.all_gather(tensor); }, on_host(tensor),
                "all_gather " + std::to_string(tensor.numel()));
}

}  // namespace moeforge::parallel

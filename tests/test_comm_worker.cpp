// The communication worker: FIFO execution off the calling thread, results and errors through
// Work, and synchronous calls of a QueuedCommunicator that equal the inner communicator's.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <atomic>
#include <numeric>
#include <thread>

#include "parallel/comm_worker.hpp"
#include "parallel/queued_communicator.hpp"

namespace moeforge::parallel {
namespace {

TEST(CommWorker, RunsInSubmissionOrderOnItsOwnThread) {
  auto& worker = CommWorker::instance();
  std::vector<int> order;
  std::vector<Work> works;
  std::atomic<bool> off_thread{true};
  const auto caller = std::this_thread::get_id();
  for (int i = 0; i < 50; ++i)
    works.push_back(worker.submit([&, i] {
      off_thread = off_thread && std::this_thread::get_id() != caller;
      order.push_back(i);  // only the worker touches it
      return at::full({1}, i, at::kLong);
    }));
  for (int i = 0; i < 50; ++i) EXPECT_EQ(works[i].wait().item<int64_t>(), i);
  std::vector<int> expected(50);
  std::iota(expected.begin(), expected.end(), 0);
  EXPECT_EQ(order, expected);
  EXPECT_TRUE(off_thread);
}

TEST(CommWorker, ErrorsReachTheWaiter) {
  auto work = CommWorker::instance().submit(
      []() -> at::Tensor { throw std::runtime_error("peer vanished"); });
  EXPECT_THROW(
      {
        try {
          work.wait();
        } catch (const std::runtime_error& e) {
          EXPECT_STREQ(e.what(), "peer vanished");
          throw;
        }
      },
      std::runtime_error);
  // The worker survives and runs the next operation.
  EXPECT_EQ(CommWorker::instance().submit([] { return at::ones({2}); }).wait().sum().item<float>(),
            2.0f);
  EXPECT_TRUE(Work::completed(at::ones({1})).done());
}

TEST(QueuedCommunicator, SynchronousAndAsynchronousCallsMatchTheInnerCommunicator) {
  auto inner = std::make_shared<SelfCommunicator>();
  QueuedCommunicator queued(inner);
  const auto input = at::randn({6, 3});
  const std::vector<RowBlock> send = {{0, 0, 2}, {0, 4, 2}}, recv = {{0, 2, 2}, {0, 0, 2}};
  const auto expected = inner->all_to_all_blocks(input, send, recv, 4);
  EXPECT_TRUE(at::equal(queued.all_to_all_blocks(input, send, recv, 4), expected));
  EXPECT_TRUE(at::equal(queued.all_to_all_blocks_async(input, send, recv, 4).wait(), expected));
  auto t = at::ones({3});
  EXPECT_TRUE(at::equal(queued.all_reduce_async(t).wait(), at::ones({3})));
  EXPECT_EQ(queued.backend(), "self+worker");
}

}  // namespace
}  // namespace moeforge::parallel

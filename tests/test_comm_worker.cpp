// The communication worker: FIFO execution off the calling thread, posted (split-phase)
// collectives started in order and completed in any order, results and errors through Work, and
// synchronous calls of a QueuedCommunicator that equal the inner communicator's.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <malloc.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>
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

// glibc's malloc_info: one <heap nr="..."> element per arena.
int malloc_arenas() {
  char* text = nullptr;
  size_t size = 0;
  FILE* stream = open_memstream(&text, &size);
  malloc_info(0, stream);
  std::fclose(stream);
  const std::string xml(text, size);
  std::free(text);
  int heaps = 0;
  for (auto at = xml.find("<heap nr="); at != std::string::npos; at = xml.find("<heap nr=", at + 1))
    ++heaps;
  return heaps;
}

// The worker allocates every all-to-all output (and MPI's temporaries). In an arena of its own,
// never trimmed under the host allocator tuning, that memory stayed resident beside the main
// heap and could not be reused by compute: expert parallelism held more per rank than data
// parallelism (issue 21). The test main tunes the allocator as the trainer's main does.
TEST(CommWorker, AllocatesFromTheProcessHeap) {
  const char* tuning = std::getenv("MOEFORGE_MALLOC_TUNING");
  if (tuning != nullptr && std::strcmp(tuning, "0") == 0)
    GTEST_SKIP() << "MOEFORGE_MALLOC_TUNING=0";
  auto rows = CommWorker::instance().submit([] { return at::ones({1 << 20}, at::kFloat); });
  EXPECT_EQ(rows.wait().sum().item<double>(), 1 << 20);
  EXPECT_EQ(malloc_arenas(), 1) << "a thread allocates from an arena of its own";
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

// A split-phase collective that completes when its test sees `release` set (or throws
// `error` there), recording in `log` when it was started.
struct Gated final : Posted {
  const std::atomic<bool>* release = nullptr;
  const char* error = nullptr;
  bool test() override {
    if (error) throw std::runtime_error(error);
    return release->load();
  }
};

Work submit_gated(std::vector<std::string>& log, std::string name, const std::atomic<bool>& release,
                  float value, const char* error = nullptr, const void* in_order = nullptr) {
  return CommWorker::instance().submit_posted(
      [&log, name, &release, value, error] {
        log.push_back(name);  // only the worker touches it
        auto posted = std::make_unique<Gated>();
        posted->release = &release;
        posted->error = error;
        posted->result = at::full({1}, value);
        return posted;
      },
      name, in_order);
}

// Posted collectives are started in submission order but complete as they finish: the second
// one's waiter is answered while the first is still in flight, and a failing test() reaches
// only its own waiter.
TEST(CommWorker, PostedCollectivesFinishInAnyOrder) {
  std::vector<std::string> log;
  std::atomic<bool> first_done{false}, always{true};
  auto first = submit_gated(log, "first", first_done, 1.0f);
  auto plain = CommWorker::instance().submit([&log] {
    log.push_back("plain");
    return at::full({1}, 2.0f);
  });
  auto second = submit_gated(log, "second", always, 3.0f);
  auto failing = submit_gated(log, "failing", always, 4.0f, "link down");
  EXPECT_EQ(second.wait().item<float>(), 3.0f);
  EXPECT_EQ(plain.wait().item<float>(), 2.0f);
  EXPECT_THROW(failing.wait(), std::runtime_error);
  EXPECT_FALSE(first.done());
  first_done = true;
  EXPECT_EQ(first.wait().item<float>(), 1.0f);
  EXPECT_EQ(log, (std::vector<std::string>{"first", "plain", "second", "failing"}));
  // A start that throws reaches its waiter, and the worker goes on.
  auto refused = CommWorker::instance().submit_posted(
      []() -> std::unique_ptr<Posted> { throw std::invalid_argument("bad split sizes"); });
  EXPECT_THROW(refused.wait(), std::invalid_argument);
  EXPECT_EQ(submit_gated(log, "after", always, 5.0f).wait().item<float>(), 5.0f);
}

// Collectives sharing an in-order key are started one at a time: the second (posted or run to
// completion) only once the first completed, while others pass; a start that throws lets its
// successor go.
TEST(CommWorker, InOrderCollectivesArePostedOneAtATime) {
  std::vector<std::string> log;
  std::atomic<bool> first_done{false}, always{true};
  const int key = 0, other_key = 0;
  auto first = submit_gated(log, "first", first_done, 1.0f, nullptr, &key);
  auto second = submit_gated(log, "second", always, 2.0f, nullptr, &key);
  auto blocking = CommWorker::instance().submit(
      [&log] {
        log.push_back("blocking");  // a run-to-completion collective keeps its turn too
        return at::full({1}, 6.0f);
      },
      "blocking", &key);
  auto other = submit_gated(log, "other", always, 3.0f, nullptr, &other_key);
  auto unkeyed = submit_gated(log, "unkeyed", always, 4.0f);
  EXPECT_EQ(other.wait().item<float>(), 3.0f);
  EXPECT_EQ(unkeyed.wait().item<float>(), 4.0f);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // time to (wrongly) post second
  EXPECT_FALSE(second.done());
  EXPECT_FALSE(blocking.done());
  first_done = true;
  EXPECT_EQ(second.wait().item<float>(), 2.0f);
  EXPECT_EQ(blocking.wait().item<float>(), 6.0f);
  EXPECT_EQ(first.wait().item<float>(), 1.0f);
  EXPECT_EQ(log, (std::vector<std::string>{"first", "other", "unkeyed", "second", "blocking"}));
  auto refused = CommWorker::instance().submit_posted(
      []() -> std::unique_ptr<Posted> { throw std::invalid_argument("bad split sizes"); },
      "refused", &key);
  auto next = submit_gated(log, "next", always, 5.0f, nullptr, &key);
  EXPECT_THROW(refused.wait(), std::invalid_argument);
  EXPECT_EQ(next.wait().item<float>(), 5.0f);
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

// A one-process communicator whose collectives post split-phase and complete only once
// `release` is set, counting the block exchanges in flight at once.
class HeldCommunicator final : public Communicator {
 public:
  std::atomic<bool> release{false};
  std::atomic<int> blocks_in_flight{0}, most_blocks_in_flight{0};

  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string backend() const override { return "held"; }
  void all_reduce(at::Tensor&, ReduceOp) override {}
  at::Tensor all_to_all_v(const at::Tensor& input, const std::vector<int64_t>& send_rows,
                          const std::vector<int64_t>& recv_rows) override {
    return self_.all_to_all_v(input, send_rows, recv_rows);
  }
  at::Tensor all_to_all_blocks(const at::Tensor& input, const std::vector<RowBlock>& send,
                               const std::vector<RowBlock>& recv, int64_t output_rows) override {
    block_exchange_ = true;
    return self_.all_to_all_blocks(input, send, recv, output_rows);
  }
  void broadcast(at::Tensor&, int) override {}
  at::Tensor all_gather(const at::Tensor& tensor) override { return self_.all_gather(tensor); }
  void barrier() override {}
  Communicator* split_phase_for_cpu() override { return this; }

  std::unique_ptr<Posted> post(const Collective& collective) override {
    struct Held final : Posted {
      HeldCommunicator* comm;
      bool block;
      bool test() override {
        if (block && !comm->release) return false;
        if (block) --comm->blocks_in_flight;
        return true;
      }
    };
    auto held = std::make_unique<Held>();
    block_exchange_ = false;
    held->result = collective(*this);
    held->comm = this;
    held->block = block_exchange_;
    if (held->block)
      most_blocks_in_flight = std::max(most_blocks_in_flight.load(), ++blocks_in_flight);
    return held;
  }

 private:
  SelfCommunicator self_;
  bool block_exchange_ = false;  // set by the collective being posted
};

// A group's block exchanges (the pipeline's bulk rows) are posted one at a time and in order;
// its counts exchange (all_to_all_v) passes them.
TEST(QueuedCommunicator, BlockExchangesOfAGroupArePostedOneAtATime) {
  auto inner = std::make_shared<HeldCommunicator>();
  QueuedCommunicator queued(inner);
  const auto input = at::randn({4, 3});
  const std::vector<RowBlock> blocks = {{0, 0, 4}};
  std::vector<Work> exchanges;
  for (int i = 0; i < 3; ++i)
    exchanges.push_back(queued.all_to_all_blocks_async(input * i, blocks, blocks, 4));
  EXPECT_TRUE(at::equal(queued.all_to_all_v(input, {4}, {4}), input));  // not held behind them
  EXPECT_EQ(inner->blocks_in_flight.load(), 1);
  inner->release = true;
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(at::equal(exchanges[i].wait(), input * i));
  EXPECT_EQ(inner->most_blocks_in_flight.load(), 1);
}

}  // namespace
}  // namespace moeforge::parallel

// train.recompute across ranks: bitwise the same training as none at ep_size 1 (data parallel)
// and ep_size = world, with the communication worker, overlap_degree 3, gradient accumulation
// and bucketed gradient sync during backward; a recomputed MoE layer replays the forward's
// counts exchange and reruns only the row all-to-alls.
#include <gtest/gtest.h>
#include <mpi.h>

#include <atomic>

#include "parallel/mpi_communicator.hpp"
#include "parallel/process_groups.hpp"
#include "parallel/recompute.hpp"
#include "recompute_check.hpp"
#include "test_support.hpp"

namespace moeforge {
namespace {

using testing::world_size;
// Forwards every call to `inner`, counting the all-to-alls: all_to_all_v carries the MoE counts
// exchange, all_to_all_blocks the rows.
class CountingCommunicator : public parallel::Communicator {
 public:
  explicit CountingCommunicator(std::shared_ptr<Communicator> inner) : inner_(std::move(inner)) {}
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string backend() const override { return inner_->backend(); }
  void all_reduce(at::Tensor& tensor, parallel::ReduceOp op) override {
    inner_->all_reduce(tensor, op);
  }
  at::Tensor all_to_all_v(const at::Tensor& input, const std::vector<int64_t>& send_rows,
                          const std::vector<int64_t>& recv_rows) override {
    ++counts_exchanges;
    return inner_->all_to_all_v(input, send_rows, recv_rows);
  }
  at::Tensor all_to_all_blocks(const at::Tensor& input, const std::vector<parallel::RowBlock>& send,
                               const std::vector<parallel::RowBlock>& recv,
                               int64_t output_rows) override {
    ++row_exchanges;
    return inner_->all_to_all_blocks(input, send, recv, output_rows);
  }
  parallel::Work all_to_all_blocks_async(const at::Tensor& input,
                                         const std::vector<parallel::RowBlock>& send,
                                         const std::vector<parallel::RowBlock>& recv,
                                         int64_t output_rows) override {
    ++row_exchanges;
    return inner_->all_to_all_blocks_async(input, send, recv, output_rows);
  }
  parallel::Work all_reduce_async(at::Tensor tensor, parallel::ReduceOp op) override {
    return inner_->all_reduce_async(std::move(tensor), op);
  }
  void broadcast(at::Tensor& tensor, int root) override { inner_->broadcast(tensor, root); }
  at::Tensor all_gather(const at::Tensor& tensor) override { return inner_->all_gather(tensor); }
  void barrier() override { inner_->barrier(); }

  std::atomic<int64_t> counts_exchanges{0}, row_exchanges{0};

 private:
  std::shared_ptr<Communicator> inner_;
};

Config distributed_recompute_config(int ep) {
  auto config = testing::recompute_test_config();
  config.parallel.ep_size = ep;
  config.parallel.overlap_degree = 3;
  config.parallel.bucket_mb = 0.005;  // many buckets: some are all-reduced during backward
  return config;
}

TEST(Recompute, BitwiseTheSameAsNoneAtEveryEpSize) {
  parallel::MpiCommunicator world(MPI_COMM_WORLD);
  for (const int ep : {1, world_size()}) {
    const auto config = distributed_recompute_config(ep);
    const auto groups = parallel::make_process_groups(world, ep);
    const auto reference = testing::trace_training(config, groups);
    for (const auto& [name, recompute] : testing::recompute_options()) {
      auto c = config;
      c.train.recompute = recompute;
      const auto trace = testing::trace_training(c, groups);
      const auto what = name + " ep " + std::to_string(ep);
      testing::expect_same_training(trace, reference, what);
      EXPECT_GT(trace.buckets_during_backward, 0) << what << ": nothing overlapped backward";
    }
  }
}

// Deduplicated dispatch inside a recomputed region: its index exchange runs again with the row
// exchanges and must lay the rows out as the forward did.
TEST(Recompute, DeduplicatedDispatchBitwiseTheSameAsNone) {
  parallel::MpiCommunicator world(MPI_COMM_WORLD);
  auto config = distributed_recompute_config(world_size());
  config.parallel.dedup_dispatch = moe::DispatchDedup::kRank;
  const auto groups = parallel::make_process_groups(world, world_size());
  const auto reference = testing::trace_training(config, groups);
  for (const auto& [name, recompute] : testing::recompute_options()) {
    auto c = config;
    c.train.recompute = recompute;
    testing::expect_same_training(testing::trace_training(c, groups), reference,
                                  name + " deduplicated");
  }
}

// One counts exchange per MoE layer forward with or without recompute (the recompute replays
// it); the row exchanges run again in the recompute.
TEST(Recompute, MoeRecomputeReplaysTheCountsExchange) {
  parallel::MpiCommunicator world(MPI_COMM_WORLD);
  const int ep = world_size();
  const auto counted_run = [&](RecomputeConfig recompute) {
    auto groups = parallel::make_process_groups(world, ep);
    auto counting = std::make_shared<CountingCommunicator>(groups.ep);
    groups.ep = counting;
    auto config = distributed_recompute_config(ep);
    config.train.recompute = recompute;
    testing::trace_training(config, groups);
    return std::pair<int64_t, int64_t>{counting->counts_exchanges, counting->row_exchanges};
  };
  const auto [counts_none, rows_none] = counted_run({});
  ASSERT_GT(counts_none, 0);
  for (const auto& recompute : {RecomputeConfig{.moe = true}, RecomputeConfig{.block = true},
                                RecomputeConfig{.moe_act = true, .moe = true, .block = true}}) {
    const int64_t replays_before = parallel::replayed_exchanges();
    const auto [counts, rows] = counted_run(recompute);
    EXPECT_EQ(counts, counts_none) << "the recompute exchanged counts again";
    EXPECT_GT(rows, rows_none) << "the recompute did not rerun the row all-to-alls";
    EXPECT_GT(parallel::replayed_exchanges(), replays_before);
  }
}

}  // namespace
}  // namespace moeforge

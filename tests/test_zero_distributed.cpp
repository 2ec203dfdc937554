// The distributed optimizer (ZeRO-1) and gradient communication in bf16, under mpiexec (2 and 4
// ranks): reduce-scatter and bf16 sums against closed forms, ZeRO-1 against replicated AdamW at
// every ep_size, exact bf16 resume when sharded, and checkpoints that move between 2 and 4 ranks.
#include <gtest/gtest.h>
#include <mpi.h>

#include <filesystem>

#include "parallel/mpi_communicator.hpp"
#include "test_support.hpp"
#include "training_support.hpp"

namespace moeforge {
namespace {

using testing::expect_same_curve;
using testing::train_steps_on;
using testing::world_rank;
using testing::world_size;

Config sharded(Config config) {
  config.parallel.distributed_optimizer = true;
  return config;
}

// Member r contributes (r + 1) · (i + 1) at position i: the sum is (i + 1) · W(W + 1)/2.
TEST(Communicators, ReduceScatterAndBf16SumsMatchClosedForms) {
  parallel::MpiCommunicator world(MPI_COMM_WORLD);
  const int W = world.size(), r = world.rank();
  const double ranks_sum = W * (W + 1) / 2.0;
  const auto input = at::arange(1, 3 * W + 1, at::kFloat) * (r + 1);
  const auto mine = world.reduce_scatter(input);
  const auto expected = at::arange(3 * r + 1, 3 * r + 4, at::kFloat) * ranks_sum;
  EXPECT_TRUE(at::equal(mine, expected));
  // bf16 over MPI (a user-defined sum): small integers are exact in bf16.
  auto halves = (at::arange(1, 3 * W + 1, at::kFloat) * (r + 1)).to(at::kBFloat16);
  world.all_reduce(halves, parallel::ReduceOp::kSum);
  EXPECT_TRUE(at::equal(halves.to(at::kFloat), at::arange(1, 3 * W + 1, at::kFloat) * ranks_sum));
  const auto bf16_mine = world.reduce_scatter(input.to(at::kBFloat16));
  EXPECT_TRUE(at::equal(bf16_mine.to(at::kFloat), expected));
}

// Sharding the optimizer changes where the update is computed, not what it is: the losses and
// gradient norms of 20 steps match replicated AdamW within 1e-6 at every ep_size.
TEST(DistributedOptimizer, MatchesReplicatedAdamWAtEveryEpSize) {
  const auto config = testing::small_test_config();
  for (int ep = 1; ep <= world_size(); ep *= 2) {
    const auto replicated = train_steps_on(MPI_COMM_WORLD, config, ep);
    ASSERT_EQ(replicated.size(), 20u);
    expect_same_curve(train_steps_on(MPI_COMM_WORLD, sharded(config), ep), replicated,
                      "ZeRO-1 at ep_size " + std::to_string(ep), 1e-6);
  }
}

// bf16 with ZeRO-1 at ep_size 2: ten steps, a checkpoint, ten more equal twenty straight, bit
// for bit (the checkpoint gathers the fp32 master chunks and each rank takes its own back).
TEST(DistributedOptimizer, Bf16ShardedResumeIsBitwiseExact) {
  auto config = sharded(testing::small_test_config());
  config.train.precision = Precision::kBf16;
  config.train.out_dir = testing::shared_scratch_dir("zero-bf16-resume");
  const int ep = std::min(2, world_size());
  const auto straight = train_steps_on(MPI_COMM_WORLD, config, ep);
  train_steps_on(MPI_COMM_WORLD, config, ep, /*stop_at=*/10, std::nullopt, /*write=*/true);
  const auto resumed = train_steps_on(MPI_COMM_WORLD, config, ep, 0, std::string("latest"));
  testing::expect_identical_curve(resumed, {straight.begin() + 10, straight.end()},
                                  "bf16 ZeRO-1 resume");
  MPI_Barrier(MPI_COMM_WORLD);
  if (world_rank() == 0) std::filesystem::remove_all(config.train.out_dir);
}

// A ZeRO-1 checkpoint written by 4 ranks resumes on 2 and one written by 2 resumes on 4, the
// curve continuing as if uninterrupted (the global batch is kept: 2 ranks accumulate 2
// micro-batches where 4 ranks take one each).
TEST(DistributedOptimizer, CheckpointsMoveBetweenTwoAndFourRanks) {
  if (world_size() != 4) GTEST_SKIP() << "needs exactly 4 ranks";
  const bool in_pair = world_rank() < 2;
  MPI_Comm pair;
  MPI_Comm_split(MPI_COMM_WORLD, in_pair ? 0 : MPI_UNDEFINED, world_rank(), &pair);
  auto four = sharded(testing::small_test_config());
  auto two = four;
  two.train.grad_accum = 2;
  for (const bool from_four : {true, false}) {
    const std::string what = from_four ? "4 -> 2 ranks" : "2 -> 4 ranks";
    auto& writer = from_four ? four : two;
    auto& reader = from_four ? two : four;
    writer.train.out_dir = reader.train.out_dir = testing::shared_scratch_dir("zero-reshard");
    const auto straight = train_steps_on(MPI_COMM_WORLD, four, 2);
    if (from_four)
      train_steps_on(MPI_COMM_WORLD, four, 2, 10, std::nullopt, true);
    else if (in_pair)
      train_steps_on(pair, two, 1, 10, std::nullopt, true);
    MPI_Barrier(MPI_COMM_WORLD);
    std::vector<StepMetrics> resumed;
    if (!from_four)
      resumed = train_steps_on(MPI_COMM_WORLD, four, 2, 0, std::string("latest"));
    else if (in_pair)
      resumed = train_steps_on(pair, two, 1, 0, std::string("latest"));
    if (!from_four || in_pair)
      expect_same_curve(resumed, {straight.begin() + 10, straight.end()}, what);
    MPI_Barrier(MPI_COMM_WORLD);
    if (world_rank() == 0) std::filesystem::remove_all(writer.train.out_dir);
  }
  if (in_pair) MPI_Comm_free(&pair);
}

// Gradients summed in bf16 (parallel.grad_reduce_dtype: bf16) round each bucket's sums to bf16;
// accumulation and the update stay fp32, so the curve stays within 1% of fp32 communication.
TEST(GradientReduction, Bf16CommunicationStaysCloseToFp32) {
  auto config = testing::small_test_config();
  const auto fp32 = train_steps_on(MPI_COMM_WORLD, config, 1);
  config.parallel.grad_reduce_dtype = Precision::kBf16;
  for (const bool shard : {false, true}) {
    config.parallel.distributed_optimizer = shard;
    const auto bf16 = train_steps_on(MPI_COMM_WORLD, config, 1);
    ASSERT_EQ(bf16.size(), fp32.size());
    for (size_t i = 0; i < fp32.size(); ++i)
      EXPECT_LE(testing::relative_difference(bf16[i].loss, fp32[i].loss), 0.01)
          << "step " << i + 1 << (shard ? " (sharded)" : "");
  }
}

}  // namespace
}  // namespace moeforge

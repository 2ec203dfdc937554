// Multi-rank behaviour, run by ctest under mpiexec (2 and 4 ranks): data-parallel gradients,
// expert-parallel invariance, accumulation equivalence and checkpoint resharding. Every check
// compares against an independent single-process run of the same global batch.
#include <gtest/gtest.h>

#include <filesystem>

#include "parallel/mpi_communicator.hpp"
#include "parallel/process_groups.hpp"
#include "test_support.hpp"
#include "trainer/data.hpp"
#include "trainer/trainer.hpp"

namespace moeforge {
namespace {

using testing::relative_difference;
using testing::relative_error;
using testing::small_test_config;

int world_size() {
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

TokenDataset open_data(const Config& c) {
  return TokenDataset::open(c.data, c.model.vocab_size, c.train.seq_len);
}

RunOptions quiet() {
  RunOptions o;
  o.write_outputs = false;
  o.print = false;
  return o;
}

// Gradients of the whole world on one global batch equal one process's gradients on the
// concatenated batch (non-expert: replicated; expert: this rank's slice of the full stack).
TEST(DataParallel, GradientsEqualSingleProcessOnConcatenatedBatch) {
  const int world = world_size();
  for (int ep : {1, world}) {
    auto config = small_test_config();
    config.moe.balancing.aux_loss.coeff = 0.0;  // micro-batch aux loss is not additive
    config.parallel.ep_size = ep;
    config.parallel.bucket_mb = 0.01;  // several buckets
    parallel::MpiCommunicator world_comm(MPI_COMM_WORLD);
    const auto groups = parallel::make_process_groups(world_comm, ep);
    Trainer distributed(config, groups, open_data(config), quiet());
    const double loss = distributed.compute_gradients(0);

    auto single_config = config;
    single_config.parallel.ep_size = 1;
    single_config.train.micro_batch_size = config.train.micro_batch_size * world;
    const auto self = parallel::make_single_process_groups();
    Trainer single(single_config, self, open_data(single_config), quiet());
    const double single_loss = single.compute_gradients(0);
    EXPECT_LT(relative_difference(loss, single_loss), 1e-5) << "ep " << ep;

    std::map<std::string, at::Tensor> reference;
    for (const auto& p : single.model().named_parameters()) reference[p.key()] = p.value().grad();
    const auto layers = distributed.model().moe_layers();
    for (const auto& p : distributed.model().named_parameters()) {
      auto expected = reference.at(p.key());
      if (is_expert_parameter(p.key())) {
        expected = expected.narrow(0, layers.front()->first_local_expert(),
                                   layers.front()->num_local_experts());
      }
      EXPECT_LT(relative_error(p.value().grad(), expected), 1e-5) << p.key() << " ep " << ep;
    }
  }
}

std::vector<StepMetrics> train_steps(Config config, int ep, int64_t stop_at = 0,
                                     std::optional<std::string> resume = std::nullopt,
                                     bool write = false) {
  config.parallel.ep_size = ep;
  parallel::MpiCommunicator world_comm(MPI_COMM_WORLD);
  const auto groups = parallel::make_process_groups(world_comm, ep);
  RunOptions options = quiet();
  options.stop_at_step = stop_at;
  options.resume = resume;
  options.write_outputs = write;
  Trainer trainer(config, groups, open_data(config), options);
  return trainer.run().steps;
}

void expect_same_curve(const std::vector<StepMetrics>& actual,
                       const std::vector<StepMetrics>& expected, const std::string& what) {
  ASSERT_EQ(actual.size(), expected.size()) << what;
  for (size_t i = 0; i < actual.size(); ++i) {
    EXPECT_EQ(actual[i].step, expected[i].step) << what;
    EXPECT_LE(relative_difference(actual[i].loss, expected[i].loss), 1e-5)
        << what << " step " << actual[i].step;
    EXPECT_LE(relative_difference(actual[i].grad_norm, expected[i].grad_norm), 1e-5)
        << what << " step " << actual[i].step;
    EXPECT_LE(relative_difference(actual[i].aux_loss, expected[i].aux_loss), 1e-5)
        << what << " step " << actual[i].step;
  }
}

// The product guarantee: the same seed and data give the same curve for every ep_size.
TEST(ExpertParallel, LossAndGradNormInvariantToEpSize) {
  const auto config = small_test_config();
  const auto reference = train_steps(config, 1);
  ASSERT_EQ(reference.size(), 20u);
  for (int ep = 2; ep <= world_size(); ep *= 2) {
    expect_same_curve(train_steps(config, ep), reference, "ep_size " + std::to_string(ep));
  }
}

// W ranks × 1 micro-batch == 1 rank × W accumulation micro-batches (micro-batch aux scope).
TEST(DataParallel, RanksEqualAccumulationMicroBatches) {
  auto config = small_test_config();
  config.train.steps = 8;
  const auto distributed = train_steps(config, 1);

  auto single_config = config;
  single_config.train.grad_accum = world_size();
  const auto self = parallel::make_single_process_groups();
  Trainer single(single_config, self, open_data(single_config), quiet());
  expect_same_curve(distributed, single.run().steps, "accumulation");
}

// Save at ep_size 2, resume at every other ep_size: the curve continues as if uninterrupted.
TEST(Checkpoint, ReshardsAcrossEpSizes) {
  const int world = world_size();
  if (world < 2) GTEST_SKIP() << "needs 2+ ranks";
  auto config = small_test_config();
  config.train.out_dir = testing::shared_scratch_dir("reshard");
  const auto uninterrupted = train_steps(config, 2);
  train_steps(config, 2, /*stop_at=*/10, std::nullopt, /*write=*/true);
  const std::vector<StepMetrics> tail(uninterrupted.begin() + 10, uninterrupted.end());
  for (int ep = 1; ep <= world; ep *= 2) {
    const auto resumed = train_steps(config, ep, 0, std::string("latest"));
    expect_same_curve(resumed, tail, "resumed at ep_size " + std::to_string(ep));
  }
  MPI_Barrier(MPI_COMM_WORLD);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank == 0) std::filesystem::remove_all(config.train.out_dir);
}

}  // namespace
}  // namespace moeforge

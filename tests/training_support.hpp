#pragma once
// Shared helpers for tests that train: run a Trainer on given groups and compare loss curves.
#include <gtest/gtest.h>

#include <optional>
#include <string>
#include <vector>

#include "parallel/mpi_communicator.hpp"
#include "parallel/process_groups.hpp"
#include "test_support.hpp"
#include "trainer/data/data.hpp"
#include "trainer/trainer.hpp"

namespace moeforge::testing {

inline RunOptions quiet_run(bool write = false) {
  RunOptions o;
  o.print = false;
  o.write_outputs = write;
  return o;
}

inline RunSummary train_on(const Config& config, const parallel::ProcessGroups& groups,
                           RunOptions options) {
  Trainer trainer(config, groups,
                  TokenDataset::open(config.data, config.model.vocab_size, config.train.seq_len),
                  std::move(options));
  return trainer.run();
}

// One process (no MPI groups needed).
inline RunSummary train_single(const Config& config, RunOptions options) {
  return train_on(config, parallel::make_single_process_groups(), std::move(options));
}

// One process: trains `config` from scratch up to `step` and checkpoints there.
inline void train_to_checkpoint(const Config& config, int64_t step) {
  auto options = quiet_run(true);
  options.stop_at_step = step;
  train_single(config, options);
}

// One process: resumes the newest checkpoint of config.train.out_dir, up to `stop_at` (0 = the
// configured end).
inline RunSummary resume_latest(const Config& config, int64_t stop_at = 0) {
  auto options = quiet_run(true);
  options.resume = "latest";
  options.stop_at_step = stop_at;
  return train_single(config, options);
}

// Trains on the ranks of `comm` (MPI_COMM_WORLD or a sub-communicator) with `ep` experts-ranks.
inline std::vector<StepMetrics> train_steps_on(MPI_Comm comm, Config config, int ep,
                                               int64_t stop_at = 0,
                                               std::optional<std::string> resume = std::nullopt,
                                               bool write = false) {
  config.parallel.ep_size = ep;
  MPI_Comm own = comm;  // the communicator frees what it holds: give it a copy of a split
  if (comm != MPI_COMM_WORLD) MPI_Comm_dup(comm, &own);
  parallel::MpiCommunicator world(own);
  const auto groups = parallel::make_process_groups(world, ep);
  RunOptions options = quiet_run(write);
  options.stop_at_step = stop_at;
  options.resume = resume;
  return train_on(config, groups, options).steps;
}

// Loss, gradient norm and aux loss of every step within `tolerance` (relative).
inline void expect_same_curve(const std::vector<StepMetrics>& actual,
                              const std::vector<StepMetrics>& expected, const std::string& what,
                              double tolerance = 1e-5) {
  ASSERT_EQ(actual.size(), expected.size()) << what;
  for (size_t i = 0; i < actual.size(); ++i) {
    EXPECT_EQ(actual[i].step, expected[i].step) << what;
    EXPECT_LE(relative_difference(actual[i].loss, expected[i].loss), tolerance)
        << what << " step " << actual[i].step;
    EXPECT_LE(relative_difference(actual[i].grad_norm, expected[i].grad_norm), tolerance)
        << what << " step " << actual[i].step;
    EXPECT_LE(relative_difference(actual[i].aux_loss, expected[i].aux_loss), tolerance)
        << what << " step " << actual[i].step;
  }
}

// Bitwise: the same losses and gradient norms, step by step.
inline void expect_identical_curve(const std::vector<StepMetrics>& actual,
                                   const std::vector<StepMetrics>& expected,
                                   const std::string& what) {
  ASSERT_EQ(actual.size(), expected.size()) << what;
  for (size_t i = 0; i < actual.size(); ++i) {
    EXPECT_EQ(actual[i].step, expected[i].step) << what;
    EXPECT_EQ(actual[i].loss, expected[i].loss) << what << " step " << actual[i].step;
    EXPECT_EQ(actual[i].grad_norm, expected[i].grad_norm) << what << " step " << actual[i].step;
  }
}

}  // namespace moeforge::testing

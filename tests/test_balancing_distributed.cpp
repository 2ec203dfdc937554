// Balancing across ranks, run by ctest under mpiexec (2 and 4 ranks): the global-batch aux loss
// is independent of how the global batch is split over ranks and micro-batches; the expert bias
// is updated once per optimizer step from world-wide counts; every combination of balancing
// methods and routing variants parses and trains a step under ep_size 2.
#include <gtest/gtest.h>

#include <map>

#include "parallel/mpi_communicator.hpp"
#include "parallel/process_groups.hpp"
#include "test_support.hpp"
#include "trainer/common/user_error.hpp"
#include "trainer/data/data.hpp"
#include "trainer/trainer.hpp"
#include "training_support.hpp"

namespace moeforge {
namespace {

using testing::relative_difference;
using testing::relative_error;
using testing::small_test_config;

int world_rank_and_size(int* size) {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, size);
  return rank;
}

TokenDataset open_data(const Config& c) {
  return TokenDataset::open(c.data, c.model.vocab_size, c.train.seq_len);
}

struct GradientResult {
  Trainer::LossTerms terms;
  std::map<std::string, at::Tensor> dense_grads;  // non-expert parameters (replicated)
};

// Gradients of one global batch computed by groups of `group_size` ranks, each group on its own
// (every group computes the same global batch: same samples, split differently).
GradientResult gradients_in_groups(const Config& base, int group_size) {
  int world = 1;
  const int rank = world_rank_and_size(&world);
  MPI_Comm group_comm;
  MPI_Comm_split(MPI_COMM_WORLD, rank / group_size, rank, &group_comm);
  parallel::MpiCommunicator group(group_comm);
  auto config = base;
  config.train.grad_accum = base.train.grad_accum / group_size;
  const auto groups = parallel::make_process_groups(group, 1);
  Trainer trainer(config, groups, open_data(config), testing::quiet_run());
  GradientResult result;
  result.terms = trainer.compute_gradients(0);
  for (const auto& p : trainer.model().named_parameters())
    if (!is_expert_parameter(p.key())) result.dense_grads[p.key()] = p.value().grad().clone();
  return result;
}

// "Demons in the Detail": f over the global batch. 1 rank × W micro-batches, W/2 ranks × 2 and
// W ranks × 1 give the same loss and gradients, equal to one process holding the whole global
// batch in one micro-batch (where every scope's f is the global one).
TEST(GlobalBatchAuxLoss, IndependentOfHowTheBatchIsSplit) {
  int world = 1;
  world_rank_and_size(&world);
  auto config = small_test_config();
  config.moe.balancing.aux_loss.coeff = 0.5;  // large, so its gradient dominates the router's
  config.moe.balancing.aux_loss.scope = moe::AuxLossScope::kGlobalBatch;
  config.train.grad_accum = world;  // the global batch: world micro-batches

  auto whole = config;
  whole.moe.balancing.aux_loss.scope = moe::AuxLossScope::kMicroBatch;
  whole.train.micro_batch_size = config.train.micro_batch_size * world;
  whole.train.grad_accum = 1;
  const auto self = parallel::make_single_process_groups();
  Trainer reference_trainer(whole, self, open_data(whole), testing::quiet_run());
  const auto reference_terms = reference_trainer.compute_gradients(0);
  std::map<std::string, at::Tensor> reference;
  for (const auto& p : reference_trainer.model().named_parameters())
    reference[p.key()] = p.value().grad();

  for (int group_size = 1; group_size <= world; group_size *= 2) {
    const auto result = gradients_in_groups(config, group_size);
    const auto what = std::to_string(group_size) + " ranks × " +
                      std::to_string(world / group_size) + " micro-batches";
    EXPECT_LT(relative_difference(result.terms.aux, reference_terms.aux), 1e-5) << what;
    EXPECT_LT(relative_difference(result.terms.loss, reference_terms.loss), 1e-5) << what;
    for (const auto& [name, grad] : result.dense_grads)
      EXPECT_LT(relative_error(grad, reference.at(name)), 1e-5) << name << ", " << what;
  }

  // The check has teeth: the micro-batch scope gives a different (smaller-f-correlation) loss.
  if (world > 1) {
    auto micro = config;
    micro.moe.balancing.aux_loss.scope = moe::AuxLossScope::kMicroBatch;
    const auto micro_result = gradients_in_groups(micro, 1);
    EXPECT_GT(relative_difference(micro_result.terms.aux, reference_terms.aux), 1e-4);
  }
}

// b += rate · sign(mean − load) once per optimizer step, from the load of the whole global batch
// summed over all ranks and micro-batches; identical on every rank; equal to one process
// accumulating the same global batch.
TEST(ExpertBias, UpdatedOncePerStepFromWorldCounts) {
  int world = 1;
  world_rank_and_size(&world);
  auto config = small_test_config();
  config.moe.balancing.expert_bias.rate = 0.01;
  config.train.grad_accum = 2;
  config.train.steps = 1;
  config.train.warmup_steps = 0;
  config.parallel.ep_size = world >= 2 ? 2 : 1;
  parallel::MpiCommunicator world_comm(MPI_COMM_WORLD);
  const auto groups = parallel::make_process_groups(world_comm, config.parallel.ep_size);
  Trainer distributed(config, groups, open_data(config), testing::quiet_run());
  const auto steps = distributed.run().steps;
  ASSERT_EQ(steps.size(), 1u);

  auto single_config = config;
  single_config.parallel.ep_size = 1;
  single_config.train.grad_accum = 2 * world;
  const auto self = parallel::make_single_process_groups();
  Trainer single(single_config, self, open_data(single_config), testing::quiet_run());
  const auto single_steps = single.run().steps;

  const auto layers = distributed.model().moe_layers();
  const auto single_layers = single.model().moe_layers();
  for (size_t i = 0; i < layers.size(); ++i) {
    const auto& load = steps[0].layers[i].expert_load;
    EXPECT_EQ(load, single_steps[0].layers[i].expert_load) << "layer " << i;
    double mean = 0;
    for (const auto v : load) mean += static_cast<double>(v) / static_cast<double>(load.size());
    const auto bias = layers[i]->router->expert_bias;
    for (size_t e = 0; e < load.size(); ++e) {
      const double expected = load[e] < mean ? 0.01 : load[e] > mean ? -0.01 : 0.0;
      EXPECT_FLOAT_EQ(bias[static_cast<int64_t>(e)].item<float>(), static_cast<float>(expected))
          << "layer " << i << " expert " << e;
    }
    EXPECT_TRUE(at::equal(bias, single_layers[i]->router->expert_bias));
    // Identical on every rank.
    auto low = bias.clone(), high = bias.clone();
    MPI_Allreduce(MPI_IN_PLACE, low.data_ptr<float>(), static_cast<int>(low.numel()), MPI_FLOAT,
                  MPI_MIN, MPI_COMM_WORLD);
    MPI_Allreduce(MPI_IN_PLACE, high.data_ptr<float>(), static_cast<int>(high.numel()), MPI_FLOAT,
                  MPI_MAX, MPI_COMM_WORLD);
    EXPECT_TRUE(at::equal(low, high)) << "layer " << i;
  }
}

// Every combination of balancing methods × routing variants parses (through the YAML loader and
// its validation) and trains one step with finite numbers under ep_size 2.
TEST(Balancing, EveryCombinationParsesAndRunsOneStepUnderEp2) {
  int world = 1;
  world_rank_and_size(&world);
  if (world < 2) GTEST_SKIP() << "needs 2+ ranks";
  auto base = small_test_config();
  base.model.num_layers = 1;
  base.train.steps = 1;
  base.train.warmup_steps = 0;
  base.train.grad_accum = 2;
  base.parallel.ep_size = 2;
  const std::string yaml = to_yaml(base);
  const std::vector<std::vector<std::string>> aux = {
      {"moe.balancing.aux_loss.coeff=0"},
      {"moe.balancing.aux_loss.coeff=0.01", "moe.balancing.aux_loss.scope=micro_batch"},
      {"moe.balancing.aux_loss.coeff=0.01", "moe.balancing.aux_loss.scope=sequence"},
      {"moe.balancing.aux_loss.coeff=0.01", "moe.balancing.aux_loss.scope=global_batch"}};
  const std::vector<std::vector<std::string>> z = {{"moe.balancing.z_loss.coeff=0"},
                                                   {"moe.balancing.z_loss.coeff=0.001"}};
  const std::vector<std::vector<std::string>> bias = {
      {"moe.balancing.expert_bias.rate=0"},
      {"moe.balancing.expert_bias.rate=0.01", "moe.balancing.expert_bias.mean_center=true"}};
  const std::vector<std::vector<std::string>> capacity = {
      {"moe.capacity.factor=0"},
      {"moe.capacity.factor=1.0", "moe.capacity.drop_policy=probs"},
      {"moe.capacity.factor=1.0", "moe.capacity.drop_policy=position", "moe.capacity.pad=true",
       "moe.capacity.eval_factor=2.0"}};
  const std::vector<std::vector<std::string>> routing = {
      {"moe.router.score=softmax"},
      {"moe.router.score=sigmoid"},
      {"moe.router.score=sigmoid", "moe.router.num_groups=4", "moe.router.topk_groups=2"},
      {"moe.router.routing=expert_choice"},
      {"moe.router.num_null_experts=2", "moe.router.jitter_eps=0.01"}};
  parallel::MpiCommunicator world_comm(MPI_COMM_WORLD);
  const auto groups = parallel::make_process_groups(world_comm, 2);
  int combinations = 0;
  for (const auto& a : aux)
    for (const auto& zz : z)
      for (const auto& b : bias)
        for (const auto& c : capacity)
          for (const auto& r : routing) {
            std::vector<std::string> overrides;
            for (const auto* part : {&a, &zz, &b, &c, &r})
              overrides.insert(overrides.end(), part->begin(), part->end());
            std::string what;
            for (const auto& o : overrides) what += o + " ";
            Config config;
            ASSERT_NO_THROW(config = load_config_from_string(yaml, "combination", overrides))
                << what;
            Trainer trainer(config, groups, open_data(config), testing::quiet_run());
            const auto steps = trainer.run().steps;
            ASSERT_EQ(steps.size(), 1u) << what;
            EXPECT_TRUE(std::isfinite(steps[0].loss) && std::isfinite(steps[0].aux_loss) &&
                        std::isfinite(steps[0].grad_norm))
                << what;
            ++combinations;
          }
  EXPECT_EQ(combinations, 4 * 2 * 2 * 3 * 5);
}

}  // namespace
}  // namespace moeforge

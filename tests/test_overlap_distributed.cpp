// Communication overlap under mpiexec (2 and 4 ranks): the pipelined MoE layer
// (overlap_degree 2, 4) equals one chunk for every routing/capacity mode, forward and backward;
// gradient buckets all-reduced during backward equal the blocking path; whole training runs
// are the same with and without the communication worker; the simulated link never makes a
// collective faster than its model.
#include <gtest/gtest.h>

#include <chrono>

#include "moe/moe_layer.hpp"
#include "parallel/mpi_communicator.hpp"
#include "parallel/process_groups.hpp"
#include "parallel/simulated_link.hpp"
#include "test_support.hpp"
#include "trainer/data/data.hpp"
#include "trainer/trainer.hpp"
#include "training_support.hpp"

namespace moeforge {
namespace {

using testing::relative_difference;
using testing::relative_error;
using testing::world_size;

struct Mode {
  const char* name;
  std::function<void(MoeConfig&)> apply;
};

struct LayerResult {
  at::Tensor y, x_grad, router_grad, w_up_grad, shared_grad;
};

LayerResult run_layer(const MoeConfig& config, parallel::Communicator& ep, int64_t chunks,
                      int rank) {
  moe::MoeLayer layer(16, config, ep);
  {
    at::NoGradGuard no_grad;
    for (const auto& p : layer->named_parameters()) {
      // Same global weights on every rank: seed by name, slice this rank's experts.
      at::manual_seed(std::hash<std::string>{}(p.key()) % 100000);
      auto full = at::randn(p.key().find("experts.") == 0
                                ? std::vector<int64_t>{config.num_experts, p.value().size(1),
                                                       p.value().size(2)}
                                : p.value().sizes().vec()) *
                  0.5;
      if (p.key().find("experts.") == 0)
        full = full.narrow(0, layer->first_local_expert(), layer->num_local_experts());
      p.value().copy_(full);
    }
  }
  layer->set_overlap_degree(chunks);
  layer->train();
  at::manual_seed(1000 + rank);
  const auto x = at::randn({24, 16}).set_requires_grad(true);
  const auto out = layer->forward(x, 8);
  const auto weight = at::randn({24, 16});
  ((out.y * weight).sum() + out.aux_loss).backward();
  LayerResult r{
      out.y.detach(), x.grad(), layer->router->weight.grad(), layer->experts->w_up.grad(), {}};
  if (layer->shared_experts) r.shared_grad = layer->shared_experts->w_up.grad();
  return r;
}

TEST(Overlap, PipelinedLayerEqualsOneChunkInEveryMode) {
  const int world = world_size();
  parallel::MpiCommunicator world_comm(MPI_COMM_WORLD);
  const auto groups = parallel::with_communication_options(
      parallel::make_process_groups(world_comm, world), /*worker=*/true, parallel::LinkModel{});
  const std::vector<Mode> modes = {
      {"dropless", [](MoeConfig&) {}},
      {"capacity probs", [](MoeConfig& c) { c.capacity.factor = 1.0; }},
      {"capacity position + pad",
       [](MoeConfig& c) {
         c.capacity.factor = 1.0;
         c.capacity.drop_policy = moe::DropPolicy::kPosition;
         c.capacity.pad = true;
       }},
      {"expert choice", [](MoeConfig& c) { c.router.routing = moe::Routing::kExpertChoice; }},
      {"null experts + sigmoid",
       [](MoeConfig& c) {
         c.router.num_null_experts = 2;
         c.router.score = moe::ScoreFunction::kSigmoid;
       }},
      {"group-limited + shared expert + aux", [](MoeConfig& c) {
         c.router.num_groups = 4;
         c.router.topk_groups = 2;
         c.num_shared_experts = 1;
         c.balancing.aux_loss.coeff = 0.1;
         c.balancing.aux_loss.scope = moe::AuxLossScope::kSequence;
       }}};
  for (const auto& mode : modes) {
    MoeConfig config;
    config.num_experts = 8;
    config.top_k = 2;
    config.expert_ffn_size = 12;
    mode.apply(config);
    SCOPED_TRACE(mode.name);
    const auto reference = run_layer(config, *groups.ep, 1, world_comm.rank());
    for (const int64_t chunks : {2, 4}) {
      const auto r = run_layer(config, *groups.ep, chunks, world_comm.rank());
      const auto what = std::string(mode.name) + ", overlap_degree " + std::to_string(chunks);
      ASSERT_TRUE(r.x_grad.defined()) << what;
      ASSERT_TRUE(r.router_grad.defined()) << what;
      ASSERT_TRUE(r.w_up_grad.defined()) << what;
      ASSERT_TRUE(reference.x_grad.defined() && reference.router_grad.defined() &&
                  reference.w_up_grad.defined())
          << what << " (reference)";
      EXPECT_LE(relative_error(r.y, reference.y), 1e-6) << what;
      EXPECT_LE(relative_error(r.x_grad, reference.x_grad), 1e-6) << what;
      EXPECT_LE(relative_error(r.router_grad, reference.router_grad), 1e-6) << what;
      EXPECT_LE(relative_error(r.w_up_grad, reference.w_up_grad), 1e-6) << what;
      if (reference.shared_grad.defined()) {
        EXPECT_LE(relative_error(r.shared_grad, reference.shared_grad), 1e-6) << what;
      }
    }
  }
}

TokenDataset open_data(const Config& c) {
  return TokenDataset::open(c.data, c.model.vocab_size, c.train.seq_len);
}

TEST(Overlap, GradientSyncDuringBackwardEqualsBlockingSync) {
  const int world = world_size();
  parallel::MpiCommunicator world_comm(MPI_COMM_WORLD);
  for (const int ep : {1, world}) {
    auto config = testing::small_test_config();
    config.parallel.ep_size = ep;
    config.parallel.bucket_mb = 0.005;  // many buckets, so some finish early
    config.train.grad_accum = 2;
    const auto groups = parallel::make_process_groups(world_comm, ep);
    std::map<std::string, at::Tensor> blocking_grads;
    double blocking_loss = 0;
    {
      auto blocking = config;
      blocking.parallel.overlap_grad_sync = false;
      Trainer trainer(blocking, groups, open_data(blocking), testing::quiet_run());
      blocking_loss = trainer.compute_gradients(0).loss;
      EXPECT_EQ(trainer.buckets_launched_during_backward(), 0);
      for (const auto& p : trainer.model().named_parameters())
        blocking_grads[p.key()] = p.value().grad().clone();
    }
    Trainer trainer(config, groups, open_data(config), testing::quiet_run());
    EXPECT_EQ(trainer.compute_gradients(0).loss, blocking_loss);
    EXPECT_GT(trainer.buckets_launched_during_backward(), 0) << "nothing overlapped backward";
    for (const auto& p : trainer.model().named_parameters())
      EXPECT_LE(relative_error(p.value().grad(), blocking_grads.at(p.key())), 1e-6)
          << p.key() << " ep " << ep;
  }
}

TEST(Overlap, TrainingIsTheSameWithAndWithoutTheWorker) {
  const int world = world_size();
  parallel::MpiCommunicator world_comm(MPI_COMM_WORLD);
  auto config = testing::small_test_config();
  config.train.steps = 6;
  config.parallel.ep_size = world;
  const auto groups = parallel::make_process_groups(world_comm, world);
  auto blocking = config;
  blocking.parallel.comm_worker = false;
  const auto reference =
      Trainer(blocking, groups, open_data(blocking), testing::quiet_run()).run().steps;
  config.parallel.overlap_degree = 3;
  const auto overlapped =
      Trainer(config, groups, open_data(config), testing::quiet_run()).run().steps;
  ASSERT_EQ(overlapped.size(), reference.size());
  for (size_t i = 0; i < reference.size(); ++i) {
    EXPECT_LE(relative_difference(overlapped[i].loss, reference[i].loss), 1e-6) << "step " << i;
    EXPECT_LE(relative_difference(overlapped[i].grad_norm, reference[i].grad_norm), 1e-5);
  }
}

TEST(SimulatedLink, CollectivesTakeAtLeastTheirModelledTime) {
  parallel::MpiCommunicator world_comm(MPI_COMM_WORLD);
  const int world = world_comm.size();
  const parallel::LinkModel link{0.01, 2000.0};  // 10 MB/s, 2 ms
  // Closed forms of the model.
  EXPECT_DOUBLE_EQ(link.all_to_all_seconds(100000, 50000), 0.002 + 100000 / 1e7);
  EXPECT_DOUBLE_EQ(link.all_reduce_seconds(40000, 4), 6 * 0.002 + 1.5 * 40000 / 1e7);
  EXPECT_DOUBLE_EQ(link.all_reduce_seconds(40000, 1), 0.0);
  EXPECT_DOUBLE_EQ(link.barrier_seconds(4), 2 * 0.002);
  const auto groups = parallel::with_communication_options(
      parallel::make_process_groups(world_comm, world), true, link);
  // 1000 rows of 64 floats to every peer.
  std::vector<parallel::RowBlock> send, recv;
  for (int p = 0; p < world; ++p) {
    send.push_back({p, p * 1000, 1000});
    recv.push_back({p, p * 1000, 1000});
  }
  const auto input = at::randn({1000 * world, 64});
  const auto start = std::chrono::steady_clock::now();
  const auto out = groups.world->all_to_all_blocks(input, send, recv, 1000 * world);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const int64_t bytes = int64_t{1000} * 64 * 4 * (world - 1);
  EXPECT_GE(seconds, link.all_to_all_seconds(bytes, bytes));
  // The data is the real exchange's.
  EXPECT_TRUE(at::equal(out.narrow(0, world_comm.rank() * 1000, 1000),
                        input.narrow(0, world_comm.rank() * 1000, 1000)));
}

}  // namespace
}  // namespace moeforge

// Multi-rank behaviour, run by ctest under mpiexec (2 and 4 ranks): data-parallel gradients,
// expert-parallel invariance, accumulation equivalence and checkpoint resharding. Every check
// compares against an independent single-process run of the same global batch.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "moe/moe_layer.hpp"
#include "parallel/all_to_all.hpp"
#include "parallel/mpi_communicator.hpp"
#include "parallel/process_groups.hpp"
#include "test_support.hpp"
#include "trainer/data/builtin_corpus.hpp"
#include "trainer/data/data.hpp"
#include "trainer/trainer.hpp"
#include "training_support.hpp"

namespace moeforge {
namespace {

using testing::relative_difference;
using testing::relative_error;
using testing::small_test_config;
using testing::world_size;

TokenDataset open_data(const Config& c) {
  return TokenDataset::open(c.data, c.model.vocab_size, c.train.seq_len);
}

// Block all-to-all against an explicit expectation: every rank sends 3 blocks (some empty) to
// every rank, in an interleaved order, and the receivers place them in a different order; rows
// carry their origin so misplaced rows show. Backward must route each output row's gradient
// back to the input row it came from.
TEST(AllToAllBlocks, PlacesBlocksAndRoutesGradientsBack) {
  parallel::MpiCommunicator world(MPI_COMM_WORLD);
  const int rank = world.rank(), size = world.size();
  const auto rows_of = [](int source, int dest, int k) {
    return int64_t{(source + 2 * dest + k) % 3};
  };
  const auto value = [](int source, int dest, int k, int64_t i) {
    return static_cast<float>(source * 1000 + dest * 100 + k * 10 + i);
  };
  std::vector<parallel::RowBlock> send, recv;
  std::vector<float> input_values;
  int64_t offset = 0;
  for (int k = 0; k < 3; ++k)
    for (int dest = 0; dest < size; ++dest) {
      const int64_t rows = rows_of(rank, dest, k);
      send.push_back({dest, offset, rows});
      for (int64_t i = 0; i < rows; ++i) input_values.push_back(value(rank, dest, k, i));
      offset += rows;
    }
  std::vector<float> expected;
  int64_t out_rows = 0;
  for (int source = size - 1; source >= 0; --source)  // sources in reverse; per source, k order
    for (int k = 0; k < 3; ++k) {
      const int64_t rows = rows_of(source, rank, k);
      recv.push_back({source, out_rows, rows});
      for (int64_t i = 0; i < rows; ++i) expected.push_back(value(source, rank, k, i));
      out_rows += rows;
    }
  const auto column = at::tensor(input_values, at::kFloat).view({-1, 1});
  const auto input = at::cat({column, 2 * column}, 1).set_requires_grad(true);
  const auto out = parallel::all_to_all_blocks_autograd(input, world, send, recv, out_rows);
  ASSERT_EQ(out.size(0), out_rows);
  const auto expected_column = at::tensor(expected, at::kFloat).view({-1, 1});
  EXPECT_TRUE(at::equal(out, at::cat({expected_column, 2 * expected_column}, 1)));

  // Loss weights = 3 × the row's value, so each input row's gradient must be 3 × its own value.
  (out * 3 * out.detach()).sum().backward();
  EXPECT_TRUE(at::equal(input.grad(), 3 * input.detach()));
}

// The exchanged rows must die with the graph: a reference from the exchange state to its own
// output is a cycle through the autograd node (output -> grad_fn -> state -> output) that
// leaked every MoE layer's rows on every step at ep_size > 1.
TEST(AllToAllBlocks, ReleasesRowsWithTheGraph) {
  parallel::MpiCommunicator world(MPI_COMM_WORLD);
  const int size = world.size();
  std::vector<parallel::RowBlock> blocks;
  for (int peer = 0; peer < size; ++peer) blocks.push_back({peer, 2 * peer, 2});
  c10::weak_intrusive_ptr<c10::TensorImpl> output_alive{c10::intrusive_ptr<c10::TensorImpl>()};
  c10::weak_intrusive_ptr<c10::TensorImpl> grad_alive{c10::intrusive_ptr<c10::TensorImpl>()};
  {
    const auto input = at::randn({2 * size, 4}).set_requires_grad(true);
    const auto pending = parallel::start_all_to_all_blocks(input, world, blocks, blocks, 2 * size);
    const auto out = parallel::finish_all_to_all_blocks(pending);
    output_alive = c10::weak_intrusive_ptr<c10::TensorImpl>(out.getIntrusivePtr());
    (out * out).sum().backward();
    grad_alive = c10::weak_intrusive_ptr<c10::TensorImpl>(input.grad().getIntrusivePtr());
  }
  EXPECT_TRUE(output_alive.expired()) << "exchange output outlives its graph";
  EXPECT_TRUE(grad_alive.expired()) << "gradient rows outlive the input";
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
    Trainer distributed(config, groups, open_data(config), testing::quiet_run());
    const double loss = distributed.compute_gradients(0).loss;

    auto single_config = config;
    single_config.parallel.ep_size = 1;
    single_config.train.micro_batch_size = config.train.micro_batch_size * world;
    const auto self = parallel::make_single_process_groups();
    Trainer single(single_config, self, open_data(single_config), testing::quiet_run());
    const double single_loss = single.compute_gradients(0).loss;
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

// One MoE layer sharded over the world (ep = W) against the same layer unsharded in one
// process, on each rank's own tokens. Edge cases: a rank whose experts receive no tokens, a
// rank that sends none, capacity drops, uneven counts.
struct LayerCase {
  const char* name;
  double capacity_factor;
  bool starve_last_rank_experts;  // expert bias keeps the last EP rank's experts unselected
  bool last_rank_sends_nothing;
};

TEST(ExpertParallel, LayerMatchesUnshardedLayerInEdgeCases) {
  const int world = world_size();
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  const std::vector<LayerCase> cases = {{"dropless", 0.0, false, false},
                                        {"capacity", 0.5, false, false},
                                        {"starved_rank", 0.0, true, false},
                                        {"empty_sender", 0.0, false, true},
                                        {"capacity_starved_empty", 0.75, true, true}};
  for (const auto& c : cases) {
    MoeConfig config;
    config.num_experts = 2 * world;
    config.top_k = 2;
    config.expert_ffn_size = 6;
    config.num_shared_experts = 1;
    config.capacity.factor = c.capacity_factor;
    parallel::MpiCommunicator world_comm(MPI_COMM_WORLD);
    const auto groups = parallel::make_process_groups(world_comm, world);
    const auto self = parallel::make_single_process_groups();
    moe::MoeLayer sharded(6, config, *groups.ep);
    moe::MoeLayer full(6, config, *self.ep);
    at::manual_seed(11);  // same weights on every rank
    {
      at::NoGradGuard no_grad;
      for (auto& p : full->parameters()) p.normal_(0, 0.5);
      if (c.starve_last_rank_experts)
        full->router->expert_bias.narrow(0, config.num_experts - 2, 2).fill_(-100.0);
      const int64_t first = sharded->first_local_expert(), n = sharded->num_local_experts();
      sharded->router->weight.copy_(full->router->weight);
      sharded->router->expert_bias.copy_(full->router->expert_bias);
      sharded->shared_experts->w_gate.copy_(full->shared_experts->w_gate);
      sharded->shared_experts->w_up.copy_(full->shared_experts->w_up);
      sharded->shared_experts->w_down.copy_(full->shared_experts->w_down);
      sharded->experts->w_gate.copy_(full->experts->w_gate.narrow(0, first, n));
      sharded->experts->w_up.copy_(full->experts->w_up.narrow(0, first, n));
      sharded->experts->w_down.copy_(full->experts->w_down.narrow(0, first, n));
    }
    at::manual_seed(100 + rank);  // each rank its own tokens, uneven counts per expert
    const int64_t tokens = c.last_rank_sends_nothing && rank == world - 1 ? 0 : 9 + 3 * rank;
    const auto x = at::randn({tokens, 6});
    const auto weight = at::randn({tokens, 6});
    const auto xs = x.clone().set_requires_grad(true);
    const auto xf = x.clone().set_requires_grad(true);
    (sharded->forward(xs, std::max<int64_t>(tokens, 1)).y * weight).sum().backward();
    const auto yf = full->forward(xf, std::max<int64_t>(tokens, 1)).y;
    (yf * weight).sum().backward();
    const auto sharded_out = sharded->forward(x, std::max<int64_t>(tokens, 1));
    const auto& ys = sharded_out.y;
    if (tokens > 0) {
      EXPECT_LT(relative_error(ys, yf.detach()), 1e-5) << c.name;
      EXPECT_LT(relative_error(xs.grad(), xf.grad()), 1e-5) << c.name;
    }
    // Router / shared grads are per-rank; expert grads gather every rank's tokens.
    auto router_grad = sharded->router->weight.grad().defined()
                           ? sharded->router->weight.grad()
                           : at::zeros_like(sharded->router->weight);
    auto full_router_grad = full->router->weight.grad().defined()
                                ? full->router->weight.grad()
                                : at::zeros_like(full->router->weight);
    EXPECT_LT((router_grad - full_router_grad).abs().max().item<double>(), 1e-5) << c.name;
    for (const auto& [local, global] :
         {std::pair{sharded->experts->w_gate, full->experts->w_gate},
          std::pair{sharded->experts->w_down, full->experts->w_down}}) {
      auto summed = global.grad().defined() ? global.grad().clone() : at::zeros_like(global);
      groups.world->all_reduce(summed);
      const auto expected =
          summed.narrow(0, sharded->first_local_expert(), sharded->num_local_experts());
      const auto actual = local.grad().defined() ? local.grad() : at::zeros_like(local);
      EXPECT_LT((actual - expected).abs().max().item<double>(), 1e-5) << c.name;
    }
    if (c.starve_last_rank_experts) {
      auto load = moe::read_stats(sharded_out.counters).load.clone();
      groups.world->all_reduce(load);
      EXPECT_EQ(load.narrow(0, config.num_experts - 2, 2).sum().item<int64_t>(), 0) << c.name;
    }
  }
}

std::vector<StepMetrics> train_steps(Config config, int ep, int64_t stop_at = 0,
                                     std::optional<std::string> resume = std::nullopt,
                                     bool write = false) {
  return testing::train_steps_on(MPI_COMM_WORLD, std::move(config), ep, stop_at, resume, write);
}

using testing::expect_same_curve;

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
  Trainer single(single_config, self, open_data(single_config), testing::quiet_run());
  expect_same_curve(distributed, single.run().steps, "accumulation");
}

// Current resident set size of this process in MiB (not the peak).
double resident_mib() {
  std::ifstream statm("/proc/self/statm");
  long long pages = 0, resident = 0;
  statm >> pages >> resident;
  return static_cast<double>(resident) * static_cast<double>(sysconf(_SC_PAGESIZE)) / (1 << 20);
}

// Expert-parallel training must hold no memory across steps: resident memory after 3N steps
// equals that after N (the leak this guards against grew by every exchanged row, ~27 MB per
// step on configs/tiny.yaml; here about 6 MB per step, so 2N = 24 steps would add ~140 MiB).
// Also in bf16, where oneDNN's per-shape kernels grew memory ~1.3 MiB per step until expert
// row counts were rounded to multiples of 64 (moe/grouped_matmul.hpp).
class ResidentMemory : public ::testing::TestWithParam<Precision> {};

TEST_P(ResidentMemory, FlatAcrossExpertParallelSteps) {
  const int world = world_size();
  if (world < 2) GTEST_SKIP() << "needs 2+ ranks";
  auto config = small_test_config();
  config.train.precision = GetParam();
  config.model.hidden_size = 128;
  config.model.max_seq_len = 64;
  config.train.seq_len = 64;
  config.train.micro_batch_size = 8;
  config.parallel.ep_size = world;
  parallel::MpiCommunicator world_comm(MPI_COMM_WORLD);
  const auto groups = parallel::make_process_groups(world_comm, world);
  Trainer trainer(config, groups, open_data(config), testing::quiet_run());
  // bf16 first compiles oneDNN's kernels for the (bounded) set of shapes: ~25 steps here.
  const int64_t n = GetParam() == Precision::kBf16 ? 30 : 12,
                per_step = config.train.micro_batch_size * world;
  int64_t samples = 0;
  const auto steps = [&](int64_t count) {
    for (int64_t i = 0; i < count; ++i, samples += per_step) trainer.compute_gradients(samples);
  };
  steps(n);
  const double after_n = resident_mib();
  steps(2 * n);
  const double after_3n = resident_mib();
  EXPECT_LT(after_3n - after_n, 24.0) << "resident memory grew from " << after_n << " MiB after "
                                      << n << " steps to " << after_3n << " MiB after " << 3 * n;
}

INSTANTIATE_TEST_SUITE_P(Precisions, ResidentMemory,
                         ::testing::Values(Precision::kFp32, Precision::kBf16),
                         [](const auto& info) { return std::string(enum_text(info.param)); });

// Blended Megatron datasets: 12 steps straight equal 6 steps, a checkpoint, a resume and 6
// more, bit for bit, at 2 ranks with experts split over them.
TEST(Data, BlendResumesExactly) {
  const int world = world_size();
  if (world < 2) GTEST_SKIP() << "needs 2+ ranks";
  auto config = small_test_config();
  config.train.out_dir = testing::shared_scratch_dir("blend");
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  const auto prefix = config.train.out_dir + "/corpus_";
  if (rank == 0) {
    const auto corpus = generate_builtin_corpus(60000, 3);
    for (const char* part : {"a", "b"}) {
      std::vector<std::vector<uint16_t>> documents;
      const size_t offset = part[0] == 'a' ? 0 : 30000;
      for (size_t d = 0; d < 100; ++d)
        documents.emplace_back(corpus.begin() + offset + d * 300,
                               corpus.begin() + offset + d * 300 + 150 + d);
      testing::write_indexed_dataset(prefix + part, documents);
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);
  config.data.source = DataSource::kMegatron;
  config.data.blend = "0.7 " + prefix + "a 0.3 " + prefix + "b";
  config.train.steps = 12;
  const auto straight = train_steps(config, world);
  train_steps(config, world, /*stop_at=*/6, std::nullopt, /*write=*/true);
  const auto resumed = train_steps(config, world, 0, std::string("latest"));
  ASSERT_EQ(resumed.size(), 6u);
  for (size_t i = 0; i < 6; ++i) {
    EXPECT_EQ(resumed[i].loss, straight[i + 6].loss) << "step " << resumed[i].step;
    EXPECT_EQ(resumed[i].grad_norm, straight[i + 6].grad_norm) << "step " << resumed[i].step;
  }
  MPI_Barrier(MPI_COMM_WORLD);
  if (rank == 0) std::filesystem::remove_all(config.train.out_dir);
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

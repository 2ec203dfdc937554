// Communication overlap under mpiexec (2 and 4 ranks): the pipelined MoE layer
// (overlap_degree 2, 4) equals one chunk for every routing/capacity mode, forward and backward,
// and so does the deduplicated dispatch (one row per token and rank);
// gradient buckets all-reduced during backward equal the blocking path; two micro-batches
// interleaved through the model (parallel.micro_batch_overlap) compute what each computes alone;
// whole training runs are the same with and without the communication worker, whose MPI
// collectives of different groups may be started in different orders on different ranks; the
// simulated link never makes a collective faster than its model.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <chrono>
#include <map>
#include <numeric>
#include <set>
#include <thread>

#include "moe/moe_layer.hpp"
#include "parallel/mpi_communicator.hpp"
#include "parallel/node_layout.hpp"
#include "parallel/process_groups.hpp"
#include "parallel/queued_communicator.hpp"
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

LayerResult run_layer(const MoeConfig& config, parallel::Communicator& ep, int64_t chunks, int rank,
                      moe::DispatchDedup dedup = moe::DispatchDedup::kNone,
                      int64_t ranks_per_node = 0, moe::ExpertPath path = moe::ExpertPath::kAuto) {
  moe::MoeLayer layer(16, config, ep);
  layer->force_expert_path(path);
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
  layer->set_dedup_dispatch(dedup, ranks_per_node);
  EXPECT_EQ(layer->uses_node_hop(),
            dedup == moe::DispatchDedup::kNode && ranks_per_node > 0 && ranks_per_node < ep.size());
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

// Every routing / capacity mode the dispatcher handles differently.
std::vector<Mode> layer_modes() {
  return {{"dropless", [](MoeConfig&) {}},
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
}

void expect_same_layer_result(const LayerResult& r, const LayerResult& reference,
                              const std::string& what) {
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

MoeConfig layer_config(const Mode& mode) {
  MoeConfig config;
  config.num_experts = 8;
  config.top_k = 2;
  config.expert_ffn_size = 12;
  mode.apply(config);
  return config;
}

// The worker posts MPI collectives and polls them together, so collectives of *different*
// groups need not start in the same order on every rank (MPI requires the order per group
// only): rank 0 queues a large block exchange on group A and then an all-reduce on group B;
// the others all-reduce on B first and queue their exchange only after that all-reduce has
// completed. A worker running one collective at a time deadlocks here (the 30 s watchdog then
// aborts the job); this one completes rank 0's all-reduce while its exchange waits.
TEST(CommWorker, CollectivesOfDifferentGroupsStartInAnyOrder) {
  parallel::MpiCommunicator world_comm(MPI_COMM_WORLD);
  const int rank = world_comm.rank(), world = world_comm.size();
  std::shared_ptr<parallel::MpiCommunicator> a = world_comm.split(0, rank),
                                             b = world_comm.split(0, rank);
  a->set_timeout(30);
  b->set_timeout(30);
  parallel::QueuedCommunicator group_a(a), group_b(b);
  // Every rank sends `rows` rows of its rank number to every rank.
  const int64_t rows = 4096;
  std::vector<parallel::RowBlock> blocks;
  for (int peer = 0; peer < world; ++peer) blocks.push_back({peer, peer * rows, rows});
  const auto input = at::full({world * rows, 64}, static_cast<float>(rank));
  const auto exchange = [&] {
    return group_a.all_to_all_blocks_async(input, blocks, blocks, world * rows);
  };
  const auto expected_rows = at::arange(world, at::kFloat).repeat_interleave(rows);
  const float expected_sum = world * (world - 1) / 2.0f;
  if (rank == 0) {
    auto rows_in = exchange();
    auto sum = group_b.all_reduce_async(at::full({8}, static_cast<float>(rank)));
    EXPECT_TRUE(at::all(sum.wait() == expected_sum).item<bool>());
    EXPECT_FALSE(rows_in.done());  // the others post theirs 0.5 s after the all-reduce
    EXPECT_TRUE(at::equal(rows_in.wait().select(1, 0), expected_rows));
  } else {
    auto sum = group_b.all_reduce_async(at::full({8}, static_cast<float>(rank)));
    EXPECT_TRUE(at::all(sum.wait() == expected_sum).item<bool>());
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    EXPECT_TRUE(at::equal(exchange().wait().select(1, 0), expected_rows));
  }
}

TEST(Overlap, PipelinedLayerEqualsOneChunkInEveryMode) {
  const int world = world_size();
  parallel::MpiCommunicator world_comm(MPI_COMM_WORLD);
  const auto groups = parallel::with_communication_options(
      parallel::make_process_groups(world_comm, world), /*worker=*/true, parallel::LinkModel{});
  const auto modes = layer_modes();
  for (const auto& mode : modes) {
    const auto config = layer_config(mode);
    SCOPED_TRACE(mode.name);
    const auto reference = run_layer(config, *groups.ep, 1, world_comm.rank());
    for (const int64_t chunks : {2, 4}) {
      const auto r = run_layer(config, *groups.ep, chunks, world_comm.rank());
      expect_same_layer_result(
          r, reference, std::string(mode.name) + ", overlap_degree " + std::to_string(chunks));
    }
  }
}

// One row per (token, rank) on the wire, gates applied on the expert side: the same layer as the
// row-per-pick dispatch, forward and every gradient (the gates' included, which come back
// through their own exchange), with and without pipeline chunks, in both expert forms (CPU
// fp32's gathered experts over the received rows, and expand + grouped GEMMs + reduce).
TEST(Overlap, DeduplicatedDispatchEqualsRowDispatchInEveryMode) {
  parallel::MpiCommunicator world_comm(MPI_COMM_WORLD);
  const auto groups =
      parallel::with_communication_options(parallel::make_process_groups(world_comm, world_size()),
                                           /*worker=*/true, parallel::LinkModel{});
  for (const auto& mode : layer_modes()) {
    const auto config = layer_config(mode);
    SCOPED_TRACE(mode.name);
    const auto reference = run_layer(config, *groups.ep, 1, world_comm.rank());
    for (const auto path : {moe::ExpertPath::kAuto, moe::ExpertPath::kGroupedGemm})
      for (const int64_t chunks : {1, 3}) {
        const auto r = run_layer(config, *groups.ep, chunks, world_comm.rank(),
                                 moe::DispatchDedup::kRank, 0, path);
        expect_same_layer_result(r, reference,
                                 std::string(mode.name) + ", deduplicated, chunks " +
                                     std::to_string(chunks) +
                                     (path == moe::ExpertPath::kAuto ? "" : ", grouped GEMM"));
      }
  }
}

// Two hops, with every node size the world allows (ranks_per_node 1: every rank its own node;
// world / 2: two nodes): the same layer as the row dispatch, forward and every gradient. Padded
// capacity takes per-rank rows (the gateway gathers several sources' rows per expert).
TEST(Overlap, NodeHopDispatchEqualsRowDispatchInEveryMode) {
  parallel::MpiCommunicator world_comm(MPI_COMM_WORLD);
  const int world = world_size();
  const auto groups = parallel::with_communication_options(
      parallel::make_process_groups(world_comm, world), /*worker=*/true, parallel::LinkModel{});
  for (const auto& mode : layer_modes()) {
    const auto config = layer_config(mode);
    SCOPED_TRACE(mode.name);
    const auto reference = run_layer(config, *groups.ep, 1, world_comm.rank());
    for (const int64_t ranks_per_node : std::set<int64_t>{1, world / 2})
      for (const int64_t chunks : {1, 3}) {
        const auto r = run_layer(config, *groups.ep, chunks, world_comm.rank(),
                                 moe::DispatchDedup::kNode, ranks_per_node);
        expect_same_layer_result(r, reference,
                                 fmt::format("{}, node hop, {} rank(s) per node, chunks {}",
                                             mode.name, ranks_per_node, chunks));
      }
  }
}

// The node hop's rows are exactly the distinct (token, node) pairs of the kept picks, each sent
// to the node's rank with this rank's local index; with group-limited routing aligned to the
// nodes (one group per token) every token crosses to at most one node.
TEST(Overlap, NodeHopSendsEachTokenOncePerNode) {
  parallel::MpiCommunicator world_comm(MPI_COMM_WORLD);
  const int ep = world_comm.size(), rank = world_comm.rank();
  const int64_t ranks_per_node = ep / 2 > 0 ? ep / 2 : 1, nodes = ep / ranks_per_node;
  const int64_t experts = 4 * ep, per_node = experts / nodes, tokens = 40, top_k = 3;
  moe::NodeHop hop(world_comm, experts, ranks_per_node);
  at::manual_seed(91 + rank);
  for (const bool node_limited : {false, true}) {
    auto ids = std::get<1>(at::topk(at::rand({tokens, experts}), top_k, 1));
    if (node_limited)  // every pick inside one node's experts: node t % nodes
      ids = ids.remainder(per_node) + (at::arange(tokens) % nodes * per_node).unsqueeze(1);
    const auto keep = at::rand({tokens, top_k}) < 0.8;
    const auto plan = hop.plan(ids, keep);
    const auto id = ids.accessor<int64_t, 2>();
    const auto kept = keep.accessor<bool, 2>();
    std::vector<int64_t> expected(nodes, 0);
    int64_t crossing = 0;
    for (int64_t t = 0; t < tokens; ++t) {
      std::set<int64_t> on;
      for (int64_t j = 0; j < top_k; ++j)
        if (kept[t][j]) on.insert(id[t][j] / per_node);
      for (const auto n : on) ++expected[n];
      crossing += static_cast<int64_t>(on.size()) - (on.count(rank / ranks_per_node) ? 1 : 0);
    }
    ASSERT_EQ(plan.send.size(), static_cast<size_t>(nodes));
    int64_t sent_off_node = 0;
    for (int64_t n = 0; n < nodes; ++n) {
      EXPECT_EQ(plan.send[n].rows, expected[n]) << "rows to node " << n;
      EXPECT_EQ(plan.send[n].peer, n * ranks_per_node + rank % ranks_per_node) << "gateway";
      if (n != rank / ranks_per_node) sent_off_node += plan.send[n].rows;
    }
    EXPECT_EQ(sent_off_node, crossing);
    if (node_limited) {
      EXPECT_LE(sent_off_node, tokens);
    }
  }
}

// The plan's rows on the wire are exactly the distinct (token, destination rank) pairs among
// the kept picks, counted here independently from the expert ids.
TEST(Overlap, DeduplicatedPlanSendsEachTokenOncePerRank) {
  parallel::MpiCommunicator world_comm(MPI_COMM_WORLD);
  const int ep = world_comm.size();
  const int64_t experts = 4 * ep, tokens = 50, top_k = 3;
  moe::TokenDispatcher dispatcher(world_comm, experts);
  at::manual_seed(77 + world_comm.rank());
  const auto ids = std::get<1>(at::topk(at::rand({tokens, experts}), top_k, 1));  // distinct
  const auto keep = at::rand({tokens, top_k}) < 0.8;
  const auto plan = dispatcher.plan_chunks(ids, keep, 1, /*deduplicate=*/true).front();
  const auto id = ids.accessor<int64_t, 2>();
  const auto kept = keep.accessor<bool, 2>();
  std::vector<int64_t> expected(ep, 0);
  for (int64_t t = 0; t < tokens; ++t) {
    std::set<int64_t> ranks;
    for (int64_t j = 0; j < top_k; ++j)
      if (kept[t][j]) ranks.insert(id[t][j] / 4);
    for (const auto r : ranks) ++expected[r];
  }
  ASSERT_EQ(plan.unique_send.size(), static_cast<size_t>(ep));
  int64_t pairs = 0;
  for (int p = 0; p < ep; ++p) {
    EXPECT_EQ(plan.unique_send[p].rows, expected[p]) << "rows to rank " << p;
    pairs += plan.send_rows[p];
  }
  EXPECT_EQ(plan.unique_token.size(0), std::accumulate(expected.begin(), expected.end(), 0L));
  EXPECT_LT(plan.unique_token.size(0), pairs)
      << "k = 3 picks of " << experts << " experts never shared a rank";
  // Every received pair points at a received row, and each rank's experts get its pairs.
  EXPECT_EQ(plan.pair_row.size(0),
            std::accumulate(plan.recv_rows.begin(), plan.recv_rows.end(), 0L));
  if (plan.pair_row.numel() > 0) {
    EXPECT_GE(plan.pair_row.min().item<int64_t>(), 0);
    EXPECT_LT(plan.pair_row.max().item<int64_t>(), plan.unique_received);
  }
}

TEST(NodeLayout, EpRanksPerNodeNeedsEqualConsecutiveRuns) {
  const auto layout = [](std::vector<int> nodes) {
    parallel::NodeLayout l;
    l.node_of_rank = nodes;
    l.nodes = static_cast<int>(std::set<int>(nodes.begin(), nodes.end()).size());
    return l;
  };
  EXPECT_EQ(parallel::ep_ranks_per_node(layout({0, 0, 1, 1}), 0, 4), 2);
  EXPECT_EQ(parallel::ep_ranks_per_node(layout({0, 1, 2, 3}), 0, 4), 1);
  EXPECT_EQ(parallel::ep_ranks_per_node(layout({0, 0, 0, 0}), 0, 4), 4);  // one node
  EXPECT_EQ(parallel::ep_ranks_per_node(layout({0, 0, 1, 1, 2, 2, 3, 3}), 4, 4), 2);
  EXPECT_EQ(parallel::ep_ranks_per_node(layout({0, 1, 0, 1}), 0, 4), 0);        // round robin
  EXPECT_EQ(parallel::ep_ranks_per_node(layout({0, 0, 0, 1, 1, 1}), 0, 6), 3);  // 2 × 3
  EXPECT_EQ(parallel::ep_ranks_per_node(layout({0, 0, 0, 1}), 0, 4), 0);        // 3 + 1
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
  config.parallel.dedup_dispatch = moe::DispatchDedup::kRank;
  const auto deduplicated =
      Trainer(config, groups, open_data(config), testing::quiet_run()).run().steps;
  config.parallel.dedup_dispatch = moe::DispatchDedup::kNode;
  auto two_node_groups = groups;
  two_node_groups.ep_ranks_per_node = world / 2;
  const auto node_hop =
      Trainer(config, two_node_groups, open_data(config), testing::quiet_run()).run().steps;
  for (const auto* run : {&overlapped, &deduplicated, &node_hop}) {
    const char* what = run == &overlapped     ? "overlapped"
                       : run == &deduplicated ? "deduplicated"
                                              : "node hop";
    ASSERT_EQ(run->size(), reference.size()) << what;
    for (size_t i = 0; i < reference.size(); ++i) {
      EXPECT_LE(relative_difference((*run)[i].loss, reference[i].loss), 1e-6)
          << what << " step " << i;
      EXPECT_LE(relative_difference((*run)[i].grad_norm, reference[i].grad_norm), 1e-5) << what;
    }
  }
}

// parallel.micro_batch_overlap, one model: forward_pair's outputs are those of each micro-batch
// alone bit for bit (the same operations on the same inputs, only interleaved), and one backward
// of both losses gives the gradients of the two backwards within fp32 rounding (a parameter used
// by both sums their contributions in another order).
TEST(MicroBatchOverlap, PairEqualsEachMicroBatchAlone) {
  const int world = world_size(), rank = parallel::MpiCommunicator(MPI_COMM_WORLD).rank();
  parallel::MpiCommunicator world_comm(MPI_COMM_WORLD);
  const auto groups = parallel::make_process_groups(world_comm, world);
  struct Variant {
    const char* name;
    std::function<void(Config&)> apply;
  };
  const std::vector<Variant> variants = {
      {"plain", [](Config&) {}},
      {"3 chunks, rank dedup, capacity drops",
       [](Config& c) {
         c.parallel.overlap_degree = 3;
         c.parallel.dedup_dispatch = moe::DispatchDedup::kRank;
         c.moe.capacity.factor = 1.0;
       }},
      {"recompute attention + moe_act, first block dense", [](Config& c) {
         c.train.recompute.attention = c.train.recompute.moe_act = true;
         c.model.num_layers = 3;
         c.moe.first_k_dense = 1;
       }}};
  for (const auto& variant : variants) {
    auto config = testing::small_test_config();
    config.parallel.ep_size = world;
    variant.apply(config);
    DecoderLM model(config, *groups.ep);
    initialize_parameters(*model, config, 11);
    for (auto& layer : model->moe_layers()) {  // the trainer's settings (recompute: the block's)
      layer->set_overlap_degree(config.parallel.overlap_degree);
      layer->set_dedup_dispatch(config.parallel.dedup_dispatch);
    }
    at::manual_seed(100 + rank);
    const std::array<at::Tensor, 2> tokens{at::randint(256, {2, 16}, at::kLong),
                                           at::randint(256, {2, 16}, at::kLong)};
    const auto loss_of = [](const LmOutput& out, const at::Tensor& tokens) {
      return language_model_loss(out.logits, tokens) + 0.01 * out.aux_loss + 0.001 * out.z_loss;
    };
    std::array<LmOutput, 2> alone;
    std::map<std::string, at::Tensor> alone_grads;
    for (int m = 0; m < 2; ++m) {
      alone[m] = model->forward(tokens[m]);
      loss_of(alone[m], tokens[m]).backward();
    }
    for (const auto& p : model->named_parameters()) alone_grads[p.key()] = p.value().grad().clone();
    model->zero_grad();
    const auto pair = model->forward_pair(tokens, {});
    (loss_of(pair[0], tokens[0]) + loss_of(pair[1], tokens[1])).backward();
    for (int m = 0; m < 2; ++m) {
      EXPECT_TRUE(at::equal(pair[m].logits, alone[m].logits)) << variant.name << " " << m;
      EXPECT_TRUE(at::equal(pair[m].aux_loss, alone[m].aux_loss)) << variant.name;
      EXPECT_TRUE(at::equal(pair[m].z_loss, alone[m].z_loss)) << variant.name;
      ASSERT_EQ(pair[m].routing.size(), alone[m].routing.size()) << variant.name;
      for (size_t l = 0; l < pair[m].routing.size(); ++l) {
        EXPECT_TRUE(at::equal(pair[m].routing[l].load, alone[m].routing[l].load)) << variant.name;
        EXPECT_TRUE(at::equal(pair[m].routing[l].slot_counts, alone[m].routing[l].slot_counts));
      }
    }
    for (const auto& p : model->named_parameters())
      EXPECT_LE(relative_error(p.value().grad(), alone_grads.at(p.key())), 1e-6)
          << variant.name << " " << p.key();
  }
}

// The trainer with micro_batch_overlap trains like one micro-batch at a time: grad_accum 2 and
// 4, with the worker, pipeline chunks, gradient buckets sent during backward and router jitter
// (so handing a micro-batch the other's routing inputs would show).
TEST(MicroBatchOverlap, TrainingIsTheSame) {
  const int world = world_size();
  for (const int64_t accum : {2, 4}) {
    auto config = testing::small_test_config();
    config.train.steps = 5;
    config.train.grad_accum = accum;
    config.parallel.overlap_degree = 2;
    config.parallel.bucket_mb = 0.005;
    config.moe.router.jitter_eps = 0.05;  // each micro-batch routes with its own noise seed
    const auto reference = testing::train_steps_on(MPI_COMM_WORLD, config, world);
    config.parallel.micro_batch_overlap = true;
    const auto paired = testing::train_steps_on(MPI_COMM_WORLD, config, world);
    testing::expect_same_curve(paired, reference, "grad_accum " + std::to_string(accum), 1e-6);
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

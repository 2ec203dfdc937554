// Expert-parallel dispatch and combine under mpirun, measured side by side in one run:
//
//   mpirun -n 2 build/bench/bench_expert_parallel [--quick]      (ep_size = world size)
//
// 1. All-to-all bandwidth: TokenDispatcher::dispatch + combine (the two all-to-all-v exchanges
//    plus the local (source, expert) reorder) beside a raw MPI_Alltoallv there and back with
//    exactly the same per-peer byte counts on preallocated buffers. Ratio = raw time / ours
//    (target ≥ 0.9). Times are the slowest rank's median.
// 2. Time split of one MoE layer step (forward by spine step, then backward as one number),
//    averaged over ranks.
// 3. Expert memory per rank for every ep_size dividing the world: expert parameter bytes
//    (weights; gradients and the two AdamW moments add 3× more) and the measured growth of live
//    heap memory while the layer is built and runs one forward and backward.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <malloc.h>
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <vector>

#include "moe/moe_layer.hpp"
#include "moe/phase_timer.hpp"
#include "moe/token_dispatcher.hpp"
#include "parallel/mpi_communicator.hpp"
#include "parallel/process_groups.hpp"
#include "trainer/common/host_allocator.hpp"

using namespace moeforge;

namespace {

int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

int world_size() {
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

double max_over_ranks(double value) {
  double result = 0;
  MPI_Allreduce(&value, &result, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return result;
}

double mean_over_ranks(double value) {
  double result = 0;
  MPI_Allreduce(&value, &result, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  return result / world_size();
}

// Median seconds per body over `iterations` rounds after one warm-up round. Each round runs
// every body once, all ranks started together, so the bodies see the same machine noise.
std::vector<double> interleaved_medians(const std::vector<std::function<void()>>& bodies,
                                        int iterations) {
  for (const auto& body : bodies) body();
  std::vector<std::vector<double>> times(bodies.size());
  for (int i = 0; i < iterations; ++i)
    for (size_t b = 0; b < bodies.size(); ++b) {
      MPI_Barrier(MPI_COMM_WORLD);
      const auto start = std::chrono::steady_clock::now();
      bodies[b]();
      times[b].push_back(
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
  std::vector<double> medians;
  for (auto& t : times) {
    std::sort(t.begin(), t.end());
    medians.push_back(t[t.size() / 2]);
  }
  return medians;
}

// Bytes of live heap allocations (with the tuned allocator every allocation is on the heap).
double live_heap_bytes() {
  return static_cast<double>(mallinfo2().uordblks);
}

// Uniform random top-k choices without repeats per token (as a router would give).
at::Tensor random_expert_ids(int64_t tokens, int64_t experts, int64_t top_k) {
  return std::get<1>(at::rand({tokens, experts}).topk(top_k, 1));
}

void bandwidth_section(parallel::Communicator& ep, int iterations) {
  const int rank = world_rank();
  if (rank == 0) {
    fmt::print("\n1. dispatch+combine vs raw MPI_Alltoallv (ep_size {}, E 8, k 2, fp32)\n",
               ep.size());
    fmt::print("{:>6} {:>6} {:>10} {:>9} {:>9} {:>9} {:>10} {:>10} {:>7}\n", "T/rank", "H",
               "MiB/rank", "ours ms", "a2av ms", "raw ms", "ours GB/s", "raw GB/s", "ratio");
  }
  for (const int64_t hidden : {256, 1024}) {
    for (const int64_t tokens : {1024, 4096}) {
      at::manual_seed(100 + rank);
      moe::TokenDispatcher dispatcher(ep, 8);
      const auto plan = dispatcher.plan(random_expert_ids(tokens, 8, 2), at::Tensor());
      const auto permuted = at::randn({tokens * 2, hidden});
      const auto ours = [&] {
        at::NoGradGuard no_grad;
        const auto rows = dispatcher.dispatch(permuted, plan);
        const auto back = dispatcher.combine(rows, plan);
      };
      // The communicator's plain all_to_all_v (rows arrive by source, not by expert).
      const auto plain = [&] {
        const auto there = ep.all_to_all_v(permuted, plan.send_rows, plan.recv_rows);
        const auto back = ep.all_to_all_v(there, plan.recv_rows, plan.send_rows);
      };

      // Raw: the same per-peer counts, there and back, on buffers allocated once.
      const int peers = ep.size();
      std::vector<int> send_counts(peers), recv_counts(peers), send_displs(peers),
          recv_displs(peers);
      int64_t sent_rows = 0, received_rows = 0;
      for (int p = 0; p < peers; ++p) {
        send_counts[p] = static_cast<int>(plan.send_rows[p] * hidden);
        recv_counts[p] = static_cast<int>(plan.recv_rows[p] * hidden);
        send_displs[p] = static_cast<int>(sent_rows * hidden);
        recv_displs[p] = static_cast<int>(received_rows * hidden);
        sent_rows += plan.send_rows[p];
        received_rows += plan.recv_rows[p];
      }
      auto received = at::empty({received_rows, hidden});
      auto returned = at::empty({sent_rows, hidden});
      auto* comm = dynamic_cast<parallel::MpiCommunicator&>(ep).mpi_comm();
      const auto raw = [&] {
        MPI_Alltoallv(permuted.data_ptr<float>(), send_counts.data(), send_displs.data(), MPI_FLOAT,
                      received.data_ptr<float>(), recv_counts.data(), recv_displs.data(), MPI_FLOAT,
                      comm);
        MPI_Alltoallv(received.data_ptr<float>(), recv_counts.data(), recv_displs.data(), MPI_FLOAT,
                      returned.data_ptr<float>(), send_counts.data(), send_displs.data(), MPI_FLOAT,
                      comm);
      };
      const auto medians = interleaved_medians({ours, plain, raw}, iterations);
      const double ours_max = max_over_ranks(medians[0]);
      const double comm_max = max_over_ranks(medians[1]);
      const double raw_max = max_over_ranks(medians[2]);
      const double bytes =
          mean_over_ranks(static_cast<double>(sent_rows + received_rows) * hidden * 4);
      if (rank == 0)
        fmt::print(
            "{:>6} {:>6} {:>10.1f} {:>9.2f} {:>9.2f} {:>9.2f} {:>10.2f} {:>10.2f} {:>7.3f}\n",
            tokens, hidden, bytes / (1 << 20), ours_max * 1e3, comm_max * 1e3, raw_max * 1e3,
            bytes / ours_max / 1e9, bytes / raw_max / 1e9, raw_max / ours_max);
    }
  }
}

void time_split_section(parallel::Communicator& ep, int iterations) {
  const int rank = world_rank();
  moe::MoeConfig config;
  config.num_experts = 8;
  config.top_k = 2;
  config.expert_ffn_size = 1024;
  const int64_t tokens = 4096, hidden = 512;
  at::manual_seed(7);
  moe::MoeLayer layer(hidden, config, ep);
  {
    at::NoGradGuard no_grad;
    for (auto& p : layer->parameters()) p.normal_(0, 0.02);
  }
  at::manual_seed(200 + rank);
  const auto x = at::randn({tokens, hidden}).set_requires_grad(true);
  moe::PhaseTimer timer;
  double backward_seconds = 0;
  for (int i = 0; i <= iterations; ++i) {
    if (i == 1) {  // the first run is a warm-up
      timer.clear();
      backward_seconds = 0;
    }
    MPI_Barrier(MPI_COMM_WORLD);
    layer->set_observer(&timer);
    const auto y = layer->forward(x, tokens).y;
    layer->set_observer(nullptr);
    const auto start = std::chrono::steady_clock::now();
    y.backward(at::ones_like(y));
    backward_seconds +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  double forward_total = 0;
  std::vector<std::pair<std::string, double>> phases;
  for (const auto& [name, seconds] : timer.totals()) {
    const double ms = mean_over_ranks(seconds / iterations * 1e3);
    phases.emplace_back(name, ms);
    forward_total += ms;
  }
  const double backward_ms = mean_over_ranks(backward_seconds / iterations * 1e3);
  if (rank != 0) return;
  fmt::print(
      "\n2. MoE layer step split (ep_size {}, T {}/rank, H {}, E {}, k {}, F {}), mean over "
      "ranks\n",
      ep.size(), tokens, hidden, config.num_experts, config.top_k, config.expert_ffn_size);
  for (const auto& [name, ms] : phases)
    fmt::print("  {:<18} {:>8.2f} ms  {:>5.1f}% of forward\n", name, ms, 100 * ms / forward_total);
  fmt::print("  {:<18} {:>8.2f} ms\n  {:<18} {:>8.2f} ms\n", "forward total", forward_total,
             "backward", backward_ms);
}

void memory_section(const parallel::MpiCommunicator& world) {
  const int rank = world_rank();
  moe::MoeConfig config;
  config.num_experts = 16;
  config.top_k = 2;
  config.expert_ffn_size = 1024;
  const int64_t hidden = 1024, tokens = 1024;
  if (rank == 0) {
    fmt::print(
        "\n3. expert memory per rank (E {}, H {}, F {}; all experts = {:.0f} MiB of fp32 "
        "weights)\n",
        config.num_experts, hidden, config.expert_ffn_size,
        3.0 * config.num_experts * hidden * config.expert_ffn_size * 4 / (1 << 20));
    fmt::print("{:>8} {:>14} {:>20} {:>26}\n", "ep_size", "experts/rank", "expert weights MiB",
               "live heap with grads MiB");
  }
  for (int ep_size = 1; ep_size <= world.size(); ep_size *= 2) {
    if (world.size() % ep_size != 0) continue;
    const auto groups = parallel::make_process_groups(world, ep_size);
    MPI_Barrier(MPI_COMM_WORLD);
    const double before = live_heap_bytes();
    double weight_bytes = 0;
    {
      moe::MoeLayer layer(hidden, config, *groups.ep);
      {
        at::NoGradGuard no_grad;
        for (auto& p : layer->experts->parameters()) {
          p.normal_(0, 0.02);
          weight_bytes += static_cast<double>(p.numel()) * p.element_size();
        }
      }
      at::manual_seed(300 + rank);
      const auto x = at::randn({tokens, hidden});
      layer->forward(x, tokens).y.sum().backward();
      const double growth = max_over_ranks((live_heap_bytes() - before) / (1 << 20));
      const double weights = max_over_ranks(weight_bytes / (1 << 20));
      if (rank == 0)
        fmt::print("{:>8} {:>14} {:>20.1f} {:>26.1f}\n", ep_size, layer->num_local_experts(),
                   weights, growth);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  tune_host_allocator();  // as the trainer does (trainer/common/host_allocator.hpp)
  bound_onednn_primitive_cache();
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided);
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  const int iterations = quick ? 3 : 10;
  {
    parallel::MpiCommunicator world(MPI_COMM_WORLD);
    const auto groups = parallel::make_process_groups(world, world.size());
    const long cores = sysconf(_SC_NPROCESSORS_ONLN);
    at::set_num_threads(static_cast<int>(std::max<long>(1, cores / world.size())));
    if (world.rank() == 0)
      fmt::print("world {} ranks, {} cores, {} threads/rank{}\n", world.size(), cores,
                 at::get_num_threads(),
                 world.size() > cores ? " (OVERSUBSCRIBED: ranks share cores)" : "");
    bandwidth_section(*groups.ep, iterations);
    time_split_section(*groups.ep, quick ? 2 : 5);
    memory_section(world);
  }
  MPI_Finalize();
  return 0;
}

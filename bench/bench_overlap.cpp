// Communication/compute overlap of one MoE layer step (forward + backward) at ep_size 2 under a
// simulated link, measured side by side in one run:
//
//   mpirun -n 2 build/bench/bench_overlap [--quick] [--tokens N]
//
// 1. T_compute: the step with the link off and no worker (communication is shared memory,
//    nearly free).
// 2. The link's bandwidth is then chosen so the step's exchange traffic takes as long as
//    T_compute (latency 20 µs): T_comm = the step's exchanges alone (same blocks, no compute).
// 3. T_off: the step under the link with every collective blocking (parallel.comm_worker false).
// 4. T_on(n): under the link with the communication worker, overlap_degree n = 1, 2, 4, 8.
// Hidden fraction = (T_off − T_on) / min(T_compute, T_comm) (1 = everything hidden), and
// T_on / max(T_compute, T_comm) (target ≤ 1.1). Configurations run in interleaved rounds;
// times are medians of the slowest rank.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <vector>

#include "moe/moe_layer.hpp"
#include "parallel/mpi_communicator.hpp"
#include "parallel/process_groups.hpp"
#include "parallel/simulated_link.hpp"
#include "trainer/common/host_allocator.hpp"

using namespace moeforge;

namespace {

using Clock = std::chrono::steady_clock;

double max_over_ranks(double value) {
  double result = 0;
  MPI_Allreduce(&value, &result, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return result;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Setup {
  int64_t tokens = 4096, hidden = 256, ffn = 512, experts = 8, top_k = 2;
};

moe::MoeLayer make_layer(const Setup& s, parallel::Communicator& ep, int64_t chunks) {
  moe::MoeConfig config;
  config.num_experts = s.experts;
  config.top_k = s.top_k;
  config.expert_ffn_size = s.ffn;
  config.num_shared_experts = 1;
  moe::MoeLayer layer(s.hidden, config, ep);
  at::manual_seed(7);
  {
    at::NoGradGuard no_grad;
    for (auto& p : layer->parameters()) p.normal_(0.0, 0.05);
  }
  layer->set_overlap_degree(chunks);
  layer->train();
  return layer;
}

// One forward + backward; returns seconds (slowest rank).
double step(moe::MoeLayer& layer, const at::Tensor& x, const at::Tensor& weight) {
  MPI_Barrier(MPI_COMM_WORLD);
  const auto start = Clock::now();
  for (auto& p : layer->parameters()) p.mutable_grad() = at::Tensor();
  const auto out = layer->forward(x, 128);
  (out.y * weight).sum().backward();
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return max_over_ranks(seconds);
}

// The four exchanges of one step (dispatch and combine, forward and backward) should take as long
// as the compute alone: the link whose bandwidth makes it so, from the routing actually made.
struct LinkPlan {
  parallel::LinkModel link;
  double exchange_bytes;
};

LinkPlan link_matching_compute(moe::MoeLayer& layer, const Setup& s, const at::Tensor& x,
                               double t_compute, int rank, int world) {
  // [E] this rank's rows per expert, from one more (collective) forward.
  const auto load = moe::read_stats(layer->forward(x, 128).counters).load;
  const int64_t local = s.experts / world;
  int64_t remote_rows = 0;
  for (int64_t e = 0; e < s.experts; ++e)
    if (e / local != rank) remote_rows += load[e].item<int64_t>();
  const double exchange_bytes = max_over_ranks(static_cast<double>(remote_rows)) * s.hidden * 4;
  const double latency_us = 20.0;
  const double bandwidth_gbps = 4 * exchange_bytes / (t_compute - 4 * latency_us * 1e-6) / 1e9;
  return {parallel::LinkModel{bandwidth_gbps, latency_us}, exchange_bytes};
}

void print_report(const Setup& s, int world, int rounds, const LinkPlan& plan, double t_compute,
                  double t_comm, double t_off, const std::vector<int64_t>& degrees,
                  const std::vector<double>& t_on) {
  fmt::print(
      "MoE layer step (forward + backward), ep_size {}, {} tokens/rank, H {}, E {} "
      "top-{}, expert FFN {}, 1 shared expert; {} rounds, medians of the slowest "
      "rank\n",
      world, s.tokens, s.hidden, s.experts, s.top_k, s.ffn, rounds);
  fmt::print("simulated link: {:.3f} GB/s, {} us latency ({:.2f} MiB per exchange)\n",
             plan.link.bandwidth_gbps, plan.link.latency_us, plan.exchange_bytes / (1 << 20));
  fmt::print("  T_compute (link off)          {:8.1f} ms\n", t_compute * 1e3);
  fmt::print("  T_comm (exchanges alone)      {:8.1f} ms\n", t_comm * 1e3);
  fmt::print("  T_off (blocking collectives)  {:8.1f} ms\n", t_off * 1e3);
  const double lower = std::min(t_compute, t_comm), upper = std::max(t_compute, t_comm);
  for (size_t i = 0; i < degrees.size(); ++i) {
    fmt::print(
        "  T_on overlap_degree {}         {:8.1f} ms   hidden fraction {:.2f}   "
        "T_on / max(compute, comm) {:.2f}\n",
        degrees[i], t_on[i] * 1e3, (t_off - t_on[i]) / lower, t_on[i] / upper);
  }
}

}  // namespace

int main(int argc, char** argv) {
  tune_host_allocator();
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided);
  at::set_num_threads(1);
  Setup s;
  int rounds = 7;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) rounds = 3;
    if (std::strcmp(argv[i], "--tokens") == 0 && i + 1 < argc) s.tokens = std::atoll(argv[++i]);
  }
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  {
    parallel::MpiCommunicator world_comm(MPI_COMM_WORLD);
    const auto plain = parallel::make_process_groups(world_comm, world);
    at::manual_seed(100 + rank);
    const auto x = at::randn({s.tokens, s.hidden});
    const auto weight = at::randn({s.tokens, s.hidden});

    // 1. compute alone (shared-memory exchanges), and the traffic of one step.
    auto compute_layer = make_layer(s, *plain.ep, 1);
    step(compute_layer, x, weight);  // warm-up
    std::vector<double> compute_times;
    for (int r = 0; r < rounds; ++r) compute_times.push_back(step(compute_layer, x, weight));
    const double t_compute = median(compute_times);
    const auto plan = link_matching_compute(compute_layer, s, x, t_compute, rank, world);
    const auto& link = plan.link;
    const double exchange_bytes = plan.exchange_bytes;

    // 2. communication alone: the same four exchanges, blocking, under the link.
    const auto linked_blocking = parallel::with_communication_options(plain, false, link);
    std::vector<parallel::RowBlock> send, recv;
    for (int p = 0; p < world; ++p) {
      const int64_t rows = p == rank ? 0 : static_cast<int64_t>(exchange_bytes / (s.hidden * 4));
      send.push_back({p, p == 0 ? 0 : send.back().offset + send.back().rows, rows});
      recv.push_back(send.back());
    }
    const auto rows = at::randn({send.back().offset + send.back().rows, s.hidden});
    const auto comm_only = [&] {
      MPI_Barrier(MPI_COMM_WORLD);
      const auto start = Clock::now();
      for (int i = 0; i < 4; ++i)
        linked_blocking.ep->all_to_all_blocks(rows, send, recv, rows.size(0));
      return max_over_ranks(std::chrono::duration<double>(Clock::now() - start).count());
    };

    // 3-4. the step under the link, overlap off and on.
    auto off_layer = make_layer(s, *linked_blocking.ep, 1);
    const auto linked_async = parallel::with_communication_options(plain, true, link);
    std::vector<moe::MoeLayer> on_layers;
    const std::vector<int64_t> degrees = {1, 2, 4, 8};
    for (const int64_t n : degrees) on_layers.push_back(make_layer(s, *linked_async.ep, n));
    step(off_layer, x, weight);
    for (auto& layer : on_layers) step(layer, x, weight);
    std::vector<double> comm_times, off_times;
    std::vector<std::vector<double>> on_times(degrees.size());
    for (int r = 0; r < rounds; ++r) {
      compute_times.push_back(step(compute_layer, x, weight));
      comm_times.push_back(comm_only());
      off_times.push_back(step(off_layer, x, weight));
      for (size_t i = 0; i < degrees.size(); ++i)
        on_times[i].push_back(step(on_layers[i], x, weight));
    }
    std::vector<double> t_on;
    for (const auto& times : on_times) t_on.push_back(median(times));
    if (rank == 0)
      print_report(s, world, rounds, plan, median(compute_times), median(comm_times),
                   median(off_times), degrees, t_on);
  }
  MPI_Finalize();
  return 0;
}

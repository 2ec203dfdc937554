// Communication/compute overlap of one MoE layer step (forward + backward) at ep_size 2, measured
// side by side in one run, on a real shaped network link or under the simulated link:
//
//   mpirun -n 2 build/bench/bench_overlap [--quick] [--tokens N]          (simulated link only)
//   launch/cluster.sh run --nodes 2 --slots 1 -- bash -c 'launch/cluster.sh mpirun -n 2
//     build/bench/bench_overlap --shape-cmd "$PWD/launch/cluster.sh shape $MOEFORGE_CLUSTER"'
//   (one command line; --rounds N or --quick set the rounds, default 7)
//
// With --shape-cmd the two ranks are on two emulated nodes and rank 0 switches the real link
// between unshaped ("CMD off") and shaped ("CMD <rate>kbit") between groups of measurements.
// 1. T_compute(n): the same layer (same overlap_degree n, same worker) on the unshaped link,
//    where communication is nearly free. Measured per n, because chunking changes the compute.
// 2. The link rate is chosen so the step's four exchanges take as long as T_compute (then
//    calibrated once on the real link: rate × T_comm / T_compute).
// 3. T_comm: the four exchanges alone (same bytes, no compute), blocking, on the shaped link.
// 4. T_off: the step with every collective blocking; T_on(n): with the communication worker
//    and overlap_degree n = 1, 2, 4, 8, on the shaped link.
// 5. The simulated link at the same rate over the unshaped link: T_comm, T_off, T_on(n) again,
//    printed as sim / real (the model is kept only within ±15% of the real link).
// Reported: exposed communication T_on − T_compute(n) and T_on / max(T_compute(n), T_comm),
// which cannot claim more than everything hidden (no hidden fraction with a baseline that is
// itself partly overlapped). Configurations run in interleaved rounds; medians of the slowest
// rank, with the [min, max] spread over rounds.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "moe/moe_layer.hpp"
#include "parallel/mpi_communicator.hpp"
#include "parallel/process_groups.hpp"
#include "parallel/simulated_link.hpp"
#include "spread.hpp"
#include "trainer/common/host_allocator.hpp"

using namespace moeforge;

namespace {

using Clock = std::chrono::steady_clock;
const std::vector<int64_t> kDegrees = {1, 2, 4, 8};
constexpr double kLatencyUs = 20.0;

double max_over_ranks(double value) {
  double result = 0;
  MPI_Allreduce(&value, &result, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return result;
}

using Stat = bench::Spread;
using bench::spread_of;

struct Setup {
  int64_t tokens = 4096, hidden = 256, ffn = 512, experts = 8, top_k = 2;
  int rounds = 7;
  std::string shape_cmd;  // empty: no real link to shape (simulated link only)
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

int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

// Rank 0 reshapes the real link (every node's both ends); all ranks wait until it is done.
void shape_link(const Setup& s, const std::string& rate) {
  if (s.shape_cmd.empty()) return;
  int rc = 0;
  if (world_rank() == 0) rc = std::system((s.shape_cmd + " " + rate).c_str());
  MPI_Bcast(&rc, 1, MPI_INT, 0, MPI_COMM_WORLD);
  if (rc != 0) {
    if (world_rank() == 0) fmt::print(stderr, "bench_overlap: '{} {}' failed\n", s.shape_cmd, rate);
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
}

// One forward + backward; returns seconds (slowest rank).
double step(moe::MoeLayer& layer, const at::Tensor& x, const at::Tensor& weight) {
  MPI_Barrier(MPI_COMM_WORLD);
  const auto start = Clock::now();
  for (auto& p : layer->parameters()) p.mutable_grad() = at::Tensor();
  const auto out = layer->forward(x, 128);
  (out.y * weight).sum().backward();
  return max_over_ranks(std::chrono::duration<double>(Clock::now() - start).count());
}

// Bytes this rank sends to its peer in one exchange (the max over ranks), from the routing.
double exchange_bytes(moe::MoeLayer& layer, const Setup& s, const at::Tensor& x) {
  const auto load = moe::read_stats(layer->forward(x, 128).counters).load;
  int world = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  const int64_t local = s.experts / world;
  int64_t remote_rows = 0;
  for (int64_t e = 0; e < s.experts; ++e)
    if (e / local != world_rank()) remote_rows += load[e].item<int64_t>();
  return max_over_ranks(static_cast<double>(remote_rows)) * s.hidden * 4;
}

// The four exchanges of a step (dispatch and combine, forward and backward), alone, blocking.
struct CommOnly {
  std::vector<parallel::RowBlock> send, recv;
  at::Tensor rows;

  CommOnly(const Setup& s, double bytes) {
    int world = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    for (int p = 0; p < world; ++p) {
      const int64_t n = p == world_rank() ? 0 : static_cast<int64_t>(bytes / (s.hidden * 4));
      send.push_back({p, p == 0 ? 0 : send.back().offset + send.back().rows, n});
      recv.push_back(send.back());
    }
    rows = at::randn({send.back().offset + send.back().rows, s.hidden});
  }

  double run(parallel::Communicator& ep) {
    MPI_Barrier(MPI_COMM_WORLD);
    const auto start = Clock::now();
    for (int i = 0; i < 4; ++i) ep.all_to_all_blocks(rows, send, recv, rows.size(0));
    return max_over_ranks(std::chrono::duration<double>(Clock::now() - start).count());
  }
};

// The measured configurations: name -> one timed run. Grouped by the link state they need.
struct Measurements {
  std::vector<std::pair<std::string, std::function<double()>>> unshaped, shaped;
  std::map<std::string, std::vector<double>> times;

  void round(const Setup& s, const std::string& rate) {
    shape_link(s, "off");
    for (auto& [name, run] : unshaped) times[name].push_back(run());
    if (shaped.empty()) return;
    shape_link(s, rate);
    for (auto& [name, run] : shaped) times[name].push_back(run());
  }
  Stat operator[](const std::string& name) const { return spread_of(times.at(name)); }
};

std::string rate_text(double bytes_per_s) {
  return fmt::format("{}kbit", static_cast<int64_t>(bytes_per_s * 8 / 1000));
}

double median_of(int reps, const std::function<double()>& run) {
  std::vector<double> v;
  for (int i = 0; i < reps; ++i) v.push_back(run());
  return spread_of(v).median;
}

// Bandwidth (bytes/s) making the four exchanges take T_compute; on a real link, corrected once
// by what the link really gave (TCP and the shaper's own overheads).
double choose_rate(const Setup& s, double t_compute, double bytes, CommOnly& comm,
                   parallel::Communicator& plain_ep) {
  double rate = 4 * bytes / (t_compute - 4 * kLatencyUs * 1e-6);
  if (s.shape_cmd.empty()) return rate;
  shape_link(s, rate_text(rate));
  comm.run(plain_ep);  // warm-up of the shaped connection
  const double t_comm = median_of(3, [&] { return comm.run(plain_ep); });
  return rate * t_comm / t_compute;
}

std::string cell(const Stat& t) {
  return fmt::format("{:7.1f} [{:6.1f}, {:6.1f}]", t.median * 1e3, t.min * 1e3, t.max * 1e3);
}

// `line_s`: the four exchanges' bytes at the link's nominal rate, which no transfer through the
// shaper can beat. T/max divides by it when it is below T_comm: the exchanges alone each start
// from an idle connection (rendezvous round trip, TCP ramp-up) and so take longer than the same
// bytes sent back to back, as the overlapped step sends them; with T_comm alone an overlapped
// step measured faster than its "lower bound" (T/max 0.96).
void print_real(const Measurements& m, double line_s) {
  const double t_comm = std::min(m["comm"].median, line_s);
  fmt::print("  T_comm (exchanges alone)       {} ms\n", cell(m["comm"]));
  fmt::print("  T_comm at the nominal rate     {:7.1f} ms (T/max uses the smaller)\n",
             line_s * 1e3);
  fmt::print("  T_compute blocking             {} ms\n", cell(m["compute off"]));
  fmt::print("  T_off (blocking collectives)   {} ms   exposed {:6.1f} ms   T/max {:.2f}\n",
             cell(m["off"]), (m["off"].median - m["compute off"].median) * 1e3,
             m["off"].median / std::max(m["compute off"].median, t_comm));
  for (const int64_t n : kDegrees) {
    const double on = m[fmt::format("on {}", n)].median;
    const double compute = m[fmt::format("compute {}", n)].median;
    fmt::print(
        "  overlap_degree {}: T_compute {} ms  T_on {} ms   exposed {:6.1f} ms   T/max {:.2f}\n", n,
        cell(m[fmt::format("compute {}", n)]), cell(m[fmt::format("on {}", n)]),
        (on - compute) * 1e3, on / std::max(compute, t_comm));
  }
}

void print_simulated(const Measurements& m, bool real) {
  const auto row = [&](const std::string& label, const std::string& sim, const std::string& ref) {
    fmt::print("  {:30} {} ms", label, cell(m[sim]));
    if (real) fmt::print("   sim / real {:.2f}", m[sim].median / m[ref].median);
    fmt::print("\n");
  };
  row("T_comm (exchanges alone)", "sim comm", "comm");
  row("T_off (blocking collectives)", "sim off", "off");
  for (const int64_t n : kDegrees)
    row(fmt::format("T_on overlap_degree {}", n), fmt::format("sim on {}", n),
        fmt::format("on {}", n));
  if (real) return;
  const double t_comm = m["sim comm"].median;
  fmt::print("  T_compute blocking             {} ms   T_off exposed {:6.1f} ms   T/max {:.2f}\n",
             cell(m["compute off"]), (m["sim off"].median - m["compute off"].median) * 1e3,
             m["sim off"].median / std::max(m["compute off"].median, t_comm));
  for (const int64_t n : kDegrees) {
    const double on = m[fmt::format("sim on {}", n)].median;
    const double compute = m[fmt::format("compute {}", n)].median;
    fmt::print("  overlap_degree {}: T_compute {} ms   exposed {:6.1f} ms   T/max {:.2f}\n", n,
               cell(m[fmt::format("compute {}", n)]), (on - compute) * 1e3,
               on / std::max(compute, t_comm));
  }
}

void print_report(const Setup& s, double rate, double bytes, const Measurements& m) {
  const bool real = !s.shape_cmd.empty();
  fmt::print(
      "MoE layer step (forward + backward), ep_size 2, {} tokens/rank, H {}, E {} top-{}, expert "
      "FFN {}, 1 shared expert; {} interleaved rounds, median [min, max] of the slowest rank\n",
      s.tokens, s.hidden, s.experts, s.top_k, s.ffn, s.rounds);
  fmt::print("link: {:.1f} Mbit/s ({:.4f} GB/s; {:.2f} MiB per exchange), {}\n", rate * 8 / 1e6,
             rate / 1e9, bytes / (1 << 20),
             real ? "real TCP between 2 emulated nodes (tbf), simulated link at the same rate"
                  : "simulated (20 us latency)");
  if (real) {
    fmt::print("real link:\n");
    print_real(m, 4 * bytes / rate);
  }
  fmt::print("simulated link ({} us latency) over the {} link:\n", kLatencyUs,
             real ? "unshaped" : "shared-memory");
  print_simulated(m, real);
}

Setup parse(int argc, char** argv) {
  Setup s;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) s.rounds = 3;
    if (std::strcmp(argv[i], "--tokens") == 0 && i + 1 < argc) s.tokens = std::atoll(argv[++i]);
    if (std::strcmp(argv[i], "--rounds") == 0 && i + 1 < argc) s.rounds = std::atoi(argv[++i]);
    if (std::strcmp(argv[i], "--shape-cmd") == 0 && i + 1 < argc) s.shape_cmd = argv[++i];
  }
  return s;
}

void run(const Setup& s) {
  parallel::MpiCommunicator world_comm(MPI_COMM_WORLD);
  const auto plain = parallel::make_process_groups(world_comm, world_comm.size());
  const auto worker = parallel::with_communication_options(plain, true, {});
  at::manual_seed(100 + world_rank());
  const auto x = at::randn({s.tokens, s.hidden});
  const auto weight = at::randn({s.tokens, s.hidden});

  // Blocking layer (no worker) and worker layers per degree: unshaped = compute, shaped = real.
  shape_link(s, "off");
  auto blocking = make_layer(s, *plain.ep, 1);
  std::vector<moe::MoeLayer> overlapped;
  for (const int64_t n : kDegrees) overlapped.push_back(make_layer(s, *worker.ep, n));
  step(blocking, x, weight);
  const double t_compute = median_of(3, [&] { return step(blocking, x, weight); });
  const double bytes = exchange_bytes(blocking, s, x);
  CommOnly comm(s, bytes);
  const double rate = choose_rate(s, t_compute, bytes, comm, *plain.ep);

  const parallel::LinkModel link{rate / 1e9, kLatencyUs};
  const auto sim_blocking = parallel::with_communication_options(plain, false, link);
  const auto sim_worker = parallel::with_communication_options(plain, true, link);
  auto sim_off = make_layer(s, *sim_blocking.ep, 1);
  std::vector<moe::MoeLayer> sim_on;
  for (const int64_t n : kDegrees) sim_on.push_back(make_layer(s, *sim_worker.ep, n));

  Measurements m;
  const auto timed = [&](moe::MoeLayer& layer) {
    return [&x, &weight, p = &layer] { return step(*p, x, weight); };
  };
  m.unshaped.push_back({"compute off", timed(blocking)});
  m.unshaped.push_back({"sim comm", [&] { return comm.run(*sim_blocking.ep); }});
  m.unshaped.push_back({"sim off", timed(sim_off)});
  for (size_t i = 0; i < kDegrees.size(); ++i) {
    m.unshaped.push_back({fmt::format("compute {}", kDegrees[i]), timed(overlapped[i])});
    m.unshaped.push_back({fmt::format("sim on {}", kDegrees[i]), timed(sim_on[i])});
  }
  if (!s.shape_cmd.empty()) {
    m.shaped.push_back({"comm", [&] { return comm.run(*plain.ep); }});
    m.shaped.push_back({"off", timed(blocking)});
    for (size_t i = 0; i < kDegrees.size(); ++i)
      m.shaped.push_back({fmt::format("on {}", kDegrees[i]), timed(overlapped[i])});
  }
  m.round(s, rate_text(rate));  // warm-up round, not kept
  m.times.clear();
  for (int r = 0; r < s.rounds; ++r) m.round(s, rate_text(rate));
  shape_link(s, "off");
  if (world_rank() == 0) print_report(s, rate, bytes, m);
}

}  // namespace

int main(int argc, char** argv) {
  tune_host_allocator();
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided);
  at::set_num_threads(1);
  run(parse(argc, argv));
  MPI_Finalize();
  return 0;
}

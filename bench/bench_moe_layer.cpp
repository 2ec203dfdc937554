// MoE layer forward+backward throughput beside a dense SwiGLU of the same FLOPs, measured
// side by side in one run (this machine is noisy: the ratio is what we compare).
//
//   build/bench/bench_moe_layer [--quick]
//
// For each shape: achieved GFLOP/s of the MoE layer (routed experts only count: 3 GEMMs of
// 2·H·F per routed slot, ×3 for forward+backward), of a dense SwiGLU with intermediate k·F on
// the same T tokens (identical FLOPs), their ratio (target ≥ 0.85), and the peak resident memory
// of each (measured in a forked child so runs do not share a high-water mark).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <vector>

#include "child_process.hpp"
#include "moe/moe_layer.hpp"
#include "parallel/process_groups.hpp"
#include "trainer/common/host_allocator.hpp"

using namespace moeforge;

namespace {

struct Shape {
  const char* name;
  int64_t tokens, hidden, experts, top_k, ffn;
};

struct Measurement {
  double seconds = 0;   // median per iteration
  double peak_mib = 0;  // peak RSS growth over the baseline
};

// Runs `make_body` and then the body it returns in a forked child: warm-up, then `iterations`
// timed runs; reports the median time and the peak RSS growth through a pipe. All ATen work
// happens in the child, so no OpenMP thread pool is ever forked.
Measurement measure(const std::function<std::function<void()>()>& make_body, int iterations) {
  return bench::run_in_child<Measurement>([&] {
    const long baseline = bench::current_rss_kb();
    const auto body = make_body();
    body();  // warm-up (allocations, caches)
    std::vector<double> times;
    for (int i = 0; i < iterations; ++i) {
      const auto start = std::chrono::steady_clock::now();
      body();
      times.push_back(
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
    std::sort(times.begin(), times.end());
    struct rusage usage {};
    getrusage(RUSAGE_SELF, &usage);
    return Measurement{times[times.size() / 2], (usage.ru_maxrss - baseline) / 1024.0};
  });
}

}  // namespace

int main(int argc, char** argv) {
  tune_host_allocator();  // as the trainer does
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  const int iterations = quick ? 2 : 5;
  const std::vector<Shape> shapes = {
      {"E8 k2 (Mixtral-like)", 4096, 512, 8, 2, 1024},
      {"E64 k6 fine-grained", 4096, 512, 64, 6, 256},
      {"E16 k2 small-T", 1024, 256, 16, 2, 512},
  };
  fmt::print("{:<22} {:>10} {:>10} {:>7} {:>11} {:>11}\n", "shape", "MoE GF/s", "dense GF/s",
             "ratio", "MoE MiB", "dense MiB");
  for (const auto& s : shapes) {
    const double flops = 3.0 * s.tokens * s.top_k * 3.0 * 2.0 * s.hidden * s.ffn;
    const auto moe = measure(
        [&]() -> std::function<void()> {
          moe::MoeConfig config;
          config.num_experts = s.experts;
          config.top_k = s.top_k;
          config.expert_ffn_size = s.ffn;
          auto groups =
              std::make_shared<parallel::ProcessGroups>(parallel::make_single_process_groups());
          at::manual_seed(0);
          moe::MoeLayer layer(s.hidden, config, *groups->ep);
          {
            at::NoGradGuard no_grad;
            for (auto& p : layer->parameters()) p.normal_(0, 0.02);
          }
          const auto x = at::randn({s.tokens, s.hidden}).set_requires_grad(true);
          return [groups, layer, x, tokens = s.tokens]() mutable {
            layer->zero_grad();
            layer->forward(x, tokens).y.sum().backward();
          };
        },
        iterations);
    const auto dense = measure(
        [&]() -> std::function<void()> {
          at::manual_seed(0);
          moe::FeedForward feed_forward(s.hidden, s.top_k * s.ffn);
          {
            at::NoGradGuard no_grad;
            for (auto& p : feed_forward->parameters()) p.normal_(0, 0.02);
          }
          const auto x = at::randn({s.tokens, s.hidden}).set_requires_grad(true);
          return [feed_forward, x]() mutable {
            feed_forward->zero_grad();
            feed_forward->forward(x).sum().backward();
          };
        },
        iterations);

    const double moe_gflops = flops / moe.seconds / 1e9;
    const double dense_gflops = flops / dense.seconds / 1e9;
    fmt::print("{:<22} {:>10.1f} {:>10.1f} {:>7.3f} {:>11.1f} {:>11.1f}\n", s.name, moe_gflops,
               dense_gflops, moe_gflops / dense_gflops, moe.peak_mib, dense.peak_mib);
  }
  return 0;
}

// MoE layer forward+backward beside the things a user could run instead, side by side in one run
// (this machine is noisy: the per-round ratios are what we compare).
//
//   build/bench/bench_moe_layer [--quick] [--rounds N] [--iters N] [--only shapes|scaling]
//                               [--no-python]
//
// Columns, each measured in its own process (a forked child, or a Python interpreter running
// bench/moe_layer_reference.py) so cases share neither a high-water mark nor allocator state:
//   moeforge  moe::MoeLayer at ep 1, fp32;
//   dense     moe::FeedForward of intermediate k·F on the same T tokens: the routed experts'
//             FLOPs with no routing, the limit a MoE layer can approach;
//   eager     a torchtitan-style MoE in eager PyTorch (sort + torch._grouped_mm + index_add);
//   hf        transformers' MixtralSparseMoeBlock (experts_implementation "grouped_mm");
//   dense-py  the dense SwiGLU in eager PyTorch;
//   moeforge-aten, dense-aten  the same with MOEFORGE_CPU_GEMM=aten (MKL's sgemm instead of
//             oneDNN for the fp32 products, moe/cpu_gemm.hpp);
//   moeforge-matmul  the same with MOEFORGE_EXPERT_GEMM=matmul (the experts' products through
//             oneDNN's matmul instead of brgemm tiles);
//   peak      the shape's FLOPs at the rate of a large square fp32 matmul on all threads
//             (moe::gemm_into, oneDNN: near the machine's FMA peak): no implementation of the same
//             math in fp32 gets below this time, so "vs peak" is the fraction of peak reached, and
//             a speed-up over another column beyond that column's time / peak is out of reach.
// GFLOP/s count the routed experts only (3 GEMMs of 2·H·F per routed slot, ×3 for forward and
// backward). Rounds are interleaved (every column of every shape once per round); a ratio is
// taken within each round and reported as the median [min–max] over rounds. Peak MiB is the
// RSS growth over the process's RSS before the module was built (weights included).
// Python runs with the same thread count and the same glibc malloc settings as the trainer.
#include <ATen/ATen.h>
#include <fmt/format.h>
#include <sys/resource.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "child_process.hpp"
#include "moe/cpu_gemm.hpp"
#include "moe/moe_layer.hpp"
#include "parallel/process_groups.hpp"
#include "spread.hpp"
#include "trainer/common/host_allocator.hpp"

using namespace moeforge;

namespace {

struct Shape {
  std::string name;
  int64_t tokens, hidden, experts, top_k, ffn;
  double flops() const { return 3.0 * tokens * top_k * 3.0 * 2.0 * hidden * ffn; }
};

struct Measurement {
  double seconds = 0;   // median per iteration
  double peak_mib = 0;  // peak RSS growth over the baseline
};

using Body = std::function<void()>;

// Builds the case with `make_body` and times the body it returns in a forked child: one
// warm-up, then `iterations` timed runs. All ATen work happens in the child, so no OpenMP
// thread pool is ever forked.
Measurement measure_in_child(const std::function<Body()>& make_body, int iterations) {
  return bench::run_in_child<Measurement>([&] {
    const long baseline = bench::current_rss_kb();
    const auto body = make_body();
    body();
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

template <class Module>
void randomize(Module& module) {
  at::NoGradGuard no_grad;
  for (auto& p : module->parameters()) p.normal_(0, 0.02);
}

// path: kAuto is the gathered-experts path ep 1 takes in fp32; kPipeline the dispatch pipeline
// with the gated-rows experts (what expert parallelism runs), kGroupedGemm with grouped GEMMs.
Measurement moeforge_moe(const Shape& s, int iterations,
                         moe::ExpertPath path = moe::ExpertPath::kAuto) {
  return measure_in_child(
      [&]() -> Body {
        moe::MoeConfig config;
        config.num_experts = s.experts;
        config.top_k = s.top_k;
        config.expert_ffn_size = s.ffn;
        auto groups =
            std::make_shared<parallel::ProcessGroups>(parallel::make_single_process_groups());
        at::manual_seed(0);
        moe::MoeLayer layer(s.hidden, config, *groups->ep);
        randomize(layer);
        layer->force_expert_path(path);
        const auto x = at::randn({s.tokens, s.hidden}).set_requires_grad(true);
        return [groups, layer, x, tokens = s.tokens]() mutable {
          layer->zero_grad();
          layer->forward(x, tokens).y.sum().backward();
        };
      },
      iterations);
}

Measurement moeforge_dense(const Shape& s, int iterations) {
  return measure_in_child(
      [&]() -> Body {
        at::manual_seed(0);
        moe::FeedForward feed_forward(s.hidden, s.top_k * s.ffn);
        randomize(feed_forward);
        const auto x = at::randn({s.tokens, s.hidden}).set_requires_grad(true);
        return [feed_forward, x]() mutable {
          feed_forward->zero_grad();
          feed_forward->forward(x).sum().backward();
        };
      },
      iterations);
}

// Runs `measure` (which forks its child) with `variable`=`value` in the environment the child
// inherits; the parent does no ATen work, so its own kernel choices are never made.
Measurement with_env(const char* variable, const char* value,
                     const std::function<Measurement()>& measure) {
  setenv(variable, value, 1);
  const auto result = measure();
  unsetenv(variable);
  return result;
}

// The time `s` would take at the rate of a 2048³ fp32 matmul (at least 0.3 s of repeats).
Measurement fp32_peak(const Shape& s, int /*iterations*/) {
  return bench::run_in_child<Measurement>([&] {
    constexpr int64_t kSize = 2048;
    const auto a = at::randn({kSize, kSize}), b = at::randn({kSize, kSize});
    auto c = at::empty({kSize, kSize});
    moe::gemm_into(c, a, b);  // the kernel the layers use (oneDNN for CPU fp32)
    int64_t repeats = 0;
    const auto start = std::chrono::steady_clock::now();
    double seconds = 0;
    while (seconds < 0.3) {
      moe::gemm_into(c, a, b);
      ++repeats;
      seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
    const double rate = 2.0 * kSize * kSize * kSize * repeats / seconds;
    return Measurement{s.flops() / rate, 0};
  });
}

namespace fs = std::filesystem;

std::string python_interpreter() {
  if (const char* python = std::getenv("MOEFORGE_PYTHON"); python && *python) return python;
  const auto venv = fs::path(MOEFORGE_SOURCE_DIR) / ".venv" / "bin" / "python";
  return fs::exists(venv) ? venv.string() : "python3";
}

// One case of bench/moe_layer_reference.py; a failed run is reported and measures 0.
Measurement python_case(const std::string& impl, const Shape& s, int iterations) {
  const auto command = fmt::format(
      "OMP_NUM_THREADS={} GLIBC_TUNABLES={} {} {}/bench/moe_layer_reference.py {} --tokens {} "
      "--hidden {} --experts {} --top-k {} --ffn {} --iters {}",
      at::get_num_threads(), host_allocator_glibc_tunables(), python_interpreter(),
      MOEFORGE_SOURCE_DIR, impl, s.tokens, s.hidden, s.experts, s.top_k, s.ffn, iterations);
  std::string output;
  if (FILE* pipe = popen(command.c_str(), "r")) {
    char buffer[512];
    while (fgets(buffer, sizeof(buffer), pipe)) output += buffer;
    if (pclose(pipe) == 0) {
      const auto result = nlohmann::json::parse(output);
      return {result.at("seconds").get<double>(), result.at("peak_mib").get<double>()};
    }
  }
  fmt::print(stderr, "python case failed: {}\n{}\n", command, output);
  return {};
}

// --profile: one moeforge MoE step under LibTorch's profiler, self time per op category.
struct Profile {
  static constexpr int kCategories = 7;
  double ms[kCategories] = {};  // summed over the threads that ran ops
  double wall_ms = 0;
  double op_ms() const { return std::accumulate(ms, ms + kCategories, 0.0); }
};
constexpr const char* kCategoryNames[Profile::kCategories] = {"expert GEMMs",
                                                              "SwiGLU + gate elementwise",
                                                              "gather/scatter/permute",
                                                              "routing + balancing",
                                                              "alloc + fill",
                                                              "autograd engine",
                                                              "other"};

int category_of(const std::string& op) {
  const auto has = [&](const char* s) { return op.find(s) != std::string::npos; };
  if (has("autograd::engine") || has("Backward")) return 5;
  if (has("::mm") || has("mm_out") || has("addmm") || has("grouped_mm") || has("bmm") ||
      has("brgemm"))
    return 0;
  if (has("silu") || has("::mul") || has("::add") || has("::sum") || has("sigmoid")) return 1;
  if (has("index") || has("gather") || has("scatter") || has("rows") || has("copy") ||
      has("::cat") || has("clone") || has("contiguous"))
    return 2;
  if (has("softmax") || has("topk") || has("sort") || has("bincount") || has("where") ||
      has("one_hot") || has("logsumexp") || has("div") || has("::eq") || has("histc"))
    return 3;
  if (has("empty") || has("zero") || has("fill") || has("resize")) return 4;
  return 6;
}

// Self time of every recorded op (its duration minus its children's on the same thread).
Profile summarize(const std::vector<torch::autograd::profiler::KinetoEvent>& events) {
  std::map<uint64_t, std::vector<const torch::autograd::profiler::KinetoEvent*>> by_thread;
  for (const auto& e : events)
    if (e.deviceType() == c10::DeviceType::CPU) by_thread[e.startThreadId()].push_back(&e);
  Profile profile;
  for (auto& [thread, list] : by_thread) {
    std::sort(list.begin(), list.end(), [](auto* a, auto* b) {
      return a->startNs() != b->startNs() ? a->startNs() < b->startNs()
                                          : a->durationNs() > b->durationNs();
    });
    std::vector<std::pair<const torch::autograd::profiler::KinetoEvent*, double>> open;  // self
    const auto close = [&](size_t keep) {
      while (open.size() > keep) {
        profile.ms[category_of(open.back().first->name())] += open.back().second / 1e6;
        open.pop_back();
      }
    };
    for (const auto* e : list) {
      size_t depth = open.size();
      while (depth > 0 && open[depth - 1].first->endNs() <= e->startNs()) --depth;
      close(depth);
      if (!open.empty()) open.back().second -= e->durationNs();
      open.push_back({e, static_cast<double>(e->durationNs())});
    }
    close(0);
  }
  return profile;
}

Profile profile_moe(const Shape& s) {
  return bench::run_in_child<Profile>([&] {
    moe::MoeConfig config;
    config.num_experts = s.experts;
    config.top_k = s.top_k;
    config.expert_ffn_size = s.ffn;
    auto groups = parallel::make_single_process_groups();
    at::manual_seed(0);
    moe::MoeLayer layer(s.hidden, config, *groups.ep);
    randomize(layer);
    const auto x = at::randn({s.tokens, s.hidden}).set_requires_grad(true);
    const auto step = [&] {
      layer->zero_grad();
      layer->forward(x, s.tokens).y.sum().backward();
    };
    step();
    namespace profiler = torch::autograd::profiler;
    const torch::profiler::impl::ProfilerConfig setting(
        torch::profiler::impl::ProfilerState::KINETO);
    const std::set<torch::profiler::impl::ActivityType> cpu = {
        torch::profiler::impl::ActivityType::CPU};
    profiler::prepareProfiler(setting, cpu);
    profiler::enableProfiler(setting, cpu);
    const auto start = std::chrono::steady_clock::now();
    step();
    const double wall_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    auto profile = summarize(profiler::disableProfiler()->events());
    profile.wall_ms = wall_ms;
    return profile;
  });
}

void print_profiles(const std::vector<Shape>& shapes) {
  fmt::print(
      "\nOne MoE step (fwd+bwd) under the profiler: self ms per op category, summed over the "
      "threads that ran ops (experts split into per-thread shares run on all threads at once)"
      "\n{:<28}",
      "category");
  for (const auto& s : shapes) fmt::print(" {:>24}", s.name);
  fmt::print("\n");
  std::vector<Profile> profiles;
  for (const auto& s : shapes) profiles.push_back(profile_moe(s));
  for (int c = 0; c < Profile::kCategories; ++c) {
    fmt::print("{:<28}", kCategoryNames[c]);
    for (const auto& p : profiles)
      fmt::print(" {:>15.1f} ({:>4.1f}%)", p.ms[c], 100 * p.ms[c] / p.op_ms());
    fmt::print("\n");
  }
  fmt::print("{:<28}", "step (wall)");
  for (const auto& p : profiles) fmt::print(" {:>24.1f}", p.wall_ms);
  fmt::print("\n{:<28}", "op time / wall (threads)");
  for (const auto& p : profiles) fmt::print(" {:>24.2f}", p.op_ms() / p.wall_ms);
  fmt::print("\n");
}

struct Column {
  std::string name;
  std::function<Measurement(const Shape&, int)> run;
};

using Samples = std::map<std::string, std::vector<Measurement>>;  // column -> one per round

std::vector<Column> columns(const std::vector<std::string>& names) {
  std::vector<Column> chosen;
  for (const auto& name : names) {
    if (name == "moeforge")
      chosen.push_back({name, [](const Shape& s, int n) { return moeforge_moe(s, n); }});
    if (name == "pipeline")
      chosen.push_back({name, [](const Shape& s, int n) {
                          return moeforge_moe(s, n, moe::ExpertPath::kPipeline);
                        }});
    if (name == "grouped")
      chosen.push_back({name, [](const Shape& s, int n) {
                          return moeforge_moe(s, n, moe::ExpertPath::kGroupedGemm);
                        }});
    if (name == "dense") chosen.push_back({name, moeforge_dense});
    // The same code with ATen's CPU fp32 GEMM (MKL) instead of oneDNN: what the kernel choice
    // alone is worth.
    if (name == "moeforge-aten")
      chosen.push_back({name, [](const Shape& s, int n) {
                          return with_env("MOEFORGE_CPU_GEMM", "aten",
                                          [&] { return moeforge_moe(s, n); });
                        }});
    if (name == "dense-aten")
      chosen.push_back({name, [](const Shape& s, int n) {
                          return with_env("MOEFORGE_CPU_GEMM", "aten",
                                          [&] { return moeforge_dense(s, n); });
                        }});
    // The experts' products through oneDNN's matmul (64-row steps, MKL remainder) instead of
    // the brgemm tiles: what the tiles alone are worth.
    if (name == "moeforge-matmul")
      chosen.push_back({name, [](const Shape& s, int n) {
                          return with_env("MOEFORGE_EXPERT_GEMM", "matmul",
                                          [&] { return moeforge_moe(s, n); });
                        }});
    if (name == "peak") chosen.push_back({name, fp32_peak});
    if (name == "eager" || name == "hf")
      chosen.push_back({name, [name](const Shape& s, int n) { return python_case(name, s, n); }});
    if (name == "dense-py")
      chosen.push_back({name, [](const Shape& s, int n) { return python_case("dense", s, n); }});
  }
  return chosen;
}

using bench::Spread;

// Per round the first column's time over the other column's (> 1: the first is faster).
Spread speedup(const Samples& samples, const std::string& first, const std::string& other) {
  std::vector<double> ratios;
  const auto& ours = samples.at(first);
  const auto& theirs = samples.at(other);
  for (size_t r = 0; r < ours.size(); ++r)
    if (ours[r].seconds > 0 && theirs[r].seconds > 0)
      ratios.push_back(theirs[r].seconds / ours[r].seconds);
  return ratios.empty() ? Spread{0, 0, 0} : bench::spread_of(ratios);
}

std::string format_spread(const Spread& s, int digits) {
  return fmt::format("{:.{}f} [{:.{}f}-{:.{}f}]", s.median, digits, s.min, digits, s.max, digits);
}

void print_table(const std::string& title, const std::vector<Shape>& shapes,
                 const std::vector<Column>& cols, const std::vector<Samples>& samples) {
  fmt::print("\n{} (vs X: X's time / {}'s, median [min-max] of rounds)\n{:<24}", title,
             cols[0].name, "shape");
  for (const auto& c : cols) fmt::print(" {:>13}", c.name + " GF/s");
  for (size_t c = 1; c < cols.size(); ++c) fmt::print(" {:>21}", "vs " + cols[c].name);
  for (const auto& c : cols) fmt::print(" {:>12}", c.name + " MiB");
  fmt::print("\n");
  for (size_t i = 0; i < shapes.size(); ++i) {
    fmt::print("{:<24}", shapes[i].name);
    for (const auto& c : cols) {
      std::vector<double> gflops;
      for (const auto& m : samples[i].at(c.name))
        gflops.push_back(m.seconds > 0 ? shapes[i].flops() / m.seconds / 1e9 : 0);
      fmt::print(" {:>13.1f}", bench::spread_of(gflops).median);
    }
    for (size_t c = 1; c < cols.size(); ++c)
      fmt::print(" {:>21}", format_spread(speedup(samples[i], cols[0].name, cols[c].name), 2));
    for (const auto& c : cols) {
      std::vector<double> peaks;
      for (const auto& m : samples[i].at(c.name)) peaks.push_back(m.peak_mib);
      fmt::print(" {:>12.0f}", bench::spread_of(peaks).median);
    }
    fmt::print("\n");
  }
}

// With a peak column: each other column's time over the peak time, per round: the most that any
// fp32 implementation of the same math could be faster than that column.
void print_ceilings(const std::vector<Shape>& shapes, const std::vector<Column>& cols,
                    const std::vector<Samples>& samples) {
  if (std::none_of(cols.begin(), cols.end(), [](const Column& c) { return c.name == "peak"; }))
    return;
  fmt::print(
      "\nceiling: X's time / the time at fp32 matmul peak (no fp32 code beats X by more)\n"
      "{:<24}",
      "shape");
  for (const auto& c : cols)
    if (c.name != "peak") fmt::print(" {:>21}", c.name);
  fmt::print("\n");
  for (size_t i = 0; i < shapes.size(); ++i) {
    fmt::print("{:<24}", shapes[i].name);
    for (const auto& c : cols)
      if (c.name != "peak")
        fmt::print(" {:>21}", format_spread(speedup(samples[i], "peak", c.name), 2));
    fmt::print("\n");
  }
}

// Every column of every shape once per round, rounds interleaved.
std::vector<Samples> run_rounds(const std::vector<Shape>& shapes, const std::vector<Column>& cols,
                                int rounds, int iterations) {
  std::vector<Samples> samples(shapes.size());
  for (int r = 0; r < rounds; ++r) {
    for (size_t i = 0; i < shapes.size(); ++i)
      for (const auto& c : cols) samples[i][c.name].push_back(c.run(shapes[i], iterations));
    fmt::print(stderr, "round {}/{} done\n", r + 1, rounds);
  }
  return samples;
}

// The three shapes: Mixtral-like, DeepSeek-like fine-grained, small.
std::vector<Shape> reference_shapes() {
  return {{"E8 k2 H512 F1024 T4096", 4096, 512, 8, 2, 1024},
          {"E64 k6 H512 F256 T4096", 4096, 512, 64, 6, 256},
          {"E16 k2 H256 F512 T1024", 1024, 256, 16, 2, 512}};
}

// Fine-grained scaling at constant work: T 4096, H 512, k·F = 2048 and 1024 rows per expert.
std::vector<Shape> scaling_shapes() {
  std::vector<Shape> shapes;
  for (int64_t experts = 8; experts <= 128; experts *= 2) {
    const int64_t top_k = experts / 4, ffn = 2048 / top_k;
    shapes.push_back(
        {fmt::format("E{} k{} F{}", experts, top_k, ffn), 4096, 512, experts, top_k, ffn});
  }
  return shapes;
}

}  // namespace

int main(int argc, char** argv) {
  tune_host_allocator();  // as the trainer does
  bound_onednn_primitive_cache();
  CLI::App app{"MoE layer forward+backward vs dense SwiGLU and eager PyTorch references"};
  int rounds = 5, iterations = 3;
  std::string only, column_list, shape_filter;
  bool quick = false, no_python = false, profile = false;
  app.add_option("--rounds", rounds, "interleaved rounds")->check(CLI::PositiveNumber);
  app.add_option("--iters", iterations, "timed iterations per case and round")
      ->check(CLI::PositiveNumber);
  app.add_option("--only", only, "one table")->check(CLI::IsMember({"shapes", "scaling"}));
  app.add_flag("--quick", quick, "2 rounds of 2 iterations");
  app.add_option(
      "--columns", column_list,
      "comma-separated columns, first is the one compared (default: all of the table; "
      "also: pipeline = moeforge's dispatch pipeline at ep 1 (gated-rows experts), grouped = "
      "the pipeline with grouped-GEMM experts)");
  app.add_option("--shape", shape_filter,
                 "only the shapes whose name contains this text (e.g. E16, 'k6 H512')");
  app.add_flag("--no-python", no_python, "moeforge and its dense column only");
  app.add_flag("--profile", profile, "only: self time per op category of one moeforge step");
  CLI11_PARSE(app, argc, argv);
  if (quick) rounds = iterations = 2;
  const auto pick = [&](std::vector<std::string> names) {
    if (!column_list.empty()) {
      names.clear();
      std::stringstream list(column_list);
      for (std::string name; std::getline(list, name, ',');) names.push_back(name);
    }
    if (no_python)
      std::erase_if(names,
                    [](const auto& n) { return n == "eager" || n == "hf" || n == "dense-py"; });
    return columns(names);
  };
  const auto chosen = [&](std::vector<Shape> shapes) {
    std::erase_if(shapes,
                  [&](const Shape& s) { return s.name.find(shape_filter) == std::string::npos; });
    return shapes;
  };
  if (profile) {
    auto shapes = reference_shapes();
    for (const auto& s : scaling_shapes())
      if (s.experts == 128) shapes.push_back(s);
    print_profiles(chosen(shapes));
    return 0;
  }
  fmt::print("{} rounds x {} iterations, {} threads\n", rounds, iterations, at::get_num_threads());
  if (only != "scaling") {
    const auto cols =
        pick({"moeforge", "moeforge-aten", "dense", "eager", "hf", "dense-py", "peak"});
    const auto shapes = chosen(reference_shapes());
    const auto samples = run_rounds(shapes, cols, rounds, iterations);
    print_table("MoE layer fwd+bwd", shapes, cols, samples);
    print_ceilings(shapes, cols, samples);
  }
  if (only != "shapes") {
    const auto cols = pick({"moeforge", "dense", "eager", "peak"});
    const auto shapes = chosen(scaling_shapes());
    const auto samples = run_rounds(shapes, cols, rounds, iterations);
    print_table("Fine-grained scaling at constant work (T 4096, H 512, k·F 2048)", shapes, cols,
                samples);
    print_ceilings(shapes, cols, samples);
  }
  return 0;
}

// GPU benchmarks (one prepared call on the lent H100: launch/gpu-check.sh runs this).
//
//   build/bench/bench_gpu [--device cuda|cpu] [--quick] [--json FILE]
//                         [--train-config FILE --train-steps N]
//
// 1. Peak: a bf16 8192³ matmul (the ceiling MFU is measured against, as well as the datasheet).
// 2. MoE layer forward+backward in bf16 at Mixtral- and DeepSeek-like shapes: TFLOP/s of the
//    routed experts (3 GEMMs of 2·N·H·F forward, twice that backward, N = T·k routed rows) and
//    the fraction of a plain bf16 matmul of the same [N, H]·[H, F] shape timed in the same run.
//    The PyTorch-eager torch._grouped_mm reference (bench/gpu_moe_reference.py) times the same
//    shapes in the same call; gpu-check.sh prints the ratio.
// 3. Whole-model training of --train-config on this one device: tokens/s, MFU with MoE-aware
//    FLOP counting (trainer/model/flops.hpp), peak memory.
// Times: medians of synchronised iterations after warm-up, fresh random inputs (never zeros).
// --device cpu --quick rehearses every section on the CPU with tiny shapes.
#include <ATen/ATen.h>
#include <fmt/format.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/cuda.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <fstream>
#include <functional>
#include <iostream>
#include <vector>

#include "moe/moe_layer.hpp"
#include "parallel/process_groups.hpp"
#include "trainer/config/config.hpp"
#include "trainer/data/data.hpp"
#include "trainer/runtime/device.hpp"
#include "trainer/model/flops.hpp"
#include "trainer/trainer.hpp"

using namespace moeforge;

namespace {

struct Shape {
  const char* name;
  int64_t hidden, experts, top_k, ffn, tokens;
};

void synchronize(const at::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize();
}

// Median seconds of `body` over `iterations` synchronised runs after `warmup` runs.
double median_seconds(const at::Device& device, int warmup, int iterations,
                      const std::function<void()>& body) {
  for (int i = 0; i < warmup; ++i) body();
  synchronize(device);
  std::vector<double> times;
  for (int i = 0; i < iterations; ++i) {
    const auto start = std::chrono::steady_clock::now();
    body();
    synchronize(device);
    times.push_back(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// TFLOP/s of a bf16 [m, k]·[k, n] matmul (fresh random operands, three sets rotated so repeated
// runs do not measure a cache).
double matmul_tflops(const at::Device& device, int64_t m, int64_t k, int64_t n, int iterations) {
  const auto options = at::TensorOptions(device).dtype(at::kBFloat16);
  std::vector<at::Tensor> a, b;
  for (int i = 0; i < 3; ++i) {
    a.push_back(at::randn({m, k}, options));
    b.push_back(at::randn({k, n}, options));
  }
  int which = 0;
  const double seconds = median_seconds(device, 3, iterations, [&] {
    at::matmul(a[which], b[which]);
    which = (which + 1) % 3;
  });
  return 2.0 * static_cast<double>(m) * static_cast<double>(k) * static_cast<double>(n) / seconds /
         1e12;
}

// Runs `body` once under the Kineto profiler (CPU ops and CUDA kernels) and writes a Chrome
// trace to `path` (bench/trace_summary.py sums its kernels).
void profile_once(const at::Device& device, const std::string& path,
                  const std::function<void()>& body) {
  namespace profiler = torch::autograd::profiler;
  using torch::profiler::impl::ActivityType;
  const profiler::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO);
  std::set<ActivityType> activities{ActivityType::CPU};
  if (device.is_cuda()) activities.insert(ActivityType::CUDA);
  profiler::prepareProfiler(config, activities);
  profiler::enableProfiler(config, activities);
  body();
  synchronize(device);
  profiler::disableProfiler()->save(path);
}

struct LayerResult {
  double seconds, forward_seconds, tflops, matmul_tflops;
};

// The MoE layer in bf16 (weights and activations; router math in fp32), forward + backward.
LayerResult time_moe_layer(const at::Device& device, const Shape& s, int iterations,
                           const std::string& trace_path) {
  MoeConfig config;
  config.num_experts = s.experts;
  config.top_k = s.top_k;
  config.expert_ffn_size = s.ffn;
  const auto self = parallel::make_single_process_groups();
  moe::MoeLayer layer(s.hidden, config, *self.ep);
  {
    at::NoGradGuard no_grad;
    for (auto& p : layer->parameters()) p.normal_(0.0, 0.02);
  }
  layer->to(device, at::kBFloat16);
  const auto options = at::TensorOptions(device).dtype(at::kBFloat16);
  const auto x = at::randn({s.tokens, s.hidden}, options).set_requires_grad(true);
  const auto dy = at::randn({s.tokens, s.hidden}, options);
  const double forward = median_seconds(device, 2, iterations, [&] {
    at::NoGradGuard no_grad;
    layer->forward(x, s.tokens);
  });
  // As in training: gradients start undefined every step (AdamW::zero_grad), no accumulation.
  const auto fresh_step = [&] {
    layer->zero_grad(/*set_to_none=*/true);
    x.mutable_grad() = at::Tensor();
    layer->forward(x, s.tokens).y.backward(dy.to(at::kFloat));
  };
  const double both = median_seconds(device, 2, iterations, fresh_step);
  if (!trace_path.empty()) profile_once(device, trace_path, fresh_step);
  const double rows = static_cast<double>(s.tokens * s.top_k);
  const double flops = 18.0 * rows * static_cast<double>(s.hidden) * static_cast<double>(s.ffn);
  return {both, forward, flops / both / 1e12,
          matmul_tflops(device, s.tokens * s.top_k, s.hidden, s.ffn, iterations)};
}

struct TrainResult {
  double tokens_per_s, tflops, peak_gib;
  FlopCount flops;
};

TrainResult time_training(const at::Device& device, const std::string& path, int64_t steps,
                          const std::string& trace_path) {
  auto config =
      load_config(path, {fmt::format("train.steps={}", steps),
                         fmt::format("train.device={}", device.is_cuda() ? "cuda" : "cpu"),
                         "train.warmup_steps=1", "train.eval_every=0"});
  RunOptions options;
  options.write_outputs = false;
  const auto self = parallel::make_single_process_groups();
  Trainer trainer(config, self,
                  TokenDataset::open(config.data, config.model.vocab_size, config.train.seq_len),
                  options);
  const auto summary = trainer.run();
  if (!trace_path.empty())  // one more global batch: forward, backward, gradient sync
    profile_once(device, trace_path, [&] { trainer.compute_gradients(0); });
  TrainResult result;
  result.flops = count_flops(config, config.train.seq_len);
  result.tokens_per_s = summary.tokens_per_s;
  result.tflops = result.flops.training_per_token * summary.tokens_per_s / 1e12;
  result.peak_gib = static_cast<double>(peak_memory_bytes(device)) / (1 << 30);
  return result;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"moeforge GPU benchmarks"};
  std::string device_name = "cuda", json_path, train_config, profile_dir;
  bool quick = false, skip_layers = false;
  int64_t train_steps = 12;
  app.add_option("--device", device_name)->check(CLI::IsMember({"cuda", "cpu"}));
  app.add_flag("--quick", quick, "tiny shapes (CPU rehearsal)");
  app.add_flag("--skip-layers", skip_layers, "only the peak matmul and the training section");
  app.add_option("--json", json_path, "append one JSON object per result to FILE");
  app.add_option("--train-config", train_config, "whole-model training section on this config");
  app.add_option("--train-steps", train_steps);
  app.add_option("--profile", profile_dir,
                 "write Chrome traces of one MoE layer f+b (first shapes) and one training step");
  CLI11_PARSE(app, argc, argv);
  if (device_name == "cuda" && !torch::cuda::is_available()) {
    std::cerr << "bench_gpu: no CUDA device visible (use --device cpu --quick to rehearse)\n";
    return 2;
  }
  const at::Device device = device_name == "cuda" ? at::Device(at::kCUDA, 0) : at::Device(at::kCPU);
  std::ofstream json;
  if (!json_path.empty()) json.open(json_path, std::ios::app);
  const int iterations = quick ? 3 : 10;
  at::manual_seed(20261127);

  const int64_t peak_size = quick ? 512 : 8192;
  const double peak = matmul_tflops(device, peak_size, peak_size, peak_size, iterations);
  std::cout << fmt::format("device {}: bf16 {}³ matmul {:.1f} TFLOP/s\n", device.str(), peak_size,
                           peak);
  if (json)
    json << fmt::format(R"({{"kind":"peak","size":{},"tflops":{:.2f}}})", peak_size, peak) << "\n";

  std::vector<Shape> shapes = {{"mixtral T8k", 4096, 8, 2, 14336, 8192},
                               {"mixtral T16k", 4096, 8, 2, 14336, 16384},
                               {"deepseek-v2-lite T16k", 2048, 64, 6, 1408, 16384},
                               {"deepseek-v3-shard T8k", 7168, 64, 8, 2048, 8192}};
  if (quick) shapes = {{"tiny", 64, 8, 2, 128, 512}, {"tiny-fine", 64, 16, 4, 32, 512}};
  if (skip_layers) shapes.clear();
  std::cout << fmt::format("{:<24} {:>9} {:>9} {:>12} {:>12} {:>9}\n", "MoE layer bf16", "fwd ms",
                           "f+b ms", "TFLOP/s", "matmul TF/s", "fraction");
  for (size_t i = 0; i < shapes.size(); ++i) {
    const auto& s = shapes[i];
    const bool traced = !profile_dir.empty() && (i == 0 || i == 2);
    const auto r = time_moe_layer(device, s, iterations,
                                  traced ? fmt::format("{}/layer-{}.json", profile_dir, i) : "");
    std::cout << fmt::format("{:<24} {:>9.2f} {:>9.2f} {:>12.1f} {:>12.1f} {:>8.0f}%\n", s.name,
                             r.forward_seconds * 1e3, r.seconds * 1e3, r.tflops, r.matmul_tflops,
                             100.0 * r.tflops / r.matmul_tflops);
    if (json)
      json
          << fmt::format(
                 R"({{"kind":"moe_layer","name":"{}","hidden":{},"experts":{},"top_k":{},"ffn":{},"tokens":{},"seconds":{:.6f},"forward_seconds":{:.6f},"tflops":{:.2f},"matmul_tflops":{:.2f}}})",
                 s.name, s.hidden, s.experts, s.top_k, s.ffn, s.tokens, r.seconds,
                 r.forward_seconds, r.tflops, r.matmul_tflops)
          << "\n";
  }

  if (!train_config.empty()) {
    const auto r = time_training(device, train_config, train_steps,
                                 profile_dir.empty() ? "" : profile_dir + "/train.json");
    std::cout << fmt::format(
        "training {}: {:.2f}B params ({:.2f}B active), {:.0f} tokens/s, {:.1f} TFLOP/s, MFU "
        "{:.1f}% "
        "of the measured bf16 peak ({:.1f}% of 989 TFLOP/s), peak memory {:.1f} GiB\n",
        train_config, r.flops.total_params / 1e9, r.flops.active_params / 1e9, r.tokens_per_s,
        r.tflops, 100.0 * r.tflops / peak, 100.0 * r.tflops / 989.0, r.peak_gib);
    if (json)
      json
          << fmt::format(
                 R"({{"kind":"training","config":"{}","total_params":{},"active_params":{},"tokens_per_s":{:.1f},"tflops":{:.2f},"mfu_measured_peak":{:.4f},"peak_gib":{:.2f}}})",
                 train_config, r.flops.total_params, r.flops.active_params, r.tokens_per_s,
                 r.tflops, r.tflops / peak, r.peak_gib)
          << "\n";
  }
  return 0;
}

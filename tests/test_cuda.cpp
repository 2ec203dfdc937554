// The GPU path against independent references: the MoE layer on CUDA (fp32, and bf16 under
// autocast as train.precision: bf16 runs it) against the same layer in float64 on the CPU, with
// fresh random inputs every run and the CUDA caching allocator poisoned with NaN beforehand so
// an unwritten output row shows; empty experts and capacity drops; five training steps on CUDA
// against the CPU; NCCL at world size 1 (counts exchange, all-to-all with itself, stream order).
// Every test skips with its reason where no GPU is visible; the device-selection errors are
// tested there instead.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>

#include <random>

#include "moe/moe_layer.hpp"
#include "parallel/process_groups.hpp"
#include "test_support.hpp"
#include "trainer/common/user_error.hpp"
#include "trainer/data/data.hpp"
#include "trainer/runtime/device.hpp"
#include "trainer/trainer.hpp"
#ifdef MOEFORGE_CUDA

#include "parallel/nccl_communicator.hpp"
#endif

namespace moeforge {
namespace {

using testing::relative_error;

#define REQUIRE_GPU()                                                                  \
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible: skipped"; \
  static_assert(true)

// A seed that differs from run to run (printed, so a failure can be replayed).
uint64_t fresh_seed() {
  const uint64_t seed = std::random_device{}();
  std::cout << "[seed " << seed << "]" << std::endl;
  return seed;
}

// Fills the CUDA caching allocator's free blocks with NaN: later at::empty() results reuse them,
// so a row the code forgets to write stays NaN and fails every comparison.
void poison_cuda_allocator() {
  for (int64_t mib : {512, 64, 8, 1}) {
    auto block = at::empty({mib << 18}, at::TensorOptions(at::kCUDA).dtype(at::kFloat));
    block.fill_(std::numeric_limits<float>::quiet_NaN());
  }
  torch::cuda::synchronize();
}

struct LayerCase {
  const char* name;
  double capacity_factor = 0.0;
  bool starve_experts = false;  // expert bias keeps experts 0 and 5 empty
};

MoeConfig layer_config(const LayerCase& c) {
  MoeConfig config;
  config.num_experts = 8;
  config.top_k = 2;
  config.expert_ffn_size = 96;
  config.num_shared_experts = 1;
  config.capacity.factor = c.capacity_factor;
  return config;
}

struct LayerResult {
  at::Tensor y, grad_x, grad_w_gate, grad_router;
  moe::RoutingStats stats;
};

// Forward + backward of `layer` on x with loss Σ y·weight; results on the CPU in float64.
LayerResult run_layer(moe::MoeLayer& layer, const at::Tensor& x, const at::Tensor& weight,
                      bool autocast_bf16) {
  const auto input = x.detach().clone().set_requires_grad(true);
  const auto device = x.device().type();
  if (autocast_bf16) {
    at::autocast::set_autocast_dtype(device, at::kBFloat16);
    at::autocast::set_autocast_enabled(device, true);
  }
  const auto out = layer->forward(input, 64);
  const auto& y = out.y;
  if (autocast_bf16) {
    at::autocast::set_autocast_enabled(device, false);
    at::autocast::clear_cache();
  }
  (y.to(weight.scalar_type()) * weight).sum().backward();
  const auto host = [](const at::Tensor& t) { return t.detach().to(at::kCPU, at::kDouble); };
  return {host(y), host(input.grad()), host(layer->experts->w_gate.grad()),
          host(layer->router->weight.grad()), moe::read_stats(out.counters)};
}

// The layer on `device` (fp32 weights; bf16 compute when `bf16`) against the same weights in
// float64 on the CPU, for every edge case. The CPU variants prove the harness where no GPU is.
void expect_layer_matches_reference(const at::Device& device, bool bf16, double tolerance) {
  const auto self = parallel::make_single_process_groups();
  for (const LayerCase c : {LayerCase{"dropless"}, LayerCase{"capacity_drops", 0.5},
                            LayerCase{"empty_experts", 0.0, true}}) {
    const auto config = layer_config(c);
    at::manual_seed(fresh_seed());
    moe::MoeLayer reference(64, config, *self.ep);
    {
      at::NoGradGuard no_grad;
      for (auto& p : reference->parameters()) p.normal_(0.0, 0.1);
      if (c.starve_experts)
        for (int64_t e : {0, 5}) reference->router->expert_bias[e] = -100.0;
    }
    moe::MoeLayer cuda(64, config, *self.ep);
    {
      at::NoGradGuard no_grad;
      const auto source = reference->named_parameters();
      for (auto& p : cuda->named_parameters()) p.value().copy_(source[p.key()]);
      cuda->router->expert_bias.copy_(reference->router->expert_bias);
    }
    reference->to(at::kDouble);
    cuda->to(device);
    const auto x = at::randn({512, 64}, at::kDouble);
    const auto weight = at::randn({512, 64}, at::kDouble);
    const auto expected = run_layer(reference, x, weight, false);
    if (device.is_cuda()) poison_cuda_allocator();
    const auto actual =
        run_layer(cuda, x.to(device, at::kFloat), weight.to(device, at::kFloat), bf16);
    EXPECT_TRUE(at::equal(actual.stats.load, expected.stats.load)) << c.name << ": routing differs";
    EXPECT_EQ(actual.stats.dropped, expected.stats.dropped) << c.name;
    if (c.capacity_factor > 0) {
      EXPECT_GT(actual.stats.dropped, 0) << c.name << ": no drops, weak test";
    }
    if (c.starve_experts) {
      EXPECT_EQ(actual.stats.load[0].item<int64_t>(), 0) << c.name << ": expert 0 not empty";
    }
    for (const auto& [what, a, e] :
         {std::tuple{"y", actual.y, expected.y}, std::tuple{"dx", actual.grad_x, expected.grad_x},
          std::tuple{"dW_gate", actual.grad_w_gate, expected.grad_w_gate},
          std::tuple{"dW_router", actual.grad_router, expected.grad_router}}) {
      EXPECT_FALSE(a.isnan().any().item<bool>()) << c.name << " " << what << ": unwritten rows";
      const double error = relative_error(a, e);
      EXPECT_LT(error, tolerance) << c.name << " " << what;
      std::cout << fmt::format("  {} {} {}: |out-ref|/|ref| = {:.2e} (tolerance {:.0e})\n",
                               device.str(), bf16 ? "bf16" : "fp32", what, error, tolerance);
    }
  }
}

// Tolerances: fp32 rounding lands near 1e-6; bf16 operands between 1e-3 and 1e-2.
constexpr double kFp32Tolerance = 1e-4, kBf16Tolerance = 2e-2;

TEST(Cuda, MoeLayerFp32MatchesFloat64Reference) {
  REQUIRE_GPU();
  expect_layer_matches_reference(at::Device(at::kCUDA, 0), false, kFp32Tolerance);
}

TEST(Cuda, MoeLayerBf16MatchesFloat64Reference) {
  REQUIRE_GPU();
  expect_layer_matches_reference(at::Device(at::kCUDA, 0), true, kBf16Tolerance);
}

TEST(CpuRehearsal, MoeLayerFp32AndBf16MatchFloat64Reference) {
  expect_layer_matches_reference(at::Device(at::kCPU), false, kFp32Tolerance);
  expect_layer_matches_reference(at::Device(at::kCPU), true, kBf16Tolerance);
}

// Five optimizer steps of a small model on CUDA (NCCL world of one) against the CPU run of the
// same config: the loss curves agree.
TEST(Cuda, TrainingStepsMatchCpu) {
  REQUIRE_GPU();
  auto config = testing::small_test_config();
  config.train.steps = 5;
  config.train.warmup_steps = 1;
  RunOptions quiet;
  quiet.write_outputs = false;
  quiet.print = false;
  const auto self = parallel::make_single_process_groups();
  const auto data = [&] {
    return TokenDataset::open(config.data, config.model.vocab_size, config.train.seq_len);
  };
  const auto cpu = Trainer(config, self, data(), quiet).run().steps;
  config.train.device = DeviceKind::kCuda;
  Trainer gpu_trainer(config, self, data(), quiet);
  EXPECT_EQ(gpu_trainer.device().type(), at::kCUDA);
  const auto gpu = gpu_trainer.run().steps;
  ASSERT_EQ(cpu.size(), gpu.size());
  for (size_t i = 0; i < cpu.size(); ++i) {
    EXPECT_LT(testing::relative_difference(gpu[i].loss, cpu[i].loss), 1e-4) << "step " << i + 1;
    EXPECT_LT(testing::relative_difference(gpu[i].grad_norm, cpu[i].grad_norm), 1e-3)
        << "step " << i + 1;
  }
}

#ifdef MOEFORGE_CUDA
// NCCL at world size 1: the counts exchange, all-to-all-v and a block exchange with itself
// (into a poisoned output), host tensors through the staging wrapper, and the asynchronous
// exchange ordered after the compute that produced its input and before the compute that reads
// its output, with no host synchronisation in between.
TEST(Cuda, NcclWorldOfOne) {
  REQUIRE_GPU();
  const auto groups = parallel::with_backend(parallel::make_single_process_groups(),
                                             parallel::Backend::kNccl, at::Device(at::kCUDA, 0));
  auto& comm = *groups.world;
  EXPECT_EQ(comm.backend(), "nccl");
  // The MoE layer's counts exchange: int64 counts through all_to_all_v (host tensor, staged).
  const auto counts = at::tensor(std::vector<int64_t>{7, 3}, at::kLong).view({1, 2});
  EXPECT_TRUE(at::equal(comm.all_to_all_v(counts, {1}, {1}), counts));
  const auto on_gpu = at::TensorOptions(at::kCUDA).dtype(at::kFloat);
  const auto rows = at::randn({6, 4}, on_gpu);
  EXPECT_TRUE(at::equal(comm.all_to_all_v(rows, {6}, {6}), rows));
  poison_cuda_allocator();
  // Blocks sent in one order and received in another: rows 4-5, then 0-3.
  const auto swapped =
      comm.all_to_all_blocks(rows, {{0, 0, 4}, {0, 4, 2}}, {{0, 2, 4}, {0, 0, 2}}, 6);
  EXPECT_TRUE(at::equal(swapped, at::cat({rows.narrow(0, 4, 2), rows.narrow(0, 0, 4)})));
  auto host_counts = at::arange(3, at::kLong);  // a CPU tensor: staged through the GPU
  comm.all_reduce(host_counts);
  EXPECT_TRUE(at::equal(host_counts, at::arange(3, at::kLong)));
  for (const auto type : {at::kFloat, at::kBFloat16}) {
    // A long matmul produces the input on the compute stream; the exchange must wait for it.
    const auto a = at::randn({4096, 4096}, on_gpu.dtype(type));
    const auto produced = at::matmul(a, a).narrow(0, 0, 1024).contiguous();
    auto work = comm.all_to_all_blocks_async(produced, {{0, 0, 1024}}, {{0, 0, 1024}}, 1024);
    const auto received = work.wait() * 2;  // the compute stream waits for the exchange
    EXPECT_TRUE(at::equal(received, produced * 2)) << c10::toString(type);
  }
}
#endif

// Where no GPU is visible (CI), asking for one is a clear error naming the key.
TEST(Device, CudaWithoutGpuIsAClearError) {
  if (torch::cuda::is_available()) GTEST_SKIP() << "a GPU is visible: nothing to refuse";
  Config config;
  config.source_file = "run.yaml";
  config.train.device = DeviceKind::kCuda;
  try {
    resolve_device(config);
    FAIL() << "no error";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("train.device: cuda"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("run.yaml"), std::string::npos) << e.what();
  }
  config.train.device = DeviceKind::kCpu;
  EXPECT_TRUE(resolve_device(config).is_cpu());
}

TEST(Device, BackendFollowsDevice) {
  Config config;
  EXPECT_EQ(resolve_backend(config, at::Device(at::kCPU)), parallel::Backend::kMpi);
  EXPECT_EQ(resolve_backend(config, at::Device(at::kCUDA, 0)), parallel::Backend::kNccl);
  config.parallel.backend = BackendChoice::kMpi;
  EXPECT_EQ(resolve_backend(config, at::Device(at::kCUDA, 0)), parallel::Backend::kMpi);
  EXPECT_THROW(load_config_from_string("parallel: {backend: nccl}\n", "gpu.yaml"), UserError);
}

}  // namespace
}  // namespace moeforge

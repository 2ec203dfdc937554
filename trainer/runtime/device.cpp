#include "trainer/runtime/device.hpp"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <sys/resource.h>
#include <torch/cuda.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <set>
#include <thread>
#ifdef MOEFORGE_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include "moe/cpu_gemm.hpp"
#include "parallel/simulated_link.hpp"
#include "trainer/common/user_error.hpp"

namespace moeforge {

namespace {

// The first of the launcher variables that is set, or `fallback`.
int launcher_value(std::initializer_list<const char*> names, int fallback) {
  for (const char* name : names)
    if (const char* value = std::getenv(name)) return std::atoi(value);
  return fallback;
}

}  // namespace

int node_local_rank() {
  return launcher_value(
      {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "LOCAL_RANK"}, 0);
}

c10::Device resolve_device(const Config& config) {
  if (config.train.device == DeviceKind::kCpu) return c10::Device(c10::kCPU);
#ifndef MOEFORGE_CUDA
  throw UserError(fmt::format(
      "{}: train.device: cuda, but this moeforge was built without CUDA (its LibTorch has no "
      "CUDA, or MOEFORGE_WITH_CUDA=OFF); use train.device: cpu or rebuild with a CUDA LibTorch",
      config.source_file));
#endif
  const auto visible = static_cast<int>(torch::cuda::device_count());
  if (visible == 0)
    throw UserError(fmt::format(
        "{}: train.device: cuda, but no CUDA device is visible to this rank (no GPU, no driver, "
        "or CUDA_VISIBLE_DEVICES hides them); use train.device: cpu",
        config.source_file));
  return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(node_local_rank() % visible));
}

int64_t peak_memory_bytes(const c10::Device& device) {
#ifdef MOEFORGE_CUDA
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    return stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)]
        .peak;
  }
#endif
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<int64_t>(usage.ru_maxrss) * 1024;
}

int parallel_for_threads() {
  std::mutex mutex;
  std::set<std::thread::id> seen;
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    const std::lock_guard lock(mutex);
    seen.insert(std::this_thread::get_id());
  });
  return std::max<int>(1, static_cast<int>(seen.size()));
}

double measure_matmul_tflops(const c10::Device& device, at::ScalarType dtype, int64_t m, int64_t k,
                             int64_t n, double min_seconds) {
  at::NoGradGuard no_grad;
  const auto options = at::TensorOptions(device).dtype(dtype);
  const auto a = at::randn({m, k}, options), b = at::randn({k, n}, options);
  const auto synchronize = [&] {
    if (device.is_cuda()) torch::cuda::synchronize(device.index());
  };
  // The kernel the layers use (moe/cpu_gemm.hpp: oneDNN for CPU fp32), or MFU would exceed 1.
  moe::gemm(a, b);  // warm-up: kernel selection, allocator
  synchronize();
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  int64_t iterations = 0;
  double seconds = 0.0;
  // Several products per check: the clock and the synchronisation stay out of the timing.
  while (seconds < min_seconds || iterations < 3) {
    for (int i = 0; i < 4; ++i) moe::gemm(a, b);
    iterations += 4;
    synchronize();
    seconds = std::chrono::duration<double>(Clock::now() - start).count();
  }
  const double flops =
      2.0 * static_cast<double>(m) * static_cast<double>(k) * static_cast<double>(n);
  return flops * static_cast<double>(iterations) / seconds / 1e12;
}

parallel::Backend resolve_backend(const Config& config, const c10::Device& device) {
  if (config.parallel.backend == BackendChoice::kMpi || !device.is_cuda())
    return parallel::Backend::kMpi;
  // NCCL refuses two ranks on one GPU (with an opaque "invalid usage"): say so up front.
  const int ranks_here =
      launcher_value({"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "LOCAL_WORLD_SIZE"}, 1);
  const auto visible = static_cast<int>(torch::cuda::device_count());
  if (visible > 0 && ranks_here > visible)
    throw UserError(fmt::format(
        "{}: {} ranks on this node share {} GPU(s), and NCCL needs one GPU per rank: launch at "
        "most {} rank(s) per node (NP=...), or set parallel.backend: mpi",
        config.source_file, ranks_here, visible, visible));
  return parallel::Backend::kNccl;
}

parallel::ProcessGroups communication_groups(const Config& config,
                                             const parallel::ProcessGroups& groups,
                                             const c10::Device& device) {
  const auto backend = resolve_backend(config, device);
  const bool worker = config.parallel.comm_worker && backend == parallel::Backend::kMpi;
  const auto& link = config.parallel.simulated_link;
  return parallel::with_communication_options(
      parallel::with_backend(groups, backend, device), worker,
      parallel::LinkModel{link.bandwidth_gbps, link.latency_us});
}

}  // namespace moeforge

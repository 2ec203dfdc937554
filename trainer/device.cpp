#include "trainer/device.hpp"

#include <fmt/format.h>
#include <sys/resource.h>
#include <torch/cuda.h>

#include <cstdlib>
#ifdef MOEFORGE_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include "trainer/user_error.hpp"

namespace moeforge {

int node_local_rank() {
  for (const char* name :
       {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "LOCAL_RANK"}) {
    if (const char* value = std::getenv(name)) return std::atoi(value);
  }
  return 0;
}

c10::Device resolve_device(const Config& config) {
  if (config.train.device == "cpu") return c10::Device(c10::kCPU);
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

parallel::Backend resolve_backend(const Config& config, const c10::Device& device) {
  const auto& name = config.parallel.backend;
  if (name == "nccl" || (name == "auto" && device.is_cuda())) return parallel::Backend::kNccl;
  return parallel::Backend::kMpi;
}

}  // namespace moeforge

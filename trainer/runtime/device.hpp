#pragma once
// Where a rank computes (train.device) and which backend carries its collectives
// (parallel.backend), resolved once at start-up.
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <string>

#include "parallel/process_groups.hpp"
#include "trainer/config/config.hpp"

namespace moeforge {

// This rank's index among the ranks of its node, from the launcher's environment (OpenMPI,
// MPICH/Hydra, SLURM, torchrun spellings); 0 when none is set (a single process).
int node_local_rank();

// cpu, or cuda:<node-local rank mod visible GPUs>. Throws UserError naming the key when CUDA is
// asked for and this build or machine has none.
c10::Device resolve_device(const Config& config);

// Peak memory this process has used on `device` since start: the CUDA caching allocator's peak
// of allocated bytes, or the peak resident set size for the CPU.
int64_t peak_memory_bytes(const c10::Device& device);

// TFLOP/s of an [m, k]·[k, n] matmul of `dtype` on `device`: random operands, one warm-up,
// then repeated (synchronised) for at least `min_seconds`. The peak MFU divides by when
// logging.peak_tflops is 0.
double measure_matmul_tflops(const c10::Device& device, at::ScalarType dtype, int64_t m, int64_t k,
                             int64_t n, double min_seconds = 0.2);

// How many threads at::parallel_for spreads over in the project's own kernels (RMSNorm, RoPE,
// the gathered experts): the intra-op thread count when they were compiled with OpenMP, 1 when
// not (at::parallel_for is inline, and without OpenMP it runs on the calling thread).
int parallel_for_threads();

// The groups a run communicates over: `groups` (plain MPI or one-process groups) on the
// resolved backend, with the communication worker (MPI only: NCCL is asynchronous through its
// own stream) and the simulated link the config asks for. Collective when the backend is NCCL.
parallel::ProcessGroups communication_groups(const Config& config,
                                             const parallel::ProcessGroups& groups,
                                             const c10::Device& device);

// parallel.backend with `auto` resolved: nccl for CUDA devices, mpi otherwise.
parallel::Backend resolve_backend(const Config& config, const c10::Device& device);

}  // namespace moeforge

#pragma once
// Keeps glibc malloc from returning large freed blocks to the kernel between uses.
//
// By default glibc serves blocks ≥ 32 MiB (its largest dynamic mmap threshold) with fresh mmap()
// and unmaps them on free, so every MoE step's all-to-all buffers and activations of that size
// are page-faulted in again (~1.5 GB/s instead of memory speed: the dispatch+combine benchmark
// ran 3.5× slower than a raw MPI_Alltoallv on reused buffers). Serving everything from the
// heap and trimming it only above 1 GiB of free top space makes freed memory reusable at once,
// like the caching allocators of GPU frameworks. Cost: RSS stays at its high-water mark.
//
// That high-water mark must be the process's, not one per thread: glibc gives every thread that
// allocates its own arena, and a thread arena is trimmed by the same 1 GiB rule, i.e. never. The
// communication worker (parallel/comm_worker.hpp) allocates every all-to-all output and MPI's
// non-blocking temporaries, so its arena kept their peak resident (~25 MiB at ep_size 1, ~75 MiB
// at ep_size 2 on configs/tiny.yaml, micro-batch 32) beside the main heap's, which could not
// reuse it: expert parallelism, which moves the most rows through the worker, held more per rank
// than data parallelism. One arena for all threads makes freed memory reusable by any thread;
// tcache still serves small blocks without the lock, and tensor-sized allocations are few.
// Call first thing in main(), before any large allocation. MOEFORGE_MALLOC_TUNING=0 opts out.
#include <malloc.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace moeforge {

inline constexpr int kTrimThreshold = 1 << 30;  // give memory back beyond 1 GiB of free top
inline constexpr int kTopPad = 64 << 20;        // grow the heap in 64 MiB steps (fewer brk calls)

inline void tune_host_allocator() {
  const char* setting = std::getenv("MOEFORGE_MALLOC_TUNING");
  if (setting != nullptr && std::strcmp(setting, "0") == 0) return;
  mallopt(M_MMAP_MAX, 0);  // no mmap-backed blocks: all from the reusable heap
  mallopt(M_TRIM_THRESHOLD, kTrimThreshold);
  mallopt(M_TOP_PAD, kTopPad);
  mallopt(M_ARENA_MAX, 1);  // one heap for every thread (before any thread starts)
}

// The same settings for another process (a Python reference a benchmark compares against), as
// glibc reads them from the environment variable GLIBC_TUNABLES.
inline std::string host_allocator_glibc_tunables() {
  return "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=" + std::to_string(kTrimThreshold) +
         ":glibc.malloc.top_pad=" + std::to_string(kTopPad) + ":glibc.malloc.arena_max=1";
}

// oneDNN (LibTorch's CPU kernels for bf16 matmuls, and ours for fp32: moe/cpu_gemm.hpp) caches
// a compiled primitive, with its own scratch memory (~0.3-1.5 MiB, growing with the rows), for
// every distinct shape, up to 1024 of them by default, and LibTorch's ideep wrapper keeps its own
// 1024-entry cache of the same primitives: one is freed only when both have dropped it. MoE
// experts see new row counts every step, so under train.precision: bf16 the caches grew resident
// memory by ~100 MiB per step on configs/small.yaml for its first ~20 steps. 64 entries in both
// bound it at no measurable speed cost (docs/benchmarks.md). A user's
// ONEDNN_PRIMITIVE_CACHE_CAPACITY / LRU_CACHE_CAPACITY wins. Call before the first matmul.
inline void bound_onednn_primitive_cache() {
  setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64", /*overwrite=*/0);
  setenv("LRU_CACHE_CAPACITY", "64", /*overwrite=*/0);
}

}  // namespace moeforge

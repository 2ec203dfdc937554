#pragma once
// Shared helpers for the LibTorch tests: a very small config that trains in seconds, relative
// error, and a per-job scratch directory agreed across ranks.
#include <ATen/ATen.h>
#include <mpi.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "trainer/config/config.hpp"

namespace moeforge::testing {

inline double relative_error(const at::Tensor& actual, const at::Tensor& expected) {
  const auto a = actual.to(at::kDouble), e = expected.to(at::kDouble);
  return (a - e).norm().item<double>() / std::max(e.norm().item<double>(), 1e-30);
}

inline double relative_difference(double a, double b) {
  return std::abs(a - b) / std::max(std::abs(b), 1e-30);
}

// A model small enough for 20 steps × several layouts on oversubscribed ranks.
inline Config small_test_config() {
  Config c;
  c.model.vocab_size = 256;
  c.model.hidden_size = 32;
  c.model.num_layers = 2;
  c.model.num_heads = 4;
  c.model.num_kv_heads = 2;
  c.model.ffn_size = 64;
  c.model.max_seq_len = 32;
  c.moe.num_experts = 8;
  c.moe.top_k = 2;
  c.moe.expert_ffn_size = 16;
  c.moe.num_shared_experts = 1;
  c.moe.balancing.aux_loss.coeff = 0.01;
  c.moe.balancing.z_loss.coeff = 0.001;
  c.train.steps = 20;
  c.train.seq_len = 16;
  c.train.micro_batch_size = 2;
  c.train.grad_accum = 1;
  c.train.lr = 3e-3;
  c.train.min_lr = 3e-4;
  c.train.warmup_steps = 2;
  c.train.eval_every = 0;
  c.train.eval_batches = 1;
  c.checkpoint.every = 0;
  c.data.builtin_bytes = 200000;
  return c;
}

// A Megatron indexed dataset (uint16, one sequence per document) at `prefix` (.bin/.idx), in
// the layout of megatron/core/datasets/indexed_dataset.py.
inline void write_indexed_dataset(const std::string& prefix,
                                  const std::vector<std::vector<uint16_t>>& documents) {
  std::string bin, idx("MMIDIDX\0\0", 9);
  std::vector<int32_t> lengths;
  std::vector<int64_t> pointers, document_index = {0};
  for (const auto& doc : documents) {
    pointers.push_back(static_cast<int64_t>(bin.size()));
    lengths.push_back(static_cast<int32_t>(doc.size()));
    bin.append(reinterpret_cast<const char*>(doc.data()), doc.size() * 2);
    document_index.push_back(static_cast<int64_t>(lengths.size()));
  }
  const auto put = [&idx](const void* p, size_t n) { idx.append(static_cast<const char*>(p), n); };
  const uint64_t version = 1, sequences = lengths.size(), count = document_index.size();
  const uint8_t dtype = 8;
  put(&version, 8);
  put(&dtype, 1);
  put(&sequences, 8);
  put(&count, 8);
  put(lengths.data(), lengths.size() * 4);
  put(pointers.data(), pointers.size() * 8);
  put(document_index.data(), document_index.size() * 8);
  std::ofstream(prefix + ".idx", std::ios::binary) << idx;
  std::ofstream(prefix + ".bin", std::ios::binary) << bin;
}

// This process's rank and the number of ranks in MPI_COMM_WORLD.
inline int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

inline int world_size() {
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

// A fresh directory with the same path on every rank of MPI_COMM_WORLD.
inline std::string shared_scratch_dir(const std::string& tag) {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  long long id = static_cast<long long>(getpid());
  MPI_Bcast(&id, 1, MPI_LONG_LONG, 0, MPI_COMM_WORLD);
  const auto dir =
      std::filesystem::temp_directory_path() / ("moeforge-test-" + tag + "-" + std::to_string(id));
  if (rank == 0) {
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  return dir.string();
}

}  // namespace moeforge::testing

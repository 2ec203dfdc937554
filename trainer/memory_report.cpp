#include "trainer/memory_report.hpp"

#include <ATen/core/Tensor.h>
#include <fmt/format.h>

#include <algorithm>

#include "trainer/model/model.hpp"

namespace moeforge {
namespace {

int64_t bytes_of(const at::Tensor& tensor) {
  return tensor.numel() * tensor.element_size();
}

std::string mib(int64_t bytes) {
  return fmt::format("{:.1f} MiB", static_cast<double>(bytes) / (1 << 20));
}

// CPU fp32 runs the experts' and the feed-forward blocks' own kernels (moe/gathered_experts.hpp).
bool cpu_fp32(const Config& config) {
  return config.train.device == DeviceKind::kCpu && config.train.precision == Precision::kFp32;
}

// A FeedForward of width `ffn` on one token (normed input counted by the caller): the two [·, F]
// GEMM outputs in CPU fp32, the composite formula's four [·, F] tensors (silu's input and
// output, up, their product) otherwise.
int64_t swiglu_bytes(const Config& config, int64_t ffn, int64_t b) {
  return b * (cpu_fp32(config) ? 2 : 4) * ffn;
}

// What the routed experts keep per token. CPU fp32 runs the gathered experts at ep 1 and the
// gated-rows experts at ep > 1 (moe/gathered_experts.hpp): the two [·, F] GEMM outputs per
// routed row and, at ep > 1, the received rows: one per routed row, or with the deduplicated
// dispatch one per (token, destination), at most min(k, ep). Otherwise (bf16, CUDA, padded
// capacity) the grouped-GEMM pipeline, per routed row: the dispatched row, SwiGLU's four
// [·, F] tensors (two with moe_act: gate|up), and the fp32 combined row the gates' gradient
// reads.
int64_t routed_bytes_per_token(const Config& config, int64_t b) {
  const auto& moe = config.moe;
  const int64_t hidden = config.model.hidden_size, ffn = moe.expert_ffn_size;
  const int64_t k = moe.top_k, ep = config.parallel.ep_size;
  if (cpu_fp32(config) && !moe.capacity.pad) {
    const bool dedup = config.parallel.dedup_dispatch != moe::DispatchDedup::kNone;
    const int64_t received = ep == 1 ? 0 : dedup ? std::min(k, ep) : k;
    return k * b * 2 * ffn + received * b * hidden;
  }
  const int64_t swiglu = config.train.recompute.moe_act ? b * 2 * ffn : b * 4 * ffn;
  return k * (b * hidden + swiglu + 4 * hidden);
}

// One block's activations per token, with the recompute options that act inside a block.
int64_t block_bytes(const Config& config, int64_t block, int64_t b) {
  const auto& m = config.model;
  const auto& moe = config.moe;
  const auto& recompute = config.train.recompute;
  const int64_t hidden = m.hidden_size, head_dim = head_dim_of(m);
  const int64_t q = m.num_heads * head_dim, kv = m.num_kv_heads * head_dim;
  const int64_t pool = moe.num_experts + moe.router.num_null_experts;
  int64_t total = b * hidden + 4 * hidden + b * hidden;  // residual, norm input, normed input
  total += recompute.attention ? 0 : b * (2 * q + 2 * kv);
  if (!is_moe_block(moe, block)) return total + b * hidden + swiglu_bytes(config, m.ffn_size, b);
  total += b * hidden;  // the MoE layer's normed input
  if (recompute.moe) return total;
  total += 4 * 2 * pool + routed_bytes_per_token(config, b);
  return total + moe.num_shared_experts * swiglu_bytes(config, moe::shared_expert_size(moe), b);
}

}  // namespace

int64_t activation_bytes_per_token(const Config& config) {
  const auto& m = config.model;
  const int64_t b = config.train.precision == Precision::kBf16 ? 2 : 4;
  int64_t total = (b + 8) * m.vocab_size, largest_block = 0;
  for (int64_t block = 0; block < m.num_layers; ++block) {
    const int64_t bytes = block_bytes(config, block, b);
    largest_block = std::max(largest_block, bytes);
    // block recompute keeps each block's input; one block's activations live during backward.
    total += config.train.recompute.block ? b * m.hidden_size : bytes;
  }
  return config.train.recompute.block ? total + largest_block : total;
}

MemoryReport memory_report(const Config& config, const AdamW& optimizer) {
  MemoryReport report;
  for (const auto& slot : optimizer.slots()) {
    report.parameters += bytes_of(slot.param);
    const bool sixteen_bit = slot.param.element_size() == 2;
    report.gradients += sixteen_bit ? slot.param.numel() * 4 : bytes_of(slot.param);
    report.optimizer += bytes_of(slot.exp_avg) + bytes_of(slot.exp_avg_sq) +
                        (slot.master.is_same(slot.param) ? 0 : bytes_of(slot.master));
  }
  const int64_t tokens = config.train.micro_batch_size * config.train.seq_len;
  report.activations_per_micro_batch = tokens * activation_bytes_per_token(config);
  return report;
}

std::string describe(const MemoryReport& report) {
  return fmt::format(
      "memory per rank: parameters {} | gradients {} | optimizer state {} | activations ~{} "
      "per micro-batch (estimate) | total ~{}",
      mib(report.parameters), mib(report.gradients), mib(report.optimizer),
      mib(report.activations_per_micro_batch),
      mib(report.parameters + report.gradients + report.optimizer +
          report.activations_per_micro_batch));
}

}  // namespace moeforge

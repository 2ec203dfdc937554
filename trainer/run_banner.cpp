#include "trainer/run_banner.hpp"

#include <fmt/format.h>

#include "trainer/memory_report.hpp"
#include "trainer/model/flops.hpp"
#include "trainer/runtime/device.hpp"

namespace moeforge {
namespace {

std::string count(double n) {  // 1234567 -> "1.23 M"
  if (n >= 1e9) return fmt::format("{:.2f} B", n / 1e9);
  if (n >= 1e6) return fmt::format("{:.2f} M", n / 1e6);
  if (n >= 1e3) return fmt::format("{:.1f} k", n / 1e3);
  return fmt::format("{:.0f}", n);
}

std::string model_line(const Config& config) {
  const auto& moe = config.moe;
  const auto flops = count_flops(config, config.train.seq_len);
  int64_t moe_blocks = 0;
  for (int64_t b = 0; b < config.model.num_layers; ++b) moe_blocks += is_moe_block(moe, b);
  const std::string layout =
      moe_blocks == 0 ? "dense"
                      : fmt::format("{} of {} blocks MoE: top-{} of {} routed experts{}",
                                    moe_blocks, config.model.num_layers, moe.top_k, moe.num_experts,
                                    moe.num_shared_experts > 0
                                        ? fmt::format(" + {} shared", moe.num_shared_experts)
                                        : "");
  return fmt::format(
      "model: {} parameters, {} active per token (the matrices one token goes through: "
      "attention, its {} routed experts, shared experts, dense FFNs, LM head) | {}",
      count(static_cast<double>(flops.total_params)),
      count(static_cast<double>(flops.active_params)), moe_blocks > 0 ? moe.top_k : 0, layout);
}

std::string data_line(const Config& config, const TokenDataset& data, const RunShape& shape) {
  const auto& t = config.train;
  const int64_t samples_per_step = shape.world_size * t.grad_accum * t.micro_batch_size;
  const double steps = static_cast<double>(shape.end_step - shape.start_step);
  const double epochs = steps * static_cast<double>(samples_per_step) /
                        static_cast<double>(std::max<int64_t>(1, data.train_windows()));
  const std::string source =
      config.data.path.empty()
          ? enum_text(config.data.source)
          : fmt::format("{} {}", enum_text(config.data.source), config.data.path);
  return fmt::format(
      "data: {}: {} training tokens ({} sequences of {}), {} validation tokens; this run reads "
      "{} tokens = {:.2f} epochs{}",
      source, count(static_cast<double>(data.train_tokens())), count(data.train_windows()),
      t.seq_len, count(static_cast<double>(data.val_tokens())),
      count(steps * static_cast<double>(samples_per_step * t.seq_len)), epochs,
      epochs > 1.0 ? " (the data repeats: watch validation loss for overfitting)" : "");
}

}  // namespace

std::string run_banner(const Config& config, const TokenDataset& data, const AdamW& optimizer,
                       const RunShape& shape) {
  const auto& t = config.train;
  const int64_t tokens_per_step = shape.world_size * t.grad_accum * t.micro_batch_size * t.seq_len;
  std::string banner = fmt::format(
      "moeforge train: {} rank{} (ep_size {}), steps {}–{} of {}, {} tokens/step "
      "({} rank{} × {} micro-batch{} × {} sequences × {} tokens), out_dir {}\n",
      shape.world_size, shape.world_size > 1 ? "s" : "", shape.ep_size, shape.start_step + 1,
      shape.end_step, t.steps, tokens_per_step, shape.world_size, shape.world_size > 1 ? "s" : "",
      t.grad_accum, t.grad_accum > 1 ? "es" : "", t.micro_batch_size, t.seq_len, t.out_dir);
  banner += model_line(config) + "\n" + data_line(config, data, shape) + "\n";
  const int threads = parallel_for_threads();
  banner += fmt::format(
      "precision {}{}{} | {} intra-op thread{} per rank | {}", enum_text(t.precision),
      config.parallel.distributed_optimizer ? ", distributed optimizer (ZeRO-1)" : "",
      config.parallel.grad_reduce_dtype == Precision::kBf16 ? ", bf16 gradient reduction" : "",
      threads, threads > 1 ? "s" : "", describe(memory_report(config, optimizer)));
  for (const auto& note : config.notes) banner += "\nnote: " + note;
  return banner;
}

}  // namespace moeforge

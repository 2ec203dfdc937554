#include "trainer/inference/evaluation.hpp"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "moe/load_balancing.hpp"

namespace moeforge {
namespace {

// Running sums over rounds, reduced over the world at the end.
struct Sums {
  at::Tensor loss_and_tokens = at::zeros({2}, at::kDouble);  // Σ loss, Σ counted tokens
  std::vector<at::Tensor> load;                              // per MoE layer [P] int64
  std::vector<at::Tensor> routing;  // per MoE layer [selected, null, kept rows, entropy, rounds]
};

void add_routing(const std::vector<moe::RoutingCounters>& counters, Sums& sums) {
  if (sums.load.empty())
    for (const auto& layer : counters) {
      sums.load.push_back(at::zeros_like(layer.load, at::kLong).cpu());
      sums.routing.push_back(at::zeros({5}, at::kDouble));
    }
  for (size_t i = 0; i < counters.size(); ++i) {
    sums.load[i] += counters[i].load.cpu();
    const auto slots = counters[i].slot_counts.cpu().to(at::kDouble);
    sums.routing[i] += at::cat({slots, counters[i].entropy.cpu().to(at::kDouble).reshape({1}),
                                at::ones({1}, at::kDouble)});
  }
}

int64_t split_windows(const TokenDataset& data, EvalSplit split) {
  return split == EvalSplit::kValidation ? data.val_windows() : data.train_windows();
}

// One split: rounds of micro-batches until every window (or max_windows) is counted.
void evaluate_split(DecoderLMImpl& model, const Config& config, const TokenDataset& data,
                    EvalSplit split, const EvalOptions& options, parallel::Communicator& world,
                    const c10::Device& device, Sums& sums, int64_t& windows) {
  const int64_t available = split_windows(data, split);
  const int64_t count =
      options.max_windows > 0 ? std::min(options.max_windows, available) : available;
  const int64_t mbs = options.micro_batch_size, per_round = mbs * world.size();
  for (int64_t first_of_round = 0; first_of_round < count; first_of_round += per_round) {
    const int64_t first = first_of_round + world.rank() * mbs;
    const auto samples = split == EvalSplit::kValidation
                             ? data.val_samples(first, mbs)
                             : data.train_samples(first, mbs, config.train.seed);
    const auto batch = samples.to(device);
    const auto out = model.forward(batch.narrow(1, 0, options.seq_len));
    const auto targets = next_token_targets(batch, options.seq_len, config.data);
    const int64_t vocab = out.logits.size(-1);
    const auto losses = at::cross_entropy_loss(out.logits.reshape({-1, vocab}).to(at::kFloat),
                                               targets.reshape({-1}), {}, at::Reduction::None)
                            .view_as(targets);
    // Windows past `count` only fill the round up: they count for nothing.
    const auto in_range = (at::arange(first, first + mbs, targets.options()) < count).unsqueeze(1);
    const auto counted = ((targets != -100) & in_range).to(at::kDouble);
    sums.loss_and_tokens +=
        at::stack({(losses.to(at::kDouble) * counted).sum(), counted.sum()}).cpu();
    add_routing(out.routing, sums);
  }
  windows += count;
}

std::vector<LayerRouting> layer_routing(const Config& config, Sums& sums,
                                        parallel::Communicator& world) {
  std::vector<int64_t> blocks;
  for (int64_t b = 0; b < config.model.num_layers; ++b)
    if (is_moe_block(config.moe, b)) blocks.push_back(b);
  std::vector<LayerRouting> layers;
  for (size_t i = 0; i < sums.load.size(); ++i) {
    world.all_reduce(sums.load[i]);
    world.all_reduce(sums.routing[i]);
    const auto load = sums.load[i].narrow(0, 0, config.moe.num_experts);  // not null experts
    const auto* r = sums.routing[i].data_ptr<double>();  // selected, null, rows, entropy, n
    const double real_slots = r[0] - r[1];
    LayerRouting layer;
    layer.block = blocks[i];
    layer.load.assign(load.data_ptr<int64_t>(), load.data_ptr<int64_t>() + load.numel());
    layer.max_vio = moe::max_violation(load);
    layer.router_entropy = r[4] > 0 ? r[3] / r[4] : 0.0;
    layer.dropped_frac = real_slots > 0 ? (real_slots - r[2]) / real_slots : 0.0;
    layers.push_back(std::move(layer));
  }
  return layers;
}

}  // namespace

EvalResult evaluate_model(DecoderLMImpl& model, const Config& config, const TokenDataset& data,
                          const EvalOptions& options, parallel::Communicator& world,
                          const c10::Device& device) {
  at::NoGradGuard no_grad;
  model.eval();
  Sums sums;
  EvalResult result;
  for (const auto split : {EvalSplit::kValidation, EvalSplit::kTrain})
    if (options.split == split || options.split == EvalSplit::kAll)
      evaluate_split(model, config, data, split, options, world, device, sums, result.windows);
  world.all_reduce(sums.loss_and_tokens);
  const double loss_sum = sums.loss_and_tokens[0].item<double>();
  result.tokens = static_cast<int64_t>(sums.loss_and_tokens[1].item<double>());
  result.loss = result.tokens > 0 ? loss_sum / static_cast<double>(result.tokens) : 0.0;
  result.perplexity = std::exp(result.loss);
  result.layers = layer_routing(config, sums, world);
  return result;
}

}  // namespace moeforge

#include "trainer/inference/generation.hpp"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>

#include "trainer/common/user_error.hpp"

namespace moeforge {
namespace {

// Probabilities of the tokens allowed by top-k / top-p, zero elsewhere (float64, host).
at::Tensor filtered_probabilities(const at::Tensor& logits, const SamplingOptions& options) {
  auto scaled = logits.to(at::kDouble).cpu() / options.temperature;
  const int64_t vocab = scaled.size(0);
  if (options.top_k > 0 && options.top_k < vocab) {
    const auto kth = std::get<0>(scaled.topk(options.top_k)).min();
    scaled = scaled.masked_fill(scaled < kth, -INFINITY);
  }
  auto probs = scaled.softmax(0);
  if (options.top_p < 1.0) {
    const auto [sorted, order] = probs.sort(0, /*descending=*/true);
    // Keep a token when the mass before it is below top_p: the smallest such set, and never
    // fewer than one token.
    const auto mass_before = sorted.cumsum(0) - sorted;
    const auto keep_sorted = mass_before < options.top_p;
    const auto keep = at::zeros_like(keep_sorted).scatter(0, order, keep_sorted);
    probs = probs * keep.to(at::kDouble);
  }
  return probs / probs.sum();
}

}  // namespace

int64_t choose_token(const at::Tensor& logits, const SamplingOptions& options,
                     at::Generator& generator) {
  if (options.temperature <= 0.0) return logits.argmax().item<int64_t>();
  return at::multinomial(filtered_probabilities(logits, options), 1, false, generator)
      .item<int64_t>();
}

std::vector<int64_t> generate(DecoderLMImpl& model, const std::vector<int64_t>& prompt,
                              const SamplingOptions& options, int64_t max_seq_len,
                              const std::function<void(int64_t)>& on_token) {
  require(!prompt.empty(), "generate: the prompt is empty (give at least one token of text)");
  const int64_t total = static_cast<int64_t>(prompt.size()) + options.max_new_tokens;
  require(total <= max_seq_len,
          fmt::format("generate: {} prompt tokens + {} new tokens exceed the model's context "
                      "(model.max_seq_len = {}); shorten the prompt or lower --max-tokens",
                      prompt.size(), options.max_new_tokens, max_seq_len));
  at::NoGradGuard no_grad;
  const auto device = model.embed->weight.device();
  auto generator = at::detail::createCPUGenerator(options.seed);
  std::vector<int64_t> sequence = prompt, produced;
  KvCache cache;
  for (int64_t i = 0; i < options.max_new_tokens; ++i) {
    // With the cache, only the positions it has not seen yet go through the model.
    const int64_t first = options.use_cache ? cache.positions() : 0;
    const auto input =
        at::tensor(std::vector<int64_t>(sequence.begin() + first, sequence.end()), at::kLong)
            .to(device)
            .unsqueeze(0);
    const auto logits = model.forward(input, {}, options.use_cache ? &cache : nullptr).logits;
    const int64_t next = choose_token(logits[0][-1], options, generator);
    sequence.push_back(next);
    produced.push_back(next);
    if (on_token) on_token(next);
    if (options.stop_token && next == *options.stop_token) break;
  }
  return produced;
}

}  // namespace moeforge

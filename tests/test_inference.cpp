// Using a trained model: generation (greedy = chained argmax of full forwards; the KV cache
// changes nothing but speed; sampling options) and evaluation (= the trainer's validation loss).
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include "parallel/process_groups.hpp"
#include "test_support.hpp"
#include "trainer/common/user_error.hpp"
#include "trainer/inference/evaluation.hpp"
#include "trainer/inference/generation.hpp"
#include "trainer/inference/text_codec.hpp"
#include "trainer/model/model.hpp"
#include "training_support.hpp"

namespace moeforge::testing {
namespace {

// A randomly initialised single-process model of small_test_config().
struct SmallModel {
  Config config = small_test_config();
  parallel::ProcessGroups groups = parallel::make_single_process_groups();
  DecoderLM model{nullptr};
  SmallModel() {
    config.model.max_seq_len = 64;
    model = DecoderLM(config, *groups.ep);
    initialize_parameters(*model, config, 7);
    model->eval();
  }
};

std::vector<int64_t> random_prompt(int64_t length, int64_t vocab, uint64_t seed) {
  auto generator = at::detail::createCPUGenerator(seed);
  const auto ids = at::randint(vocab, {length}, generator, at::kLong);
  return {ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + length};
}

TEST(Generate, GreedyEqualsChainedArgmaxOfFullForwards) {
  SmallModel m;
  const auto prompt = random_prompt(5, 256, 11);
  SamplingOptions options;
  options.max_new_tokens = 20;
  const auto produced = generate(*m.model, prompt, options, m.config.model.max_seq_len);
  ASSERT_EQ(produced.size(), 20u);
  // Reference: the whole sequence through the plain forward each time, argmax of the last.
  at::NoGradGuard no_grad;
  std::vector<int64_t> sequence = prompt;
  for (const auto id : produced) {
    const auto logits = m.model->forward(at::tensor(sequence, at::kLong).unsqueeze(0)).logits;
    EXPECT_EQ(logits[0][-1].argmax().item<int64_t>(), id) << "after " << sequence.size();
    sequence.push_back(logits[0][-1].argmax().item<int64_t>());
  }
}

TEST(Generate, KvCacheLogitsEqualFullForward) {
  SmallModel m;
  at::NoGradGuard no_grad;
  const auto ids = random_prompt(24, 256, 12);
  const auto full = m.model->forward(at::tensor(ids, at::kLong).unsqueeze(0)).logits[0];
  // Feed the same tokens in uneven chunks through the cache (prefill 7, then 1, 4, 1 ...).
  KvCache cache;
  std::vector<at::Tensor> pieces;
  for (size_t start = 0, chunk = 7; start < ids.size();
       start += chunk, chunk = chunk == 1 ? 4 : 1) {
    const size_t end = std::min(ids.size(), start + chunk);
    const std::vector<int64_t> part(ids.begin() + start, ids.begin() + end);
    pieces.push_back(
        m.model->forward(at::tensor(part, at::kLong).unsqueeze(0), {}, &cache).logits[0]);
  }
  EXPECT_EQ(cache.positions(), 24);
  EXPECT_LT(relative_error(at::cat(pieces), full), 1e-5);
}

TEST(Generate, CachedAndUncachedGenerationAgreeWhenSampling) {
  SmallModel m;
  const auto prompt = random_prompt(3, 256, 13);
  SamplingOptions options;
  options.max_new_tokens = 15;
  options.temperature = 1.0;
  options.top_k = 20;
  options.top_p = 0.9;
  const auto cached = generate(*m.model, prompt, options, 64);
  options.use_cache = false;
  EXPECT_EQ(generate(*m.model, prompt, options, 64), cached);
  options.seed += 1;
  EXPECT_NE(generate(*m.model, prompt, options, 64), cached) << "the seed must matter";
}

TEST(Generate, TopKOneAndTinyTopPAreGreedy) {
  SmallModel m;
  const auto prompt = random_prompt(4, 256, 14);
  SamplingOptions greedy;
  greedy.max_new_tokens = 10;
  const auto expected = generate(*m.model, prompt, greedy, 64);
  SamplingOptions top_k = greedy;
  top_k.temperature = 2.0;
  top_k.top_k = 1;
  EXPECT_EQ(generate(*m.model, prompt, top_k, 64), expected);
  SamplingOptions top_p = greedy;
  top_p.temperature = 2.0;
  top_p.top_p = 1e-9;  // only the likeliest token holds the mass before it below this
  EXPECT_EQ(generate(*m.model, prompt, top_p, 64), expected);
}

TEST(Generate, SamplingFollowsTheDistribution) {
  // logits log(0.5), log(0.3), log(0.2): 20 000 draws at temperature 1 within 1.5% of each.
  const auto logits = at::log(at::tensor({0.5, 0.3, 0.2}, at::kDouble));
  SamplingOptions options;
  options.temperature = 1.0;
  auto generator = at::detail::createCPUGenerator(3);
  std::array<int, 3> counts{};
  for (int i = 0; i < 20000; ++i) ++counts[choose_token(logits, options, generator)];
  EXPECT_NEAR(counts[0] / 20000.0, 0.5, 0.015);
  EXPECT_NEAR(counts[1] / 20000.0, 0.3, 0.015);
  // top-p 0.7 keeps {0.5, 0.3} (mass before 0.3 is 0.5 < 0.7; before 0.2 it is 0.8): renormalised.
  options.top_p = 0.7;
  counts = {};
  for (int i = 0; i < 20000; ++i) ++counts[choose_token(logits, options, generator)];
  EXPECT_EQ(counts[2], 0);
  EXPECT_NEAR(counts[0] / 20000.0, 0.625, 0.015);
}

TEST(Generate, ContextLimitIsAClearError) {
  SmallModel m;
  SamplingOptions options;
  options.max_new_tokens = 70;
  try {
    generate(*m.model, {1, 2, 3}, options, 64);
    FAIL() << "expected an error";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("model.max_seq_len = 64"), std::string::npos) << e.what();
  }
}

TEST(TextCodec, BytesRoundTripIncludingUtf8) {
  const auto codec = make_text_codec("/nonexistent-model", "", 256);
  const std::string text = "Grüße, 世界";
  const auto ids = codec->encode(text);
  EXPECT_EQ(ids.size(), text.size());
  for (const auto id : ids) EXPECT_TRUE(id >= 0 && id < 256);
  EXPECT_EQ(codec->decode(ids), text);
  EXPECT_THROW(make_text_codec("/nonexistent-model", "", 100), UserError);
}

TEST(Eval, MatchesTheTrainersValidationLoss) {
  auto config = small_test_config();
  config.train.steps = 6;
  config.train.eval_batches = 3;
  const auto groups = parallel::make_single_process_groups();
  Trainer trainer(config, groups,
                  TokenDataset::open(config.data, config.model.vocab_size, config.train.seq_len),
                  quiet_run());
  trainer.run();
  const double trainer_loss = trainer.evaluate();
  const auto data = TokenDataset::open(config.data, config.model.vocab_size, config.train.seq_len);
  EvalOptions options;
  options.micro_batch_size = config.train.micro_batch_size;
  options.seq_len = config.train.seq_len;
  options.max_windows = config.train.eval_batches * config.train.micro_batch_size;
  const auto result =
      evaluate_model(trainer.model(), config, data, options, *groups.world, trainer.device());
  EXPECT_LT(relative_difference(result.loss, trainer_loss), 1e-6);
  EXPECT_EQ(result.windows, options.max_windows);
  EXPECT_EQ(result.tokens, options.max_windows * config.train.seq_len);
  EXPECT_NEAR(result.perplexity, std::exp(result.loss), 1e-9);
  ASSERT_EQ(result.layers.size(), 2u);
  int64_t slots = 0;
  for (const auto load : result.layers[0].load) slots += load;
  EXPECT_EQ(slots, result.tokens * config.moe.top_k) << "every token routed to k experts";
}

TEST(Eval, AnyWindowCountAndMicroBatchGiveTheSameTokenMean) {
  // 7 windows in micro-batches of 3 (the last round padded) vs one window at a time.
  auto config = small_test_config();
  const auto groups = parallel::make_single_process_groups();
  DecoderLM model(config, *groups.ep);
  initialize_parameters(*model, config, 5);
  const auto data = TokenDataset::open(config.data, config.model.vocab_size, config.train.seq_len);
  EvalOptions options;
  options.seq_len = config.train.seq_len;
  options.max_windows = 7;
  options.micro_batch_size = 3;
  const auto padded = evaluate_model(*model, config, data, options, *groups.world, at::kCPU);
  options.micro_batch_size = 1;
  const auto single = evaluate_model(*model, config, data, options, *groups.world, at::kCPU);
  EXPECT_EQ(padded.tokens, 7 * config.train.seq_len);
  EXPECT_LT(relative_difference(padded.loss, single.loss), 1e-6);
}

}  // namespace
}  // namespace moeforge::testing

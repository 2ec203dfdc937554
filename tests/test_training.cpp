// Single-process training behaviour: determinism, exact resume, checkpoint integrity and
// layout, and that a small model learns the built-in corpus.
#include <gtest/gtest.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <filesystem>
#include <fstream>

#include "parallel/process_groups.hpp"
#include "parallel/recompute.hpp"
#include "recompute_check.hpp"
#include "test_support.hpp"
#include "trainer/checkpoint/checkpoint.hpp"
#include "trainer/checkpoint/safetensors.hpp"
#include "trainer/common/user_error.hpp"
#include "trainer/data/data.hpp"
#include "trainer/trainer.hpp"
#include "training_support.hpp"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

using testing::train_single;

TEST(Training, SameSeedSameLosses) {
  auto config = testing::small_test_config();
  config.train.steps = 6;
  const auto a = train_single(config, testing::quiet_run());
  const auto b = train_single(config, testing::quiet_run());
  ASSERT_EQ(a.steps.size(), 6u);
  for (size_t i = 0; i < a.steps.size(); ++i) EXPECT_EQ(a.steps[i].loss, b.steps[i].loss);
  config.train.seed = 99;
  const auto c = train_single(config, testing::quiet_run());
  EXPECT_NE(a.steps[0].loss, c.steps[0].loss);
}

TEST(Training, TwentyStraightStepsEqualTenResumeTen) {
  auto config = testing::small_test_config();
  config.moe.balancing.expert_bias.rate = 0.001;  // the bias must survive the checkpoint too
  config.train.grad_accum = 2;
  config.train.out_dir = testing::shared_scratch_dir("resume");
  const auto straight = train_single(config, testing::quiet_run());
  testing::train_to_checkpoint(config, 10);
  const auto resumed = testing::resume_latest(config);
  ASSERT_EQ(resumed.steps.size(), 10u);
  for (size_t i = 0; i < 10; ++i) {
    EXPECT_EQ(resumed.steps[i].step, straight.steps[10 + i].step);
    EXPECT_EQ(resumed.steps[i].loss, straight.steps[10 + i].loss) << "step " << i + 11;
    EXPECT_EQ(resumed.steps[i].grad_norm, straight.steps[10 + i].grad_norm);
    // The bias itself came back from the checkpoint (a lost bias restarts near 0).
    for (size_t l = 0; l < resumed.steps[i].layers.size(); ++l)
      EXPECT_EQ(resumed.steps[i].layers[l].bias_abs_max,
                straight.steps[10 + i].layers[l].bias_abs_max);
  }
  EXPECT_GT(straight.steps[10].layers[0].bias_abs_max, 0.005);
  // The run directory holds what users script against.
  const fs::path out(config.train.out_dir);
  EXPECT_TRUE(fs::exists(out / "config.resolved.yaml"));
  EXPECT_TRUE(fs::exists(out / "metrics.jsonl"));
  EXPECT_TRUE(fs::exists(out / "checkpoints" / "latest"));
  fs::remove_all(out);
}

TEST(Checkpoint, GlobalExpertNamesAndChecksumRefusal) {
  auto config = testing::small_test_config();
  config.train.steps = 2;
  config.train.out_dir = testing::shared_scratch_dir("ckpt");
  const auto summary = train_single(config, testing::quiet_run(true));
  const fs::path dir = summary.last_checkpoint;
  ASSERT_TRUE(fs::exists(dir / "checkpoint.json"));
  EXPECT_FALSE(fs::exists(fs::path(dir.string() + ".tmp")));

  const auto experts =
      safetensors::File::open((dir / "experts-00000-of-00001.safetensors").string());
  for (int e = 0; e < 8; ++e) {
    EXPECT_TRUE(experts.contains("layers.1.mlp.experts." + std::to_string(e) + ".w_gate"));
    EXPECT_TRUE(experts.contains("exp_avg.layers.0.mlp.experts." + std::to_string(e) + ".w_down"));
  }
  const auto model = safetensors::File::open((dir / "model.safetensors").string());
  EXPECT_TRUE(model.contains("layers.0.mlp.router.expert_bias"));
  EXPECT_TRUE(model.contains("embed.weight"));

  // Flip one byte in the middle of the experts file: the checkpoint is refused by name.
  const auto victim = dir / "experts-00000-of-00001.safetensors";
  {
    std::fstream f(victim, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(fs::file_size(victim) / 2));
    char byte = 0;
    f.read(&byte, 1);
    byte = static_cast<char>(byte ^ 0x5a);
    f.seekp(static_cast<std::streamoff>(fs::file_size(victim) / 2));
    f.write(&byte, 1);
  }
  auto resume = testing::quiet_run();
  resume.resume = dir.string();
  try {
    train_single(config, resume);
    FAIL() << "a corrupt checkpoint was accepted";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("checksum mismatch"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("experts-00000-of-00001.safetensors"), std::string::npos);
  }
  fs::remove_all(config.train.out_dir);
}

TEST(Checkpoint, ResumeWithoutCheckpointIsAClearError) {
  auto config = testing::small_test_config();
  config.train.out_dir = testing::shared_scratch_dir("nockpt");
  auto resume = testing::quiet_run();
  resume.resume = "latest";
  try {
    train_single(config, resume);
    FAIL() << "expected an error";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("no checkpoint to resume from"), std::string::npos);
  }
  fs::remove_all(config.train.out_dir);
}

TEST(Training, SmallModelLearnsTheBuiltinCorpus) {
  auto config = testing::small_test_config();
  config.train.steps = 60;
  config.train.micro_batch_size = 8;
  config.train.seq_len = 32;
  config.train.eval_every = 0;
  config.train.eval_batches = 2;
  const auto summary = train_single(config, testing::quiet_run());
  // Starts near ln(256) = 5.55; must end well below it and below the unigram entropy.
  EXPECT_GT(summary.steps.front().loss, 5.0);
  EXPECT_LT(summary.final_train_loss, summary.unigram_entropy);
  EXPECT_LT(summary.final_val_loss, summary.steps.front().loss - 2.0);
}

// train.recompute changes memory, never results: every option (and nested combinations) gives
// bitwise the same losses, gradient norms, gradients and weights as none over 5 steps, with
// router jitter, capacity drops, a dense block and gradient accumulation (ep 1, one process).
TEST(Recompute, EveryOptionIsBitwiseTheSameAsNone) {
  const auto groups = parallel::make_single_process_groups();
  const auto config = testing::recompute_test_config();
  const auto reference = testing::trace_training(config, groups);
  for (const auto& [name, recompute] : testing::recompute_options()) {
    auto c = config;
    c.train.recompute = recompute;
    const int64_t replays_before = parallel::replayed_exchanges();
    testing::expect_same_training(testing::trace_training(c, groups), reference, name);
    if (recompute.moe || recompute.block) {
      EXPECT_GT(parallel::replayed_exchanges(), replays_before) << name << ": counts not replayed";
    }
  }
}

// Under bf16 autocast the recompute runs in the forward's precision, and every parameter still
// gets its gradient (autocast's weight cache would otherwise hand the recompute a bf16 copy
// made without a graph).
TEST(Recompute, Bf16AutocastGivesTheSameGradients) {
  const auto groups = parallel::make_single_process_groups();
  auto config = testing::recompute_test_config();
  config.train.precision = Precision::kBf16;
  config.train.steps = 2;
  const auto reference = testing::trace_training(config, groups);
  config.train.recompute = {.moe_act = true, .attention = true, .block = true};
  const auto recomputed = testing::trace_training(config, groups);
  for (const auto& [name, grad] : reference.first_gradients) {
    ASSERT_TRUE(recomputed.first_gradients.at(name).defined()) << name;
    EXPECT_LE(testing::relative_error(recomputed.first_gradients.at(name), grad), 1e-6) << name;
  }
}

// The mechanism alone: each region runs twice (forward without a graph, then in backward), a
// parameter used by two regions gets one AccumulateGrad call with both contributions (the
// gradient synchronisers count those calls), and a replayed exchange is served from the
// forward's record.
TEST(Recompute, RegionRunsAgainInBackwardAndReplaysExchanges) {
  auto runs = std::make_shared<int>(0);
  auto exchanges = std::make_shared<int>(0);
  const auto weight = at::full({3}, 2.0).requires_grad_();
  const parallel::Region region = [runs, exchanges, weight](const std::vector<at::Tensor>& in) {
    ++*runs;
    const auto local = at::full({1}, 5, at::kLong);
    const auto received = parallel::replayed_exchange(local, [&] {
      ++*exchanges;
      return local * 10;
    });
    return std::vector<at::Tensor>{(in[0] * weight).sin() * received.item<double>()};
  };
  const auto x = at::arange(3, at::kFloat).requires_grad_();
  int hook_calls = 0;  // as the gradient synchronisers count finished gradients
  const auto accumulator = torch::autograd::impl::grad_accumulator(weight);
  accumulator->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
      [&hook_calls](const torch::autograd::variable_list& outputs,
                    const torch::autograd::variable_list&) {
        ++hook_calls;
        return outputs;
      }));
  const auto y = parallel::recompute_in_backward(region, {x}, {weight})[0] +
                 parallel::recompute_in_backward(region, {x}, {weight})[0];
  EXPECT_EQ(*runs, 2);
  y.sum().backward();
  EXPECT_EQ(*runs, 4);
  EXPECT_EQ(*exchanges, 2);
  EXPECT_EQ(hook_calls, 1);
  const auto expected_x = (weight * (x * weight).cos() * 100).detach();
  const auto expected_w = (x * (x * weight).cos() * 100).detach();
  EXPECT_TRUE(at::allclose(x.grad(), expected_x));
  EXPECT_TRUE(at::allclose(weight.grad(), expected_w));
}

// A recompute whose contribution to a replayed exchange differs from the forward's (it routed
// differently) fails loudly instead of laying rows out by a stale plan.
TEST(Recompute, ReplayDetectsARegionThatRecomputedDifferently) {
  auto runs = std::make_shared<int64_t>(0);
  const parallel::Region region = [runs](const std::vector<at::Tensor>& in) {
    const auto local = at::full({1}, (*runs)++, at::kLong);  // differs in the recompute
    const auto received = parallel::replayed_exchange(local, [&] { return local; });
    return std::vector<at::Tensor>{in[0] * (received.item<double>() + 1)};
  };
  const auto x = at::ones({2}).requires_grad_();
  const auto y = parallel::recompute_in_backward(region, {x}, {})[0];
  try {
    y.sum().backward();
    FAIL() << "no error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("did not recompute identically"), std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace moeforge

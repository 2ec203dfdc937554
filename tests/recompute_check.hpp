#pragma once
// train.recompute must not change results: the same config and seed with and without recompute
// give bitwise equal fp32 loss terms, gradient norms, gradients and weights. Shared by the
// single-process suite (test_training) and the multi-rank one (test_distributed).
#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

#include "parallel/process_groups.hpp"
#include "test_support.hpp"
#include "trainer/data/data.hpp"
#include "trainer/trainer.hpp"

namespace moeforge::testing {

// What one run shows: the gradients of the first global batch (before any update), every step's
// metrics, and the weights and gradients after the last step.
struct RecomputeTrace {
  std::map<std::string, at::Tensor> first_gradients;
  std::vector<StepMetrics> steps;
  std::map<std::string, at::Tensor> final_weights, final_gradients;
  int64_t buckets_during_backward = 0;
};

inline std::map<std::string, at::Tensor> cloned(Trainer& trainer, bool gradients) {
  std::map<std::string, at::Tensor> result;
  if (gradients) {
    for (const auto& [name, grad] : trainer.gradients()) result[name] = grad.detach().clone();
    return result;
  }
  for (const auto& p : trainer.model().named_parameters())
    result[p.key()] = p.value().detach().clone();
  return result;
}

inline RecomputeTrace trace_training(const Config& config, const parallel::ProcessGroups& groups) {
  RunOptions options;
  options.print = false;
  options.write_outputs = false;
  Trainer trainer(config, groups,
                  TokenDataset::open(config.data, config.model.vocab_size, config.train.seq_len),
                  options);
  RecomputeTrace trace;
  trainer.compute_gradients(0);
  trace.buckets_during_backward = trainer.buckets_launched_during_backward();
  trace.first_gradients = cloned(trainer, true);
  trace.steps = trainer.run().steps;
  trace.final_weights = cloned(trainer, false);
  trace.final_gradients = cloned(trainer, true);
  return trace;
}

// Bit patterns, so that even -0.0 against 0.0 counts as a difference.
inline bool bitwise_equal(const at::Tensor& a, const at::Tensor& b) {
  if (a.defined() != b.defined()) return false;
  if (!a.defined()) return true;
  if (a.scalar_type() != at::kFloat || b.scalar_type() != at::kFloat) return at::equal(a, b);
  return a.sizes() == b.sizes() &&
         at::equal(a.contiguous().view(at::kInt), b.contiguous().view(at::kInt));
}

inline void expect_bitwise_equal(const std::map<std::string, at::Tensor>& actual,
                                 const std::map<std::string, at::Tensor>& expected,
                                 const std::string& what) {
  ASSERT_EQ(actual.size(), expected.size()) << what;
  for (const auto& [name, tensor] : expected)
    EXPECT_TRUE(bitwise_equal(actual.at(name), tensor)) << what << ": " << name;
}

inline void expect_same_training(const RecomputeTrace& actual, const RecomputeTrace& expected,
                                 const std::string& what) {
  expect_bitwise_equal(actual.first_gradients, expected.first_gradients, what + " first gradients");
  ASSERT_EQ(actual.steps.size(), expected.steps.size()) << what;
  for (size_t i = 0; i < expected.steps.size(); ++i) {
    EXPECT_EQ(actual.steps[i].loss, expected.steps[i].loss) << what << " step " << i;
    EXPECT_EQ(actual.steps[i].aux_loss, expected.steps[i].aux_loss) << what << " step " << i;
    EXPECT_EQ(actual.steps[i].z_loss, expected.steps[i].z_loss) << what << " step " << i;
    EXPECT_EQ(actual.steps[i].grad_norm, expected.steps[i].grad_norm) << what << " step " << i;
  }
  expect_bitwise_equal(actual.final_gradients, expected.final_gradients, what + " last gradients");
  expect_bitwise_equal(actual.final_weights, expected.final_weights, what + " weights");
}

// Each train.recompute option alone, and combinations that nest regions.
inline std::vector<std::pair<std::string, RecomputeConfig>> recompute_options() {
  return {{"moe_act", {.moe_act = true}},
          {"moe", {.moe = true}},
          {"attention", {.attention = true}},
          {"block", {.block = true}},
          {"moe_act+attention", {.moe_act = true, .attention = true}},
          {"block+moe+moe_act", {.moe_act = true, .moe = true, .block = true}}};
}

// A config that exercises what recompute must replay: router jitter, capacity drops, aux and
// z losses, shared experts, a dense first block, gradient accumulation, two pipeline chunks;
// 5 steps.
inline Config recompute_test_config() {
  Config c = small_test_config();
  c.model.num_layers = 3;
  c.moe.first_k_dense = 1;
  c.moe.router.jitter_eps = 0.01;
  c.moe.capacity.factor = 1.25;
  c.train.steps = 5;
  c.train.warmup_steps = 1;
  c.train.grad_accum = 2;
  c.parallel.overlap_degree = 2;  // experts of two pipeline chunks share their weights
  return c;
}

}  // namespace moeforge::testing

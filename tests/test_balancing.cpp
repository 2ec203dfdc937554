// Balancing and routing variants against independent references: expert-bias rule and schedule,
// group-limited routing, expert choice, null experts, capacity padding and eval factor, jitter.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <set>

#include "moe/expert_bias.hpp"
#include "moe/load_balancing.hpp"
#include "moe/moe_layer.hpp"
#include "parallel/process_groups.hpp"
#include "test_support.hpp"

namespace moeforge::moe {
namespace {

using testing::relative_error;

MoeConfig balancing_moe(int64_t experts, int64_t k) {
  MoeConfig c;
  c.num_experts = experts;
  c.top_k = k;
  c.expert_ffn_size = 6;
  return c;
}

void randomize(torch::nn::Module& module, uint64_t seed, double std = 0.5) {
  at::manual_seed(seed);
  at::NoGradGuard no_grad;
  for (auto& p : module.parameters()) p.normal_(0.0, std);
}

// Float64 router probabilities of `layer` for x (softmax scores).
at::Tensor float64_probs(const at::Tensor& x, MoeLayerImpl& layer) {
  return at::softmax(at::matmul(x.to(at::kDouble), layer.router->weight.to(at::kDouble).t()), -1);
}

// y[t] = Σ over (expert, gate) picks of gate · SwiGLU_e(x_t), in float64; expert ids ≥ E
// (null experts) contribute nothing.
at::Tensor reference_output(const at::Tensor& x, GroupedExpertsImpl& experts,
                            const std::vector<std::vector<std::pair<int64_t, double>>>& picks) {
  const auto x64 = x.to(at::kDouble);
  const auto wg = experts.w_gate.to(at::kDouble), wu = experts.w_up.to(at::kDouble),
             wd = experts.w_down.to(at::kDouble);
  auto y = at::zeros_like(x64);
  for (int64_t t = 0; t < x.size(0); ++t)
    for (const auto& [e, gate] : picks[t]) {
      if (e >= wg.size(0)) continue;
      const auto h = at::silu(at::mv(wg[e], x64[t])) * at::mv(wu[e], x64[t]);
      y[t] += gate * at::mv(wd[e], h);
    }
  return y;
}

TEST(ExpertBias, UpdateRuleSignRateAndMeanCentring) {
  auto bias = at::zeros({4}, at::kFloat);
  const auto load = at::tensor({5, 1, 3, 3}, at::kLong);  // mean 3
  update_expert_bias(bias, load, 0.01, /*mean_center=*/false);
  // Over-loaded expert 0 goes down, under-loaded expert 1 up, balanced ones stay.
  EXPECT_TRUE(at::allclose(bias, at::tensor({-0.01f, 0.01f, 0.0f, 0.0f})));
  update_expert_bias(bias, at::tensor({1, 1, 1, 5}, at::kLong), 0.01, false);  // mean 2
  EXPECT_TRUE(at::allclose(bias, at::tensor({0.0f, 0.02f, 0.01f, -0.01f})));
  update_expert_bias(bias, at::tensor({2, 2, 2, 2}, at::kLong), 0.01, /*mean_center=*/true);
  EXPECT_NEAR(bias.sum().item<double>(), 0.0, 1e-7);
  EXPECT_TRUE(at::allclose(bias, at::tensor({-0.005f, 0.015f, 0.005f, -0.015f})));
}

TEST(ExpertBias, RateScheduleHasAFinalPhase) {
  ExpertBiasConfig c;
  c.rate = 0.001;
  EXPECT_EQ(expert_bias_rate(c, 99, 100), 0.001);  // no final phase by default
  c.final_phase = 0.25;
  c.final_rate = 0.0;
  for (int64_t step = 0; step < 100; ++step)
    EXPECT_EQ(expert_bias_rate(c, step, 100), step < 75 ? 0.001 : 0.0) << step;
}

TEST(ExpertBias, IsABufferTheOptimizerNeverSees) {
  auto groups = parallel::make_single_process_groups();
  MoeLayer layer(4, balancing_moe(4, 2), *groups.ep);
  for (const auto& p : layer->named_parameters())
    EXPECT_EQ(p.key().find("expert_bias"), std::string::npos);
  bool found = false;
  for (const auto& b : layer->named_buffers()) found |= b.key() == "router.expert_bias";
  EXPECT_TRUE(found);
}

TEST(GroupLimitedRouting, NeverPicksOutsideTheChosenGroups) {
  for (const bool with_bias : {false, true}) {
    auto config = balancing_moe(8, 3);
    config.router.score = moe::ScoreFunction::kSigmoid;
    config.router.num_groups = 4;
    config.router.topk_groups = 2;
    Router router(6, config);
    randomize(*router, 11);
    if (with_bias) router->expert_bias.copy_(at::linspace(-0.3, 0.3, 8));
    const auto x = at::randn({40, 6});
    const auto out = router->forward(x);
    const auto scores =
        at::sigmoid(at::matmul(x.to(at::kDouble), router->weight.to(at::kDouble).t()));
    const auto selection = scores + router->expert_bias.to(at::kDouble);
    int64_t differs_from_plain_topk = 0;
    for (int64_t t = 0; t < 40; ++t) {
      // Reference: group score = best top_k / topk_groups = 1 selection score of the group.
      std::vector<std::pair<double, int64_t>> groups;
      for (int64_t g = 0; g < 4; ++g)
        groups.push_back(
            {std::max(selection[t][2 * g].item<double>(), selection[t][2 * g + 1].item<double>()),
             g});
      std::sort(groups.rbegin(), groups.rend());
      const std::set<int64_t> chosen = {groups[0].second, groups[1].second};
      std::vector<std::pair<double, int64_t>> allowed;
      for (int64_t e = 0; e < 8; ++e)
        if (chosen.count(e / 2)) allowed.push_back({selection[t][e].item<double>(), e});
      std::sort(allowed.rbegin(), allowed.rend());
      std::set<int64_t> expected, actual, plain;
      for (int j = 0; j < 3; ++j) {
        expected.insert(allowed[j].second);
        actual.insert(out.expert_ids[t][j].item<int64_t>());
        EXPECT_TRUE(chosen.count(out.expert_ids[t][j].item<int64_t>() / 2)) << "token " << t;
      }
      EXPECT_EQ(actual, expected) << "token " << t;
      const auto top = std::get<1>(selection[t].topk(3));
      for (int j = 0; j < 3; ++j) plain.insert(top[j].item<int64_t>());
      differs_from_plain_topk += plain != actual;
      // Gates: the unbiased scores of the picks, renormalised.
      double sum = 0;
      for (const int64_t e : actual) sum += scores[t][e].item<double>();
      for (int j = 0; j < 3; ++j)
        EXPECT_NEAR(out.gates[t][j].item<double>(),
                    scores[t][out.expert_ids[t][j].item<int64_t>()].item<double>() / sum, 1e-6);
    }
    EXPECT_GT(differs_from_plain_topk, 0) << "the group limit never mattered: weak test";
  }
}

TEST(ExpertChoice, EachExpertTakesExactlyItsTopCTokens) {
  auto groups = parallel::make_single_process_groups();
  auto config = balancing_moe(4, 2);
  config.router.routing = moe::Routing::kExpertChoice;
  config.capacity.factor = 1.0;  // C = ceil(10 · 2 / 4) = 5
  MoeLayer layer(6, config, *groups.ep);
  randomize(*layer, 12);
  layer->train();
  const auto x = at::randn({10, 6});
  const auto out = layer->forward(x, 10);
  const auto& y = out.y;
  const auto stats = read_stats(out.counters);
  const auto probs = float64_probs(x, *layer);
  std::vector<std::vector<std::pair<int64_t, double>>> picks(10);
  for (int64_t e = 0; e < 4; ++e) {
    const auto top = std::get<1>(probs.select(1, e).topk(5));
    for (int64_t c = 0; c < 5; ++c) {
      const int64_t t = top[c].item<int64_t>();
      picks[t].push_back({e, probs[t][e].item<double>()});
    }
  }
  EXPECT_TRUE(at::equal(stats.load, at::full({4}, 5, at::kLong)));
  EXPECT_EQ(stats.rows, 20);
  EXPECT_EQ(stats.dropped, 0);
  EXPECT_LT(relative_error(y, reference_output(x, *layer->experts, picks)), 1e-5);
}

TEST(NullExperts, ArePickedButNeverDispatched) {
  auto groups = parallel::make_single_process_groups();
  auto config = balancing_moe(4, 2);
  config.router.num_null_experts = 2;
  MoeLayer layer(6, config, *groups.ep);
  randomize(*layer, 13, 0.8);
  const auto x = at::randn({30, 6});
  const auto out = layer->forward(x, 30);
  const auto& y = out.y;
  const auto probs = float64_probs(x, *layer);
  ASSERT_EQ(probs.size(1), 6);
  std::vector<std::vector<std::pair<int64_t, double>>> picks(30);
  int64_t null_picks = 0;
  for (int64_t t = 0; t < 30; ++t) {
    const auto [values, ids] = probs[t].topk(2);
    const double sum = values.sum().item<double>();  // null experts share the normalisation
    for (int j = 0; j < 2; ++j) {
      const int64_t e = ids[j].item<int64_t>();
      null_picks += e >= 4;
      picks[t].push_back({e, values[j].item<double>() / sum});
    }
  }
  ASSERT_GT(null_picks, 0) << "no null expert picked: weak test";
  const auto stats = read_stats(out.counters);
  EXPECT_EQ(stats.null_slots, null_picks);
  EXPECT_EQ(stats.rows, 60 - null_picks);  // only real picks become dispatched rows
  EXPECT_LT(relative_error(y, reference_output(x, *layer->experts, picks)), 1e-5);
}

TEST(Capacity, PaddingToCapacityChangesNothingButShapes) {
  auto groups = parallel::make_single_process_groups();
  auto config = balancing_moe(4, 2);
  config.capacity.factor = 1.0;
  MoeLayer plain(8, config, *groups.ep);
  config.capacity.pad = true;
  MoeLayer padded(8, config, *groups.ep);
  randomize(*plain, 14);
  randomize(*padded, 14);
  const auto x = at::randn({12, 8});
  const auto plain_out = plain->forward(x, 12);
  const auto& y_plain = plain_out.y;
  const auto y_padded = padded->forward(x, 12).y;
  EXPECT_LT(relative_error(y_padded, y_plain), 1e-6);
  EXPECT_GT(read_stats(plain_out.counters).dropped, 0) << "no drops: weak test";
  (y_plain.square().sum()).backward();
  (y_padded.square().sum()).backward();
  EXPECT_LT(relative_error(padded->experts->w_up.grad(), plain->experts->w_up.grad()), 1e-6);
  EXPECT_LT(relative_error(padded->router->weight.grad(), plain->router->weight.grad()), 1e-6);
}

TEST(Capacity, EvalUsesItsOwnFactorAndIsDroplessByDefault) {
  auto groups = parallel::make_single_process_groups();
  auto config = balancing_moe(4, 1);
  config.capacity.factor = 0.5;
  MoeLayer layer(6, config, *groups.ep);
  randomize(*layer, 15);
  const auto x = at::randn({16, 6});
  layer->train();
  EXPECT_GT(read_stats(layer->forward(x, 16).counters).dropped, 0);
  layer->eval();
  EXPECT_EQ(read_stats(layer->forward(x, 16).counters).dropped, 0);
  config.capacity.eval_factor = 0.5;
  MoeLayer strict(6, config, *groups.ep);
  randomize(*strict, 15);
  strict->eval();
  EXPECT_GT(read_stats(strict->forward(x, 16).counters).dropped, 0);
}

TEST(RouterJitter, SeededInTrainingAndOffInEval) {
  auto config = balancing_moe(4, 2);
  config.router.jitter_eps = 0.1;
  Router router(6, config);
  randomize(*router, 16);
  const auto x = at::randn({20, 6});
  router->train();
  const auto a = router->forward(x, 0.0, 7).logits;
  const auto b = router->forward(x, 0.0, 7).logits;
  const auto c = router->forward(x, 0.0, 8).logits;
  EXPECT_TRUE(at::equal(a, b));
  EXPECT_FALSE(at::equal(a, c));
  router->eval();
  const auto clean = at::matmul(x, router->weight.t());
  EXPECT_TRUE(at::allclose(router->forward(x).logits, clean));
  // The noise is multiplicative within [1 - eps, 1 + eps]: logits stay within the bound.
  const double bound = (x.abs().matmul(router->weight.abs().t()) * 0.1).max().item<double>();
  EXPECT_LE((a - clean).abs().max().item<double>(), bound + 1e-5);
  EXPECT_GT((a - clean).abs().max().item<double>(), 0.0);
}

TEST(Balancing, SequenceAndMicroBatchScopesCountOnlySelectedPicks) {
  // Expert choice marks picks as selected; unselected entries must not count in f.
  const auto scores = at::softmax(at::randn({4, 2}), -1);
  const auto ids = at::tensor({0, 1, 0, 1, 0, 1, 0, 1}, at::kLong).view({4, 2});
  const auto selected = at::tensor({1, 0, 1, 0, 0, 1, 1, 0}, at::kInt).to(at::kBool).view({4, 2});
  // f = (3/4, 1/4); loss = 2 · (3/4 · p0 + 1/4 · p1).
  const auto p = scores.mean(0);
  const double expected = 2 * (0.75 * p[0].item<double>() + 0.25 * p[1].item<double>());
  EXPECT_NEAR(aux_loss(scores, ids, selected, moe::AuxLossScope::kMicroBatch, 4).item<double>(),
              expected, 1e-6);
  EXPECT_NEAR(aux_loss(scores, ids, selected, moe::AuxLossScope::kSequence, 4).item<double>(),
              expected, 1e-6);
  EXPECT_TRUE(at::equal(expert_load(ids, selected, 2), at::tensor({3, 1}, at::kLong)));
}

}  // namespace
}  // namespace moeforge::moe

// Routing analysis (`moeforge analyze`): each metric on synthetic routers whose answer is known
// exactly, and the MoE layer's routing recorder against the layer's own router and experts.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>

#include "moe/moe_layer.hpp"
#include "moe/routing_recorder.hpp"
#include "parallel/process_groups.hpp"
#include "trainer/inference/routing_analysis.hpp"

namespace moeforge {
namespace {

// A capture whose every slot is selected and kept, with unit output norms.
RoutingCapture capture_of(const at::Tensor& ids) {
  // Separate tensors: a test that plants a drop in `kept` must not unselect the slot.
  return {ids, at::ones(ids.sizes(), at::kBool), at::ones(ids.sizes(), at::kBool),
          at::ones(ids.sizes(), at::kFloat)};
}

at::Tensor sets_of(const at::Tensor& ids, int64_t pool) {
  return chosen_sets(capture_of(ids), pool);
}

at::Tensor ids_k1(const at::Tensor& experts) {
  return experts.to(at::kLong).unsqueeze(1);
}

TEST(RoutingStability, IdenticalRoutingIsOneAndSwappedExpertsChangeOnlyTokensWithOneOfThem) {
  const auto a =
      at::tensor({0, 1, 0, 2, 1, 3, 2, 3, 4, 5, 1, 0, 6, 7, 0, 7}, at::kLong).view({8, 2});
  EXPECT_DOUBLE_EQ(routing_stability(sets_of(a, 8), sets_of(a, 8)), 1.0);
  // A checkpoint with experts 0 and 1 swapped: rows {0,2}, {1,3}, {0,7} change; {0,1} and
  // {1,0} stay the same set (order does not matter); the others do not involve 0 or 1.
  const auto swapped = at::where(a == 0, 1, at::where(a == 1, 0, a));
  EXPECT_DOUBLE_EQ(routing_stability(sets_of(a, 8), sets_of(swapped, 8)), 5.0 / 8.0);
  // Over two layers a token is stable only if it is stable in both.
  const auto b =
      at::tensor({0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7}, at::kLong).view({8, 2});
  auto b_changed = b.clone();
  b_changed[3][0] = 5;  // token 3: {6,7} → {5,7}; token 3 was stable in layer a
  EXPECT_DOUBLE_EQ(all_layer_stability({sets_of(a, 8), sets_of(b, 8)},
                                       {sets_of(swapped, 8), sets_of(b_changed, 8)}),
                   4.0 / 8.0);
}

TEST(TokenExpertInformation, InjectiveTokenRouterReachesTheTokenEntropy) {
  // 16 token ids, each 4 times, routed to expert = token id (k = 1): I = H(token) = 4 bits.
  const auto tokens = at::arange(16, at::kLong).repeat({4});
  const auto info = token_expert_information(tokens, sets_of(ids_k1(tokens), 16));
  EXPECT_NEAR(info.mi_bits, 4.0, 1e-12);
  EXPECT_NEAR(info.token_entropy_bits, 4.0, 1e-12);
  EXPECT_NEAR(info.expert_entropy_bits, 4.0, 1e-12);
  EXPECT_EQ(info.pairs, 64);
  EXPECT_EQ(info.distinct_tokens, 16);
  // Miller–Madow: (16 − 1)(16 − 1) / (2 · 64 · ln 2).
  EXPECT_NEAR(info.bias_bits, 225.0 / (128.0 * std::log(2.0)), 1e-12);
}

TEST(TokenExpertInformation, SkewedTokenFrequenciesGiveTheirEntropy) {
  // Frequencies 1/8, 1/8, 1/4, 1/2: H = 1.75 bits, and an injective router carries all of it.
  const auto tokens = at::tensor({0, 1, 2, 2, 3, 3, 3, 3}, at::kLong);
  const auto info = token_expert_information(tokens, sets_of(ids_k1(tokens + 4), 8));
  EXPECT_NEAR(info.token_entropy_bits, 1.75, 1e-12);
  EXPECT_NEAR(info.mi_bits, 1.75, 1e-12);
}

TEST(TokenExpertInformation, ManyToOneRouterIsBoundedByTheExpertEntropy) {
  // expert = token mod 4: I = H(expert) = 2 bits < H(token) = 4 bits.
  const auto tokens = at::arange(16, at::kLong).repeat({2});
  const auto info = token_expert_information(tokens, sets_of(ids_k1(tokens.remainder(4)), 4));
  EXPECT_NEAR(info.mi_bits, 2.0, 1e-12);
  EXPECT_NEAR(info.token_entropy_bits, 4.0, 1e-12);
  EXPECT_NEAR(info.expert_entropy_bits, 2.0, 1e-12);
}

TEST(TokenExpertInformation, RoutingIndependentOfTheTokenGivesZero) {
  // Every (token, expert) combination exactly once: the routing says nothing about the token.
  const auto i = at::arange(16, at::kLong);
  const auto info = token_expert_information(i.div(4, "floor"), sets_of(ids_k1(i.remainder(4)), 4));
  EXPECT_NEAR(info.mi_bits, 0.0, 1e-12);
  EXPECT_NEAR(info.token_entropy_bits, 2.0, 1e-12);
}

TEST(TokenExpertInformation, TopTwoByTokenLosesOneBitToTheChoiceWithinThePair) {
  // k = 2, token v → {v, v+1 mod 4}: H(expert) = 2, H(expert | token) = 1, so I = 1 bit.
  const auto tokens = at::arange(4, at::kLong).repeat({3});
  const auto ids = at::stack({tokens, (tokens + 1).remainder(4)}, 1);
  const auto info = token_expert_information(tokens, sets_of(ids, 4));
  EXPECT_NEAR(info.mi_bits, 1.0, 1e-12);
  EXPECT_EQ(info.pairs, 24);
}

TEST(CoRouting, DeterministicPairingHasLiftEAndLog2EBits) {
  // Layer l expert e is always followed by expert (e + 1) mod 4 at layer l+1.
  const auto first = at::arange(4, at::kLong).repeat({5});
  const auto co =
      co_routing(sets_of(ids_k1(first), 4), sets_of(ids_k1((first + 1).remainder(4)), 4));
  EXPECT_NEAR(co.mi_bits, 2.0, 1e-12);
  EXPECT_NEAR(co.joint.sum().item<double>(), 1.0, 1e-12);
  for (int64_t e = 0; e < 4; ++e)
    for (int64_t n = 0; n < 4; ++n) {
      const bool paired = n == (e + 1) % 4;
      EXPECT_NEAR(co.joint[e][n].item<double>(), paired ? 0.25 : 0.0, 1e-12);
      EXPECT_NEAR(co.lift[e][n].item<double>(), paired ? 4.0 : 0.0, 1e-12);
    }
}

TEST(CoRouting, IndependentLayersHaveLiftOneEverywhere) {
  const auto i = at::arange(16, at::kLong);
  const auto co =
      co_routing(sets_of(ids_k1(i.div(4, "floor")), 4), sets_of(ids_k1(i.remainder(4)), 4));
  EXPECT_NEAR(co.mi_bits, 0.0, 1e-12);
  EXPECT_TRUE(at::allclose(co.lift, at::ones({4, 4}, at::kDouble)));
}

TEST(ExpertMagnitudes, PlantedOutlierExpertsAreFoundWithTheirRatio) {
  // 8 experts, 4 rows each; norms near 1 except expert 5 (10) and expert 2 (4).
  const auto ids = ids_k1(at::arange(8, at::kLong).repeat({4}));
  auto norms = 1.0 + 0.01 * at::arange(32, at::kFloat).remainder(3).unsqueeze(1);
  norms.masked_fill_(ids == 5, 10.0).masked_fill_(ids == 2, 4.0);
  auto capture = capture_of(ids);
  capture.output_norm = norms;
  const auto m = expert_magnitudes(capture, 8, 3.0);
  ASSERT_EQ(m.super_experts, (std::vector<int64_t>{5, 2}));
  EXPECT_NEAR(m.mean_norm[5], 10.0, 1e-6);
  EXPECT_NEAR(m.max_norm[2], 4.0, 1e-6);
  EXPECT_EQ(m.rows[0], 4);
  // Expert means 1.0075 (×3), 1.01 (×3), 4, 10: median 1.01, MAD 0.0025.
  EXPECT_NEAR(m.median, 1.01, 1e-6);
  EXPECT_NEAR(m.mad, 0.0025, 1e-6);
  // No outlier when every expert has the same norm (MAD 0).
  EXPECT_TRUE(expert_magnitudes(capture_of(ids), 8, 3.0).super_experts.empty());
}

TEST(ExpertMagnitudes, DroppedAndNullSlotsDoNotCount) {
  const auto ids = at::tensor({0, 1, 2, 3}, at::kLong).unsqueeze(1);
  auto capture = capture_of(ids);
  capture.kept = at::tensor({1, 1, 0, 1}, at::kLong).to(at::kBool).unsqueeze(1);
  capture.output_norm = at::tensor({1.0f, 1.0f, 0.0f, 5.0f}).unsqueeze(1);
  const auto m = expert_magnitudes(capture, 3, 3.0);  // expert id 3 is a null expert
  EXPECT_EQ(m.rows, (std::vector<int64_t>{1, 1, 0}));
  EXPECT_TRUE(m.super_experts.empty());
}

TEST(DropPositions, CountsDroppedSlotsByPositionInTheSequence) {
  // Two sequences of 4 tokens, k = 2; drops planted at position 3 (twice) and 1 (once).
  const auto ids =
      at::tensor({0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 9}, at::kLong).view({8, 2});
  auto capture = capture_of(ids);
  capture.kept[3][0] = false;
  capture.kept[7][0] = false;
  capture.kept[5][1] = false;
  capture.kept[7][1] = false;  // a null expert (id 9 ≥ E = 2): never routed, never dropped
  const auto positions = at::arange(4, at::kLong).repeat({2});
  const auto d = drop_positions(capture, positions, 4, 2);
  EXPECT_EQ(d.routed, (std::vector<int64_t>{4, 4, 4, 3}));
  EXPECT_EQ(d.dropped, (std::vector<int64_t>{0, 1, 0, 2}));
}

struct Collect : moe::RoutingRecorder {
  std::vector<moe::RoutingRecord> records;
  void record(const moe::RoutingRecord& r) override { records.push_back(r); }
};

// The recorder sees the router's own picks, the capacity drops, and each kept slot's expert
// output norm, computed here again one row at a time; attaching it changes nothing in y.
TEST(RoutingRecorder, RecordsPicksDropsAndExpertOutputNorms) {
  auto groups = parallel::make_single_process_groups();
  moe::MoeConfig config;
  config.num_experts = 4;
  config.top_k = 2;
  config.expert_ffn_size = 6;
  config.capacity.eval_factor = 0.5;  // capacity ceil(0.5·12·2/4) = 3 of 6 average: drops
  moe::MoeLayer layer(5, config, *groups.ep);
  at::manual_seed(3);
  {
    at::NoGradGuard no_grad;
    for (auto& p : layer->parameters()) p.normal_(0.0, 0.5);
  }
  layer->eval();
  at::NoGradGuard no_grad;
  const auto x = at::randn({12, 5});
  // A recorded forward takes the dispatch pipeline with grouped-GEMM experts (the gathered and
  // gated-rows experts keep no ungated output rows to measure), so recording must leave that
  // path's output untouched, and agree with the gathered path to fp32 rounding.
  const auto gathered = layer->forward(x, 6).y;
  layer->force_expert_path(moe::ExpertPath::kGroupedGemm);
  const auto plain = layer->forward(x, 6).y;
  layer->force_expert_path(moe::ExpertPath::kAuto);
  Collect collect;
  layer->set_recorder(&collect);
  const auto recorded = layer->forward(x, 6).y;
  ASSERT_EQ(collect.records.size(), 1u);
  EXPECT_TRUE(at::equal(plain, recorded));
  EXPECT_LT((recorded - gathered).abs().max().item<double>(),
            1e-6 * (1 + gathered.abs().max().item<double>()));
  const auto& r = collect.records[0];
  EXPECT_EQ(r.seq_len, 6);
  EXPECT_TRUE(at::equal(r.expert_ids, layer->router->forward(x).expert_ids));
  EXPECT_GT(r.kept.logical_not().sum().item<int64_t>(), 0) << "the capacity must drop slots";
  for (int64_t t = 0; t < 12; ++t)
    for (int64_t j = 0; j < 2; ++j) {
      const int64_t e = r.expert_ids[t][j].item<int64_t>();
      std::vector<int64_t> rows(4, 0);
      rows[e] = 1;
      const double expected =
          r.kept[t][j].item<bool>()
              ? layer->experts->forward(x[t].unsqueeze(0), rows).norm().item<double>()
              : 0.0;
      EXPECT_NEAR(r.output_norm[t][j].item<double>(), expected, 1e-5 * (1 + expected));
    }
}

}  // namespace
}  // namespace moeforge

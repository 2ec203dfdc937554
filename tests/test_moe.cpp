// MoE layer, router, balancing losses and capacity against independent float64 references.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/autograd.h>

#include <cmath>

#include "moe/capacity.hpp"
#include "moe/gathered_experts.hpp"
#include "moe/grouped_matmul.hpp"
#include "moe/load_balancing.hpp"
#include "moe/moe_layer.hpp"
#include "moe/row_kernels.hpp"
#include "parallel/process_groups.hpp"
#include "trainer/config/config.hpp"

namespace moeforge::moe {
namespace {

double relative_error(const at::Tensor& actual, const at::Tensor& expected) {
  const auto a = actual.to(at::kDouble), e = expected.to(at::kDouble);
  return (a - e).norm().item<double>() / std::max(e.norm().item<double>(), 1e-30);
}

MoeConfig small_moe(int64_t experts, int64_t k, const std::string& score = "softmax") {
  MoeConfig c;
  c.num_experts = experts;
  c.top_k = k;
  c.expert_ffn_size = 6;
  c.router.score = *enum_from_text<ScoreFunction>(score);
  return c;
}

void randomize(torch::nn::Module& module, uint64_t seed, double std = 0.5) {
  at::manual_seed(seed);
  at::NoGradGuard no_grad;
  for (auto& p : module.parameters()) p.normal_(0.0, std);
}

TEST(Router, TopKAndGatesMatchFloat64Reference) {
  for (const std::string score : {"softmax", "sigmoid"}) {
    auto config = small_moe(6, 2, score);
    Router router(5, config);
    randomize(*router, 1);
    const auto x = at::randn({9, 5});
    const auto out = router->forward(x);
    const auto logits = at::matmul(x.to(at::kDouble), router->weight.to(at::kDouble).t());
    const auto scores = score == "softmax" ? at::softmax(logits, -1) : at::sigmoid(logits);
    for (int64_t t = 0; t < 9; ++t) {
      // Reference top-2 by a plain scan.
      int64_t best = -1, second = -1;
      for (int64_t e = 0; e < 6; ++e) {
        const double v = scores[t][e].item<double>();
        if (best < 0 || v > scores[t][best].item<double>()) {
          second = best;
          best = e;
        } else if (second < 0 || v > scores[t][second].item<double>()) {
          second = e;
        }
      }
      EXPECT_EQ(out.expert_ids[t][0].item<int64_t>(), best);
      EXPECT_EQ(out.expert_ids[t][1].item<int64_t>(), second);
      const double s0 = scores[t][best].item<double>(), s1 = scores[t][second].item<double>();
      EXPECT_NEAR(out.gates[t][0].item<double>(), s0 / (s0 + s1), 1e-6);
      EXPECT_NEAR(out.gates[t][1].item<double>(), s1 / (s0 + s1), 1e-6);
    }
  }
}

TEST(Router, ExpertBiasSteersSelectionButNotGates) {
  auto config = small_moe(4, 1);
  config.router.normalize_gates = false;
  Router router(3, config);
  randomize(*router, 2);
  const auto x = at::randn({16, 3});
  router->expert_bias.fill_(0.0);
  router->expert_bias[3] = 10.0f;  // expert 3 wins every selection
  const auto out = router->forward(x);
  EXPECT_TRUE((out.expert_ids == 3).all().item<bool>());
  // Gates are the *unbiased* softmax probability of expert 3.
  const auto probs = at::softmax(at::matmul(x, router->weight.t()), -1);
  EXPECT_LT(relative_error(out.gates.squeeze(1), probs.select(1, 3)), 1e-6);
}

TEST(Balancing, AuxLossIsOneForAUniformRouter) {
  const auto scores = at::full({8, 4}, 0.25);
  const auto ids =
      at::tensor({0, 1, 2, 3, 0, 1, 2, 3, 0, 0, 0, 0, 1, 1, 1, 1}, at::kLong).view({8, 2});
  // f is skewed, but P is uniform: E · Σ f_i / E = Σ f_i = 1.
  EXPECT_NEAR(aux_loss(scores, ids, {}, moe::AuxLossScope::kMicroBatch, 8).item<double>(), 1.0,
              1e-6);
}

TEST(Balancing, AuxLossMatchesFloat64Recomputation) {
  at::manual_seed(3);
  const int64_t tokens = 12, experts = 5, k = 2, seq = 4;
  const auto logits = at::randn({tokens, experts}, at::kFloat).set_requires_grad(true);
  const auto ids = std::get<1>(at::topk(logits.detach(), k, -1));
  // Global-batch scope: f comes from the whole global batch (here: counts of another 36 slots
  // plus this micro-batch's), p from this micro-batch.
  const auto other_counts = at::tensor({9.0, 3.0, 11.0, 7.0, 6.0}, at::kDouble);
  for (const std::string scope : {"micro_batch", "sequence", "global_batch"}) {
    const auto scores = at::softmax(logits, -1);
    const auto own_counts = at::bincount(ids.reshape(-1), {}, experts).to(at::kDouble);
    const auto global_counts = other_counts + own_counts;
    const auto global_fraction = (global_counts / global_counts.sum()).to(at::kFloat);
    const auto loss =
        aux_loss(scores, ids, {}, *enum_from_text<AuxLossScope>(scope), seq, global_fraction);
    auto grad = torch::autograd::grad({loss}, {logits})[0];
    // Reference in float64 with explicit loops over groups of tokens.
    const auto logits64 = logits.detach().to(at::kDouble).set_requires_grad(true);
    const auto p64 = at::softmax(logits64, -1);
    const int64_t group = scope == "sequence" ? seq : tokens;
    auto total = at::zeros({}, at::kDouble);
    for (int64_t start = 0; start < tokens; start += group) {
      for (int64_t e = 0; e < experts; ++e) {
        double count = 0;
        for (int64_t t = start; t < start + group; ++t)
          for (int64_t j = 0; j < k; ++j) count += ids[t][j].item<int64_t>() == e ? 1 : 0;
        double fraction = count / static_cast<double>(group * k);
        if (scope == "global_batch")
          fraction = (count + other_counts[e].item<double>()) / static_cast<double>(group * k + 36);
        const auto mean_p = p64.narrow(0, start, group).select(1, e).mean();
        total = total + experts * fraction * mean_p;
      }
    }
    total = total / static_cast<double>(tokens / group);
    const auto grad64 = torch::autograd::grad({total}, {logits64})[0];
    EXPECT_NEAR(loss.item<double>(), total.item<double>(), 1e-6) << scope;
    EXPECT_LT(relative_error(grad, grad64), 1e-5) << scope;
  }
}

TEST(Balancing, ZLossMatchesClosedForm) {
  const auto logits = at::tensor({1.0, 2.0, 3.0, 0.0, 0.0, 0.0}, at::kFloat).view({2, 3});
  const double a = std::log(std::exp(1.0) + std::exp(2.0) + std::exp(3.0));
  const double b = std::log(3.0);
  EXPECT_NEAR(z_loss(logits).item<double>(), (a * a + b * b) / 2, 1e-5);
}

TEST(Balancing, MaxViolationAndLoad) {
  const auto ids = at::tensor({0, 0, 0, 1, 2, 3, 0, 1}, at::kLong).view({4, 2});
  const auto load = expert_load(ids, {}, 4);
  EXPECT_TRUE(at::equal(load, at::tensor({4, 2, 1, 1}, at::kLong)));
  EXPECT_NEAR(max_violation(load), 4.0 / 2.0 - 1.0, 1e-12);
}

TEST(Capacity, DropPoliciesDropExactlyTheSpecifiedPairs) {
  // 4 tokens, k=1, everyone picks expert 0; capacity 2.
  const auto ids = at::zeros({4, 1}, at::kLong);
  const auto gates = at::tensor({0.1, 0.9, 0.5, 0.7}, at::kFloat).view({4, 1});
  const auto by_probs = capacity_keep_mask(ids, gates, 2, 2, moe::DropPolicy::kProbs);
  EXPECT_TRUE(at::equal(by_probs.view(-1), at::tensor({0, 1, 0, 1}, at::kInt).to(at::kBool)));
  const auto by_position = capacity_keep_mask(ids, gates, 2, 2, moe::DropPolicy::kPosition);
  EXPECT_TRUE(at::equal(by_position.view(-1), at::tensor({1, 1, 0, 0}, at::kInt).to(at::kBool)));
  EXPECT_EQ(expert_capacity(1.0, 4, 1, 2), 2);
  EXPECT_EQ(expert_capacity(1.25, 10, 2, 8), 4);  // ceil(25/8)
}

// Reference MoE forward: a per-token float64 loop with its own routing.
at::Tensor reference_moe(const at::Tensor& x, MoeLayerImpl& layer, const MoeConfig& config,
                         const std::vector<at::Tensor>& params64, int64_t capacity_keep_all) {
  // params64: router [E,H], w_gate [E,F,H], w_up [E,F,H], w_down [E,H,F], shared g/u/d
  const auto& wr = params64[0];
  const auto& wg = params64[1];
  const auto& wu = params64[2];
  const auto& wd = params64[3];
  const int64_t tokens = x.size(0);
  std::vector<at::Tensor> rows;
  for (int64_t t = 0; t < tokens; ++t) {
    const auto xt = x[t];
    const auto probs = at::softmax(at::mv(wr, xt), 0);
    const auto top = std::get<1>(at::topk(probs.detach(), config.top_k));
    auto denom = at::zeros({}, at::kDouble);
    for (int64_t j = 0; j < config.top_k; ++j) denom = denom + probs[top[j].item<int64_t>()];
    auto yt = at::zeros_like(xt);
    for (int64_t j = 0; j < config.top_k; ++j) {
      const int64_t e = top[j].item<int64_t>();
      const auto h = at::silu(at::mv(wg[e], xt)) * at::mv(wu[e], xt);
      yt = yt + (probs[e] / denom) * at::mv(wd[e], h);
    }
    if (params64.size() > 4) {
      const auto h = at::silu(at::mv(params64[4], xt)) * at::mv(params64[5], xt);
      yt = yt + at::mv(params64[6], h);
    }
    rows.push_back(yt);
  }
  return at::stack(rows);
}

// hidden 5 / ffn 6 take grouped_matmul's loop; hidden 8 / ffn 12 (16-byte aligned fp32 rows)
// take at::_grouped_mm — both must match the float64 loop.
// path: kAuto is the gathered-experts path ep 1 takes in fp32; kPipeline the dispatch pipeline
// with the gated-rows experts (expert parallelism's form), kGroupedGemm with grouped_matmul.
void check_layer_against_reference(int64_t shared, bool force_empty_experts, int64_t hidden = 5,
                                   int64_t ffn = 6, ExpertPath path = ExpertPath::kAuto) {
  auto groups = parallel::make_single_process_groups();
  auto config = small_moe(4, 2);
  config.num_shared_experts = shared;
  config.expert_ffn_size = ffn;
  const int64_t H = hidden;
  MoeLayer layer(H, config, *groups.ep);
  randomize(*layer, 4);
  layer->force_expert_path(path);
  if (force_empty_experts) {
    at::NoGradGuard no_grad;
    layer->router->weight.narrow(0, 2, 2).fill_(0.0);
    layer->router->weight.narrow(0, 0, 2).abs_();  // experts 2, 3 lose for positive inputs
  }
  const auto x =
      (force_empty_experts ? at::rand({7, H}) + 0.5 : at::randn({7, H})).set_requires_grad(true);
  const auto out = layer->forward(x, 7);
  const auto weight = at::randn({7, H});
  const auto loss = (out.y * weight).sum();
  loss.backward();

  std::vector<at::Tensor> params = {layer->router->weight, layer->experts->w_gate,
                                    layer->experts->w_up, layer->experts->w_down};
  if (shared) {
    params.push_back(layer->shared_experts->w_gate);
    params.push_back(layer->shared_experts->w_up);
    params.push_back(layer->shared_experts->w_down);
  }
  std::vector<at::Tensor> params64;
  for (const auto& p : params)
    params64.push_back(p.detach().to(at::kDouble).set_requires_grad(true));
  const auto x64 = x.detach().to(at::kDouble).set_requires_grad(true);
  const auto y64 = reference_moe(x64, *layer, config, params64, 0);
  const auto loss64 = (y64 * weight.to(at::kDouble)).sum();
  std::vector<at::Tensor> inputs = params64;
  inputs.push_back(x64);
  const auto grads64 = torch::autograd::grad({loss64}, inputs, {}, false, false, true);

  EXPECT_LT(relative_error(out.y, y64), 1e-5);
  EXPECT_LT(relative_error(x.grad(), grads64.back()), 1e-5);
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& g = params[i].grad();
    const auto expected = grads64[i].defined() ? grads64[i] : at::zeros_like(params64[i]);
    if (!g.defined()) {
      EXPECT_EQ(expected.abs().max().item<double>(), 0.0) << "param " << i;
      continue;
    }
    EXPECT_LT(relative_error(g, expected), 1e-5) << "param " << i;
  }
  if (force_empty_experts) {
    const auto load = read_stats(out.counters).load;
    EXPECT_EQ(load[2].item<int64_t>() + load[3].item<int64_t>(), 0);
    // Experts that saw no token get no gradient.
    const auto& g = layer->experts->w_gate.grad();
    EXPECT_EQ(g.narrow(0, 2, 2).abs().max().item<double>(), 0.0);
  }
}

TEST(MoeLayer, OutputAndGradientsMatchPerTokenFloat64Loop) {
  check_layer_against_reference(0, false);
}
TEST(MoeLayer, WithSharedExpert) {
  check_layer_against_reference(1, false);
}
TEST(MoeLayer, WithEmptyExperts) {
  check_layer_against_reference(0, true);
}
TEST(MoeLayer, GroupedGemmKernelPathMatchesFloat64Loop) {
  check_layer_against_reference(1, false, 8, 12, ExpertPath::kGroupedGemm);
}
TEST(MoeLayer, GroupedGemmKernelPathWithEmptyExperts) {
  check_layer_against_reference(0, true, 8, 12, ExpertPath::kGroupedGemm);
}
TEST(MoeLayer, PipelineLoopPathMatchesFloat64Loop) {
  check_layer_against_reference(1, false, 5, 6, ExpertPath::kGroupedGemm);
}
// The gathered path splits the experts into one share per intra-op thread and runs the shares
// at once: checked at 1, 2 and 3 threads whatever the machine's default.
template <class Body>
void at_thread_counts(const Body& body) {
  const int before = at::get_num_threads();
  for (const int threads : {1, 2, 3}) {
    SCOPED_TRACE(testing::Message() << threads << " intra-op threads");
    at::set_num_threads(threads);
    body();
  }
  at::set_num_threads(before);
}

TEST(MoeLayer, GatheredPathAtAlignedSizesMatchesFloat64Loop) {
  at_thread_counts([] {
    check_layer_against_reference(1, false, 8, 12);
    check_layer_against_reference(0, true, 8, 12);
  });
}
TEST(MoeLayer, GatedRowsPipelineMatchesFloat64Loop) {
  at_thread_counts([] {
    check_layer_against_reference(1, false, 8, 12, ExpertPath::kPipeline);
    check_layer_against_reference(0, true, 8, 12, ExpertPath::kPipeline);
    check_layer_against_reference(1, false, 5, 6, ExpertPath::kPipeline);
  });
}

// The gathered-experts path (ep 1, fp32) against the dispatch pipeline with gated-rows and with
// grouped-GEMM experts on the same layer and input: outputs and every gradient, with shared
// experts, capacity drops and expert choice.
void check_gathered_against_pipeline() {
  auto groups = parallel::make_single_process_groups();
  struct Case {
    const char* name;
    int64_t shared;
    double capacity;
    moe::Routing routing;
  };
  for (const Case& c : {Case{"dropless + shared", 1, 0.0, moe::Routing::kTokenChoice},
                        Case{"capacity drops", 0, 0.75, moe::Routing::kTokenChoice},
                        Case{"expert choice", 0, 1.0, moe::Routing::kExpertChoice}}) {
    auto config = small_moe(8, 3);
    config.expert_ffn_size = 24;
    config.num_shared_experts = c.shared;
    config.capacity.factor = c.capacity;
    config.router.routing = c.routing;
    std::vector<at::Tensor> outputs, grads;
    at::manual_seed(5);
    const auto x0 = at::randn({64, 16});
    const auto weight = at::randn({64, 16});
    for (const auto path : {ExpertPath::kAuto, ExpertPath::kPipeline, ExpertPath::kGroupedGemm}) {
      at::manual_seed(6);
      MoeLayer layer(16, config, *groups.ep);
      randomize(*layer, 6);
      layer->force_expert_path(path);
      const auto x = x0.clone().set_requires_grad(true);
      const auto y = layer->forward(x, 64).y;
      (y * weight).sum().backward();
      outputs.push_back(y.detach());
      grads.push_back(x.grad());
      for (const auto& p : layer->parameters()) grads.push_back(p.grad());
    }
    const size_t per_path = grads.size() / 3;
    for (size_t path = 1; path < 3; ++path) {
      EXPECT_LT(relative_error(outputs[0], outputs[path]), 1e-6) << c.name << " path " << path;
      for (size_t i = 0; i < per_path; ++i)
        EXPECT_LT(relative_error(grads[i], grads[path * per_path + i]), 1e-5)
            << c.name << " path " << path << " gradient " << i;
    }
  }
}
TEST(MoeLayer, GatheredPathMatchesPipeline) {
  at_thread_counts(check_gathered_against_pipeline);
}

// Experts larger than one block of rows (2048) go through in blocks, the weight gradients
// accumulated across them: both forms against a float64 per-expert composite, with an expert of
// three blocks, one of two, an empty one and a small one, at 1-3 threads.
void check_expert_blocks_against_float64(bool gathered) {
  at::manual_seed(21);
  const std::vector<int64_t> rows_per_expert = {4500, 0, 2100, 7};
  const int64_t experts = 4, hidden = 8, ffn = 16, tokens = 5000, rows = 6607;
  const auto wg = (at::randn({experts, ffn, hidden}) * 0.3).set_requires_grad(true);
  const auto wu = (at::randn({experts, ffn, hidden}) * 0.3).set_requires_grad(true);
  const auto wd = (at::randn({experts, hidden, ffn}) * 0.3).set_requires_grad(true);
  const auto gates = at::rand({rows}).set_requires_grad(true);
  std::vector<at::Tensor> index_parts;  // each expert's tokens distinct
  for (const int64_t n : rows_per_expert)
    index_parts.push_back(at::randperm(tokens).narrow(0, 0, n));
  const auto token_of_row = at::cat(index_parts);
  const auto x = at::randn({gathered ? tokens : rows, hidden}).set_requires_grad(true);
  const auto y = gathered ? gathered_experts(x, gates, token_of_row, rows_per_expert, wg, wu, wd)
                          : gated_expert_rows(x, gates, rows_per_expert, wg, wu, wd);
  const auto weight = at::randn(y.sizes());
  (y * weight).sum().backward();

  std::vector<at::Tensor> ref_inputs;
  for (const auto& t : {x, gates, wg, wu, wd})
    ref_inputs.push_back(t.detach().to(at::kDouble).set_requires_grad(true));
  const auto& x64 = ref_inputs[0];
  const auto rows64 = gathered ? x64.index_select(0, token_of_row) : x64;
  std::vector<at::Tensor> outs;
  int64_t first = 0;
  for (int64_t e = 0; e < experts; ++e) {
    const auto r = rows64.narrow(0, first, rows_per_expert[e]);
    const auto h =
        at::silu(at::matmul(r, ref_inputs[2][e].t())) * at::matmul(r, ref_inputs[3][e].t());
    outs.push_back(at::matmul(h, ref_inputs[4][e].t()) *
                   ref_inputs[1].narrow(0, first, rows_per_expert[e]).unsqueeze(1));
    first += rows_per_expert[e];
  }
  auto y64 = at::cat(outs);
  if (gathered) y64 = at::zeros({tokens, hidden}, y64.options()).index_add(0, token_of_row, y64);
  (y64 * weight.to(at::kDouble)).sum().backward();
  EXPECT_LT(relative_error(y, y64), 1e-5);
  const std::vector<at::Tensor> actual = {x, gates, wg, wu, wd};
  for (size_t i = 0; i < actual.size(); ++i)
    EXPECT_LT(relative_error(actual[i].grad(), ref_inputs[i].grad()), 1e-5) << "input " << i;
  EXPECT_EQ(wg.grad()[1].abs().max().item<double>(), 0.0);  // the empty expert
}
TEST(GatheredExperts, ExpertsLargerThanOneBlockMatchFloat64) {
  at_thread_counts([] {
    check_expert_blocks_against_float64(/*gathered=*/true);
    check_expert_blocks_against_float64(/*gathered=*/false);
  });
}

TEST(GroupedMatmul, KernelAndLoopPathsMatchFloat64PerGroupProducts) {
  at::manual_seed(11);
  const std::vector<int64_t> rows = {3, 0, 5, 0, 2};  // empty groups inside and at the end
  for (const int64_t k : {8, 7}) {                    // 8: at::_grouped_mm, 7: loop (unaligned)
    const auto x = at::randn({10, k}).set_requires_grad(true);
    const auto w = at::randn({5, k, 4}).set_requires_grad(true);
    const auto y = grouped_matmul(x, w, rows);
    const auto dy = at::randn({10, 4});
    (y * dy).sum().backward();
    const auto x64 = x.detach().to(at::kDouble);
    const auto w64 = w.detach().to(at::kDouble);
    auto y64 = at::zeros({10, 4}, at::kDouble);
    auto dx64 = at::zeros({10, k}, at::kDouble);
    auto dw64 = at::zeros({5, k, 4}, at::kDouble);
    int64_t offset = 0;
    for (int64_t g = 0; g < 5; ++g) {
      for (int64_t r = offset; r < offset + rows[g]; ++r) {
        y64[r] = at::mv(w64[g].t(), x64[r]);
        dx64[r] = at::mv(w64[g], dy[r].to(at::kDouble));
        dw64[g] += at::outer(x64[r], dy[r].to(at::kDouble));
      }
      offset += rows[g];
    }
    EXPECT_LT(relative_error(y, y64), 1e-6) << "k " << k;
    EXPECT_LT(relative_error(x.grad(), dx64), 1e-6) << "k " << k;
    EXPECT_LT(relative_error(w.grad(), dw64), 1e-6) << "k " << k;
    EXPECT_EQ(w.grad()[1].abs().max().item<double>(), 0.0);  // empty group: zero gradient
  }
}

TEST(MoeLayer, CapacityDropsGiveZeroContributionForDroppedSlots) {
  auto groups = parallel::make_single_process_groups();
  auto config = small_moe(2, 1);
  config.router.normalize_gates = false;
  config.capacity.factor = 0.5;  // capacity = ceil(0.5 · 8 / 2) = 2 per expert
  config.capacity.drop_policy = moe::DropPolicy::kPosition;
  MoeLayer layer(3, config, *groups.ep);
  randomize(*layer, 5);
  layer->train();
  const auto x = at::randn({8, 3});
  const auto out = layer->forward(x, 8);
  const auto& y = out.y;
  const auto ids = layer->router->forward(x).expert_ids.view(-1);
  // Position policy: for each expert only its first 2 tokens are served; the others give 0.
  std::vector<int> seen(2, 0);
  int64_t dropped = 0;
  for (int64_t t = 0; t < 8; ++t) {
    const int64_t e = ids[t].item<int64_t>();
    if (seen[e]++ >= 2) {
      EXPECT_EQ(y[t].abs().max().item<double>(), 0.0) << "token " << t;
      ++dropped;
    } else {
      EXPECT_GT(y[t].abs().max().item<double>(), 0.0) << "token " << t;
    }
  }
  EXPECT_EQ(read_stats(out.counters).dropped, dropped);
  // Eval is dropless by default.
  layer->eval();
  const auto y_eval = layer->forward(x, 8).y;
  EXPECT_GT(y_eval.abs().amax(1).min().item<double>(), 0.0);
}

}  // namespace
}  // namespace moeforge::moe

namespace moeforge::moe {
namespace {

// The fused row kernels against float64 formulas, over inputs from deep in silu's negative tail
// to large positive values (where exp is clamped), on strided rows of odd width (vector
// remainders).
TEST(RowKernels, SwigluForwardAndBackwardMatchFloat64) {
  at::manual_seed(21);
  const int64_t rows = 5, width = 37;
  const auto g64 = at::cat({at::linspace(-100.0, 100.0, rows * width / 2, at::kDouble),
                            at::randn({rows * width - rows * width / 2}, at::kDouble) * 4})
                       .view({rows, width});
  const auto u64 = at::randn({rows, width}, at::kDouble),
             dh64 = at::randn({rows, width}, at::kDouble);
  const auto gate64 = at::rand({rows}, at::kDouble);
  const auto g = g64.to(at::kFloat), u = u64.to(at::kFloat), dh = dh64.to(at::kFloat);
  const auto gate = gate64.to(at::kFloat);
  auto pair = at::full({rows, 2 * width}, std::nan(""));  // strided halves, as the experts use
  auto h = pair.narrow(1, width, width);
  swiglu_rows(rows, width, {g.const_data_ptr<float>(), width}, {u.const_data_ptr<float>(), width},
              {h.data_ptr<float>(), 2 * width});
  const auto s64 = at::sigmoid(g64);
  EXPECT_LT(((h.to(at::kDouble) - g64 * s64 * u64).abs() / (g64 * s64 * u64).abs().clamp_min(1e-30))
                .max()
                .item<double>(),
            1e-5);
  auto d_pair = at::full({rows, 2 * width}, std::nan(""));
  auto d_g = d_pair.narrow(1, 0, width), d_up = d_pair.narrow(1, width, width);
  swiglu_rows_backward(rows, width, {dh.const_data_ptr<float>(), width},
                       {g.const_data_ptr<float>(), width}, {u.const_data_ptr<float>(), width},
                       gate.const_data_ptr<float>(), {d_g.data_ptr<float>(), 2 * width},
                       {d_up.data_ptr<float>(), 2 * width});
  const auto t64 = dh64 * gate64.unsqueeze(1);
  const auto expected_up = t64 * g64 * s64;
  const auto expected_g = t64 * u64 * s64 * (1 + g64 * (1 - s64));
  const auto close = [](const at::Tensor& actual, const at::Tensor& expected) {
    return ((actual.to(at::kDouble) - expected).abs() - 1e-6 * expected.abs()).max().item<double>();
  };
  EXPECT_LT(close(d_up, expected_up), 1e-6);
  EXPECT_LT(close(d_g, expected_g), 1e-6);
}

TEST(RowKernels, RowDotsThenScale) {
  at::manual_seed(22);
  const auto a = at::randn({4, 203}), b = at::randn({4, 203}), scale = at::randn({4});
  auto scaled = b.clone();
  auto dots = at::empty({4});
  row_dots_then_scale(4, 203, {a.const_data_ptr<float>(), 203}, {scaled.data_ptr<float>(), 203},
                      scale.const_data_ptr<float>(), dots.data_ptr<float>());
  const auto expected = (a.to(at::kDouble) * b.to(at::kDouble)).sum(1);
  EXPECT_LT((dots.to(at::kDouble) - expected).abs().max().item<double>(), 1e-5);
  EXPECT_TRUE(scaled.allclose(b * scale.unsqueeze(1)));
}

// Exact transposes at sizes with and without ragged 8 x 8 edges, from a block inside a wider
// matrix into a block of a wider one (the destination's other columns untouched).
TEST(RowKernels, TransposeRowsExactlyWithRaggedEdges) {
  at::manual_seed(23);
  for (const auto& [rows, cols] : std::vector<std::pair<int64_t, int64_t>>{
           {1, 1}, {8, 8}, {7, 9}, {16, 24}, {37, 130}, {256, 5}}) {
    const auto source = at::randn({rows, cols + 3});
    auto target = at::full({cols, rows + 2}, 5.0F);
    transpose_rows(rows, cols, {source.const_data_ptr<float>() + 1, cols + 3},
                   {target.data_ptr<float>(), rows + 2});
    EXPECT_TRUE(target.narrow(1, 0, rows).equal(source.narrow(1, 1, cols).t()))
        << rows << "x" << cols;
    EXPECT_TRUE(target.narrow(1, rows, 2).eq(5.0F).all().item<bool>()) << rows << "x" << cols;
  }
}

}  // namespace
}  // namespace moeforge::moe

// Dense building blocks, optimizer and schedule against naive float64 / closed-form references.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>

#include "moe/experts.hpp"
#include "parallel/process_groups.hpp"
#include "trainer/load_statistics.hpp"
#include "trainer/model/cross_entropy.hpp"
#include "trainer/model/flops.hpp"
#include "trainer/model/model.hpp"
#include "trainer/model/rms_norm.hpp"
#include "trainer/model/rotary.hpp"
#include "trainer/optim/optimizer.hpp"
#include "trainer/runtime/device.hpp"

namespace moeforge {
namespace {

double relative_error(const at::Tensor& actual, const at::Tensor& expected) {
  const auto a = actual.to(at::kDouble), e = expected.to(at::kDouble);
  return (a - e).norm().item<double>() / std::max(e.norm().item<double>(), 1e-30);
}

// The project's kernels (RMSNorm, RoPE, the gathered experts) split their rows with the inline
// at::parallel_for, which runs everything on the calling thread unless the library was compiled
// with OpenMP (a build without it left them single-threaded, unnoticed, for a long time).
TEST(Threads, ProjectKernelsUseEveryIntraOpThread) {
  const int before = at::get_num_threads();
  at::set_num_threads(2);
  EXPECT_EQ(parallel_for_threads(), 2);
  at::set_num_threads(1);
  EXPECT_EQ(parallel_for_threads(), 1);
  at::set_num_threads(before);
}

TEST(RMSNorm, MatchesFormula) {
  RMSNorm norm(6, 1e-5);
  at::manual_seed(1);
  {
    at::NoGradGuard no_grad;
    norm->weight.normal_();
  }
  const auto x = at::randn({3, 6});
  const auto x64 = x.to(at::kDouble);
  const auto expected =
      x64 / at::sqrt((x64 * x64).mean(-1, true) + 1e-5) * norm->weight.to(at::kDouble);
  EXPECT_LT(relative_error(norm->forward(x), expected), 1e-6);
}

// The fused CPU kernel (fp32 and float64) against autograd of the composite float64 formula:
// output, input gradient and weight gradient, on rows that do not fill whole parallel tasks
// and a width that is not a multiple of the kernel's 8 accumulators.
TEST(RMSNorm, FusedKernelMatchesFloat64FormulaAndGradients) {
  at::manual_seed(2);
  for (const auto type : {at::kFloat, at::kDouble}) {
    for (const int64_t size : {6, 64, 131}) {
      const auto x64 = at::randn({3, 77, size}, at::kDouble);
      const auto w64 = 1.0 + 0.3 * at::randn({size}, at::kDouble);
      const auto dy64 = at::randn({3, 77, size}, at::kDouble);
      const auto reference = [&](at::Tensor& dx, at::Tensor& dw) {
        const auto x = x64.clone().requires_grad_(true), w = w64.clone().requires_grad_(true);
        const auto y = x / at::sqrt((x * x).mean(-1, true) + 1e-5) * w;
        y.backward(dy64);
        dx = x.grad();
        dw = w.grad();
        return y.detach();
      };
      at::Tensor dx_ref, dw_ref;
      const auto y_ref = reference(dx_ref, dw_ref);
      const auto x = x64.to(type).requires_grad_(true), w = w64.to(type).requires_grad_(true);
      const auto y = rms_norm(x, w, 1e-5);
      y.backward(dy64.to(type));
      const double tolerance = type == at::kFloat ? 1e-6 : 1e-13;
      EXPECT_EQ(y.scalar_type(), type);
      EXPECT_LT(relative_error(y, y_ref), tolerance) << size;
      EXPECT_LT(relative_error(x.grad(), dx_ref), tolerance) << size;
      EXPECT_LT(relative_error(w.grad(), dw_ref), tolerance) << size;
    }
  }
}

// bf16 input (autocast) keeps the composite path: normalised in fp32, cast back to bf16.
TEST(RMSNorm, Bf16InputTakesTheCompositePath) {
  const auto x = at::randn({4, 16}).to(at::kBFloat16);
  const auto w = at::ones({16});
  const auto y = rms_norm(x, w, 1e-6);
  EXPECT_EQ(y.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::equal(y, rms_norm_composite(x, w, 1e-6)));
}

// The fused CPU cross-entropy (fp32 and float64) against the float64 log-softmax formula and
// its autograd gradient, with ignored (-100) targets; out-of-range targets are refused.
TEST(CrossEntropy, FusedKernelMatchesFloat64FormulaAndGradient) {
  at::manual_seed(4);
  const int64_t rows = 37, vocab = 53;
  const auto logits64 = 3.0 * at::randn({rows, vocab}, at::kDouble);
  auto targets = at::randint(vocab, {rows}, at::kLong);
  targets.index_put_({at::arange(0, rows, 5)}, -100);
  const auto ref_in = logits64.clone().requires_grad_(true);
  const auto valid = targets != -100;
  const auto picked = -ref_in.log_softmax(-1).gather(1, targets.clamp_min(0).unsqueeze(1));
  const auto ref_loss = picked.squeeze(1).masked_select(valid).mean();
  (2.5 * ref_loss).backward();
  for (const auto type : {at::kFloat, at::kDouble}) {
    const auto logits = logits64.to(type).requires_grad_(true);
    const auto loss = cross_entropy(logits, targets);
    (2.5 * loss).backward();
    const double tolerance = type == at::kFloat ? 1e-6 : 1e-13;
    EXPECT_EQ(loss.scalar_type(), type);
    EXPECT_LT(relative_error(loss, ref_loss), tolerance);
    EXPECT_LT(relative_error(logits.grad(), ref_in.grad()), tolerance);
  }
  auto bad = targets.clone();
  bad[1] = vocab;
  EXPECT_THROW(cross_entropy(logits64, bad), c10::Error);
}

TEST(Rope, RotatesEachPairByPositionTimesFrequency) {
  const int64_t heads = 2, seq = 5, dim = 8;
  const double theta = 500.0;
  const auto x = at::randn({1, heads, seq, dim});
  const auto y = apply_rope(x, theta);
  // Naive: pair (i, i + D/2) is a complex number rotated by pos · theta^(-2i/D).
  auto expected = at::zeros({1, heads, seq, dim}, at::kDouble);
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t p = 0; p < seq; ++p)
      for (int64_t i = 0; i < dim / 2; ++i) {
        const double angle = p * std::pow(theta, -2.0 * i / dim);
        const double a = x[0][h][p][i].item<double>(), b = x[0][h][p][i + dim / 2].item<double>();
        expected[0][h][p][i] = a * std::cos(angle) - b * std::sin(angle);
        expected[0][h][p][i + dim / 2] = b * std::cos(angle) + a * std::sin(angle);
      }
  EXPECT_LT(relative_error(y, expected), 1e-6);
}

// The fused CPU rotation on [B, S, heads, D] against apply_rope (the [B, heads, S, D] formula)
// in float64, its input gradient against autograd of that formula, and fp32 bit for bit
// against the composite (same products and sums in the same order).
TEST(Rope, FusedKernelMatchesFormulaAndGradients) {
  at::manual_seed(3);
  const int64_t batch = 2, seq = 7, heads = 3, dim = 10, first = 5;
  const auto inv_freq =
      1.0 / at::pow(10000.0, at::arange(0, dim, 2, at::kDouble) / static_cast<double>(dim));
  const auto x64 = at::randn({batch, seq, heads, dim}, at::kDouble);
  const auto dy64 = at::randn({batch, seq, heads, dim}, at::kDouble);
  const auto x_ref = x64.clone().requires_grad_(true);
  const auto y_ref = apply_rope(x_ref.transpose(1, 2), inv_freq, first).transpose(1, 2);
  y_ref.backward(dy64);
  const auto x = x64.clone().requires_grad_(true);
  const auto y = rotary_embedding(x, rotary_table(inv_freq, first, seq, x));
  y.backward(dy64);
  EXPECT_LT(relative_error(y, y_ref), 1e-14);
  EXPECT_LT(relative_error(x.grad(), x_ref.grad()), 1e-14);

  const auto x32 = x64.to(at::kFloat);
  const auto table32 = rotary_table(inv_freq, first, seq, x32);
  EXPECT_TRUE(at::equal(rotary_embedding(x32, table32), rotary_embedding_composite(x32, table32)));
}

// H 16, 4 query heads sharing 2 kv heads, weights ~ N(0, 0.3²) from `seed`.
Attention small_gqa_attention(bool bias, uint64_t seed) {
  ModelConfig c;
  c.hidden_size = 16;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.qkv_bias = bias;
  c.rope_theta = 10000.0;
  Attention attn(c);
  at::manual_seed(seed);
  at::NoGradGuard no_grad;
  for (auto& p : attn->parameters()) p.normal_(0, 0.3);
  return attn;
}

TEST(Attention, CausalGqaMatchesNaiveFloat64) {
  for (const bool bias : {false, true}) {
    auto attn = small_gqa_attention(bias, 7);
    const int64_t batch = 2, seq = 6, hd = 4;
    const auto x = at::randn({batch, seq, 16});
    const auto y = attn->forward(x);

    const auto x64 = x.to(at::kDouble);
    auto proj = [&](torch::nn::Linear& l) {
      auto out = at::matmul(x64, l->weight.to(at::kDouble).t());
      if (bias) out = out + l->bias.to(at::kDouble);
      return out;
    };
    const auto q =
        apply_rope(proj(attn->q_proj).view({batch, seq, 4, hd}).transpose(1, 2), 10000.0);
    const auto k =
        apply_rope(proj(attn->k_proj).view({batch, seq, 2, hd}).transpose(1, 2), 10000.0);
    const auto v = proj(attn->v_proj).view({batch, seq, 2, hd}).transpose(1, 2);
    auto heads_out = at::zeros({batch, 4, seq, hd}, at::kDouble);
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t h = 0; h < 4; ++h) {
        const int64_t kvh = h / 2;  // GQA: two query heads share a kv head
        for (int64_t i = 0; i < seq; ++i) {
          std::vector<double> w;
          double max_w = -1e300;
          for (int64_t j = 0; j <= i; ++j) {
            w.push_back((q[b][h][i] * k[b][kvh][j]).sum().item<double>() / std::sqrt(hd));
            max_w = std::max(max_w, w.back());
          }
          double z = 0;
          for (auto& value : w) z += (value = std::exp(value - max_w));
          auto acc = at::zeros({hd}, at::kDouble);
          for (int64_t j = 0; j <= i; ++j) acc = acc + (w[j] / z) * v[b][kvh][j];
          heads_out[b][h][i] = acc;
        }
      }
    const auto merged = heads_out.transpose(1, 2).reshape({batch, seq, 16});
    const auto expected = at::matmul(merged, attn->o_proj->weight.to(at::kDouble).t());
    EXPECT_LT(relative_error(y, expected), 1e-5) << "bias " << bias;
  }
}

// Gradients of the attention layer (fused q/k/v projection, fused RoPE, SDPA with shared kv
// heads) in float64 against autograd of the unfused formula: separate projections,
// apply_rope, repeated kv heads, explicit causal softmax.
TEST(Attention, GradientsMatchUnfusedFloat64) {
  for (const bool bias : {false, true}) {
    auto attn = small_gqa_attention(bias, 8);
    attn->to(at::kDouble);
    const int64_t batch = 2, seq = 6, hd = 4;
    const auto x = at::randn({batch, seq, 16}, at::kDouble).requires_grad_(true);
    const auto dy = at::randn({batch, seq, 16}, at::kDouble);
    attn->forward(x).backward(dy);
    std::vector<at::Tensor> grads{x.grad()};
    for (const auto& p : attn->parameters()) grads.push_back(p.grad());

    const auto x_ref = x.detach().clone().requires_grad_(true);
    std::vector<at::Tensor> params;
    for (const auto& p : attn->parameters()) params.push_back(p.detach().clone().requires_grad_());
    // parameters() order: q, (q bias), k, (k bias), v, (v bias), o
    const int64_t stride = bias ? 2 : 1;
    const auto proj = [&](int64_t index, int64_t heads) {
      const auto& w = params[index * stride];
      auto out = at::matmul(x_ref, w.t());
      if (bias) out = out + params[index * stride + 1];
      return out.view({batch, seq, heads, hd}).transpose(1, 2);
    };
    const auto q = apply_rope(proj(0, 4), 10000.0);
    const auto k = apply_rope(proj(1, 2), 10000.0).repeat_interleave(2, 1);
    const auto v = proj(2, 2).repeat_interleave(2, 1);
    const auto causal = at::ones({seq, seq}, at::kBool).triu(1);
    const auto scores = at::matmul(q, k.transpose(2, 3)) / std::sqrt(static_cast<double>(hd));
    const auto heads_out = at::matmul(scores.masked_fill(causal, -INFINITY).softmax(-1), v);
    const auto merged = heads_out.transpose(1, 2).reshape({batch, seq, 16});
    at::matmul(merged, params.back().t()).backward(dy);
    EXPECT_LT(relative_error(grads[0], x_ref.grad()), 1e-12) << "bias " << bias;
    for (size_t i = 0; i < params.size(); ++i)
      EXPECT_LT(relative_error(grads[i + 1], params[i].grad()), 1e-12) << "bias " << bias << i;
  }
}

TEST(SwiGLU, FeedForwardMatchesFormula) {
  moe::FeedForward ffn(4, 7);
  at::manual_seed(3);
  {
    at::NoGradGuard no_grad;
    for (auto& p : ffn->parameters()) p.normal_();
  }
  const auto x = at::randn({5, 4});
  const auto x64 = x.to(at::kDouble);
  const auto g = at::matmul(x64, ffn->w_gate.to(at::kDouble).t());
  const auto u = at::matmul(x64, ffn->w_up.to(at::kDouble).t());
  const auto expected = at::matmul(g / (1 + at::exp(-g)) * u, ffn->w_down.to(at::kDouble).t());
  EXPECT_LT(relative_error(ffn->forward(x), expected), 1e-6);
}

// CPU fp32 takes the routed experts' kernel (one expert, unit gates, rows in blocks of 2 048):
// output and every gradient against the float64 module (the composite path), over 3 blocks.
TEST(SwiGLU, FeedForwardGradientsMatchFloat64AcrossRowBlocks) {
  moe::FeedForward ffn(24, 40);
  at::manual_seed(4);
  {
    at::NoGradGuard no_grad;
    for (auto& p : ffn->parameters()) p.normal_(0, 0.3);
  }
  moe::FeedForward reference(24, 40);
  {
    at::NoGradGuard no_grad;
    reference->to(at::kDouble);
    for (size_t i = 0; i < ffn->parameters().size(); ++i)
      reference->parameters()[i].copy_(ffn->parameters()[i]);
  }
  const auto x = at::randn({3, 1500, 24}).requires_grad_();
  const auto x64 = x.detach().to(at::kDouble).requires_grad_();
  const auto dy = at::randn({3, 1500, 24});
  const auto y = ffn->forward(x);
  y.backward(dy);
  const auto y64 = reference->forward(x64);
  y64.backward(dy.to(at::kDouble));
  EXPECT_LT(relative_error(y, y64), 1e-6);
  EXPECT_LT(relative_error(x.grad(), x64.grad()), 1e-6);
  for (size_t i = 0; i < ffn->parameters().size(); ++i)
    EXPECT_LT(relative_error(ffn->parameters()[i].grad(), reference->parameters()[i].grad()), 1e-6)
        << "parameter " << i;
}

TEST(Model, ForwardShapesAndMoePlacement) {
  Config config;
  config.model.vocab_size = 32;
  config.model.hidden_size = 16;
  config.model.num_layers = 4;
  config.model.num_heads = 2;
  config.model.num_kv_heads = 1;
  config.model.ffn_size = 24;
  config.moe.num_experts = 4;
  config.moe.top_k = 2;
  config.moe.expert_ffn_size = 8;
  config.moe.first_k_dense = 1;
  config.moe.layer_freq = 2;
  auto groups = parallel::make_single_process_groups();
  DecoderLM model(config, *groups.ep);
  initialize_parameters(*model, config, 1);
  EXPECT_EQ(model->moe_layers().size(), 2u);  // blocks 1 and 3
  const auto out = model->forward(at::randint(32, {2, 5}, at::kLong));
  EXPECT_EQ(out.logits.sizes(), (std::vector<int64_t>{2, 5, 32}));
  bool found_expert = false;
  for (const auto& p : model->named_parameters()) {
    if (p.key() == "layers.1.mlp.experts.w_gate") found_expert = true;
    EXPECT_NE(p.key(), "layers.0.mlp.experts.w_gate");
  }
  EXPECT_TRUE(found_expert);
  // Same seed, same weights; a different seed, different weights.
  DecoderLM again(config, *groups.ep);
  initialize_parameters(*again, config, 1);
  EXPECT_TRUE(at::equal(model->embed->weight, again->embed->weight));
  initialize_parameters(*again, config, 2);
  EXPECT_FALSE(at::equal(model->embed->weight, again->embed->weight));
}

// The small model of the FLOP hand counts: H 8, 2 heads of 4 (1 kv head), vocab 16, 2 blocks,
// dense FFN 12; block 0 dense, block 1 MoE with 4 experts top-2 of ffn 6 plus one shared expert,
// untied head.
Config flop_test_config() {
  Config c;
  c.model.vocab_size = 16;
  c.model.hidden_size = 8;
  c.model.num_layers = 2;
  c.model.num_heads = 2;
  c.model.num_kv_heads = 1;
  c.model.ffn_size = 12;
  c.moe.num_experts = 4;
  c.moe.top_k = 2;
  c.moe.expert_ffn_size = 6;
  c.moe.num_shared_experts = 1;
  c.moe.first_k_dense = 1;
  return c;
}

int64_t real_parameter_count(const Config& c) {
  const auto self = parallel::make_single_process_groups();
  DecoderLM model(c, *self.ep);
  int64_t parameters = 0;
  for (const auto& p : model->parameters()) parameters += p.numel();
  return parameters;
}

// MoE-aware FLOPs against a hand count (flop_test_config):
//   attention 8·8 + 2·8·4 + 8·8 = 192; dense SwiGLU 3·8·12 = 288; router 8·4 = 32;
//   one expert 3·8·6 = 144; active = (192 + 288) + (192 + 32 + 2·144 + 144) + head 16·8 = 1264;
//   total = 480 + 16 + (192 + 32 + 4·144 + 144) + 16 + embed 128 + norm 8 + head 128 = 1720;
//   forward at S = 10: 2·1264 + 2 layers · 2·10·8 = 2848 per token; training 3× = 8544.
TEST(Flops, MoeAwareCountMatchesHandCount) {
  auto c = flop_test_config();
  const auto count = count_flops(c, 10);
  EXPECT_EQ(count.active_params, 1264);
  EXPECT_EQ(count.total_params, 1720);
  EXPECT_DOUBLE_EQ(count.forward_per_token, 2848.0);
  EXPECT_DOUBLE_EQ(count.training_per_token, 8544.0);
  EXPECT_DOUBLE_EQ(count.recompute_per_token, 0.0);  // nothing recomputed
  EXPECT_DOUBLE_EQ(count.hardware_per_token, 8544.0);
  // top_k counts k experts, not 1 and not E (the Megatron-DeepSpeed miscount of top-k > 1).
  c.moe.top_k = 1;
  EXPECT_EQ(count_flops(c, 10).active_params, 1264 - 144);
  c.moe.top_k = 4;
  EXPECT_EQ(count_flops(c, 10).active_params, 1264 + 2 * 144);
  // The total is the model's real parameter count.
  c.moe.top_k = 2;
  EXPECT_EQ(count.total_params, real_parameter_count(c));
}

// Dense: both blocks dense (first_k_dense = num_layers).
//   active = 2·(192 + 288) + head 128 = 1088; total = 2·(480 + 16) + 128 + 8 + 128 = 1256;
//   forward at S = 10: 2·1088 + 2·160 = 2496; training 7488.
TEST(Flops, DenseCountMatchesHandCount) {
  auto c = flop_test_config();
  c.moe.first_k_dense = 2;
  const auto count = count_flops(c, 10);
  EXPECT_EQ(count.active_params, 1088);
  EXPECT_EQ(count.total_params, 1256);
  EXPECT_DOUBLE_EQ(count.forward_per_token, 2496.0);
  EXPECT_DOUBLE_EQ(count.training_per_token, 7488.0);
  EXPECT_EQ(count.total_params, real_parameter_count(c));
}

// Fine-grained experts with shared experts, every block MoE, tied embeddings: 16 experts of
// ffn 2, top-4, 2 shared experts of ffn 4.
//   router 8·16 = 128; one expert 3·8·2 = 48; shared 2·3·8·4 = 192;
//   MLP active 128 + 4·48 + 192 = 512, MLP total 128 + 16·48 + 192 = 1088;
//   active = 2·(192 + 512) + head 128 = 1536; total = 2·(192 + 1088 + 16) + embed 128 + 8 = 2728;
//   forward at S = 10: 2·1536 + 2·160 = 3392; training 10176.
TEST(Flops, FineGrainedSharedCountMatchesHandCount) {
  auto c = flop_test_config();
  c.moe.first_k_dense = 0;
  c.moe.num_experts = 16;
  c.moe.top_k = 4;
  c.moe.expert_ffn_size = 2;
  c.moe.num_shared_experts = 2;
  c.moe.shared_expert_ffn_size = 4;
  c.model.tie_embeddings = true;
  const auto count = count_flops(c, 10);
  EXPECT_EQ(count.active_params, 1536);
  EXPECT_EQ(count.total_params, 2728);
  EXPECT_DOUBLE_EQ(count.forward_per_token, 3392.0);
  EXPECT_DOUBLE_EQ(count.training_per_token, 10176.0);
  EXPECT_EQ(count.total_params, real_parameter_count(c));
}

// Recompute adds hardware FLOPs, never model FLOPs (flop_test_config, S = 10):
//   attention forward 2·192 + core 160 = 544 a block; dense MLP 2·288 = 576;
//   MoE MLP 2·(32 + 2·144 + 144) = 928; moe_act: the 2 slots' down GEMMs 2·(2·8·6) = 192;
//   block = (544 + 576) + (544 + 928) = 2592; all four nest: 2592 + 2·544 + 928 + 192 = 4800;
//   the global-batch aux loss's routing pre-pass is one more whole forward, 2848.
TEST(Flops, RecomputeCountsAsHardwareFlopsOnly) {
  const auto recomputed = [](RecomputeConfig recompute, bool global_aux = false) {
    auto c = flop_test_config();
    c.train.recompute = recompute;
    if (global_aux) {
      c.moe.balancing.aux_loss.coeff = 0.01;
      c.moe.balancing.aux_loss.scope = moe::AuxLossScope::kGlobalBatch;
    }
    const auto count = count_flops(c, 10);
    EXPECT_DOUBLE_EQ(count.training_per_token, 8544.0);
    EXPECT_DOUBLE_EQ(count.hardware_per_token, 8544.0 + count.recompute_per_token);
    return count.recompute_per_token;
  };
  EXPECT_DOUBLE_EQ(recomputed({.attention = true}), 1088.0);
  EXPECT_DOUBLE_EQ(recomputed({.moe = true}), 928.0);
  EXPECT_DOUBLE_EQ(recomputed({.moe_act = true}), 192.0);
  EXPECT_DOUBLE_EQ(recomputed({.block = true}), 2592.0);
  EXPECT_DOUBLE_EQ(recomputed({.moe_act = true, .moe = true, .attention = true, .block = true}),
                   4800.0);
  EXPECT_DOUBLE_EQ(recomputed({}, /*global_aux=*/true), 2848.0);
}

// Load statistics against hand values; percentiles as numpy.percentile's default (linear).
TEST(LoadStatistics, SpreadAndPercentilesMatchHandValues) {
  // {2, 4, 6, 8}: mean 5, variance (9 + 1 + 1 + 9) / 4 = 5, CV √5 / 5.
  const auto spread = load_spread({2, 4, 6, 8});
  EXPECT_DOUBLE_EQ(spread.min, 2.0);
  EXPECT_DOUBLE_EQ(spread.max, 8.0);
  EXPECT_NEAR(spread.cv, std::sqrt(5.0) / 5.0, 1e-12);
  EXPECT_DOUBLE_EQ(load_spread({0, 0, 0}).cv, 0.0);  // nothing routed: no spread, no NaN
  EXPECT_DOUBLE_EQ(load_spread({7, 7}).cv, 0.0);
  // Sorted {1, 2, 3, 4}: p50 at rank 1.5 = 2.5, p90 at rank 2.7 = 3.7.
  EXPECT_DOUBLE_EQ(percentile({4, 1, 3, 2}, 50), 2.5);
  EXPECT_NEAR(percentile({4, 1, 3, 2}, 90), 3.7, 1e-12);
  EXPECT_DOUBLE_EQ(percentile({4, 1, 3, 2}, 0), 1.0);
  EXPECT_DOUBLE_EQ(percentile({4, 1, 3, 2}, 100), 4.0);
  EXPECT_DOUBLE_EQ(percentile({0.7}, 90), 0.7);
  EXPECT_DOUBLE_EQ(percentile({}, 50), 0.0);
}

// Across layers: MaxVio {0.1, 0.5, 0.3} → p50 0.3, p90 0.3 + 0.8·0.2 = 0.46; CV {0.2, 0.4, 0.6}
// → p50 0.4, p90 0.56, max 0.6; dropped and null fractions averaged; the largest bias.
TEST(LoadStatistics, AcrossLayers) {
  StepMetrics m;
  const double max_vio[] = {0.1, 0.5, 0.3}, cv[] = {0.2, 0.4, 0.6}, dropped[] = {0, 0.3, 0.3},
               null_frac[] = {0.1, 0.2, 0.3}, bias[] = {0.01, 0.05, 0.02};
  for (int i = 0; i < 3; ++i) {
    MoeLayerMetrics layer;
    layer.max_vio = max_vio[i];
    layer.load_cv = cv[i];
    layer.dropped_frac = dropped[i];
    layer.null_frac = null_frac[i];
    layer.bias_abs_max = bias[i];
    m.layers.push_back(layer);
  }
  summarize_layers(m);
  EXPECT_NEAR(m.max_vio_p50, 0.3, 1e-12);
  EXPECT_NEAR(m.max_vio_p90, 0.46, 1e-12);
  EXPECT_NEAR(m.load_cv_p50, 0.4, 1e-12);
  EXPECT_NEAR(m.load_cv_p90, 0.56, 1e-12);
  EXPECT_NEAR(m.load_cv_max, 0.6, 1e-12);
  EXPECT_NEAR(m.dropped_frac, 0.2, 1e-12);
  EXPECT_NEAR(m.null_frac, 0.2, 1e-12);
  EXPECT_DOUBLE_EQ(m.bias_abs_max, 0.05);
}

TEST(Optimizer, LearningRateScheduleClosedForm) {
  TrainConfig t;
  t.lr = 1.0;
  t.min_lr = 0.1;
  t.warmup_steps = 10;
  t.steps = 110;
  EXPECT_NEAR(learning_rate(t, 0), 0.1, 1e-12);
  EXPECT_NEAR(learning_rate(t, 9), 1.0, 1e-12);
  EXPECT_NEAR(learning_rate(t, 10), 1.0, 1e-12);
  EXPECT_NEAR(learning_rate(t, 60), 0.1 + 0.45, 1e-12);  // halfway through the cosine
  EXPECT_NEAR(learning_rate(t, 110), 0.1, 1e-12);
}

TEST(Optimizer, AdamWTwoStepsMatchClosedForm) {
  TrainConfig t;
  t.beta1 = 0.9;
  t.beta2 = 0.99;
  t.eps = 1e-8;
  t.weight_decay = 0.1;
  auto w = at::tensor({1.0f, -2.0f}).set_requires_grad(true);
  auto norm = at::tensor({1.0f}).set_requires_grad(true);
  AdamW opt(std::vector<std::pair<std::string, at::Tensor>>{{"layers.0.attn.q_proj.weight", w},
                                                            {"layers.0.attn_norm.weight", norm}},
            t);
  EXPECT_TRUE(AdamW::decays("layers.0.attn.q_proj.weight"));
  EXPECT_FALSE(AdamW::decays("layers.0.attn_norm.weight"));
  EXPECT_FALSE(AdamW::decays("embed.weight"));
  EXPECT_FALSE(AdamW::decays("layers.0.attn.q_proj.bias"));
  const double lr = 0.01;
  std::vector<double> p = {1.0, -2.0}, m(2, 0), v(2, 0);
  double pn = 1.0, mn = 0, vn = 0;
  const std::vector<std::vector<double>> grads = {{0.5, -1.0}, {0.25, 2.0}};
  const std::vector<double> norm_grads = {0.3, -0.7};
  for (int step = 1; step <= 2; ++step) {
    w.mutable_grad() = at::tensor(
        {static_cast<float>(grads[step - 1][0]), static_cast<float>(grads[step - 1][1])});
    norm.mutable_grad() = at::tensor({static_cast<float>(norm_grads[step - 1])});
    opt.step(lr, {w.grad(), norm.grad()});
    const double b1 = 1 - std::pow(0.9, step), b2 = 1 - std::pow(0.99, step);
    for (int i = 0; i < 2; ++i) {
      const double g = grads[step - 1][i];
      m[i] = 0.9 * m[i] + 0.1 * g;
      v[i] = 0.99 * v[i] + 0.01 * g * g;
      p[i] *= 1 - lr * 0.1;
      p[i] -= lr * (m[i] / b1) / (std::sqrt(v[i] / b2) + 1e-8);
    }
    const double g = norm_grads[step - 1];
    mn = 0.9 * mn + 0.1 * g;
    vn = 0.99 * vn + 0.01 * g * g;
    pn -= lr * (mn / b1) / (std::sqrt(vn / b2) + 1e-8);  // no decay on norms
  }
  EXPECT_NEAR(w[0].item<double>(), p[0], 1e-6);
  EXPECT_NEAR(w[1].item<double>(), p[1], 1e-6);
  EXPECT_NEAR(norm[0].item<double>(), pn, 1e-6);
}

// bf16 parameters: the fp32 master takes exactly the fp32 update, the parameter is the master
// rounded to bf16, and a small update that bf16 cannot represent is not lost (it accumulates in
// the master until the bf16 value moves).
TEST(Optimizer, Bf16ParameterKeepsFp32Master) {
  TrainConfig t;
  t.weight_decay = 0.0;
  const auto start = at::tensor({1.0f, -2.0f, 0.5f});
  auto fp32 = start.clone().set_requires_grad(true);
  auto bf16 = start.to(at::kBFloat16).set_requires_grad(true);
  AdamW reference(std::vector<std::pair<std::string, at::Tensor>>{{"layers.0.w", fp32}}, t);
  AdamW mixed(std::vector<ParameterToOptimize>{{"layers.0.w", bf16, nullptr}}, t);
  ASSERT_EQ(mixed.slots()[0].master.scalar_type(), at::kFloat);
  const auto grad = at::tensor({0.5f, -1.0f, 2.0f});
  const double lr = 1e-4;  // 1e-4 per step: far below bf16's spacing near 1 (2^-7)
  for (int step = 0; step < 30; ++step) {
    reference.step(lr, {grad});
    mixed.step(lr, {grad});
  }
  EXPECT_TRUE(at::equal(mixed.slots()[0].master, fp32.detach()));
  EXPECT_TRUE(at::equal(bf16.detach(), fp32.detach().to(at::kBFloat16)));
  EXPECT_FALSE(at::equal(bf16.detach().to(at::kFloat), start));  // 30 · 1e-4 moved it
}

}  // namespace
}  // namespace moeforge

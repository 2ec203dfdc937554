#include "trainer/model/model.hpp"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/record_function.h>

#include <cmath>
#include <string>

#include "moe/projection.hpp"
#include "parallel/recompute.hpp"
#include "trainer/common/hashing.hpp"
#include "trainer/model/cross_entropy.hpp"
#include "trainer/model/rms_norm.hpp"
#include "trainer/model/rotary.hpp"

namespace moeforge {

RMSNormImpl::RMSNormImpl(int64_t size, double eps) : eps_(eps) {
  weight = register_parameter("weight", at::ones({size}));
}

// The RECORD_USER_SCOPEs name the model's parts in a profile (trainer/step_profiler.hpp).
at::Tensor RMSNormImpl::forward(const at::Tensor& x) {
  RECORD_USER_SCOPE("norm");
  return rms_norm(x, weight, eps_);
}

at::Tensor rope_inverse_frequencies(const ModelConfig& config) {
  const int64_t dim = head_dim_of(config);
  auto inv_freq = 1.0 / at::pow(config.rope_theta,
                                at::arange(0, dim, 2, at::kDouble) / static_cast<double>(dim));
  const auto& scaling = config.rope_scaling;
  if (scaling.type == RopeScalingType::kLinear) return inv_freq / scaling.factor;
  if (scaling.type != RopeScalingType::kLlama3) return inv_freq;
  // Llama 3.1 (transformers' _compute_llama3_parameters): long wavelengths are interpolated by
  // `factor`, short ones kept, the band between blended linearly in 1 / wavelength.
  const auto old_context = static_cast<double>(scaling.original_max_position_embeddings);
  const double low_wavelen = old_context / scaling.low_freq_factor;
  const double high_wavelen = old_context / scaling.high_freq_factor;
  const auto wavelen = 2.0 * M_PI / inv_freq;
  auto scaled = at::where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq);
  const auto smooth = (old_context / wavelen - scaling.low_freq_factor) /
                      (scaling.high_freq_factor - scaling.low_freq_factor);
  const auto blended = (1.0 - smooth) * scaled / scaling.factor + smooth * scaled;
  const auto medium =
      at::logical_not(wavelen < high_wavelen).logical_and(at::logical_not(wavelen > low_wavelen));
  return at::where(medium, blended, scaled);
}

at::Tensor apply_rope(const at::Tensor& x, double theta) {
  const int64_t dim = x.size(3);
  return apply_rope(
      x, 1.0 / at::pow(theta, at::arange(0, dim, 2, at::kDouble) / static_cast<double>(dim)));
}

at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& inv_freq, int64_t first_position) {
  const int64_t seq = x.size(2);
  const int64_t dim = x.size(3);
  const auto positions = at::arange(first_position, first_position + seq, at::kDouble);
  const auto angles = at::outer(positions, inv_freq);  // [S, D/2]
  const auto emb = at::cat({angles, angles}, -1);      // [S, D]
  const auto cos = emb.cos().to(x.options());  // computed in float64 on the host, then moved
  const auto sin = emb.sin().to(x.options());
  const auto first = x.narrow(-1, 0, dim / 2);
  const auto second = x.narrow(-1, dim / 2, dim / 2);
  const auto rotated = at::cat({-second, first}, -1);
  return x * cos + rotated * sin;
}

AttentionImpl::AttentionImpl(const ModelConfig& c)
    : num_heads_(c.num_heads),
      num_kv_heads_(c.num_kv_heads),
      head_dim_(head_dim_of(c)),
      inv_freq_(rope_inverse_frequencies(c)) {
  using torch::nn::LinearOptions;
  q_proj = register_module(
      "q_proj",
      torch::nn::Linear(LinearOptions(c.hidden_size, num_heads_ * head_dim_).bias(c.qkv_bias)));
  k_proj = register_module(
      "k_proj",
      torch::nn::Linear(LinearOptions(c.hidden_size, num_kv_heads_ * head_dim_).bias(c.qkv_bias)));
  v_proj = register_module(
      "v_proj",
      torch::nn::Linear(LinearOptions(c.hidden_size, num_kv_heads_ * head_dim_).bias(c.qkv_bias)));
  o_proj = register_module(
      "o_proj",
      torch::nn::Linear(LinearOptions(num_heads_ * head_dim_, c.hidden_size).bias(false)));
  if (c.qk_norm) {
    q_norm = register_module("q_norm", RMSNorm(head_dim_, c.rms_norm_eps));
    k_norm = register_module("k_norm", RMSNorm(head_dim_, c.rms_norm_eps));
  }
}

// q, k, v as [B, S, heads, D] views of one GEMM against the three weights concatenated (one
// pass over x instead of three, one input gradient instead of three summed).
std::array<at::Tensor, 3> AttentionImpl::project(const at::Tensor& x) const {
  const int64_t batch = x.size(0), seq = x.size(1);
  const int64_t q_size = num_heads_ * head_dim_, kv_size = num_kv_heads_ * head_dim_;
  const auto weight = at::cat({q_proj->weight, k_proj->weight, v_proj->weight});
  const auto bias =
      q_proj->bias.defined() ? at::cat({q_proj->bias, k_proj->bias, v_proj->bias}) : at::Tensor();
  const auto qkv =
      moe::projection(x, weight, bias).split_with_sizes({q_size, kv_size, kv_size}, -1);
  return {qkv[0].view({batch, seq, num_heads_, head_dim_}),
          qkv[1].view({batch, seq, num_kv_heads_, head_dim_}),
          qkv[2].view({batch, seq, num_kv_heads_, head_dim_})};
}

const RotaryTable& AttentionImpl::rotary(int64_t first_position, int64_t count,
                                         const at::Tensor& like) {
  const bool same = rotary_.positions() == count && rotary_.first_position == first_position &&
                    rotary_.cos.options().dtype() == like.options().dtype() &&
                    rotary_.cos.device() == like.device();
  if (!same) rotary_ = rotary_table(inv_freq_, first_position, count, like);
  return rotary_;
}

at::Tensor AttentionImpl::forward(const at::Tensor& x, AttentionCache* cache) {
  RECORD_USER_SCOPE("attention");
  const int64_t batch = x.size(0), seq = x.size(1);
  const int64_t cached = cache ? cache->positions() : 0;
  auto [q, k, v] = project(x);  // [B, S, heads, D]
  if (q_norm) {                 // per head, over the head dimension (Qwen3)
    q = q_norm->forward(q);
    k = k_norm->forward(k);
  }
  const auto& table = rotary(cached, seq, q);
  // -> [B, heads, S, D]
  q = rotary_embedding(q, table).transpose(1, 2);
  k = rotary_embedding(k, table).transpose(1, 2);
  v = v.transpose(1, 2);
  if (cache) {
    if (cached > 0) {
      k = at::cat({cache->keys, k}, 2);
      v = at::cat({cache->values, v}, 2);
    }
    cache->keys = k;
    cache->values = v;
  }
  // Grouped-query attention: SDPA shares each kv head among its query heads itself, without
  // the repeated copies of k and v (and their summed gradients).
  const bool grouped = num_kv_heads_ != num_heads_;
  at::Tensor attended;
  if (cached == 0) {
    attended = at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/true, std::nullopt,
                                                grouped);
  } else {  // query i (position cached + i) sees keys 0 .. cached + i
    const auto query_pos = at::arange(cached, cached + seq, x.options().dtype(at::kLong));
    const auto key_pos = at::arange(cached + seq, x.options().dtype(at::kLong));
    const auto visible = key_pos.unsqueeze(0) <= query_pos.unsqueeze(1);  // [S, cached + S]
    attended = at::scaled_dot_product_attention(q, k, v, visible, 0.0, /*is_causal=*/false,
                                                std::nullopt, grouped);
  }
  return moe::projection(attended.transpose(1, 2).reshape({batch, seq, num_heads_ * head_dim_}),
                         o_proj->weight);
}

DecoderBlockImpl::DecoderBlockImpl(const Config& config, int64_t index, parallel::Communicator& ep)
    : recompute_(config.train.recompute) {
  const auto& m = config.model;
  attn_norm = register_module("attn_norm", RMSNorm(m.hidden_size, m.rms_norm_eps));
  attn = register_module("attn", Attention(m));
  mlp_norm = register_module("mlp_norm", RMSNorm(m.hidden_size, m.rms_norm_eps));
  if (is_moe_block(config.moe, index)) {
    moe_mlp = register_module("mlp", moe::MoeLayer(m.hidden_size, config.moe, ep));
    moe_mlp->set_recompute({.layer = recompute_.moe, .expert_activation = recompute_.moe_act});
  } else {
    dense_mlp = register_module("mlp", moe::FeedForward(m.hidden_size, m.ffn_size));
  }
}

at::Tensor DecoderBlockImpl::forward(const at::Tensor& x, const moe::RoutingInputs& routing,
                                     LmOutput& out, AttentionCache* cache) {
  auto result = recompute_.block && !cache ? forward_recomputed(x, routing)
                                           : forward_stored(x, routing, cache);
  auto h = result.h;
  add_to(std::move(result), out);
  return h;
}

void DecoderBlockImpl::add_to(Result result, LmOutput& out) const {
  if (!moe_mlp) return;
  out.aux_loss = out.aux_loss + result.aux_loss;
  out.z_loss = out.z_loss + result.z_loss;
  out.routing.push_back(std::move(result.counters));
}

DecoderBlockImpl::InFlight DecoderBlockImpl::begin(const at::Tensor& x,
                                                   const moe::RoutingInputs& routing,
                                                   LmOutput& out) {
  if (moe_mlp && !recompute_.block) return begin_moe(x, routing);
  return {forward(x, routing, out), nullptr, 0, 0};
}

void DecoderBlockImpl::advance(InFlight& flight) {
  if (flight.moe) moe_mlp->advance(*flight.moe);
}

at::Tensor DecoderBlockImpl::end(InFlight& flight, LmOutput& out) {
  if (!flight.moe) return flight.h;
  auto result = end_moe(flight);
  auto h = result.h;
  add_to(std::move(result), out);
  return h;
}

DecoderBlockImpl::Result DecoderBlockImpl::forward_stored(const at::Tensor& x,
                                                          const moe::RoutingInputs& routing,
                                                          AttentionCache* cache) {
  if (moe_mlp) {
    auto flight = begin_moe(x, routing, cache);
    return end_moe(flight);
  }
  const auto h = with_attention(x, cache);
  RECORD_USER_SCOPE("dense mlp");
  return Result::dense(h + dense_mlp->forward(mlp_norm->forward(h)));
}

// x + attention(attn_norm(x)): the residual stream after the block's attention.
at::Tensor DecoderBlockImpl::with_attention(const at::Tensor& x, AttentionCache* cache) {
  const auto normed = attn_norm->forward(x);
  return x + (cache ? attn->forward(normed, cache) : attention(normed));
}

// Attention, then the MoE layer up to its started dispatch.
DecoderBlockImpl::InFlight DecoderBlockImpl::begin_moe(const at::Tensor& x,
                                                       const moe::RoutingInputs& routing,
                                                       AttentionCache* cache) {
  auto h = with_attention(x, cache);
  const auto normed = mlp_norm->forward(h);
  RECORD_USER_SCOPE("moe");
  const int64_t batch = normed.size(0), seq = normed.size(1), hidden = normed.size(2);
  auto moe = moe_mlp->begin(normed.reshape({batch * seq, hidden}), seq, routing);  // [T, H]
  return {std::move(h), std::move(moe), batch, seq};
}

DecoderBlockImpl::Result DecoderBlockImpl::end_moe(InFlight& flight) {
  auto moe_out = moe_mlp->end(*flight.moe);
  flight.moe.reset();
  return {flight.h + moe_out.y.view({flight.batch, flight.seq, -1}), moe_out.aux_loss,
          moe_out.z_loss, std::move(moe_out.counters)};
}

// The region's outputs are the block's differentiable results; the routing counters (no
// gradient) come from the forward through `counters`. A MoE layer inside replays the forward's
// counts exchange when recomputed (parallel::replayed_exchange).
DecoderBlockImpl::Result DecoderBlockImpl::forward_recomputed(const at::Tensor& x,
                                                              const moe::RoutingInputs& routing) {
  auto counters = std::make_shared<moe::RoutingCounters>();
  const auto region = [this, routing, counters](const std::vector<at::Tensor>& in) {
    auto result = forward_stored(in[0], routing);
    if (!moe_mlp) return std::vector<at::Tensor>{result.h};
    *counters = std::move(result.counters);
    return std::vector<at::Tensor>{result.h, result.aux_loss, result.z_loss};
  };
  const auto outputs = parallel::recompute_in_backward(region, {x}, parameters());
  if (!moe_mlp) return Result::dense(outputs[0]);
  return {outputs[0], outputs[1], outputs[2], *counters};
}

at::Tensor DecoderBlockImpl::attention(const at::Tensor& normed) {
  if (!recompute_.attention) return attn->forward(normed);
  const parallel::Region region = [attn = attn.ptr()](const std::vector<at::Tensor>& in) {
    return std::vector<at::Tensor>{attn->forward(in[0])};
  };
  return parallel::recompute_in_backward(region, {normed}, attn->parameters())[0];
}

DecoderLMImpl::DecoderLMImpl(const Config& config, parallel::Communicator& ep) {
  const auto& m = config.model;
  embed = register_module("embed", torch::nn::Embedding(m.vocab_size, m.hidden_size));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < m.num_layers; ++i) layers->push_back(DecoderBlock(config, i, ep));
  norm = register_module("norm", RMSNorm(m.hidden_size, m.rms_norm_eps));
  if (!m.tie_embeddings) {
    lm_head = register_module(
        "lm_head",
        torch::nn::Linear(torch::nn::LinearOptions(m.hidden_size, m.vocab_size).bias(false)));
  }
}

namespace {
LmOutput empty_output(const at::Tensor& tokens) {
  LmOutput out;
  const auto scalar = tokens.options().dtype(at::kFloat);
  out.aux_loss = at::zeros({}, scalar);
  out.z_loss = at::zeros({}, scalar);
  return out;
}

const moe::RoutingInputs& routing_of(const std::vector<moe::RoutingInputs>& routing,
                                     const LmOutput& out) {
  static const moe::RoutingInputs defaults;
  const size_t moe_index = out.routing.size();  // MoE blocks seen so far
  return moe_index < routing.size() ? routing[moe_index] : defaults;
}
}  // namespace

at::Tensor DecoderLMImpl::embed_tokens(const at::Tensor& tokens) {
  RECORD_USER_SCOPE("embedding");
  return embed->forward(tokens);  // [B, S, H]
}

void DecoderLMImpl::head(const at::Tensor& h, LmOutput& out) {
  const auto normed = norm->forward(h);
  RECORD_USER_SCOPE("lm head");
  out.logits = moe::projection(normed, lm_head ? lm_head->weight : embed->weight);
  out.logits = out.logits.to(at::promote_types(out.logits.scalar_type(), at::kFloat));
}

LmOutput DecoderLMImpl::forward(const at::Tensor& tokens,
                                const std::vector<moe::RoutingInputs>& routing, KvCache* cache) {
  auto out = empty_output(tokens);
  auto h = embed_tokens(tokens);
  if (cache) cache->layers.resize(layers->size());
  for (size_t block = 0; block < layers->size(); ++block) {
    h = layers[block]->as<DecoderBlockImpl>()->forward(h, routing_of(routing, out), out,
                                                       cache ? &cache->layers[block] : nullptr);
  }
  head(h, out);
  return out;
}

// Per block: micro-batch 0 finishes the previous block's combine and starts this block's
// dispatch, then micro-batch 1 does the same (its attention hides 0's dispatch, and 0's
// previous combine hid behind 1's experts), then both run their experts (each hiding the
// other's exchange). Backward runs the mirror image (parallel/all_to_all.hpp).
std::array<LmOutput, 2> DecoderLMImpl::forward_pair(
    const std::array<at::Tensor, 2>& tokens,
    const std::array<std::vector<moe::RoutingInputs>, 2>& routing) {
  std::array<LmOutput, 2> out{empty_output(tokens[0]), empty_output(tokens[1])};
  std::array<DecoderBlockImpl::InFlight, 2> flight;
  for (int m = 0; m < 2; ++m) flight[m].h = embed_tokens(tokens[m]);
  DecoderBlockImpl* previous = nullptr;
  for (const auto& layer : *layers) {
    auto* block = layer->as<DecoderBlockImpl>();
    for (int m = 0; m < 2; ++m) {
      const auto h = previous ? previous->end(flight[m], out[m]) : flight[m].h;
      flight[m] = block->begin(h, routing_of(routing[m], out[m]), out[m]);
    }
    for (auto& f : flight) block->advance(f);
    previous = block;
  }
  for (int m = 0; m < 2; ++m) {
    const auto h = previous ? previous->end(flight[m], out[m]) : flight[m].h;
    head(h, out[m]);
  }
  return out;
}

std::vector<moe::MoeLayer> DecoderLMImpl::moe_layers() const {
  std::vector<moe::MoeLayer> result;
  for (const auto& layer : *layers) {
    const auto* block = layer->as<DecoderBlockImpl>();
    if (block->moe_mlp) result.push_back(block->moe_mlp);
  }
  return result;
}

int64_t DecoderLMImpl::first_local_expert() const {
  const auto layers = moe_layers();
  return layers.empty() ? 0 : layers.front()->first_local_expert();
}

std::vector<std::pair<std::string, at::Tensor>> named_parameter_list(DecoderLMImpl& model) {
  std::vector<std::pair<std::string, at::Tensor>> result;
  for (const auto& item : model.named_parameters()) result.emplace_back(item.key(), item.value());
  return result;
}

ParameterRole parameter_role(const std::string& name) {
  if (name.find("norm.") != std::string::npos) return ParameterRole::kNorm;
  if (name.size() >= 5 && name.compare(name.size() - 5, 5, ".bias") == 0)
    return ParameterRole::kBias;
  if (name.rfind("embed.", 0) == 0) return ParameterRole::kEmbedding;
  return ParameterRole::kMatrix;
}

bool is_expert_parameter(const std::string& name) {
  return name.find(".mlp.experts.") != std::string::npos;
}

namespace {

uint64_t name_seed(uint64_t seed, const std::string& name) {
  return splitmix64(seed ^ splitmix64(fnv1a(name)));
}

void fill_normal(at::Tensor t, double std, uint64_t seed) {
  auto generator = at::detail::createCPUGenerator(seed);
  t.normal_(0.0, std, generator);
}

}  // namespace

void initialize_parameters(DecoderLMImpl& model, const Config& config, uint64_t seed) {
  at::NoGradGuard no_grad;
  const double std = config.model.init_std;
  const double out_std = std / std::sqrt(2.0 * static_cast<double>(config.model.num_layers));
  for (auto& item : model.named_parameters()) {
    const std::string& name = item.key();
    auto& param = item.value();
    const bool output_proj =
        name.find("o_proj") != std::string::npos || name.find("w_down") != std::string::npos;
    const double scale = output_proj ? out_std : std;
    const auto role = parameter_role(name);
    if (role == ParameterRole::kNorm) {
      param.fill_(1.0);
    } else if (role == ParameterRole::kBias) {
      param.zero_();
    } else if (is_expert_parameter(name)) {
      // layers.L.mlp.experts.w_x [El, ...]: one generator per *global* expert.
      const auto prefix_end = name.rfind('.');
      const std::string prefix = name.substr(0, prefix_end);  // layers.L.mlp.experts
      const std::string leaf = name.substr(prefix_end + 1);   // w_x
      // Every MoE layer on this rank holds the same global expert range.
      const int64_t first_global = model.first_local_expert();
      for (int64_t e = 0; e < param.size(0); ++e) {
        fill_normal(param[e], scale,
                    name_seed(seed, prefix + "." + std::to_string(first_global + e) + "." + leaf));
      }
    } else {
      fill_normal(param, scale, name_seed(seed, name));
    }
  }
}

at::Tensor language_model_loss(const at::Tensor& logits, const at::Tensor& targets) {
  const int64_t vocab = logits.size(-1);
  // At least fp32 (bf16 logits are upcast: the softmax over the vocabulary needs the range).
  const auto type = at::promote_types(logits.scalar_type(), at::kFloat);
  return cross_entropy(logits.reshape({-1, vocab}).to(type), targets.reshape({-1}));
}

}  // namespace moeforge

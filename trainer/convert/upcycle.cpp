#include "trainer/convert/upcycle.hpp"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>

#include <cmath>

#include "trainer/common/hashing.hpp"
#include "trainer/common/user_error.hpp"
#include "trainer/model/model.hpp"

namespace moeforge {
namespace {

void require_same(bool same, const std::string& key, const std::string& moe_value,
                  const std::string& dense_value) {
  if (!same)
    throw UserError(
        fmt::format("upcycle: the MoE config has {} = {} but the dense model has {}; "
                    "they must match (only the FFNs change)",
                    key, moe_value, dense_value));
}

void check_shapes(const ModelConfig& moe, const ModelConfig& dense) {
#define MOEFORGE_SAME(field)                                                            \
  require_same(moe.field == dense.field, "model." #field, fmt::format("{}", moe.field), \
               fmt::format("{}", dense.field))
  MOEFORGE_SAME(vocab_size);
  MOEFORGE_SAME(hidden_size);
  MOEFORGE_SAME(num_layers);
  MOEFORGE_SAME(num_heads);
  MOEFORGE_SAME(num_kv_heads);
  MOEFORGE_SAME(ffn_size);
  MOEFORGE_SAME(qkv_bias);
  MOEFORGE_SAME(tie_embeddings);
  MOEFORGE_SAME(rope_theta);
  MOEFORGE_SAME(rms_norm_eps);
#undef MOEFORGE_SAME
}

at::Generator generator_for(uint64_t seed, int64_t layer, int64_t expert, int64_t salt) {
  return at::make_generator<at::CPUGeneratorImpl>(
      mix_seeds({seed, static_cast<uint64_t>(layer), static_cast<uint64_t>(expert),
                 static_cast<uint64_t>(salt)}));
}

// N(mean(source), std(source)) of `shape`.
at::Tensor like_statistics(const at::Tensor& source, at::IntArrayRef shape, at::Generator& gen) {
  const double mean = source.mean().item<double>(), std = source.std().item<double>();
  return at::empty(shape, at::kFloat).normal_(mean, std, gen);
}

struct DenseFfn {
  at::Tensor gate, up, down;  // [F, H], [F, H], [H, F]
};

}  // namespace

WeightMap upcycle(const Config& dense_config, const WeightMap& dense, const Config& moe_config,
                  const UpcycleOptions& options) {
  check_shapes(moe_config.model, dense_config.model);
  const std::vector<std::string> methods = {"copy", "noise", "drop", "granular"};
  if (std::find(methods.begin(), methods.end(), options.method) == methods.end())
    throw UserError(fmt::format("upcycle: --method '{}': allowed copy | noise | drop | granular",
                                options.method));
  require(options.drop_ratio >= 0 && options.drop_ratio <= 1,
          fmt::format("upcycle: --drop-ratio {} must be in [0, 1]", options.drop_ratio));
  const auto& moe = moe_config.moe;
  const int64_t F = dense_config.model.ffn_size, Fe = moe.expert_ffn_size, E = moe.num_experts;
  const int64_t pool = E + moe.router.num_null_experts;
  const bool granular = options.method == "granular";
  int64_t g = 1;
  if (granular) {
    if (F % Fe != 0 || E % (F / Fe) != 0)
      throw UserError(fmt::format(
          "upcycle granular: model.ffn_size {} must be a multiple of moe.expert_ffn_size {} and "
          "the granularity g = {} must divide moe.num_experts {}",
          F, Fe, Fe > 0 ? F / Fe : 0, E));
    g = F / Fe;
  } else if (Fe != F) {
    throw UserError(fmt::format(
        "upcycle {}: every expert is a copy of the dense FFN, so moe.expert_ffn_size ({}) must "
        "equal model.ffn_size ({}); use --method granular for smaller experts",
        options.method, Fe, F));
  }
  const int64_t shared_size = moe.num_shared_experts * moe::shared_expert_size(moe);
  const bool shared_from_dense = moe.num_shared_experts > 0 && options.shared_from_dense;
  if (shared_from_dense && shared_size != F)
    throw UserError(fmt::format(
        "upcycle: the shared expert ({} × {} = {}) must have the dense FFN's size {} to be "
        "initialised from it (or pass --no-shared-from-dense)",
        moe.num_shared_experts, moe::shared_expert_size(moe), shared_size, F));

  WeightMap out;
  const auto take = [&](const std::string& name) {
    const auto it = dense.find(name);
    if (it == dense.end())
      throw UserError(fmt::format("upcycle: the dense model has no tensor '{}'", name));
    return it->second.to(at::kFloat);
  };
  // Everything but the FFNs of the blocks that become MoE is copied unchanged.
  for (const auto& [name, tensor] : dense) {
    const bool ffn = name.find(".mlp.") != std::string::npos;
    if (!ffn) out[name] = tensor.clone();
  }
  const double scale =
      granular ? std::cbrt(moe.router.normalize_gates ? static_cast<double>(g)
                                                      : static_cast<double>(E * g) / moe.top_k)
               : 1.0;
  for (int64_t i = 0; i < moe_config.model.num_layers; ++i) {
    const std::string prefix = fmt::format("layers.{}.mlp.", i);
    if (!is_moe_block(moe, i)) {
      for (const char* w : {"w_gate", "w_up", "w_down"}) out[prefix + w] = take(prefix + w);
      continue;
    }
    if (is_moe_block(dense_config.moe, i) || !dense.count(prefix + "w_gate"))
      throw UserError(
          fmt::format("upcycle: block {} of the source is not dense (no {}w_gate)", i, prefix));
    const DenseFfn ffn{take(prefix + "w_gate"), take(prefix + "w_up"), take(prefix + "w_down")};
    const double routed_down_scale = shared_from_dense ? 0.5 : 1.0;
    for (int64_t e = 0; e < E; ++e) {
      DenseFfn expert;
      if (granular) {
        const int64_t chunk = e % g;
        expert = {ffn.gate.narrow(0, chunk * Fe, Fe) * scale,
                  ffn.up.narrow(0, chunk * Fe, Fe) * scale,
                  ffn.down.narrow(1, chunk * Fe, Fe) * scale};
      } else {
        expert = {ffn.gate.clone(), ffn.up.clone(), ffn.down.clone()};
      }
      auto gen = generator_for(options.seed, i, e, 1);
      if (options.method == "noise") {
        for (at::Tensor* w : {&expert.gate, &expert.up, &expert.down}) {
          const double std = w->std().item<double>() * options.noise_std;
          *w = *w + at::empty(w->sizes(), at::kFloat).normal_(0.0, std, gen);
        }
      } else if (options.method == "drop") {
        const auto count = static_cast<int64_t>(std::llround(options.drop_ratio * F));
        const auto channels = at::randperm(F, gen, at::kLong).narrow(0, 0, count);
        expert.gate.index_copy_(0, channels,
                                like_statistics(ffn.gate, {count, ffn.gate.size(1)}, gen));
        expert.up.index_copy_(0, channels, like_statistics(ffn.up, {count, ffn.up.size(1)}, gen));
        expert.down.index_copy_(1, channels,
                                like_statistics(ffn.down, {ffn.down.size(0), count}, gen));
      }
      const std::string name = fmt::format("{}experts.{}.", prefix, e);
      out[name + "w_gate"] = expert.gate;
      out[name + "w_up"] = expert.up;
      out[name + "w_down"] = expert.down * routed_down_scale;
    }
    // Router: small random rows; granular experts of one dense copy share a row.
    auto router_gen = generator_for(options.seed, i, -1, 2);
    const int64_t hidden = moe_config.model.hidden_size;
    const int64_t distinct = granular ? E / g : E;
    const auto rows =
        at::empty({distinct, hidden}, at::kFloat).normal_(0.0, options.router_std, router_gen);
    auto router = granular ? rows.repeat_interleave(g, 0) : rows;
    if (pool > E)
      router = at::cat(
          {router,
           at::empty({pool - E, hidden}, at::kFloat).normal_(0.0, options.router_std, router_gen)});
    out[prefix + "router.weight"] = router;
    out[prefix + "router.expert_bias"] = at::zeros({pool}, at::kFloat);
    if (moe.num_shared_experts > 0) {
      if (shared_from_dense) {
        out[prefix + "shared_experts.w_gate"] = ffn.gate.clone();
        out[prefix + "shared_experts.w_up"] = ffn.up.clone();
        out[prefix + "shared_experts.w_down"] = ffn.down * 0.5;
      } else {
        auto shared_gen = generator_for(options.seed, i, -2, 3);
        const double std = moe_config.model.init_std;
        const double out_std =
            std / std::sqrt(2.0 * static_cast<double>(moe_config.model.num_layers));
        out[prefix + "shared_experts.w_gate"] =
            at::empty({shared_size, hidden}, at::kFloat).normal_(0.0, std, shared_gen);
        out[prefix + "shared_experts.w_up"] =
            at::empty({shared_size, hidden}, at::kFloat).normal_(0.0, std, shared_gen);
        out[prefix + "shared_experts.w_down"] =
            at::empty({hidden, shared_size}, at::kFloat).normal_(0.0, out_std, shared_gen);
      }
    }
  }
  return out;
}

}  // namespace moeforge

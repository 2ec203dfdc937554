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

// One upcycling run: the checked plan (method, granularity, shared expert) and the pieces each
// MoE block is built from.
class Upcycler {
 public:
  Upcycler(const Config& dense_config, const WeightMap& dense, const Config& moe_config,
           const UpcycleOptions& options)
      : dense_config_(dense_config),
        dense_(dense),
        config_(moe_config),
        moe_(moe_config.moe),
        options_(options) {
    check_shapes(moe_config.model, dense_config.model);
    method_ = parse_method(options.method);
    require(options.drop_ratio >= 0 && options.drop_ratio <= 1,
            fmt::format("upcycle: --drop-ratio {} must be in [0, 1]", options.drop_ratio));
    plan_granularity();
    plan_shared_expert();
  }

  WeightMap run() const {
    WeightMap out;
    // Everything but the FFNs of the blocks that become MoE is copied unchanged.
    for (const auto& [name, tensor] : dense_)
      if (name.find(".mlp.") == std::string::npos) out[name] = tensor.clone();
    for (int64_t i = 0; i < config_.model.num_layers; ++i) {
      const std::string prefix = fmt::format("layers.{}.mlp.", i);
      if (!is_moe_block(moe_, i)) {
        for (const char* w : {"w_gate", "w_up", "w_down"}) out[prefix + w] = take(prefix + w);
        continue;
      }
      if (is_moe_block(dense_config_.moe, i) || !dense_.count(prefix + "w_gate"))
        throw UserError(
            fmt::format("upcycle: block {} of the source is not dense (no {}w_gate)", i, prefix));
      const DenseFfn ffn{take(prefix + "w_gate"), take(prefix + "w_up"), take(prefix + "w_down")};
      add_experts(ffn, i, prefix, out);
      add_router(i, prefix, out);
      if (moe_.num_shared_experts > 0) add_shared_experts(ffn, i, prefix, out);
    }
    return out;
  }

 private:
  enum class Method { kCopy, kNoise, kDrop, kGranular };

  static Method parse_method(const std::string& name) {
    if (name == "copy") return Method::kCopy;
    if (name == "noise") return Method::kNoise;
    if (name == "drop") return Method::kDrop;
    if (name == "granular") return Method::kGranular;
    throw UserError(
        fmt::format("upcycle: --method '{}': allowed copy | noise | drop | granular", name));
  }

  void plan_granularity() {
    const int64_t F = dense_config_.model.ffn_size, Fe = moe_.expert_ffn_size;
    const int64_t E = moe_.num_experts;
    if (method_ == Method::kGranular) {
      if (F % Fe != 0 || E % (F / Fe) != 0)
        throw UserError(fmt::format(
            "upcycle granular: model.ffn_size {} must be a multiple of moe.expert_ffn_size {} and "
            "the granularity g = {} must divide moe.num_experts {}",
            F, Fe, Fe > 0 ? F / Fe : 0, E));
      granularity_ = F / Fe;
      // Megatron's scale s^(1/3) per matrix (docs in upcycle.hpp).
      scale_ = std::cbrt(moe_.router.normalize_gates
                             ? static_cast<double>(granularity_)
                             : static_cast<double>(E * granularity_) / moe_.top_k);
    } else if (Fe != F) {
      throw UserError(fmt::format(
          "upcycle {}: every expert is a copy of the dense FFN, so moe.expert_ffn_size ({}) must "
          "equal model.ffn_size ({}); use --method granular for smaller experts",
          options_.method, Fe, F));
    }
  }

  void plan_shared_expert() {
    shared_size_ = moe_.num_shared_experts * moe::shared_expert_size(moe_);
    shared_from_dense_ = moe_.num_shared_experts > 0 && options_.shared_from_dense;
    const int64_t F = dense_config_.model.ffn_size;
    if (shared_from_dense_ && shared_size_ != F)
      throw UserError(fmt::format(
          "upcycle: the shared expert ({} × {} = {}) must have the dense FFN's size {} to be "
          "initialised from it (or pass --no-shared-from-dense)",
          moe_.num_shared_experts, moe::shared_expert_size(moe_), shared_size_, F));
  }

  at::Tensor take(const std::string& name) const {
    const auto it = dense_.find(name);
    if (it == dense_.end())
      throw UserError(fmt::format("upcycle: the dense model has no tensor '{}'", name));
    return it->second.to(at::kFloat);
  }

  // Expert e of block `layer` from the dense FFN, by the method.
  DenseFfn expert(const DenseFfn& ffn, int64_t layer, int64_t e) const {
    const int64_t Fe = moe_.expert_ffn_size, F = dense_config_.model.ffn_size;
    DenseFfn expert{ffn.gate.clone(), ffn.up.clone(), ffn.down.clone()};
    if (method_ == Method::kGranular) {
      const int64_t chunk = e % granularity_;
      expert = {ffn.gate.narrow(0, chunk * Fe, Fe) * scale_,
                ffn.up.narrow(0, chunk * Fe, Fe) * scale_,
                ffn.down.narrow(1, chunk * Fe, Fe) * scale_};
    }
    auto gen = generator_for(options_.seed, layer, e, 1);
    if (method_ == Method::kNoise) {
      for (at::Tensor* w : {&expert.gate, &expert.up, &expert.down}) {
        const double std = w->std().item<double>() * options_.noise_std;
        *w = *w + at::empty(w->sizes(), at::kFloat).normal_(0.0, std, gen);
      }
    } else if (method_ == Method::kDrop) {
      const auto count = static_cast<int64_t>(std::llround(options_.drop_ratio * F));
      const auto channels = at::randperm(F, gen, at::kLong).narrow(0, 0, count);
      expert.gate.index_copy_(0, channels,
                              like_statistics(ffn.gate, {count, ffn.gate.size(1)}, gen));
      expert.up.index_copy_(0, channels, like_statistics(ffn.up, {count, ffn.up.size(1)}, gen));
      expert.down.index_copy_(1, channels,
                              like_statistics(ffn.down, {ffn.down.size(0), count}, gen));
    }
    return expert;
  }

  void add_experts(const DenseFfn& ffn, int64_t layer, const std::string& prefix,
                   WeightMap& out) const {
    const double routed_down_scale = shared_from_dense_ ? 0.5 : 1.0;
    for (int64_t e = 0; e < moe_.num_experts; ++e) {
      const auto weights = expert(ffn, layer, e);
      const std::string name = fmt::format("{}experts.{}.", prefix, e);
      out[name + "w_gate"] = weights.gate;
      out[name + "w_up"] = weights.up;
      out[name + "w_down"] = weights.down * routed_down_scale;
    }
  }

  // Router: small random rows; granular experts of one dense copy share a row.
  void add_router(int64_t layer, const std::string& prefix, WeightMap& out) const {
    const int64_t E = moe_.num_experts, pool = E + moe_.router.num_null_experts;
    const int64_t hidden = config_.model.hidden_size;
    auto gen = generator_for(options_.seed, layer, -1, 2);
    const auto rows =
        at::empty({E / granularity_, hidden}, at::kFloat).normal_(0.0, options_.router_std, gen);
    auto router = granularity_ > 1 ? rows.repeat_interleave(granularity_, 0) : rows;
    if (pool > E)
      router = at::cat(
          {router,
           at::empty({pool - E, hidden}, at::kFloat).normal_(0.0, options_.router_std, gen)});
    out[prefix + "router.weight"] = router;
    out[prefix + "router.expert_bias"] = at::zeros({pool}, at::kFloat);
  }

  void add_shared_experts(const DenseFfn& ffn, int64_t layer, const std::string& prefix,
                          WeightMap& out) const {
    if (shared_from_dense_) {
      out[prefix + "shared_experts.w_gate"] = ffn.gate.clone();
      out[prefix + "shared_experts.w_up"] = ffn.up.clone();
      out[prefix + "shared_experts.w_down"] = ffn.down * 0.5;
      return;
    }
    auto gen = generator_for(options_.seed, layer, -2, 3);
    const int64_t hidden = config_.model.hidden_size;
    const double std = config_.model.init_std;
    const double out_std = std / std::sqrt(2.0 * static_cast<double>(config_.model.num_layers));
    out[prefix + "shared_experts.w_gate"] =
        at::empty({shared_size_, hidden}, at::kFloat).normal_(0.0, std, gen);
    out[prefix + "shared_experts.w_up"] =
        at::empty({shared_size_, hidden}, at::kFloat).normal_(0.0, std, gen);
    out[prefix + "shared_experts.w_down"] =
        at::empty({hidden, shared_size_}, at::kFloat).normal_(0.0, out_std, gen);
  }

  const Config& dense_config_;
  const WeightMap& dense_;
  const Config& config_;
  const MoeConfig& moe_;
  const UpcycleOptions& options_;
  Method method_ = Method::kCopy;
  int64_t granularity_ = 1;
  double scale_ = 1.0;
  int64_t shared_size_ = 0;
  bool shared_from_dense_ = false;
};

}  // namespace

WeightMap upcycle(const Config& dense_config, const WeightMap& dense, const Config& moe_config,
                  const UpcycleOptions& options) {
  return Upcycler(dense_config, dense, moe_config, options).run();
}

}  // namespace moeforge

#include "trainer/convert/hf_checkpoint.hpp"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "trainer/checkpoint/safetensors.hpp"
#include "trainer/common/file_io.hpp"
#include "trainer/common/user_error.hpp"
#include "trainer/model/model.hpp"

namespace fs = std::filesystem;
using nlohmann::json;

namespace moeforge::hf {
namespace {

const std::vector<std::string> kDenseTypes = {"llama", "mistral", "qwen2", "qwen3"};
const std::vector<std::string> kMoeTypes = {"mixtral", "qwen2_moe", "qwen3_moe"};

bool contains(const std::vector<std::string>& list, const std::string& value) {
  return std::find(list.begin(), list.end(), value) != list.end();
}

// config.json with typed, located errors.
class HfConfig {
 public:
  explicit HfConfig(const std::string& path) : path_(path) {
    const auto text = read_file(path);
    try {
      json_ = json::parse(text);
    } catch (const json::exception& e) {
      throw UserError(fmt::format("{}: not valid JSON: {}", path, e.what()));
    }
    if (!json_.is_object()) throw UserError(fmt::format("{}: not a JSON object", path));
  }
  bool has(const std::string& key) const { return json_.contains(key) && !json_[key].is_null(); }
  const json& raw(const std::string& key) const { return json_.at(key); }

  template <typename T>
  T get(const std::string& key) const {
    if (!has(key)) throw UserError(fmt::format("{}: required key '{}' is missing", path_, key));
    return convert<T>(key, json_.at(key));
  }
  template <typename T>
  T get(const std::string& key, T fallback) const {
    return has(key) ? convert<T>(key, json_.at(key)) : fallback;
  }
  const std::string& path() const { return path_; }

 private:
  template <typename T>
  T convert(const std::string& key, const json& value) const {
    try {
      return value.get<T>();
    } catch (const json::exception&) {
      throw UserError(
          fmt::format("{}: key '{}' has the wrong type ({})", path_, key, value.dump()));
    }
  }
  std::string path_;
  json json_;
};

// (moeforge checkpoint name, Hugging Face name) for every tensor of `config`'s model in
// `family` (llama | mixtral | qwen2_moe naming; mistral and qwen2 use llama names).
std::vector<std::pair<std::string, std::string>> name_pairs(const Config& config,
                                                            const std::string& family) {
  const auto& m = config.model;
  std::vector<std::pair<std::string, std::string>> pairs = {
      {"embed.weight", "model.embed_tokens.weight"}};
  for (int64_t i = 0; i < m.num_layers; ++i) {
    const std::string ours = fmt::format("layers.{}.", i),
                      theirs = fmt::format("model.layers.{}.", i);
    pairs.push_back({ours + "attn_norm.weight", theirs + "input_layernorm.weight"});
    if (m.qk_norm)
      for (const char* norm : {"q_norm", "k_norm"})
        pairs.push_back(
            {ours + "attn." + norm + ".weight", theirs + "self_attn." + norm + ".weight"});
    pairs.push_back({ours + "mlp_norm.weight", theirs + "post_attention_layernorm.weight"});
    for (const char* p : {"q_proj", "k_proj", "v_proj", "o_proj"}) {
      pairs.push_back({ours + "attn." + p + ".weight", theirs + "self_attn." + p + ".weight"});
      if (m.qkv_bias && std::string(p) != "o_proj")
        pairs.push_back({ours + "attn." + p + ".bias", theirs + "self_attn." + p + ".bias"});
    }
    if (!is_moe_block(config.moe, i)) {
      for (const auto& [w, hf] :
           {std::pair{"w_gate", "gate_proj"}, {"w_up", "up_proj"}, {"w_down", "down_proj"}})
        pairs.push_back({ours + "mlp." + w, theirs + "mlp." + hf + ".weight"});
      continue;
    }
    const bool mixtral = family == "mixtral";
    const std::string moe = theirs + (mixtral ? "block_sparse_moe." : "mlp.");
    pairs.push_back({ours + "mlp.router.weight", moe + "gate.weight"});
    for (int64_t e = 0; e < config.moe.num_experts; ++e) {
      const std::string expert = fmt::format("{}mlp.experts.{}.", ours, e);
      const std::string hf_expert = fmt::format("{}experts.{}.", moe, e);
      if (mixtral) {
        pairs.push_back({expert + "w_gate", hf_expert + "w1.weight"});
        pairs.push_back({expert + "w_up", hf_expert + "w3.weight"});
        pairs.push_back({expert + "w_down", hf_expert + "w2.weight"});
      } else {
        pairs.push_back({expert + "w_gate", hf_expert + "gate_proj.weight"});
        pairs.push_back({expert + "w_up", hf_expert + "up_proj.weight"});
        pairs.push_back({expert + "w_down", hf_expert + "down_proj.weight"});
      }
    }
    if (config.moe.num_shared_experts > 0) {
      for (const auto& [w, hf] :
           {std::pair{"w_gate", "gate_proj"}, {"w_up", "up_proj"}, {"w_down", "down_proj"}})
        pairs.push_back(
            {ours + "mlp.shared_experts." + w, moe + "shared_expert." + hf + ".weight"});
    }
  }
  pairs.push_back({"norm.weight", "model.norm.weight"});
  if (!m.tie_embeddings) pairs.push_back({"lm_head.weight", "lm_head.weight"});
  return pairs;
}

std::string family_of(const std::string& model_type) {
  if (contains(kMoeTypes, model_type)) return model_type;
  return "llama";  // llama, mistral, qwen2, qwen3 share the dense tensor names
}

// Finds (first_k_dense, layer_freq) whose MoE-block pattern equals `is_moe`; false if none.
bool layer_pattern(const std::vector<bool>& is_moe, int64_t* first_k_dense, int64_t* layer_freq) {
  const auto layers = static_cast<int64_t>(is_moe.size());
  for (int64_t first = 0; first <= layers; ++first)
    for (int64_t freq = 1; freq <= std::max<int64_t>(1, layers); ++freq) {
      MoeConfig probe;
      probe.first_k_dense = first;
      probe.layer_freq = freq;
      bool same = true;
      for (int64_t i = 0; i < layers && same; ++i) same = is_moe_block(probe, i) == is_moe[i];
      if (same) {
        *first_k_dense = first;
        *layer_freq = freq;
        return true;
      }
    }
  return false;
}

// RoPE scaling from either spelling: `rope_scaling` (transformers ≤ 4) or `rope_parameters`
// (transformers 5); `type` or `rope_type`. Only the types moeforge computes are accepted.
void read_rope_scaling(const HfConfig& c, RopeScalingConfig& scaling) {
  for (const char* key : {"rope_scaling", "rope_parameters"}) {
    if (!c.has(key) || !c.raw(key).is_object()) continue;
    const auto& rope = c.raw(key);
    const std::string type = rope.value("rope_type", rope.value("type", std::string("default")));
    if (type == "default") return;
    const auto number = [&](const char* field, double fallback) {
      return rope.contains(field) && rope[field].is_number() ? rope[field].get<double>() : fallback;
    };
    if (type == "linear") {
      scaling.type = RopeScalingType::kLinear;
    } else if (type == "llama3") {
      scaling.type = RopeScalingType::kLlama3;
      scaling.low_freq_factor = number("low_freq_factor", 1.0);
      scaling.high_freq_factor = number("high_freq_factor", 4.0);
      scaling.original_max_position_embeddings =
          static_cast<int64_t>(number("original_max_position_embeddings", 0));
    } else {
      throw UserError(fmt::format(
          "{}: {}.rope_type '{}' is not supported; moeforge computes default, linear and llama3 "
          "RoPE",
          c.path(), key, type));
    }
    scaling.factor = number("factor", 1.0);
    return;
  }
}

double rope_theta_of(const HfConfig& c) {
  if (c.has("rope_theta")) return c.get<double>("rope_theta");
  if (c.has("rope_parameters")) {  // transformers v5 layout
    const auto& rope = c.raw("rope_parameters");
    if (rope.is_object() && rope.contains("rope_theta")) return rope["rope_theta"].get<double>();
  }
  return 10000.0;
}

void check_supported(const HfConfig& c, const std::string& model_type) {
  const auto fail = [&](const std::string& why) {
    throw UserError(fmt::format("{}: {} (model_type '{}')", c.path(), why, model_type));
  };
  if (c.get<std::string>("hidden_act", "silu") != "silu")
    fail(fmt::format("hidden_act '{}' is not supported; moeforge's FFNs are SwiGLU (silu)",
                     c.get<std::string>("hidden_act")));
  if (c.get<bool>("mlp_bias", false)) fail("mlp_bias is not supported (FFNs have no biases)");
}

}  // namespace

bool is_hf_directory(const std::string& dir) {
  return fs::exists(fs::path(dir) / "config.json");
}

namespace {

// The model section of a moeforge config from an HF config.json (dense part).
void read_model_shape(const HfConfig& c, const std::string& type, Config& config) {
  auto& m = config.model;
  m.vocab_size = c.get<int64_t>("vocab_size");
  m.hidden_size = c.get<int64_t>("hidden_size");
  m.num_layers = c.get<int64_t>("num_hidden_layers");
  m.num_heads = c.get<int64_t>("num_attention_heads");
  m.num_kv_heads = c.get<int64_t>("num_key_value_heads", m.num_heads);
  m.ffn_size = c.get<int64_t>("intermediate_size");
  m.max_seq_len = c.get<int64_t>("max_position_embeddings");
  // Full attention equals sliding-window attention up to the window: cap sequences there.
  if (c.get<bool>("use_sliding_window", type == "mistral" || type == "mixtral") &&
      c.has("sliding_window"))
    m.max_seq_len = std::min(m.max_seq_len, c.get<int64_t>("sliding_window"));
  m.rope_theta = rope_theta_of(c);
  read_rope_scaling(c, m.rope_scaling);
  m.rms_norm_eps = c.get<double>("rms_norm_eps");
  m.tie_embeddings = c.get<bool>("tie_word_embeddings", false);
  m.init_std = c.get<double>("initializer_range", m.init_std);
  const int64_t natural_head_dim = m.hidden_size / std::max<int64_t>(1, m.num_heads);
  const auto head_dim = c.has("head_dim") && !c.raw("head_dim").is_null()
                            ? c.get<int64_t>("head_dim")
                            : natural_head_dim;
  m.head_dim = head_dim == natural_head_dim && m.hidden_size % m.num_heads == 0 ? 0 : head_dim;
  const bool qwen2 = type == "qwen2" || type == "qwen2_moe";
  m.qk_norm = type == "qwen3" || type == "qwen3_moe";
  m.qkv_bias = qwen2 || c.get<bool>("attention_bias", false);
  config.train.seq_len = std::min(config.train.seq_len, m.max_seq_len);
}

// Qwen2-MoE's MoE layers: every decoder_sparse_step-th block except mlp_only_layers.
void read_qwen2_moe_layout(const HfConfig& c, int64_t num_layers, MoeConfig& moe) {
  const auto step = c.get<int64_t>("decoder_sparse_step", 1);
  const auto only_mlp = c.get<std::vector<int64_t>>("mlp_only_layers", {});
  std::vector<bool> is_moe;
  for (int64_t i = 0; i < num_layers; ++i)
    is_moe.push_back(moe.num_experts > 0 && (i + 1) % step == 0 &&
                     std::find(only_mlp.begin(), only_mlp.end(), i) == only_mlp.end());
  if (!layer_pattern(is_moe, &moe.first_k_dense, &moe.layer_freq))
    throw UserError(fmt::format(
        "{}: decoder_sparse_step {} with mlp_only_layers [{}] gives a MoE-layer pattern that "
        "moe.first_k_dense / moe.layer_freq cannot express",
        c.path(), step, fmt::join(only_mlp, ", ")));
}

// The moe section: the HF MoE families' routing, or every block dense.
void read_moe_layout(const HfConfig& c, const std::string& type, Config& config) {
  auto& moe = config.moe;
  if (type == "mixtral") {
    moe.num_experts = c.get<int64_t>("num_local_experts");
    moe.top_k = c.get<int64_t>("num_experts_per_tok");
    moe.expert_ffn_size = config.model.ffn_size;
    moe.num_shared_experts = 0;
    moe.first_k_dense = 0;
    moe.layer_freq = 1;
    moe.router.normalize_gates = true;
  } else if (type == "qwen2_moe" || type == "qwen3_moe") {
    // transformers 5 saves Qwen3-MoE's expert count as num_local_experts.
    moe.num_experts =
        c.has("num_experts") ? c.get<int64_t>("num_experts") : c.get<int64_t>("num_local_experts");
    moe.top_k = c.get<int64_t>("num_experts_per_tok");
    moe.expert_ffn_size = c.get<int64_t>("moe_intermediate_size");
    const auto shared = c.get<int64_t>("shared_expert_intermediate_size", 0);  // Qwen2-MoE only
    moe.num_shared_experts = shared > 0 ? 1 : 0;
    moe.shared_expert_ffn_size = shared;
    moe.router.normalize_gates = c.get<bool>("norm_topk_prob", false);
    read_qwen2_moe_layout(c, config.model.num_layers, moe);
  } else {
    moe.first_k_dense = config.model.num_layers;  // every block dense
    moe.num_shared_experts = 0;
  }
  if (contains(kMoeTypes, type)) {  // HF MoE routing: plain softmax top-k
    moe.router.score = moe::ScoreFunction::kSoftmax;
    moe.router.scaling_factor = 1.0;
    moe.router.num_null_experts = 0;
    moe.router.num_groups = 0;
    moe.router.routing = moe::Routing::kTokenChoice;
  }
}

// Reads tensors of an HF checkpoint, remembering which were used.
class TrackedReader {
 public:
  TrackedReader(const std::string& dir, const std::string& type)
      : reader_(safetensors::ShardedReader::open(dir)), dir_(dir), type_(type) {}
  bool contains(const std::string& name) const { return reader_.contains(name); }
  const std::string& file_of(const std::string& name) const { return reader_.file_of(name); }
  at::Tensor load(const std::string& name) {
    if (!reader_.contains(name))
      throw UserError(
          fmt::format("{}: tensor '{}' is missing (config.json describes a {} model that needs it)",
                      dir_, name, type_));
    used_.insert(name);
    return reader_.load(name, at::kFloat);
  }
  // UserError when a tensor was never used (a checkpoint of another shape or family).
  void check_all_used() const {
    std::vector<std::string> unused;
    for (const auto& name : reader_.names())
      if (!used_.count(name) && name.find("rotary_emb.inv_freq") == std::string::npos)
        unused.push_back(name);
    if (!unused.empty())
      throw UserError(fmt::format(
          "{}: {} tensor(s) are not part of a {} model as config.json describes it, e.g. '{}'",
          dir_, unused.size(), type_, unused.front()));
  }
  // UserError naming `why` when tensor `name` is present and not all zero.
  void require_zero(const std::string& name, const std::string& why) {
    if (load(name).abs().max().item<double>() != 0.0)
      throw UserError(fmt::format("{}: tensor '{}' is non-zero: {}", dir_, name, why));
  }

 private:
  safetensors::ShardedReader reader_;
  std::string dir_, type_;
  std::set<std::string> used_;
};

// Block i's tensors that are not plain name pairs: the zero o_proj bias Llama may carry, the
// router's expert bias, Qwen2-MoE's constant shared-expert gate.
void read_block_extras(TrackedReader& reader, const Config& config, const std::string& type,
                       int64_t i, WeightMap& weights) {
  const std::string theirs = fmt::format("model.layers.{}.", i);
  // Llama's attention_bias also biases o_proj; moeforge has none there, so it must be 0.
  if (reader.contains(theirs + "self_attn.o_proj.bias"))
    reader.require_zero(theirs + "self_attn.o_proj.bias", "moeforge's o_proj has no bias");
  const auto& moe = config.moe;
  if (!is_moe_block(moe, i)) return;
  weights[fmt::format("layers.{}.mlp.router.expert_bias", i)] =
      at::zeros({moe.num_experts}, at::kFloat);
  if (type == "qwen2_moe" && moe.num_shared_experts > 0) {
    // Qwen2-MoE gates its shared expert with sigmoid(x·g). Only g = 0 (a constant 1/2) is
    // representable: fold the 1/2 into the shared expert's down projection.
    reader.require_zero(theirs + "mlp.shared_expert_gate.weight",
                        "a token-dependent shared-expert gate has no moeforge equivalent "
                        "(shared experts are ungated)");
    weights[fmt::format("layers.{}.mlp.shared_experts.w_down", i)].mul_(0.5);
  }
}

}  // namespace

Config read_config(const std::string& dir, const Config& base, std::string* model_type) {
  const HfConfig c((fs::path(dir) / "config.json").string());
  const auto type = c.get<std::string>("model_type");
  if (!contains(kDenseTypes, type) && !contains(kMoeTypes, type))
    throw UserError(fmt::format("{}: model_type '{}' is not supported; allowed: {}, {}", c.path(),
                                type, fmt::join(kDenseTypes, ", "), fmt::join(kMoeTypes, ", ")));
  check_supported(c, type);
  Config config = base;
  read_model_shape(c, type, config);
  read_moe_layout(c, type, config);
  if (model_type) *model_type = type;
  return config;
}

ImportedModel import_directory(const std::string& dir, const Config& base) {
  ImportedModel out;
  out.config = read_config(dir, base, &out.model_type);
  TrackedReader reader(dir, out.model_type);
  for (const auto& [ours, theirs] : name_pairs(out.config, family_of(out.model_type))) {
    out.weights[ours] = reader.load(theirs);
    out.origin[ours] = fmt::format("'{}' in {}", theirs, reader.file_of(theirs));
  }
  for (int64_t i = 0; i < out.config.model.num_layers; ++i)
    read_block_extras(reader, out.config, out.model_type, i, out.weights);
  reader.check_all_used();
  return out;
}

namespace {

// Why `config` cannot be written as `format`; empty when it can.
std::vector<std::string> export_problems(const Config& config, const WeightMap& weights,
                                         const ExportOptions& options) {
  std::vector<std::string> problems;
  const auto& moe = config.moe;
  const auto& r = moe.router;
  std::vector<int64_t> moe_blocks;
  for (int64_t i = 0; i < config.model.num_layers; ++i)
    if (is_moe_block(moe, i)) moe_blocks.push_back(i);
  const bool dense = moe_blocks.empty();
  const bool qwen3 = options.format == "hf-qwen3" || options.format == "hf-qwen3-moe";
  if (config.model.qk_norm && !qwen3)
    problems.push_back(options.format + " has no q/k norms (the model has model.qk_norm)");
  if (!config.model.qk_norm && qwen3)
    problems.push_back(options.format + " always normalises q and k (model.qk_norm is false)");
  if (config.model.head_dim > 0 && options.format == "hf-qwen2-moe")
    problems.push_back("hf-qwen2-moe has no head_dim independent of hidden_size / num_heads");
  if (options.format == "hf-llama" || options.format == "hf-qwen3") {
    if (!dense)
      problems.push_back(options.format + " is a dense format but the model has MoE blocks");
    return problems;
  }
  if (options.format == "hf-qwen3-moe" && moe.num_shared_experts > 0)
    problems.push_back("Qwen3-MoE has no shared experts");
  if (dense) problems.push_back(options.format + " needs MoE blocks; use hf-llama for this model");
  if (r.score != moe::ScoreFunction::kSoftmax)
    problems.push_back(std::string("router score must be softmax (is ") + enum_text(r.score) + ")");
  if (r.routing != moe::Routing::kTokenChoice)
    problems.push_back("expert_choice routing has no HF format");
  if (r.num_groups > 1) problems.push_back("group-limited routing has no HF equivalent here");
  if (r.num_null_experts > 0) problems.push_back("null experts have no HF equivalent");
  if (r.scaling_factor != 1.0) problems.push_back("router scaling_factor must be 1");
  if (options.format == "hf-mixtral") {
    if (!r.normalize_gates) problems.push_back("Mixtral always renormalises the top-k gates");
    if (moe.num_shared_experts > 0) problems.push_back("Mixtral has no shared experts");
    if (moe_blocks.size() != static_cast<size_t>(config.model.num_layers))
      problems.push_back("Mixtral makes every block MoE (moe.first_k_dense 0, layer_freq 1)");
    if (config.model.qkv_bias) problems.push_back("Mixtral attention has no q/k/v bias");
  }
  if (!options.drop_expert_bias) {
    for (const int64_t i : moe_blocks) {
      const auto it = weights.find(fmt::format("layers.{}.mlp.router.expert_bias", i));
      if (it != weights.end() && it->second.abs().max().item<double>() != 0.0) {
        problems.push_back(fmt::format(
            "layer {} has a non-zero aux-loss-free expert bias, which {} cannot store: routing "
            "would change (pass --drop-expert-bias to export anyway)",
            i, options.format));
        break;
      }
    }
  }
  return problems;
}

// The MoE keys Qwen2-MoE and Qwen3-MoE share: expert count and size, top-k, gate
// normalisation, and which blocks are MoE (every block but the mlp_only_layers).
void add_qwen_moe_layout(json& j, const Config& config) {
  const auto& moe = config.moe;
  j["moe_intermediate_size"] = moe.expert_ffn_size;
  j["num_experts"] = moe.num_experts;
  j["num_experts_per_tok"] = moe.top_k;
  j["norm_topk_prob"] = moe.router.normalize_gates;
  j["decoder_sparse_step"] = 1;
  std::vector<int64_t> dense_blocks;
  for (int64_t i = 0; i < config.model.num_layers; ++i)
    if (!is_moe_block(moe, i)) dense_blocks.push_back(i);
  j["mlp_only_layers"] = dense_blocks;
  j["router_aux_loss_coef"] = moe.balancing.aux_loss.coeff;
  j["output_router_logits"] = false;
}

json hf_config_json(const Config& config, const ExportOptions& options) {
  const auto& m = config.model;
  json j = {{"vocab_size", m.vocab_size},
            {"hidden_size", m.hidden_size},
            {"intermediate_size", m.ffn_size},
            {"num_hidden_layers", m.num_layers},
            {"num_attention_heads", m.num_heads},
            {"num_key_value_heads", m.num_kv_heads},
            {"head_dim", head_dim_of(m)},
            {"max_position_embeddings", m.max_seq_len},
            {"rope_theta", m.rope_theta},
            {"rms_norm_eps", m.rms_norm_eps},
            {"tie_word_embeddings", m.tie_embeddings},
            {"initializer_range", m.init_std},
            {"hidden_act", "silu"},
            {"torch_dtype", options.dtype},
            {"dtype", options.dtype},
            {"use_cache", true},
            {"bos_token_id", nullptr},
            {"eos_token_id", nullptr}};
  if (m.rope_scaling.type != RopeScalingType::kNone) {  // transformers 5's rope_parameters
    const auto& s = m.rope_scaling;
    json rope = {
        {"rope_type", enum_text(s.type)}, {"rope_theta", m.rope_theta}, {"factor", s.factor}};
    if (s.type == RopeScalingType::kLlama3) {
      rope["low_freq_factor"] = s.low_freq_factor;
      rope["high_freq_factor"] = s.high_freq_factor;
      rope["original_max_position_embeddings"] = s.original_max_position_embeddings;
    }
    j["rope_parameters"] = rope;
  }
  const auto& moe = config.moe;
  if (options.format == "hf-qwen3" || options.format == "hf-qwen3-moe") {
    const bool dense = options.format == "hf-qwen3";
    j["architectures"] = {dense ? "Qwen3ForCausalLM" : "Qwen3MoeForCausalLM"};
    j["model_type"] = dense ? "qwen3" : "qwen3_moe";
    j["attention_bias"] = m.qkv_bias;
    j["use_sliding_window"] = false;
    j["sliding_window"] = nullptr;
    if (!dense) {
      add_qwen_moe_layout(j, config);
      j["num_local_experts"] = moe.num_experts;  // transformers 5's name for the same count
    }
  } else if (options.format == "hf-llama") {
    j["architectures"] = {"LlamaForCausalLM"};
    j["model_type"] = "llama";
    j["attention_bias"] = m.qkv_bias;  // then o_proj gets an explicit zero bias
    j["mlp_bias"] = false;
  } else if (options.format == "hf-mixtral") {
    j["architectures"] = {"MixtralForCausalLM"};
    j["model_type"] = "mixtral";
    j["intermediate_size"] = moe.expert_ffn_size;
    j["num_local_experts"] = moe.num_experts;
    j["num_experts_per_tok"] = moe.top_k;
    j["router_aux_loss_coef"] = moe.balancing.aux_loss.coeff;
    j["output_router_logits"] = false;
    j["sliding_window"] = nullptr;
  } else {
    j["architectures"] = {"Qwen2MoeForCausalLM"};
    j["model_type"] = "qwen2_moe";
    const int64_t shared_size = moe::shared_expert_size(moe);
    // No shared expert: a 1-wide one with zero down projection adds exactly 0.
    j["shared_expert_intermediate_size"] =
        moe.num_shared_experts > 0 ? moe.num_shared_experts * shared_size : 1;
    add_qwen_moe_layout(j, config);
    j["use_sliding_window"] = false;
    j["sliding_window"] = nullptr;
    j["qkv_bias"] = true;
  }
  return j;
}

}  // namespace

void export_directory(const Config& config, const WeightMap& weights, const ExportOptions& options,
                      const std::string& out_dir) {
  const std::vector<std::string> formats = {"hf-llama", "hf-mixtral", "hf-qwen2-moe", "hf-qwen3",
                                            "hf-qwen3-moe"};
  if (!contains(formats, options.format))
    throw UserError(
        fmt::format("--format '{}': allowed {}", options.format, fmt::join(formats, " | ")));
  const std::map<std::string, at::ScalarType> dtypes = {
      {"float32", at::kFloat}, {"bfloat16", at::kBFloat16}, {"float16", at::kHalf}};
  if (!dtypes.count(options.dtype))
    throw UserError(
        fmt::format("--dtype '{}': allowed float32 | bfloat16 | float16", options.dtype));
  const auto problems = export_problems(config, weights, options);
  if (!problems.empty()) {
    std::vector<std::string> fitting;  // the formats this model would export to as it is
    for (const auto& format : formats) {
      auto other = options;
      other.format = format;
      if (export_problems(config, weights, other).empty()) fitting.push_back(format);
    }
    throw UserError(fmt::format(
        "cannot export as {}: {}; {}", options.format, fmt::join(problems, "; "),
        fitting.empty() ? "no Hugging Face format fits this model as it is"
                        : fmt::format("use --format {}", fmt::join(fitting, " or "))));
  }

  const std::string family = options.format == "hf-mixtral"     ? "mixtral"
                             : options.format == "hf-qwen2-moe" ? "qwen2_moe"
                             : options.format == "hf-qwen3-moe" ? "qwen3_moe"
                                                                : "llama";
  const auto dtype = dtypes.at(options.dtype);
  safetensors::NamedTensors tensors;
  const auto add = [&](const std::string& name, const at::Tensor& t) {
    tensors.emplace_back(name, t.to(dtype).contiguous());
  };
  const auto& m = config.model;
  for (const auto& [ours, theirs] : name_pairs(config, family)) {
    const auto it = weights.find(ours);
    if (it == weights.end()) throw UserError(fmt::format("export: weights lack '{}'", ours));
    auto tensor = it->second;
    // Qwen2-MoE's shared expert is multiplied by sigmoid(0) = 1/2: store twice the weights.
    if (family == "qwen2_moe" && ours.find(".mlp.shared_experts.w_down") != std::string::npos)
      tensor = tensor * 2.0;
    add(theirs, tensor);
  }
  for (int64_t i = 0; i < m.num_layers; ++i) {
    const std::string theirs = fmt::format("model.layers.{}.", i);
    if (family == "llama" && m.qkv_bias)
      add(theirs + "self_attn.o_proj.bias", at::zeros({m.hidden_size}, at::kFloat));
    if (family == "qwen2_moe") {
      if (!m.qkv_bias) {
        const int64_t head = head_dim_of(m);
        add(theirs + "self_attn.q_proj.bias", at::zeros({m.num_heads * head}, at::kFloat));
        add(theirs + "self_attn.k_proj.bias", at::zeros({m.num_kv_heads * head}, at::kFloat));
        add(theirs + "self_attn.v_proj.bias", at::zeros({m.num_kv_heads * head}, at::kFloat));
      }
      if (is_moe_block(config.moe, i)) {
        add(theirs + "mlp.shared_expert_gate.weight", at::zeros({1, m.hidden_size}, at::kFloat));
        if (config.moe.num_shared_experts == 0) {
          add(theirs + "mlp.shared_expert.gate_proj.weight", at::zeros({1, m.hidden_size}));
          add(theirs + "mlp.shared_expert.up_proj.weight", at::zeros({1, m.hidden_size}));
          add(theirs + "mlp.shared_expert.down_proj.weight", at::zeros({m.hidden_size, 1}));
        }
      }
    }
  }
  fs::create_directories(out_dir);
  write_file_atomically((fs::path(out_dir) / "config.json").string(),
                        hf_config_json(config, options).dump(2) + "\n");
  safetensors::save_sharded(out_dir, tensors, options.max_shard_bytes, {{"format", "pt"}});
}

}  // namespace moeforge::hf

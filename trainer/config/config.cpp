#include "trainer/config/config.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "trainer/common/file_io.hpp"
#include "trainer/common/spelling.hpp"
#include "trainer/common/user_error.hpp"
#include "trainer/config/config_schema.hpp"

namespace moeforge {
namespace {

// Where each key's value came from, for messages: "file.yaml:12" or "--set k=v".
using Locations = std::map<std::string, std::string>;

const KeySpec* find_key(const std::string& path) {
  for (const auto& key : config_schema())
    if (key.path == path) return &key;
  return nullptr;
}

bool is_section(const std::string& path) {
  const auto& sections = config_sections();
  return std::find(sections.begin(), sections.end(), path) != sections.end();
}

// "; did you mean 'moe.top_k'?" for the closest key or section, when close enough.
std::string suggestion(const std::string& path) {
  std::vector<std::string> candidates = config_sections();
  for (const auto& key : config_schema()) candidates.push_back(key.path);
  const auto dot = path.rfind('.');
  const std::string leaf = dot == std::string::npos ? path : path.substr(dot + 1);
  const std::string parent = dot == std::string::npos ? "" : path.substr(0, dot + 1);
  std::string best;
  size_t best_distance = std::string::npos;
  for (const auto& candidate : candidates) {
    size_t distance = edit_distance(path, candidate);
    // A key of the same section with a similar last name (moe.topk -> moe.top_k).
    if (!parent.empty() && candidate.rfind(parent, 0) == 0 &&
        candidate.find('.', parent.size()) == std::string::npos)
      distance = std::min(distance, edit_distance(leaf, candidate.substr(parent.size())));
    // The same name in another section (topk at the top level -> moe.top_k).
    const auto cdot = candidate.rfind('.');
    if (cdot != std::string::npos)
      distance = std::min(distance, edit_distance(leaf, candidate.substr(cdot + 1)) + 1);
    if (distance < best_distance) {
      best_distance = distance;
      best = candidate;
    }
  }
  const size_t limit = std::max<size_t>(2, leaf.size() / 3);
  if (best.empty() || best_distance > limit) return "";
  return fmt::format("; did you mean '{}'?", best);
}

std::string describe(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Map:
      return "a map";
    case YAML::NodeType::Sequence:
      return "a list";
    case YAML::NodeType::Null:
      return "nothing";
    default:
      return fmt::format("'{}'", node.Scalar());
  }
}

UserError value_error(const KeySpec& key, const std::string& where, const std::string& got) {
  return UserError(
      fmt::format("{}: {}: must be {}, got {}", where, key.path, key.allowed_text(), got));
}

// The names of a combinable key's value: a YAML list of names, or one string of names
// separated by spaces or commas.
std::vector<std::string> combination_names(const KeySpec& key, const YAML::Node& node,
                                           const std::string& where) {
  std::vector<std::string> names;
  if (node.IsSequence()) {
    for (const auto& item : node) {
      if (!item.IsScalar()) throw value_error(key, where, describe(item) + " in the list");
      names.push_back(item.Scalar());
    }
    return names;
  }
  if (!node.IsScalar()) throw value_error(key, where, describe(node));
  std::string text = node.Scalar();
  std::replace(text.begin(), text.end(), ',', ' ');
  std::stringstream words(text);
  for (std::string word; words >> word;) names.push_back(word);
  return names;
}

void set_combination(Config& config, const KeySpec& key, const YAML::Node& node,
                     const std::string& where) {
  const auto names = combination_names(key, node, where);
  for (const auto& name : names)
    if (std::find(key.choices.begin(), key.choices.end(), name) == key.choices.end())
      throw value_error(key, where, fmt::format("'{}'", name));
  const auto& alone = key.choices.front();
  if (names.size() > 1 && std::find(names.begin(), names.end(), alone) != names.end())
    throw value_error(key, where, fmt::format("'{}' combined with other names", alone));
  key.set_text(config, fmt::format("{}", fmt::join(names, " ")));
}

// Parses one leaf value into `config`; throws UserError "<where>: <key>: must be ..., got ...".
void set_value(Config& config, const KeySpec& key, const YAML::Node& node,
               const std::string& where) {
  auto fail = [&](const std::string& got) { return value_error(key, where, got); };
  if (key.combinable) return set_combination(config, key, node, where);
  if (!node.IsScalar()) throw fail(describe(node));
  const std::string text = node.Scalar();
  switch (key.type) {
    case KeyType::kInt: {
      int64_t value = 0;
      if (!YAML::convert<int64_t>::decode(node, value)) throw fail(describe(node));
      if (static_cast<double>(value) < key.min || static_cast<double>(value) > key.max)
        throw fail(std::to_string(value));
      key.int_field(config) = value;
      break;
    }
    case KeyType::kFloat: {
      double value = 0;
      if (!YAML::convert<double>::decode(node, value) || !std::isfinite(value))
        throw fail(describe(node));
      if (value < key.min || value > key.max) throw fail(text);
      key.float_field(config) = value;
      break;
    }
    case KeyType::kBool: {
      bool value = false;
      if (!YAML::convert<bool>::decode(node, value)) throw fail(describe(node));
      key.bool_field(config) = value;
      break;
    }
    case KeyType::kString: {
      if (!key.choices.empty() &&
          std::find(key.choices.begin(), key.choices.end(), text) == key.choices.end())
        throw fail(describe(node));
      key.set_text(config, text);
      break;
    }
  }
}

std::string line_of(const std::string& source, const YAML::Mark& mark) {
  return mark.line >= 0 ? fmt::format("{}:{}", source, mark.line + 1) : source;
}

void parse_map(Config& config, const YAML::Node& map, const std::string& prefix,
               const std::string& source, Locations& locations) {
  for (const auto& item : map) {
    const std::string name = item.first.as<std::string>();
    const std::string path = prefix.empty() ? name : prefix + "." + name;
    const std::string where = line_of(source, item.first.Mark());
    if (const KeySpec* key = find_key(path)) {
      if (item.second.IsNull())
        throw UserError(
            fmt::format("{}: {}: has no value; must be {}", where, path, key->allowed_text()));
      set_value(config, *key, item.second, where);
      locations[path] = where;
    } else if (is_section(path)) {
      if (item.second.IsNull()) continue;  // an empty section keeps its defaults
      if (!item.second.IsMap())
        throw UserError(fmt::format("{}: {}: must be a section (a map of keys), got {}", where,
                                    path, describe(item.second)));
      locations[path] = where;
      parse_map(config, item.second, path, source, locations);
    } else {
      throw UserError(fmt::format("{}: unknown key '{}'{}", where, path, suggestion(path)));
    }
  }
}

void apply_override(Config& config, const std::string& override_text, Locations& locations) {
  const auto eq = override_text.find('=');
  if (eq == std::string::npos || eq == 0)
    throw UserError(
        fmt::format("--set {}: expected key.path=value, e.g. --set moe.top_k=4", override_text));
  const std::string path = override_text.substr(0, eq);
  const std::string value = override_text.substr(eq + 1);
  const std::string where = "--set " + override_text;
  const KeySpec* key = find_key(path);
  if (key == nullptr) {
    if (is_section(path))
      throw UserError(fmt::format("{}: '{}' is a section; set one of its keys, e.g. {}.<key>=...",
                                  where, path, path));
    throw UserError(fmt::format("{}: unknown key '{}'{}", where, path, suggestion(path)));
  }
  YAML::Node node;
  try {
    node = YAML::Load(value);
  } catch (const YAML::Exception& e) {
    throw UserError(fmt::format("{}: {}: cannot parse the value: {}", where, path, e.msg));
  }
  if (node.IsNull()) node = YAML::Node(value);  // "--set data.path=" means the empty string
  set_value(config, *key, node, where);
  locations[path] = where;
}

// Cross-field rules; the message points at the line of the first key named.
void validate(const Config& c, const Locations& locations, const std::string& source) {
  auto at = [&](const std::string& path) {
    const auto it = locations.find(path);
    return it != locations.end() ? it->second : source + " (default)";
  };
  auto rule = [&](bool ok, const std::string& path, const std::string& message) {
    if (!ok) throw UserError(fmt::format("{}: {}: {}", at(path), path, message));
  };
  const auto& m = c.model;
  rule(m.head_dim > 0 || m.hidden_size % m.num_heads == 0, "model.hidden_size",
       fmt::format("{} is not divisible by model.num_heads = {} (or set model.head_dim)",
                   m.hidden_size, m.num_heads));
  rule(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
       fmt::format("{} does not divide model.num_heads = {} (grouped-query attention shares each "
                   "kv head among num_heads / num_kv_heads query heads)",
                   m.num_kv_heads, m.num_heads));
  rule(head_dim_of(m) % 2 == 0, m.head_dim > 0 ? "model.head_dim" : "model.hidden_size",
       fmt::format("head size {} must be even (RoPE rotates pairs)", head_dim_of(m)));
  const auto& rope = m.rope_scaling;
  rule(rope.type != RopeScalingType::kLlama3 || rope.original_max_position_embeddings > 0,
       "model.rope_scaling.original_max_position_embeddings",
       "llama3 RoPE scaling needs the original context length (> 0)");
  rule(rope.type != RopeScalingType::kLlama3 || rope.high_freq_factor > rope.low_freq_factor,
       "model.rope_scaling.high_freq_factor",
       fmt::format("{} must be above model.rope_scaling.low_freq_factor = {}",
                   rope.high_freq_factor, rope.low_freq_factor));
  rule(c.moe.top_k <= c.moe.num_experts, "moe.top_k",
       fmt::format("{} is more than moe.num_experts = {}", c.moe.top_k, c.moe.num_experts));
  const auto& r = c.moe.router;
  const bool grouped = r.num_groups > 1;
  rule(!grouped || c.moe.num_experts % r.num_groups == 0, "moe.router.num_groups",
       fmt::format("{} does not divide moe.num_experts = {}", r.num_groups, c.moe.num_experts));
  rule(!grouped || (r.topk_groups >= 1 && r.topk_groups <= r.num_groups), "moe.router.topk_groups",
       fmt::format("{} must be in [1, moe.router.num_groups = {}]", r.topk_groups, r.num_groups));
  rule(!grouped || c.moe.top_k <= r.topk_groups * (c.moe.num_experts / r.num_groups), "moe.top_k",
       fmt::format("{} is more than the experts of the topk_groups chosen groups ({} × {})",
                   c.moe.top_k, r.topk_groups,
                   c.moe.num_experts / std::max<int64_t>(1, r.num_groups)));
  const bool expert_choice = r.routing == moe::Routing::kExpertChoice;
  rule(!expert_choice || !grouped, "moe.router.routing",
       "expert_choice cannot be combined with group-limited routing (moe.router.num_groups > 1): "
       "experts choose tokens, so there is no per-token group limit to apply");
  rule(!expert_choice || r.num_null_experts == 0, "moe.router.routing",
       "expert_choice cannot be combined with moe.router.num_null_experts: with expert choice "
       "a token's number of experts already varies");
  rule(!c.moe.capacity.pad || c.moe.capacity.factor > 0, "moe.capacity.pad",
       "padding needs a capacity to pad to: set moe.capacity.factor > 0");
  rule(c.moe.first_k_dense <= m.num_layers, "moe.first_k_dense",
       fmt::format("{} is more than model.num_layers = {}", c.moe.first_k_dense, m.num_layers));
  rule(c.moe.num_experts % c.parallel.ep_size == 0, "parallel.ep_size",
       fmt::format("{} does not divide moe.num_experts = {}", c.parallel.ep_size,
                   c.moe.num_experts));
  rule(c.parallel.backend != BackendChoice::kNccl || c.train.device == DeviceKind::kCuda,
       "parallel.backend",
       "nccl carries CUDA tensors: set train.device: cuda, or use parallel.backend: mpi / auto");
  rule(!c.parallel.micro_batch_overlap || c.train.grad_accum % 2 == 0,
       "parallel.micro_batch_overlap",
       fmt::format("runs micro-batches two at a time: train.grad_accum must be even, got {}",
                   c.train.grad_accum));
  rule(!c.parallel.micro_batch_overlap || !(c.train.recompute.block || c.train.recompute.moe),
       "parallel.micro_batch_overlap",
       "interleaves the MoE layer's exchanges with the other micro-batch's compute, which a "
       "recomputed block or MoE layer runs as one piece: train.recompute may name attention "
       "and moe_act with it, not block or moe");
  rule(c.train.seq_len <= m.max_seq_len, "train.seq_len",
       fmt::format("{} is longer than model.max_seq_len = {}", c.train.seq_len, m.max_seq_len));
  rule(c.train.min_lr <= c.train.lr, "train.min_lr",
       fmt::format("{} is above train.lr = {}", c.train.min_lr, c.train.lr));
  rule(c.data.source == DataSource::kBuiltin || !c.data.path.empty() ||
           (c.data.source == DataSource::kMegatron && !c.data.blend.empty()),
       "data.source",
       fmt::format("'{}' needs data.path (the file to read{})", enum_text(c.data.source),
                   c.data.source == DataSource::kMegatron ? ", a dataset prefix" : ""));
  rule(c.data.blend.empty() || c.data.source == DataSource::kMegatron, "data.blend",
       "blends are of Megatron indexed datasets: set data.source: megatron");
  rule(!c.data.mask_loss_after_eod || c.data.eod_token_id >= 0, "data.mask_loss_after_eod",
       "needs data.eod_token_id (the end-of-document token; launch/preprocess.py prints it)");
  rule(c.data.source == DataSource::kBin || c.data.source == DataSource::kMegatron ||
           m.vocab_size >= 256,
       "model.vocab_size",
       fmt::format("{} is too small for byte-level data (data.source '{}' needs ≥ 256)",
                   m.vocab_size, enum_text(c.data.source)));
}

std::string format_value(const KeySpec& key, Config& config);

// The model section of a model the config is applied to (upcycling, import, --init-from an HF
// directory): it replaces the file's, and a model key the file or an override sets to another
// value is an error naming both.
void adopt_fixed_model(Config& config, const FixedModel& fixed, const Locations& locations) {
  Config theirs = config;
  theirs.model = fixed.model;
  for (const auto& key : config_schema()) {
    if (key.path.rfind("model.", 0) != 0) continue;
    const auto where = locations.find(key.path);
    if (where == locations.end()) continue;  // not set by the user: nothing to contradict
    const auto mine = format_value(key, config), source = format_value(key, theirs);
    if (mine != source)
      throw UserError(fmt::format(
          "{}: {}: {} here, but {} has {}; the model section comes from the source (leave the "
          "key out)",
          where->second, key.path, mine, fixed.source, source));
  }
  config.model = fixed.model;
  if (!locations.count("train.seq_len"))  // the default must fit the adopted model
    config.train.seq_len = std::min(config.train.seq_len, config.model.max_seq_len);
}

bool has_moe_blocks(const Config& config) {
  for (int64_t b = 0; b < config.model.num_layers; ++b)
    if (is_moe_block(config.moe, b)) return true;
  return false;
}

// A relative path names the file beside the config file when it is there (probing `path` +
// `suffix`), else stays relative to the working directory (configs written for the repo root).
void resolve_beside(const std::filesystem::path& config_file, const std::string& suffix,
                    std::string& path) {
  if (path.empty() || std::filesystem::path(path).is_absolute()) return;
  const auto beside = config_file.parent_path() / path;
  if (std::filesystem::exists(beside.string() + suffix)) path = beside.lexically_normal().string();
}

// Defaults that depend on other keys or on the file, each leaving a note for the banner.
void derive_defaults(Config& config, const Locations& locations, const std::string& source) {
  auto& balancing = config.moe.balancing;
  const bool balancing_chosen = locations.count("moe.balancing.aux_loss.coeff") ||
                                locations.count("moe.balancing.expert_bias.rate");
  if (!balancing_chosen && config.moe.router.routing == moe::Routing::kTokenChoice &&
      has_moe_blocks(config)) {
    balancing.aux_loss.coeff = 0.01;  // an unbalanced router collapses onto few experts
    config.notes.push_back(
        "moe.balancing.aux_loss.coeff = 0.01 (default for token-choice routing; set it, or "
        "moe.balancing.expert_bias.rate, to choose the balancing yourself)");
  }
  auto& train = config.train;
  if (train.warmup_steps > train.steps) {
    const int64_t asked = train.warmup_steps;
    train.warmup_steps = train.steps / 10;
    config.notes.push_back(fmt::format(
        "train.warmup_steps = {} ({}) is more than train.steps = {}: warmup shortened to {} "
        "steps (10% of the run)",
        asked,
        locations.count("train.warmup_steps") ? locations.at("train.warmup_steps") : "default",
        train.steps, train.warmup_steps));
  }
  const std::filesystem::path file(source);
  const bool from_file = std::filesystem::is_regular_file(file);
  if (!locations.count("train.out_dir") && from_file)
    train.out_dir = (std::filesystem::path("runs") / file.stem()).string();
  auto& data = config.data;
  if (locations.count("data.path")) data.path_origin = locations.at("data.path");
  if (!from_file) return;
  resolve_beside(file, data.source == DataSource::kMegatron ? ".idx" : "", data.path);
  resolve_beside(file, "", data.tokenizer);
}

Config parse(const YAML::Node& root, const std::string& source,
             const std::vector<std::string>& overrides, const std::optional<FixedModel>& fixed) {
  Config config;
  config.source_file = source;
  Locations locations;
  if (!root.IsNull() && !root.IsMap())
    throw UserError(
        fmt::format("{}: the top level must be a map of sections (model:, moe:, ...), "
                    "got {}",
                    line_of(source, root.Mark()), describe(root)));
  if (root.IsMap()) parse_map(config, root, "", source, locations);  // empty file: defaults
  for (const auto& text : overrides) apply_override(config, text, locations);
  if (fixed) adopt_fixed_model(config, *fixed, locations);
  derive_defaults(config, locations, source);
  validate(config, locations, source);
  return config;
}

Config parse_text(const std::string& text, const std::string& source,
                  const std::vector<std::string>& overrides,
                  const std::optional<FixedModel>& fixed) {
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::ParserException& e) {
    throw UserError(fmt::format("{}:{}: YAML syntax error: {}", source, e.mark.line + 1, e.msg));
  }
  return parse(root, source, overrides, fixed);
}

std::string format_value(const KeySpec& key, Config& config) {
  switch (key.type) {
    case KeyType::kInt:
      return std::to_string(key.int_field(config));
    case KeyType::kFloat:
      return fmt::format("{}", key.float_field(config));
    case KeyType::kBool:
      return key.bool_field(config) ? "true" : "false";
    case KeyType::kString:
      return key.get_text(config);
  }
  return "";
}

}  // namespace

Config load_config(const std::string& path, const std::vector<std::string>& overrides,
                   const std::optional<FixedModel>& fixed_model) {
  const auto text = read_file(path, "config file");
  // An empty file would silently train every default; a config must say what it trains.
  if (text.find_first_not_of(" \t\r\n") == std::string::npos)
    throw UserError(
        fmt::format("{}: the config file is empty; describe at least the model and train sections "
                    "(configs/tiny.yaml is a complete example)",
                    path));
  return parse_text(text, path, overrides, fixed_model);
}

Config load_config_from_string(const std::string& yaml_text, const std::string& source_name,
                               const std::vector<std::string>& overrides,
                               const std::optional<FixedModel>& fixed_model) {
  return parse_text(yaml_text, source_name, overrides, fixed_model);
}

std::string to_yaml(const Config& config) {
  Config copy = config;
  YAML::Emitter out;
  out << YAML::BeginMap;
  std::vector<std::string> open;  // currently open sections, outermost first
  for (const auto& key : config_schema()) {
    std::vector<std::string> parts;
    std::stringstream path(key.path);
    for (std::string part; std::getline(path, part, '.');) parts.push_back(part);
    const std::vector<std::string> sections(parts.begin(), parts.end() - 1);
    // Close sections this key is not in, then open the ones it needs (schema is grouped).
    size_t common = 0;
    while (common < open.size() && common < sections.size() && open[common] == sections[common])
      ++common;
    while (open.size() > common) {
      out << YAML::EndMap;
      open.pop_back();
    }
    for (size_t i = common; i < sections.size(); ++i) {
      out << YAML::Key << sections[i] << YAML::Value << YAML::BeginMap;
      open.push_back(sections[i]);
    }
    out << YAML::Key << parts.back() << YAML::Value;
    if (key.type == KeyType::kString)
      out << YAML::DoubleQuoted << key.get_text(copy);
    else
      out << format_value(key, copy);
  }
  while (!open.empty()) {
    out << YAML::EndMap;
    open.pop_back();
  }
  out << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

// Text in a Markdown table cell (GitHub): a bare '|' would end the cell, and <word> would be
// taken for an HTML tag and vanish. Inside a code span only the '|' needs escaping.
static std::string table_cell(const std::string& text, bool code) {
  std::string cell;
  for (const char c : text) {
    if (c == '|')
      cell += "\\|";
    else if (c == '<' && !code)
      cell += "&lt;";
    else if (c == '>' && !code)
      cell += "&gt;";
    else
      cell += c;
  }
  return code ? "`" + cell + "`" : cell;
}

std::string config_reference_markdown() {
  Config defaults;
  std::string text;
  std::string section;
  for (const auto& key : config_schema()) {
    const auto top = key.path.substr(0, key.path.find('.'));
    if (top != section) {
      section = top;
      text += fmt::format(
          "\n### `{}`\n\n| key | default | allowed | meaning |\n|---|---|---|---|\n", section);
    }
    std::string value = format_value(key, defaults);
    if (key.type == KeyType::kString && value.empty()) value = "\"\"";
    text +=
        fmt::format("| {} | {} | {} | {} |\n", table_cell(key.path, true), table_cell(value, true),
                    table_cell(key.allowed_text(), false), table_cell(key.doc, false));
  }
  return text;
}

std::vector<std::string> parameter_shape_differences(const Config& stored, const Config& run) {
  static const std::set<std::string> shape_keys = {"model.vocab_size",
                                                   "model.hidden_size",
                                                   "model.num_layers",
                                                   "model.num_heads",
                                                   "model.num_kv_heads",
                                                   "model.ffn_size",
                                                   "model.qkv_bias",
                                                   "model.tie_embeddings",
                                                   "model.head_dim",
                                                   "model.qk_norm",
                                                   "moe.num_experts",
                                                   "moe.expert_ffn_size",
                                                   "moe.num_shared_experts",
                                                   "moe.shared_expert_ffn_size",
                                                   "moe.first_k_dense",
                                                   "moe.layer_freq",
                                                   "moe.router.num_null_experts"};
  Config a = stored, b = run;
  std::vector<std::string> differences;
  for (const auto& key : config_schema()) {
    if (!shape_keys.count(key.path)) continue;
    const auto was = format_value(key, a), now = format_value(key, b);
    if (was != now) differences.push_back(fmt::format("{}: {} there, {} here", key.path, was, now));
  }
  return differences;
}

void validate_for_world(const Config& config, int world_size) {
  const int64_t ep = config.parallel.ep_size;
  if (world_size % ep == 0) return;
  std::vector<int64_t> valid;
  for (int64_t d = 1; d <= world_size; ++d)
    if (world_size % d == 0 && config.moe.num_experts % d == 0) valid.push_back(d);
  throw UserError(
      fmt::format("{}: parallel.ep_size = {} does not divide the world size {} "
                  "(ranks launched); with {} ranks use one of {}",
                  config.source_file, ep, world_size, world_size, fmt::join(valid, ", ")));
}

}  // namespace moeforge

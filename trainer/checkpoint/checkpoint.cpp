#include "trainer/checkpoint/checkpoint.hpp"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>

#include "trainer/checkpoint/safetensors.hpp"
#include "trainer/common/file_io.hpp"
#include "trainer/common/user_error.hpp"
#include "trainer/model/model_weights.hpp"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

constexpr const char* kMetadataFile = "checkpoint.json";
constexpr const char* kModelFile = "model.safetensors";
constexpr const char* kOptimizerFile = "optimizer.safetensors";
constexpr int kFormatVersion = 1;

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

std::string expert_file_name(int ep_rank, int ep_size) {
  return fmt::format("experts-{:05d}-of-{:05d}.safetensors", ep_rank, ep_size);
}

// A parameter's fp32 master and its AdamW moments, each with the prefix of its checkpoint name.
std::vector<std::pair<std::string, at::Tensor*>> slot_tensors(SlotState& state) {
  return {{"", &state.master}, {"exp_avg.", &state.exp_avg}, {"exp_avg_sq.", &state.exp_avg_sq}};
}

// Every slot's whole state, in slot order; collective (sharded slots are all-gathered), but only
// the slots this rank writes are kept (the others come back empty).
std::vector<SlotState> states_to_write(const AdamW& optimizer, bool writes_shared,
                                       bool writes_experts) {
  std::vector<SlotState> states;
  for (size_t i = 0; i < optimizer.slots().size(); ++i) {
    auto state = optimizer.whole_state(i);
    const bool expert = is_expert_parameter(optimizer.slots()[i].name);
    states.push_back((expert ? writes_experts : writes_shared) ? std::move(state) : SlotState{});
  }
  return states;
}

at::Tensor cpu_rng_state() {
  auto generator = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(generator.mutex());
  return generator.get_state();
}

void set_cpu_rng_state(const at::Tensor& state) {
  auto generator = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(generator.mutex());
  generator.set_state(state);
}

}  // namespace

std::string file_crc32(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UserError(fmt::format("cannot read {}", path));
  uLong crc = crc32(0L, Z_NULL, 0);
  std::vector<char> buffer(1 << 20);
  while (in) {
    in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
    const auto got = in.gcount();
    if (got > 0)
      crc = crc32(crc, reinterpret_cast<const Bytef*>(buffer.data()), static_cast<uInt>(got));
  }
  return fmt::format("{:08x}", crc);
}

CheckpointManager::CheckpointManager(std::string checkpoints_dir,
                                     const parallel::ProcessGroups& groups)
    : dir_(std::move(checkpoints_dir)), groups_(groups) {}

namespace {

// Rank 0's files: non-expert parameters (fp32 masters) and buffers, their AdamW state, the
// CPU RNG.
void write_shared_files(const fs::path& dir, DecoderLMImpl& model, const AdamW& optimizer,
                        const std::vector<SlotState>& states) {
  NamedTensors weights, state_tensors;
  for (size_t i = 0; i < states.size(); ++i) {
    const auto& name = optimizer.slots()[i].name;
    if (is_expert_parameter(name)) continue;
    weights.emplace_back(name, states[i].master);
    state_tensors.emplace_back("exp_avg." + name, states[i].exp_avg);
    state_tensors.emplace_back("exp_avg_sq." + name, states[i].exp_avg_sq);
  }
  for (const auto& item : model.named_buffers()) weights.emplace_back(item.key(), item.value());
  state_tensors.emplace_back("rng.cpu", cpu_rng_state());
  safetensors::save((dir / kModelFile).string(), weights);
  safetensors::save((dir / kOptimizerFile).string(), state_tensors);
}

// This EP rank's experts and their AdamW state under global names.
void write_expert_file(const fs::path& path, DecoderLMImpl& model, const AdamW& optimizer,
                       std::vector<SlotState>& states) {
  NamedTensors experts;
  const int64_t first = model.first_local_expert();
  for (size_t i = 0; i < states.size(); ++i) {
    const auto& name = optimizer.slots()[i].name;
    if (!is_expert_parameter(name)) continue;
    for (const auto& [prefix, tensor] : slot_tensors(states[i]))
      for (auto& named : checkpoint_views(prefix + name, *tensor, first))
        experts.push_back(std::move(named));
  }
  safetensors::save(path.string(), experts);
}

nlohmann::json checkpoint_metadata(const fs::path& dir, const TrainingState& state,
                                   const AdamW& optimizer, const parallel::ProcessGroups& groups,
                                   const std::string& resolved_config_yaml,
                                   const std::string& run_id) {
  nlohmann::json meta;
  meta["format"] = "moeforge-checkpoint";
  meta["version"] = kFormatVersion;
  meta["step"] = state.step;
  meta["samples_consumed"] = state.samples_consumed;
  meta["optimizer"] = {{"type", "adamw"},
                       {"steps_taken", optimizer.steps_taken()},
                       {"state", {"exp_avg", "exp_avg_sq"}}};
  meta["layout"] = {{"world_size", groups.world->size()},
                    {"ep_size", groups.ep_size},
                    {"expert_files", groups.ep_size}};
  meta["config"] = resolved_config_yaml;
  meta["run_id"] = run_id;
  nlohmann::json files = nlohmann::json::object();
  for (const auto& entry : fs::directory_iterator(dir)) {
    files[entry.path().filename().string()] = {
        {"crc32", file_crc32(entry.path().string())},
        {"bytes", static_cast<int64_t>(fs::file_size(entry.path()))}};
  }
  meta["files"] = files;
  return meta;
}

// The run id recorded in a checkpoint directory ("" when absent or unreadable).
std::string recorded_run_id(const fs::path& checkpoint) {
  const auto path = checkpoint / kMetadataFile;
  if (!fs::exists(path)) return "";
  const auto meta = nlohmann::json::parse(read_file(path.string()), nullptr, false);
  return meta.is_object() ? meta.value("run_id", std::string()) : "";
}

// Removes all but the newest `keep` complete checkpoints of run `run_id` in `dir`; checkpoints
// of other runs (an earlier run, an import) are never touched.
void prune_checkpoints(const fs::path& dir, int64_t keep, const std::string& run_id) {
  std::vector<std::string> steps;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const auto file = entry.path().filename().string();
    if (entry.is_directory() && file.rfind("step-", 0) == 0 &&
        file.find('.') == std::string::npos && recorded_run_id(entry.path()) == run_id)
      steps.push_back(file);
  }
  std::sort(steps.begin(), steps.end());
  for (size_t i = 0; i + keep < steps.size(); ++i) fs::remove_all(dir / steps[i]);
}

}  // namespace

std::string CheckpointManager::save(DecoderLMImpl& model, AdamW& optimizer,
                                    const TrainingState& state,
                                    const std::string& resolved_config_yaml, int64_t keep) {
  auto& world = *groups_.world;
  const std::string name = fmt::format("step-{:08d}", state.step);
  const fs::path final_dir = fs::path(dir_) / name;
  const fs::path tmp_dir = fs::path(dir_) / (name + ".tmp");
  if (world.rank() == 0) {
    fs::create_directories(dir_);
    fs::remove_all(tmp_dir);
    fs::create_directories(tmp_dir);
  }
  world.barrier();
  {
    at::NoGradGuard no_grad;
    // Rank 0 writes the non-expert part; the first EP group writes the experts.
    auto states = states_to_write(optimizer, world.rank() == 0, groups_.dp_rank() == 0);
    if (world.rank() == 0) write_shared_files(tmp_dir, model, optimizer, states);
    if (groups_.dp_rank() == 0)
      write_expert_file(tmp_dir / expert_file_name(groups_.ep_rank(), groups_.ep_size), model,
                        optimizer, states);
  }
  world.barrier();
  if (world.rank() == 0) {
    const auto meta =
        checkpoint_metadata(tmp_dir, state, optimizer, groups_, resolved_config_yaml, run_id_);
    write_file_atomically((tmp_dir / kMetadataFile).string(), meta.dump(2));
    if (fs::exists(final_dir)) fs::remove_all(final_dir);
    fs::rename(tmp_dir, final_dir);
    fsync_directory(dir_);
    write_file_atomically((fs::path(dir_) / "latest").string(), name + "\n");
    if (keep > 0) prune_checkpoints(dir_, keep, run_id_);
  }
  world.barrier();
  return final_dir.string();
}

void CheckpointManager::remove_incomplete() const {
  if (!fs::exists(dir_)) return;
  for (const auto& entry : fs::directory_iterator(dir_)) {
    const auto name = entry.path().filename().string();
    if (name.size() > 4 && name.compare(name.size() - 4, 4, ".tmp") == 0)
      fs::remove_all(entry.path());  // a save that never completed
  }
}

std::string CheckpointManager::resolve(const std::string& requested) const {
  return resolve_checkpoint(dir_, requested, "resume from");
}

std::string resolve_checkpoint(const std::string& checkpoints_dir, const std::string& requested,
                               const std::string& purpose) {
  fs::path base =
      requested.empty() || requested == "latest" ? fs::path(checkpoints_dir) : fs::path(requested);
  if (fs::exists(base / kMetadataFile)) return base.string();
  for (const fs::path& candidate : {base, base / "checkpoints"}) {
    if (fs::exists(candidate / "latest")) {
      std::string name = read_file((candidate / "latest").string());
      name.erase(name.find_last_not_of(" \n\r\t") + 1);
      const auto dir = candidate / name;
      if (!fs::exists(dir / kMetadataFile))
        throw UserError(fmt::format("{}: 'latest' names {}, which has no {}", candidate.string(),
                                    dir.string(), kMetadataFile));
      return dir.string();
    }
  }
  throw UserError(fmt::format(
      "no checkpoint to {} at '{}': expected a checkpoint directory (with {}) or a directory "
      "holding a 'latest' file",
      purpose, base.string(), kMetadataFile));
}

namespace {

// checkpoint.json of `dir`, parsed; UserError naming the file when it is not JSON.
nlohmann::json read_metadata(const fs::path& dir) {
  const auto meta_path = (dir / kMetadataFile).string();
  try {
    return nlohmann::json::parse(read_file(meta_path));
  } catch (const nlohmann::json::exception& e) {
    throw UserError(fmt::format("{}: not valid JSON: {}", meta_path, e.what()));
  }
}

}  // namespace

std::string checkpoint_config_yaml(const std::string& checkpoint_dir) {
  const auto meta = read_metadata(checkpoint_dir);
  if (!meta.contains("config") || !meta["config"].is_string())
    throw UserError(
        fmt::format("{}/{}: no 'config' (resolved YAML)", checkpoint_dir, kMetadataFile));
  return meta["config"].get<std::string>();
}

namespace {

// checkpoint.json of a checkpoint after the checks that need no tensor data: format, version,
// every recorded file present with its recorded size.
nlohmann::json check_checkpoint_metadata(const std::string& checkpoint_dir) {
  const fs::path dir(checkpoint_dir);
  const auto meta_path = (dir / kMetadataFile).string();
  const auto meta = read_metadata(dir);
  if (meta.value("format", "") != "moeforge-checkpoint" || !meta.contains("files"))
    throw UserError(fmt::format("{}: not a moeforge checkpoint (missing format/files)", meta_path));
  if (meta.value("version", 0) != kFormatVersion)
    throw UserError(
        fmt::format("{}: checkpoint format version {} is not supported (this build "
                    "reads version {})",
                    meta_path, meta.value("version", 0), kFormatVersion));
  // The step must be the one the directory is named for (an edited step would skip training).
  const auto name = dir.filename().string();
  static const std::regex step_dir(R"(step-(\d{8}))");
  std::smatch digits;
  if (std::regex_match(name, digits, step_dir) &&
      meta.value("step", int64_t{-1}) != std::stoll(digits[1]))
    throw UserError(
        fmt::format("{}: records step {} but the directory is {}; the checkpoint was "
                    "edited or mislabelled",
                    meta_path, meta.value("step", int64_t{-1}), name));
  for (const auto& [file, info] : meta["files"].items()) {
    const auto path = dir / file;
    if (!fs::exists(path))
      throw UserError(fmt::format("{}: file {} is missing", checkpoint_dir, file));
    const auto bytes = static_cast<int64_t>(fs::file_size(path));
    if (info.contains("bytes") && info["bytes"].get<int64_t>() != bytes)
      throw UserError(fmt::format(
          "{}: {} bytes but checkpoint.json records {}; the checkpoint is truncated or was "
          "changed — resume from an earlier one",
          path.string(), bytes, info["bytes"].get<int64_t>()));
  }
  return meta;
}

}  // namespace

void check_checkpoint(const std::string& checkpoint_dir) {
  check_checkpoint_metadata(checkpoint_dir);
}

CheckpointInfo checkpoint_info(const std::string& checkpoint_dir) {
  const auto meta = check_checkpoint_metadata(checkpoint_dir);
  return {meta.value("step", int64_t{0}), meta.value("run_id", std::string())};
}

namespace {

using FilesByTensor = std::map<std::string, std::shared_ptr<safetensors::File>>;

// Every file of the checkpoint, checksummed before any byte of it is trusted, by tensor name.
FilesByTensor open_verified_files(const fs::path& dir, const nlohmann::json& meta) {
  FilesByTensor by_name;
  for (const auto& [file, info] : meta["files"].items()) {
    const auto path = (dir / file).string();
    const auto expected = info.value("crc32", "");
    const auto actual = file_crc32(path);
    if (actual != expected)
      throw UserError(
          fmt::format("{}: checksum mismatch (crc32 {} but checkpoint.json records {}); "
                      "the checkpoint is corrupt — resume from an earlier one",
                      path, actual, expected));
    auto opened = std::make_shared<safetensors::File>(safetensors::File::open(path));
    for (const auto& tensor : opened->tensors()) by_name[tensor.name] = opened;
  }
  return by_name;
}

// Global expert index of an expert tensor name (…experts.17.w_gate), or -1.
int64_t global_expert_of(const std::string& name) {
  static const std::regex pattern(R"(\.experts\.(\d+)\.)");
  std::smatch match;
  return std::regex_search(name, match, pattern) ? std::stoll(match[1]) : -1;
}

// Every tensor of the checkpoint must have been used by this rank, or be another EP rank's
// expert: a checkpoint with more blocks or experts than the model is refused, not cut down.
void check_all_consumed(const std::string& checkpoint_dir, const FilesByTensor& by_name,
                        const std::set<std::string>& used, int64_t num_experts) {
  std::vector<std::string> unused;
  for (const auto& [name, file] : by_name) {
    if (used.count(name) || name == "rng.cpu") continue;
    const int64_t expert = global_expert_of(name);
    if (expert >= 0 && expert < num_experts) continue;  // held by another EP rank
    unused.push_back(name);
  }
  if (!unused.empty())
    throw UserError(fmt::format(
        "{}: {} tensor(s) of the checkpoint have no place in this model, e.g. '{}': the "
        "checkpoint's model is larger than the config's (compare model.* and moe.* with the "
        "checkpoint's config)",
        checkpoint_dir, unused.size(), unused.front()));
}

}  // namespace

TrainingState CheckpointManager::load(const std::string& checkpoint_dir, DecoderLMImpl& model,
                                      AdamW& optimizer) {
  const fs::path dir(checkpoint_dir);
  const auto meta = check_checkpoint_metadata(checkpoint_dir);
  const auto by_name = open_verified_files(dir, meta);
  std::set<std::string> used;
  auto fetch = [&](const std::string& name, const at::Tensor& like) {
    const auto it = by_name.find(name);
    if (it == by_name.end())
      throw UserError(
          fmt::format("{}: tensor '{}' is missing (does the config match the "
                      "checkpoint's model?)",
                      checkpoint_dir, name));
    auto tensor = it->second->load(name);
    if (tensor.sizes() != like.sizes())
      throw UserError(fmt::format(
          "{}: tensor '{}' has shape {} but the model expects {} (does the "
          "config match the checkpoint's model?)",
          it->second->path(), name, fmt::join(tensor.sizes(), "x"), fmt::join(like.sizes(), "x")));
    used.insert(name);
    return tensor.to(like.scalar_type());
  };

  at::NoGradGuard no_grad;
  const int64_t first = model.first_local_expert();
  for (size_t i = 0; i < optimizer.slots().size(); ++i) {
    const auto& slot = optimizer.slots()[i];
    const auto whole = at::TensorOptions().dtype(at::kFloat);  // on the host, then placed
    SlotState state{at::empty(slot.param.sizes(), whole), at::empty(slot.param.sizes(), whole),
                    at::empty(slot.param.sizes(), whole)};
    for (const auto& [prefix, tensor] : slot_tensors(state))
      for (auto& [name, view] : checkpoint_views(prefix + slot.name, *tensor, first))
        view.copy_(fetch(name, view));
    optimizer.load_whole_state(i, state);
  }
  for (auto& item : model.named_buffers()) item.value().copy_(fetch(item.key(), item.value()));
  const auto layers = model.moe_layers();
  check_all_consumed(checkpoint_dir, by_name, used,
                     layers.empty() ? 0 : layers.front()->num_experts());
  if (by_name.count("rng.cpu")) set_cpu_rng_state(by_name.at("rng.cpu")->load("rng.cpu"));

  optimizer.set_steps_taken(meta["optimizer"].value("steps_taken", int64_t{0}));
  TrainingState state;
  state.step = meta.value("step", int64_t{0});
  state.samples_consumed = meta.value("samples_consumed", int64_t{0});
  return state;
}

}  // namespace moeforge

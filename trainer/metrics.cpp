#include "trainer/metrics.hpp"

#include <fmt/format.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "trainer/common/file_io.hpp"
#include "trainer/common/user_error.hpp"
#include "trainer/tensorboard/event_file_writer.hpp"

namespace moeforge {

namespace {

// The rows of an existing metrics file up to `last_step`, in order.
std::string rows_through(const std::string& path, int64_t last_step) {
  if (!std::filesystem::exists(path)) return "";
  std::istringstream in(read_file(path));
  std::string kept;
  for (std::string line; std::getline(in, line);) {
    const auto row = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (row.is_object() && row.value("step", int64_t{0}) <= last_step) kept += line + "\n";
  }
  return kept;
}

// TensorBoard groups charts by the tag's first component.
const std::set<std::string> kThroughputKeys = {"tokens_per_s", "step_seconds", "tflops", "mfu",
                                               "hfu"};
const std::set<std::string> kMemoryKeys = {"peak_memory_mib"};
const std::set<std::string> kMoeKeys = {
    "max_vio",     "max_vio_micro", "max_vio_p50",  "max_vio_p90", "load_cv_p50",
    "load_cv_p90", "load_cv_max",   "dropped_frac", "null_frac",   "bias_abs_max"};

std::string group_of(const std::string& key) {
  if (kThroughputKeys.count(key)) return "throughput";
  if (kMemoryKeys.count(key)) return "memory";
  if (kMoeKeys.count(key)) return "moe";
  return "train";
}

// The TensorBoard scalars of one metrics.jsonl row, so the two always agree: every number at
// the top level as <group>/<key>, every number of a MoE layer as layer_<key>/block_<NN>.
std::vector<std::pair<std::string, double>> tensorboard_scalars(const nlohmann::json& row) {
  std::vector<std::pair<std::string, double>> scalars;
  for (const auto& [key, value] : row.items())
    if (value.is_number() && key != "step")
      scalars.emplace_back(group_of(key) + "/" + key, value.get<double>());
  for (const auto& layer : row.value("moe_layers", nlohmann::json::array())) {
    const auto block = layer.at("layer").get<int64_t>();
    for (const auto& [key, value] : layer.items())
      if (value.is_number() && key != "layer")
        scalars.emplace_back(fmt::format("layer_{}/block_{:02}", key, block), value.get<double>());
  }
  return scalars;
}

}  // namespace

// A JSON-lines file whose rows carry a step. A fresh run (`resumed_at_step` unset) starts it
// anew; a run resumed at step S keeps the rows of steps ≤ S and appends. Every write is checked.
class MetricsLog::JsonlFile {
 public:
  JsonlFile(const std::string& path, std::optional<int64_t> resumed_at_step) : path_(path) {
    if (resumed_at_step) write_file_atomically(path, rows_through(path, *resumed_at_step));
    file_.open(path, resumed_at_step ? std::ios::app : std::ios::trunc);
    require(file_.is_open(), fmt::format("{}: cannot open the metrics file for writing", path));
  }

  void write_row(const std::string& json) {
    file_ << json << '\n';
    file_.flush();
    require(static_cast<bool>(file_),
            fmt::format("{}: writing metrics failed (is the disk full?); training stopped so "
                        "that no step goes unrecorded",
                        path_));
  }

 private:
  std::string path_;
  std::ofstream file_;
};

MetricsLog::MetricsLog(const std::string& path, std::optional<int64_t> resumed_at_step,
                       bool console)
    : resumed_at_step_(resumed_at_step), console_(console) {
  if (!path.empty()) metrics_ = std::make_unique<JsonlFile>(path, resumed_at_step);
}

MetricsLog::~MetricsLog() = default;

void MetricsLog::write_tensorboard_to(const std::string& dir) {
  tensorboard_ = std::make_unique<EventFileWriter>(dir);
  if (resumed_at_step_) tensorboard_->start_session_at(*resumed_at_step_ + 1);
}

void MetricsLog::write_expert_load_to(const std::string& path) {
  expert_load_ = std::make_unique<JsonlFile>(path, resumed_at_step_);
}

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const auto whole = static_cast<int64_t>(std::llround(seconds));
  if (whole >= 3600) return fmt::format("{}h{:02}m", whole / 3600, (whole % 3600) / 60);
  if (whole >= 60) return fmt::format("{}m{:02}s", whole / 60, whole % 60);
  return fmt::format("{:.1f}s", seconds);
}

std::string MetricsLog::console_line(const StepMetrics& m) {
  return fmt::format(
             "step {:>5}/{} | loss {:.4f} | aux {:.4f} | z {:.3f} | lr {:.2e} | gnorm {:.3f} | "
             "{:>8.0f} tok/s, {:.3g} TFLOP/s, {:.1f}% MFU | maxvio {:.3f} | peak {:.0f} MiB | "
             "{} elapsed, ETA {}",
             m.step, m.total_steps, m.loss, m.aux_loss, m.z_loss, m.lr, m.grad_norm, m.tokens_per_s,
             m.tflops, 100.0 * m.mfu, m.max_vio, m.peak_memory_mib,
             format_duration(m.elapsed_seconds), format_duration(m.eta_seconds)) +
         (m.skipped ? " | SKIPPED: gradients not finite, no update" : "");
}

void MetricsLog::log(const StepMetrics& m) {
  if (console_) std::cout << console_line(m) << std::endl;
  if (!metrics_ && !tensorboard_) return;
  nlohmann::json j = {{"step", m.step},
                      {"loss", m.loss},
                      {"aux_loss", m.aux_loss},
                      {"z_loss", m.z_loss},
                      {"lr", m.lr},
                      {"grad_norm", m.grad_norm},
                      {"tokens_per_s", m.tokens_per_s},
                      {"step_seconds", m.step_seconds},
                      {"elapsed_seconds", m.elapsed_seconds},
                      {"peak_memory_mib", m.peak_memory_mib},
                      {"tflops", m.tflops},
                      {"mfu", m.mfu},
                      {"hfu", m.hfu},
                      {"max_vio", m.max_vio},
                      {"max_vio_micro", m.max_vio_micro}};
  if (!m.layers.empty()) {
    j.update({{"max_vio_p50", m.max_vio_p50},
              {"max_vio_p90", m.max_vio_p90},
              {"load_cv_p50", m.load_cv_p50},
              {"load_cv_p90", m.load_cv_p90},
              {"load_cv_max", m.load_cv_max},
              {"dropped_frac", m.dropped_frac},
              {"null_frac", m.null_frac},
              {"bias_abs_max", m.bias_abs_max}});
  }
  auto layers = nlohmann::json::array();
  for (const auto& layer : m.layers) {
    layers.push_back({{"layer", layer.layer},
                      {"expert_load", layer.expert_load},
                      {"load_min", layer.load_min},
                      {"load_max", layer.load_max},
                      {"load_cv", layer.load_cv},
                      {"max_vio", layer.max_vio},
                      {"max_vio_micro", layer.max_vio_micro},
                      {"router_entropy", layer.router_entropy},
                      {"dropped_frac", layer.dropped_frac},
                      {"null_frac", layer.null_frac},
                      {"bias_abs_max", layer.bias_abs_max},
                      {"bias_abs_mean", layer.bias_abs_mean}});
  }
  j["moe_layers"] = layers;
  if (m.skipped) j["skipped"] = true;
  if (metrics_) metrics_->write_row(j.dump());
  if (tensorboard_) tensorboard_->add_scalars(m.step, tensorboard_scalars(j));
}

void MetricsLog::log(const EvalMetrics& m) {
  if (console_)
    std::cout << fmt::format("eval  step {:>5} | val loss {:.4f}", m.step, m.val_loss) << std::endl;
  const nlohmann::json row = {{"step", m.step}, {"val_loss", m.val_loss}};
  if (metrics_) metrics_->write_row(row.dump());
  if (tensorboard_) tensorboard_->add_scalars(m.step, tensorboard_scalars(row));
}

void MetricsLog::log_expert_load(const StepMetrics& m) {
  if (!expert_load_ || m.expert_load_by_rank.empty()) return;
  auto layers = nlohmann::json::array();
  for (size_t i = 0; i < m.layers.size() && i < m.expert_load_by_rank.size(); ++i)
    layers.push_back(
        {{"layer", m.layers[i].layer}, {"tokens_per_expert_by_rank", m.expert_load_by_rank[i]}});
  expert_load_->write_row(nlohmann::json{{"step", m.step}, {"moe_layers", layers}}.dump());
}

}  // namespace moeforge

#include "trainer/metrics.hpp"

#include <fmt/format.h>

#include <cmath>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "trainer/common/file_io.hpp"
#include "trainer/common/user_error.hpp"

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

}  // namespace

MetricsLog::MetricsLog(const std::string& path, std::optional<int64_t> resumed_at_step,
                       bool console)
    : path_(path), console_(console) {
  if (path.empty()) return;
  if (resumed_at_step) write_file_atomically(path, rows_through(path, *resumed_at_step));
  file_.open(path, resumed_at_step ? std::ios::app : std::ios::trunc);
  require(file_.is_open(), fmt::format("{}: cannot open the metrics file for writing", path));
}

void MetricsLog::write_row(const std::string& json) {
  file_ << json << '\n';
  file_.flush();
  require(static_cast<bool>(file_),
          fmt::format("{}: writing metrics failed (is the disk full?); training stopped so that "
                      "no step goes unrecorded",
                      path_));
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
             "{:>8.0f} tok/s | maxvio {:.3f} | peak {:.0f} MiB | {} elapsed, ETA {}",
             m.step, m.total_steps, m.loss, m.aux_loss, m.z_loss, m.lr, m.grad_norm, m.tokens_per_s,
             m.max_vio, m.peak_memory_mib, format_duration(m.elapsed_seconds),
             format_duration(m.eta_seconds)) +
         (m.skipped ? " | SKIPPED: gradients not finite, no update" : "");
}

void MetricsLog::log(const StepMetrics& m) {
  if (console_) std::cout << console_line(m) << std::endl;
  if (!file_.is_open()) return;
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
                      {"max_vio", m.max_vio},
                      {"max_vio_micro", m.max_vio_micro}};
  auto layers = nlohmann::json::array();
  for (const auto& layer : m.layers) {
    layers.push_back({{"layer", layer.layer},
                      {"expert_load", layer.expert_load},
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
  write_row(j.dump());
}

void MetricsLog::log(const EvalMetrics& m) {
  if (console_)
    std::cout << fmt::format("eval  step {:>5} | val loss {:.4f}", m.step, m.val_loss) << std::endl;
  if (!file_.is_open()) return;
  write_row(nlohmann::json{{"step", m.step}, {"val_loss", m.val_loss}}.dump());
}

}  // namespace moeforge
